"""Label overlap of the clients' batches, against hand computations, and its pilot line."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from test_harness_helpers import synth
from validation.federated import client_batch_indices, client_batches, client_parts
from validation.label_overlap import label_overlap, label_shares, pilot_line, run_label_overlap, run_label_shares
from validation.models import build_task


def test_label_overlap_is_the_mean_pairwise_cosine_of_label_histograms():
    labels = np.array([0, 0, 1, 1, 2])
    # histograms (2,0,0), (0,2,0), (1,1,0): cosines 0, 1/sqrt(2), 1/sqrt(2)
    assert label_overlap(labels, [np.array([0, 1]), np.array([2, 3]), np.array([0, 2])]) == pytest.approx(
        math.sqrt(2) / 3)
    assert label_overlap(labels, [np.array([0]), np.array([1, 1])]) == pytest.approx(1.0)  # same mix, any count
    assert math.isnan(label_overlap(labels, [np.array([0, 1])]))


def test_run_overlap_uses_the_batches_the_clients_train_on():
    cfg = synth(n_clients=4, partition="dirichlet", local_steps=3)
    task = build_task(cfg)
    parts = client_parts(cfg, task)
    idx = client_batch_indices(cfg, parts, list(range(4)), 1)
    batches = client_batches(cfg, task, parts, list(range(4)), 1, torch.device("cpu"))
    for t in range(3):
        for i in range(4):
            assert torch.equal(batches[t][i][1], task.train_labels[idx[i][t]])
    labels = task.train_labels.numpy()
    assert run_label_overlap(cfg, labels) == pytest.approx(label_overlap(labels, [np.concatenate(s) for s in idx]))
    assert run_label_shares(cfg, labels) == pytest.approx(label_shares(labels, [np.concatenate(s) for s in idx]),
                                                          nan_ok=True)


def test_pilot_line_predicts_beyond_the_pilot_from_the_overlap_alone():
    rng = np.random.default_rng(0)
    rows = [{"partition": "dirichlet", "n_clients": n, "label_overlap": o, "rho_ratio": -0.03 + 0.1 * o}
            for n, lo in ((4, 0.2), (16, 0.5)) for o in rng.uniform(lo, lo + 0.2, 12)]
    t = pilot_line(pd.DataFrame(rows)).set_index("n_clients")
    assert t.loc[16, "sample"] == "out" and t.loc[4, "sample"] == "in"
    assert t.loc[16, "predicted"] == pytest.approx(t.loc[16, "measured"])
    assert t.loc[16, "pilot_mean"] < t.loc[16, "measured"] - 0.02  # the constant guess misses the rise
    assert t.loc[4, "slope"] == pytest.approx(0.1) and t.loc[4, "intercept"] == pytest.approx(-0.03)


def test_train_labels_are_the_task_labels_of_each_seed(tmp_path):
    """The split of a data set without its own eval split depends on the seed; train_labels follows it."""
    from test_harness_helpers import tiny_bert, tiny_text_dataset
    from validation.models import train_labels

    model, data = tiny_bert(tmp_path / "m"), tiny_text_dataset(tmp_path / "d", n=40)
    firsts = []
    for seed in (0, 1):
        cfg = synth(model=model, dataset=data, seed=seed, max_length=8)
        np.testing.assert_array_equal(train_labels(cfg), build_task(cfg).train_labels.numpy())
        firsts.append(train_labels(cfg))
    assert not np.array_equal(firsts[0], firsts[1])
    syn = synth(seed=2)
    np.testing.assert_array_equal(train_labels(syn), build_task(syn).train_labels.numpy())
