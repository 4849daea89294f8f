"""The refined model (``sfed_theory`` regime ``"adam-refined"``), estimated on small-N runs only.

The refined random model adds three mechanisms to the canonical one (see
``sfed_theory.assumptions.REGIMES["adam-refined"]`` and docs/THEORY.md): an input-coherent share
``f_in`` of each client's B increment, ``u_i (A x)^T``; a share ``phi`` of that component's output
direction along the loss gradient, common to all clients; and the output-space curvature ``lam``:
within the round the probe's output gradient moves by ``lam`` times the output change ``dW x``. Its parameters are estimated from the PILOT part of
a grid (runs with ``N <= pilot_max_n``, default 4) and then predict every grid point, in particular
N = 16 and the rank dependence. Which parameter comes from what:

* ``s_B``, ``s_dA``: seed-mean RMS client increments (``inc_B_rms``, ``inc_A_rms``) of the pilot runs
  of the same rule (the client increment's size as a measured input; under Adam it barely moves).
* ``tau2x2``: the probe gradient's size ``tau^2 ||x||^2 = sum_l ||G_l||_F^2 / (L d)``, from dL/dB at the
  round's start (B = 0, the same at every N): ``grad_B^2 / (gamma^2 r s_A^2 L d)``.
* ``rho_f``: the mean measured Frobenius correlation ``rho_ratio`` of the pilot runs with N > 1; the
  model's correlation of the non-coherent part is then ``(rho_f - f_in phi) / (1 - f_in)`` so that the
  model reproduces the measured Frobenius correlation.
* ``f_in``, ``phi``, ``lam``: least squares of ``log measured - log predicted`` over the pilot points of
  the four quantities, all rules and ranks, with one free scale per quantity: only shapes are
  fitted, absolute sizes are not predicted. (The harness's ``curvature`` column, the curvature along
  the update in weight space, is a diagnostic: it grows with r, which an output-space curvature
  alone does not give; see docs/THEORY.md.)

Layers of one model are treated alike (MiniLM's adapted layers are all 384 x 384): the ``__all__``
value of a quantity is ``sqrt(L)`` times the per-layer prediction, a constant that the free scale takes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from validation.metrics import ALL

__all__ = ["REFINED_REGIME", "PILOT_MAX_N", "RefinedParams", "fit_refined", "refined_kwargs"]

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
    tau2x2: float
    s_B: dict[str, float]  # per rule
    s_dA: dict[str, float]
    d: int
    k: int
    pilot_max_n: int
    n_pilot_points: int
    rms_log_residual: float  # of the pilot fit, all quantities

    @property
    def rho(self) -> float:
        """The model's correlation of the non-coherent part of B (reproduces ``rho_f``)."""
        return (self.rho_f - self.f_in * self.phi) / (1.0 - self.f_in) if self.f_in < 1 else 0.0

    def describe(self) -> str:
        """One line: the estimates and where each comes from."""
        return (f"{self.scheme}/{self.partition}: f_in={self.f_in:.4f} phi={self.phi:.3f} lambda={self.lam:.4g} "
                f"(fitted: pilot shapes, {self.n_pilot_points} points with N <= {self.pilot_max_n}, rms log residual "
                f"{self.rms_log_residual:.3f}); rho_F={self.rho_f:+.4f} (pilot rho_ratio) -> model rho={self.rho:+.4f}; "
                f"tau^2|x|^2={self.tau2x2:.4g} (start dL/dB); "
                f"s_B={_fmt(self.s_B)} s_dA={_fmt(self.s_dA)} (pilot increments)")

    def to_row(self) -> dict:
        """Flat dict for a CSV."""
        d = asdict(self)
        d["rho"] = self.rho
        d["s_B"], d["s_dA"] = _fmt(self.s_B), _fmt(self.s_dA)
        return d


def _fmt(m: dict[str, float]) -> str:
    return ",".join(f"{k}:{v:.4g}" for k, v in sorted(m.items()))


def refined_kwargs(p: RefinedParams, rule: str) -> dict:
    """Keyword arguments of :func:`sfed_theory.predict.predicted_norm` for ``rule`` under ``p``."""
    s_a = 1.0 / math.sqrt(3 * p.k)  # peft's Kaiming-uniform A init U(-1/sqrt(k), 1/sqrt(k))
    kw = dict(regime=REFINED_REGIME, scheme=p.scheme, d=p.d, k=p.k, s_A=s_a, s_B=p.s_B[rule],
              tau=math.sqrt(p.tau2x2), x_norm2=1.0, rho=p.rho, f_in=p.f_in, phi=p.phi, lam=p.lam)
    if p.s_dA.get(rule, math.nan) > 0:
        kw["s_dA"] = p.s_dA[rule]
    return kw


def _pilot_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Seed means of the ``__all__`` rows per (rule, rank, n_clients, n_participating)."""
    cols = [*QUANTITY_COLUMNS.values(), "grad_B", "gamma", "inc_B_rms", "inc_A_rms", "rho_ratio", "alpha"]
    return rows.groupby(["rule", "rank", "n_clients", "n_participating"], as_index=False)[cols].mean()


def fit_refined(rows: pd.DataFrame, *, pilot_max_n: int = PILOT_MAX_N) -> RefinedParams:
    """Estimate the refined model's parameters from the pilot runs of one (scheme, optimizer, partition).

    ``rows``: harness rows of that group at the round the theory describes (round 1), any N; only
    ``layer == "__all__"`` rows of non-diverged runs with ``n_clients <= pilot_max_n`` are used.
    Raises ValueError when the pilot part has too little to fit (fewer than two ranks or no N > 1)."""
    from sfed_theory.predict import predicted_norm

    a = rows[(rows.layer == ALL) & (~rows.diverged.astype(bool)) & (rows.n_clients <= pilot_max_n)]
    if a.empty or a["rank"].nunique() < 2 or not (a.n_clients > 1).any():
        raise ValueError(f"the pilot part (N <= {pilot_max_n}) needs >= 2 ranks and some N > 1 to fit the refined model")
    scheme, part = str(a.scheme.iloc[0]), str(a.partition.iloc[0]) if "partition" in a else "?"
    d, k, n_layers = int(a.d_out.iloc[0]), int(a.k_in.iloc[0]), int(rows[rows.layer != ALL].layer.nunique())
    t = _pilot_table(a)
    s_a2 = 1.0 / (3 * k)
    tau2x2 = float(np.mean(t.grad_B**2 / (t.gamma**2 * t["rank"] * s_a2 * n_layers * d)))
    s_b = t.groupby("rule").inc_B_rms.mean().to_dict()
    s_da = t.groupby("rule").inc_A_rms.mean().to_dict()
    rho_f = float(a.loc[a.n_clients > 1, "rho_ratio"].mean())
    meas = {q: np.log(t[c].to_numpy()) for q, c in QUANTITY_COLUMNS.items() if (t[c] > 0).all()}

    def params(f: float, ph: float, lam: float, resid: float = math.nan) -> RefinedParams:
        return RefinedParams(scheme, part, f, ph, rho_f, lam, tau2x2, s_b, s_da, d, k, pilot_max_n, len(t), resid)

    # lambda's natural unit: the probe gradient's size over the size of the output change
    base = params(0.0, 0.0, 0.0)
    out0 = np.median([predicted_norm("adapter_output", row.rule, rank=int(row.rank), n_clients=int(row.n_clients),
                                     participating=int(row.n_participating), alpha=float(row.alpha),
                                     **refined_kwargs(base, row.rule)) for row in t.itertuples()])
    lam_unit = math.sqrt(d * tau2x2) / out0

    def residuals(x: np.ndarray) -> np.ndarray:
        p = params(*_shares(x[:2]), lam_unit * math.exp(float(np.clip(x[2], -30, 30))))
        if not -0.99 < p.rho < 1:
            return np.full(sum(v.size for v in meas.values()), 1e3)
        out = []
        for q, y in meas.items():
            pred = []
            for row in t.itertuples():
                kw = refined_kwargs(p, row.rule)
                pred.append(predicted_norm(q, row.rule, rank=int(row.rank), n_clients=int(row.n_clients),
                                           participating=int(row.n_participating), alpha=float(row.alpha), **kw))
            lp = np.log(np.maximum(pred, 1e-300))
            r = y - lp
            out.append(r - r.mean())  # one free scale per quantity
        return np.concatenate(out)

    def loss(x: np.ndarray) -> float:
        return float(np.sum(residuals(x) ** 2))

    starts = [np.array([_logit(f), _logit(ph), math.log(lam)]) for f in (0.01, 0.1) for ph in (0.05, 0.5)
              for lam in (0.01, 1.0)]
    best = min((minimize(loss, s, method="Nelder-Mead", options={"xatol": 1e-4, "fatol": 1e-10, "maxiter": 1500})
                for s in starts), key=lambda r: r.fun)
    f, ph = _shares(best.x[:2])
    rms = float(np.sqrt(best.fun / max(1, sum(v.size for v in meas.values()))))
    return params(f, ph, lam_unit * math.exp(float(best.x[2])), rms)


def _shares(x: np.ndarray) -> tuple[float, float]:
    return tuple(float(1.0 / (1.0 + math.exp(-v))) for v in np.clip(x, -30, 30))  # type: ignore[return-value]


def _logit(p: float) -> float:
    return math.log(p / (1 - p))
