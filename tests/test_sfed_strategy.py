"""sfed_theory.flower.SFedStrategy on hand-made replies: no grid runtime, no Ray.

Each test configures a round on a stub grid (only ``get_node_ids``), answers the messages itself
and checks what ``aggregate_train`` returns against the formulas of the schemes, the rule's gamma
and the drop-out policy (the aggregated model is the average of the clients that answered).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict  # noqa: E402

from sfed_theory import scaling_factor  # noqa: E402
from sfed_theory.flower import SFedStrategy, adapter_key, split_key  # noqa: E402

R, SHAPES = 4, {"m.q": (6, 5), "m.v": (3, 5)}  # layer: (d, k)
ALPHA = 8.0


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


class StubGrid:
    def __init__(self, n: int):
        self.nodes = [100 + i for i in range(n)]

    def get_node_ids(self):
        return list(self.nodes)


def global_arrays(seed: int = 0, b_scale: float = 0.0, head: bool = False) -> ArrayRecord:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for layer, (d, k) in SHAPES.items():
        sd[adapter_key(layer, "A")] = torch.randn(R, k, generator=g)
        sd[adapter_key(layer, "B")] = torch.randn(d, R, generator=g) * b_scale
    if head:
        sd["head.weight"] = torch.randn(2, 3, generator=g)
    return ArrayRecord(sd)


def trained(msg: Message, seed: int, *, same: bool = False, train_a: bool = True) -> dict[str, torch.Tensor]:
    """A client's adapter after 'training': the received one plus a seeded increment."""
    g = torch.Generator().manual_seed(0 if same else seed)
    got = msg.content["arrays"].to_torch_state_dict()
    out = {}
    for layer, (d, k) in SHAPES.items():
        a = got[adapter_key(layer, "A")]
        out[adapter_key(layer, "A")] = a + (0.1 * torch.randn(a.shape, generator=g) if train_a else 0)
        b = got.get(adapter_key(layer, "B"), torch.zeros(d, R))
        out[adapter_key(layer, "B")] = b + 0.1 * torch.randn(d, R, generator=g)
    for key in got:
        if split_key(key)[1] is None:
            out[key] = got[key] + 0.1 * torch.randn(got[key].shape, generator=g)
    return out


def reply(msg: Message, arrays: dict, n_examples: int = 10) -> Message:
    return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"num-examples": n_examples})}),
                   reply_to=msg)


def configure(strategy: SFedStrategy, n_nodes: int, arrays: ArrayRecord, rnd: int = 1) -> list[Message]:
    return list(strategy.configure_train(rnd, arrays, ConfigRecord(), StubGrid(n_nodes)))


def output(arrays: dict[str, torch.Tensor], gamma: float, x: torch.Tensor, layer: str = "m.q") -> torch.Tensor:
    """The adapter's contribution to the layer's output: (merged + gamma B A) x."""
    y = gamma * arrays[adapter_key(layer, "B")] @ arrays[adapter_key(layer, "A")] @ x
    merged = arrays.get(adapter_key(layer, "merged"))
    return y if merged is None else y + merged @ x


# ------------------------------------------------------------------------------------------------ gamma out
@pytest.mark.parametrize("rule,kw,frac,n_nodes", [
    ("sfed", {}, 1.0, 4), ("sfed", {}, 0.5, 4), ("rslora", {}, 1.0, 3), ("lora", {}, 1.0, 3),
    ("sfed-general", {"rho": 0.2, "client_weights": [1.0, 2.0, 3.0, 4.0], "n_clients": 4}, 0.5, 4),
])
def test_configure_train_sends_the_rules_gamma_for_the_nodes_sampled(rule, kw, frac, n_nodes):
    s = SFedStrategy(alpha=ALPHA, rule=rule, fraction_train=frac, min_train_nodes=1, **kw)
    msgs = configure(s, n_nodes, global_arrays())
    k = len(msgs)
    assert k == max(1, int(n_nodes * frac))
    if rule == "sfed-general":
        want = scaling_factor(rule, ALPHA, R, 4, rho=0.2, weights=[1, 2, 3, 4], participating=k)
    else:
        want = scaling_factor(rule, ALPHA, R, k)
    for m in msgs:
        conf = m.content["config"]
        assert conf["gamma"] == want and conf["sfed-scheme"] == "fedit" and conf["server-round"] == 1
    assert len({m.metadata.dst_node_id for m in msgs}) == k


def test_rank_is_read_from_the_arrays_and_checked():
    s = SFedStrategy(alpha=ALPHA)
    configure(s, 2, global_arrays())
    assert s.rank == R
    with pytest.raises(ValueError, match="rank=8 but the arrays' adapters have rank 4"):
        configure(SFedStrategy(alpha=ALPHA, rank=8), 2, global_arrays())
    with pytest.raises(ValueError, match="hold no LoRA adapter"):
        configure(SFedStrategy(alpha=ALPHA), 2, ArrayRecord({"w": torch.zeros(2)}))


# ------------------------------------------------------------------------------------------- aggregation
def test_fedit_weighted_average_of_A_B_and_other_arrays():
    s = SFedStrategy(alpha=ALPHA, scheme="fedit")
    msgs = configure(s, 3, global_arrays(head=True))
    sizes = [10, 30, 60]
    got = [trained(m, i) for i, m in enumerate(msgs)]
    arrays, metrics = s.aggregate_train(1, [reply(m, g, n) for m, g, n in zip(msgs, got, sizes)][::-1])
    out = arrays.to_torch_state_dict()
    p = np.array(sizes) / 100
    for key in out:
        want = sum(pi * g[key] for pi, g in zip(p, got))
        torch.testing.assert_close(out[key], want, rtol=1e-6, atol=1e-7)
    assert metrics["gamma"] == metrics["gamma-sent"] == scaling_factor("sfed", ALPHA, R, 3)
    assert metrics["n-dropped"] == 0


def test_ffa_keeps_A_and_averages_B():
    s = SFedStrategy(alpha=ALPHA, scheme="ffa", weighted=False)
    start = global_arrays()
    start_sd = start.to_torch_state_dict()
    msgs = configure(s, 2, start)
    got = [trained(m, i) for i, m in enumerate(msgs)]  # even if a client changed A, FFA keeps it
    out = s.aggregate_train(1, [reply(m, g) for m, g in zip(msgs, got)])[0].to_torch_state_dict()
    for layer in SHAPES:
        a, b = adapter_key(layer, "A"), adapter_key(layer, "B")
        assert torch.equal(out[a], start_sd[a])
        torch.testing.assert_close(out[b], (got[0][b] + got[1][b]) / 2)


def test_exact_merges_the_average_of_products_and_resets_B():
    s = SFedStrategy(alpha=ALPHA, scheme="exact", weighted=False)
    msgs = configure(s, 3, global_arrays())
    gamma = msgs[0].content["config"]["gamma"]
    assert adapter_key("m.q", "merged") in msgs[0].content["arrays"]  # exact sends the merged weight change
    got = [trained(m, i) for i, m in enumerate(msgs)]
    out = s.aggregate_train(1, [reply(m, g) for m, g in zip(msgs, got)])[0].to_torch_state_dict()
    for layer in SHAPES:
        a, b, mg = (adapter_key(layer, k) for k in ("A", "B", "merged"))
        want = gamma * sum(g[b] @ g[a] for g in got) / 3
        torch.testing.assert_close(out[mg], want, rtol=1e-5, atol=1e-6)
        assert not out[b].any()


def test_fedsa_keeps_B_on_the_clients():
    s = SFedStrategy(alpha=ALPHA, scheme="fedsa", weighted=False)
    msgs = configure(s, 2, global_arrays(b_scale=1.0))
    assert not any(split_key(k)[1] == "B" for k in msgs[0].content["arrays"])  # B is never sent
    got = [trained(m, i) for i, m in enumerate(msgs)]
    only_a = [{k: v for k, v in g.items() if split_key(k)[1] == "A"} for g in got]  # FedSA clients send A only
    arrays, _ = s.aggregate_train(1, [reply(m, g) for m, g in zip(msgs, only_a)])
    out = arrays.to_torch_state_dict()
    assert all(split_key(k)[1] == "A" for k in out)
    for layer in SHAPES:
        a = adapter_key(layer, "A")
        torch.testing.assert_close(out[a], (got[0][a] + got[1][a]) / 2)
    msgs2 = configure(s, 2, arrays, rnd=2)
    assert not any(split_key(k)[1] == "B" for k in msgs2[0].content["arrays"])
    assert not s.last_round.B1  # nothing of the clients' B reached the strategy


# -------------------------------------------------------------------------------------------- drop-outs
def drop_out_round(same: bool, rescale: bool) -> dict[str, float]:
    """Three sampled FedIT clients (on a global adapter that already holds a learned B), the third
    fails. Relative changes of the layer output: ``change`` (the aggregate against the all-three
    aggregate), ``share`` (the survivors' own average against the all-three aggregate: what the
    dropped client took away), ``to_survivors`` (the aggregate against the survivors' average)."""
    x = torch.randn(SHAPES["m.q"][1], 7, generator=torch.Generator().manual_seed(9))

    def run(drop: bool):
        s = SFedStrategy(alpha=ALPHA, scheme="fedit", weighted=False)
        msgs = configure(s, 3, global_arrays(b_scale=0.5))
        got = [trained(m, i, same=same) for i, m in enumerate(msgs)]
        reps = [reply(m, g) for m, g in zip(msgs, got)]
        if drop:
            reps[2] = Message(Error(code=1, reason="client left"), reply_to=msgs[2])
        arrays, metrics = s.aggregate_train(1, reps)
        out = arrays.to_torch_state_dict()
        if not rescale:  # the old policy: gamma_round applied to the unrescaled average
            out = {k: v * (metrics["gamma"] / metrics["gamma-sent"]) if split_key(k)[1] == "B" else v
                   for k, v in out.items()}
        return output(out, metrics["gamma"], x), got, metrics

    y_all, got, _ = run(False)
    y_drop, _, m = run(True)
    survivors = {k: (got[0][k] + got[1][k]) / 2 for k in got[0]}
    y_surv = output(survivors, m["gamma-sent"], x)
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    return {"change": rel(y_drop, y_all), "share": rel(y_surv, y_all), "to_survivors": rel(y_drop, y_surv),
            "factor": m["gamma"] / m["gamma-sent"]}


def test_drop_out_changes_the_output_only_by_the_dropped_clients_share(capsys):
    same = {r: drop_out_round(same=True, rescale=r) for r in (True, False)}
    diff = {r: drop_out_round(same=False, rescale=r) for r in (True, False)}
    with capsys.disabled():
        print(f"\ndrop-out: 3 sampled, 1 dropped, gamma_round/gamma_sent = {same[True]['factor']:.4f}; relative "
              f"change of the layer output against the all-3 aggregate (dropped client's share in brackets):\n"
              f"  identical clients: with rescale {same[True]['change']:.2e}, without {same[False]['change']:.4f} "
              f"[share {same[True]['share']:.2e}]\n"
              f"  different clients: with rescale {diff[True]['change']:.4f}, without {diff[False]['change']:.4f} "
              f"[share {diff[True]['share']:.4f}]; distance to the survivors' average: with "
              f"{diff[True]['to_survivors']:.2e}, without {diff[False]['to_survivors']:.4f}")
    assert same[True]["factor"] == pytest.approx(math.sqrt(2 / 3))
    assert same[True]["change"] < 1e-6  # identical clients: dropping one changes nothing
    assert same[False]["change"] == pytest.approx(1 - math.sqrt(2 / 3), rel=1e-4)  # old policy: an 18% jump
    assert diff[True]["to_survivors"] < 1e-6  # the aggregate IS the survivors' average ...
    assert diff[True]["change"] == pytest.approx(diff[True]["share"], rel=1e-5)  # ... so it moves by the share only
    assert diff[False]["to_survivors"] == pytest.approx(1 - math.sqrt(2 / 3), rel=1e-4)


def test_next_round_sends_the_same_function_at_the_new_gamma():
    s = SFedStrategy(alpha=ALPHA, scheme="ffa", weighted=False)
    msgs = configure(s, 3, global_arrays())
    got = [trained(m, i) for i, m in enumerate(msgs)]
    reps = [reply(m, g) for m, g in zip(msgs[:2], got[:2])]  # the third never answers
    arrays, metrics = s.aggregate_train(1, reps)
    assert s.last_round.outcomes[msgs[2].metadata.dst_node_id].status == "no-reply"
    assert metrics["gamma"] == scaling_factor("sfed", ALPHA, R, 2) and s.gamma == metrics["gamma"]
    x = torch.randn(5, 3)
    y_after = output(arrays.to_torch_state_dict(), metrics["gamma"], x)
    msgs2 = configure(s, 3, arrays, rnd=2)
    g2 = msgs2[0].content["config"]["gamma"]
    assert g2 == scaling_factor("sfed", ALPHA, R, 3)
    torch.testing.assert_close(output(msgs2[0].content["arrays"].to_torch_state_dict(), g2, x), y_after)


def test_bad_replies_are_dropped_one_by_one_with_a_reason():
    s = SFedStrategy(alpha=ALPHA, scheme="fedit")
    msgs = configure(s, 6, global_arrays())
    good = [trained(m, i) for i, m in enumerate(msgs)]
    bad_shape = dict(good[1], **{"m.v.lora_B.weight": torch.zeros(3, R - 1)})
    missing = {k: v for k, v in good[2].items() if not k.startswith("m.v.")}
    nan = dict(good[3], **{"m.q.lora_A.weight": torch.full((R, 5), float("nan"))})
    reps = [reply(msgs[0], good[0]), reply(msgs[1], bad_shape), reply(msgs[2], missing), reply(msgs[3], nan),
            Message(RecordDict({"arrays": ArrayRecord(good[4])}), reply_to=msgs[4])]  # no num-examples
    arrays, metrics = s.aggregate_train(1, reps)
    st = {i: s.last_round.outcomes[m.metadata.dst_node_id] for i, m in enumerate(msgs)}
    assert [st[i].status for i in range(6)] == ["ok", "rejected", "rejected", "rejected", "rejected", "no-reply"]
    assert "wrong shape: m.v.lora_B.weight is (3, 3), expected (3, 4)" in st[1].reason
    assert "missing ['m.v.lora_A.weight', 'm.v.lora_B.weight']" in st[2].reason
    assert "non-finite" in st[3].reason and "'num-examples'" in st[4].reason
    assert s.last_round.accepted == [msgs[0].metadata.dst_node_id] and metrics["n-dropped"] == 5
    assert metrics["gamma"] == scaling_factor("sfed", ALPHA, R, 1)


def test_no_reply_at_all_keeps_the_global_adapter():
    s = SFedStrategy(alpha=ALPHA)
    configure(s, 2, global_arrays())
    assert s.aggregate_train(1, []) == (None, None)
    assert {o.status for o in s.last_round.outcomes.values()} == {"no-reply"}


# ------------------------------------------------------------------------------------------------ adaptive
def test_adaptive_rule_estimates_rho_and_keeps_the_function():
    s = SFedStrategy(alpha=ALPHA, rule="sfed-adaptive", scheme="ffa", weighted=False, adaptive_ema=1.0)
    msgs = configure(s, 4, global_arrays())
    g1 = msgs[0].content["config"]["gamma"]
    assert g1 == scaling_factor("sfed", ALPHA, R, 4)  # prior rho = 0: SFed's gamma
    got = [trained(m, i, same=True) for i, m in enumerate(msgs)]  # identical increments: rho = 1
    arrays, metrics = s.aggregate_train(1, [reply(m, g) for m, g in zip(msgs, got)])
    assert s.last_round.estimate.rho_raw == pytest.approx(1.0)
    assert metrics["rho-smoothed"] > 0.9 and metrics["gamma-next"] < g1
    x = torch.randn(5, 3)
    torch.testing.assert_close(output(arrays.to_torch_state_dict(), metrics["gamma-next"], x),
                               output(s.last_round.aggregated, metrics["gamma"], x))
    assert configure(s, 4, arrays, rnd=2)[0].content["config"]["gamma"] == metrics["gamma-next"]


def test_constructor_errors_say_what_is_allowed():
    with pytest.raises(ValueError, match="unknown rule 'sfed2'; allowed: lora, rslora, sfed, sfed-general, "
                                         "sfed-adaptive"):
        SFedStrategy(alpha=1, rule="sfed2")
    with pytest.raises(ValueError, match="unknown scheme 'fedavg'; allowed: fedit, fedsa, ffa, exact"):
        SFedStrategy(alpha=1, scheme="fedavg")
    with pytest.raises(ValueError, match="alpha must be > 0"):
        SFedStrategy(alpha=0)
    with pytest.raises(ValueError, match="rho"):
        SFedStrategy(alpha=1, rule="sfed-general", rho=2.0)
    with pytest.raises(ValueError, match="weights has 2 entries but n_clients=3"):
        SFedStrategy(alpha=1, rule="sfed-general", n_clients=3, client_weights=[1, 2])


def test_without_flower_the_error_says_what_to_install():
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; sys.modules['flwr'] = None\n"
            "import sfed_theory\n"
            "try:\n    sfed_theory.SFedStrategy\nexcept ImportError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert "ERR sfed_theory.flower needs Flower and torch: pip install 'flwr[simulation]>=1.42'" in out.stdout, \
        out.stderr
