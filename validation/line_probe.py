"""The probe's gradient along the round's own update: is the end-of-round gradient affine in the update?

Every model of the end-of-round gradient here (the canonical and refined ones, and the whole class
that :mod:`sfed_theory.affine_bound` bounds) takes it affine in the round's update,
``g(W0 + c dW) = g0 + c H[dW]``. Along the round's own update that is checkable run by run. Under FFA
(A frozen and shared) the adapter ``(A, B0 + c (B1 - B0))`` is exactly ``W0 + c dW``, so the harness
(``RunConfig.line_scales``) probes it at a few scales c and records, per adapted layer and for all
layers together (``__all__``):

* ``line_loss``: the probe loss at each scale (the same on every layer's row);
* ``line_grad_B``, ``line_grad_A``: ``||dL/dB||_F`` and ``||dL/dA||_F`` at each scale;
* ``line_gap_B``: the non-affinity of dL/dB,

      gap(c) = ||g(c) - g(0) - c (g(1) - g(0))||_F / ||g(1) - g(0)||_F,

  the distance of the gradient at scale c from the straight line through its values at c = 0 and 1,
  in units of the round's own gradient change. It is 0 at every c for any affine end gradient,
  whatever H is (the norm ``||g(c)||^2`` is then a quadratic in c); dL/dA = gamma B^T G X^T is a
  product of two terms that move with c, so it has no such test.

Each is a comma-joined string of floats, one per scale (Parquet columns stay scalar);
:func:`line_table` turns the rows into one row per (run, layer, scale).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from validation.metrics import ALL

__all__ = ["LINE_COLUMNS", "nonaffinity", "probe_line", "line_table", "line_summary"]

LINE_COLUMNS = ("line_loss", "line_grad_B", "line_grad_A", "line_gap_B")


def nonaffinity(g: dict[str, torch.Tensor], g0: dict[str, torch.Tensor], g1: dict[str, torch.Tensor],
                c: float) -> tuple[dict[str, float], float]:
    """Per layer and over all layers: ``||g - g0 - c (g1 - g0)|| / ||g1 - g0||`` (NaN where g1 = g0)."""
    num = {n: float(torch.linalg.vector_norm(g[n] - g0[n] - c * (g1[n] - g0[n]))) ** 2 for n in g}
    den = {n: float(torch.linalg.vector_norm(g1[n] - g0[n])) ** 2 for n in g}
    ratio = lambda a, b: math.sqrt(a / b) if b > 0 else math.nan  # noqa: E731
    return {n: ratio(num[n], den[n]) for n in g}, ratio(sum(num.values()), sum(den.values()))


def probe_line(backend, A: dict[str, torch.Tensor], B_start: dict[str, torch.Tensor],
               B_end: dict[str, torch.Tensor], scales: Sequence[float], probe_in: dict,
               probe_y: torch.Tensor) -> dict[str, dict[str, str]]:
    """``{layer or ALL: {column: "v1,v2,..."}}`` of :data:`LINE_COLUMNS` at ``B_start + c (B_end - B_start)``
    for each c of ``scales``, A fixed (the caller has set the backend's base delta)."""
    probed: dict[float, tuple] = {}

    def at(c: float):  # each scale probed once (c = 0 and 1 anchor the gap and are often among the scales)
        if c not in probed:
            out = backend.probe(A, {n: B_start[n] + c * (B_end[n] - B_start[n]) for n in A}, probe_in, probe_y,
                                grads=True)
            probed[c] = (out.loss, out.grad_A, out.grad_B)
        return probed[c]

    _, _, gB0 = at(0.0)
    _, _, gB1 = at(1.0)
    vals: dict[str, dict[str, list[float]]] = {n: {c: [] for c in LINE_COLUMNS} for n in [*A, ALL]}
    for c in scales:
        loss, gA, gB = at(float(c))
        gaps, gap_all = nonaffinity(gB, gB0, gB1, float(c))
        for n in A:
            v = vals[n]
            v["line_loss"].append(loss)
            v["line_grad_B"].append(float(torch.linalg.vector_norm(gB[n])))
            v["line_grad_A"].append(float(torch.linalg.vector_norm(gA[n])))
            v["line_gap_B"].append(gaps[n])
        v = vals[ALL]
        v["line_loss"].append(loss)
        v["line_grad_B"].append(math.sqrt(sum(vals[n]["line_grad_B"][-1] ** 2 for n in A)))
        v["line_grad_A"].append(math.sqrt(sum(vals[n]["line_grad_A"][-1] ** 2 for n in A)))
        v["line_gap_B"].append(gap_all)
    return {n: {c: ",".join(map(repr, x)) for c, x in cols.items()} for n, cols in vals.items()}


def line_table(df: pd.DataFrame, keys: Sequence[str] = ("run_id", "rule", "rank", "n_clients", "partition",
                                                      "seed", "gamma", "alpha", "round", "layer")) -> pd.DataFrame:
    """One row per (run, layer, scale) from rows that carry the line probe (others are left out):
    ``keys``, ``scale``, ``loss``, ``grad_B``, ``grad_A``, ``gap_B``, ``ratio_B`` (the squared dL/dB norm at
    c over that at c = 0; NaN unless 0 is among the scales) and ``step``, the step ``c gamma`` in units of
    rsLoRA's gamma ``alpha / sqrt(r)`` (with Adam's increments, whose size does not depend on gamma, runs of
    different rules at one (N, r, seed) take the same step at the same ``step``)."""
    need = {"line_scales", *LINE_COLUMNS}
    if not need <= set(df.columns):
        raise ValueError(f"no line probe in these rows (missing {sorted(need - set(df.columns))}); run with "
                         "RunConfig.line_scales set")
    rows = df[df["line_grad_B"].notna() & (df["line_grad_B"] != "")]
    out = []
    for rec in rows.to_dict("records"):
        parsed = {c: np.array(str(rec[c]).split(","), dtype=float) for c in ("line_scales", *LINE_COLUMNS)}
        if len({len(v) for v in parsed.values()}) != 1:
            raise ValueError(f"run {rec.get('run_id')}: line probe columns of different lengths")
        s = parsed["line_scales"]
        at0 = parsed["line_grad_B"][s == 0]
        base = at0[0] ** 2 if len(at0) else math.nan
        for i, c in enumerate(s):
            out.append({**{k: rec[k] for k in keys if k in rec}, "scale": c, "loss": parsed["line_loss"][i],
                        "grad_B": parsed["line_grad_B"][i], "grad_A": parsed["line_grad_A"][i],
                        "gap_B": parsed["line_gap_B"][i], "ratio_B": parsed["line_grad_B"][i] ** 2 / base})
    out = pd.DataFrame(out)
    if {"gamma", "alpha", "rank"} <= set(out.columns):
        out["step"] = out["scale"] * out["gamma"] * np.sqrt(out["rank"].astype(float)) / out["alpha"]
    return out


def line_summary(table: pd.DataFrame, by: Sequence[str] = ("rule", "rank", "n_clients"), *, round: int = 1,
                 n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Seed means of ``ratio_B`` and ``gap_B`` per ``by`` and scale (``__all__`` rows of ``round``), with 95%
    percentile bootstrap CIs over runs, and ``ratio_B_quadratic``: the ratio that the quadratic through the
    means at c = 0, 1/2 and 1 (the form every affine end gradient has) gives at that scale."""
    t = table[(table["layer"] == ALL) & (table["round"] == round)]
    if t.empty:
        raise ValueError(f"no __all__ line-probe rows in round {round}")
    rng = np.random.default_rng(seed)
    rows = []
    for key, g in t.groupby([*by, "scale"]):
        rec = dict(zip([*by, "scale"], key))
        for col in ("ratio_B", "gap_B"):
            x = g[col].to_numpy(dtype=float)
            boots = rng.choice(x, size=(n_boot, len(x))).mean(axis=1)
            rec[col] = float(x.mean())
            rec[f"{col}_low"], rec[f"{col}_high"] = np.percentile(boots, [2.5, 97.5])
        rec["n_runs"] = len(g)
        if "step" in g:
            rec["step"] = float(g["step"].mean())
        rows.append(rec)
    out = pd.DataFrame(rows)
    return pd.concat([_with_quadratic(g) for _, g in out.groupby(list(by))], ignore_index=True)


def _with_quadratic(g: pd.DataFrame) -> pd.DataFrame:
    means = dict(zip(g["scale"], g["ratio_B"]))
    if not {0.0, 0.5, 1.0} <= set(means):
        return g.assign(ratio_B_quadratic=math.nan)
    coef = np.polyfit([0.0, 0.5, 1.0], [means[0.0], means[0.5], means[1.0]], 2)
    return g.assign(ratio_B_quadratic=np.polyval(coef, g["scale"].to_numpy(dtype=float)))
