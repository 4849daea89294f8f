"""Tests of the Flower app (validation.flower_app and its modules).

Two engines:

* ``LocalGrid``: a duck-typed Flower ``Grid`` that hands every message to the real ``ClientApp``
  in this process (no Ray), keeping each node's context (its state) across rounds as Flower does.
  Fast; used for the logic (agreement for every scheme and the adaptive rule, partial
  participation, drop-outs, wrong shapes, no reply, FedSA's B on the clients).
* Flower's simulation runtime as Flower runs apps now: ``flwr run`` of ``flower/`` on a local
  simulation SuperLink (``validation.flower_runner.simulate``). ONE simulation for the module
  (SuperLink, Ray and the client processes' imports dominate: ~30 s on a loaded 2-core box; Ray gets
  1 CPU, each virtual client 1 CPU), several runs inside it: clean runs compared with the
  in-process harness, and runs with injected faults compared with a reference built from the
  harness's own components.

Agreement tolerance: both sides do the same float32 operations in the same order, except that
a Ray worker may run torch with a different thread count, which can change the summation order
inside matmuls/reductions. That perturbs each result by a few float32 ulps (eps = 1.2e-7) times
the reduction length (k <= 16 here), i.e. ~1e-6 relative; two rounds of two AdamW steps do not
amplify it (AdamW's step is a smooth function of the gradient, and ~sign(g) at step 1). We
therefore require ``|x - y| <= 1e-5 * |y| + 1e-5 * max|y|`` elementwise (rtol 1e-5; the scaled
atol covers entries that are ~0). In-process (LocalGrid) the computation is identical, and we
require bitwise equality there.
"""

from __future__ import annotations

import dataclasses
import time
import traceback

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, Context, Error, Message, RecordDict  # noqa: E402

import validation.federated as fed  # noqa: E402
from sfed_theory.flower import split_key  # noqa: E402
from validation import flower_app as fa  # noqa: E402
from validation.aggregation import SCHEME_TRAINS_A, aggregate, client_start, init_state  # noqa: E402
from validation.backends import LoopBackend  # noqa: E402
from validation.config import RunConfig  # noqa: E402
from validation.data import partition  # noqa: E402
from validation.models import build_task  # noqa: E402

BASE = RunConfig(model="synthetic", dataset="synthetic", n_clients=3, rank=4, rounds=2, batched=False,
                 synth_examples=256, synth_dim=16, eval_size=32, probe_size=16, device="cpu",
                 local_steps=2, batch_size=8, optimizer="adamw", lr=1e-2, seed=3)
RTOL = 1e-5


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
class LocalGrid:
    """Minimal Flower Grid: delivers each message to ``fa.client_app`` in-process.

    Each node keeps one Context (``context.state`` persists across rounds, as on a SuperNode);
    ``faults`` go into the run config the ClientApp's fault mod reads; ``silent``: node ids that
    never answer a train message (a client that vanished: no reply before the timeout).
    ``sent`` records every train message's array keys."""

    def __init__(self, n: int, silent: set[int] = frozenset(), faults: dict | None = None):
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
        self.nodes = {5000 + 7 * i: i for i in range(n)}  # node ids unrelated to partition ids
        self.silent = set(silent)
        self.run_config = {"faults": fa.faults_run_config(faults or {})}
        self.contexts: dict[int, Context] = {}
        self.sent: list[tuple[int, list[str]]] = []

    def context(self, node: int) -> Context:
        if node not in self.contexts:
            self.contexts[node] = Context(run_id=1, node_id=node, node_config={"partition-id": self.nodes[node]},
                                          state=RecordDict(), run_config=self.run_config)
        return self.contexts[node]

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            if m.metadata.message_type == "train":
                self.sent.append((node, list(m.content["arrays"].keys())))
                if node in self.silent:
                    continue
            try:
                out.append(fa.client_app(m, self.context(node)))
            except Exception:  # what Flower's runtime does with a ClientApp exception
                out.append(Message(Error(code=2, reason=traceback.format_exc()), reply_to=m))
        return out[::-1]  # replies need not come back in order


def harness_states(cfg: RunConfig, monkeypatch) -> tuple[pd.DataFrame, list]:
    """The in-process harness run (validation.federated.run), with the server state it
    aggregates each round captured by wrapping its ``aggregate_and_deltas``."""
    captured = []
    orig = fed.aggregate_and_deltas

    def spy(*a, **k):
        s, d, t = orig(*a, **k)
        captured.append(fa.copy_state(s))
        return s, d, t

    with monkeypatch.context() as m:
        m.setattr(fed, "aggregate_and_deltas", spy)
        df = fed.run(cfg)
    return df, captured


def reference_states(cfg: RunConfig, answered: dict[int, list[int]]) -> list:
    """Expected server states when only ``answered[round]`` are averaged: built from the harness's
    components (client_start, LoopBackend.train_clients, aggregate, apply_gamma_change),
    independently of the app's server loop. Clients train with gamma from the K sampled; the round
    is aggregated at that gamma and then moved, function-preserving, to the gamma of the K' that
    answered (the strategy's documented policy); the next round moves back before sending."""
    task = build_task(cfg)
    parts = partition(task.train_labels.numpy(), cfg.n_clients, cfg.partition,
                      concentration=cfg.dirichlet_alpha, seed=cfg.seed)
    sizes = np.array([len(p) for p in parts], float)
    dtype, dev = torch.float32, torch.device("cpu")
    g_sent = fed.gamma_for(cfg, sizes)
    bk = LoopBackend(task.model, task.targets, cfg.rank, g_sent, dev)
    w = torch.full((cfg.n_clients,), 1 / cfg.n_clients)
    state = init_state(bk.shapes, cfg.rank, cfg.n_clients, cfg.scheme, cfg.seed, w, dtype, dev)
    out, g_state = [], g_sent
    for rnd in range(1, cfg.rounds + 1):
        ok = answered[rnd]
        g_round = fed.gamma_for(dataclasses.replace(cfg, participating=len(ok)), sizes)
        state = fed.apply_gamma_change(state, bk, g_state, g_sent)
        bk.set_base_delta(state.merged)
        A0, B0 = client_start(state, ok)
        A1, B1, _, _ = bk.train_clients(A0, B0, fed.client_batches(cfg, task, parts, ok, rnd, dev),
                                        train_A=SCHEME_TRAINS_A[cfg.scheme], optimizer=cfg.optimizer,
                                        lr=cfg.lr, weight_decay=cfg.weight_decay)
        p = torch.full((len(ok),), 1 / len(ok))
        state, _ = aggregate(cfg.scheme, state, ok, A1, B1, p, g_sent)
        state, g_state = fed.apply_gamma_change(state, bk, g_sent, g_round), g_round
        out.append(fa.copy_state(state))
    return out


def _tensors(s) -> dict:
    """Every tensor of a server state (ServerState, or the flat dict a simulation wrote)."""
    return s if isinstance(s, dict) else fa.state_tensors(s)


def state_diff(s1, s2) -> tuple[float, float]:
    """(max abs diff, max abs diff / max abs value) over every tensor of two server states."""
    d = fa.compare_states(_tensors(s1), _tensors(s2))
    return d["max_abs_diff"], d["max_rel_diff"]


def assert_states_close(got: list, want: list, exact: bool = False) -> None:
    assert len(got) == len(want)
    for rnd, (s1, s2) in enumerate(zip(got, want), 1):
        t1, t2 = _tensors(s1), _tensors(s2)
        assert t1.keys() == t2.keys()
        for k in t1:
            if exact:
                assert torch.equal(t1[k], t2[k]), f"round {rnd} {k}: max diff {(t1[k] - t2[k]).abs().max()}"
            else:
                scale = float(t2[k].abs().max())
                torch.testing.assert_close(t1[k], t2[k], rtol=RTOL, atol=RTOL * scale,
                                           msg=lambda m, k=k, r=rnd: f"round {r} {k}: {m}")
        # a broken pipeline would leave the adapter at its init: make sure something was learned
        assert any(float(t.abs().max()) > 0 for n, t in t2.items() if not n.startswith("A|"))


def assert_rows_match(flower: pd.DataFrame, harness: pd.DataFrame, rtol: float) -> None:
    """Same columns (plus the documented extras), same keys, same measurements."""
    assert set(harness.columns) <= set(flower.columns)
    assert set(flower.columns) - set(harness.columns) == set(fa.EXTRA_COLUMNS)
    assert (flower["backend"] == "flower").all()
    key = ["round", "layer"]
    f, h = flower.set_index(key).sort_index(), harness.set_index(key).sort_index()
    assert list(f.index) == list(h.index)
    for c in ("n_participating", "clients", "run_id", "rank", "n_clients", "scheme", "rule", "diverged"):
        assert (f[c] == h[c]).all(), c
    for c in ("gamma", "grad_A", "grad_B", "grad_A_end", "grad_B_end", "update_fro", "adapter_rms", "rho_hat",
              "n_eff_hat", "rho_ratio", "n_eff_ratio", "train_loss", "train_acc", "probe_loss_start",
              "probe_loss_end", "eval_loss", "eval_acc"):
        np.testing.assert_allclose(f[c].to_numpy(float), h[c].to_numpy(float), rtol=rtol, atol=rtol * 1e-3,
                                   err_msg=c)


# ------------------------------------------------------------------------------------------------
# pure functions
# ------------------------------------------------------------------------------------------------
def test_encode_decode_roundtrip():
    A = {"fc1": torch.randn(4, 16), "x.fc2": torch.randn(4, 8)}
    B = {"fc1": torch.randn(16, 4), "x.fc2": torch.randn(12, 4)}
    M = {"fc1": torch.randn(16, 16), "x.fc2": torch.randn(12, 8)}
    rec = fa.encode_adapter(A, B, M)
    assert list(rec.keys())[:3] == ["fc1.lora_A.weight", "fc1.lora_B.weight", "fc1.merged_delta"]
    got = fa.decode_adapter(rec)
    for want, kind in ((A, "A"), (B, "B"), (M, "merged")):
        assert want.keys() == got[kind].keys()
        for n in want:
            assert torch.equal(want[n], got[kind][n])
    with pytest.raises(ValueError, match="unexpected array 'W'"):
        fa.decode_adapter(ArrayRecord({"W": torch.zeros(2)}))


def test_faults_run_config_names_bad_faults():
    assert fa.faults_run_config({(2, 1): "drop", ("abc", 1, 0): "bad-shape"}) == \
        '[["", 2, 1, "drop"], ["abc", 1, 0, "bad-shape"]]'
    with pytest.raises(ValueError, match="unknown fault 'crash'; allowed: drop, bad-shape"):
        fa.faults_run_config({(1, 0): "crash"})


def test_configs_from_run_config():
    one = fa.configs_from_run_config({"config": '{"model": "synthetic", "dataset": "synthetic", "rank": 2, '
                                                '"n_clients": 3}'})
    assert len(one) == 1 and one[0].rank == 2 and one[0].n_clients == 3
    grid = fa.configs_from_run_config({"config": '{"base": {"model": "synthetic", "dataset": "synthetic"}, '
                                                 '"ranks": [2, 4], "n_clients": [2], "rules": ["sfed"]}'})
    assert [c.rank for c in grid] == [2, 4]
    with pytest.raises(ValueError, match="unknown RunConfig fields"):
        fa.configs_from_run_config({"config": '{"rnak": 2}'})
    with pytest.raises(ValueError, match="not valid JSON"):
        fa.configs_from_run_config({"config": "{rank: 2"})


# ------------------------------------------------------------------------------------------------
# the app over an in-process grid (no Ray)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme,participating", [("fedit", None), ("fedsa", 2), ("ffa", None), ("exact", None)])
def test_local_grid_matches_harness_bitwise(scheme, participating, monkeypatch):
    cfg = dataclasses.replace(BASE, scheme=scheme, participating=participating)
    grid = LocalGrid(cfg.n_clients)
    res = fa.run_on_grid(cfg, grid, fa.discover_clients(grid, cfg.n_clients), keep_states=True)
    df, states = harness_states(cfg, monkeypatch)
    assert_states_close(res.states, states, exact=True)
    assert_rows_match(res.rows, df, rtol=0.0)
    assert (res.events["status"] == "ok").all() and len(res.events) == cfg.rounds * cfg.k
    assert (res.rows["n_dropped"] == 0).all()


def test_local_grid_drop_wrong_shape_and_silent_client():
    cfg = dataclasses.replace(BASE, scheme="fedit", rounds=3)
    faults = {(1, 2): "bad-shape", (2, 1): "drop"}
    grid = LocalGrid(3, silent={5000 + 7 * 0}, faults=faults)  # client 0's node never answers a train message
    res = fa.run_on_grid(cfg, grid, fa.discover_clients(grid, 3), keep_states=True, round_timeout=1.0)
    ev = res.events.set_index(["round", "client"])
    assert ev.loc[(1, 0), "status"] == "no-reply" and "no reply within 1 s" in ev.loc[(1, 0), "reason"]
    assert ev.loc[(1, 2), "status"] == "rejected"
    assert "wrong shape: fc1.lora_B.weight is (16, 3), expected (16, 4)" in ev.loc[(1, 2), "reason"]
    assert ev.loc[(2, 1), "status"] == "error" and "dropped out in the middle of round 2" in ev.loc[(2, 1), "reason"]
    assert ev.loc[(1, 1), "status"] == ev.loc[(2, 2), "status"] == ev.loc[(3, 1), "status"] == "ok"
    allrows = res.rows[res.rows.layer == "__all__"].set_index("round")
    assert allrows["n_participating"].tolist() == [1, 1, 2]
    assert allrows["clients"].tolist() == ["1", "2", "1,2"]
    assert allrows["dropped_clients"].tolist() == ["0,2", "0,1", "0"]
    assert allrows["n_dropped"].tolist() == [2, 2, 1]
    g3 = fed.gamma_for(cfg)
    g1 = fed.gamma_for(dataclasses.replace(cfg, participating=1))
    g2 = fed.gamma_for(dataclasses.replace(cfg, participating=2))
    assert allrows["gamma_sent"].tolist() == [g3] * 3
    assert allrows["gamma"].tolist() == [g1, g1, g2]
    assert not res.rows["diverged"].any()
    want = reference_states(cfg, {1: [1], 2: [2], 3: [1, 2]})
    assert_states_close(res.states, want, exact=True)


def test_local_grid_client_divergence_stops_the_run_like_the_harness():
    # a huge SGD step makes the adapters overflow float32: the next local loss is NaN on every client
    cfg = dataclasses.replace(BASE, scheme="fedit", optimizer="sgd", lr=3e38, local_steps=3, rounds=2)
    grid = LocalGrid(3)
    res = fa.run_on_grid(cfg, grid, fa.discover_clients(grid, 3))
    df = fed.run(cfg)
    assert df["diverged"].all() and res.rows["diverged"].all()
    assert res.rows["diverged_round"].iloc[0] == df["diverged_round"].iloc[0] == 1
    assert (res.events["status"] == "diverged").all() and len(res.events) == 3
    assert "non-finite loss" in df["error"].iloc[0]
    assert res.rows["error"].iloc[0].startswith("Divergence: client 0, round 1: non-finite loss")
    assert set(df.columns) <= set(res.rows.columns)


def test_local_grid_no_client_answers_keeps_adapter():
    cfg = dataclasses.replace(BASE, scheme="ffa", rounds=1)
    grid = LocalGrid(3, faults={(1, c): "drop" for c in range(3)})
    res = fa.run_on_grid(cfg, grid, fa.discover_clients(grid, 3), keep_states=True)
    assert res.rows["n_participating"].tolist() == [0]
    assert (res.events["status"] == "error").all()
    assert all(float(t.abs().max()) == 0 for t in res.states[0].B.values())


def test_discover_clients_reports_missing_partition():
    grid = LocalGrid(2)
    with pytest.raises(RuntimeError, match=r"only 2 Flower nodes connected"):
        fa.discover_clients(grid, 3, wait_s=0.3)
    grid.nodes = {1: 0, 2: 0, 3: 2}
    with pytest.raises(RuntimeError, match=r"no node plays client\(s\) \[1\].*both claim partition-id 0"):
        fa.discover_clients(grid, 3)


def test_results_written_like_the_harness(tmp_path):
    from validation.grid import is_complete, load_results, result_path

    cfg = dataclasses.replace(BASE, scheme="ffa", rounds=1)
    grid = LocalGrid(3)
    res = fa.run_on_grid(cfg, grid, fa.discover_clients(grid, 3))
    fa.write_flower_run(res, tmp_path)
    assert is_complete(result_path(tmp_path, cfg)) and is_complete(fa.events_path(tmp_path, cfg))
    back = load_results(tmp_path)  # the events sub-folder is not mixed into the results
    assert len(back) == len(res.rows) and set(back.columns) == set(res.rows.columns)
    ev = pd.read_parquet(fa.events_path(tmp_path, cfg))
    assert list(ev.columns) == list(fa.EVENT_COLUMNS) and len(ev) == 3


def test_server_app_from_run_config_writes_and_resumes(tmp_path):
    """The ``flwr run`` entry point: experiment from the run config, results in out-dir, resume."""
    import json

    from validation.grid import load_results

    cfg = dataclasses.replace(BASE, scheme="exact", rounds=1)
    rc = {"config": json.dumps(cfg.to_dict()), "out-dir": str(tmp_path), "round-timeout": 5.0, "node-wait": 1.0,
          "resume": True}
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc)
    fa.server_app(LocalGrid(3), ctx)
    first = load_results(tmp_path)
    assert len(first) == 3 and (first["run_id"] == cfg.run_id).all() and (first["backend"] == "flower").all()
    mtime = (tmp_path / f"{cfg.run_id}.parquet").stat().st_mtime_ns
    fa.server_app(LocalGrid(3), ctx)  # complete already: skipped, file untouched
    assert (tmp_path / f"{cfg.run_id}.parquet").stat().st_mtime_ns == mtime


def test_fedsa_b_stays_on_the_clients():
    """FedSA: the server never sends B; each client's B lives in its own context and is the B the
    harness's server state would hold for it."""
    cfg = dataclasses.replace(BASE, scheme="fedsa", participating=2, rounds=3)
    grid = LocalGrid(cfg.n_clients)
    res = fa.run_on_grid(cfg, grid, fa.discover_clients(grid, cfg.n_clients), keep_states=True)
    assert grid.sent and all(split_key(k)[1] != "B" for _, keys in grid.sent for k in keys)
    final = res.states[-1]
    for node, pid in grid.nodes.items():
        st = grid.context(node).state
        if pid in {int(c) for cl in res.rows["clients"].dropna() for c in str(cl).split(",") if c}:
            kept = st["sfed-fedsa-local-b"].to_torch_state_dict()
            for n in final.B_local:
                assert torch.equal(kept[n], final.B_local[n][pid])


@pytest.mark.parametrize("scheme,participating", [("fedit", None), ("ffa", 2), ("fedsa", None), ("exact", None)])
def test_local_grid_adaptive_rule_matches_harness_bitwise(scheme, participating, monkeypatch):
    """sfed-adaptive in Flower: the strategy estimates rho, moves gamma and rescales, as the harness."""
    cfg = dataclasses.replace(BASE, scheme=scheme, participating=participating, rule="sfed-adaptive", rounds=3)
    grid = LocalGrid(cfg.n_clients)
    res = fa.run_on_grid(cfg, grid, fa.discover_clients(grid, cfg.n_clients), keep_states=True)
    df, states = harness_states(cfg, monkeypatch)
    assert_states_close(res.states, states, exact=True)
    assert_rows_match(res.rows, df, rtol=0.0)
    for c in ("gamma_next", "rho_est_raw", "rho_est_smoothed", "n_eff_est", "n_eff_smoothed"):
        np.testing.assert_array_equal(res.rows[c].to_numpy(float), df.set_index(res.rows.index)[c].to_numpy(float),
                                      err_msg=c)
    assert res.rows["gamma"].nunique() > 1  # the rule moved gamma between rounds


# ------------------------------------------------------------------------------------------------
# Flower's simulation runtime (flwr run on a local simulation SuperLink), once for the module
# ------------------------------------------------------------------------------------------------
SIM_CLEAN = [dataclasses.replace(BASE, scheme="fedit"), dataclasses.replace(BASE, scheme="fedsa", participating=2)]
SIM_FAULTY = [dataclasses.replace(BASE, scheme="exact", seed=4), dataclasses.replace(BASE, scheme="ffa", seed=4)]
SIM_FAULTS = {(c.run_id, 1, 2): "bad-shape" for c in SIM_FAULTY} | {(c.run_id, 2, 1): "drop" for c in SIM_FAULTY}


@pytest.fixture(scope="module")
def simulation(tmp_path_factory):
    pytest.importorskip("ray")
    t0 = time.perf_counter()
    sim = fa.simulate(SIM_CLEAN + SIM_FAULTY, tmp_path_factory.mktemp("flower"), faults=SIM_FAULTS,
                      keep_states=True, num_cpus=1, timeout=280)
    return {r.config.run_id: r for r in sim.runs}, time.perf_counter() - t0


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("i", range(len(SIM_CLEAN)))
def test_simulation_matches_harness(simulation, i, monkeypatch):
    runs, wall = simulation
    cfg = SIM_CLEAN[i]
    res = runs[cfg.run_id]
    df, states = harness_states(cfg, monkeypatch)
    mad, rel = state_diff(res.states[-1], states[-1])
    print(f"\n{cfg.scheme}: Flower simulation vs in-process: max abs diff {mad:.3g}, rel {rel:.3g} "
          f"(simulation wall {wall:.1f} s for all runs)")
    assert_states_close(res.states, states)
    assert_rows_match(res.rows, df, rtol=1e-4)
    assert (res.events["status"] == "ok").all()


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("i", range(len(SIM_FAULTY)))
def test_simulation_drop_out_and_wrong_shape(simulation, i):
    runs, _ = simulation
    cfg = SIM_FAULTY[i]
    res = runs[cfg.run_id]
    ev = res.events.set_index(["round", "client"])
    assert ev.loc[(1, 2), "status"] == "rejected" and "wrong shape" in ev.loc[(1, 2), "reason"]
    assert ev.loc[(2, 1), "status"] == "error"
    assert "dropped out in the middle of round 2" in ev.loc[(2, 1), "reason"]
    assert (ev.drop(index=[(1, 2), (2, 1)])["status"] == "ok").all()
    allrows = res.rows[res.rows.layer == "__all__"].set_index("round")
    assert allrows["clients"].tolist() == ["0,1", "0,2"]
    assert allrows["n_dropped"].tolist() == [1, 1]
    assert allrows["gamma"].tolist() == [fed.gamma_for(dataclasses.replace(cfg, participating=2))] * 2
    assert_states_close(res.states, reference_states(cfg, {1: [0, 1], 2: [0, 2]}))
