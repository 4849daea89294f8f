"""Figures drawn from the theory API alone (no training): (e) and (f).

Every number comes from :mod:`sfed_theory`: the closed forms through ``predicted_norm``, the
solved invariance condition through ``solve_invariance`` (lambdified), and the rules through
``scaling_factor``. Nothing is re-typed here.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import sympy as sp
from matplotlib.colors import LogNorm

import sfed_theory
from sfed_theory.assumptions import SYM, power_sum

from paper_figures import style

__all__ = ["moment_ratio", "moment_grid", "gamma_star_fn", "fig_e_moment_heatmap", "fig_f_rho"]

DEFAULTS = dict(alpha=16.0, d=384, k=384)  # MiniLM's 384-wide attention projections, LoRA alpha 16


def moment_ratio(rule: str, rank: int, n_clients: int, *, regime: str = "adam", scheme: str = "ffa",
                 rho: float = 0.0, alpha: float = DEFAULTS["alpha"], d: int = DEFAULTS["d"],
                 k: int = DEFAULTS["k"]) -> float:
    """``E||y||^2 / d`` under ``rule`` at (r, N), relative to one client at rank 1 with gamma = alpha.

    That reference is the right-hand side of the invariance condition ``solve_invariance`` solves,
    so a ratio of 1 means "the rule keeps the adapter output at its target size".
    """
    kw = dict(regime=regime, scheme=scheme, alpha=alpha, d=d, k=k, rho=rho)
    num = sfed_theory.predicted_norm("adapter_output", rule, rank=rank, n_clients=n_clients, **kw) ** 2
    ref = sfed_theory.predicted_norm("adapter_output", rule, rank=1, n_clients=1, **kw) ** 2
    return num / ref


def moment_grid(rule: str, ranks: np.ndarray, ns: np.ndarray, **kw) -> np.ndarray:
    """``moment_ratio`` on the grid ``ns x ranks`` (rows: N, columns: r)."""
    return np.array([[moment_ratio(rule, int(r), int(n), **kw) for r in ranks] for n in ns])


def gamma_star_fn(regime: str = "adam", scheme: str = "ffa"):
    """``f(alpha, r, N, rho, k) -> gamma*`` from the solved invariance condition, equal client weights."""
    inv = sfed_theory.solve_invariance(scheme, regime)
    n = SYM.N
    g = inv.gamma_star.subs({power_sum(m): n ** (1 - m) for m in range(2, 9)})
    return sp.lambdify((SYM.alpha, SYM.r, SYM.N, SYM.rho, SYM.k), g, "numpy")


def _short(v: float) -> str:
    """Compact cell label: 0.25, 16, 4e-3, 2e-8."""
    if 0.01 <= v < 1000:
        return f"{v:.2g}"
    m, e = f"{v:.0e}".split("e")
    return f"{m}e{int(e)}"


def _pow2_ticks(ax: plt.Axes, xs: np.ndarray, ys: np.ndarray) -> None:
    ax.set_xticks(range(len(xs)), [str(int(x)) for x in xs])
    ax.set_yticks(range(len(ys)), [str(int(y)) for y in ys])


def fig_e_moment_heatmap(out_dir: str | Path, *, ranks=(1, 2, 4, 8, 16, 32, 64, 128, 256),
                         ns=(1, 2, 4, 8, 16, 32, 64), rules=("lora", "rslora", "sfed"),
                         regimes=("adam", "sgd"), formats=("png", "pdf")) -> list[Path]:
    """(e) Theory's adapter-output second moment over (N, r), one panel per rule and regime."""
    style.apply()
    ranks, ns = np.asarray(ranks), np.asarray(ns)
    grids = {(reg, rule): moment_grid(rule, ranks, ns, regime=reg) for reg in regimes for rule in rules}
    span = 4.0  # colour range 1e-4 .. 1e4 (values beyond it are clipped and printed in the cell)
    norm = LogNorm(vmin=10 ** -span, vmax=10 ** span, clip=True)
    fig, axes = plt.subplots(len(regimes), len(rules), figsize=(style.PAGE_W, 2.05 * len(regimes) + 0.25),
                             squeeze=False, sharex=True, sharey=True, constrained_layout=True)
    im = None
    for i, reg in enumerate(regimes):
        for j, rule in enumerate(rules):
            ax = axes[i, j]
            g = grids[(reg, rule)]
            im = ax.imshow(g, origin="lower", cmap="RdBu_r", norm=norm, aspect="auto")
            lg = np.log10(g)
            if lg.min() < 0 < lg.max():
                ax.contour(lg, levels=[0.0], colors="k", linewidths=0.9)
            for (a, b), v in np.ndenumerate(g):
                if a % 2 == 0 and b % 2 == 0:  # every other cell, so the numbers stay legible
                    ax.text(b, a, _short(v), ha="center", va="center", fontsize=5.5,
                            color="white" if abs(np.log10(v)) > 0.55 * span else "black")
            _pow2_ticks(ax, ranks, ns)
            ax.grid(False)
            regime_text = "Adam/sign-like" if reg == "adam" else "SGD"
            ax.set_title(f"{style.rule_label(rule)} — {regime_text}")
            if i == len(regimes) - 1:
                ax.set_xlabel("rank r")
            if j == 0:
                ax.set_ylabel("clients N")
    cb = fig.colorbar(im, ax=axes, shrink=0.9, pad=0.01, extend="both")
    cb.set_label(r"$\mathbb{E}\|y\|^2/d$ / target  (target: r = N = 1, $\gamma=\alpha$)")
    fig.suptitle(r"Theory: adapter output moment after one round (FFA-LoRA, $\rho=0$, $d=k=384$); "
                 r"black line: moment = target", fontsize=8)
    return style.save(fig, out_dir, "fig_e_moment_heatmap", formats)


def fig_f_rho(out_dir: str | Path, *, ns=(2, 4, 16, 64), rank: int = 64, moment_n: int = 16,
              alpha: float = DEFAULTS["alpha"], k: int = DEFAULTS["k"], formats=("png", "pdf")) -> list[Path]:
    """(f) Client correlation rho: the optimal gamma (Adam and SGD regimes) and the moment per rule."""
    style.apply()
    rho = np.linspace(0.0, 1.0, 101)
    fig, axes = plt.subplots(1, 3, figsize=(style.PAGE_W, 2.35), constrained_layout=True)
    colors = plt.cm.viridis(np.linspace(0.0, 0.85, len(ns)))
    g_adam = gamma_star_fn("adam")
    g_sgd = gamma_star_fn("sgd")
    rs_scale = alpha / np.sqrt(rank)  # rsLoRA's gamma: the N = 1 / rho = 1 solution

    ax = axes[0]
    for n, c in zip(ns, colors):
        ax.plot(rho, g_adam(alpha, rank, n, rho, k) / rs_scale, color=c, label=f"N={n}")
        ax.axhline(sfed_theory.scaling_factor("sfed", alpha, rank, n) / rs_scale, color=c, ls=":", lw=0.9)
        pts = rho[::20]
        ax.plot(pts, [sfed_theory.scaling_factor("sfed-general", alpha, rank, n, rho=float(p)) / rs_scale
                      for p in pts], "o", color=c, ms=3, mfc="none")
    ax.axhline(1.0, color=style.RULE_COLORS["rslora"], ls="--", lw=0.9)
    ax.set_yscale("log", base=2)
    ax.set_xlabel(r"client correlation $\rho$")
    ax.set_ylabel(r"$\gamma^\ast / (\alpha/\sqrt{r})$")
    ax.set_title(r"Adam: $\gamma^\ast=\alpha\sqrt{N_\mathrm{eff}/r}$")
    from matplotlib.lines import Line2D

    proxies = [Line2D([], [], color="0.3", label=r"solved $\gamma^\ast$ (sympy)"),
               Line2D([], [], color="0.3", ls="", marker="o", mfc="none", ms=3, label="rule 'sfed-general'"),
               Line2D([], [], color="0.3", ls=":", label=r"SFed $\sqrt{N}$ (no $\rho$)"),
               Line2D([], [], color=style.RULE_COLORS["rslora"], ls="--", label="rsLoRA")]
    ax.legend(handles=proxies, loc="upper right", frameon=False, fontsize=6, handlelength=1.6)

    ax = axes[1]
    for n, c in zip(ns, colors):
        ax.plot(rho, g_sgd(alpha, rank, n, rho, k) / g_sgd(alpha, rank, 1, rho, k), color=c, label=f"N={n}")
        ax.axhline(np.sqrt(n), color=c, ls=":", lw=0.9)
    ax.set_yscale("log", base=2)
    ax.set_xlabel(r"client correlation $\rho$")
    ax.set_ylabel(r"$\gamma^\ast(N) / \gamma^\ast(N{=}1)$")
    ax.set_title(r"SGD: $\gamma^\ast \propto N_\mathrm{eff}^{1/4}$ (dotted: $\sqrt{N}$)")
    ax.legend(loc="upper right", frameon=False, fontsize=6, ncol=2, columnspacing=0.8)

    ax = axes[2]
    at = 35  # rho index where the lines are labelled
    for rule in ("lora", "rslora", "sfed", "sfed-general"):
        vals = np.array([moment_ratio(rule, rank, moment_n, rho=float(p), alpha=alpha, k=k) for p in rho])
        ax.plot(rho, vals, color=style.RULE_COLORS[rule], ls="--" if rule == "sfed-general" else "-")
        above = rule != "rslora"
        ax.annotate(style.rule_label(rule), (rho[at], vals[at]), xytext=(0, 4 if above else -4),
                    textcoords="offset points", ha="center", va="bottom" if above else "top",
                    color=style.RULE_COLORS[rule], fontsize=6.5)
    ax.set_yscale("log")
    ax.set_xlabel(r"client correlation $\rho$")
    ax.set_ylabel(r"$\mathbb{E}\|y\|^2/d$ rel. to target")
    ax.set_title(f"Adam, N={moment_n}, r={rank}")
    for ax in axes:
        ax.set_xlim(0, 1)
    fig.suptitle(r"Theory: effect of client correlation (heterogeneity) $\rho$ on the optimal scaling "
                 r"factor (FFA-LoRA, r=%d, k=%d)" % (rank, k), fontsize=8)
    return style.save(fig, out_dir, "fig_f_rho_gamma", formats)
