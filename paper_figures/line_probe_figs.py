"""Figure (s): the probe's dL/dB along the round's own update, against the form every affine end gradient has.

Reads ``gradient_check_line`` (FFA, AdamW, lr 1e-3, IID; rsLoRA at N in {1, 4, 16} and SFed at N in {4, 16},
probed at ``W0 + c dW``, :mod:`validation.line_probe`). The x axis is the step ``c gamma`` in units of
rsLoRA's gamma, so SFed's own point (c = 1) sits at sqrt(N), above rsLoRA's line at the same step: with
increments that did not depend on gamma the two would coincide.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from paper_figures import style

__all__ = ["fig_line_probe", "affine_misses"]

_N_COLORS = {1: "#0072B2", 4: "#E69F00", 16: "#009E73"}
_RULE_LS = {"rslora": "-", "sfed": ":"}


def affine_misses(summary: pd.DataFrame, scale: float) -> pd.DataFrame:
    """The lines whose seed-mean ratio at ``scale`` has the affine form's value (the quadratic through
    c = 0, 1/2, 1) outside its 95% CI: ``below`` (measured lower) or ``above``."""
    at = summary[np.isclose(summary["scale"], scale)]
    side = np.where(at["ratio_B_quadratic"] > at["ratio_B_high"], "below",
                    np.where(at["ratio_B_quadratic"] < at["ratio_B_low"], "above", "inside"))
    return at.assign(measured_vs_affine=side)


def fig_line_probe(rows: pd.DataFrame, out: Path, formats=("png", "pdf"), stem: str = "fig_line_probe",
                   n_boot: int = 1000) -> list[Path]:
    """Top: R(c), the squared dL/dB at ``W0 + c dW`` over its start, with its 95% CI, against the step; thin
    dashed: the quadratic through c = 0, 1/2, 1 (where any affine end gradient must lie). Bottom: the
    non-affinity ``gap_B``. One column per rank; colour: N; solid rsLoRA, dotted SFed."""
    from matplotlib.lines import Line2D

    from validation.line_probe import line_summary, line_table

    style.apply()
    s = line_summary(line_table(rows), n_boot=n_boot)
    ranks = sorted(s["rank"].unique())
    fig, axes = plt.subplots(2, len(ranks), figsize=(style.PAGE_W, 4.4), squeeze=False, sharex=True,
                             constrained_layout=True)
    for j, rank in enumerate(ranks):
        top, bottom = axes[0, j], axes[1, j]
        for (rule, n), g in s[(s["rank"] == rank) & (s["scale"] > 0)].groupby(["rule", "n_clients"]):
            g = g.sort_values("step")
            kw = dict(color=_N_COLORS.get(n), ls=_RULE_LS.get(rule, "-"), lw=1)
            top.plot(g.step, g.ratio_B, marker="o", ms=2.5, **kw)
            top.fill_between(g.step, g.ratio_B_low, g.ratio_B_high, color=_N_COLORS.get(n), alpha=0.12, lw=0)
            top.plot(g.step, g.ratio_B_quadratic, color=_N_COLORS.get(n), ls="--", lw=0.6, alpha=0.8)
            bottom.plot(g.step, g.gap_B, marker="o", ms=2.5, **kw)
            if rule == "sfed":  # SFed's own round: c = 1
                own = g[np.isclose(g.scale, 1.0)]
                top.scatter(own.step, own.ratio_B, s=28, marker="*", color=_N_COLORS.get(n), zorder=4)
        top.axhline(1, color="0.6", lw=0.6)
        top.set(xscale="log", yscale="log", title=f"r = {rank}")
        bottom.set(xscale="log", xlabel="step c·gamma / (alpha/sqrt(r))")
    axes[0, 0].set_ylabel("R(c): |dL/dB|² at W0 + c dW over W0", fontsize=6)
    axes[1, 0].set_ylabel("gap: |g(c) - g0 - c(g1 - g0)| / |g1 - g0|", fontsize=6)
    handles = [Line2D([], [], color=c, label=f"N = {n}") for n, c in _N_COLORS.items()]
    handles += [Line2D([], [], color="0.3", ls=ls, label={"rslora": "rsLoRA's update", "sfed": "SFed's update"}[r])
                for r, ls in _RULE_LS.items()]
    handles += [Line2D([], [], color="0.3", ls="--", lw=0.6, label="affine form (quadratic through c <= 1)"),
                Line2D([], [], color="0.3", marker="*", ls="", label="SFed's round (c = 1)")]
    fig.legend(handles=handles, loc="outside lower center", ncol=4, fontsize=6)
    miss = affine_misses(s, 4.0)
    below = int((miss.measured_vs_affine == "below").sum())
    fig.suptitle("dL/dB along the round's own update, FFA, AdamW, lr 1e-3, IID, 9 seeds. At c = 4 the affine form "
                 f"is above the whole 95% CI on {below} of {len(miss)} lines", fontsize=7)
    return style.save(fig, out, stem, formats)
