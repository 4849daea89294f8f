"""The clients' correlations against K: figures (p) and (r).

(p): the two K-laws fixed at N = 2 and 4, the label law and the refined model, on the gradient check
(N = 4, 16) and its N = 2 pilot (``gradient_check_two_clients``); :mod:`validation.correlation_law` makes
the table and the K-laws' predictions. (r): the label law (:mod:`validation.label_law`) fitted on that
pilot, against a stronger skew it was not fitted on (``gradient_check_strong_skew``, Dirichlet(0.1), K up
to 16 with the unseen K = 8).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from paper_figures import style

__all__ = ["PANELS", "fig_client_correlation", "refined_correlations", "label_law_check",
           "fig_label_law"]

PANELS: dict[str, tuple[str, str, str]] = {  # column -> (scheme, refined quantity, label)
    "rho_ratio": ("ffa", "update_fro", "increments (Frobenius), FFA"),
    "rho_out": ("ffa", "adapter_output", "projected on the adapter output, FFA"),
    "rho_gA": ("ffa", "grad_A", "projected on dL/dA, FFA"),
    "rho_gB": ("fedit", "grad_B", "A increments on dL/dB, FedIT"),
}
_LAW_STYLE = {"1/(K-1)": "--", "1/K": ":"}
_KS = (2, 4, 16)


def refined_correlations(refined: dict, partition: str, column: str, ks=_KS, ranks=(4, 16, 64),
                         rules=("lora", "rslora", "sfed"), alpha: float = 16.0) -> np.ndarray | None:
    """The refined model's value of ``column`` at each K, averaged over rules and ranks (None: no fit)."""
    from validation.refined import predicted_correlation

    scheme, quantity, _ = PANELS[column]
    p = refined.get((scheme, "adamw", partition, quantity))
    if p is None or p.rho_column != column:
        return None
    return np.array([np.mean([predicted_correlation(p, rule, [r], [k], alpha)[0] for rule in rules for r in ranks])
                     for k in ks])


def fig_client_correlation(runs: pd.DataFrame, out: Path, formats=("png", "pdf"), stem: str = "fig_client_correlation",
                           refined: dict | None = None) -> list[Path]:
    """Measured means (+- 2 SE over runs) of each correlation against K, one row per split and one column
    per correlation; lines: the 1/(K-1) and 1/K laws through K = 2 and 4 (their K = 16 values are
    predictions), the label law fitted on the pilot (N <= 4) of both splits, and, given ``refined`` fits,
    the refined model's own value of the correlation."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullFormatter

    from validation.correlation_law import correlation_by_k, k_law_predictions

    style.apply()
    table = correlation_by_k(runs)
    laws = k_law_predictions(table, (2, 4), np.geomspace(2, 16, 25))
    law_pred = label_law_check(runs)
    parts = sorted(table.partition.unique())
    fig, axes = plt.subplots(len(parts), len(PANELS), figsize=(style.PAGE_W, 1.9 * len(parts) + 0.7), squeeze=False,
                             sharex=True, constrained_layout=True)
    for i, part in enumerate(parts):
        for j, (col, (scheme, _, label)) in enumerate(PANELS.items()):
            ax = axes[i, j]
            sel = lambda t: t[(t.scheme == scheme) & (t.partition == part) & (t.column == col)]  # noqa: E731
            m = sel(table)
            ax.errorbar(m.K, m["mean"], yerr=2 * m.se, fmt="o", ms=3, color="k", capsize=2, lw=0.8)
            for law, g in sel(laws).groupby("law"):
                ax.plot(g.K, g.predicted, ls=_LAW_STYLE[law], color="#0072B2", lw=0.9)
            model = refined_correlations(refined, part, col) if refined else None
            if model is not None:
                ax.plot(_KS, model, marker="s", ms=2.5, ls="-", color="#D55E00", lw=0.8)
            lab = law_pred[(law_pred.scheme == scheme) & (law_pred.split == part) & (law_pred.column == col)]
            if not lab.empty:  # on top: the refined model reproduces the law where it takes its correlations
                ax.plot(lab.n_participating, lab.predicted, marker="^", ms=4.5, mfc="none", ls="", color="#009E73")
            ax.set(xscale="log", xticks=list(_KS), xticklabels=[str(k) for k in _KS])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"{label}\n{part}", fontsize=6)
        axes[i, 0].set_ylabel("pairwise correlation", fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("clients averaged K")
    handles = [Line2D([], [], color="k", marker="o", ls="", ms=3, label="measured (mean +- 2 SE)"),
               *(Line2D([], [], color="#0072B2", ls=s, label=f"rho_inf - s {law}, fixed at K = 2, 4")
                 for law, s in _LAW_STYLE.items()),
               Line2D([], [], color="#009E73", marker="^", ms=4.5, mfc="none", ls="", label="label law (pilot N <= 4, both splits)"),
               Line2D([], [], color="#D55E00", marker="s", ms=2.5, label="refined model (pilot N <= 4)")]
    fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=6, frameon=False)
    return style.save(fig, out, stem, formats)


def _split_name(runs: pd.DataFrame) -> pd.Series:
    alpha = runs.get("dirichlet_alpha", pd.Series(np.nan, index=runs.index))
    return runs.partition.where(runs.partition != "dirichlet", "dirichlet(" + alpha.map("{:g}".format) + ")")


def label_law_check(pilot_runs: pd.DataFrame, test_runs: pd.DataFrame | None = None, scheme: str = "ffa",
                    pilot_max_n: int = 4) -> pd.DataFrame:
    """Per (split, K, column of :data:`validation.analysis.LABEL_LAW_COLUMNS`): the measured mean correlation
    (and its SE over runs) beside the label law's mean over the same runs' batches, the law fitted on the pilot (N <=
    ``pilot_max_n``) of ``pilot_runs``' splits together; ``test_runs`` (other splits) are predicted by that
    law. ``sample``: ``in`` (a pilot K of a fitted split) or ``out``; ``split``: the partition, with its
    Dirichlet concentration when ``test_runs`` are given (``partition`` alone otherwise)."""
    from validation.analysis import LABEL_LAW_COLUMNS
    from validation.label_law import fit_label_laws, law_table
    from validation.label_overlap import overlap_table

    def table(runs: pd.DataFrame) -> pd.DataFrame:
        runs = runs[(runs.scheme == scheme) & (runs.optimizer == "adamw")]
        names = _split_name(runs) if test_runs is not None else runs.partition
        t = overlap_table(runs)
        return t.assign(partition=t.run_id.map(dict(zip(runs.run_id, names))))

    pilot = table(pilot_runs)
    test = table(test_runs) if test_runs is not None else None
    out = []
    for law in fit_label_laws(pilot, LABEL_LAW_COLUMNS, pilot_max_n).values():
        out.append(law_table(pilot, law, pilot_max_n).assign(b=law.b, n=law.n))
        if test is not None:
            out.append(law_table(test, law).assign(sample="out", b=law.b, n=law.n))
    if not out:
        return pd.DataFrame(columns=["scheme", "split", "n_participating", "column", "measured", "predicted"])
    return pd.concat(out, ignore_index=True).rename(columns={"partition": "split"}).assign(scheme=scheme)


def fig_label_law(pilot_runs: pd.DataFrame, test_runs: pd.DataFrame, out: Path, formats=("png", "pdf"),
                  stem: str = "fig_label_law") -> list[Path]:
    """One panel per correlation: measured means (+- 2 SE over runs) against K per split, and the label law
    fitted on the pilot runs (N <= 4, IID and Dirichlet(0.5)); filled markers where the law predicts
    (K beyond the pilot, and every K of the Dirichlet(0.1) split it was not fitted on)."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullFormatter

    from validation.analysis import LABEL_LAW_COLUMNS

    style.apply()
    t = label_law_check(pilot_runs, test_runs)
    splits = sorted(t.split.unique())
    colors = dict(zip(splits, ("#0072B2", "#D55E00", "#009E73", "#CC79A7")))
    ks = sorted(t.n_participating.unique())
    fig, axes = plt.subplots(1, len(LABEL_LAW_COLUMNS), figsize=(style.PAGE_W, 2.4), squeeze=False, constrained_layout=True)
    for ax, col in zip(axes[0], LABEL_LAW_COLUMNS):
        for split in splits:
            g = t[(t.column == col) & (t.split == split)].sort_values("n_participating")
            c = colors[split]
            ax.plot(g.n_participating, g.predicted, ls="-", color=c, lw=0.9)
            for sample, face in (("in", "none"), ("out", c)):
                h = g[g["sample"] == sample]
                ax.errorbar(h.n_participating, h.measured, yerr=2 * h.measured_se, fmt="o", ms=3, mfc=face, mec=c,
                            ecolor=c, capsize=2, lw=0.8)
        ax.axhline(0, color="0.7", lw=0.5)
        ax.set(xscale="log", xticks=ks, xticklabels=[str(k) for k in ks], xlabel="clients averaged K", title=col)
        ax.xaxis.set_minor_formatter(NullFormatter())
    axes[0, 0].set_ylabel("pairwise correlation (FFA)", fontsize=7)
    handles = [*(Line2D([], [], color=colors[s], marker="o", ms=3, label=s) for s in splits),
               Line2D([], [], color="0.3", ls="-", label="label law (b + cross)/(b + own + n repeat), fitted on the pilot"),
               Line2D([], [], color="0.3", marker="o", mfc="none", ls="", ms=3, label="measured, pilot (in sample)"),
               Line2D([], [], color="0.3", marker="o", ls="", ms=3, label="measured, predicted (out of sample)")]
    fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=6, frameon=False)
    return style.save(fig, out, stem, formats)
