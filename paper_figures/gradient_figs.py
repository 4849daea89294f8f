"""The gradient-norm check: measured log-log slopes against the predicted ones, figures (i), (k) and (n).

Reads the ``gradient_check`` (AdamW) and ``gradient_check_sgd`` results, fits the slopes with
:func:`validation.analysis.fit_exponents` (bootstrap CIs over seeds x layers) and draws predicted
against measured slopes (y = x), one panel per prediction, coloured by quantity: the canonical
model at rho = 0, at each point's measured rho (which follows the data by construction), and the
refined model with its parameters estimated from the pilot runs only (filled: slopes that reach
N = 16, out of sample; hollow: inside the pilot). Figure (n) draws the norms against N with the probe
from the training set and from held-out examples (``gradient_check_heldout``); figure (q) sets the slopes
and their CIs side by side for those probes and a 4x larger one (``gradient_check_large_probe``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from paper_figures import style

__all__ = ["slope_fits", "fig_gradient_check", "probe_source_fits", "probe_variant_fits", "fig_probe_source",
           "fig_probe_size", "QUANTITY_COLORS"]

QUANTITY_COLORS = {"update_fro": "#0072B2", "adapter_output": "#009E73", "grad_A": "#D55E00", "grad_B": "#CC79A7"}
_LABELS = {"update_fro": r"$\|\Delta W\|_F$", "adapter_output": "adapter output", "grad_A": r"$\|\partial L/\partial A\|$",
           "grad_B": r"$\|\partial L/\partial B\|$"}
_PANELS = {"rho0": r"canonical, $\rho = 0$", "rho_hat": "canonical at each point's measured rho\n(follows the data)",
           "refined": "refined, parameters from N <= 4 only"}


def slope_fits(df: pd.DataFrame, n_boot: int = 400, refined: dict | None = None) -> pd.DataFrame:
    """All slope fits of a gradient-check results set (quiet: warnings about skipped fits dropped);
    ``refined``: the refined model's parameters if already fitted on ``df`` (default: fitted here)."""
    from validation.analysis import fit_exponents

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fit_exponents(df, n_boot=n_boot, refined=True if refined is None else refined)


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


_PROBE_KEYS = ["scheme", "optimizer", "partition", "rank", "seed"]
PROBE_QUANTITIES = ("adapter_output", "grad_A", "grad_B")  # the update norm does not see the probe


def _same_cells(train: pd.DataFrame, heldout: pd.DataFrame) -> pd.DataFrame:
    """The training-probe runs of the cells (scheme, optimizer, split, rank, seed) the held-out runs have."""
    return train.merge(heldout[_PROBE_KEYS].drop_duplicates(), on=_PROBE_KEYS)


def probe_source_fits(train: pd.DataFrame, heldout: pd.DataFrame, n_boot: int = 400) -> pd.DataFrame:
    """Slopes in N of the probe-dependent norms with the probe from the training set (``train``: the
    gradient check, restricted to the held-out runs' cells) and from held-out examples; column ``probe``."""
    return probe_variant_fits(train, {"heldout": heldout}, n_boot=n_boot)


def probe_variant_fits(train: pd.DataFrame, variants: dict[str, pd.DataFrame], n_boot: int = 400) -> pd.DataFrame:
    """Slopes in N (with 95% CIs) of the probe-dependent norms for the gradient check's own probe (``train``,
    restricted to the first variant's cells) and for each probe variant (name -> runs of the same cells);
    column ``probe``."""
    from validation.analysis import fit_exponents

    runs = {"train": _same_cells(train, next(iter(variants.values()))), **variants}
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, d in runs.items():
            f = fit_exponents(d, n_boot=n_boot, refined=False)
            out.append(f[(f.wrt == "n_clients") & f.quantity.isin(PROBE_QUANTITIES)].assign(probe=name))
    return pd.concat(out, ignore_index=True)


def fig_probe_size(fits: pd.DataFrame, out: Path, formats=("png", "pdf"), stem: str = "fig_probe_size") -> list[Path]:
    """Figure (q): each probe-dependent norm's slope in N with its 95% CI, per probe variant (side by side),
    one row per split and one column per quantity; each panel's title gives the median CI width per probe."""
    from matplotlib.lines import Line2D

    style.apply()
    probes = list(dict.fromkeys(fits.probe))
    parts, rules = sorted(fits.partition.unique()), [r for r in style.RULE_ORDER if r in set(fits.rule)]
    fig, axes = plt.subplots(len(parts), len(PROBE_QUANTITIES), figsize=(style.PAGE_W, 2.0 * len(parts) + 0.6),
                             squeeze=False, constrained_layout=True)
    marks = dict(zip(probes, ("o", "s", "^", "D")))
    for i, part in enumerate(parts):
        for j, q in enumerate(PROBE_QUANTITIES):
            ax, f = axes[i, j], fits[(fits.partition == part) & (fits.quantity == q)]
            for k, probe in enumerate(probes):
                g = f[f.probe == probe].set_index("rule").reindex(rules)
                x = np.arange(len(rules)) + (k - (len(probes) - 1) / 2) * 0.22
                ax.errorbar(x, g.measured, yerr=[g.measured - g.ci_low, g.ci_high - g.measured], fmt=marks[probe],
                            ms=3, lw=0.8, capsize=1.5, color=QUANTITY_COLORS[q], alpha=1.0 - 0.25 * k)
            widths = f.assign(w=f.ci_high - f.ci_low).groupby("probe").w.median()
            ax.set_xticks(range(len(rules)), [style.rule_label(r).split()[0] for r in rules])
            width_text = " / ".join(f"{widths.get(p, np.nan):.2f}" for p in probes)
            ax.set_title(f"{_LABELS[q]}, {part}\nmedian CI width {width_text}", fontsize=6)
        axes[i, 0].set_ylabel("slope in N (95% CI)")
    handles = [Line2D([], [], color="0.3", marker=marks[p], ls="", label=f"probe: {p}") for p in probes]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=6)
    fig.suptitle("Slopes in N of the probe-dependent norms by probe (FFA, AdamW, one round, r = 16)", fontsize=8)
    return style.save(fig, out, stem, formats)


def fig_probe_source(train: pd.DataFrame, heldout: pd.DataFrame, out: Path, formats=("png", "pdf"),
                     stem: str = "fig_probe_source") -> list[Path]:
    """The probe-dependent norms against N, one row per split and one column per quantity: RMS over seeds
    (bars: standard error over seeds) with the probe from the training set (solid) and from held-out
    examples (dashed), one colour per rule; each panel lists the slopes in N (training / held-out probe)."""
    from matplotlib.lines import Line2D

    from validation.analysis import QUANTITY_COLUMNS, identical_n1_runs
    from validation.metrics import ALL

    style.apply()
    fits = probe_source_fits(train, heldout).set_index(["partition", "quantity", "rule", "probe"]).measured
    data = {name: identical_n1_runs(d[d.layer == ALL]) for name, d in
            (("train", _same_cells(train, heldout)), ("heldout", heldout))}
    parts, rules = sorted(heldout.partition.unique()), [r for r in style.RULE_ORDER if r in set(heldout.rule)]
    fig, axes = plt.subplots(len(parts), len(PROBE_QUANTITIES), figsize=(style.PAGE_W, 2.2 * len(parts) + 0.4),
                             squeeze=False, constrained_layout=True)
    for i, part in enumerate(parts):
        for j, q in enumerate(PROBE_QUANTITIES):
            ax, col = axes[i, j], QUANTITY_COLUMNS[q]
            for (name, d), ls in zip(data.items(), ("-", "--")):
                for rule, g in d[d.partition == part].groupby("rule"):
                    v = g.groupby("n_clients")[col]
                    rms = np.sqrt((g[col] ** 2).groupby(g.n_clients).mean())
                    ax.errorbar(rms.index, rms, yerr=v.sem(), ls=ls, marker="o", ms=2.5, lw=1, capsize=1.5,
                                color=style.RULE_COLORS.get(rule, "k"))
            slopes = "\n".join(f"{style.rule_label(r).split()[0]}: {fits.get((part, q, r, 'train'), np.nan):+.2f} / "
                                f"{fits.get((part, q, r, 'heldout'), np.nan):+.2f}" for r in rules)
            ax.set(xscale="log", yscale="log", xlabel="clients N")
            lo, hi = ax.get_ylim()
            ax.set_ylim(lo, hi * (hi / lo) ** 0.6)  # headroom for the slopes' box above the lines
            ax.text(0.97, 0.97, f"slope in N (train / held-out)\n{slopes}", transform=ax.transAxes, fontsize=5,
                    va="top", ha="right", bbox=dict(fc="white", ec="0.8", lw=0.4))
            ax.set_title(f"{_LABELS[q]}, {part}", fontsize=7)
        axes[i, 0].set_ylabel("norm (RMS over seeds)")
    handles = [Line2D([], [], color=style.RULE_COLORS.get(r, "k"), label=style.rule_label(r)) for r in rules]
    handles += [Line2D([], [], color="0.3", ls=ls, label=f"probe: {lab}")
                for ls, lab in (("-", "training set"), ("--", "held-out examples"))]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=6)
    r = ", ".join(map(str, sorted(heldout["rank"].unique())))
    fig.suptitle(f"Probe from the training set or from held-out examples: FFA, AdamW, one round, r = {r}, "
                 f"{heldout.seed.nunique()} seeds (bars: s.e. over seeds)", fontsize=8)
    return style.save(fig, out, stem, formats)
