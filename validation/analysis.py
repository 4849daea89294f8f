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
rows; the point estimate at a grid point is the root mean square over seeds of the ``__all__``
value, ``sqrt(mean over seeds of sum over layers of v^2)``: the estimate of ``sqrt(E ||.||^2)``, the
quantity the theory predicts (a seed-mean of norms is smaller by ``1/sqrt(1 + CV^2)``, which biases a
slope wherever the spread over seeds changes along the axis, as it does from N = 1 to N = 16). The CI
is a percentile bootstrap that resamples seeds and layers with replacement, the same draw for every grid
point of a fit (paired). Diverged runs are excluded.
Predictions use the layer sizes and, under Adam, the measured increment scales (see ``_scales``).
Runs whose clients train different ranks (``client_ranks``) are left out here; their exponents in N
are in :mod:`validation.hetero_analysis`.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
import pandas as pd

from validation.config import PILOT_MAX_N, SAME_AS_RSLORA_AT_N1
from validation.metrics import ALL

__all__ = ["SAME_AS_RSLORA_AT_N1", "identical_n1_runs", "QUANTITY_COLUMNS", "OPTIMIZER_REGIME", "TOLERANCE", "PREDICTIONS", "fit_exponents", "refined_fits", "measured_nu", "measured_kappa", "measured_f_in",
           "measured_curvature", "CURVATURE_SOURCE", "F_IN_COLUMNS", "label_law_targets", "LABEL_LAW_COLUMNS",
           "CORRELATION_LAWS", "measured_correlation_targets",
           "with_pilot_runs", "agreement_summary", "format_report", "loglog_slope", "is_hetero"]

QUANTITY_COLUMNS: dict[str, str] = {
    "adapter_output": "adapter_rms",
    "update_fro": "update_fro",
    "grad_A": "grad_A_end",
    "grad_B": "grad_B_end",
}
OPTIMIZER_REGIME = {"adamw": "adam", "sgd": "sgd"}


def is_hetero(df: pd.DataFrame) -> pd.Series:
    """Rows of runs whose clients train different ranks (a ``client_ranks`` column that is set)."""
    if "client_ranks" not in df:
        return pd.Series(False, index=df.index)
    return df["client_ranks"].fillna("").astype(str) != ""


def identical_n1_runs(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with the N = 1 rows of the rules in :data:`SAME_AS_RSLORA_AT_N1` added as copies of rsLoRA's,
    where a grid ran only rsLoRA there (the runs would be identical); column ``from_rslora`` marks them."""
    if "from_rslora" in df:
        return df
    df = df.assign(from_rslora=False)
    n1 = df[df.n_clients == 1]
    base = n1[n1.rule == "rslora"]
    extra = [base.assign(rule=rule, from_rslora=True) for rule in SAME_AS_RSLORA_AT_N1
             if rule not in set(n1.rule) and rule in set(df.rule) and len(base)]
    return pd.concat([df, *extra], ignore_index=True) if extra else df


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


class SlopeFit(NamedTuple):
    """A measured log-log slope, its 95% percentile-bootstrap CI, and ``p_within_tol``: the share of
    bootstrap slopes within :data:`TOLERANCE` of the estimate. That share is the chance that a
    prediction equal to the true slope is "within tolerance" of this measurement: the ceiling that the
    measurement's own noise puts on agreement within the tolerance."""

    slope: float
    lo: float
    hi: float
    p_within_tol: float


def _fit_one(cube: np.ndarray, xs: np.ndarray, n_boot: int, rng: np.random.Generator) -> SlopeFit:
    """cube[point, seed, layer] -> :class:`SlopeFit` with a paired seed x layer bootstrap."""
    est = loglog_slope(xs, _rms_norm(cube))
    _, S, L = cube.shape
    draws = [(rng.integers(0, S, S), rng.integers(0, L, L)) for _ in range(n_boot)]  # one stream, drawn as ever
    seeds = np.array([s for s, _ in draws], dtype=int).reshape(n_boot, S)
    layers = np.array([l_ for _, l_ in draws], dtype=int).reshape(n_boot, L)
    resampled = cube[:, seeds[:, :, None], layers[:, None, :]]  # (point, boot, seed, layer)
    boots = _loglog_slopes(xs, _rms_norm(resampled).T)
    boots = boots[np.isfinite(boots)]
    if boots.size == 0:
        return SlopeFit(est, float("nan"), float("nan"), float("nan"))
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return SlopeFit(est, float(lo), float(hi), float(np.mean(np.abs(boots - est) <= TOLERANCE)))


def _rms_norm(cube: np.ndarray) -> np.ndarray:
    """RMS over seeds (axis -2) of the ``__all__`` norm over layers (axis -1). A seed with no layer measured
    is a missing run: it is left out of the RMS (not a zero norm), and a point with none is NaN."""
    sq = np.nansum(cube ** 2, axis=-1)
    sq[np.isnan(cube).all(axis=-1)] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the mean of no runs: NaN, which the slope skips
        return np.sqrt(np.nanmean(sq, axis=-1))


def _loglog_slopes(x: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """:func:`loglog_slope` of each row of ``ys`` (m, points) on ``x``, at once: the least-squares slope over
    each row's usable points (NaN with fewer than two distinct x among them)."""
    x, ys = np.asarray(x, float), np.asarray(ys, float)
    ok = (x > 0) & (ys > 0) & np.isfinite(ys)
    patterns, which = np.unique(ok, axis=0, return_inverse=True)  # few distinct sets of usable points
    usable = np.array([np.unique(x[row]).size >= 2 for row in patterns], dtype=bool)[which.reshape(-1)]
    w = ok.astype(float)
    lx = np.log(np.where(x > 0, x, 1.0))
    ly = np.log(np.where(ok, ys, 1.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        n = w.sum(axis=1)
        mx = (w * lx).sum(axis=1) / n
        my = (w * ly).sum(axis=1) / n
        dx = w * (lx - mx[:, None])
        out = (dx * (ly - my[:, None])).sum(axis=1) / (dx * (lx - mx[:, None])).sum(axis=1)
    return np.where(usable, out, np.nan)


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


TOLERANCE = 0.05
"""Agreement "within tolerance": ``|predicted - measured| <= TOLERANCE`` (a slope difference)."""
PREDICTIONS: tuple[str, ...] = ("rho0", "rho_hat", "refined")
"""Prediction columns ``predicted_<name>``: the canonical model at rho = 0 (the paper's assumption)
and at the measured rho (which follows the data at each point), and the refined model with its
parameters estimated from the pilot runs (N <= ``pilot_max_n``) only."""


def _cube(h: pd.DataFrame, wrt: str, col: str, xs: np.ndarray, seeds: np.ndarray, layers: np.ndarray) -> np.ndarray:
    """cube[point, seed, layer] of one column (NaN where a run is missing)."""
    piv = h.pivot_table(index=[wrt, "seed"], columns="layer", values=col, aggfunc="mean")
    full = pd.MultiIndex.from_product([xs, seeds], names=[wrt, "seed"])
    return piv.reindex(index=full, columns=layers).to_numpy(dtype=float).reshape(xs.size, seeds.size, layers.size)


def _projected_rho_column(quantity: str, scheme: str) -> str:
    """The measured correlation that governs a quantity: its clients' contributions projected on its
    direction (see :mod:`validation.metrics`); the Frobenius one where nothing projects."""
    from validation.aggregation import SCHEME_TRAINS_A

    return {"adapter_output": "rho_out", "grad_A": "rho_gA",
            "grad_B": "rho_gB" if SCHEME_TRAINS_A[scheme] else "rho_ratio"}.get(quantity, "rho_ratio")


def with_pilot_runs(check: pd.DataFrame, extra: pd.DataFrame | None) -> pd.DataFrame:
    """``check``'s runs plus the ``extra`` runs (more client counts for the refined model's pilot, such as
    ``gradient_check_two_clients``) made at one of ``check``'s learning rates: runs at another step size
    must not join its pilot."""
    if extra is None:
        return check
    return pd.concat([check, extra[extra.lr.isin(check.lr.unique())]], ignore_index=True)


LABEL_LAW_COLUMNS = ("rho_ratio", "rho_out", "rho_gA")
"""The correlations of B's increments, which the label law describes (:mod:`validation.label_law`); A's
first-round increment (``rho_gB``) is a product of two client-specific terms and keeps the K-law."""


CORRELATION_LAWS = ("label", "k", "measured")
"""How :func:`refined_fits` gets the client correlation at each K: the label law (fitted on the pilot), the K-law of
the pilot, or (a diagnostic) the correlation measured at every K."""


def measured_correlation_targets(df: pd.DataFrame, rnd: int = 1) -> dict[tuple[str, str, str], dict[int, float]]:
    """``targets[(scheme, partition, column)] = {K: c}``: the mean measured correlation over the AdamW ``__all__`` rows
    of round ``rnd``'s non-diverged runs at each K clients averaged (K > 1, any N), for every correlation the refined
    model reproduces (the Frobenius ``rho_ratio`` and the projected ones). The same shape as
    :func:`label_law_targets`' targets, with no law in between: N = 16's own measurement enters, so a model given
    these follows the correlation by construction."""
    from validation.refined import PROJECTED_MOMENTS

    columns = [c for c in ("rho_ratio", *PROJECTED_MOMENTS) if c in df]
    runs = df[(df.optimizer == "adamw") & (df["round"] == rnd) & (df["layer"] == ALL) & (df["n_participating"] > 1)
              & ~df["diverged"].astype(bool)]
    out = {}
    for (scheme, part), g in runs.groupby(["scheme", "partition"]):
        means = g.groupby("n_participating")[columns].mean()
        for c in columns:
            if means[c].notna().any():
                out[(str(scheme), str(part), c)] = {int(k): float(v) for k, v in means[c].dropna().items()}
    return out


def label_law_targets(df: pd.DataFrame, pilot_max_n: int = PILOT_MAX_N, labels_for=None,
                      rnd: int = 1) -> tuple[dict, dict]:
    """``(laws, targets)``: the label law of each (scheme, correlation column of
    :data:`LABEL_LAW_COLUMNS`), fitted on the pilot runs (``n_clients <= pilot_max_n``) of round ``rnd`` of
    all splits together, and ``targets[(scheme, partition, column)] = {K: c}``, the law's mean correlation
    over the runs at K clients averaged (any N: the batches' draws are known before training, and no
    measured correlation beyond the pilot enters). Empty, with a warning, where the law does not apply: a
    column whose pilot cannot identify it (one split only), runs with weighted aggregation or partial
    participation (the law takes equal weights, and a K would mix several N), or labels that cannot be
    loaded."""
    from validation.label_law import fit_label_laws
    from validation.label_overlap import overlap_table

    runs = df[(df.optimizer == "adamw") & (df["round"] == rnd)]
    partial = runs.n_participating < runs.n_clients
    if partial.any() or ("weighted" in runs and runs.weighted.astype(bool).any()):
        warnings.warn("the label law takes equal weights and full participation: the K-law is used", stacklevel=2)
        return {}, {}
    try:
        table = overlap_table(runs, labels_for=labels_for, rnd=rnd)
    except (OSError, ValueError, ImportError) as e:
        warnings.warn(f"no label law (the runs' labels cannot be read: {e}): the K-law is used", stacklevel=2)
        return {}, {}
    laws = fit_label_laws(table, LABEL_LAW_COLUMNS, pilot_max_n)
    targets = {}
    for (scheme, col), law in laws.items():
        g = table[table.scheme == scheme]
        c = g.assign(law=law.correlation(g.label_cross, g.label_own, g.label_repeat))
        for part, h in c.groupby("partition"):
            targets[(scheme, part, col)] = {int(k): float(v) for k, v in h.groupby("n_participating").law.mean().items()}
    return laws, targets


def refined_fits(df: pd.DataFrame, *, round: int = 1, pilot_max_n: int = PILOT_MAX_N, correlation_law: str = "label",
                 nu: float | None = None, f_in: dict[tuple[str, str], float] | None = None,
                 kappa: float = 1.0, nu_g: float | None = None, only: tuple[str, str] | None = None,
                 curvature_law: str = "one") -> dict:
    """``{(scheme, optimizer, partition, quantity): RefinedParams}``: the refined model fitted on each
    AdamW group's pilot runs, separately for each quantity: each quantity's own pilot data estimates
    its parameters, and its client correlation is the measured one projected on its direction
    (:func:`_projected_rho_column`). How that correlation changes with K: ``correlation_law="label"``
    takes it at every K from the label law fitted on the pilot (:func:`label_law_targets`) where the law
    applies and can be fitted; otherwise (and for ``"k"``) a label-skewed split (not ``"iid"``) whose
    scheme also has IID runs takes the correlation without skew from the IID pilot and its skew share
    from its own pilot (``unskewed_rho`` of :func:`validation.refined.fit_refined`), or with two pilot K
    its own K-law. ``"measured"`` is a diagnostic, not a prediction: the correlation measured at every K of the grid
    (:func:`measured_correlation_targets`, N beyond the pilot included), so the model meets it at N = 16 by
    construction and what it still misses there is not the correlation's law. ``nu``: the probe's input bulk
    (``C = x x^T + nu I``); ``None`` takes it from the runs' own measurement at the round's start
    (``probe_top_share``, :mod:`validation.probe_inputs`), or 0 (one probe vector, with a warning) for results that
    predate it. ``f_in``: None fits each group's input-coherent
    share; ``{(scheme, partition): share}`` (:func:`measured_f_in`) holds it at the measured value (a group
    missing from it is fitted, with a warning). ``kappa``, ``nu_g``: the probe gradient's input direction against
    the tokens' spike (:func:`measured_kappa`) and the bulk of the gradient's token weighting (``measured_nu`` of
    ``grad_input_share``); 1 and None (``nu``) are one probe vector. Groups with too little pilot data are left
    out with a warning. ``only``: fit just this ``(scheme, partition)`` group (every group's runs still form the
    pilots and the label law, as in the full fit). ``curvature_law``: how lambda varies (``curvature_law`` of
    :func:`validation.refined.fit_refined`); with ``"measured"`` it follows the secant curvature measured on the
    pilot per (rule, rank) (:func:`measured_curvature`; FedSA's clients are FedIT's random model and its runs do not
    measure it, so it takes FedIT's of the same split; a group with no measurement there takes one curvature, with a
    warning)."""
    from validation.refined import check_curvature_law, fit_refined

    check_curvature_law(curvature_law)
    if correlation_law not in CORRELATION_LAWS:
        raise ValueError(f"correlation_law must be one of {CORRELATION_LAWS}, got {correlation_law!r}")

    need = {"grad_B", "gamma", "inc_B_rms", "inc_A_rms", "rho_ratio", "rho_out", "rho_gA", "rho_gB", "d_out", "k_in"}
    if not need <= set(df.columns):
        warnings.warn(f"no refined predictions: the results lack {sorted(need - set(df.columns))} (measured by "
                      "the harness since the refined model)", stacklevel=2)
        return {}
    df = identical_n1_runs(df)
    ok = df[(~df["diverged"].astype(bool)) & (df["round"] == round) & ~is_hetero(df)]
    if "partition" not in ok:
        ok = ok.assign(partition="?")
    out = {}
    pilot = ok[(ok["layer"] == ALL) & (ok["n_clients"] <= pilot_max_n) & (ok["n_participating"] > 1)]
    nu = measured_nu(ok[ok["layer"] == ALL]) if nu is None else nu
    targets = (label_law_targets(ok, pilot_max_n, rnd=round)[1] if correlation_law == "label"
               else measured_correlation_targets(ok, rnd=round) if correlation_law == "measured" else {})
    for key, grp in ok[ok["optimizer"] == "adamw"].groupby(["scheme", "optimizer", "partition"]):
        if only is not None and (key[0], key[2]) != tuple(only):
            continue
        iid = pilot[(pilot.scheme == key[0]) & (pilot.optimizer == key[1]) & (pilot.partition == "iid")]
        law, curv = _group_curvature_law(ok, key, pilot_max_n, curvature_law)
        for q in QUANTITY_COLUMNS:
            if q in _zero_forms(key[0], key[1]):
                continue
            col = _projected_rho_column(q, key[0])
            unskewed = float(iid[col].mean()) if key[2] != "iid" and iid[col].notna().any() else None
            held = None if f_in is None else f_in.get((key[0], key[2]))
            if f_in is not None and held is None:
                warnings.warn(f"no measured f_in for {key[0]}, {key[2]}: it is fitted", stacklevel=2)
            try:
                out[(*key, q)] = fit_refined(grp, pilot_max_n=pilot_max_n, quantities=(q,), rho_column=col,
                                             unskewed_rho=unskewed, correlation_at=targets.get((key[0], key[2], col)),
                                             nu=nu, f_in=held, kappa=kappa, nu_g=nu_g,
                                             curvature_law=law, curvature=curv)
            except ValueError as e:
                warnings.warn(f"no refined prediction for {key} {q}: {e}", stacklevel=2)
    return out


CURVATURE_SOURCE = {"fedsa": "fedit"}
"""Schemes whose runs do not measure the secant curvature -> the scheme whose pilot stands in (FedSA's clients train
as FedIT's; only the server's aggregation of B differs)."""


def measured_curvature(rows: pd.DataFrame, pilot_max_n: int = PILOT_MAX_N, *, round: int = 1) -> dict[tuple[str, int], float]:
    """``{(rule, rank): mean curvature}`` over the ``__all__`` rows of ``round`` with ``n_clients <= pilot_max_n`` (one
    scheme and split's runs): the secant curvature along the round's update, ``<G_end - G_start, dW> / ||dW||_F^2``
    (:mod:`validation.metrics`). ValueError where no row measures it."""
    a = rows[(rows["layer"] == ALL) & (rows["round"] == round) & (rows["n_clients"] <= pilot_max_n)]
    c = a.dropna(subset=["curvature"]) if "curvature" in a else a.iloc[0:0]
    if c.empty:
        raise ValueError(f"no measured curvature in the pilot runs (N <= {pilot_max_n})")
    return {(str(u), int(r)): float(v) for (u, r), v in c.groupby(["rule", "rank"]).curvature.mean().items()}


def _group_curvature_law(ok: pd.DataFrame, key: tuple, pilot_max_n: int,
                         curvature_law: str) -> tuple[str, dict[tuple[str, int], float] | None]:
    """``(law, table)`` of one group's fit: the measured law with its pilot's table, or one curvature (with a warning)
    where that pilot measured none; any other law as it is, without a table."""
    if curvature_law != "measured":
        return curvature_law, None
    try:
        return curvature_law, _group_curvature(ok, key, pilot_max_n)
    except ValueError as e:
        warnings.warn(f"{key}: {e}; its refined model takes one curvature", stacklevel=3)
        return "one", None


def _group_curvature(ok: pd.DataFrame, key: tuple, pilot_max_n: int) -> dict[tuple[str, int], float]:
    scheme = CURVATURE_SOURCE.get(key[0], key[0])
    grp = ok[(ok.scheme == scheme) & (ok.optimizer == key[1]) & (ok.partition == key[2])]
    return measured_curvature(grp, pilot_max_n)


F_IN_COLUMNS = ("inc_B_coherent", "inc_B_coherent_probe", "inc_B_coherent_grad")
"""The harness's measurements of f_in: along the probe's top direction, over its whole input spectrum, or along
the probe gradient's own input direction (``A x_g``; :mod:`validation.response_shape`)."""


def measured_f_in(rows: pd.DataFrame, *, round: int = 1, pilot_max_n: int = PILOT_MAX_N,
                  column: str = "inc_B_coherent") -> dict[tuple[str, str], float]:
    """``{(scheme, partition): f_in}``: the refined model's input-coherent share measured on the pilot runs
    (``n_clients <= pilot_max_n``, AdamW, the ``__all__`` rows of ``round``): the mean of ``column`` over
    rules, ranks, N and seeds (the model has one share for all of them). ``inc_B_coherent``: the clients'
    share of their B increments along ``A x_top`` (:func:`validation.probe_inputs.coherent_share`);
    ``inc_B_coherent_probe``: the share that reproduces their alignment with the probe's whole input spectrum
    (:func:`validation.probe_inputs.probe_coherent_share`). A mean outside the model's range [0, 1/2] is
    clipped into it with a warning. ValueError for another column or when the rows lack it."""
    if column not in F_IN_COLUMNS:
        raise ValueError(f"column must be one of {F_IN_COLUMNS}, got {column!r}")
    if column not in rows:
        raise ValueError(f"the results lack {column} (measured by the harness since the refined model's f_in "
                         "became a measured input); results/gradient_check_coherent.parquet has it for the default check")
    a = rows[(rows["layer"] == ALL) & (rows["round"] == round) & (rows["n_clients"] <= pilot_max_n)
             & (rows["optimizer"] == "adamw") & ~rows["diverged"].astype(bool)]
    a = a.assign(partition=a["partition"] if "partition" in a else "?")
    out = {}
    for (scheme, part), share in a.groupby(["scheme", "partition"])[column].mean().dropna().items():
        if not 0.0 <= share <= 0.5:
            warnings.warn(f"measured f_in {share:.3f} of {scheme}, {part} lies outside [0, 1/2]: clipped", stacklevel=2)
        out[(str(scheme), str(part))] = float(min(max(share, 0.0), 0.5))
    return out


def measured_nu(rows: pd.DataFrame, column: str = "probe_top_share") -> float:
    """The refined model's input bulk ``nu`` from the probe's measured top share (``probe_top_share``, mean
    over runs; the probe is the same at every N, rank and split of a seed), or 0 with a warning where the
    results lack the column (measured by the harness since the probe's input bulk entered the model).
    ``column="grad_input_share"``: the tokens' share along the probe gradient's input direction instead, the
    model's ``x`` taken to be that direction (:func:`validation.response_shape.gradient_input_shape`)."""
    from validation.probe_inputs import bulk_nu

    if column not in ("probe_top_share", "grad_input_share"):
        raise ValueError(f"column must be probe_top_share or grad_input_share, got {column!r}")
    share = rows[column].dropna() if column in rows else pd.Series(dtype=float)
    if share.empty:
        if column != "probe_top_share":
            raise ValueError(f"the results lack {column}")
        warnings.warn("the results lack probe_top_share: the refined model probes with one input vector (nu = 0); "
                      "pass nu (validation.probe_inputs.probe_nu) to use the probe's measured bulk", stacklevel=3)
        return 0.0
    return bulk_nu(float(share.mean()), int(rows["k_in"].iloc[0]))


def measured_kappa(rows: pd.DataFrame, *, round: int = 1) -> float:
    """The refined model's ``kappa``: the root mean square over the per-layer rows of ``round`` of
    ``grad_spike_cos``, ``|cos|`` of the probe gradient's input direction with the tokens' top direction
    (:func:`validation.response_shape.gradient_input_shape`; measured at the round's start, so the same at
    every N, rank and scheme of a seed). Root mean square because the moments, summed over the layers, take
    ``kappa`` in even powers, mostly its square. ValueError where the rows lack the column."""
    if "grad_spike_cos" not in rows:
        raise ValueError("the results lack grad_spike_cos (measured by the harness since the probe gradient's "
                         "direction was; results/gradient_check_coherent.parquet has it for the default check)")
    cos = rows.loc[(rows["layer"] != ALL) & (rows["round"] == round), "grad_spike_cos"].dropna()
    if cos.empty:
        raise ValueError(f"no per-layer grad_spike_cos in round {round}")
    if not ((cos >= 0) & (cos <= 1 + 1e-9)).all():
        raise ValueError("grad_spike_cos is a cosine's size and must lie in [0, 1]")
    return float(min(np.sqrt(np.mean(cos.to_numpy() ** 2)), 1.0))


def fit_exponents(df: pd.DataFrame, *, round: int = 1, n_boot: int = 1000, seed: int = 0,
                  rho_column: str = "rho_hat", refined: bool | dict = True,
                  pilot_max_n: int = PILOT_MAX_N) -> pd.DataFrame:
    """One row per (scheme, optimizer, partition, rule, quantity, wrt, fixed value): measured slope,
    95% CI, and the predicted slopes of :data:`PREDICTIONS`.

    ``predicted_rho0``: canonical model, rho = 0. ``predicted_rho_hat``: canonical model at the
    measured mean rho (``rho_column`` of the ``__all__`` rows with more than one client:
    ``"rho_hat"``, the mean pairwise cosine, or ``"rho_ratio"``); it uses data of the points it
    predicts. ``predicted_refined`` (AdamW only, ``refined=True``): the refined model
    (:mod:`validation.refined`) with parameters estimated from the runs with N <= ``pilot_max_n`` of
    the same scheme, optimizer and split (``refined`` may also be the dict of :func:`refined_fits`); ``refined_sample`` says whether a slope's points reach
    beyond the pilot (``"out"``) or not (``"in"``). Agreement is given two ways for each prediction:
    ``in_ci_<p>`` (strictly inside the 95% CI) and ``agrees_<p>`` (within :data:`TOLERANCE` of the
    measured slope). Quantities whose closed form is identically zero at the measured point (dL/dA
    under exact aggregation) have no slope and are skipped.

    The harness rule ``sfed-adaptive`` has no closed-form gamma; it is predicted as ``sfed`` at
    rho = 0 (its round-1 gamma with the default prior) and as ``sfed-general`` at the measured rho
    (the gamma its estimate converges to when the estimate is right). A grid that ran only rsLoRA at
    N = 1 (the sfed rules' gamma is rsLoRA's there) lends that run to the sfed rules
    (:func:`identical_n1_runs`), so their slopes in N use the same points as the other rules'."""
    need = {"layer", "round", "rank", "n_clients", "rule", "scheme", "optimizer", "seed"}
    if df.empty or not need <= set(df.columns):
        raise ValueError(f"results lack columns {sorted(need - set(df.columns))}" if not df.empty
                         else "no results to analyse")
    df = identical_n1_runs(df)
    ok = df[(~df["diverged"].astype(bool)) & (df["round"] == round) & ~is_hetero(df)]
    if "partition" not in ok:
        ok = ok.assign(partition="?")
    rng = np.random.default_rng(seed)
    out = []
    params = (refined if isinstance(refined, dict)
              else refined_fits(ok, round=round, pilot_max_n=pilot_max_n) if refined else {})
    for (scheme, opt, part), grp in ok.groupby(["scheme", "optimizer", "partition"]):
        ref = {q: params.get((scheme, opt, part, q)) for q in QUANTITY_COLUMNS}
        for rule, g in grp[grp["layer"] != ALL].groupby("rule"):
            a = grp[(grp["layer"] == ALL) & (grp["rule"] == rule)]
            out.extend(_fit_rule(g, a, scheme, opt, part, rule, rho_column, ref, pilot_max_n, n_boot, rng))
    res = pd.DataFrame(out)
    if not res.empty:
        for p in PREDICTIONS:
            pred = res[f"predicted_{p}"]
            res[f"in_ci_{p}"] = (res["ci_low"] <= pred) & (pred <= res["ci_high"])
            res[f"agrees_{p}"] = (pred - res["measured"]).abs() <= TOLERANCE
    return res


def _fit_rule(g: pd.DataFrame, a: pd.DataFrame, scheme: str, opt: str, part: str, rule: str, rho_column: str,
              ref, pilot_max_n: int, n_boot: int, rng: np.random.Generator) -> list[dict]:
    """The fit rows of one rule: per-layer rows ``g``, its ``__all__`` rows ``a``."""
    d = int(a["d_out"].iloc[0]) if len(a) and a["d_out"].iloc[0] > 0 else 384
    k = int(a["k_in"].iloc[0]) if len(a) and a["k_in"].iloc[0] > 0 else 384
    alpha = float(g["alpha"].iloc[0])
    part_rows = bool((g["participating"] < g["n_clients"]).any())
    zero = _zero_forms(scheme, opt)
    out = []
    for wrt, fixed_col in (("rank", "n_clients"), ("n_clients", "rank")):
        for fixed, h in g.groupby(fixed_col):
            xs = np.sort(h[wrt].unique())
            if xs.size < 2:
                continue
            seeds, layers = np.sort(h["seed"].unique()), np.sort(h["layer"].unique())
            sub = a[a[fixed_col] == fixed]
            rho_m = sub.loc[sub["n_participating"] > 1, rho_column].clip(0, 1).mean()
            if wrt == "rank" and int(fixed) == 1:
                rho_m = 0.0  # one client: rho does not enter the prediction
            # K, the clients averaged at each point: the rule's N in the harness and in the prediction
            k_avg = [int(sub.loc[sub[wrt] == x, "n_participating"].max()) for x in xs]
            ns = xs if wrt == "n_clients" else np.array([fixed])
            kw = dict(regime=OPTIMIZER_REGIME[opt], scheme=scheme, alpha=alpha, d=d, k=k, participating=k_avg,
                      **_scales(sub, k, opt))
            r0, rr = (("sfed", "sfed-general") if rule == "sfed-adaptive" else (rule, rule))
            for quantity, col in QUANTITY_COLUMNS.items():
                if col not in h or quantity in zero:
                    continue
                slope, lo, hi, p_tol = _fit_one(_cube(h, wrt, col, xs, seeds, layers), xs.astype(float), n_boot, rng)
                pred0 = _predict(quantity, r0, wrt, xs.tolist(), int(fixed), rho=0.0, **kw)
                pred_rho = (_predict(quantity, rr, wrt, xs.tolist(), int(fixed), rho=float(rho_m), **kw)
                            if math.isfinite(rho_m) else float("nan"))
                pred_ref = _refined_slope(ref.get(quantity), quantity, rule, wrt, xs, int(fixed), k_avg, alpha)
                out.append({"scheme": scheme, "optimizer": opt, "partition": part, "rule": rule,
                            "quantity": quantity, "column": col, "wrt": wrt,
                            "fixed": f"{'N' if fixed_col == 'n_clients' else 'r'}={fixed}",
                            "fixed_value": int(fixed), "points": ",".join(map(str, xs)), "n_seeds": seeds.size,
                            "n_layers": layers.size, "measured": slope, "ci_low": lo, "ci_high": hi,
                            "p_within_tol": p_tol,
                            "predicted_rho0": pred0, "rho_hat": rho_m, "predicted_rho_hat": pred_rho,
                            "predicted_refined": pred_ref,
                            "refined_sample": "out" if ns.max() > pilot_max_n else "in",
                            "partial_participation": part_rows})
    return out


def _zero_forms(scheme: str, opt: str) -> set[str]:
    """Quantities whose closed form is identically zero for this scheme and regime (nothing to fit)."""
    try:
        from sfed_theory.derivation import closed_form
    except ImportError:
        return set()
    return {q for q in QUANTITY_COLUMNS if closed_form(q, scheme, OPTIMIZER_REGIME[opt]) == 0}


def _refined_slope(p, quantity: str, rule: str, wrt: str, xs, fixed: int, k_avg, alpha: float) -> float:
    """The refined model's slope (:func:`validation.refined.predicted_slope`); NaN, with a warning, where the fit has no
    input for the slope's points (a rule it was not fitted on, a rank without a measured pilot curvature)."""
    from validation.refined import predicted_slope

    if p is None or rule not in p.s_B:
        return float("nan")
    try:
        return predicted_slope(p, quantity, rule, wrt, xs, fixed, k_avg, alpha)
    except ValueError as e:
        warnings.warn(f"no refined prediction of {quantity}'s slope in {wrt} ({rule}): {e}", stacklevel=2)
        return float("nan")


def agreement_summary(fits: pd.DataFrame) -> pd.DataFrame:
    """Per prediction: how many fitted slopes it has, how many lie strictly inside the 95% CI and how
    many within :data:`TOLERANCE`; the refined model's out-of-sample slopes also on their own.
    ``within_tol_ceiling``: how many of the same slopes a prediction equal to the true slope would be
    expected to get within the tolerance, given the measurements' bootstrap spread (``p_within_tol``)."""
    rows = []
    for p in PREDICTIONS:
        for label, sel in ((p, fits[f"predicted_{p}"].notna()),
                           *((("refined, out-of-sample", fits["predicted_refined"].notna()
                               & (fits["refined_sample"] == "out")),) if p == "refined" else ())):
            f = fits[sel]
            rows.append({"prediction": label, "slopes": len(f), "in_ci": int(f[f"in_ci_{p}"].sum()),
                         "within_tol": int(f[f"agrees_{p}"].sum()),
                         "within_tol_ceiling": float(f["p_within_tol"].sum()) if "p_within_tol" in f else math.nan})
    return pd.DataFrame(rows)


def format_report(fits: pd.DataFrame, refined_params: list | None = None) -> str:
    """A plain-text table: measured exponent [95% CI] beside the predicted ones, then the agreement
    counts (strictly inside the CI, and within the tolerance) and the refined model's parameters."""
    if fits.empty:
        return "no exponents could be fitted (need >= 2 ranks or >= 2 client counts)"
    lines = ["Log-log exponents, measured [95% bootstrap CI over seeds x layers] vs predicted by sfed_theory",
             "  rho=0: canonical model, independent clients (the paper's assumption)",
             "  rho^:  canonical model at the measured client correlation of these points (follows the data by "
             "construction)",
             f"  refd:  refined model, parameters estimated from the pilot runs only (in/out: slope within / beyond "
             f"the pilot's N)",
             f"  marks per prediction: C = strictly inside the 95% CI, T = within {TOLERANCE} of the measured "
             "slope, - = neither"]
    mark = lambda r, p: ("" if not math.isfinite(r[f"predicted_{p}"]) else  # noqa: E731
                         ("C" if r[f"in_ci_{p}"] else "") + ("T" if r[f"agrees_{p}"] else "") or "-")
    keys = ["scheme", "optimizer", "partition", "wrt"]
    for key, g in fits.groupby(keys, sort=False):
        scheme, opt, part, wrt = key
        lines.append("")
        lines.append(f"== scheme={scheme} optimizer={opt} (regime {OPTIMIZER_REGIME[opt]}) split={part}: exponent in "
                     f"{'rank r' if wrt == 'rank' else 'clients N'} ==")
        lines.append(f"{'quantity':<15}{'rule':<8}{'at':<7}{'measured':>9} {'95% CI':<17}{'rho=0':>7}{'rho^':>7}"
                     f"{'@rho^':>7}{'refd':>7}    0   ^   refd")
        for _, r in g.sort_values(["quantity", "rule", "fixed_value"]).iterrows():
            ci = f"[{r.ci_low:+.2f}, {r.ci_high:+.2f}]" if math.isfinite(r.ci_low) else "[n/a]"
            ref = f"{r.predicted_refined:>+7.3f}" if math.isfinite(r.predicted_refined) else f"{'n/a':>7}"
            lines.append(f"{r.quantity:<15}{r.rule:<8}{r.fixed:<7}{r.measured:>+9.3f} {ci:<17}"
                         f"{r.predicted_rho0:>+7.3f}{r.rho_hat:>7.3f}{r.predicted_rho_hat:>+7.3f}{ref}"
                         f"  {mark(r, 'rho0'):<3} {mark(r, 'rho_hat'):<3} {mark(r, 'refined'):<3}"
                         f"{r.refined_sample if math.isfinite(r.predicted_refined) else ''}")
    lines.append("")
    lines.append(f"Agreement (C: strictly inside the 95% CI; T: within {TOLERANCE}):")
    for _, r in agreement_summary(fits).iterrows():
        if r.slopes:
            lines.append(f"  {r.prediction:<24} C {r.in_ci:>4}/{r.slopes:<4} ({r.in_ci / r.slopes:6.1%})   "
                         f"T {r.within_tol:>4}/{r.slopes:<4} ({r.within_tol / r.slopes:6.1%})"
                         + (f"   (an exact model: T ~{r.within_tol_ceiling:.0f}, {r.within_tol_ceiling / r.slopes:.0%})"
                            if math.isfinite(r.within_tol_ceiling) else ""))
    lines.append("  an exact model: the number within the tolerance expected of a prediction equal to the true slope, "
                 "given each measured slope's bootstrap spread (the ceiling the measurement's noise sets)")
    if refined_params:
        lines.append("")
        lines.append("Refined model parameters (estimated from the pilot runs only):")
        lines.extend(f"  {p.describe()}" for p in refined_params)
    return "\n".join(lines)
