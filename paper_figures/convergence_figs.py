"""The convergence study and the update-norm check: tables and figures (g) and (h).

Both experiments are run and stored by :mod:`paper_figures.experiments` (grid files
``paper_figures/grids/<set>_convergence.json`` / ``<set>_normcheck.json``, extra axes in
:mod:`paper_figures.specs`); this module only reads their stored results::

    python -m paper_figures.convergence_figs report  [--results results]
    python -m paper_figures.convergence_figs figures [--results results] [--out figures]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from paper_figures.provenance import ROOT
from paper_figures.specs import RULE_ORDER as RULES5
from paper_figures.specs import expand_n1

__all__ = ["normcheck_fits", "fig_normcheck", "convergence_table", "fig_convergence", "draw_all", "report", "main",
           "RULE_COLORS", "RULE_LABELS"]

DEFAULT_RESULTS = ROOT / "results"
RULE_COLORS = {"lora": "#D55E00", "rslora": "#0072B2", "sfed": "#009E73", "sfed-general": "#CC79A7",
               "sfed-adaptive": "#E69F00"}
RULE_LABELS = {"lora": r"LoRA $\alpha/r$", "rslora": r"rsLoRA $\alpha/\sqrt{r}$", "sfed": r"SFed $\alpha\sqrt{N/r}$",
               "sfed-general": r"SFed-gen. (oracle $\rho$)", "sfed-adaptive": r"SFed-adaptive ($\hat\rho$)"}


# ------------------------------------------------------------------------------------------------
# analysis
# ------------------------------------------------------------------------------------------------
def normcheck_fits(df: pd.DataFrame, *, rounds: tuple[int, ...] | None = None, n_boot: int = 1000) -> pd.DataFrame:
    """Log-log slopes of the aggregated update norm (``update_fro``) vs N and vs r, per rule, split
    and round, with a bootstrap CI (seeds x layers), beside ``predicted_exponent`` at rho = 0 and at
    the measured rho. Measured rho = mean clipped ``rho_ratio`` (layer ``__all__``, runs with N > 1)
    of the fit's points. The adaptive rule is predicted in round 1 as SFed (its gamma there, prior
    rho = 0) and in later rounds as sfed-general at the measured rho: the gamma its smoothed
    estimate converges to (after one update with EMA 0.5 it is only about half-way there)."""
    import warnings

    from validation.analysis import fit_exponents

    df = expand_n1(df)
    rounds = rounds or tuple(sorted(df["round"].unique()))
    out = []
    for part, g in df.groupby("partition"):
        for rnd in rounds:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                f = fit_exponents(g, round=rnd, n_boot=n_boot, rho_column="rho_ratio", refined=False)
            f = f[f.quantity == "update_fro"].copy()
            if rnd == 1:  # round 1: the adaptive rule still has its prior (rho = 0), i.e. SFed's gamma
                sf = f[f.rule == "sfed"].set_index(["wrt", "fixed"])["predicted_rho_hat"]
                ad = f.rule == "sfed-adaptive"
                f.loc[ad, "predicted_rho_hat"] = [sf.get((w, x), np.nan) for w, x in zip(f.loc[ad, "wrt"],
                                                                                          f.loc[ad, "fixed"])]
            f["partition"] = part
            f["round"] = rnd
            out.append(f)
    res = pd.concat(out, ignore_index=True)
    pred = res.predicted_rho_hat  # recomputed for the adaptive rule in round 1 above
    res["in_ci_rho_hat"] = (res.ci_low <= pred) & (pred <= res.ci_high)
    res["agrees_rho_hat"] = (pred - res.measured).abs() <= 0.05
    return res


def target_loss(df: pd.DataFrame, frac: float) -> float:
    """Target eval loss: ``frac`` x the mean round-1 starting probe loss (the untrained model's loss)."""
    a = df[(df.layer == "__all__") & (df["round"] == 1)]
    return float(frac * a["probe_loss_start"].mean())


def convergence_table(df: pd.DataFrame, frac: float = 0.75) -> pd.DataFrame:
    """Per (partition, rule, N, rank): final/best eval accuracy and loss (seed mean), rounds to reach
    the target loss (seed mean over the seeds that reach it; ``reached`` counts them), seed std of
    the final accuracy/loss, divergences."""
    df = expand_n1(df)
    a = df[df.layer == "__all__"]
    tgt = target_loss(df, frac)
    per_run = []
    for rid, g in a.groupby(["run_id", "rule"]):
        g = g.sort_values("round")
        ok = g[np.isfinite(g.eval_loss.astype(float))]
        hit = ok[ok.eval_loss <= tgt]
        r0 = g.iloc[0]
        per_run.append({"partition": r0.partition, "rule": r0.rule, "n_clients": r0.n_clients, "rank": r0["rank"],
                        "seed": r0.seed, "from_rslora": bool(r0.from_rslora),
                        "diverged": bool(g.diverged.iloc[0]), "rounds": int(g["round"].max()),
                        "final_acc": float(ok.eval_acc.iloc[-1]) if len(ok) else np.nan,
                        "final_loss": float(ok.eval_loss.iloc[-1]) if len(ok) else np.nan,
                        "best_acc": float(ok.eval_acc.max()) if len(ok) else np.nan,
                        "best_loss": float(ok.eval_loss.min()) if len(ok) else np.nan,
                        "rounds_to_target": float(hit["round"].iloc[0]) if len(hit) else np.nan,
                        "gamma_last": float(g.gamma.iloc[-1])})
    pr = pd.DataFrame(per_run)
    keys = ["partition", "rule", "n_clients", "rank"]
    t = pr.groupby(keys).agg(
        seeds=("seed", "nunique"), final_acc=("final_acc", "mean"), final_acc_std=("final_acc", "std"),
        best_acc=("best_acc", "mean"), final_loss=("final_loss", "mean"), final_loss_std=("final_loss", "std"),
        best_loss=("best_loss", "mean"), rounds_to_target=("rounds_to_target", "mean"),
        reached=("rounds_to_target", lambda s: int(np.isfinite(s).sum())), divergences=("diverged", "sum"),
        gamma_last=("gamma_last", "mean"), from_rslora=("from_rslora", "all")).reset_index()
    t["target_loss"] = tgt
    return t


# ------------------------------------------------------------------------------------------------
# figures
# ------------------------------------------------------------------------------------------------
def fig_convergence(df: pd.DataFrame, out: Path, formats=("png", "pdf"), frac: float = 0.75) -> list[Path]:
    """Top row: final eval accuracy vs rank, one panel per rule, one line per N (mean +- seed std).
    Bottom row: eval loss per round at the highest rank, one panel per N, one line per rule."""
    from paper_figures import style

    import matplotlib.pyplot as plt

    style.apply()
    df = expand_n1(df)
    t = convergence_table(df, frac)
    ns = sorted(t.n_clients.unique())
    ranks = sorted(t["rank"].unique())
    rules = [r for r in RULES5 if r in set(t.rule)]
    fig = plt.figure(figsize=(style.PAGE_W, 4.6))
    gs = fig.add_gridspec(2, max(len(rules), len(ns)))
    n_cmap = plt.get_cmap("viridis")
    ncol = {n: n_cmap(i / max(1, len(ns) - 1) * 0.85) for i, n in enumerate(ns)}
    top = None
    for j, rule in enumerate(rules):
        ax = fig.add_subplot(gs[0, j], sharey=top)
        top = top or ax
        for n in ns:
            s = t[(t.rule == rule) & (t.n_clients == n)].sort_values("rank")
            if s.empty:
                continue
            ax.errorbar(s["rank"], s.final_acc, yerr=s.final_acc_std.fillna(0), color=ncol[n], marker="o",
                        capsize=2, label=f"N={n}", ls="--" if s.from_rslora.all() else "-")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks)
        ax.set_xticklabels([str(r) for r in ranks])
        ax.set_title(RULE_LABELS.get(rule, rule), fontsize=7)
        ax.set_xlabel("rank r")
        if j == 0:
            ax.set_ylabel("final eval accuracy")
            ax.legend(loc="best", fontsize=6)
        else:
            plt.setp(ax.get_yticklabels(), visible=False)
    a = df[df.layer == "__all__"]
    rmax = max(ranks)
    tgt = target_loss(df, frac)
    left = None
    for j, n in enumerate(ns):
        ax = fig.add_subplot(gs[1, j], sharey=left)
        left = left or ax
        for rule in rules:
            s = a[(a.rule == rule) & (a.n_clients == n) & (a["rank"] == rmax)]
            if s.empty:
                continue
            m = s.groupby("round").eval_loss.agg(["mean", "min", "max"]).reset_index()
            ax.plot(m["round"], m["mean"], color=RULE_COLORS[rule], marker="o", label=RULE_LABELS.get(rule, rule),
                    ls="--" if s.from_rslora.all() else "-")
            ax.fill_between(m["round"], m["min"], m["max"], color=RULE_COLORS[rule], alpha=0.15, lw=0)
        ax.axhline(tgt, color="0.4", lw=0.7, ls=":")
        ax.set_title(f"N={n}, r={rmax}", fontsize=7)
        ax.set_xlabel("round")
        if j == 0:
            ax.set_ylabel("eval loss (mean, seed range)")
        else:
            plt.setp(ax.get_yticklabels(), visible=False)
    handles, labels = [], []
    for ax in fig.axes[len(rules):]:
        for h, l_ in zip(*ax.get_legend_handles_labels()):
            if l_ not in labels:
                handles.append(h)
                labels.append(l_)
    fig.legend(handles, labels, loc="lower right", bbox_to_anchor=(0.99, 0.08), fontsize=6, frameon=True,
               title=f"dotted: target loss {tgt:.2f}", title_fontsize=6)
    part = ",".join(sorted(t.partition.unique()))
    fig.suptitle(f"Federated LoRA (FFA, AdamW) on MiniLM + BBC, {part} split: accuracy vs rank (top) and "
                 f"loss curves at r={rmax} (bottom)", fontsize=8)
    fig.tight_layout()
    return style.save(fig, out, "fig_convergence", formats)


def fig_normcheck(fits: pd.DataFrame, out: Path, formats=("png", "pdf")) -> list[Path]:
    """Measured slope (95% CI) vs predicted slope at the measured rho, per rule, split and wrt."""
    from paper_figures import style

    import matplotlib.pyplot as plt

    style.apply()
    rnd = int(fits["round"].max())
    f = fits[fits["round"] == rnd]
    parts = sorted(f.partition.unique())
    fig, axes = plt.subplots(len(parts), 2, figsize=(style.PAGE_W, 2.2 * len(parts)), squeeze=False, sharey="col")
    for i, part in enumerate(parts):
        for j, wrt in enumerate(("n_clients", "rank")):
            ax = axes[i, j]
            g = f[(f.partition == part) & (f.wrt == wrt)].sort_values("fixed_value")
            fixed = sorted(g.fixed_value.unique())
            w = 0.8 / max(1, len(fixed))
            for k, fv in enumerate(fixed):
                for x, rule in enumerate(RULES5):
                    r = g[(g.rule == rule) & (g.fixed_value == fv)]
                    if r.empty:
                        continue
                    r = r.iloc[0]
                    xx = x - 0.4 + w * (k + 0.5)
                    ax.errorbar(xx, r.measured, yerr=[[r.measured - r.ci_low], [r.ci_high - r.measured]],
                                fmt="o", color=RULE_COLORS[rule], ms=3, capsize=1.5)
                    ax.plot(xx, r.predicted_rho_hat, marker="x", color="k", ms=4, ls="none")
            ax.axhline(0, color="0.5", lw=0.6)
            ax.set_xticks(range(len(RULES5)))
            ax.set_xticklabels([r.replace("sfed-", "sfed-\n") for r in RULES5], fontsize=6)
            other = "r" if wrt == "n_clients" else "N"
            ax.set_title(f"{part}: slope of log||dW|| vs log {'N' if wrt == 'n_clients' else 'r'} "
                         f"(groups: {other}={','.join(map(str, fixed))})", fontsize=7)
            if j == 0:
                ax.set_ylabel("log-log slope")
    fig.suptitle(f"Norm check, round {rnd}: measured slope (colour, 95% CI) vs predicted at the measured rho (x; "
                 f"sfed-adaptive: its converged target, sfed-general at the measured rho)", fontsize=8)
    fig.tight_layout()
    return style.save(fig, out, "fig_normcheck", formats)


def draw_all(results: Path = DEFAULT_RESULTS, out: Path = ROOT / "figures", formats=("png", "pdf"),
             docs: bool = True) -> list[Path]:
    paths = []
    conv = results / "convergence.parquet"
    if conv.is_file():
        paths += fig_convergence(pd.read_parquet(conv), out, formats)
        if docs:
            import shutil

            (ROOT / "docs").mkdir(exist_ok=True)
            shutil.copyfile(out / "fig_convergence.png", ROOT / "docs" / "convergence.png")
    nc = results / "normcheck.parquet"
    if nc.is_file():
        paths += fig_normcheck(normcheck_fits(pd.read_parquet(nc), n_boot=400), out, formats)
    return paths


def report(results: Path = DEFAULT_RESULTS, frac: float = 0.75) -> str:
    lines = []
    nc = results / "normcheck.parquet"
    if nc.is_file():
        fits = normcheck_fits(pd.read_parquet(nc))
        cols = ["partition", "round", "wrt", "fixed", "rule", "measured", "ci_low", "ci_high", "rho_hat",
                "predicted_rho0", "predicted_rho_hat", "in_ci_rho_hat", "agrees_rho_hat"]
        lines += ["== norm check: slope of update_fro (__all__) ==",
                  fits[cols].sort_values(["partition", "round", "wrt", "fixed", "rule"]).to_string(
                      index=False, float_format=lambda v: f"{v:+.3f}")]
    conv = results / "convergence.parquet"
    if conv.is_file():
        t = convergence_table(pd.read_parquet(conv), frac)
        lines += ["", f"== convergence (target eval loss {t.target_loss.iloc[0]:.3f} = {frac} x mean initial probe loss) ==",
                  t.drop(columns=["target_loss"]).to_string(index=False, float_format=lambda v: f"{v:.3f}")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m paper_figures.convergence_figs", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("report")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    p = sub.add_parser("figures")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--out", type=Path, default=ROOT / "figures")
    p.add_argument("--no-docs", action="store_true")
    ns = ap.parse_args(argv)
    if ns.cmd == "report":
        print(report(ns.results))
    else:
        for p_ in draw_all(ns.results, ns.out, docs=not ns.no_docs):
            print(p_)
    return 0


if __name__ == "__main__":
    sys.exit(main())
