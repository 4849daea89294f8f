"""The refined model (``sfed_theory`` regime ``"adam-refined"``), estimated on small-N runs only.

The refined random model adds three mechanisms to the canonical one (see
``sfed_theory.assumptions.REGIMES["adam-refined"]`` and docs/THEORY.md): an input-coherent share
``f_in`` of each client's B increment, ``u_i (A x)^T`` (B is built from A x); a share ``phi`` of that
component's output direction along the loss gradient, common to all clients; and the output-space
curvature ``lam``: within the round the probe's output gradient moves by ``lam`` times the output
change ``dW x``. Its parameters are estimated from the PILOT part of a grid (runs with
``N <= pilot_max_n``, default 4) and then predict every grid point, in particular N = 16 and the
rank dependence. Which parameter comes from what:

* ``s_B``, ``s_dA``: seed-mean RMS client increments (``inc_B_rms``, ``inc_A_rms``) of the pilot runs
  of the same rule (the client increment's size as a measured input; under Adam it barely moves).
* ``tau2x2`` per rank: the probe gradient's size ``tau^2 ||x||^2 = sum_l ||G_l||_F^2 / (L d)`` seen through
  that rank's A, from dL/dB at the round's START (B = 0: measured before any training, identical at
  every N for a rank and seed): ``grad_B^2 / (gamma^2 r s_A^2 L d)``, pilot mean.
* ``rho_f``: the mean measured correlation of the pilot runs with N > 1. For the Frobenius ``rho_ratio``
  the model's correlation of the non-coherent part is ``(rho_f - f_in phi) / (1 - f_in)``, the value at
  which the model's increments have that correlation. A projected correlation (``rho_out``, ``rho_gA``,
  ``rho_gB``) is not the increments' correlation: the projection on the loss gradient sees the shared
  component over all d output coordinates, and dL/dA's contributions are taken at the probe gradient
  after the round, which carries the average of all clients' steps. For these the model's own value of
  the measured correlation is derived (one client's contribution against the clients' mean, both
  closed forms of :mod:`sfed_theory.schemes`; the harness's ratio estimate with equal weights is
  ``(K E||mean||^2 / E||one||^2 - 1) / (K - 1)``) and the non-coherent correlation ``rho_model`` is
  solved, for each (f_in, phi, lam) the fit tries, so that the model's correlation at the pilot points
  equals the measured one; a gap left where no correlation in range reaches it is penalised in the
  fit and reported (``rho_gap``). The model then predicts the correlation at N = 16 (it changes with
  K through the aggregated step in the probe gradient): :func:`predicted_correlation`.
* ``rho_skew`` (a label-skewed split, when the same grid has IID runs): on a split whose clients' label
  shares add up to the global ones (Dirichlet), the part of each client's increment that its label skew
  causes sums to about zero over the clients. That part, a share ``s`` of the increment's variance, then
  correlates -1/(K-1) between two clients and cancels in the average: the pairwise correlation at K
  clients is ``rho_f - s/(K-1)`` with ``rho_f`` the correlation without skew. ``rho_f`` is taken from the
  IID pilot runs of the same scheme (the same batches, no skew) and ``s = (K-1) (rho_f - rho_K)`` from the
  skewed pilot runs, so the pilot's own correlation is reproduced and N = 16 is predicted. For a
  projected correlation the same holds in the model's units: the unskewed ``rho_model`` is solved on the
  IID pilot's measured value, and ``s`` so that the model's correlation at ``rho_model - s/(K-1)``
  reproduces the skewed pilot's. A pilot with two client counts above one (N = 2 and 4) needs no IID
  runs: each split's own ``rho_K = rho - s/(K-1)`` is fitted to its per-K correlations (in the model's
  units for a projected one, with ``s`` of either sign: a correlation may also fall with K).
* ``corr_by_k`` (the label law, the default of :func:`validation.analysis.refined_fits` for B's increments):
  the measured correlation at every K of the grid is the label law's (:mod:`validation.label_law`, fitted on
  the pilot runs of all splits together, evaluated on each K's batch labels, which are known before any
  training), and the model's correlation is solved at each K to reproduce it (``rho_by_k``); the K-laws
  above are then not used.
* ``kappa``, ``nu_g``: the probe gradient's input direction ``z`` (``G = g z^T``; B's coherent part is built from
  ``A z`` and the curvature response sums the tokens as the gradient weighs them, ``C_g = z z^T + nu_g I``) against
  the tokens' spike ``x`` (what the output sees): the cosine ``kappa`` measured at the round's start
  (``grad_spike_cos``) and ``nu_g`` from the tokens' share along ``z`` (``grad_input_share``); ``kappa = 1``,
  ``nu_g = nu`` (the defaults) is one probe vector.
* ``f_in``, ``phi``, ``lam``: least squares of ``log measured - log predicted`` over the pilot points of
  the four quantities, all rules and ranks, with one free scale per quantity: only shapes are
  fitted, absolute sizes are not predicted.
* ``t0`` (only with ``curvature_law="saturating"``; else infinite: one curvature): the update's shared part
  ``dW_s``, built from the descent direction every client shares, meets its own curvature
  ``lambda_s = lam/(1 + step/t0)``, ``step`` the root of the derived ``E||dW_s X^T||^2`` at the point (``shared_output``): a loss that
  saturates along that direction has a secant curvature falling as 1/step. Fitted with the three above, starting
  from their one-curvature optimum, so the pilot misfit never grows.
* ``lam_rank`` (only with ``curvature_law="rank"``; else 0: one curvature at every rank): the curvature follows a rank
  law, ``lambda(r) = lam (r/16)^lam_rank``, met by the whole update; fitted with the three above, again from their
  one-curvature optimum. The harness's measured secant curvature along the update grows about as ``r^1``, faster than
  the model's geometry gives a rank-free ``lambda`` (:mod:`validation.secant_curvature` compares the two).
* ``curvature_measured`` (only with ``curvature_law="measured"``; else empty): that secant curvature as measured on
  the pilot per (rule, rank) (:func:`validation.analysis.measured_curvature`). ``lambda`` at each point is then
  ``lam`` times it over the model's own ``E<dW C_g, dW> / E||dW||^2`` there, so the model's secant curvature is
  ``lam`` times the pilot's; ``lam`` is fitted as a scale, nothing is added. At N beyond the pilot the pilot's value
  at that rule and rank is used.

Layers of one model are treated alike (MiniLM's adapted layers are all 384 x 384): the ``__all__``
value of a quantity is ``sqrt(L)`` times the per-layer prediction, a constant that the free scale takes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from validation.config import PILOT_MAX_N
from validation.correlation_law import fit_k_law
from validation.metrics import ALL

__all__ = ["REFINED_REGIME", "PILOT_MAX_N", "CURVATURE_REFERENCE_RANK", "CURVATURE_LAWS", "check_curvature_law",
           "QUANTITY_COLUMNS",
           "PROJECTED_MOMENTS", "RefinedParams", "fit_refined", "pilot_curvature",
           "predict_points", "predicted_correlation", "predicted_slope"]

REFINED_REGIME = "adam-refined"
QUANTITY_COLUMNS = {"adapter_output": "adapter_rms", "update_fro": "update_fro", "grad_A": "grad_A_end",
                    "grad_B": "grad_B_end"}
PROJECTED_MOMENTS = {"rho_out": ("output_client", "adapter_output"), "rho_gA": ("grad_A_client", "grad_A"),
                     "rho_gB": ("grad_B_client", "grad_B_increment")}
"""A measured projected correlation -> (one client's contribution, the clients' mean contribution)."""
CURVATURE_REFERENCE_RANK = 16
"""The rank at which ``lam`` is quoted when the curvature follows a rank law (``lam_rank``): the middle of the
checks' ranks 4, 16, 64. The fit does not depend on it (it rescales ``lam`` only)."""
CURVATURE_LAWS = ("one", "saturating", "rank", "measured")
"""How the curvature ``lambda`` varies (:func:`fit_refined`'s ``curvature_law``): one value everywhere; falling along
the update's shared part with its step (``t0`` fitted); a rank law (``lam_rank`` fitted); or the pilot's measured
secant curvature per (rule, rank) times one fitted scale."""
RHO_GAP_WEIGHT = 1e3
"""Weight of the squared gap between the model's and the measured pilot correlation in the fit's loss
(squared log residuals of about 0.05 each): a gap of 0.01 costs as much as the whole shape misfit."""


@dataclass(frozen=True)
class RefinedParams:
    """Estimated parameters of the refined model for one (scheme, optimizer, partition)."""

    scheme: str
    partition: str
    f_in: float
    phi: float
    rho_f: float  # measured correlation of rho_column: pilot mean, IID pilot's, or the pilot K-law's intercept
    lam: float
    tau2x2: dict[int, float]  # per rank
    s_B: dict[str, float]  # per rule
    s_dA: dict[str, float]
    d: int
    k: int
    pilot_max_n: int
    n_pilot_points: int
    rms_log_residual: float  # of the pilot fit, over the fitted quantities
    quantities: tuple[str, ...] = tuple(QUANTITY_COLUMNS)  # whose pilot shapes were fitted
    rho_column: str = "rho_ratio"  # the measured correlation it reproduces
    rho_skew: float = 0.0  # s of rho_K = rho - s/(K-1): a zero-sum part (0: none, or no second pilot K / IID runs)
    rho_model: float | None = None  # solved non-coherent correlation (projected rho_column); None: Frobenius
    rho_gap: float = 0.0  # model minus measured pilot correlation left after the solve (0: reproduced)
    pilot_ks: tuple[int, ...] = ()  # the client counts > 1 of the pilot (two or more: the split's own K-law)
    corr_by_k: tuple[tuple[int, float], ...] = ()  # the label law's measured-unit correlation per K (else empty)
    rho_by_k: tuple[tuple[int, float], ...] = ()  # the model's correlation solved from it per K
    nu: float = 0.0  # the probe's isotropic input bulk (C = x x^T + nu I, ||x|| = 1): measured, not fitted
    kappa: float = 1.0  # cos of the probe gradient's input direction with the tokens' spike: measured (1: one vector)
    nu_g: float | None = None  # the bulk of the gradient's token weighting, C_g = z z^T + nu_g I: measured (None: nu)
    t0: float = math.inf  # the shared step at which the shared part's curvature halves (inf: one curvature)
    lam_rank: float = 0.0  # the curvature's rank law lambda(r) = lam (r/16)^lam_rank (0: one curvature at every rank)
    curvature_measured: tuple[tuple[str, int, float], ...] = ()  # pilot's secant curvature per (rule, rank); () unused

    @property
    def label_law(self) -> bool:
        """Whether the correlation at each K comes from the label law (:mod:`validation.label_law`)."""
        return bool(self.rho_by_k)

    @property
    def rho(self) -> float:
        """The model's correlation of the non-coherent part of B without label skew (reproduces ``rho_f``);
        NaN under the label law, which has one per K (:attr:`rho_by_k`)."""
        if self.label_law:
            return math.nan
        if self.rho_model is not None:
            return self.rho_model
        return (self.rho_f - self.f_in * self.phi) / (1.0 - self.f_in) if self.f_in < 1 else 0.0

    def rho_at(self, k):
        """:attr:`rho` at ``k`` clients averaged (a number or an array): the skew part lowers the pairwise
        correlation by ``rho_skew / (k - 1)`` (nothing with one client); for a projected correlation in the
        model's own units, for the Frobenius one in the measured units. Under the label law: the value
        solved at that K (ValueError for a K it was not solved at; 0 for one client, where no pair exists)."""
        k = np.asarray(k, dtype=float)
        if self.label_law:
            return _lookup(dict(self.rho_by_k), k)
        skew = self.rho_skew / np.maximum(k - 1.0, 1.0) * (k > 1)
        if self.rho_model is not None:
            return self.rho_model - skew
        return (self.rho_f - skew - self.f_in * self.phi) / (1.0 - self.f_in) if self.f_in < 1 else np.zeros_like(k)

    def describe(self) -> str:
        """One line: the estimates and where each comes from."""
        own_law = len(self.pilot_ks) >= 2
        source = (f"K-law intercept of the pilot at K = {','.join(map(str, self.pilot_ks))}" if own_law
                  else "of the IID pilot" if self.rho_skew else "pilot mean")
        if self.label_law:
            law = ", ".join(f"K={k}: {c:+.4f} -> model {r:+.4f}" for (k, c), (_, r) in zip(self.corr_by_k, self.rho_by_k))
            return (f"{self.scheme}/{self.partition} [{','.join(self.quantities)}]: f_in={self.f_in:.4f} "
                    f"phi={self.phi:.3f} lambda={self.lam:.4g} (fitted: pilot shapes, {self.n_pilot_points} points with "
                    f"N <= {self.pilot_max_n}, rms log residual {self.rms_log_residual:.3f}); {self.rho_column} from the "
                    f"label law, per K: {law}{f', gap {self.rho_gap:+.4f}' if self.rho_gap else ''}; "
                    f"tau^2|x|^2 per rank={_fmt(self.tau2x2)} (start dL/dB); s_B={_fmt(self.s_B)} "
                    f"s_dA={_fmt(self.s_dA)} (pilot increments); nu={self.nu:.4g} (probe input bulk, measured)"
                f"{self._vectors()}")
        skew = (f", s={self.rho_skew:.4f} (rho at K clients = rho - s/(K-1))" if self.rho_skew else "")
        return (f"{self.scheme}/{self.partition} [{','.join(self.quantities)}]: f_in={self.f_in:.4f} phi={self.phi:.3f} "
                f"lambda={self.lam:.4g} (fitted: pilot shapes, {self.n_pilot_points} points with N <= {self.pilot_max_n}, "
                f"rms log residual {self.rms_log_residual:.3f}); measured {self.rho_column}={self.rho_f:+.4f} "
                f"({source}) -> model rho={self.rho:+.4f}"
                f"{' (solved: the model reproduces the projected correlation)' if self.rho_model is not None else ''}"
                f"{f', gap {self.rho_gap:+.4f}' if self.rho_gap else ''}{skew}; "
                f"tau^2|x|^2 per rank={_fmt(self.tau2x2)} (start dL/dB); s_B={_fmt(self.s_B)} "
                f"s_dA={_fmt(self.s_dA)} (pilot increments); nu={self.nu:.4g} (probe input bulk, measured)"
                f"{self._vectors()}")

    @property
    def gradient_bulk(self) -> float:
        """``nu_g``, or ``nu`` where unset (one probe vector: the gradient weighs the tokens as the output does)."""
        return self.nu if self.nu_g is None else self.nu_g

    def _vectors(self) -> str:
        sat = (f"; t0={self.t0:.4g} (fitted: the shared step at which its curvature halves, "
               "lambda_s = lambda/(1 + step/t0))" if self.saturating else "")
        if self.lam_rank:
            sat += (f"; lam_rank={self.lam_rank:.3f} (fitted: the curvature's rank law, lambda(r) = lambda "
                    f"(r/{CURVATURE_REFERENCE_RANK})^lam_rank)")
        if self.curvature_measured:
            sat += (f"; secant curvature per rule@rank={_fmt(_curvature_key(self.curvature_measured))} (measured on "
                    "the pilot; the model's reproduces it times lambda)")
        if self.kappa == 1.0 and self.nu_g is None:
            return sat
        bulk = "" if self.nu_g is None else f", nu_g={self.nu_g:.4g} (the gradient's token bulk, measured)"
        return f"; kappa={self.kappa:.3f} (gradient direction vs spike, measured){bulk}{sat}"

    def curvature(self, rank) -> np.ndarray:
        """The output-space curvature at ``rank`` (a number or an array): ``lam (rank/16)^lam_rank``; ``lam`` is
        its value at :data:`CURVATURE_REFERENCE_RANK`."""
        return self.lam * (np.asarray(rank, dtype=float) / CURVATURE_REFERENCE_RANK) ** self.lam_rank

    @property
    def saturating(self) -> bool:
        """Whether the update's shared part meets a curvature that falls with its own step (finite ``t0``)."""
        return math.isfinite(self.t0)

    def to_row(self) -> dict:
        """Flat dict for a CSV."""
        d = asdict(self)
        d["rho"] = self.rho
        d["quantities"] = ",".join(self.quantities)
        d["pilot_ks"] = ",".join(map(str, self.pilot_ks))
        for key in ("corr_by_k", "rho_by_k"):
            d[key] = _fmt(dict(getattr(self, key)), exact=True)
        d["curvature_measured"] = _fmt(_curvature_key(self.curvature_measured), exact=True)
        for key in ("tau2x2", "s_B", "s_dA"):
            d[key] = _fmt(getattr(self, key), exact=True)
        return d

    @classmethod
    def from_row(cls, row: dict) -> RefinedParams:
        """The inverse of :meth:`to_row` (a CSV row read back; ``rho`` is derived, so it is not read). Rows
        written before a field existed take its default; a NaN anywhere else stays NaN."""
        names = {f.name for f in fields(cls)}
        out = {}
        for key, v in row.items():
            if key not in names:
                continue
            if _missing(v) and key in ("rho_model", "nu_g"):  # optional: written as empty
                out[key] = None
            elif _missing(v) and key in ("pilot_ks", "corr_by_k", "rho_by_k", "curvature_measured"):  # empty tuples
                out[key] = ()
            elif key == "curvature_measured":
                out[key] = tuple(sorted((u, int(a), c) for (u, a), c in
                                        ((k_.split("@"), c) for k_, c in _parse(v, str).items())))
            elif key in ("tau2x2", "corr_by_k", "rho_by_k"):
                m = _parse(v, int)
                out[key] = m if key == "tau2x2" else tuple(sorted(m.items()))
            elif key in ("s_B", "s_dA"):
                out[key] = _parse(v, str)
            elif key == "quantities":
                out[key] = tuple(str(v).split(","))
            elif key == "pilot_ks":  # one K alone may come back from a CSV as a float ("4.0")
                out[key] = tuple(int(float(x)) for x in str(v).split(",") if x)
            elif key in ("scheme", "partition", "rho_column"):
                out[key] = str(v)
            elif key in ("d", "k", "pilot_max_n", "n_pilot_points"):
                out[key] = int(v)
            else:
                out[key] = float(v)
        return cls(**out)


def _curvature_key(table: tuple[tuple[str, int, float], ...]) -> dict[str, float]:
    return {f"{u}@{a}": c for u, a, c in table}


def _fmt(m: dict, exact: bool = False) -> str:
    return ",".join(f"{k}:{v!r}" if exact else f"{k}:{v:.4g}" for k, v in sorted(m.items()))


def _parse(text, key_type) -> dict:
    """``"k:v,k:v"`` (:func:`_fmt`) -> ``{key_type(k): float(v)}``."""
    pairs = (item.split(":") for item in str(text).split(",") if item)
    return {key_type(k): float(v) for k, v in pairs}


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v == ""


def _lookup(table: dict[int, float], k: np.ndarray) -> np.ndarray:
    missing = sorted({int(v) for v in np.atleast_1d(k) if v > 1 and int(v) not in table})
    if missing:
        raise ValueError(f"the model's correlation was solved at K = {sorted(table)}, not at K = {missing}")
    return np.vectorize(lambda v: table[int(v)] if v > 1 else 0.0, otypes=[float])(k)


def predict_points(p: RefinedParams, quantity: str, rule: str, ranks, ns, ks, alpha: float) -> np.ndarray:
    """``sqrt(E[quantity])`` of the refined model at grid points (rank, N, K clients averaged); gamma
    from the rule at K, as the harness sets it. Ranks without a pilot ``tau2x2`` use the pilot mean."""
    r, n, kk = (np.atleast_1d(np.asarray(v, dtype=float)) for v in (ranks, ns, ks))
    m = _moment(p, quantity, p.scheme, rule, r, kk, alpha, p.rho_at(kk))
    return np.sqrt(np.maximum(np.broadcast_to(m, r.shape), 0.0))


def _moment(p: RefinedParams, quantity: str, scheme: str, rule, r: np.ndarray, kk: np.ndarray, alpha,
            rho) -> np.ndarray:
    """The derived ``E[quantity]`` of ``scheme`` at points (rank ``r``, K ``kk``; ``rule`` one name or one
    per point) and the model correlation ``rho`` (broadcast against the points)."""
    from sfed_theory.predict import MOMENT_ARGS, moment_function, weight_sums

    rules = np.broadcast_to(np.asarray(rule, dtype=object), r.shape)
    alphas = np.broadcast_to(np.asarray(alpha, dtype=float), r.shape)
    gamma = np.array([_gamma(str(u), float(al), int(a), int(b)) for u, al, a, b in zip(rules, alphas, r, kk)])
    t_mean = float(np.mean(list(p.tau2x2.values())))
    tau = np.sqrt([p.tau2x2.get(int(a), t_mean) for a in r])
    s_a = 1.0 / math.sqrt(3 * p.k)  # peft's Kaiming-uniform A init U(-1/sqrt(k), 1/sqrt(k))
    s_b = np.array([p.s_B[str(u)] for u in rules])
    s_da = np.array([p.s_dA.get(str(u), 0.0) or p.s_B[str(u)] for u in rules])
    lam = p.curvature(r)
    args = [gamma, p.d, p.k, r, kk, rho, s_a, s_b, s_da, tau, 1.0, 1.0, p.f_in, p.phi, lam, p.nu, p.kappa,
            p.gradient_bulk, lam, *weight_sums(kk)]
    if p.curvature_measured:  # lambda at each point such that the model's secant curvature along its own update,
        # lambda times the update's response over its size (validation.secant_curvature), is lam times the pilot's
        lam = p.lam * pilot_curvature(p, rules, r) / _update_response(p, args)
        args[MOMENT_ARGS.index("lambda")] = args[MOMENT_ARGS.index("lambda_s")] = lam
    if p.saturating:  # the loss saturates along the direction every client descends: the secant curvature met
        # by the update's shared part falls as 1/step beyond t0 (step: that part's output on the probe's tokens)
        step = np.sqrt(np.maximum(moment_function("shared_output", scheme, REFINED_REGIME)(*args), 0.0))
        args[MOMENT_ARGS.index("lambda_s")] = lam / (1.0 + step / p.t0)
    return moment_function(quantity, scheme, REFINED_REGIME)(*args)


def pilot_curvature(p: RefinedParams, rules, r) -> np.ndarray:
    """The pilot's measured secant curvature (``p.curvature_measured``) at each point's (rule, rank); ``rules`` one
    name or one per point. ValueError for a point it lacks."""
    r = np.atleast_1d(np.asarray(r, dtype=float))
    rules = np.broadcast_to(np.asarray(rules, dtype=object), r.shape)
    table = {(u, a): c for u, a, c in p.curvature_measured}
    missing = sorted({(str(u), int(a)) for u, a in zip(rules, r)} - set(table))
    if missing:
        raise ValueError(f"no measured pilot curvature at (rule, rank) {missing}; measured at {sorted(table)}")
    return np.array([table[(str(u), int(a))] for u, a in zip(rules, r)])


def _update_response(p: RefinedParams, args: list) -> np.ndarray:
    """``E<dW C_g, dW> / E||dW||_F^2`` of the group's own update at ``args``: the output moment with its vector
    at the gradient's direction ``z`` (``kappa = 1``) and the gradient's bulk, over the update's size."""
    from sfed_theory.predict import MOMENT_ARGS, moment_function

    along_z = list(args)
    along_z[MOMENT_ARGS.index("kappa")] = 1.0
    along_z[MOMENT_ARGS.index("nu")] = p.gradient_bulk
    return (moment_function("adapter_output", p.scheme, REFINED_REGIME)(*along_z)
            / moment_function("update_fro", p.scheme, REFINED_REGIME)(*along_z))


_PROJECTION_SCHEMES = {"ffa": "ffa", "fedit": "fedit", "fedsa": "fedit"}
"""Schemes whose projected correlations the model derives -> the scheme of the closed forms: FedSA's clients
are FedIT's random model, and the harness projects them at the shared adapter (Bbar, Abar) as FedIT's.
Others (exact aggregation, the ``-indep`` inits) keep the Frobenius mapping of a projected correlation."""


def _client_scheme(scheme: str) -> str:
    return _PROJECTION_SCHEMES[scheme]


def _mean_scheme(column: str, scheme: str) -> str:
    """Where A trains, the mean of the clients' own updates (``rho_out``) is exact aggregation's update."""
    base = _client_scheme(scheme)
    return "exact" if column == "rho_out" and base != "ffa" else base


def _model_correlation(p: RefinedParams, column: str, rules, r: np.ndarray, kk: np.ndarray, alpha,
                       rho) -> np.ndarray:
    """The harness's ratio estimate (equal weights) of ``column`` in the model at correlation ``rho``."""
    return _ratio_estimate(kk, *_projected_moments(p, column, rules, r, kk, alpha, rho))


def _ratio_estimate(kk: np.ndarray, one: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """The harness's equal-weight ratio estimate of a pairwise correlation from one client's and the mean's moment
    at ``kk`` clients: ``(K E||mean||^2 / E||one||^2 - 1) / (K - 1)`` (undefined at K = 1)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return (kk * mean / one - 1.0) / (kk - 1.0)


def _projected_moments(p: RefinedParams, column: str, rules, r, kk, alpha, rho) -> tuple[np.ndarray, np.ndarray]:
    """``(one client's, the mean's)`` derived moment of the projection ``column`` measures, at correlation ``rho``."""
    one_q, mean_q = PROJECTED_MOMENTS[column]
    return (_moment(p, one_q, _client_scheme(p.scheme), rules, r, kk, alpha, rho),
            _moment(p, mean_q, _mean_scheme(column, p.scheme), rules, r, kk, alpha, rho))


def predicted_correlation(p: RefinedParams, rule: str, ranks, ks, alpha: float) -> np.ndarray:
    """The model's value of the correlation it was fitted to reproduce (``p.rho_column``) at ``ks``
    clients averaged (> 1): for a projected correlation the derived ratio at ``p.rho_at(ks)``, which
    changes with K; for the Frobenius one the increments' correlation ``f_in phi + (1 - f_in) rho_at``."""
    r, kk = (np.atleast_1d(np.asarray(v, dtype=float)) for v in (ranks, ks))
    r, kk = np.broadcast_arrays(r, kk)
    if np.any(kk < 2):
        raise ValueError("a pairwise correlation needs at least two clients averaged")
    if p.rho_column not in PROJECTED_MOMENTS:
        return p.f_in * p.phi + (1.0 - p.f_in) * p.rho_at(kk)
    return _model_correlation(p, p.rho_column, rule, r, kk, alpha, p.rho_at(kk))


@lru_cache(maxsize=4096)
def _gamma(rule: str, alpha: float, rank: int, k: int) -> float:
    from sfed_theory.rules import scaling_factor

    return scaling_factor(rule, alpha, rank, k)


def predicted_slope(p: RefinedParams, quantity: str, rule: str, wrt: str, xs, fixed: int, ks, alpha: float) -> float:
    """Least-squares log-log slope of :func:`predict_points` in ``wrt`` (``"rank"`` or ``"n_clients"``)."""
    xs = np.asarray(xs, dtype=float)
    ranks, ns = (xs, np.full_like(xs, fixed)) if wrt == "rank" else (np.full_like(xs, fixed), xs)
    y = predict_points(p, quantity, rule, ranks, ns, ks, alpha)
    if not np.all(y > 0):
        return float("nan")
    return float(np.polyfit(np.log(xs), np.log(y), 1)[0])


def _pilot_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (rule, rank, n_clients, n_participating) of the ``__all__`` rows: the root mean square over
    seeds of the norms (the estimate of ``sqrt(E ||.||^2)``, what the model predicts) and the seed mean
    of the scales and correlations."""
    keys = ["rule", "rank", "n_clients", "n_participating"]
    norms = [*QUANTITY_COLUMNS.values(), "grad_B"]
    g = rows.assign(**{c: rows[c] ** 2 for c in norms}).groupby(keys, as_index=False)
    t = g[[*norms, "gamma", "inc_B_rms", "inc_A_rms", "rho_ratio", "alpha"]].mean()
    t[norms] = np.sqrt(t[norms])
    return t


def fit_refined(rows: pd.DataFrame, *, pilot_max_n: int = PILOT_MAX_N,
                quantities: tuple[str, ...] = tuple(QUANTITY_COLUMNS), rho_column: str = "rho_ratio",
                unskewed_rho: float | None = None, correlation_at: dict[int, float] | None = None,
                nu: float = 0.0, f_in: float | None = None, kappa: float = 1.0,
                nu_g: float | None = None, curvature_law: str = "one",
                curvature: dict[tuple[str, int], float] | None = None) -> RefinedParams:
    """Estimate the refined model's parameters from the pilot runs of one (scheme, optimizer, partition).

    ``rows``: harness rows of that group at the round the theory describes (round 1), any N; only
    ``layer == "__all__"`` rows of non-diverged runs with ``n_clients <= pilot_max_n`` are used.
    ``quantities``: the quantities whose pilot shapes are fitted; ``rho_column``: the measured client
    correlation the model reproduces (``rho_ratio``, or a quantity's projected one: ``rho_out``,
    ``rho_gA``, ``rho_gB``). The shares are kept in [0, 1/2]: a share above one half would make the
    "client noise" smaller than the structure it is supposed to be noise around. ``unskewed_rho``: for a
    label-skewed split, the same correlation measured on IID pilot runs (see ``rho_skew`` in the module
    docstring); ``None`` takes the split's own pilot correlation at every N. A pilot with two or more
    client counts above one (N = 2 and 4) instead gives the split its own K-law, ``rho_K = rho - s/(K-1)``
    fitted to its per-K means (``unskewed_rho`` is then not used). ``correlation_at``: the measured correlation
    at every K to predict (K > 1), from the label law (:mod:`validation.label_law`, fitted on pilot runs): the
    model's correlation is then solved at each K to reproduce it, and neither K-law is used. Measured, not fitted:
    ``nu``, the tokens' input bulk (``C = x x^T + nu I``, :mod:`validation.probe_inputs`); ``kappa``, the cosine of
    the gradient's input direction with their spike (:func:`validation.analysis.measured_kappa`); ``nu_g``, the
    gradient's token bulk (None: ``nu``); ``kappa = 1`` is one probe vector. ``f_in``: None fits it; a value in
    [0, 1/2] holds it (:func:`validation.analysis.measured_f_in`). ``curvature_law`` (one of
    :data:`CURVATURE_LAWS`): ``"one"``, one curvature everywhere; ``"saturating"``, the update's shared part meets
    its own curvature ``lambda/(1 + step/t0)``, falling with its step (the model's shared output), ``t0`` fitted too;
    ``"rank"``, the curvature follows a rank law, ``lambda (r/16)^lam_rank``, its exponent fitted too. Each added
    parameter starts from the optimum without it, so the pilot misfit never grows. ``"measured"``: ``curvature`` is
    the secant curvature along the update measured on the pilot per (rule, rank)
    (:func:`validation.analysis.measured_curvature`); lambda at each point is then such that the model's own secant
    curvature is ``lambda`` times it (one scale fitted, not a law). ValueError for a value out of range, an unknown
    law, a ``curvature`` table without the measured law or the reverse, or a pilot with one rank or no N > 1."""
    _check_inputs(f_in, kappa, curvature_law, curvature is not None)
    a = rows[(rows.layer == ALL) & (~rows.diverged.astype(bool)) & (rows.n_clients <= pilot_max_n)]
    if a.empty or a["rank"].nunique() < 2 or not (a.n_clients > 1).any():
        raise ValueError(f"the pilot part (N <= {pilot_max_n}) needs >= 2 ranks and some N > 1 to fit the refined model")
    scheme, part = str(a.scheme.iloc[0]), str(a.partition.iloc[0]) if "partition" in a else "?"
    d, k, n_layers = int(a.d_out.iloc[0]), int(a.k_in.iloc[0]), int(rows[rows.layer != ALL].layer.nunique())
    t = _pilot_table(a)
    tau2x2, s_b, s_da = _pilot_scales(t, d, k, n_layers)
    pilot_means, rho_f, skew = _pilot_correlation(a[a.n_participating > 1], rho_column, unskewed_rho)
    meas = {q: np.log(t[c].to_numpy()) for q, c in QUANTITY_COLUMNS.items() if q in quantities and (t[c] > 0).all()}
    groups = _rule_groups(t)

    pair_pts = t[t.n_participating > 1]
    measured = tuple(sorted((str(u), int(a), float(c)) for (u, a), c in (curvature or {}).items()))
    projected = rho_column in PROJECTED_MOMENTS and scheme in _PROJECTION_SCHEMES

    def params(f: float, ph: float, lam: float, t0: float = math.inf, lam_rank: float = 0.0) -> RefinedParams:
        p = RefinedParams(scheme, part, f, ph, rho_f, lam, tau2x2, s_b, s_da, d, k, pilot_max_n, len(t), math.nan,
                          tuple(meas), rho_column, 0.0 if projected else skew, nu=nu, kappa=kappa, nu_g=nu_g, t0=t0,
                          lam_rank=lam_rank, curvature_measured=measured)  # rms_log_residual: once fitted
        if correlation_at is not None:
            return _with_label_law(replace(p, rho_skew=0.0, pilot_ks=tuple(pilot_means)), pair_pts, correlation_at,
                                   projected)
        if not projected:
            return replace(p, pilot_ks=tuple(pilot_means))
        rho0, s, gap = _solve_correlation(p, pair_pts, pilot_means, unskewed_rho)
        return replace(p, rho_model=rho0, rho_skew=s, rho_gap=gap, pilot_ks=tuple(pilot_means))

    # lambda's natural unit: the probe gradient's size over the size of the output change (t0's: the latter)
    out_unit = float(np.median(_predicted(params(0, 0, 0), "adapter_output", groups, len(t))))
    lam_unit = math.sqrt(d * np.mean(list(tau2x2.values()))) / out_unit
    unpack = _unpacker(f_in, lam_unit, out_unit, curvature_law)

    def loss(x: np.ndarray) -> float:
        p = params(*unpack(x))
        if not math.isfinite(p.rho_gap) or not _valid_correlation(p):
            return 1e6
        total = RHO_GAP_WEIGHT * len(pair_pts) * p.rho_gap**2
        for q, y in meas.items():
            r = y - np.log(np.maximum(_predicted(p, q, groups, len(t)), 1e-300))
            total += float(np.sum((r - r.mean()) ** 2))  # one free scale per quantity
        return total

    best = _minimise(loss, _starts(f_in is None), curvature_law)
    fitted = params(*unpack(best.x))
    shape_loss = best.fun - RHO_GAP_WEIGHT * len(pair_pts) * fitted.rho_gap**2
    n_points = max(1, sum(v.size for v in meas.values()))
    return replace(fitted, rms_log_residual=float(np.sqrt(max(shape_loss, 0.0) / n_points)))


def _unpacker(f_in: float | None, lam_unit: float, out_unit: float, curvature_law: str):
    """The map from the optimiser's x, ``[(logit f_in,) logit phi, log lambda (, log t0 | lam_rank)]``, to
    ``(f_in, phi, lambda, t0, lam_rank)``; the last slot is appended by :func:`_minimise` once the rest is fitted."""
    n_shares = 2 if f_in is None else 1

    def unpack(x: np.ndarray) -> tuple[float, ...]:
        shares = _shares(x[:2]) if f_in is None else (f_in, _shares(x[:1])[0])
        extra = x[n_shares + 1:]
        saturating = curvature_law == "saturating" and extra.size
        t0 = out_unit * math.exp(np.clip(extra[0], -30, 30)) if saturating else math.inf
        lam_rank = float(np.clip(extra[0], -3.0, 3.0)) if curvature_law == "rank" and extra.size else 0.0
        return (*shares, lam_unit * math.exp(np.clip(x[n_shares], -30, 30)), t0, lam_rank)

    return unpack


def _predicted(p: RefinedParams, quantity: str, groups: list[tuple], n: int) -> np.ndarray:
    """:func:`predict_points` at the ``n`` points of a pilot table, from its :func:`_rule_groups`."""
    out = np.empty(n)
    for idx, rule, ranks, ns, ks, alpha in groups:
        out[idx] = predict_points(p, quantity, rule, ranks, ns, ks, alpha)
    return out


def _minimise(loss, starts: list[np.ndarray], curvature_law: str = "one"):
    """The best Nelder-Mead optimum of ``loss`` from ``starts``; ``"saturating"``: then from that optimum again with
    log t0 appended at 0.3, 3 and 30 units (t0 far beyond every step is the one-curvature model: no loss);
    ``"rank"``: likewise with the curvature's rank exponent appended at 0.25 and 1 (0, the same curvature at every
    rank, is that optimum itself, kept where nothing beats it)."""
    def fit(start: np.ndarray):
        return minimize(loss, start, method="Nelder-Mead", options={"xatol": 1e-3, "fatol": 1e-8, "maxiter": 800})

    best = min(map(fit, starts), key=lambda r: r.fun)
    extra = {"saturating": [math.log(t0) for t0 in (0.3, 3.0, 30.0)], "rank": [0.25, 1.0]}.get(curvature_law, [])
    return min([best, *(fit(np.r_[best.x, v]) for v in extra)], key=lambda r: r.fun)


def _rule_groups(t: pd.DataFrame) -> list[tuple]:
    """Per rule of the pilot table: (positions, rule, ranks, N, K, alpha) as arrays, once per fit (the fit's
    loss predicts them thousands of times)."""
    return [(g.index.to_numpy(), rule, g["rank"].to_numpy(float), g.n_clients.to_numpy(float),
             g.n_participating.to_numpy(float), float(g.alpha.iloc[0])) for rule, g in t.groupby("rule")]


def _pilot_scales(t: pd.DataFrame, d: int, k: int, n_layers: int) -> tuple[dict, dict, dict]:
    """``(tau2x2 per rank, s_B per rule, s_dA per rule)`` from the pilot table: the probe gradient's size seen
    through A at the round's start (peft's A init has variance 1/3k), and the clients' increments."""
    t2 = t.grad_B**2 / (t.gamma**2 * t["rank"] * (1.0 / (3 * k)) * n_layers * d)
    tau2x2 = {int(r): float(v) for r, v in t2.groupby(t["rank"]).mean().items()}
    return tau2x2, t.groupby("rule").inc_B_rms.mean().to_dict(), t.groupby("rule").inc_A_rms.mean().to_dict()


def _pilot_correlation(pairs: pd.DataFrame, column: str, unskewed: float | None) -> tuple[dict[int, float], float, float]:
    """``(per-K means, rho_f, s)`` of the measured ``column`` over the pilot runs with K > 1: with two or more
    K the split's own K-law ``rho_K = rho_f - s/(K-1)``; with one, ``rho_f`` its mean (``s = 0``) or the IID
    pilot's ``unskewed`` value with ``s`` from the skewed runs."""
    targets = {int(k): float(v) for k, v in pairs.groupby("n_participating")[column].mean().items()}
    if len(targets) >= 2:
        rho_f, skew = fit_k_law(list(targets), list(targets.values()))
        return targets, float(rho_f), float(skew)
    if unskewed is None:
        return targets, float(pairs[column].mean()), 0.0
    return targets, float(unskewed), float(np.mean((pairs.n_participating - 1) * (unskewed - pairs[column])))


_VALID_KS = np.array([2.0, 3.0, 4.0, 8.0, 16.0, 64.0, 1e9])


def _valid_correlation(p: RefinedParams) -> bool:
    """The model is a random model at every K it may predict: K clients with pairwise correlation rho_K
    have a positive semi-definite covariance iff -1/(K-1) <= rho_K < 1."""
    ks = np.array([k for k, _ in p.rho_by_k], dtype=float) if p.label_law else _VALID_KS
    rho = np.atleast_1d(p.rho_at(ks))
    return bool(np.all((rho >= -1.0 / (ks - 1.0)) & (rho < 1.0)))


def _with_label_law(p: RefinedParams, pts: pd.DataFrame, correlation_at: dict[int, float],
                    projected: bool) -> RefinedParams:
    """``p`` with its correlation at each K of ``correlation_at`` (measured units) mapped into the model:
    for the Frobenius correlation ``(c - f_in phi)/(1 - f_in)``, for a projected one solved so that the
    model's correlation, averaged over the pilot's (rule, rank) points at that K, equals ``c``; ``rho_gap``
    is the largest shortfall where no correlation in range reaches it."""
    targets = {int(k): float(v) for k, v in sorted(correlation_at.items()) if k > 1}
    if not targets:
        raise ValueError(f"correlation_at needs the correlation at some K > 1, got {correlation_at}")
    corr = tuple(targets.items())
    if not projected:
        rho = tuple((k, (c - p.f_in * p.phi) / (1.0 - p.f_in)) for k, c in corr)
        return replace(p, corr_by_k=corr, rho_by_k=rho, rho_model=None)
    base = pts[pts.n_participating == pts.n_participating.max()]
    every_k = pd.concat([base.assign(n_participating=k) for k in targets], ignore_index=True)
    _, solve = _correlation_solver(p, every_k)
    kk = every_k.n_participating.to_numpy()
    solved = {k: solve(c, kk == k) for k, c in targets.items()}
    gap = max((g for _, g in solved.values()), key=abs)
    rho = tuple((k, float(v)) for k, (v, _) in solved.items())
    return replace(p, corr_by_k=corr, rho_by_k=rho, rho_model=None, rho_gap=gap)


_NODES = np.array([-0.25, 0.2, 0.6, 1.0])  # the moments are polynomials of degree <= 3 in rho


def _solve_correlation(p: RefinedParams, pts: pd.DataFrame, targets: dict[int, float], unskewed: float | None,
                       ) -> tuple[float, float, float]:
    """``(rho_model, s, gap)`` for a projected correlation. At each pilot K the non-coherent correlation
    rho_K is solved so that the model's correlation, averaged over that K's points of ``pts``, equals the
    measured mean ``targets[K]``. Two or more K: ``rho_K = rho_model - s/(K-1)`` by least squares (the
    split's own K-law). One K: ``rho_model`` solved on ``unskewed`` (the IID pilot's value) and
    ``s = (K-1)(rho_model - rho_K)``, or ``rho_model = rho_K`` and ``s = 0`` without it. The model must be
    a random model at every K: ``rho_model >= 0`` (so a negative correlation is a zero-sum part,
    ``-s/(K-1)``, refitted with ``rho_model = 0``) and ``s <= 1 + rho_model`` (K = 2). ``gap``: model minus
    measured correlation left at the pilot K's (the largest in size)."""
    kk = pts.n_participating.to_numpy(float)
    corr, solve = _correlation_solver(p, pts)
    solved = {k: solve(v, kk == k) for k, v in sorted(targets.items())}
    per_k = {k: v for k, (v, _) in solved.items()}
    ks, rhos = np.array(list(per_k), dtype=float), np.array(list(per_k.values()))
    unreached = [g for _, g in solved.values()]
    if len(per_k) >= 2:
        rho0, s = fit_k_law(ks, rhos)
    elif unskewed is not None:
        rho0, g0 = solve(unskewed, np.ones(kk.shape, bool))
        s = math.nan
        unreached.append(g0)  # the IID value the skew share is measured against
    else:
        rho0, s = rhos[0], 0.0
    if not all(map(math.isfinite, unreached)):
        return rho0, 0.0, math.inf
    # a random model at every K needs 0 <= rho_inf < 1 (a negative correlation is then a zero-sum part,
    # -s/(K-1)) and rho_2 = rho0 - s >= -1
    rho0 = min(max(rho0, 0.0), 1.0 - 1e-6)
    if len(per_k) >= 2 or math.isnan(s) or rhos[0] < 0:
        w = 1.0 / (ks - 1.0)
        s = float(np.sum(w * (rho0 - rhos)) / np.sum(w * w))
    s = min(s, 1.0 + rho0)
    gaps = [corr(rho0 - s / (k - 1.0), kk == k) - targets[k] for k in per_k]
    if not all(map(math.isfinite, gaps)):
        return rho0, s, math.inf
    return rho0, s, max([*gaps, *(g for g in unreached[len(per_k):])], key=abs)


def _correlation_solver(p: RefinedParams, pts: pd.DataFrame):
    """``(corr, solve)`` over the points ``pts`` (rule, rank, alpha, n_participating): ``corr(rho, on)`` the
    model's correlation ``p.rho_column`` at non-coherent correlation rho, averaged over the points ``on``
    (NaN where undefined); ``solve(target, on)`` -> ``(rho, gap)``, the rho in the range where the clients'
    covariance stays positive definite at which it equals ``target`` (gap 0), else the nearer end and its
    miss (inf where undefined)."""
    from scipy.optimize import brentq

    kk = pts.n_participating.to_numpy(float)
    moments = _client_and_mean_moments(p, pts)

    def corr(rho: float, on: np.ndarray) -> float:
        v = _ratio_estimate(kk[on], *moments(rho, on))
        return float(np.mean(v)) if np.all(np.isfinite(v)) else math.nan

    def solve(target: float, on: np.ndarray) -> tuple[float, float]:
        a, b = -1.0 / (kk[on].max() - 1.0) + 1e-6, 1.0 - 1e-6  # the clients' covariance stays positive definite
        fa, fb = corr(a, on) - target, corr(b, on) - target
        if not (np.isfinite(fa) and np.isfinite(fb)):
            return (a + b) / 2, math.inf
        if fa * fb <= 0:
            return brentq(lambda v: corr(v, on) - target, a, b, xtol=1e-9), 0.0
        return (a, fa) if abs(fa) < abs(fb) else (b, fb)

    return corr, solve


def _client_and_mean_moments(p: RefinedParams, pts: pd.DataFrame):
    """``moments(rho, on) -> (one client's, the mean's)`` moment of ``p.rho_column``'s projection at the points
    ``on`` of ``pts``. With lambda free of rho (one curvature, a rank law, or the saturating law, whose shared step
    holds no client noise) both are polynomials of degree <= 3 in rho, read off four nodes once; under the measured
    curvature lambda is set from the update's response, which changes with rho, so they are evaluated at each rho."""
    kk, r = pts.n_participating.to_numpy(float), pts["rank"].to_numpy(float)
    rules, alpha = pts.rule.to_numpy(object), pts.alpha.to_numpy(float)
    if p.curvature_measured:
        return lambda rho, on: _projected_moments(p, p.rho_column, rules[on], r[on], kk[on], alpha[on], rho)
    one, mean = _projected_moments(p, p.rho_column, rules, r, kk, alpha, _NODES[:, None])
    vander = np.vander(_NODES, 4, increasing=True)
    shape = (_NODES.size, len(pts))  # a moment free of rho comes back with the points' shape only
    c_one = np.linalg.solve(vander, np.broadcast_to(one, shape))
    c_mean = np.linalg.solve(vander, np.broadcast_to(mean, shape))

    def polynomial(rho: float, on: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pw = rho ** np.arange(4)[:, None]
        return np.sum(c_one[:, on] * pw, 0), np.sum(c_mean[:, on] * pw, 0)

    return polynomial


def check_curvature_law(law: str) -> None:
    """ValueError unless ``law`` is one of :data:`CURVATURE_LAWS`."""
    if law not in CURVATURE_LAWS:
        raise ValueError(f"curvature_law must be one of {CURVATURE_LAWS}, got {law!r}")


def _check_inputs(f_in: float | None, kappa: float, curvature_law: str = "one", table: bool = False) -> None:
    check_curvature_law(curvature_law)
    if (curvature_law == "measured") != table:
        raise ValueError("the measured curvature law takes the pilot's table (curvature=...), and only it does")
    if f_in is not None and not 0.0 <= f_in <= 0.5:
        raise ValueError(f"f_in must lie in [0, 1/2] (the model's bound on a share), got {f_in}")
    if not 0.0 <= kappa <= 1.0:
        raise ValueError(f"kappa is a cosine's size and must lie in [0, 1], got {kappa}")


def _starts(fit_f_in: bool) -> list[np.ndarray]:
    """The fit's starting points: (logit f_in,) logit phi, log lambda (in its natural unit)."""
    return [np.array([*([_logit(f)] if fit_f_in else []), _logit(ph), math.log(lam)])
            for f, ph in ((0.01, 0.05), (0.1, 0.3)) for lam in (0.01, 1.0)]


def _shares(x: np.ndarray) -> tuple[float, float]:
    return tuple(float(0.5 / (1.0 + math.exp(-v))) for v in np.clip(x, -30, 30))  # type: ignore[return-value]


def _logit(p: float) -> float:
    return math.log(p / (0.5 - p))
