"""The gradient-norm check: measured log-log slopes against the predicted ones, figures (i) and (k).

Reads the ``gradient_check`` (AdamW) and ``gradient_check_sgd`` results, fits the slopes with
:func:`validation.analysis.fit_exponents` (bootstrap CIs over seeds x layers) and draws predicted
against measured slopes (y = x), one panel per prediction, coloured by quantity: the canonical
model at rho = 0, at each point's measured rho (which follows the data by construction), and the
refined model with its parameters estimated from the pilot runs only (filled: slopes that reach
N = 16, out of sample; hollow: inside the pilot).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from paper_figures import style

__all__ = ["slope_fits", "fig_gradient_check", "QUANTITY_COLORS"]

QUANTITY_COLORS = {"update_fro": "#0072B2", "adapter_output": "#009E73", "grad_A": "#D55E00", "grad_B": "#CC79A7"}
_LABELS = {"update_fro": r"$\|\Delta W\|_F$", "adapter_output": "adapter output", "grad_A": r"$\|\partial L/\partial A\|$",
           "grad_B": r"$\|\partial L/\partial B\|$"}
_PANELS = {"rho0": r"canonical, $\rho = 0$", "rho_hat": "canonical at each point's measured rho\n(follows the data)",
           "refined": "refined, parameters from N <= 4 only"}


def slope_fits(df: pd.DataFrame, n_boot: int = 400) -> pd.DataFrame:
    """All slope fits of a gradient-check results set (quiet: warnings about skipped fits dropped)."""
    from validation.analysis import fit_exponents

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fit_exponents(df, n_boot=n_boot)


def fig_gradient_check(fits: pd.DataFrame, out: Path, formats=("png", "pdf"), stem: str = "fig_gradient_check",
                       title: str = "") -> list[Path]:
    """Predicted against measured slopes, one panel per prediction present in ``fits``."""
    from validation.analysis import TOLERANCE

    style.apply()
    panels = [p for p in _PANELS if fits[f"predicted_{p}"].notna().any()]
    fig, axes = plt.subplots(1, len(panels), figsize=(style.PAGE_W, style.PAGE_W / len(panels) + 0.5), squeeze=False,
                             sharex=True, sharey=True, constrained_layout=True)
    lo = float(np.nanmin([fits.ci_low.min(), *(fits[f"predicted_{p}"].min() for p in panels)])) - 0.05
    hi = float(np.nanmax([fits.ci_high.max(), *(fits[f"predicted_{p}"].max() for p in panels)])) + 0.05
    for ax, p in zip(axes[0], panels):
        f = fits[fits[f"predicted_{p}"].notna()]
        for q, g in f.groupby("quantity"):
            filled = g["refined_sample"].eq("out") if p == "refined" else np.ones(len(g), bool)
            for mask, face in ((filled, QUANTITY_COLORS[q]), (~filled, "white")):
                h = g[mask]
                ax.errorbar(h[f"predicted_{p}"], h.measured, yerr=[h.measured - h.ci_low, h.ci_high - h.measured],
                            fmt="o", ms=2.6, mfc=face, mec=QUANTITY_COLORS[q], ecolor=QUANTITY_COLORS[q], elinewidth=0.5,
                            alpha=0.75, label=_LABELS[q] if face != "white" else None)
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.7)
        ax.fill_between([lo, hi], [lo - TOLERANCE, hi - TOLERANCE], [lo + TOLERANCE, hi + TOLERANCE], color="0.85",
                        lw=0, zorder=0)
        n, c, t = len(f), int(f[f"in_ci_{p}"].sum()), int(f[f"agrees_{p}"].sum())
        ax.set_title(f"{_PANELS[p]}\ninside 95% CI {c}/{n}, within {TOLERANCE} {t}/{n}", fontsize=7)
        ax.set_xlabel("predicted slope")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
    axes[0, 0].set_ylabel("measured slope (95% CI)")
    axes[0, 0].legend(fontsize=6, loc="upper left")
    fig.suptitle(title or f"Log-log slopes in N and r of four norms ({len(fits)} fits; grey band: +-{TOLERANCE})",
                 fontsize=8)
    return style.save(fig, out, stem, formats)
