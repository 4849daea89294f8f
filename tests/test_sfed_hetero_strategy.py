"""sfed_theory.flower_hetero.SFedHeteroStrategy on hand-made replies (issue 13, item 4): no grid runtime.

Nodes of ranks 2, 4 and 8 under a server of width 8: each is sent its rule's gamma and its share of the
server's adapter, and each reply (which says its rank) enters the aggregate as ``p_i gamma_i B_i A_i``."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402

from sfed_theory import client_scaling_factors  # noqa: E402
from sfed_theory.flower import adapter_key  # noqa: E402
from sfed_theory.flower_hetero import SFedHeteroStrategy, adapter_rank, cut_to_rank  # noqa: E402

R, SHAPES, ALPHA = 8, {"m.q": (6, 5), "m.v": (3, 5)}, 8.0
NODES = {100: 2, 101: 4, 102: 8}  # node id: rank
HETERO = {"ffa": "zero-pad", "fedit": "zero-pad", "exact": "stack", "svd": "svd"}


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


class StubGrid:
    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)


def global_arrays(b_scale: float = 0.3, merged: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sd = {}
    for layer, (d, k) in SHAPES.items():
        sd[adapter_key(layer, "A")] = torch.randn(R, k, generator=g, dtype=torch.float64)
        sd[adapter_key(layer, "B")] = torch.randn(d, R, generator=g, dtype=torch.float64) * b_scale
        if merged:
            sd[adapter_key(layer, "merged")] = torch.randn(d, k, generator=g, dtype=torch.float64)
    return sd


def configure(s, arrays, nodes=NODES, rnd=1):
    return {m.metadata.dst_node_id: m for m in s.configure_train(rnd, ArrayRecord(arrays), ConfigRecord(),
                                                                 StubGrid(nodes))}


def trained(msg: Message, seed: int, train_a: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    got = msg.content["arrays"].to_torch_state_dict()
    out = {}
    for layer in SHAPES:
        a, b = got[adapter_key(layer, "A")], got[adapter_key(layer, "B")]
        out[adapter_key(layer, "A")] = a + (0.1 * torch.randn(a.shape, generator=g, dtype=a.dtype) if train_a else 0)
        out[adapter_key(layer, "B")] = b + 0.1 * torch.randn(b.shape, generator=g, dtype=b.dtype)
    return out


def reply(msg, arrays, **metrics) -> Message:
    m = {"num-examples": 10, "rank": adapter_rank(arrays), **metrics}
    return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(m)}), reply_to=msg)


def product(t: dict, gamma: float, layer: str = "m.q") -> torch.Tensor:
    """What the adapter adds to the layer's weight: merged + gamma B A."""
    out = gamma * t[adapter_key(layer, "B")] @ t[adapter_key(layer, "A")]
    m = t.get(adapter_key(layer, "merged"))
    return out if m is None else out + m


@pytest.mark.parametrize("rule", ["sfed-hetero", "sfed", "lora"])
def test_each_node_gets_its_gamma_rank_and_share_of_the_servers_model(rule):
    s = SFedHeteroStrategy(alpha=ALPHA, rule=rule, scheme="ffa", node_ranks=NODES)
    server = global_arrays()
    msgs = configure(s, server)
    want = client_scaling_factors(rule, ALPHA, list(NODES.values()), scheme="zero-pad")
    assert s.gamma == pytest.approx(want.server)
    for (node, r), g in zip(NODES.items(), want.clients):
        conf, arrays = msgs[node].content["config"], msgs[node].content["arrays"].to_torch_state_dict()
        assert conf["gamma"] == pytest.approx(g) and conf["sfed-rank"] == r and conf["sfed-scheme"] == "ffa"
        assert adapter_rank(arrays) == r
        # function-preserving: the client's model is the server's on its columns
        a, b = server[adapter_key("m.q", "A")], server[adapter_key("m.q", "B")]
        torch.testing.assert_close(product(arrays, g), want.server * b[:, :r] @ a[:r])


@pytest.mark.parametrize("scheme", ["ffa", "fedit", "exact", "svd"])
def test_aggregate_is_the_weighted_sum_of_the_clients_own_models(scheme):
    s = SFedHeteroStrategy(alpha=ALPHA, rule="sfed-hetero", scheme=scheme, node_ranks=NODES)
    server = global_arrays(b_scale=0.0 if scheme in ("exact", "svd") else 0.3, merged=scheme in ("exact", "svd"))
    msgs = configure(s, server)
    gammas = {n: msgs[n].content["config"]["gamma"] for n in NODES}
    sizes = {100: 10, 101: 30, 102: 60}
    got = {n: trained(msgs[n], n, train_a=scheme != "ffa") for n in NODES}
    new, metrics = s.aggregate_train(1, [reply(msgs[n], got[n], **{"num-examples": sizes[n]}) for n in NODES])
    new = new.to_torch_state_dict()
    p = {n: sizes[n] / 100 for n in NODES}
    assert sorted(s.last_round.accepted) == list(NODES) and metrics["gamma"] == pytest.approx(s.gamma)
    assert {n: r for n, (r, _) in s.last_clients.items()} == NODES
    for layer in SHAPES:
        exact = sum(p[n] * product(got[n], gammas[n], layer) for n in NODES)
        if scheme == "fedit":  # the product of the moved, padded averages
            bb = sum(p[n] * gammas[n] / s.gamma * torch.nn.functional.pad(got[n][adapter_key(layer, "B")],
                                                                           (0, R - NODES[n])) for n in NODES)
            aa = sum(p[n] * torch.nn.functional.pad(got[n][adapter_key(layer, "A")], (0, 0, 0, R - NODES[n]))
                     for n in NODES)
            exact = s.gamma * bb @ aa
        elif scheme == "exact":
            exact = exact + server[adapter_key(layer, "merged")]
        torch.testing.assert_close(product(new, s.gamma, layer), exact)
        assert new[adapter_key(layer, "A")].shape == (R, SHAPES[layer][1])


def test_replies_must_say_their_rank_and_match_it():
    s = SFedHeteroStrategy(alpha=ALPHA, node_ranks=NODES)
    msgs = configure(s, global_arrays())
    bad_rank = reply(msgs[100], trained(msgs[100], 0))
    bad_rank.content["metrics"]["rank"] = 4
    no_rank = Message(RecordDict({"arrays": ArrayRecord(trained(msgs[101], 1)),
                                  "metrics": MetricRecord({"num-examples": 10})}), reply_to=msgs[101])
    wide = {k: torch.cat([t, t], dim=0 if "lora_A" in k else 1) for k, t in trained(msgs[102], 2).items()}
    s.aggregate_train(1, [bad_rank, no_rank, reply(msgs[102], wide)])
    out = s.last_round.outcomes
    assert "reply says rank 4 but its adapter has rank 2" in out[100].reason
    assert "no metric(s) ['rank']" in out[101].reason
    assert "adapter of rank 16" in out[102].reason
    assert s.last_round.accepted == []


def test_unknown_ranks_are_learned_from_the_replies():
    s = SFedHeteroStrategy(alpha=ALPHA, rule="sfed-hetero")  # no node_ranks: every node first taken at R
    server = global_arrays()
    msgs = configure(s, server)
    at_r = client_scaling_factors("sfed-hetero", ALPHA, [R] * 3)
    assert all(m.content["config"]["gamma"] == pytest.approx(at_r.clients[0]) for m in msgs.values())
    # the clients cut the R-wide arrays to their ranks (as load_adapter does) and train at the gamma sent
    got = {n: trained(type(msgs[n])(RecordDict({"arrays": ArrayRecord(cut_to_rank(
        msgs[n].content["arrays"].to_torch_state_dict(), r))}), reply_to=msgs[n]), n, train_a=False)
           for n, r in NODES.items()}
    new, _ = s.aggregate_train(1, [reply(msgs[n], got[n]) for n in NODES])
    exact = sum(product(got[n], at_r.clients[0]) for n in NODES) / 3
    torch.testing.assert_close(product(new.to_torch_state_dict(), s.gamma), exact)
    assert s.node_ranks == NODES
    msgs2 = configure(s, new.to_torch_state_dict(), rnd=2)
    want = client_scaling_factors("sfed-hetero", ALPHA, list(NODES.values()), weights=[10, 10, 10])
    for (node, r), g in zip(NODES.items(), want.clients):
        assert msgs2[node].content["config"]["gamma"] == pytest.approx(g)
        assert adapter_rank(msgs2[node].content["arrays"].to_torch_state_dict()) == r


def test_a_reply_may_say_which_gamma_it_trained_with():
    s = SFedHeteroStrategy(alpha=ALPHA, node_ranks=NODES)
    msgs = configure(s, global_arrays())
    got = {n: trained(msgs[n], n, train_a=False) for n in NODES}  # ffa: A frozen
    new, _ = s.aggregate_train(1, [reply(msgs[n], got[n], gamma=1.25) for n in NODES])
    exact = sum(product(got[n], 1.25) for n in NODES) / 3
    torch.testing.assert_close(product(new.to_torch_state_dict(), s.gamma), exact)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="unknown rule 'sfed-adaptive'"):
        SFedHeteroStrategy(alpha=ALPHA, rule="sfed-adaptive")
    with pytest.raises(ValueError, match="unknown scheme 'fedsa'"):
        SFedHeteroStrategy(alpha=ALPHA, scheme="fedsa")
    with pytest.raises(ValueError, match="node rank"):
        SFedHeteroStrategy(alpha=ALPHA, node_ranks={1: 0})
    s = SFedHeteroStrategy(alpha=ALPHA, node_ranks={100: 16, 101: 4})
    with pytest.raises(ValueError, match="exceed the server's width R=8"):
        configure(s, global_arrays(), nodes={100: 16, 101: 4})


def test_load_adapter_cuts_wider_arrays_to_the_models_rank():
    peft = pytest.importorskip("peft")
    from sfed_theory.flower_client import load_adapter

    model = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(5, 6)),
                                peft.LoraConfig(r=2, lora_alpha=2, target_modules=["0"]))
    wide = {k: t.float() for k, t in global_arrays().items() if k.startswith("m.q")}
    prefix = next(k for k in peft.get_peft_model_state_dict(model) if "lora_A" in k).rsplit(".lora_A", 1)[0]
    arrays = ArrayRecord({k.replace("m.q", prefix): t for k, t in wide.items()})
    load_adapter(model, arrays, 3.0)
    layer = model.base_model.model[0]
    torch.testing.assert_close(layer.lora_A["default"].weight, wide[adapter_key("m.q", "A")][:2])
    torch.testing.assert_close(layer.lora_B["default"].weight, wide[adapter_key("m.q", "B")][:, :2])
    assert layer.scaling["default"] == 3.0


def test_the_harness_flower_app_refuses_client_ranks():
    from test_harness_helpers import synth
    from validation.flower_server import HarnessStrategy

    cfg = synth(n_clients=3, rank=8, client_ranks=(2, 4, 8))
    with pytest.raises(ValueError, match="clients of one rank"):
        HarnessStrategy(cfg, None, {0: 100, 1: 101, 2: 102})
