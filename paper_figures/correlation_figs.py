"""Figure (p): the clients' correlations against K, the two K-laws fixed at N = 2 and 4, and the refined model.

Reads the gradient check (N = 4, 16) and its N = 2 pilot (``gradient_check_two_clients``);
:mod:`validation.correlation_law` makes the table and the laws' predictions.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from paper_figures import style

__all__ = ["PANELS", "fig_client_correlation", "refined_correlations"]

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
    predictions) and, given ``refined`` fits, the refined model's own value of the correlation."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullFormatter

    from validation.correlation_law import correlation_by_k, k_law_predictions

    style.apply()
    table = correlation_by_k(runs)
    laws = k_law_predictions(table, (2, 4), np.geomspace(2, 16, 25))
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
            ax.set(xscale="log", xticks=list(_KS), xticklabels=[str(k) for k in _KS])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"{label}\n{part}", fontsize=6)
        axes[i, 0].set_ylabel("pairwise correlation", fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("clients averaged K")
    handles = [Line2D([], [], color="k", marker="o", ls="", ms=3, label="measured (mean +- 2 SE)"),
               *(Line2D([], [], color="#0072B2", ls=s, label=f"rho_inf - s {law}, fixed at K = 2, 4")
                 for law, s in _LAW_STYLE.items()),
               Line2D([], [], color="#D55E00", marker="s", ms=2.5, label="refined model (pilot N <= 4)")]
    fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, fontsize=6, frameon=False)
    return style.save(fig, out, stem, formats)
