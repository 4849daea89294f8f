"""Figure (v): the refined model's input-coherent share f_in, measured on the clients' B increments and fitted.

Reads ``gradient_check_coherent`` (the default check's pilot, N = 1 and 4, seeds 0-2) with the harness's two
measurements of the share (:func:`validation.probe_inputs.mean_coherent_share`): ``inc_B_coherent``, the clients'
share of their B increments along ``A x_top`` above the 1/r of no structure, and ``inc_B_coherent_probe``, the
share at which the model's B reproduces their alignment with the probe's whole input spectrum; and the refined
model's fits on the full check's pilot. The measured shares are inputs; the fitted ones are what each
quantity's fit chose for itself.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from paper_figures import style

__all__ = ["coherent_share_table", "fig_coherent_share"]

_N_STYLE = {1: ("o", "-"), 4: ("s", "--")}
_MEASURES = {"inc_B_coherent": ("0.2", "measured along A x_top"),
             "inc_B_coherent_probe": ("#009E73", "measured over the probe's spectrum")}
_FIT_STYLE = {"adapter_output": ("#CC79A7", "output fit"), "grad_A": ("#0072B2", "dL/dA fit"),
              "grad_B": ("#D55E00", "dL/dB fit")}


def coherent_share_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (measure, partition, rank, n_clients): the mean over seeds and rules (which agree to 0.01) of the
    ``__all__`` rows' measured share, its standard error over the seeds' means, and the number of seeds; FFA,
    round 1. ``measure``: the harness columns of :data:`_MEASURES` present (ValueError if none)."""
    from validation.analysis import identical_n1_runs
    from validation.metrics import ALL

    measures = [c for c in _MEASURES if c in rows]
    if not measures:
        raise ValueError(f"the rows lack {' and '.join(_MEASURES)} (measured by the harness since f_in became an input)")
    a = identical_n1_runs(rows)
    a = a[(a.layer == ALL) & (a.scheme == "ffa") & (a["round"] == 1) & ~a.diverged.astype(bool)]
    long = a.melt(id_vars=["partition", "rank", "n_clients", "seed"], value_vars=measures, var_name="measure",
                  value_name="f_in")
    per_seed = long.groupby(["measure", "partition", "rank", "n_clients", "seed"]).f_in.mean()
    t = per_seed.groupby(["measure", "partition", "rank", "n_clients"]).agg(["mean", "std", "count"]).reset_index()
    t["se"] = t["std"] / np.sqrt(t["count"])
    return t.rename(columns={"mean": "f_in", "count": "n_seeds"}).drop(columns="std")


def fig_coherent_share(rows: pd.DataFrame, fitted: dict, out: Path, formats=("png", "pdf"),
                       stem: str = "fig_coherent_share") -> list[Path]:
    """One panel per split: the measured f_in (+- SE over seeds) against the rank, one colour per measure,
    one line style per N; dotted: the f_in each quantity's refined fit chose for FFA on that split
    (``fitted``: :func:`validation.analysis.refined_fits` of the check)."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullFormatter

    style.apply()
    t = coherent_share_table(rows)
    parts = sorted(t.partition.unique(), key=lambda p: p != "iid")
    fig, axes = plt.subplots(1, len(parts), figsize=(style.PAGE_W, 2.4), squeeze=False, sharey=True,
                             constrained_layout=True)
    for ax, part in zip(axes[0], parts):
        for (measure, n), g in t[t.partition == part].groupby(["measure", "n_clients"]):
            g = g.sort_values("rank")
            marker, ls = _N_STYLE.get(int(n), ("^", ":"))
            ax.errorbar(g["rank"], g.f_in, yerr=g.se, marker=marker, ms=3, lw=0.8, capsize=2, ls=ls,
                        color=_MEASURES[measure][0])
        for q, (color, _) in _FIT_STYLE.items():
            p = fitted.get(("ffa", "adamw", part, q))
            if p is not None:
                ax.axhline(p.f_in, color=color, lw=0.8, ls=":")
        ranks = sorted(t["rank"].unique())
        ax.set(xscale="log", xticks=ranks, xticklabels=ranks, xlabel="rank r (mean over the three rules)",
               title=f"FFA, {part}", ylim=(-0.02, 0.52))
        ax.xaxis.set_minor_formatter(NullFormatter())
    axes[0, 0].set_ylabel("input-coherent share f_in")
    handles = [Line2D([], [], color=c, label=lab) for c, lab in _MEASURES.values()]
    handles += [Line2D([], [], color="0.5", marker=m, ls=ls, label=f"N = {n}") for n, (m, ls) in _N_STYLE.items()]
    handles += [Line2D([], [], color=c, ls=":", label=f"{lab} (fitted)") for c, lab in _FIT_STYLE.values()]
    fig.legend(handles=handles, loc="outside lower center", ncol=4, fontsize=6)
    fig.suptitle(f"AdamW, lr 1e-3, {int(t.n_seeds.max())} seeds: the refined model's input-coherent share, measured "
                 "on the clients' B increments and fitted per quantity", fontsize=7)
    return style.save(fig, out, stem, formats)
