"""Partitions, loaders (BBC, datasets, synthetic), aggregation algebra, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_harness_helpers import synth
from validation.aggregation import aggregate, init_state
from validation.config import GridConfig, RunConfig
from validation.data import BBC_TOPICS, label_skew, load_bbc, make_synthetic, partition
from validation.federated import run
from validation.models import build_task


def _labels(n=600, k=5, seed=0):
    return np.random.default_rng(seed).integers(0, k, n)


def test_iid_partition_sizes_and_cover():
    y = _labels(103)
    parts = partition(y, 10, "iid", seed=1)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(103))
    assert [p.tolist() for p in partition(y, 10, "iid", seed=1)] == [p.tolist() for p in parts]
    assert [p.tolist() for p in partition(y, 10, "iid", seed=2)] != [p.tolist() for p in parts]


def test_dirichlet_partition_cover_nonempty_and_skew_grows_as_concentration_falls():
    y = _labels(1000)
    skews = {}
    for conc in (0.1, 1.0, 100.0):
        vals = []
        for seed in range(3):
            parts = partition(y, 8, "dirichlet", concentration=conc, seed=seed)
            assert min(len(p) for p in parts) > 0
            assert sorted(np.concatenate(parts).tolist()) == list(range(1000))
            vals.append(label_skew(y, parts))
        skews[conc] = np.mean(vals)
    assert skews[0.1] > skews[1.0] > skews[100.0]
    assert skews[100.0] < 0.1 < skews[0.1]
    assert label_skew(y, partition(y, 8, "iid")) < 0.1


def test_partition_errors():
    with pytest.raises(ValueError, match="exceeds the 5 training examples"):
        partition(_labels(5), 6)
    with pytest.raises(ValueError, match="unknown partition"):
        partition(_labels(50), 2, "zipf")
    with pytest.raises(ValueError, match="left a client empty"):
        partition(np.zeros(3, dtype=int), 3, "dirichlet", concentration=0.001, max_tries=3)


def test_synthetic_task_has_signal_and_ground_truth():
    raw, deltas = make_synthetic(512, 16, 3, 2, seed=0)
    assert set(deltas) == {"fc1", "fc2"}
    assert all(torch.linalg.matrix_rank(d).item() == 2 for d in deltas.values())
    counts = np.bincount(raw.labels, minlength=3)
    assert counts.min() > 20  # every class present: a learnable task, not a constant label


def test_bbc_loader():
    raw = load_bbc()
    assert len(raw) == 2225
    assert raw.label_names == BBC_TOPICS
    assert np.bincount(raw.labels).tolist() == [510, 386, 417, 511, 401]
    assert all(isinstance(t, str) and len(t) > 100 for t in raw.texts[:50])


def test_minilm_bbc_one_step():
    """The real default model and data, tiny: one local step, finite measurements."""
    cfg = RunConfig(n_clients=2, rank=2, rounds=1, local_steps=1, batch_size=2, max_length=16,
                    max_examples=60, eval_size=8, probe_size=4, batched=True)
    df = run(cfg)
    assert not df["diverged"].any()
    allrow = df[df.layer == "__all__"].iloc[0]
    assert len(df) == 13  # 6 layers x (query, value) + __all__
    assert allrow["d_out"] == 384 and allrow["k_in"] == 384
    assert allrow["update_fro"] > 0 and np.isfinite(allrow["eval_loss"])
    assert allrow["gamma"] == pytest.approx(16 * np.sqrt(2 / 2))


def test_exact_aggregation_is_average_of_products_and_fedit_is_not():
    torch.manual_seed(0)
    d, k, r, K = 6, 5, 3, 3
    shapes = {"l": (d, k)}
    state = init_state(shapes, r, K, "exact", 0, torch.ones(K) / K, torch.float64, torch.device("cpu"))
    A_new = {"l": torch.randn(K, r, k, dtype=torch.float64)}
    B_new = {"l": torch.randn(K, d, r, dtype=torch.float64)}
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    new, delta = aggregate("exact", state, [0, 1, 2], A_new, B_new, p, gamma=2.0)
    expect = 2.0 * sum(p[i] * B_new["l"][i] @ A_new["l"][i] for i in range(K))
    torch.testing.assert_close(new.merged["l"], expect)
    torch.testing.assert_close(delta["l"], expect)
    assert torch.count_nonzero(new.B["l"]) == 0 and torch.equal(new.A["l"], state.A["l"])
    fedit, d_fedit = aggregate("fedit", init_state(shapes, r, K, "fedit", 0, torch.ones(K) / K, torch.float64,
                                                   torch.device("cpu")), [0, 1, 2], A_new, B_new, p, gamma=2.0)
    prod_of_avg = 2.0 * (p @ B_new["l"].reshape(K, -1)).reshape(d, r) @ (p @ A_new["l"].reshape(K, -1)).reshape(r, k)
    torch.testing.assert_close(d_fedit["l"], prod_of_avg)
    assert (d_fedit["l"] - expect).norm() > 0.1 * expect.norm()  # the aggregation error is real


def test_fedsa_keeps_local_b_of_absent_clients():
    N, K = 4, 2
    state = init_state({"l": (6, 5)}, 3, N, "fedsa", 0, torch.ones(N) / N, torch.float64, torch.device("cpu"))
    A_new = {"l": torch.randn(K, 3, 5, dtype=torch.float64)}
    B_new = {"l": torch.randn(K, 6, 3, dtype=torch.float64)}
    new, _ = aggregate("fedsa", state, [1, 3], A_new, B_new, torch.tensor([0.5, 0.5], dtype=torch.float64), 1.0)
    torch.testing.assert_close(new.B_local["l"][[1, 3]], B_new["l"])
    assert torch.count_nonzero(new.B_local["l"][[0, 2]]) == 0
    torch.testing.assert_close(new.A["l"], A_new["l"].mean(0))


def test_ffa_never_moves_a():
    df = run(synth(scheme="ffa", rounds=1))
    assert (df["rho_hat"].dropna().abs() <= 1).all()
    cfg = synth(scheme="ffa")
    task = build_task(cfg)
    from validation.backends import BatchedBackend

    be = BatchedBackend(task.model, task.targets, 4, 2.0, torch.device("cpu"), n_slots=2)
    A = {n: torch.randn(2, 4, 16, dtype=torch.float64) for n in task.targets}
    B = {n: torch.zeros(2, 16, 4, dtype=torch.float64) for n in task.targets}
    batch = [[({"x": task.train_inputs["x"][:4]}, task.train_labels[:4])] * 2]
    A1, B1, _, _ = be.train_clients(A, B, batch, train_A=False, optimizer="adamw", lr=1e-2, weight_decay=0.0)
    for n in task.targets:
        assert torch.equal(A1[n], A[n]) and B1[n].abs().sum() > 0


@pytest.mark.parametrize("kw,match", [
    (dict(rule="lorax"), "unknown rule"),
    (dict(scheme="fedavg"), "unknown scheme"),
    (dict(optimizer="adam"), "unknown optimizer"),
    (dict(participating=5, n_clients=4), "exceeds n_clients"),
    (dict(rank=0), "rank must be an integer"),
    (dict(lr=float("nan")), "lr must be a finite number"),
])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        synth(**kw)


def test_runtime_errors_are_clear():
    with pytest.raises(ValueError, match="unknown model 'no/such-model'"):
        build_task(RunConfig(model="no/such-model", dataset="bbc"))
    with pytest.raises(ValueError, match="rank 17 exceeds layer"):
        build_task(synth(rank=17))
    with pytest.raises(ValueError, match="exceeds the .* training examples"):
        run(synth(n_clients=300, max_examples=100))
    with pytest.raises(ValueError, match="unknown GridConfig fields"):
        GridConfig.from_dict({"rank": [4]})


def test_probe_batch_from_training_or_held_out_examples():
    """``probe_from="train"`` draws the probe from the training set (the draw every stored run used);
    ``"heldout"`` from the eval split outside the eval subset, so no client ever trains on it."""
    from validation.federated import eval_indices, fixed_batches

    cfg = synth(seed=3)
    task = build_task(cfg)
    dev = torch.device("cpu")
    probe_in, probe_y, eval_in, _ = fixed_batches(cfg, task, dev)
    old = np.sort(np.random.default_rng([3, 5]).choice(len(task.train_labels), cfg.probe_size, replace=False))
    torch.testing.assert_close(probe_in["x"], task.train_inputs["x"][old])

    held = synth(seed=3, probe_from="heldout")
    h_in, h_y, h_eval, _ = fixed_batches(held, task, dev)
    torch.testing.assert_close(h_eval["x"], eval_in["x"])  # the eval subset does not move
    ev = set(eval_indices(len(task.eval_labels), held.eval_size).tolist())
    rows = [int(torch.nonzero((task.eval_inputs["x"] == row).all(1))[0]) for row in h_in["x"]]
    assert len(set(rows)) == held.probe_size and not set(rows) & ev
    assert torch.equal(h_y, task.eval_labels[rows])
    train = task.train_inputs["x"]
    assert not any((train == row).all(1).any() for row in h_in["x"])  # never a training example

    with pytest.raises(ValueError, match="held-out examples"):
        fixed_batches(synth(probe_from="heldout", eval_size=len(task.eval_labels)), task, dev)
    with pytest.raises(ValueError, match="probe_from"):
        synth(probe_from="test")
