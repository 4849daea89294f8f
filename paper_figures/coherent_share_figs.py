"""Figure (v): the refined model's input-coherent share f_in, measured on the clients' B increments and fitted.

Reads ``gradient_check_coherent`` (the default check's pilot, N = 1 and 4, seeds 0-2, with the harness column
``inc_B_coherent``: the clients' mean share of their B increments along ``A x_top`` above the 1/r of no
structure, :func:`validation.probe_inputs.mean_coherent_share`) and the refined model's fits on the full
check's pilot. The measured share is an input; the fitted ones are what each quantity's fit chose for it.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from paper_figures import style

__all__ = ["coherent_share_table", "fig_coherent_share"]

_N_MARKERS = {1: "o", 4: "s"}
_FIT_STYLE = {"adapter_output": ("#CC79A7", "output fit"), "grad_A": ("#0072B2", "dL/dA fit"),
              "grad_B": ("#D55E00", "dL/dB fit")}


def coherent_share_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (partition, rule, rank, n_clients): the seed mean of the ``__all__`` rows' ``inc_B_coherent`` (its
    standard error over seeds, and the number of seeds), FFA, round 1. ValueError without the column."""
    from validation.analysis import identical_n1_runs
    from validation.metrics import ALL

    if "inc_B_coherent" not in rows:
        raise ValueError("the rows lack inc_B_coherent (measured by the harness since f_in became a measured input)")
    a = identical_n1_runs(rows)
    a = a[(a.layer == ALL) & (a.scheme == "ffa") & (a["round"] == 1) & ~a.diverged.astype(bool)]
    g = a.groupby(["partition", "rule", "rank", "n_clients"]).inc_B_coherent
    t = g.agg(["mean", "std", "count"]).reset_index()
    t["se"] = t["std"] / np.sqrt(t["count"])
    return t.rename(columns={"mean": "f_in", "count": "n_seeds"}).drop(columns="std")


def fig_coherent_share(rows: pd.DataFrame, fitted: dict, out: Path, formats=("png", "pdf"),
                       stem: str = "fig_coherent_share") -> list[Path]:
    """One panel per split: the measured f_in (+- SE over seeds) against the rank, one colour per rule, one
    marker per N; horizontal lines: the f_in each quantity's refined fit chose for FFA on that split
    (``fitted``: :func:`validation.analysis.refined_fits` of the check)."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullFormatter

    style.apply()
    t = coherent_share_table(rows)
    parts = sorted(t.partition.unique(), key=lambda p: p != "iid")
    fig, axes = plt.subplots(1, len(parts), figsize=(style.PAGE_W, 2.4), squeeze=False, sharey=True,
                             constrained_layout=True)
    for ax, part in zip(axes[0], parts):
        for (rule, n), g in t[t.partition == part].groupby(["rule", "n_clients"]):
            g = g.sort_values("rank")
            ax.errorbar(g["rank"], g.f_in, yerr=g.se, marker=_N_MARKERS.get(int(n), "^"), ms=3, lw=0.8, capsize=2,
                        color=style.RULE_COLORS.get(rule), ls="-" if int(n) == 1 else "--")
        for q, (color, _) in _FIT_STYLE.items():
            p = fitted.get(("ffa", "adamw", part, q))
            if p is not None:
                ax.axhline(p.f_in, color=color, lw=0.8, ls=":")
        ax.set(xscale="log", xticks=sorted(t["rank"].unique()), xticklabels=sorted(t["rank"].unique()),
               xlabel="rank r (the three rules overlap)", title=f"FFA, {part}", ylim=(-0.02, 0.52))
        ax.xaxis.set_minor_formatter(NullFormatter())
    axes[0, 0].set_ylabel("f_in: B's share along A x_top")
    handles = [Line2D([], [], color=style.RULE_COLORS.get(r), label=style.rule_label(r)) for r in sorted(t.rule.unique())]
    handles += [Line2D([], [], color="0.3", marker=m, ls="-" if n == 1 else "--", label=f"measured, N = {n}")
                for n, m in _N_MARKERS.items()]
    handles += [Line2D([], [], color=c, ls=":", label=f"{lab} (fitted)") for c, lab in _FIT_STYLE.values()]
    fig.legend(handles=handles, loc="outside lower center", ncol=4, fontsize=6)
    fig.suptitle(f"AdamW, lr 1e-3, {int(t.n_seeds.max())} seeds: the input-coherent share, measured on the clients' "
                 "increments and fitted per quantity", fontsize=7)
    return style.save(fig, out, stem, formats)
