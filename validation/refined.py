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
* ``rho_f``: the mean measured Frobenius correlation ``rho_ratio`` of the pilot runs with N > 1; the
  model's correlation of the non-coherent part is then ``(rho_f - f_in phi) / (1 - f_in)`` so that the
  model reproduces the measured Frobenius correlation.
* ``rho_skew`` (a label-skewed split, when the same grid has IID runs): on a split whose clients' label
  shares add up to the global ones (Dirichlet), the part of each client's increment that its label skew
  causes sums to about zero over the clients. That part, a share ``s`` of the increment's variance, then
  correlates -1/(K-1) between two clients and cancels in the average: the pairwise correlation at K
  clients is ``rho_f - s/(K-1)`` with ``rho_f`` the correlation without skew. ``rho_f`` is taken from the
  IID pilot runs of the same scheme (the same batches, no skew) and ``s = (K-1) (rho_f - rho_K)`` from the
  skewed pilot runs, so the pilot's own correlation is reproduced and N = 16 is predicted.
* ``f_in``, ``phi``, ``lam``: least squares of ``log measured - log predicted`` over the pilot points of
  the four quantities, all rules and ranks, with one free scale per quantity: only shapes are
  fitted, absolute sizes are not predicted.

Layers of one model are treated alike (MiniLM's adapted layers are all 384 x 384): the ``__all__``
value of a quantity is ``sqrt(L)`` times the per-layer prediction, a constant that the free scale takes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from validation.metrics import ALL

__all__ = ["REFINED_REGIME", "PILOT_MAX_N", "QUANTITY_COLUMNS", "RefinedParams", "fit_refined", "predict_points",
           "predicted_slope"]

REFINED_REGIME = "adam-refined"
PILOT_MAX_N = 4
QUANTITY_COLUMNS = {"adapter_output": "adapter_rms", "update_fro": "update_fro", "grad_A": "grad_A_end",
                    "grad_B": "grad_B_end"}


@dataclass(frozen=True)
class RefinedParams:
    """Estimated parameters of the refined model for one (scheme, optimizer, partition)."""

    scheme: str
    partition: str
    f_in: float
    phi: float
    rho_f: float  # measured Frobenius correlation (pilot mean)
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
    rho_skew: float = 0.0  # s: variance share of a zero-sum label-skew part (0: none, or no IID runs)

    @property
    def rho(self) -> float:
        """The model's correlation of the non-coherent part of B without label skew (reproduces ``rho_f``)."""
        return (self.rho_f - self.f_in * self.phi) / (1.0 - self.f_in) if self.f_in < 1 else 0.0

    def rho_at(self, k):
        """:attr:`rho` at ``k`` clients averaged (a number or an array): the skew part lowers the pairwise
        correlation by ``rho_skew / (k - 1)`` (nothing with one client)."""
        k = np.asarray(k, dtype=float)
        pair = self.rho_f - self.rho_skew / np.maximum(k - 1.0, 1.0) * (k > 1)
        return (pair - self.f_in * self.phi) / (1.0 - self.f_in) if self.f_in < 1 else np.zeros_like(k)

    def describe(self) -> str:
        """One line: the estimates and where each comes from."""
        skew = f", label-skew share s={self.rho_skew:.4f} (rho at K clients = rho - s/(K-1))" if self.rho_skew else ""
        return (f"{self.scheme}/{self.partition} [{','.join(self.quantities)}]: f_in={self.f_in:.4f} phi={self.phi:.3f} "
                f"lambda={self.lam:.4g} (fitted: pilot shapes, {self.n_pilot_points} points with N <= {self.pilot_max_n}, "
                f"rms log residual {self.rms_log_residual:.3f}); rho={self.rho_f:+.4f} (pilot {self.rho_column}"
                f"{', of the IID runs' if self.rho_skew else ''}) -> model rho={self.rho:+.4f}{skew}; "
                f"tau^2|x|^2 per rank={_fmt(self.tau2x2)} (start dL/dB); s_B={_fmt(self.s_B)} "
                f"s_dA={_fmt(self.s_dA)} (pilot increments)")

    def to_row(self) -> dict:
        """Flat dict for a CSV."""
        d = asdict(self)
        d["rho"] = self.rho
        d["quantities"] = ",".join(self.quantities)
        for key in ("tau2x2", "s_B", "s_dA"):
            d[key] = _fmt(getattr(self, key))
        return d


def _fmt(m: dict) -> str:
    return ",".join(f"{k}:{v:.4g}" for k, v in sorted(m.items()))


def predict_points(p: RefinedParams, quantity: str, rule: str, ranks, ns, ks, alpha: float) -> np.ndarray:
    """``sqrt(E[quantity])`` of the refined model at grid points (rank, N, K clients averaged); gamma
    from the rule at K, as the harness sets it. Ranks without a pilot ``tau2x2`` use the pilot mean."""
    from sfed_theory.predict import moment_function, weight_sums

    r, n, kk = (np.atleast_1d(np.asarray(v, dtype=float)) for v in (ranks, ns, ks))
    gamma = np.array([_gamma(rule, alpha, int(a), int(b)) for a, b in zip(r, kk)])
    t_mean = float(np.mean(list(p.tau2x2.values())))
    tau = np.sqrt([p.tau2x2.get(int(a), t_mean) for a in r])
    s_a = 1.0 / math.sqrt(3 * p.k)  # peft's Kaiming-uniform A init U(-1/sqrt(k), 1/sqrt(k))
    s_da = p.s_dA.get(rule, 0.0) or p.s_B[rule]
    f = moment_function(quantity, p.scheme, REFINED_REGIME)
    m = f(gamma, p.d, p.k, r, kk, p.rho_at(kk), s_a, p.s_B[rule], s_da, tau, 1.0, 1.0, p.f_in, p.phi, p.lam,
          *weight_sums(kk))
    return np.sqrt(np.maximum(np.broadcast_to(m, r.shape), 0.0))


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
                unskewed_rho: float | None = None) -> RefinedParams:
    """Estimate the refined model's parameters from the pilot runs of one (scheme, optimizer, partition).

    ``rows``: harness rows of that group at the round the theory describes (round 1), any N; only
    ``layer == "__all__"`` rows of non-diverged runs with ``n_clients <= pilot_max_n`` are used.
    ``quantities``: the quantities whose pilot shapes are fitted; ``rho_column``: the measured client
    correlation the model reproduces (``rho_ratio``, or a quantity's projected one: ``rho_out``,
    ``rho_gA``, ``rho_gB``). The shares are kept in [0, 1/2]: a share above one half would make the
    "client noise" smaller than the structure it is supposed to be noise around. ``unskewed_rho``: for a
    label-skewed split, the same correlation measured on IID pilot runs (see ``rho_skew`` in the module
    docstring); ``None`` takes the split's own pilot correlation at every N. Raises ValueError when the
    pilot part has too little to fit (fewer than two ranks or no N > 1)."""
    a = rows[(rows.layer == ALL) & (~rows.diverged.astype(bool)) & (rows.n_clients <= pilot_max_n)]
    if a.empty or a["rank"].nunique() < 2 or not (a.n_clients > 1).any():
        raise ValueError(f"the pilot part (N <= {pilot_max_n}) needs >= 2 ranks and some N > 1 to fit the refined model")
    scheme, part = str(a.scheme.iloc[0]), str(a.partition.iloc[0]) if "partition" in a else "?"
    d, k, n_layers = int(a.d_out.iloc[0]), int(a.k_in.iloc[0]), int(rows[rows.layer != ALL].layer.nunique())
    t = _pilot_table(a)
    t2 = t.grad_B**2 / (t.gamma**2 * t["rank"] * (1.0 / (3 * k)) * n_layers * d)
    tau2x2 = {int(r): float(v) for r, v in t2.groupby(t["rank"]).mean().items()}
    s_b = t.groupby("rule").inc_B_rms.mean().to_dict()
    s_da = t.groupby("rule").inc_A_rms.mean().to_dict()
    pairs = a[a.n_participating > 1]
    rho_f = float(pairs[rho_column].mean()) if unskewed_rho is None else float(unskewed_rho)
    skew = 0.0 if unskewed_rho is None else float(np.mean((pairs.n_participating - 1) * (rho_f - pairs[rho_column])))
    meas = {q: np.log(t[c].to_numpy()) for q, c in QUANTITY_COLUMNS.items() if q in quantities and (t[c] > 0).all()}
    groups = list(t.groupby("rule"))

    def params(f: float, ph: float, lam: float, resid: float = math.nan) -> RefinedParams:
        return RefinedParams(scheme, part, f, ph, rho_f, lam, tau2x2, s_b, s_da, d, k, pilot_max_n, len(t), resid,
                             tuple(meas), rho_column, skew)

    def predicted(p: RefinedParams, q: str) -> np.ndarray:
        out = np.empty(len(t))
        for rule, g in groups:
            out[g.index] = predict_points(p, q, rule, g["rank"], g.n_clients, g.n_participating, float(g.alpha.iloc[0]))
        return out

    # lambda's natural unit: the probe gradient's size over the size of the output change
    lam_unit = math.sqrt(d * np.mean(list(tau2x2.values()))) / float(np.median(predicted(params(0, 0, 0),
                                                                                        "adapter_output")))

    def loss(x: np.ndarray) -> float:
        p = params(*_shares(x[:2]), lam_unit * math.exp(float(np.clip(x[2], -30, 30))))
        if not all(-0.99 < v < 1 for v in np.atleast_1d(p.rho_at(np.array([2.0, 1e9])))):
            return 1e6
        total = 0.0
        for q, y in meas.items():
            r = y - np.log(np.maximum(predicted(p, q), 1e-300))
            total += float(np.sum((r - r.mean()) ** 2))  # one free scale per quantity
        return total

    starts = [np.array([_logit(f), _logit(ph), math.log(lam)]) for f, ph in ((0.01, 0.05), (0.1, 0.3))
              for lam in (0.01, 1.0)]
    best = min((minimize(loss, s, method="Nelder-Mead", options={"xatol": 1e-3, "fatol": 1e-8, "maxiter": 800})
                for s in starts), key=lambda r: r.fun)
    f, ph = _shares(best.x[:2])
    rms = float(np.sqrt(best.fun / max(1, sum(v.size for v in meas.values()))))
    return params(f, ph, lam_unit * math.exp(float(np.clip(best.x[2], -30, 30))), rms)


def _shares(x: np.ndarray) -> tuple[float, float]:
    return tuple(float(0.5 / (1.0 + math.exp(-v))) for v in np.clip(x, -30, 30))  # type: ignore[return-value]


def _logit(p: float) -> float:
    return math.log(p / (0.5 - p))
