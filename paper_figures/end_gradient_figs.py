"""Figure (o): the end-of-round dL/dB against its start, and the floor any affine end-gradient model allows.

Reads FFA's rows of the gradient check (lr 1e-3) and of its 4x smaller learning-rate repeat
(``gradient_check_small_lr``); :mod:`validation.end_gradient` computes R, the ratio of the squared
dL/dB at the round's end to its start, and the SFed drops against the bound of
:mod:`sfed_theory.affine_bound`.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from paper_figures import style

__all__ = ["fig_end_gradient"]

_RANK_COLORS = {4: "#56B4E9", 16: "#E69F00", 64: "#009E73"}


def fig_end_gradient(runs: dict[str, pd.DataFrame], out: Path, formats=("png", "pdf"),
                     stem: str = "fig_end_gradient", n_boot: int = 400, title: str | None = None) -> list[Path]:
    """R against N, one row per split and one column per rule, one colour per rank, one line style per
    results set in ``runs`` (its legend label -> rows); the SFed column marks, after each step in N, the lowest R an
    affine end-gradient model allows (bars), and the title counts the SFed drops whose CI lies above it."""
    from matplotlib.lines import Line2D

    from validation.end_gradient import end_gradient_ratios, sfed_drops

    style.apply()
    ratios = {name: end_gradient_ratios(d) for name, d in runs.items()}
    drops = {name: sfed_drops(d, n_boot=n_boot) for name, d in runs.items()}
    parts = sorted(next(iter(ratios.values())).partition.unique())
    rules = [r for r in style.RULE_ORDER if r in set(next(iter(ratios.values())).rule)]
    styles = dict(zip(runs, ("-", "--", ":")))
    fig, axes = plt.subplots(len(parts), len(rules), figsize=(style.PAGE_W, 2.0 * len(parts) + 0.6), squeeze=False,
                             sharex=True, sharey=True, constrained_layout=True)
    for i, part in enumerate(parts):
        for j, rule in enumerate(rules):
            ax = axes[i, j]
            for name, r in ratios.items():
                for rank, g in r[(r.partition == part) & (r.rule == rule)].groupby("rank"):
                    ax.plot(g.n_clients, g.R, marker="o", ms=2.5, lw=1, ls=styles[name], color=_RANK_COLORS.get(rank))
                if rule == "sfed":
                    d = drops[name][drops[name].partition == part]
                    ax.scatter(d.n_to, d.R_from - d.affine_bound, marker="_", s=60, linewidths=1.2,
                               color=[_RANK_COLORS.get(k) for k in d["rank"]], zorder=3)
            ax.axhline(1, color="0.6", lw=0.6)
            ax.set(xscale="log", xticks=[1, 4, 16], xticklabels=["1", "4", "16"])
            ax.set_title(f"{style.rule_label(rule)}, {part}", fontsize=7)
        axes[i, 0].set_ylabel("R = E|dL/dB end|² / E|dL/dB start|²", fontsize=6)
    for ax in axes[-1]:
        ax.set_xlabel("clients N")
    handles = [Line2D([], [], color=c, label=f"r = {k}") for k, c in _RANK_COLORS.items()]
    handles += [Line2D([], [], color="0.3", ls=styles[n], label=n) for n in runs]
    handles += [Line2D([], [], color="0.3", marker="_", ls="", ms=8,
                       label="lowest R an affine model allows (from R at the smaller N)")]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=6)
    counts = "; ".join(f"{n}: {int(d.above_affine_bound.sum())}/{len(d)}" for n, d in drops.items())
    fig.suptitle(f"{title or 'End-of-round dL/dB over its start, FFA, AdamW, one round.'} SFed drops above the "
                 f"affine bound (whole 95% CI): {counts}", fontsize=7)
    return style.save(fig, out, stem, formats)
