"""Figures drawn from stored training results: (a)-(d).

Input: the tidy results of the harness (one row per run x round x layer; ``layer == "__all__"``
holds the norms combined over the adapted layers as sqrt of the sum of squares). The one-round
theory describes the state right after the first aggregation, so the scaling figures use round 1
and the gradients AT the aggregated adapter (``grad_A_end``, ``grad_B_end``: at the start of round
1, B = 0 and dL/dA is exactly zero).

Predicted norms come from :func:`sfed_theory.predicted_norm` at each grid point's (rule, r, N, d,
k, regime, scheme), with the client correlation either 0 (the paper's assumption) or the measured
``rho_hat``, and with the random model's scales set as the harness analysis sets them
(:func:`theory_scales`: s_A from peft's init, and under Adam the measured RMS client increments
``inc_B_rms``/``inc_A_rms`` as s_B/s_dA). What stays unknown is the gradient scale tau and ||x||,
so ONE multiplicative constant per quantity is fitted (least squares in log space over all grid
points and rules) and reported.

Grid points average the seeds; where a grid has several seeds the sweep figures draw the seed
range as a vertical bar.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

import sfed_theory

from paper_figures import style

__all__ = ["QUANTITIES", "REQUIRED_COLUMNS", "default_slice", "check_columns", "theory_scales", "round_rows", "with_predictions",
           "refined_params", "fit_scales",
           "fig_main", "fig_a_grad_vs_rank", "fig_b_grad_vs_clients", "fig_c_loss_curves", "fig_d_pred_vs_meas"]

ALL = "__all__"
# predicted quantity -> (results column, axis label)
QUANTITIES: dict[str, tuple[str, str]] = {
    "grad_A": ("grad_A_end", r"$\|\partial L/\partial A\|_F$"),
    "grad_B": ("grad_B_end", r"$\|\partial L/\partial B\|_F$"),
    "adapter_output": ("adapter_rms", r"adapter output RMS $\|\Delta W x\|$"),
    "update_fro": ("update_fro", r"$\|\Delta W\|_F$"),
}
QUANTITY_MARKERS = {"grad_A": "o", "grad_B": "s", "adapter_output": "^", "update_fro": "D"}
REGIME = {"adamw": "adam", "adam": "adam", "sgd": "sgd"}
REQUIRED_COLUMNS = ("run_id", "layer", "round", "rule", "rank", "n_clients", "n_participating", "scheme",
                    "optimizer", "alpha", "d_out", "k_in", "rho_hat", "diverged", "train_loss", "eval_acc",
                    *(c for c, _ in QUANTITIES.values()))
SCALE_COLUMNS = ("inc_A_rms", "inc_B_rms")  # measured client increment scales (optional columns)


def theory_scales(k: int, optimizer: str, inc_A_rms: float = float("nan"),
                  inc_B_rms: float = float("nan")) -> dict[str, float]:
    """Scale arguments of ``predicted_norm`` for one grid point, as ``validation.analysis`` sets them:
    s_A = std of peft's Kaiming-uniform A init U(-1/sqrt(k), 1/sqrt(k)) = 1/sqrt(3k); under Adam
    s_B and s_dA = the measured RMS client increments when positive (FFA trains no A: no s_dA)."""
    out = {"s_A": 1.0 / math.sqrt(3 * k)}
    if REGIME.get(optimizer) == "adam" and math.isfinite(inc_B_rms) and inc_B_rms > 0:
        out["s_B"] = float(inc_B_rms)
        if math.isfinite(inc_A_rms) and inc_A_rms > 0:
            out["s_dA"] = float(inc_A_rms)
    return out


def default_slice(df: pd.DataFrame) -> pd.DataFrame:
    """The default task's slice of a multi-scheme results set: FFA, Dirichlet split, AdamW."""
    sel = df
    for col, val in (("scheme", "ffa"), ("partition", "dirichlet"), ("optimizer", "adamw")):
        if col in sel and (sel[col] == val).any():
            sel = sel[sel[col] == val]
    return sel


def check_columns(df: pd.DataFrame, need=REQUIRED_COLUMNS, what: str = "results") -> None:
    """Fail with the list of missing columns (the results format changed or the file is wrong)."""
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise ValueError(f"{what} lack columns {missing}; present: {sorted(df.columns)}")


def _rules(df: pd.DataFrame) -> list[str]:
    return sorted(df["rule"].unique(), key=lambda r: style.RULE_ORDER.index(r) if r in style.RULE_ORDER else 99)


def round_rows(df: pd.DataFrame, rnd: int = 1) -> pd.DataFrame:
    """The ``__all__`` rows of round ``rnd`` of non-diverged runs, over seeds: the norms as their root
    mean square (the estimate of ``sqrt(E ||.||^2)``, what the theory predicts), the rest as means.

    Besides: ``n_seeds`` and, per norm column ``c``, ``c_lo``/``c_hi`` (the smallest and largest seed
    value at that grid point)."""
    check_columns(df)
    sel = df[(df["layer"] == ALL) & (df["round"] == rnd) & (~df["diverged"].astype(bool))]
    if sel.empty:
        raise ValueError(f"no non-diverged '__all__' rows in round {rnd}")
    keys = ["rule", "rank", "n_clients", "n_participating", "scheme", "optimizer", "alpha", "d_out", "k_in"]
    if "partition" in sel:
        keys.append("partition")
    norms = [c for c, _ in QUANTITIES.values()]
    cols = norms + ["rho_hat"] + [c for c in SCALE_COLUMNS if c in sel]
    g = sel.groupby(keys)
    out = sel.assign(**{c: sel[c] ** 2 for c in norms}).groupby(keys)[cols].mean()
    out[norms] = np.sqrt(out[norms])
    lo, hi = g[norms].min().add_suffix("_lo"), g[norms].max().add_suffix("_hi")
    n_seeds = (g["seed"].nunique() if "seed" in sel else g.size()).rename("n_seeds")
    return pd.concat([out, lo, hi, n_seeds], axis=1).reset_index()


def _n_layers(df: pd.DataFrame) -> pd.Series:
    per = df[df["layer"] != ALL].groupby("run_id")["layer"].nunique()
    return per


def with_predictions(df: pd.DataFrame, rnd: int = 1, fit_on: pd.DataFrame | dict | None = None) -> pd.DataFrame:
    """Round-``rnd`` seed-mean rows with ``pred_<q>_rho0``, ``pred_<q>_rhohat`` and, where the refined
    model can be fitted (AdamW, pilot runs with N <= 4), ``pred_<q>_refined`` columns (unscaled).

    ``rho0``: canonical model, independent clients. ``rhohat``: canonical model at each point's own
    measured rho, so it follows the data by construction. ``refined``: the refined model with its
    parameters estimated from the pilot runs only (:func:`validation.analysis.refined_fits`), a real
    out-of-sample prediction at N = 16. Per-layer predictions times sqrt(number of layers) (the
    ``__all__`` norm sums squares over the layers, which share one shape in the default model).
    ``fit_on``: the results the refined model is fitted on (default ``df``): pass the whole multi-split
    set when ``df`` is one skewed split, so that its correlation without skew comes from the IID pilot;
    or the parameters already fitted on them (:func:`refined_params`), so that figures drawn from one
    results set share one fit.
    """
    rows = round_rows(df, rnd)
    n_layers = int(_n_layers(df[df["round"] == rnd]).median()) if (df["layer"] != ALL).any() else 1
    refined = fit_on if isinstance(fit_on, dict) else refined_params(df if fit_on is None else fit_on, rnd)
    out = []
    for _, r in rows.iterrows():
        rec = r.to_dict()
        rho_hat = float(r["rho_hat"]) if np.isfinite(r["rho_hat"]) else 0.0
        rho_hat = min(max(rho_hat, 0.0), 1.0)
        scales = theory_scales(int(r["k_in"]), r["optimizer"], float(r.get("inc_A_rms", np.nan)),
                               float(r.get("inc_B_rms", np.nan)))
        for q in QUANTITIES:
            for tag, rho in (("rho0", 0.0), ("rhohat", rho_hat)):
                v = sfed_theory.predicted_norm(
                    q, r["rule"], regime=REGIME[r["optimizer"]], scheme=r["scheme"], rank=int(r["rank"]),
                    n_clients=int(r["n_participating"]), alpha=float(r["alpha"]), rho=rho,
                    d=int(r["d_out"]), k=int(r["k_in"]), **scales)
                rec[f"pred_{q}_{tag}"] = v * math.sqrt(n_layers)
            rec[f"pred_{q}_refined"] = _refined_point(refined, q, r)
        out.append(rec)
    return pd.DataFrame(out)


def refined_params(df: pd.DataFrame, rnd: int = 1, stored: Path | None = None,
                   pilot: pd.DataFrame | None = None) -> dict:
    """The refined model's per-quantity parameters for this results set (empty if it cannot be fitted):
    read from ``stored`` (an exponent table's ``*_refined_params.csv``, whose folder also holds the probe's
    stored input bulk) when they were fitted on exactly ``df`` at round 1 with the same settings, else fitted.
    With ``pilot`` (the check's pilot rerun that measured the gradient's input direction,
    ``gradient_check_coherent``) the model is the README's: two vectors and the pilot's measured secant curvature
    per rule and rank (``exponent_tables --two-vectors --measured-curvature``); without it, one probe vector and
    one curvature."""
    import warnings

    try:
        from validation.analysis import refined_fits
        from validation.refined_store import stored_or_fitted
    except ImportError:  # the figures can be drawn without the harness
        return {}
    if not {"rho_out", "rho_gA", "curvature"} <= set(df.columns):
        return {}  # results from before the refined model's measurements
    from paper_figures.probe_input_table import rows_nu

    from paper_figures.experiments import DEFAULT_RESULTS

    folder = stored.parent if stored is not None else DEFAULT_RESULTS
    if pilot is None:
        law, settings = "one", dict(nu=rows_nu(df, folder), kappa=1.0, pilot_max_n=4)
    else:
        from paper_figures.exponent_tables import two_vector_inputs

        nu, kappa, nu_g = two_vector_inputs(df, pilot, folder)
        law, settings = "measured", dict(nu=nu, kappa=kappa, nu_g=nu_g, pilot_max_n=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return stored_or_fitted(df, stored if rnd == 1 else None,
                                lambda: refined_fits(df, round=rnd, curvature_law=law, **settings), **settings)


def _refined_point(params: dict, q: str, r: pd.Series) -> float:
    key = (r["scheme"], r["optimizer"], r.get("partition", "?"), q)
    p = params.get(key)
    if p is None or r["rule"] not in p.s_B:
        return float("nan")
    from validation.refined import predict_points

    return float(predict_points(p, q, r["rule"], [int(r["rank"])], [int(r["n_clients"])],
                                [int(r["n_participating"])], float(r["alpha"]))[0])


def fit_scales(pred: pd.DataFrame, tag: str = "rhohat") -> dict[str, float]:
    """One constant per quantity: exp(mean(log measured - log predicted)) over all rows."""
    scales = {}
    for q, (col, _) in QUANTITIES.items():
        m, p = pred[col].to_numpy(float), pred[f"pred_{q}_{tag}"].to_numpy(float)
        ok = (m > 0) & (p > 0) & np.isfinite(m) & np.isfinite(p)
        scales[q] = float(np.exp(np.mean(np.log(m[ok]) - np.log(p[ok])))) if ok.any() else float("nan")
    return scales


def _tidy_log_axis(axis, decades: float = 1.0) -> None:
    """Major ticks at 1, 2, 5 x 10^k (1, 3 x 10^k over wider ranges) with compact labels."""
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades < 1.5 else (1.0, 3.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _sweep_figure(df: pd.DataFrame, out_dir, stem: str, xcol: str, linecol: str, xlabel: str, linefmt: str,
                  formats, rnd: int = 1, quantities=("grad_A", "grad_B"), theory: bool = True,
                  fit_on: pd.DataFrame | dict | None = None) -> list[Path]:
    style.apply()
    pred = with_predictions(df, rnd, fit_on)
    tag = "refined" if pred[[f"pred_{q}_refined" for q in quantities]].notna().all().all() else "rhohat"
    scales = fit_scales(pred, tag)
    rules = _rules(pred)
    fig, axes = plt.subplots(len(quantities), len(rules), figsize=(style.PAGE_W, 2.0 * len(quantities) + 0.45),
                             squeeze=False, sharex=True, sharey="row", constrained_layout=True)
    lines = sorted(pred[linecol].unique())
    colors = plt.cm.viridis(np.linspace(0.0, 0.85, len(lines)))
    for i, q in enumerate(quantities):
        col, label = QUANTITIES[q]
        for j, rule in enumerate(rules):
            ax = axes[i, j]
            h = pred[pred["rule"] == rule]
            for v, c in zip(lines, colors):
                g = h[h[linecol] == v].sort_values(xcol)
                if g.empty:
                    continue
                ax.plot(g[xcol], g[col], "o-", color=c, label=linefmt.format(v))
                if (g["n_seeds"] > 1).any():
                    ax.vlines(g[xcol], g[f"{col}_lo"], g[f"{col}_hi"], color=c, lw=1.6, alpha=0.55)
                if theory:
                    ax.plot(g[xcol], scales[q] * g[f"pred_{q}_{tag}"], "--", color=c, lw=0.8, alpha=0.8)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            _tidy_log_axis(ax.yaxis)
            if i == 0:
                ax.set_title(style.rule_label(rule), color=style.RULE_COLORS.get(rule, "k"))
            if j == 0:
                ax.set_ylabel(f"{label} (nats)" if q.startswith("grad") else label)
            if i == len(quantities) - 1:
                ax.set_xlabel(xlabel)
            xs = sorted(pred[xcol].unique())
            ax.set_xticks(xs, [str(int(x)) for x in xs])
            ax.xaxis.set_minor_formatter(NullFormatter())
    handles, labels = axes[0, -1].get_legend_handles_labels()
    if theory:
        handles.append(Line2D([], [], color="0.3", ls="--", lw=0.8))
        labels.append("refined theory, fitted on N <= 4 only (1 scale per row)" if tag == "refined" else
                      r"theory at each point's measured $\hat\rho$ (follows the data; 1 scale per row)")
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), frameon=False)
    meta = _describe(df)
    bars = "; bars = seed range" if (pred["n_seeds"] > 1).any() else ""
    fig.suptitle(f"Measured after round {rnd} ({meta}{bars}), one panel per rule", fontsize=8)
    return style.save(fig, out_dir, stem, formats)


def _describe(df: pd.DataFrame) -> str:
    first = df.iloc[0]
    model = {"minilm": "all-MiniLM-L6-v2", "synthetic": "synthetic MLP"}.get(first["model"], first["model"]) \
        if "model" in df else "model ?"
    data = {"bbc": "BBC News", "synthetic": "synthetic"}.get(first["dataset"], first["dataset"]) \
        if "dataset" in df else "data ?"
    seeds = df["seed"].nunique() if "seed" in df else 1
    return (f"{model} + {data}, {str(first['scheme']).upper()}-LoRA, {first['optimizer']}, "
            f"{seeds} seed{'s' if seeds > 1 else ''}")


def fig_main(df: pd.DataFrame, out_dir, formats=("png", "pdf"), rnd: int = 1,
             fit_on: pd.DataFrame | dict | None = None) -> list[Path]:
    """Main figure: aggregated update norm and adapter output against N, one line per r, per rule
    (``fit_on``: see :func:`with_predictions`)."""
    return _sweep_figure(df, out_dir, "fig_main_update_vs_clients", "n_participating", "rank", "clients N",
                         "r={}", formats, rnd, quantities=("update_fro", "adapter_output"), fit_on=fit_on)


def fig_a_grad_vs_rank(df: pd.DataFrame, out_dir, formats=("png", "pdf"), rnd: int = 1,
                       fit_on: pd.DataFrame | dict | None = None) -> list[Path]:
    """(a) adapter gradient norms against rank r, one line per N, one panel per rule."""
    return _sweep_figure(df, out_dir, "fig_a_grad_vs_rank", "rank", "n_participating", "rank r", "N={}",
                         formats, rnd, fit_on=fit_on)


def fig_b_grad_vs_clients(df: pd.DataFrame, out_dir, formats=("png", "pdf"), rnd: int = 1,
                          fit_on: pd.DataFrame | dict | None = None) -> list[Path]:
    """(b) adapter gradient norms against clients N, one line per r, one panel per rule."""
    return _sweep_figure(df, out_dir, "fig_b_grad_vs_clients", "n_participating", "rank", "clients N",
                         "r={}", formats, rnd, fit_on=fit_on)


def fig_c_loss_curves(df: pd.DataFrame, out_dir, formats=("png", "pdf")) -> list[Path]:
    """(c) train loss (and eval accuracy) per round at high rank, one line per rule, one panel per N."""
    style.apply()
    check_columns(df)
    a = df[df["layer"] == ALL]
    rank = int(a["rank"].max())
    a = a[a["rank"] == rank]
    ns = sorted(a["n_participating"].unique())
    rules = _rules(a)
    fig, axes = plt.subplots(2, len(ns), figsize=(style.COLUMN_W * (1.05 if len(ns) == 1 else 2.12), 3.9),
                             squeeze=False, sharex=True, sharey="row", constrained_layout=True)
    for j, n in enumerate(ns):
        for rule in rules:
            g = a[(a["n_participating"] == n) & (a["rule"] == rule)]
            if g.empty:
                continue
            m = g.groupby("round")[["train_loss", "eval_acc"]].agg(["mean", "min", "max"])
            c = style.RULE_COLORS.get(rule, "k")
            for i, col, scale in ((0, "train_loss", 1.0), (1, "eval_acc", 100.0)):
                ax = axes[i, j]
                ax.plot(m.index, scale * m[(col, "mean")], "o-", color=c, label=style.rule_label(rule))
                if g["seed"].nunique() > 1 if "seed" in g else False:
                    ax.fill_between(m.index, scale * m[(col, "min")], scale * m[(col, "max")], color=c, alpha=0.2)
            div = g[g["diverged"].astype(bool)]
            if len(div):
                axes[0, j].plot(div["round"], [axes[0, j].get_ylim()[1]] * len(div), "x", color=c)
        axes[0, j].set_title(f"N = {n} clients, r = {rank}")
        axes[1, j].set_xlabel("federated round")
    axes[0, 0].set_ylabel("train loss (nats)")
    n_eval = f", {int(df['eval_size'].iloc[0])} held-out" if "eval_size" in df else ""
    axes[1, 0].set_ylabel(f"eval accuracy (%{n_eval})")
    rounds = sorted(a["round"].unique())
    for ax in axes.ravel():
        ax.set_xticks(rounds)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(3, len(labels)), frameon=False)
    fig.suptitle(f"Training at high rank ({_describe(df)})", fontsize=8)
    return style.save(fig, out_dir, "fig_c_loss_curves", formats)


def fig_d_pred_vs_meas(df: pd.DataFrame, out_dir, formats=("png", "pdf"), rnd: int = 1,
                       fit_on: pd.DataFrame | dict | None = None) -> list[Path]:
    """(d) predicted against measured norms, log-log, y = x, points coloured by rule.

    One panel per quantity (columns) so that the fitted per-quantity constant cannot make
    different quantities line up; rows: theory at rho = 0 and at the measured rho_hat.
    """
    style.apply()
    pred = with_predictions(df, rnd, fit_on)
    rules = _rules(pred)
    qs = list(QUANTITIES)
    rows = {"rho0": r"canonical, $\rho=0$", "rhohat": "canonical at each\npoint's measured\n" + r"$\hat\rho$ (follows data)"}
    if pred[[f"pred_{q}_refined" for q in qs]].notna().all().all():
        rows["refined"] = "refined, fitted\non N <= 4 only"
    fig, axes = plt.subplots(len(rows), len(qs), figsize=(style.PAGE_W, 1.9 * len(rows)), squeeze=False,
                             constrained_layout=True)
    for i, tag in enumerate(rows):
        scales = fit_scales(pred, tag)
        for j, q in enumerate(qs):
            ax = axes[i, j]
            col, label = QUANTITIES[q]
            lo, hi, res = np.inf, -np.inf, []
            for rule in rules:
                h = pred[pred["rule"] == rule]
                x = scales[q] * h[f"pred_{q}_{tag}"].to_numpy(float)
                y = h[col].to_numpy(float)
                ok = (x > 0) & (y > 0)
                ax.plot(x[ok], y[ok], "o", color=style.RULE_COLORS.get(rule, "k"), ms=3.5, alpha=0.85,
                        label=style.rule_label(rule))
                res.extend(np.log10(y[ok] / x[ok]))
                lo, hi = min(lo, x[ok].min(), y[ok].min()), max(hi, x[ok].max(), y[ok].max())
            pad = (hi / lo) ** 0.08
            ax.plot([lo / pad, hi * pad], [lo / pad, hi * pad], "k-", lw=0.7, zorder=0)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(lo / pad, hi * pad)
            ax.set_ylim(lo / pad, hi * pad)
            ax.set_aspect("equal", adjustable="box")
            _tidy_log_axis(ax.xaxis, np.log10(hi / lo))
            _tidy_log_axis(ax.yaxis, np.log10(hi / lo))
            ax.text(0.97, 0.03, f"rms log$_{{10}}$ err {np.sqrt(np.mean(np.square(res))):.2f}\n"
                    f"scale {scales[q]:.2g}", transform=ax.transAxes, ha="right", va="bottom", fontsize=6)
            if i == 0:
                ax.set_title(label, fontsize=7.5)
            if j == 0:
                ax.set_ylabel(f"{rows[tag]}\nmeasured")
            ax.tick_params(labelsize=6)
    for ax in axes[-1]:
        ax.set_xlabel("predicted (theory x scale)", fontsize=7)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    handles.append(Line2D([], [], color="k", lw=0.7))
    labels.append("y = x")
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), frameon=False)
    fig.suptitle(f"Predicted vs measured after round {rnd} ({_describe(df)}; {pred.shape[0]} grid points)",
                 fontsize=8)
    return style.save(fig, out_dir, "fig_d_pred_vs_meas", formats)
