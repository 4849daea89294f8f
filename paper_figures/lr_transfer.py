"""Learning-rate transfer across N and r: where the tuned learning rate sits for each rule.

Reads the ``lr_transfer`` experiment (one row per run x round x layer; a run = rule, N, r, lr,
seed). For each (rule, N, r) cell the final-round eval loss (seed mean; a diverged run counts as
infinitely bad) is compared across learning rates:

* ``lr_star``: the grid learning rate with the lowest final eval loss; ``lr_star_fit``: the vertex of
  a parabola in log2(lr) through it and its two neighbours (sub-grid resolution; the grid point
  itself when the optimum is at an edge, ``edge = True``).
* ``lr_star_pred``: the theory's transfer from the reference cell (N = 1, r = 16 by default):
  ``lr* ~ 1 / (gamma sqrt(r c_N))`` (:func:`sfed_theory.derivation.lr_transfer_factor`, with the
  pilot's measured client correlation), anchored at the reference cell's measured ``lr_star_fit``.
* ``lr_star_refined``: the same transfer in the refined model (``adam-refined``), whose input-coherent
  share ``f_in`` (and its gradient-aligned part ``phi``) were estimated on the gradient check's pilot runs
  (N <= 4, one round; ``results/gradient_check_refined_params.csv``), before this sweep: its B increment
  adds coherently over the rank, so the optimum falls faster in r than the canonical ``1 / sqrt(r)``.
* ``lr_star_coherent``: the refined model's fully coherent limit (``f_in = 1, phi = 0``: every client's B
  increment along its own input direction): ``gamma lr* ~ sqrt(N_eff) / r``. Picked after the sweep showed
  the optimum falling about as ``1 / r``; a limit of the derived model, not a prediction of this sweep.
* ``product_table``: ``gamma lr*`` per cell and rule, and its spread across the rules (with A frozen and
  Adam, gamma and lr enter the first steps only as their product, so a rule can only move the optimum).
* ``rank_exponents``: the measured ``beta`` in ``gamma lr* ~ r^-beta`` per rule and N (canonical 1/2; the
  fully coherent limit of the refined model 1). Descriptive: fitted to the optima it describes.
* drift: ``log2`` range of ``lr_star_fit`` across N (per r) and across r (per N), in grid steps (the
  grid is spaced by 2x, so one step = a factor 2).
* transfer regret (in accuracy, so tuned by accuracy): ``best_acc``, the final eval accuracy at the cell's
  own most accurate learning rate; ``transfer_acc``, at the learning rate that was most accurate at the
  reference cell; ``regret = best_acc - transfer_acc >= 0``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from paper_figures.specs import expand_n1

__all__ = ["REFERENCE", "COHERENT_LIMIT", "final_rows", "lr_curves", "optimum_table", "drift_table", "transfer_table",
           "fig_lr_transfer", "report", "most_accurate", "coherent_share", "rank_exponents", "prediction_errors", "product_table"]

REFERENCE = (1, 16)  # (N, r) where the learning rate is tuned once
REFINED_PARAMS = Path(__file__).resolve().parents[1] / "results" / "gradient_check_refined_params.csv"
COHERENT_LIMIT = {"f_in": 1.0, "phi": 0.0}
_MODELS = (("steps_off", "canonical"), ("steps_off_refined", "refined, f_in from the gradient check (prediction)"),
           ("steps_off_coherent", "coherent limit f_in = 1 (picked after the data)"))


def coherent_share(path: Path | str = REFINED_PARAMS, scheme: str = "ffa", partition: str = "dirichlet") -> dict:
    """``{"f_in", "phi", "nu", "k"}`` of the refined model's adapter-output fit on the gradient check's pilot (N <= 4)
    and its measured probe input bulk, the parameters :func:`optimum_table` transfers with; ``{}`` when that
    table is absent."""
    path = Path(path)
    if not path.is_file():
        return {}
    t = pd.read_csv(path)
    row = t[(t.scheme == scheme) & (t.partition == partition) & (t.quantities == "adapter_output")]
    if row.empty:
        raise ValueError(f"{path} has no adapter_output fit for {scheme}/{partition}")
    nu = float(row.nu.iloc[0]) if "nu" in row else 0.0  # tables written before the input bulk: one probe vector
    return {"f_in": float(row.f_in.iloc[0]), "phi": float(row.phi.iloc[0]), "nu": nu, "k": int(row.k.iloc[0])}


def final_rows(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run: its config, final-round eval loss/accuracy (inf / 0 when it diverged)."""
    a = expand_n1(df[df["layer"] == "__all__"])
    last = a.sort_values("round").groupby(["run_id", "rule"]).tail(1)  # N = 1 copies share a run id
    out = last[["run_id", "rule", "n_clients", "rank", "lr", "seed", "gamma", "round", "diverged", "from_rslora",
                "eval_loss", "eval_acc", "train_loss"]].copy()
    bad = out["diverged"].astype(bool) | ~np.isfinite(out["eval_loss"].astype(float))
    out.loc[bad, "eval_loss"] = np.inf
    out.loc[bad, "eval_acc"] = 0.0
    return out


def lr_curves(df: pd.DataFrame) -> pd.DataFrame:
    """Seed-mean final eval loss and accuracy per (rule, N, r, lr), with the seed range."""
    f = final_rows(df)
    g = f.groupby(["rule", "n_clients", "rank", "lr"])
    return g.agg(eval_loss=("eval_loss", "mean"), loss_min=("eval_loss", "min"), loss_max=("eval_loss", "max"),
                 eval_acc=("eval_acc", "mean"), acc_min=("eval_acc", "min"), acc_max=("eval_acc", "max"),
                 seeds=("seed", "nunique"), diverged=("diverged", "sum"), gamma=("gamma", "first"),
                 from_rslora=("from_rslora", "all")).reset_index()


def _vertex(lrs: np.ndarray, loss: np.ndarray, i: int) -> tuple[float, bool]:
    """log-parabola vertex through point i and its neighbours (the point itself at an edge)."""
    if i == 0 or i == len(lrs) - 1 or not np.isfinite(loss[i - 1:i + 2]).all():
        return float(lrs[i]), i in (0, len(lrs) - 1)
    x = np.log2(lrs[i - 1:i + 2])
    a, b, _ = np.polyfit(x, loss[i - 1:i + 2], 2)
    if a <= 0:
        return float(lrs[i]), False
    return float(2 ** np.clip(-b / (2 * a), x[0], x[2])), False


def optimum_table(df: pd.DataFrame, rho: dict[int, float] | None = None, reference: tuple[int, int] = REFERENCE,
                  alpha: float | None = None, refined: dict | None = None) -> pd.DataFrame:
    """Per (rule, N, r): measured and predicted optimal learning rate, best accuracy (module docstring).

    ``rho``: the measured client correlation per N for the prediction (default 0). ``refined``: ``f_in``
    and ``phi`` for the refined model's prediction (default :func:`coherent_share`; ``{}``: none)."""
    from sfed_theory.derivation import lr_transfer_factor

    c = lr_curves(df)
    alpha = alpha if alpha is not None else float(df["alpha"].iloc[0])
    rows = []
    for (rule, n, r), g in c.groupby(["rule", "n_clients", "rank"]):
        g = g.sort_values("lr")
        lrs, loss = g["lr"].to_numpy(float), g["eval_loss"].to_numpy(float)
        i = int(np.argmin(loss))
        fit, edge = _vertex(lrs, loss, i)
        rows.append({"rule": rule, "n_clients": n, "rank": r, "lr_star": lrs[i], "lr_star_fit": fit, "edge": edge,
                     "best_loss": loss[i], "best_acc": float(g["eval_acc"].iloc[i]), "gamma": float(g["gamma"].iloc[0]),
                     "from_rslora": bool(g["from_rslora"].all())})
    t = pd.DataFrame(rows)
    rho = rho or {}
    n0, r0 = reference
    refined = coherent_share() if refined is None else refined
    models = {"lr_star_pred": {}, **({"lr_star_refined": {"regime": "adam-refined", **refined}} if refined else {}),
              "lr_star_coherent": {"regime": "adam-refined", **COHERENT_LIMIT}}
    for col, kw in models.items():
        preds = []
        for row in t.itertuples():
            ref = t[(t.rule == row.rule) & (t.n_clients == n0) & (t["rank"] == r0)]
            if ref.empty:
                preds.append(math.nan)
                continue
            factor = lr_transfer_factor(row.rule, alpha, (r0, n0), (int(row.rank), int(row.n_clients)),
                                        rho=rho.get(int(row.n_clients), 0.0), **kw)
            preds.append(float(ref["lr_star_fit"].iloc[0]) * factor)
        t[col] = preds
    t["steps_off"] = np.log2(t["lr_star_fit"] / t["lr_star_pred"])
    if refined:
        t["steps_off_refined"] = np.log2(t["lr_star_fit"] / t["lr_star_refined"])
    t["steps_off_coherent"] = np.log2(t["lr_star_fit"] / t["lr_star_coherent"])
    return t


def product_table(opt: pd.DataFrame) -> pd.DataFrame:
    """``gamma lr*_fit`` per (N, r) (columns: rules) and its log2 spread across the rules, in grid steps."""
    t = opt.assign(product=opt.gamma * opt.lr_star_fit).pivot_table(index=["n_clients", "rank"], columns="rule",
                                                                        values="product")
    t["spread_steps"] = np.log2(t.max(axis=1) / t.min(axis=1))
    return t.reset_index()


def rank_exponents(opt: pd.DataFrame) -> pd.DataFrame:
    """Per rule and N: ``beta`` in ``gamma lr*_fit ~ r^-beta`` (least squares over the ranks), and whether
    an optimum sat on the grid's edge (then beta is a bound). Canonical model: 1/2."""
    rows = []
    for (rule, n), g in opt.groupby(["rule", "n_clients"]):
        if g["rank"].nunique() < 2:
            continue
        slope = np.polyfit(np.log(g["rank"].astype(float)), np.log(g.lr_star_fit * g.gamma), 1)[0]
        rows.append({"rule": rule, "n_clients": n, "beta": -float(slope), "edge": bool(g.edge.any())})
    return pd.DataFrame(rows)


def prediction_errors(opt: pd.DataFrame, reference: tuple[int, int] = REFERENCE) -> pd.DataFrame:
    """Mean and largest |log2(measured / predicted)| optimum (grid steps) per model, over the cells other
    than the reference: those at the reference rank (a transfer across N only) and the rest."""
    n0, r0 = reference
    cells = opt[~((opt.n_clients == n0) & (opt["rank"] == r0))]
    parts = {"across N (r = %d)" % r0: cells[cells["rank"] == r0], "other ranks": cells[cells["rank"] != r0]}
    rows = []
    for col, model in _MODELS:
        if col not in opt:
            continue
        for part, g in parts.items():
            e = g[col].abs()
            rows.append({"model": model, "cells": part, "n": len(e), "mean_steps_off": float(e.mean()),
                         "max_steps_off": float(e.max()), "within_1_step": int((e <= 1).sum())})
    return pd.DataFrame(rows)


def drift_table(opt: pd.DataFrame) -> pd.DataFrame:
    """Per rule: the log2 range (grid steps) of the fitted optimum across N at each r, across r at
    each N, over the whole grid, and the predicted ranges."""
    rows = []
    for rule, g in opt.groupby("rule"):
        x, p = np.log2(g["lr_star_fit"]), np.log2(g["lr_star_pred"])
        rec = {"rule": rule, "drift_all": float(x.max() - x.min()), "pred_all": float(p.max() - p.min())}
        for r, h in g.groupby("rank"):
            rec[f"drift_N@r={r}"] = float(np.log2(h.lr_star_fit).max() - np.log2(h.lr_star_fit).min())
            rec[f"pred_N@r={r}"] = float(np.log2(h.lr_star_pred).max() - np.log2(h.lr_star_pred).min())
        for n, h in g.groupby("n_clients"):
            rec[f"drift_r@N={n}"] = float(np.log2(h.lr_star_fit).max() - np.log2(h.lr_star_fit).min())
            rec[f"pred_r@N={n}"] = float(np.log2(h.lr_star_pred).max() - np.log2(h.lr_star_pred).min())
        rec["edges"] = int(g["edge"].sum())
        rows.append(rec)
    return pd.DataFrame(rows)


def most_accurate(g: pd.DataFrame) -> pd.Series:
    """The row with the best final accuracy (ties: the lower eval loss)."""
    return g.sort_values(["eval_acc", "eval_loss"], ascending=[False, True]).iloc[0]


def transfer_table(df: pd.DataFrame, reference: tuple[int, int] = REFERENCE) -> pd.DataFrame:
    """Per (rule, N, r): accuracy at the cell's own most accurate lr and at the lr tuned at the reference."""
    c = lr_curves(df)
    n0, r0 = reference
    rows = []
    for (rule, n, r), g in c.groupby(["rule", "n_clients", "rank"]):
        ref = c[(c.rule == rule) & (c.n_clients == n0) & (c["rank"] == r0)]
        if ref.empty:
            continue
        lr_ref = float(most_accurate(ref)["lr"])
        best = most_accurate(g)
        at_ref = g[np.isclose(g["lr"], lr_ref)]
        acc_ref = float(at_ref["eval_acc"].iloc[0]) if len(at_ref) else math.nan
        rows.append({"rule": rule, "n_clients": n, "rank": r, "lr_ref": lr_ref, "lr_best": float(best["lr"]),
                     "best_acc": float(best["eval_acc"]), "transfer_acc": acc_ref,
                     "regret": float(best["eval_acc"]) - acc_ref})
    return pd.DataFrame(rows)


def fig_lr_transfer(df: pd.DataFrame, out: Path, formats=("png", "pdf"), rho: dict[int, float] | None = None,
                    reference: tuple[int, int] = REFERENCE) -> list[Path]:
    """One panel per rule (columns) and rank (rows): final eval loss against lr, one curve per N (seed
    range shaded), the measured optimum marked (star) and the predicted one (down-triangle on the axis)."""
    import matplotlib.pyplot as plt

    from paper_figures import style
    from paper_figures.convergence_figs import RULE_LABELS

    style.apply()
    c = lr_curves(df)
    opt = optimum_table(df, rho, reference)
    rules = [r for r in ("lora", "rslora", "sfed", "sfed-general", "sfed-adaptive") if r in set(c.rule)]
    ranks = sorted(c["rank"].unique())
    ns = sorted(c.n_clients.unique())
    cmap = plt.get_cmap("viridis")
    col = {n: cmap(i / max(1, len(ns) - 1) * 0.85) for i, n in enumerate(ns)}
    fig, axes = plt.subplots(len(ranks), len(rules), figsize=(style.PAGE_W, 2.3 * len(ranks)), squeeze=False,
                             sharex=True, sharey="row")
    for i, r in enumerate(ranks):
        for j, rule in enumerate(rules):
            ax = axes[i, j]
            for n in ns:
                g = c[(c.rule == rule) & (c.n_clients == n) & (c["rank"] == r)].sort_values("lr")
                if g.empty:
                    continue
                fin = np.isfinite(g["eval_loss"])
                ax.plot(g.lr[fin], g.eval_loss[fin], "o-", color=col[n], ms=2.5, lw=1, label=f"N={n}")
                ax.fill_between(g.lr[fin], g.loss_min[fin], np.minimum(g.loss_max[fin], 10), color=col[n], alpha=0.15,
                                lw=0)
                o = opt[(opt.rule == rule) & (opt.n_clients == n) & (opt["rank"] == r)].iloc[0]
                ax.plot(o.lr_star, o.best_loss, "*", color=col[n], ms=8, mec="k", mew=0.4)
                if math.isfinite(o.lr_star_pred):
                    ax.plot(o.lr_star_pred, 0.02, "v", color=col[n], ms=5, transform=ax.get_xaxis_transform(),
                            clip_on=False)
                if math.isfinite(getattr(o, "lr_star_refined", math.nan)):
                    ax.plot(o.lr_star_refined, 0.09, "v", mfc="none", mec=col[n], ms=5, mew=0.9,
                            transform=ax.get_xaxis_transform(), clip_on=False)
            ax.set_xscale("log", base=2)
            if i == 0:
                ax.set_title(RULE_LABELS.get(rule, rule), fontsize=7)
            if j == 0:
                ax.set_ylabel(f"r={r}: final eval loss")
            if i == len(ranks) - 1:
                ax.set_xlabel("learning rate (AdamW)")
    axes[0, 0].legend(fontsize=6, loc="upper left")
    fig.suptitle(f"Learning-rate transfer (FFA, AdamW, MiniLM + BBC): star = measured optimum; triangles = predicted "
                 f"from the one tuned at N={reference[0]}, r={reference[1]}\n(filled: canonical model; open: refined "
                 f"model, coherent share from the gradient check's pilot)", fontsize=8)
    fig.tight_layout()
    return style.save(fig, out, "fig_lr_transfer", formats)


def report(df: pd.DataFrame, rho: dict[int, float] | None = None, reference: tuple[int, int] = REFERENCE) -> str:
    """The tables of the module docstring as text."""
    opt = optimum_table(df, rho, reference)
    fmt = lambda v: f"{v:.3g}"  # noqa: E731
    lines = [f"== optimal learning rate per cell (final eval loss, seed mean); prediction anchored at N={reference[0]}, "
             f"r={reference[1]} ==",
             opt.to_string(index=False, float_format=fmt), "",
             "== |measured - predicted| optimum in grid steps (log2), per model ==",
             prediction_errors(opt, reference).to_string(index=False, float_format=lambda v: f"{v:.2f}"), "",
             "== gamma x lr* per cell: the same for every rule if the rule only moves the optimum ==",
             product_table(opt).to_string(index=False, float_format=fmt), "",
             "== beta in gamma lr* ~ r^-beta (canonical 0.5; fully coherent B increments 1) ==",
             rank_exponents(opt).to_string(index=False, float_format=lambda v: f"{v:.2f}"), "",
             "== drift of the optimum in grid steps (log2 range), measured vs predicted ==",
             drift_table(opt).to_string(index=False, float_format=lambda v: f"{v:.2f}"), "",
             "== transfer regret: accuracy at the cell's own best lr minus at the lr tuned at the reference ==",
             transfer_table(df, reference).to_string(index=False, float_format=fmt), "",
             "== best-tuned final accuracy per rule (mean over cells; min, max) =="]
    for rule, g in opt.groupby("rule"):
        lines.append(f"  {rule:<8} {g.best_acc.mean():.3f} ({g.best_acc.min():.3f}, {g.best_acc.max():.3f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m paper_figures.lr_transfer``: the tables of the stored sweep."""
    import argparse

    from paper_figures.experiments import DEFAULT_RESULTS, load

    ap = argparse.ArgumentParser(prog="python -m paper_figures.lr_transfer", description=main.__doc__)
    ap.add_argument("--results", default=str(DEFAULT_RESULTS), help="stored results folder")
    ap.add_argument("--reference", nargs=2, type=int, default=list(REFERENCE), metavar=("N", "R"),
                    help="the cell where the learning rate is tuned (default 1 16)")
    ns = ap.parse_args(argv)
    print(report(load("lr_transfer", Path(ns.results)), reference=tuple(ns.reference)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
