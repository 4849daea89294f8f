"""Clients of different ranks: the size of the round-1 aggregate against N per rule, figure (l); the
rules trained at their tuned learning rates, figure (m).

Reads the ``hetero_ranks`` results (a fixed rank mix cycled to each N, :mod:`validation.federated` with
``client_ranks``). Two panels, ``||dW||_F`` and the adapter output RMS of the aggregate (layer ``__all__``):
measured points are the seed mean with the seed range as bars; lines are the derived size
(:func:`sfed_theory.client_scaling_factors`' ``size``, recorded in each row as ``size_pred``) times one
constant per panel (the geometric mean of measured / predicted over every rule and N: the model fixes the
slopes and the ratios between rules, not the units). The legend gives each rule's measured slope in N
beside the predicted one (:func:`validation.hetero_analysis.fit_hetero_exponents`).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from paper_figures import style

__all__ = ["HETERO_RULE_ORDER", "aggregate_sizes", "fig_hetero_ranks", "tuned_table", "fig_hetero_lr"]

HETERO_RULE_ORDER: tuple[str, ...] = ("lora", "rslora", "sfed", "sfed-hetero", "sfed-hetero-shared")
_COLORS = {**style.RULE_COLORS, "sfed-hetero": "#000000", "sfed-hetero-shared": "#E69F00"}
_LABELS = {**style.RULE_LABELS, "sfed-hetero": r"SFed-hetero  $c/\sqrt{r_i}$", "sfed-hetero-shared": "SFed-hetero shared"}
_STYLE = {"sfed-hetero": dict(ls="--", marker="x"), "sfed-hetero-shared": dict(ls="-.", marker="s")}
_PANELS = (("update_fro", r"$\|\Delta W\|_F$ of the aggregate"), ("adapter_rms", "adapter output RMS of the aggregate"))


def aggregate_sizes(df: pd.DataFrame, round: int = 1) -> pd.DataFrame:
    """Per (rule, N): seed mean, min and max of ``update_fro`` and ``adapter_rms`` (layer ``__all__``), and
    the predicted size ``size_pred``."""
    a = df[(df["layer"] == "__all__") & (df["round"] == round) & ~df["diverged"].astype(bool)]
    if a.empty or "size_pred" not in a:
        raise ValueError("no round rows with size_pred: these are not results of runs with client_ranks")
    g = a.groupby(["rule", "n_clients"])
    out = g[["update_fro", "adapter_rms", "size_pred"]].mean()
    for col in ("update_fro", "adapter_rms"):
        out[f"{col}_min"], out[f"{col}_max"] = g[col].min(), g[col].max()
    return out.reset_index()


def _slopes_label(rule: str, fits: pd.DataFrame) -> str:
    parts = [f"{fits.loc[(rule, c)].measured:+.2f} ({fits.loc[(rule, c)].predicted_rho0:+.2f})" for c, _ in _PANELS]
    return f"{_LABELS.get(rule, rule)}: " + "; ".join(parts)


def fig_hetero_ranks(df: pd.DataFrame, out: Path, formats=("png", "pdf"), stem: str = "fig_hetero_ranks",
                     n_boot: int = 1000) -> list[Path]:
    """The aggregate's size against N per rule, measured (points, seed range) and derived (lines)."""
    from validation.hetero_analysis import fit_hetero_exponents

    style.apply()
    sizes = aggregate_sizes(df)
    fits = fit_hetero_exponents(df, n_boot=n_boot).set_index(["rule", "column"])
    mix = sorted({int(r) for cr in df["client_ranks"].dropna().unique() for r in str(cr).split(",")})
    rules = [r for r in HETERO_RULE_ORDER if r in set(sizes["rule"])]
    fig, axes = plt.subplots(1, 2, figsize=(style.PAGE_W, 3.6), constrained_layout=True)
    for ax, (col, title) in zip(axes, _PANELS):
        unit = float(np.exp(np.mean(np.log(sizes[col] / sizes["size_pred"]))))
        for rule in rules:
            s = sizes[sizes["rule"] == rule].sort_values("n_clients")
            kw = _STYLE.get(rule, dict(ls="-", marker="o"))
            ax.errorbar(s["n_clients"], s[col], yerr=[s[col] - s[f"{col}_min"], s[f"{col}_max"] - s[col]],
                        fmt=kw["marker"], color=_COLORS.get(rule), ms=4, capsize=2, elinewidth=0.7,
                        label=_slopes_label(rule, fits))
            ax.plot(s["n_clients"], unit * s["size_pred"], ls=kw["ls"], color=_COLORS.get(rule), lw=1.0, alpha=0.8)
        ns = np.sort(sizes["n_clients"].unique())
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.minorticks_off()
        ax.set_xlabel("clients N")
        ax.set_title(title)
    axes[0].set_ylabel("measured (points: seed mean, bars: range)\nlines: derived size x one constant", fontsize=7)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=2, fontsize=6,
               title=r"slope in N, measured (predicted): $\|\Delta W\|_F$; output")
    fig.suptitle(f"Clients of ranks {tuple(mix)} cycled to N, {df['scheme'].iloc[0]} (zero-padding), "
                 f"{df['optimizer'].iloc[0]}, round 1", fontsize=8)
    return style.save(fig, out, stem, formats)


def tuned_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per (rule, N) of an lr sweep with client ranks (``hetero_lr``): the most accurate learning rate
    (seed-mean final accuracy; ties: lower eval loss), that accuracy with its seed range and eval loss,
    whether it sits on the window's edge, and the regret of the lr tuned at the smallest N."""
    from paper_figures.lr_transfer import lr_curves, most_accurate, transfer_table

    c = lr_curves(df)
    n0, width = int(c.n_clients.min()), int(c["rank"].max())  # runs with client ranks: rank = the widest
    regret = transfer_table(df, reference=(n0, width)).set_index(["rule", "n_clients"])["regret"]
    rows = []
    for (rule, n), g in c.groupby(["rule", "n_clients"]):
        b = most_accurate(g)
        rows.append({"rule": rule, "n_clients": n, "lr_best": b.lr, "edge": b.lr in (g.lr.min(), g.lr.max()),
                     "best_acc": b.eval_acc, "acc_min": b.acc_min, "acc_max": b.acc_max, "eval_loss": b.eval_loss,
                     "lrs": len(g), f"regret_lr_from_N={n0}": regret.loc[(rule, n)]})
    return pd.DataFrame(rows)


def fig_hetero_lr(df: pd.DataFrame, out: Path, formats=("png", "pdf"), stem: str = "fig_hetero_lr") -> list[Path]:
    """Final eval accuracy against the learning rate, one panel per N, one curve per rule (seed range
    shaded); the most accurate lr of each rule starred."""
    from paper_figures.lr_transfer import lr_curves

    style.apply()
    c = lr_curves(df)
    best = tuned_table(df).set_index(["rule", "n_clients"])
    ns = sorted(c.n_clients.unique())
    rules = [r for r in HETERO_RULE_ORDER if r in set(c.rule)]
    mix = sorted({int(r) for cr in df["client_ranks"].dropna().unique() for r in str(cr).split(",")})
    fig, axes = plt.subplots(1, len(ns), figsize=(style.PAGE_W, 3.0), sharey=True, squeeze=False,
                             constrained_layout=True)
    for ax, n in zip(axes[0], ns):
        for rule in rules:
            g = c[(c.rule == rule) & (c.n_clients == n)].sort_values("lr")
            kw = _STYLE.get(rule, dict(ls="-", marker="o"))
            ax.plot(g.lr, g.eval_acc, ls=kw["ls"], marker=kw["marker"], ms=3, lw=1, color=_COLORS.get(rule),
                    label=_LABELS.get(rule, rule))
            ax.fill_between(g.lr, g.acc_min, g.acc_max, color=_COLORS.get(rule), alpha=0.12, lw=0)
            b = best.loc[(rule, n)]
            ax.plot(b.lr_best, b.best_acc, "*", color=_COLORS.get(rule), ms=9, mec="k", mew=0.4)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("learning rate (AdamW)")
        ax.set_title(f"N = {n}")
    axes[0, 0].set_ylabel("final eval accuracy (seed mean, range shaded)")
    axes[0, 0].legend(fontsize=6, loc="lower left")
    fig.suptitle(f"Clients of ranks {tuple(mix)} cycled to N, {df['scheme'].iloc[0]}, {int(df['rounds'].iloc[0])} "
                 f"rounds: accuracy against the learning rate per rule (star: most accurate)", fontsize=8)
    return style.save(fig, out, stem, formats)
