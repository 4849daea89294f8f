"""The line probe (validation.line_probe): its non-affinity against hand computations, an affine and a
non-affine gradient map, the harness's rows at c = 0 and 1 against the round's own start and end probe."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from validation.config import RunConfig
from validation.line_probe import line_summary, line_table, nonaffinity, probe_line
from validation.metrics import ALL


def test_nonaffinity_by_hand():
    g0 = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, 0.0, 0.0])}
    g1 = {"a": torch.tensor([2.0, 0.0]), "b": torch.tensor([0.0, 3.0, 0.0])}
    g = {"a": torch.tensor([3.0, 2.0]), "b": torch.tensor([0.0, 6.0, 4.0])}
    per, both = nonaffinity(g, g0, g1, 2.0)
    # a: g - g0 - 2 (g1 - g0) = (0, 2), |g1 - g0| = 1 -> 2 (a squared norm would give 4)
    # b: (0, 0, 4) against |(0, 3, 0)| = 3 -> 4/3; together sqrt((4 + 16) / (1 + 9))
    assert per["a"] == pytest.approx(2.0)
    assert per["b"] == pytest.approx(4 / 3)
    assert both == pytest.approx(math.sqrt(20 / 10))
    per0, _ = nonaffinity(g0, g0, g0, 1.0)
    assert math.isnan(per0["a"])  # no change between c = 0 and 1: undefined, not 0


class _MapBackend:
    """A backend whose dL/dB is a given function of B (A fixed): probe() as the harness calls it."""

    def __init__(self, grad_of_B):
        self.grad_of_B = grad_of_B
        self.calls = 0

    def probe(self, A, B, inputs, labels, *, grads=False, capture=False):
        self.calls += 1
        gB = {n: self.grad_of_B(B[n]) for n in B}
        loss = float(sum((b ** 2).sum() for b in B.values()))
        return SimpleNamespace(loss=loss, grad_A={n: 2 * A[n] for n in A}, grad_B=gB)


def _line(grad_of_B, scales):
    torch.manual_seed(0)
    A = {"x": torch.randn(2, 3), "y": torch.randn(2, 3)}
    B0 = {n: torch.randn(4, 2) for n in A}
    B1 = {n: torch.randn(4, 2) for n in A}
    return A, B0, B1, probe_line(_MapBackend(grad_of_B), A, B0, B1, scales, {}, torch.zeros(1))


def test_affine_gradient_has_zero_gap_and_a_quadratic_norm():
    H = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))
    g0 = torch.randn(4, 2, generator=torch.Generator().manual_seed(2))
    scales = (0.0, 0.5, 1.0, 2.0, 4.0)
    A, B0, B1, out = _line(lambda b: g0 + H @ b, scales)
    gaps = np.array(out[ALL]["line_gap_B"].split(","), dtype=float)
    assert np.abs(gaps).max() < 1e-5
    norms = np.array(out["x"]["line_grad_B"].split(","), dtype=float)
    want = [float(torch.linalg.vector_norm(g0 + H @ (B0["x"] + c * (B1["x"] - B0["x"])))) for c in scales]
    np.testing.assert_allclose(norms, want, rtol=1e-6)
    both = np.array(out[ALL]["line_grad_B"].split(","), dtype=float)
    per = [np.array(out[n]["line_grad_B"].split(","), dtype=float) for n in A]
    np.testing.assert_allclose(both, np.sqrt(per[0] ** 2 + per[1] ** 2), rtol=1e-12)
    sq = norms ** 2  # an affine map: the squared norm is exactly quadratic in c
    coef = np.polyfit([0.0, 0.5, 1.0], sq[:3], 2)
    np.testing.assert_allclose(np.polyval(coef, scales), sq, rtol=1e-4)


def test_each_scale_is_probed_once():
    backend = _MapBackend(lambda b: b ** 3)
    A = {"x": torch.ones(2, 3)}
    probe_line(backend, A, {"x": torch.zeros(4, 2)}, {"x": torch.ones(4, 2)}, (0.0, 0.5, 1.0, 2.0), {}, torch.zeros(1))
    assert backend.calls == 4  # c = 0 and 1 anchor the gap and are among the scales: not probed twice


def test_cubic_gradient_gap_by_hand():
    A, B0, B1, out = _line(lambda b: b ** 3, (2.0,))
    gap = float(out["y"]["line_gap_B"])
    g = lambda c: (B0["y"] + c * (B1["y"] - B0["y"])) ** 3  # noqa: E731
    want = float(torch.linalg.vector_norm(g(2.0) - g(0.0) - 2 * (g(1.0) - g(0.0))) / torch.linalg.vector_norm(g(1.0) - g(0.0)))
    assert gap == pytest.approx(want, rel=1e-5)
    assert gap > 0.1


def _synthetic(**kw) -> RunConfig:
    return RunConfig(model="synthetic", dataset="synthetic", n_clients=3, rank=4, rounds=2, scheme="ffa", device="cpu",
                     synth_examples=256, line_scales=(0, 0.5, 1, 3), **kw)


@pytest.mark.parametrize("batched", [True, False])
def test_harness_line_matches_the_rounds_own_probe(batched):
    from validation.federated import run

    df = run(_synthetic(batched=batched))
    t = line_table(df)
    for rnd in (1, 2):
        rows = df[(df["round"] == rnd)].set_index("layer")
        tt = t[t["round"] == rnd]
        for layer, r in rows.iterrows():
            at = tt[tt["layer"] == layer].set_index("scale")
            assert at.loc[0.0, "grad_B"] == pytest.approx(r["grad_B"], rel=1e-5)
            assert at.loc[1.0, "grad_B"] == pytest.approx(r["grad_B_end"], rel=1e-5)
            assert at.loc[1.0, "grad_A"] == pytest.approx(r["grad_A_end"], rel=1e-5, abs=1e-9)
            assert at.loc[0.0, "loss"] == pytest.approx(r["probe_loss_start"], rel=1e-6)
            assert at.loc[1.0, "loss"] == pytest.approx(r["probe_loss_end"], rel=1e-6)
            assert at.loc[0.0, "gap_B"] == pytest.approx(0.0, abs=1e-5)
            assert at.loc[1.0, "gap_B"] == pytest.approx(0.0, abs=1e-5)
            assert at.loc[1.0, "ratio_B"] == pytest.approx((r["grad_B_end"] / r["grad_B"]) ** 2, rel=1e-5)


def test_line_scales_leave_the_run_and_its_id_alone():
    from validation.federated import run

    cfg = _synthetic()
    plain = dataclasses.replace(cfg, line_scales=None)
    assert "line_scales" not in plain.to_dict() or plain.to_dict()["line_scales"] is None
    assert plain.run_id != cfg.run_id
    a, b = run(cfg), run(plain)
    for c in ("grad_B", "grad_B_end", "update_fro", "eval_loss"):
        np.testing.assert_array_equal(a[c].to_numpy(), b[c].to_numpy())
    assert "line_grad_B" not in b and "line_scales" not in b


@pytest.mark.parametrize("bad", [dict(scheme="fedit"), dict(line_scales=()), dict(line_scales=(0, -1)),
                                 dict(line_scales=(0, float("inf"))), dict(n_clients=2, rank=4, client_ranks=(2, 4))])
def test_line_scales_refused_where_undefined(bad):
    kw = dict(model="synthetic", dataset="synthetic", scheme="ffa", line_scales=(0, 1))
    with pytest.raises(ValueError, match="line_scales"):
        RunConfig(**{**kw, **bad})


def test_line_summary_quadratic_and_ci():
    rows = []
    for seed, k in enumerate((0.9, 1.1)):
        for c in (0.0, 0.5, 1.0, 2.0, 4.0):
            ratio = 1 - 0.2 * k * c + 0.03 * c * c  # exactly quadratic in c in every run
            rows.append({"rule": "rslora", "rank": 4, "n_clients": 4, "round": 1, "layer": ALL, "scale": c,
                         "ratio_B": ratio, "gap_B": 0.1 * seed})
    s = line_summary(pd.DataFrame(rows), n_boot=200)
    np.testing.assert_allclose(s["ratio_B_quadratic"], s["ratio_B"], atol=1e-12)
    assert (s["ratio_B_low"] <= s["ratio_B"] + 1e-12).all() and (s["ratio_B"] <= s["ratio_B_high"] + 1e-12).all()
    assert s["gap_B"].to_numpy() == pytest.approx(0.05)
    with pytest.raises(ValueError, match="round 2"):
        line_summary(pd.DataFrame(rows), round=2)


def test_line_table_needs_the_probe():
    with pytest.raises(ValueError, match="line_scales"):
        line_table(pd.DataFrame({"layer": [ALL], "grad_B": [1.0]}))
