"""Measured log-log exponents (with bootstrap CIs) beside the exponents sfed_theory predicts.

Which measurement stands for which predicted quantity (``sfed_theory.predict`` describes the
state after one aggregation round):

==================  ===============  =================================================
predicted quantity  results column   meaning
==================  ===============  =================================================
adapter_output      adapter_rms      learned delta applied to the probe inputs
update_fro          update_fro       ||dW||_F of the round's aggregated update
grad_A              grad_A_end       ||dL/dA|| at the aggregated adapter after the round
grad_B              grad_B_end       ||dL/dB|| at the aggregated adapter after the round
==================  ===============  =================================================

All are taken at one round (default 1, the round the theory describes), from the per-layer
rows; the point estimate at a grid point is the seed-mean of ``sqrt(sum over layers of v^2)``
(the ``__all__`` value). The CI is a percentile bootstrap that resamples seeds and layers with
replacement, the same draw for every grid point of a fit (paired). Diverged runs are excluded.
Predictions use the layer sizes and, under Adam, the measured increment scales (see ``_scales``).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd

from validation.metrics import ALL

__all__ = ["QUANTITY_COLUMNS", "OPTIMIZER_REGIME", "fit_exponents", "format_report", "loglog_slope"]

QUANTITY_COLUMNS: dict[str, str] = {
    "adapter_output": "adapter_rms",
    "update_fro": "update_fro",
    "grad_A": "grad_A_end",
    "grad_B": "grad_B_end",
}
OPTIMIZER_REGIME = {"adamw": "adam", "sgd": "sgd"}


def loglog_slope(x: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope of log y on log x (NaN if fewer than two usable points)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = (x > 0) & (y > 0) & np.isfinite(y)
    if np.unique(x[ok]).size < 2:
        return float("nan")
    return float(np.polyfit(np.log(x[ok]), np.log(y[ok]), 1)[0])


def _predict(quantity: str, rule: str, wrt: str, xs: list[int], fixed: int, **kw) -> float:
    try:
        from sfed_theory.predict import predicted_exponent
    except ImportError:
        return float("nan")
    ranks, ns = (xs, fixed) if wrt == "rank" else (fixed, xs)
    try:
        return predicted_exponent(quantity, rule, wrt=wrt, ranks=ranks, n_clients=ns, **kw)
    except ValueError as e:
        warnings.warn(f"no prediction for {quantity}/{rule}/{wrt}: {e}", stacklevel=2)
        return float("nan")


def _fit_one(cube: np.ndarray, xs: np.ndarray, n_boot: int, rng: np.random.Generator) -> tuple[float, float, float]:
    """cube[point, seed, layer] -> (slope, lo, hi) with a paired seed x layer bootstrap."""
    def slope(c: np.ndarray) -> float:
        y = np.nanmean(np.sqrt(np.nansum(c ** 2, axis=2)), axis=1)
        return loglog_slope(xs, y)

    est = slope(cube)
    _, S, L = cube.shape
    boots = []
    for _ in range(n_boot):
        s = rng.integers(0, S, S)
        l_ = rng.integers(0, L, L)
        boots.append(slope(cube[:, s][:, :, l_]))
    boots = np.asarray(boots)
    boots = boots[np.isfinite(boots)]
    if boots.size == 0:
        return est, float("nan"), float("nan")
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return est, float(lo), float(hi)


def _scales(rows: pd.DataFrame, k: int, optimizer: str) -> dict[str, float]:
    """Scales of the random model taken from the run, so that schemes mixing the A init and the A
    increment (FedIT, FedSA, exact) are predicted with the measured ratio, not the default 1:1:
    s_A = std of peft's Kaiming-uniform init U(-1/sqrt(k), 1/sqrt(k)) = 1/sqrt(3k); s_B and s_dA =
    measured RMS client increments (Adam regime; the SGD closed forms take eta and tau instead)."""
    out = {"s_A": 1.0 / math.sqrt(3 * k)}
    if optimizer == "adamw" and "inc_B_rms" in rows:
        b, a = rows["inc_B_rms"].mean(), rows["inc_A_rms"].mean()
        if math.isfinite(b) and b > 0:
            out["s_B"] = float(b)
            if math.isfinite(a) and a > 0:
                out["s_dA"] = float(a)
    return out


def fit_exponents(df: pd.DataFrame, *, round: int = 1, n_boot: int = 1000, seed: int = 0,
                  rho_column: str = "rho_hat") -> pd.DataFrame:
    """One row per (scheme, optimizer, rule, quantity, wrt, fixed value): measured slope, 95% CI,
    and predicted slopes at rho = 0 (the paper's assumption) and at the measured mean rho
    (``rho_column`` of the ``__all__`` rows with more than one client: ``"rho_hat"``, the mean
    pairwise cosine, or ``"rho_ratio"``, the adaptive rule's ratio estimator).

    The harness rule ``sfed-adaptive`` has no closed-form gamma; it is predicted as ``sfed`` at
    rho = 0 (its round-1 gamma with the default prior) and as ``sfed-general`` at the measured rho
    (the gamma its estimate converges to when the estimate is right)."""
    need = {"layer", "round", "rank", "n_clients", "rule", "scheme", "optimizer", "seed"}
    if df.empty or not need <= set(df.columns):
        raise ValueError(f"results lack columns {sorted(need - set(df.columns))}" if not df.empty
                         else "no results to analyse")
    ok = df[(~df["diverged"].astype(bool)) & (df["round"] == round)]
    per_layer = ok[ok["layer"] != ALL]
    allrows = ok[ok["layer"] == ALL]
    rng = np.random.default_rng(seed)
    out = []
    for (scheme, opt, rule), g in per_layer.groupby(["scheme", "optimizer", "rule"]):
        a = allrows[(allrows.scheme == scheme) & (allrows.optimizer == opt) & (allrows.rule == rule)]
        d = int(a["d_out"].iloc[0]) if len(a) and a["d_out"].iloc[0] > 0 else 384
        k = int(a["k_in"].iloc[0]) if len(a) and a["k_in"].iloc[0] > 0 else 384
        alpha = float(g["alpha"].iloc[0])
        part = g["participating"] < g["n_clients"]
        for wrt, fixed_col in (("rank", "n_clients"), ("n_clients", "rank")):
            for fixed, h in g.groupby(fixed_col):
                xs = np.sort(h[wrt].unique())
                if xs.size < 2:
                    continue
                seeds = np.sort(h["seed"].unique())
                layers = np.sort(h["layer"].unique())
                sub = a[a[fixed_col] == fixed]
                rho_m = sub.loc[sub["n_participating"] > 1, rho_column].clip(0, 1).mean()
                scales = _scales(sub, k, opt)
                # K, the clients averaged at each point: the rule's N in the harness and in the prediction
                k_avg = [int(sub.loc[sub[wrt] == x, "n_participating"].max()) for x in xs]
                if wrt == "rank" and int(fixed) == 1:
                    rho_m = 0.0  # one client: rho does not enter the prediction
                for quantity, col in QUANTITY_COLUMNS.items():
                    if col not in h:
                        continue
                    piv = h.pivot_table(index=[wrt, "seed"], columns="layer", values=col, aggfunc="mean")
                    cube = np.full((xs.size, seeds.size, layers.size), np.nan)
                    for i, x in enumerate(xs):
                        for j, s in enumerate(seeds):
                            if (x, s) in piv.index:
                                cube[i, j] = piv.loc[(x, s)].reindex(layers).to_numpy()
                    slope, lo, hi = _fit_one(cube, xs.astype(float), n_boot, rng)
                    kw = dict(regime=OPTIMIZER_REGIME[opt], scheme=scheme, alpha=alpha, d=d, k=k,
                              participating=k_avg, **scales)
                    r0, rr = (("sfed", "sfed-general") if rule == "sfed-adaptive" else (rule, rule))
                    pred0 = _predict(quantity, r0, wrt, xs.tolist(), int(fixed), rho=0.0, **kw)
                    pred_rho = (_predict(quantity, rr, wrt, xs.tolist(), int(fixed), rho=float(rho_m), **kw)
                                if math.isfinite(rho_m) else float("nan"))
                    out.append({"scheme": scheme, "optimizer": opt, "rule": rule, "quantity": quantity,
                                "column": col, "wrt": wrt, "fixed": f"{'N' if fixed_col == 'n_clients' else 'r'}={fixed}",
                                "fixed_value": int(fixed), "points": ",".join(map(str, xs)), "n_seeds": seeds.size, "n_layers": layers.size,
                                "measured": slope, "ci_low": lo, "ci_high": hi, "predicted_rho0": pred0,
                                "rho_hat": rho_m, "predicted_rho_hat": pred_rho,
                                "partial_participation": bool(part.any())})
    res = pd.DataFrame(out)
    if not res.empty:
        for pred, name in (("predicted_rho0", "agrees_rho0"), ("predicted_rho_hat", "agrees_rho_hat")):
            res[name] = (res["ci_low"] - 0.05 <= res[pred]) & (res[pred] <= res["ci_high"] + 0.05)
    return res


def format_report(fits: pd.DataFrame) -> str:
    """A plain-text table: measured exponent [95% CI] beside the predicted ones."""
    if fits.empty:
        return "no exponents could be fitted (need >= 2 ranks or >= 2 client counts)"
    lines = ["Log-log exponents, measured [95% bootstrap CI over seeds x layers] vs predicted by sfed_theory",
             "(pred rho=0: the paper's independent-clients assumption; pred rho^: at the measured client "
             "correlation; ok0 / ok^ = that prediction inside the CI widened by 0.05)"]
    for (scheme, opt, wrt), g in fits.groupby(["scheme", "optimizer", "wrt"], sort=False):
        lines.append("")
        lines.append(f"== scheme={scheme} optimizer={opt} (regime {OPTIMIZER_REGIME[opt]}): exponent in "
                     f"{'rank r' if wrt == 'rank' else 'clients N'} ==")
        lines.append(f"{'quantity':<15}{'rule':<8}{'at':<7}{'measured':>9} {'95% CI':<17}{'pred rho=0':>11}"
                     f"{'rho^':>7}{'pred rho^':>10}  ok0 ok^")
        for _, r in g.sort_values(["quantity", "rule", "fixed_value"]).iterrows():
            ci = f"[{r.ci_low:+.2f}, {r.ci_high:+.2f}]" if math.isfinite(r.ci_low) else "[n/a]"
            lines.append(f"{r.quantity:<15}{r.rule:<8}{r.fixed:<7}{r.measured:>+9.3f} {ci:<17}"
                         f"{r.predicted_rho0:>+11.3f}{r.rho_hat:>7.2f}{r.predicted_rho_hat:>+10.3f}  "
                         f"{'yes' if r.agrees_rho0 else 'NO':<4}"
                         f"{'-' if not math.isfinite(r.predicted_rho_hat) else 'yes' if r.agrees_rho_hat else 'NO'}")
    return "\n".join(lines)
