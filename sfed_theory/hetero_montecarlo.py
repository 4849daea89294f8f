"""Monte Carlo simulation of the heterogeneous-rank model of :mod:`sfed_theory.hetero`.

Written from the model's statement, not from the index expressions: every client's factors are
drawn at full width ``R = max r_i`` and zero-padded by a 0/1 mask, uploads carry the client's own
gamma, and the server aggregates by zero-padding (average of padded factors), stacking (the exact
sum of products) or SVD (the exact sum, then each client downloads its best rank-``r_c``
approximation). The SVD download has no closed form; this module is where it is measured.
:func:`expected_hetero` evaluates the derived closed form at the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sfed_theory.assumptions import SYM
from sfed_theory.hetero import (
    A_INITS, C, QUANTITIES_H, REGIMES_H, SCHEME_TEXT, VARIANTS, NoClosedForm, at_mix, check_hetero, derive_hetero,
)
from sfed_theory.montecarlo import Estimate

__all__ = ["HeteroParams", "simulate_hetero", "expected_hetero", "simulated_quantities"]


@dataclass(frozen=True)
class HeteroParams:
    """Numbers for one instance of the heterogeneous-rank model."""

    d: int
    k: int
    ranks: tuple[int, ...]
    weights: tuple[float, ...] | None = None  # one per client, normalised internally; None = equal
    gammas: tuple[float, ...] | None = None  # gamma_i each client trains and uploads with; None = all 1
    rho: float = 0.0
    s_A: float = 1.0
    s_B: float = 1.0
    s_dA: float = 1.0
    tau: float = 1.0
    eta: float = 1.0
    x_norm2: float = 1.0
    client: int = 0  # the client c whose download is measured

    def __post_init__(self) -> None:
        if self.d < 1 or self.k < 1:
            raise ValueError(f"d and k must be >= 1, got d={self.d}, k={self.k}")
        if not self.ranks or any(int(r) != r or r < 1 for r in self.ranks):
            raise ValueError(f"ranks must list at least one integer >= 1, got {self.ranks}")
        for name in ("weights", "gammas"):
            v = getattr(self, name)
            if v is not None and len(v) != len(self.ranks):
                raise ValueError(f"{name} has {len(v)} entries but ranks has {len(self.ranks)}")
        if not 0.0 <= self.rho <= 1.0:
            raise ValueError(f"rho must lie in [0, 1], got {self.rho}")
        if not 0 <= self.client < len(self.ranks):
            raise ValueError(f"client must index a client in 0..{len(self.ranks) - 1}, got {self.client}")

    @property
    def p(self) -> np.ndarray:
        """Normalised client weights."""
        w = np.ones(len(self.ranks)) if self.weights is None else np.asarray(self.weights, dtype=float)
        return w / w.sum()

    @property
    def gamma(self) -> np.ndarray:
        """Each client's gamma."""
        return np.ones(len(self.ranks)) if self.gammas is None else np.asarray(self.gammas, dtype=float)


def simulated_quantities(scheme: str, variant: str, regime: str, a_init: str) -> tuple[str, ...]:
    """Quantities the simulation defines for this combination (closed form or not)."""
    out = []
    for q in QUANTITIES_H:
        try:
            check_hetero(q, scheme, variant, regime, a_init)
        except NoClosedForm:
            pass
        except ValueError:
            continue
        out.append(q)
    return tuple(out)


def _probe_x(params: HeteroParams, seed: int) -> np.ndarray:
    v = np.random.default_rng([seed, 7]).standard_normal(params.k)
    return v * math.sqrt(params.x_norm2) / np.linalg.norm(v)


def _truncate(dw: np.ndarray, rank: int) -> np.ndarray:
    """Best rank-``rank`` approximation of every sample (Eckart-Young: truncated SVD)."""
    u, sv, vt = np.linalg.svd(dw, full_matrices=False)
    r = min(rank, sv.shape[-1])
    return (u[..., :r] * sv[..., None, :r]) @ vt[..., :r, :]


def _batch(rng: np.random.Generator, prm: HeteroParams, combo: tuple[str, str, str, str], s: int, x: np.ndarray,
           qs: tuple[str, ...]) -> dict[str, np.ndarray]:
    scheme, variant, regime, a_init = combo
    ranks = np.asarray(prm.ranks)
    kk, big_r, d, k = ranks.size, int(ranks.max()), prm.d, prm.k
    mask = (np.arange(big_r)[None, :] < ranks[:, None]).astype(float)  # (K, R): [l <= r_i]
    p, gam = prm.p, prm.gamma

    def correlated(*shape: int) -> np.ndarray:
        common = rng.standard_normal((s, 1, *shape))
        private = rng.standard_normal((s, kk, *shape))
        return math.sqrt(prm.rho) * common + math.sqrt(1.0 - prm.rho) * private

    a_shared = prm.s_A * rng.standard_normal((s, big_r, k))
    a_init_i = a_shared[:, None] if a_init == "shared" else prm.s_A * rng.standard_normal((s, kk, big_r, k))
    a_client = a_init_i * mask[None, :, :, None]  # the leading r_i rows
    g_i = None
    if regime == "adam":
        b_i = prm.s_B * correlated(d, big_r) * mask[None, :, None, :]
        a_i = a_client + prm.s_dA * correlated(big_r, k) * mask[None, :, :, None] if variant == "fedit" else a_client
    else:
        g_i = prm.tau * correlated(d, k)
        b_i = -prm.eta * gam[None, :, None, None] * (g_i @ np.swapaxes(a_client, -1, -2))
        a_i = a_client
    a_i = np.broadcast_to(a_i, (s, kk, big_r, k))
    up = gam[None, :, None, None] * b_i  # what each client's B contributes to the server model
    exact = np.einsum("c,scdr,scrk->sdk", p, up, a_i)
    dwc = None
    if scheme == "zero-pad":
        b_server = np.einsum("c,scdr->sdr", p, up)
        a_server = a_shared if variant == "ffa" else np.einsum("c,scrk->srk", p, a_i)
        dw = b_server @ a_server
        if any(q.startswith("download") for q in qs):
            dwc = (b_server * mask[prm.client][None, None, :]) @ a_server
    else:
        dw = exact
        if any(q.startswith("download") for q in qs):
            dwc = dw if scheme == "stack" else _truncate(dw, int(ranks[prm.client]))
    out: dict[str, np.ndarray] = {}
    for q in qs:
        if q == "adapter_output":
            out[q] = np.sum((dw @ x) ** 2, axis=1)
        elif q == "update_fro":
            out[q] = np.sum(dw**2, axis=(1, 2))
        elif q == "aggregation_error":
            out[q] = np.sum((dw - exact) ** 2, axis=(1, 2))
        elif q == "loss_change":
            assert g_i is not None
            out[q] = np.sum(np.einsum("c,scdk->sdk", p, g_i) * dw, axis=(1, 2))
        elif q == "download":
            out[q] = np.sum((dwc @ x) ** 2, axis=1)
        else:  # download_gap
            out[q] = np.sum(((dw - dwc) @ x) ** 2, axis=1)
    return out


def simulate_hetero(params: HeteroParams, scheme: str = "zero-pad", variant: str = "ffa", regime: str = "adam",
                    a_init: str = "shared", *, n_samples: int = 20_000, seed: int = 0,
                    quantities: tuple[str, ...] | None = None, batch: int = 4096) -> dict[str, Estimate]:
    """Vectorised Monte Carlo estimate (mean and standard error) of each quantity."""
    allowed = simulated_quantities(scheme, variant, regime, a_init) if scheme in SCHEME_TEXT and \
        variant in VARIANTS and regime in REGIMES_H and a_init in A_INITS else ()
    if not allowed:
        check_hetero("adapter_output", scheme, variant, regime, a_init)  # raises with the reason
    qs = allowed if quantities is None else tuple(quantities)
    for q in qs:
        if q not in allowed:
            raise ValueError(f"quantity {q!r} is not defined here; allowed: {', '.join(allowed)}")
    rng = np.random.default_rng(seed)
    x = _probe_x(params, seed)
    chunks: dict[str, list[np.ndarray]] = {q: [] for q in qs}
    done = 0
    while done < n_samples:
        s = min(batch, n_samples - done)
        for q, v in _batch(rng, params, (scheme, variant, regime, a_init), s, x, qs).items():
            chunks[q].append(v)
        done += s
    out = {}
    for q, parts in chunks.items():
        v = np.concatenate(parts)
        out[q] = Estimate(float(v.mean()), float(v.std(ddof=1) / math.sqrt(v.size)), int(v.size), v)
    return out


def expected_hetero(quantity: str, scheme: str, variant: str, regime: str, a_init: str,
                    params: HeteroParams) -> float:
    """The derived closed form evaluated at ``params`` (``c = 1``, profile ``h_i = gamma_i``)."""
    expr = derive_hetero(quantity, scheme, variant, regime, a_init).result
    expr = at_mix(expr, params.ranks, params.weights, tuple(params.gamma), client=params.client)
    values = {C: 1.0, SYM.d: params.d, SYM.k: params.k, SYM.rho: params.rho, SYM.s_A: params.s_A,
              SYM.s_B: params.s_B, SYM.s_dA: params.s_dA, SYM.tau: params.tau, SYM.eta: params.eta,
              SYM.X2: params.x_norm2}
    return float(expr.subs(values))
