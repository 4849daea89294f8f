"""Monte Carlo simulation of the random model of :mod:`sfed_theory.assumptions`.

``simulate`` draws whole batches of samples at once with numpy (vectorised over samples and
clients) and returns, for every quantity, the sample mean with its standard error, so a closed
form can be checked against ``mean +- z * SE``. ``simulate_loop`` is a plain Python loop over
samples (one small numpy draw per client per sample) written independently from the vectorised
code; it serves the benchmark as the baseline and as a second implementation.

Client correlation is generated as ``sqrt(rho) * Z_0 + sqrt(1 - rho) * Z_i`` (common plus
private part), which has exactly correlation ``rho`` between two clients at the same entry.
Partial participation draws ``K`` of ``N`` clients uniformly per sample and renormalises
their weights; by exchangeability of the clients only the sampled ones need simulating.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from sfed_theory.assumptions import REGIMES, SCHEMES
from sfed_theory.schemes import CLIENT_PROJECTIONS, QUANTITIES, base_scheme, check_names

__all__ = ["ModelParams", "Estimate", "simulate", "simulate_loop", "applicable_quantities"]


@dataclass(frozen=True)
class ModelParams:
    """Numbers for one instance of the random model (see :mod:`sfed_theory.assumptions`)."""

    d: int
    k: int
    r: int
    n_clients: int
    gamma: float = 1.0
    rho: float = 0.0
    weights: tuple[float, ...] | None = None  # one per client, normalised internally; None = equal
    participating: int | None = None  # K of N per round; None = all
    s_A: float = 1.0
    s_B: float = 1.0
    s_dA: float = 1.0
    tau: float = 1.0
    eta: float = 1.0
    x_norm2: float = 1.0
    f_in: float = 0.0  # refined model ("adam-refined"): input-coherent share of B's increment
    phi: float = 0.0  # refined model: share of that component's output direction along -g
    lam: float = 0.0  # refined model: output-space curvature, G_end = g x^T + lam dW C
    nu: float = 0.0  # refined model: the probe's isotropic input bulk, C = x x^T + nu I
    kappa: float = 1.0  # refined model: cos(z, x) of the probe gradient's input direction z and the spike x
    nu_g: float | None = None  # refined model: the gradient's token weighting's bulk, C_g = z z^T + nu_g I (None: nu)
    lam_s: float | None = None  # refined model: the curvature along the update's shared part dW_s (None: lam)

    def __post_init__(self) -> None:
        for name in ("d", "k", "r", "n_clients"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("rho", "f_in", "phi", "kappa"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.kappa < 1.0 and self.k < 2:
            raise ValueError(f"kappa < 1 needs a second input direction, k >= 2; got k={self.k}")
        for name in ("nu", "nu_g"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v >= 0.0):
                raise ValueError(f"{name} is an input variance and must be finite and >= 0, got {v}")
        if self.weights is not None and len(self.weights) != self.n_clients:
            raise ValueError(f"weights has {len(self.weights)} entries, n_clients={self.n_clients}")
        if self.participating is not None and not 1 <= self.participating <= self.n_clients:
            raise ValueError(f"participating must be in [1, n_clients], got {self.participating}")

    @property
    def gradient_bulk(self) -> float:
        """``nu_g``, the bulk of the gradient's token weighting (``nu`` where not given: one probe vector's C)."""
        return self.nu if self.nu_g is None else self.nu_g

    @property
    def shared_curvature(self) -> float:
        """``lam_s``, the curvature met by the update's shared part (``lam`` where not given: one curvature)."""
        return self.lam if self.lam_s is None else self.lam_s

    @property
    def n_averaged(self) -> int:
        """Clients averaged per round (K)."""
        return self.n_clients if self.participating is None else self.participating


@dataclass(frozen=True)
class Estimate:
    """Sample mean of a per-sample quantity with its standard error."""

    mean: float
    se: float
    n: int
    samples: np.ndarray = field(repr=False, compare=False, default_factory=lambda: np.empty(0))

    def ci(self, z: float = 1.96) -> tuple[float, float]:
        """``(mean - z*SE, mean + z*SE)``."""
        return self.mean - z * self.se, self.mean + z * self.se

    def contains(self, value: float, z: float = 1.96, atol: float = 0.0) -> bool:
        """Whether ``value`` lies in the ``z`` interval (widened by ``atol`` for round-off)."""
        lo, hi = self.ci(z)
        return lo - atol <= value <= hi + atol


def applicable_quantities(scheme: str, regime: str) -> tuple[str, ...]:
    """Quantities defined for this scheme and regime."""
    out = []
    for q in QUANTITIES:
        try:
            check_names(q, scheme, regime)
        except ValueError:
            continue
        out.append(q)
    return tuple(out)


def _probe_x(params: ModelParams, seed: int) -> np.ndarray:
    # a fixed random direction: the closed forms depend on x only through ||x||^2
    v = np.random.default_rng([seed, 7]).standard_normal(params.k)
    return v * math.sqrt(params.x_norm2) / np.linalg.norm(v)


def _gradient_input(params: ModelParams, x: np.ndarray, seed: int) -> np.ndarray:
    """The refined regime's z: ``||z||^2 = ||x||^2`` at cosine ``kappa`` with ``x`` (a fixed random orthogonal
    part); ``x`` itself at ``kappa = 1``."""
    if params.kappa == 1.0:
        return x
    v = np.random.default_rng([seed, 11]).standard_normal(params.k)
    v -= (v @ x) / (x @ x) * x
    v *= np.linalg.norm(x) / np.linalg.norm(v)
    return params.kappa * x + math.sqrt(1.0 - params.kappa**2) * v


def _weights(rng: np.random.Generator, params: ModelParams, s: int) -> np.ndarray:
    """Per-sample weights (s, K) of the averaged clients."""
    kk, n = params.n_averaged, params.n_clients
    if params.weights is None:
        return np.full((s, kk), 1.0 / kk)
    w = np.asarray(params.weights, dtype=float)
    if kk == n:
        return np.broadcast_to(w / w.sum(), (s, kk)).copy()
    pick = np.argsort(rng.random((s, n)), axis=1)[:, :kk]
    pw = w[pick]
    return pw / pw.sum(axis=1, keepdims=True)


def _batch(rng: np.random.Generator, params: ModelParams, scheme: str, regime: str, s: int,
           x: np.ndarray, z: np.ndarray, quantities: tuple[str, ...]) -> dict[str, np.ndarray]:
    kk, d, k, r = params.n_averaged, params.d, params.k, params.r
    rho = params.rho

    def correlated(*shape: int) -> np.ndarray:
        common = rng.standard_normal((s, 1, *shape))
        private = rng.standard_normal((s, kk, *shape))
        return math.sqrt(rho) * common + math.sqrt(1.0 - rho) * private

    p = _weights(rng, params, s)
    a = params.s_A * rng.standard_normal((s, r, k))
    base = base_scheme(scheme)
    # each client's A init: the broadcast A, or (an "-indep" scheme) its own independent draw
    a_init = (params.s_A * rng.standard_normal((s, kk, r, k)) if base != scheme
              else np.broadcast_to(a[:, None], (s, kk, r, k)))
    g = params.tau * rng.standard_normal((s, d))  # the probe's output gradient (refined B is built from it)
    gam = params.gamma
    g_clients = None
    if regime == "sgd":
        g_clients = params.tau * correlated(d, k)
        b_i = -gam * params.eta * g_clients @ np.swapaxes(a_init, 2, 3)
        a_i = a_init
    else:
        b_i = params.s_B * correlated(d, r)
        b_shared = None
        if regime == "adam-refined":
            ax = a_init @ z  # (s, K, r): built from A z, z the probe gradient's input direction
            scale = math.sqrt(params.f_in) * params.s_B / (params.s_A * math.sqrt(params.x_norm2))  # ||z|| = ||x||
            b_shared = scale * (-math.sqrt(params.phi) / params.tau) * g[:, None, :, None] * ax[:, :, None, :]
            noise = math.sqrt(1 - params.phi) * rng.standard_normal((s, kk, d))
            b_i = b_shared + scale * noise[..., None] * ax[:, :, None, :] + math.sqrt(1 - params.f_in) * b_i
        a_i = a_init + params.s_dA * correlated(r, k) if base != "ffa" else a_init
    a_i = np.broadcast_to(a_i, (s, kk, r, k))
    # client c drawn with probability p_c: FedSA quantities are p-weighted means over clients' own models
    c = (rng.random((s, 1)) > np.cumsum(p, axis=1)).sum(axis=1).clip(max=kk - 1) if base == "fedsa" else None
    b_f, a_f, dw, dw_exact = _aggregate(scheme, gam, p, b_i, a_i, a, c, "aggregation_error" in quantities)
    x_g = z if regime == "adam-refined" else x  # the probe gradient's input direction
    probe = g[:, :, None] * x_g[None, None, :]  # g x_g^T, (s, d, k)
    nu = params.nu if regime == "adam-refined" else 0.0  # the tokens' input bulk: C = x x^T + nu I
    if regime == "adam-refined":  # each token's output gradient after the step, as the gradient weighs the tokens:
        dw_s = _aggregate(scheme, gam, p, b_shared, a_i, a, c, False)[2]  # lam (dW - dW_s) C_g + lam_s dW_s C_g
        for part, lam in ((dw, params.lam), (dw_s, params.shared_curvature - params.lam)):
            probe = probe + lam * ((part @ z)[:, :, None] * z[None, None, :] + params.gradient_bulk * part)
    out: dict[str, np.ndarray] = {}
    if "adapter_output" in quantities:
        out["adapter_output"] = np.sum((dw @ x) ** 2, axis=1) + nu * np.sum(dw**2, axis=(1, 2))
    if "shared_output" in quantities:
        out["shared_output"] = np.sum((dw_s @ x) ** 2, axis=1) + nu * np.sum(dw_s**2, axis=(1, 2))
    if "update_fro" in quantities:
        out["update_fro"] = np.sum(dw**2, axis=(1, 2))
    if "grad_A" in quantities:
        out["grad_A"] = gam**2 * np.sum((np.swapaxes(b_f, 1, 2) @ probe) ** 2, axis=(1, 2))
    if "grad_B" in quantities:
        out["grad_B"] = gam**2 * np.sum((probe @ np.swapaxes(a_f, 1, 2)) ** 2, axis=(1, 2))
    if "output_client" in quantities:  # p-weighted mean over the client c of its own update's output
        own_w = gam * b_i @ a_i
        own = np.sum((own_w @ x) ** 2, axis=2) + nu * np.sum(own_w**2, axis=(2, 3))
        out["output_client"] = np.einsum("sc,sc->s", p, own)
    if "grad_A_client" in quantities:
        out["grad_A_client"] = gam**2 * np.einsum("sc,sc->s", p, np.sum(
            (np.swapaxes(b_i, 2, 3) @ probe[:, None]) ** 2, axis=(2, 3)))
    if "grad_B_client" in quantities or "grad_B_increment" in quantities:
        d_i = a_i - a_init  # the A increments
        if "grad_B_client" in quantities:
            out["grad_B_client"] = gam**2 * np.einsum("sc,sc->s", p, np.sum(
                (probe[:, None] @ np.swapaxes(d_i, 2, 3)) ** 2, axis=(2, 3)))
        if "grad_B_increment" in quantities:
            d_bar = np.einsum("sc,scrk->srk", p, d_i)
            out["grad_B_increment"] = gam**2 * np.sum((probe @ np.swapaxes(d_bar, 1, 2)) ** 2, axis=(1, 2))
    if "aggregation_error" in quantities:
        out["aggregation_error"] = np.sum((dw - dw_exact) ** 2, axis=(1, 2))
    if "loss_change" in quantities:
        if regime == "adam-refined":
            grad_w = g[:, :, None] * x_g[None, None, :]
        else:
            assert g_clients is not None
            grad_w = g_clients[np.arange(s), c] if base == "fedsa" else np.einsum("sc,scdk->sdk", p, g_clients)
        out["loss_change"] = np.sum(grad_w * dw, axis=(1, 2))
    return out


def _aggregate(scheme: str, gam: float, p: np.ndarray, b_i: np.ndarray, a_i: np.ndarray, a: np.ndarray,
               c: np.ndarray | None, with_exact: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """``(B, A, dW, dW_exact)`` after the server's aggregation of the clients' ``(b_i, a_i)`` (s, K, ...):
    the adapter's factors where gradients are taken, its update, and the exact average of products (None
    unless ``with_exact`` or the scheme aggregates exactly: the K products are the costliest step)."""
    base = base_scheme(scheme)
    b_bar = np.einsum("sc,scdr->sdr", p, b_i)
    a_bar = np.einsum("sc,scrk->srk", p, a_i)
    exact = with_exact or base == "exact"
    dw_exact = gam * np.einsum("sc,scdk->sdk", p, b_i @ a_i) if exact else None
    if scheme == "ffa":
        b_f, a_f = b_bar, a
    elif base == "fedsa":
        assert c is not None
        b_f, a_f = b_i[np.arange(len(c)), c], a_bar
    elif scheme == "exact":
        b_f, a_f = np.zeros_like(b_bar), a  # merged into W0; the adapter restarts at (0, A)
    else:
        b_f, a_f = b_bar, a_bar
    dw = dw_exact if base == "exact" else gam * b_f @ a_f
    return b_f, a_f, dw, dw_exact


def _estimates(values: dict[str, list[np.ndarray]]) -> dict[str, Estimate]:
    res = {}
    for q, chunks in values.items():
        v = np.concatenate(chunks)
        se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else float("inf")
        res[q] = Estimate(float(v.mean()), se, int(v.size), v)
    return res


def _check(scheme: str, regime: str, quantities: tuple[str, ...] | None) -> tuple[str, ...]:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; allowed: {', '.join(SCHEMES)}")
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; allowed: {', '.join(REGIMES)}")
    if quantities is None:
        return applicable_quantities(scheme, regime)
    for q in quantities:
        check_names(q, scheme, regime)
    return tuple(quantities)


def simulate(params: ModelParams, scheme: str = "ffa", regime: str = "adam", *, n_samples: int = 20_000,
             seed: int = 0, quantities: tuple[str, ...] | None = None, batch: int = 4096) -> dict[str, Estimate]:
    """Vectorised Monte Carlo estimate of every applicable quantity (mean and standard error)."""
    qs = _check(scheme, regime, quantities)
    rng = np.random.default_rng(seed)
    x = _probe_x(params, seed)
    z = _gradient_input(params, x, seed)
    values: dict[str, list[np.ndarray]] = {q: [] for q in qs}
    done = 0
    while done < n_samples:
        s = min(batch, n_samples - done)
        for q, v in _batch(rng, params, scheme, regime, s, x, z, qs).items():
            values[q].append(v)
        done += s
    return _estimates(values)


def simulate_loop(params: ModelParams, scheme: str = "ffa", regime: str = "adam", *, n_samples: int = 2_000,
                  seed: int = 0) -> dict[str, Estimate]:
    """Reference sampler: a plain Python loop over samples and clients (for the benchmark); the
    canonical regimes and the aggregate's quantities only (not the client projections)."""
    if regime == "adam-refined" or base_scheme(scheme) != scheme:
        raise ValueError("simulate_loop covers the canonical regimes 'adam' and 'sgd' with one broadcast A init; "
                         "use simulate for 'adam-refined' and the '-indep' schemes")
    qs = tuple(q for q in _check(scheme, regime, None) if q not in CLIENT_PROJECTIONS)  # the aggregate's own
    rng = np.random.default_rng(seed)
    x = _probe_x(params, seed)
    kk, n = params.n_averaged, params.n_clients
    w_all = np.ones(n) if params.weights is None else np.asarray(params.weights, dtype=float)
    sr, sp_ = math.sqrt(params.rho), math.sqrt(1.0 - params.rho)
    gam = params.gamma
    values: dict[str, list[float]] = {q: [] for q in qs}
    for _ in range(n_samples):
        chosen = rng.permutation(n)[:kk] if kk < n else np.arange(n)
        p = w_all[chosen] / w_all[chosen].sum()
        a = params.s_A * rng.standard_normal((params.r, params.k))
        common_b = rng.standard_normal((params.d, params.r))
        common_da = rng.standard_normal((params.r, params.k))
        common_g = rng.standard_normal((params.d, params.k))
        bs, as_, gs = [], [], []
        for _c in range(kk):
            if regime == "adam":
                bs.append(params.s_B * (sr * common_b + sp_ * rng.standard_normal((params.d, params.r))))
                if scheme == "ffa":
                    as_.append(a)
                else:
                    as_.append(a + params.s_dA * (sr * common_da + sp_ * rng.standard_normal((params.r, params.k))))
            else:
                gi = params.tau * (sr * common_g + sp_ * rng.standard_normal((params.d, params.k)))
                gs.append(gi)
                bs.append(-gam * params.eta * gi @ a.T)
                as_.append(a)
        b_bar = sum(pi * bi for pi, bi in zip(p, bs))
        a_bar = sum(pi * ai for pi, ai in zip(p, as_))
        exact = gam * sum(pi * bi @ ai for pi, bi, ai in zip(p, bs, as_))
        if scheme == "fedsa":
            c = int(rng.choice(kk, p=p))  # FedSA: client c drawn with probability p_c (p-weighted mean)
            b_f, a_f = bs[c], a_bar
        elif scheme == "exact":
            b_f, a_f = np.zeros_like(b_bar), a
        else:
            b_f, a_f = b_bar, (a if scheme == "ffa" else a_bar)
        dw = exact if scheme == "exact" else gam * b_f @ a_f
        g = params.tau * rng.standard_normal(params.d)
        row = {
            "adapter_output": float(np.sum((dw @ x) ** 2)),
            "update_fro": float(np.sum(dw**2)),
            "grad_A": gam**2 * float(np.sum((b_f.T @ g) ** 2)) * float(x @ x),
            "grad_B": gam**2 * float(g @ g) * float(np.sum((a_f @ x) ** 2)),
            "aggregation_error": float(np.sum((dw - exact) ** 2)),
        }
        if regime == "sgd":
            grad_w = gs[c] if scheme == "fedsa" else sum(pi * gi for pi, gi in zip(p, gs))
            row["loss_change"] = float(np.sum(grad_w * dw))
        for q in qs:
            values[q].append(row[q])
    return _estimates({q: [np.asarray(v)] for q, v in values.items()})
