"""Issue 6: the norm check on real training and the multi-round convergence study, with figures.

Two experiments, each a grid file ``paper_figures/grids/<set>_<experiment>.json`` in the
:class:`validation.config.GridConfig` format plus these keys (popped before the GridConfig is built):

* ``partitions``: list of client splits (``"iid"``, ``"dirichlet"``), an extra grid axis.
* ``oracle``: how ``sfed-general``'s configured rho (``RunConfig.rho``) is obtained. The "oracle" rho
  of a (split, N) cell is the round-1 ``rho_ratio`` (layer ``__all__``: the ratio estimator of
  :func:`validation.adaptive.estimate_rho` over all layers' increments) of a PILOT run of the same
  task with rule ``oracle.rule`` at rank ``oracle.rank``, one round, averaged over ``oracle.seeds``.
  It is measured once by :func:`oracle_rho` and cached in ``<work>/oracle_rho.json``; it is an
  oracle only in the sense that it is measured on the same task before the run, not known a priori.
  N = 1 gets rho = 0 (N_eff = 1 whatever rho is).
* ``dedupe_n1``: if true, at N = 1 only ``lora`` and ``rslora`` are run: ``sfed``, ``sfed-general``
  and ``sfed-adaptive`` give ``gamma = alpha/sqrt(r)`` there (N_eff = 1; the adaptive rule never
  updates with one client), i.e. exactly the rsLoRA run. Tables and figures then show the N = 1
  rsLoRA result for those rules, marked ``from_rslora``.

Commands (resumable; one Parquet file per run under the work folder)::

    python -m paper_figures.convergence_figs run normcheck --set cpu --work runs/normcheck
    python -m paper_figures.convergence_figs run convergence --set cpu --work runs/convergence
    python -m paper_figures.convergence_figs collect <experiment> --work ... [--results results]
    python -m paper_figures.convergence_figs report  [--results results]
    python -m paper_figures.convergence_figs figures [--results results] [--out figures]

A second worker may share a work folder from the other end of the run list (``SFED_REVERSE=1``;
a cell finished by one is skipped by the other at its start, writes are atomic). ``SFED_THREADS``
sets torch's threads per worker (default 1).

``collect`` writes ``results/<experiment>.parquet`` and an entry in ``results/manifest_issue6.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["GRID_DIR", "load_spec", "oracle_rho", "build_runs", "run_experiment", "collect", "normcheck_fits", "fig_normcheck",
           "convergence_table", "fig_convergence", "draw_all", "main", "FAMILY_N1"]

GRID_DIR = Path(__file__).resolve().parent / "grids"
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = ROOT / "results"
MANIFEST = "manifest_issue6.json"
EXPERIMENTS = ("normcheck", "convergence", "gradient_check", "gradient_check_sgd")
RULES5 = ("lora", "rslora", "sfed", "sfed-general", "sfed-adaptive")
FAMILY_N1 = ("sfed", "sfed-general", "sfed-adaptive")  # identical to rslora at N = 1
RULE_COLORS = {"lora": "#D55E00", "rslora": "#0072B2", "sfed": "#009E73", "sfed-general": "#CC79A7",
               "sfed-adaptive": "#E69F00"}
RULE_LABELS = {"lora": r"LoRA $\alpha/r$", "rslora": r"rsLoRA $\alpha/\sqrt{r}$", "sfed": r"SFed $\alpha\sqrt{N/r}$",
               "sfed-general": r"SFed-gen. (oracle $\rho$)", "sfed-adaptive": r"SFed-adaptive ($\hat\rho$)"}


# ------------------------------------------------------------------------------------------------
# grids
# ------------------------------------------------------------------------------------------------
def grid_path(experiment: str, grid_set: str = "cpu") -> Path:
    if experiment not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {experiment!r}; allowed: {', '.join(EXPERIMENTS)}")
    return GRID_DIR / f"{grid_set}_{experiment}.json"


def load_spec(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """(GridConfig, extras) from a grid file with the extra keys described in the module docstring."""
    from validation.config import GridConfig

    d = json.loads(Path(path).read_text())
    extras = {k: d.pop(k) for k in ("partitions", "oracle", "dedupe_n1", "target_loss_frac") if k in d}
    d = {k: v for k, v in d.items() if not k.startswith("_")}
    return GridConfig.from_dict(d), extras


def oracle_rho(base, partitions: list[str], ns: list[int], oracle: dict[str, Any], work: Path) -> dict[str, float]:
    """``{"<split>/<N>": rho}`` measured by pilot runs (cached in ``work/oracle_rho.json``)."""
    from validation.federated import run
    from validation.metrics import ALL

    cache = work / "oracle_rho.json"
    have = json.loads(cache.read_text()) if cache.is_file() else {}
    rule, rank, seeds = oracle.get("rule", "rslora"), int(oracle.get("rank", 16)), list(oracle.get("seeds", [0]))
    changed = False
    for part in partitions:
        for n in ns:
            key = f"{part}/{n}"
            if key in have or n == 1:
                continue
            vals = []
            for s in seeds:
                cfg = dataclasses.replace(base, partition=part, n_clients=n, participating=None, rank=rank, rule=rule,
                                          rho=0.0, rounds=1, seed=s)
                df = run(cfg)
                vals.append(float(df.loc[(df.layer == ALL) & (df["round"] == 1), "rho_ratio"].iloc[0]))
            have[key] = float(min(1.0, max(0.0, np.mean(vals))))
            have[key + "/pilot"] = {"rule": rule, "rank": rank, "seeds": seeds, "rho_ratio": vals}
            changed = True
    if changed:
        work.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(have, indent=1, sort_keys=True))
    return {k: v for k, v in have.items() if not k.endswith("/pilot")}


def build_runs(grid, extras: dict[str, Any], work: Path) -> list:
    """Every RunConfig of the experiment (oracle rho filled in, N = 1 deduped if asked)."""
    parts = list(extras.get("partitions", [grid.base.partition]))
    dedupe = bool(extras.get("dedupe_n1", False))
    rhos = {}
    if "sfed-general" in grid.rules:
        rhos = oracle_rho(grid.base, parts, [n for n in grid.n_clients if n > 1], extras.get("oracle", {}), work)
    out = []
    for part in parts:
        g = dataclasses.replace(grid, base=dataclasses.replace(grid.base, partition=part))
        for c in g.runs():
            if dedupe and c.n_clients == 1 and c.rule in FAMILY_N1:
                continue
            if c.rule == "sfed-general" and c.n_clients > 1:
                c = dataclasses.replace(c, rho=rhos[f"{part}/{c.n_clients}"])
            out.append(c)
    # cheapest first within a seed, seeds outermost (a cut-short grid still has whole seeds)
    out.sort(key=lambda c: (c.seed, c.n_clients, c.partition, c.rank, RULES5.index(c.rule)))
    return out


def run_experiment(experiment: str, grid_set: str, work: Path, threads: int | None = None) -> None:
    """Run (resume) every cell of the grid in ``work``; ``threads``: torch threads (default
    ``$SFED_THREADS`` or 1, for two workers sharing a folder)."""
    import torch

    from validation.grid import run_grid

    torch.set_num_threads(threads or int(__import__("os").environ.get("SFED_THREADS", "1")))
    grid, extras = load_spec(grid_path(experiment, grid_set))
    cfgs = build_runs(grid, extras, work)
    if __import__("os").environ.get("SFED_REVERSE"):  # a second worker on the same folder, from the other end
        cfgs = cfgs[::-1]
    t0 = time.perf_counter()
    written, skipped, failed = 0, 0, {}
    for i, c in enumerate(cfgs):  # one cell at a time: completeness is re-checked just before each run
        res = run_grid([c], work, resume=True, progress=False)
        written += len(res.written)
        skipped += len(res.skipped)
        failed.update(res.failed)
        if res.written:
            print(f"[{time.perf_counter() - t0:6.0f} s] {i + 1}/{len(cfgs)} {c.rule} {c.partition} N={c.n_clients} "
                  f"r={c.rank} seed={c.seed}", flush=True)
    print(f"{experiment}: {len(cfgs)} runs, written {written}, skipped {skipped}, failed {len(failed)}, "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    for k, v in failed.items():
        print("FAILED", k, v)


def collect(experiment: str, grid_set: str, work: Path, results: Path = DEFAULT_RESULTS,
            wall_s: float | None = None) -> Path:
    """Consolidate the work folder into ``results/<experiment>.parquet`` + manifest entry."""
    from validation.grid import load_results

    df = load_results(work)
    if df.empty:
        raise ValueError(f"no finished runs under {work}")
    grid, extras = load_spec(grid_path(experiment, grid_set))
    expected = {c.run_id for c in build_runs(grid, extras, work)}
    df = df[df.run_id.isin(expected)]
    results.mkdir(parents=True, exist_ok=True)
    out = results / f"{experiment}.parquet"
    df.to_parquet(out, index=False)
    man_p = results / MANIFEST
    man = json.loads(man_p.read_text()) if man_p.is_file() else {}
    oracle_p = work / "oracle_rho.json"
    man[experiment] = {
        "file": out.name, "grid_file": str(grid_path(experiment, grid_set).relative_to(ROOT)),
        "runs_expected": len(expected), "runs_found": int(df.run_id.nunique()),
        "sum_run_wall_s": float(df.groupby("run_id")["wall_s"].first().sum()),
        "oracle_rho": json.loads(oracle_p.read_text()) if oracle_p.is_file() else None,
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "git": _git_pin(),
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if wall_s is not None:
        man[experiment]["wall_s"] = wall_s
    man_p.write_text(json.dumps(man, indent=1, sort_keys=True, default=str))
    return out


def _git_pin() -> dict[str, Any]:
    try:
        from paper_figures.experiments import harness_pin

        pin = harness_pin()
        return {"commit": pin["commit"], "harness_clean": pin["clean"], "modified": pin["modified"]}
    except Exception as e:  # no git: say so
        return {"commit": "unknown", "error": str(e)}


# ------------------------------------------------------------------------------------------------
# analysis
# ------------------------------------------------------------------------------------------------
def _expand_n1(df: pd.DataFrame) -> pd.DataFrame:
    """Add the N = 1 rows of the sfed family as copies of rsLoRA's (deduped grids), marked."""
    df = df.copy()
    df["from_rslora"] = False
    n1 = df[(df.n_clients == 1)]
    have = set(n1.rule.unique())
    extra = []
    base = n1[n1.rule == "rslora"]
    for rule in FAMILY_N1:
        if rule not in have and rule in set(df.rule) and len(base):
            e = base.copy()
            e["rule"] = rule
            e["from_rslora"] = True
            extra.append(e)
    return pd.concat([df] + extra, ignore_index=True) if extra else df


def normcheck_fits(df: pd.DataFrame, *, rounds: tuple[int, ...] | None = None, n_boot: int = 1000) -> pd.DataFrame:
    """Log-log slopes of the aggregated update norm (``update_fro``) vs N and vs r, per rule, split
    and round, with a bootstrap CI (seeds x layers), beside ``predicted_exponent`` at rho = 0 and at
    the measured rho. Measured rho = mean clipped ``rho_ratio`` (layer ``__all__``, runs with N > 1)
    of the fit's points. The adaptive rule is predicted in round 1 as SFed (its gamma there, prior
    rho = 0) and in later rounds as sfed-general at the measured rho: the gamma its smoothed
    estimate converges to (after one update with EMA 0.5 it is only about half-way there)."""
    import warnings

    from validation.analysis import fit_exponents

    df = _expand_n1(df)
    rounds = rounds or tuple(sorted(df["round"].unique()))
    out = []
    for part, g in df.groupby("partition"):
        for rnd in rounds:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                f = fit_exponents(g, round=rnd, n_boot=n_boot, rho_column="rho_ratio")
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
    res["agrees_rho_hat"] = (res.ci_low - 0.05 <= res.predicted_rho_hat) & (res.predicted_rho_hat <= res.ci_high + 0.05)
    return res


def target_loss(df: pd.DataFrame, frac: float) -> float:
    """Target eval loss: ``frac`` x the mean round-1 starting probe loss (the untrained model's loss)."""
    a = df[(df.layer == "__all__") & (df["round"] == 1)]
    return float(frac * a["probe_loss_start"].mean())


def convergence_table(df: pd.DataFrame, frac: float = 0.75) -> pd.DataFrame:
    """Per (partition, rule, N, rank): final/best eval accuracy and loss (seed mean), rounds to reach
    the target loss (seed mean over the seeds that reach it; ``reached`` counts them), seed std of
    the final accuracy/loss, divergences."""
    df = _expand_n1(df)
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
    df = _expand_n1(df)
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
                "predicted_rho0", "predicted_rho_hat", "agrees_rho_hat"]
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
    for name in ("run", "collect"):
        p = sub.add_parser(name)
        p.add_argument("experiment", choices=EXPERIMENTS)
        p.add_argument("--set", default="cpu", choices=("cpu", "gpu"))
        p.add_argument("--work", type=Path, required=True)
        p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
        p.add_argument("--wall-s", type=float)
    p = sub.add_parser("report")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    p = sub.add_parser("figures")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--out", type=Path, default=ROOT / "figures")
    p.add_argument("--no-docs", action="store_true")
    ns = ap.parse_args(argv)
    if ns.cmd == "run":
        run_experiment(ns.experiment, ns.set, ns.work)
    elif ns.cmd == "collect":
        print(collect(ns.experiment, ns.set, ns.work, ns.results, ns.wall_s))
    elif ns.cmd == "report":
        print(report(ns.results))
    else:
        for p_ in draw_all(ns.results, ns.out, docs=not ns.no_docs):
            print(p_)
    return 0


if __name__ == "__main__":
    sys.exit(main())
