"""Estimating the client correlation ``rho`` (and ``N_eff``) from one round's increments.

This is the estimator behind the adaptive rule ("sfed-adaptive"): each round the server looks at
the clients' adapter increments, estimates how correlated they are, smooths that across rounds,
and sets ``gamma = alpha * sqrt(N_eff / r)`` for the next round.

Model (``shared/THEORY.md``). Client ``i`` sends a flattened increment ``x_i`` in ``R^P``. Entries
have mean 0, variance ``s^2`` and correlation ``rho`` between two clients at the same entry. The
correlation is *uncentered*: real increments share a common mean direction (the signal every
client's data pushes towards), and that shared direction is exactly what ``rho`` measures. We do
not subtract the across-client mean or the per-vector mean; doing so would remove the very
quantity the scaling rule needs.

Estimators (both computed from the ``N x N`` Gram matrix ``G_ij = <x_i, x_j>``, so the cost is one
``N x N x P`` product and the increments may stay on their device):

``"ratio"`` (default, method of moments)
    With ``S = ||sum_i x_i||^2`` and ``Q = sum_i ||x_i||^2``: ``E[S] = P s^2 (N + N(N-1) rho)`` and
    ``E[Q] = N P s^2``, so ``rho_hat = (S/Q - 1) / (N - 1)``, i.e. the off-diagonal Gram mass over
    ``(N - 1)`` times the diagonal mass. It is scale-free, exactly unbiased at ``rho = 0`` (sign
    symmetry) and its plug-in ``N_eff`` is *exactly* the measured shrinkage of the aggregate:
    ``1 / (rho_hat + (1 - rho_hat)/N) = mean_i ||x_i||^2 / ||mean_i x_i||^2``. That shrinkage is
    what ``gamma`` must undo, which is why it is the default. When client norms differ, it counts
    the norm heterogeneity as extra shrinkage (like unequal weights); the cosine does not.
``"cosine"``
    Mean pairwise cosine similarity ``mean_{i<j} <x_i, x_j> / (||x_i|| ||x_j||)``: invariant to each
    client's own scale, so it measures the *angular* correlation only.

For Gaussian entries both have the same leading-order variance
``2 (1 - rho)^2 (1 + (N - 1) rho)^2 / (N (N - 1) P)`` (see :func:`rho_standard_error`; the benchmark
``bench/bench_adaptive.py`` measures both). ``P`` there is the number of *independent* entries;
real increments (low-rank, structured) have far fewer, so :func:`estimate_rho` also returns a
block-jackknife standard error over blocks of coordinates, which does not assume independence
between entries of one client beyond the block scale.

Weights. With client weights ``w_i`` (unnormalised, e.g. data sizes), pairs are weighted by
``w_i w_j``: ratio ``sum_{i!=j} w_i w_j G_ij / sum_{i!=j} w_i w_j (G_ii + G_jj)/2`` and cosine
``sum_{i!=j} w_i w_j C_ij / sum_{i!=j} w_i w_j``. Under the model both have ratio-of-expectations
``rho``; with equal weights they reduce to the unweighted forms. ``N_eff`` then uses
``sum p_i^2`` of the used clients (via :func:`sfed_theory.rules.effective_clients`).

Robustness. Fewer than two usable clients: ``rho`` is undefined (NaN, ``defined=False``); ``N_eff``
is 1 for one client. A client with a zero (or relatively negligible) increment, or zero weight, is
excluded and listed in ``excluded``. A negative raw estimate (possible with few clients) is
reported in ``rho_raw`` and clipped to ``[0, 1]`` in ``rho``. Non-finite entries raise
``ValueError``.

Changing ``gamma`` between rounds must not make the merged function jump: see
:func:`rescale_for_new_gamma`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sfed_theory.rules import effective_clients, weights_sum_squares

__all__ = [
    "METHODS",
    "RhoEstimate",
    "AdaptiveStep",
    "AdaptiveScaler",
    "estimate_rho",
    "estimate_rho_from_gram",
    "gram_blocks",
    "rho_standard_error",
    "rescale_for_new_gamma",
]

METHODS: tuple[str, ...] = ("ratio", "cosine")


# --------------------------------------------------------------------------------------------
# Result type
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RhoEstimate:
    """One round's estimate of the client correlation.

    Attributes
    ----------
    rho_raw:
        The unclipped estimate (may be negative with few clients; NaN when undefined).
    rho:
        ``rho_raw`` clipped to ``[0, 1]`` (NaN when undefined).
    n_eff:
        ``1 / (rho + (1 - rho) * sum p_i^2)`` over the used clients with ``rho`` clipped; 1.0 when
        exactly one client is usable, NaN when none is.
    n_clients:
        Number of clients given (rows of the increments).
    n_used:
        Number of clients that entered the estimate (non-zero increment and positive weight).
    excluded:
        Indices of the clients left out, for a zero increment or a zero weight.
    method:
        ``"ratio"`` or ``"cosine"``.
    se:
        Block-jackknife standard error of ``rho_raw`` over coordinate blocks (NaN when it cannot
        be computed: fewer than two blocks or an undefined estimate).
    se_analytic:
        The Gaussian, independent-entries standard error :func:`rho_standard_error` at the clipped
        estimate, equal weights, ``P`` entries (NaN when undefined or ``P`` unknown).
    used_weight_fraction:
        Share of the total weight carried by the used clients. If the server still averages the
        excluded clients' zero increments in, the aggregate is scaled by this factor on top of
        the ``N_eff`` shrinkage (a mean effect, not a correlation effect).
    n_entries:
        ``P``, the number of entries per client (0 when built from a Gram matrix without it).
    """

    rho_raw: float
    rho: float
    n_eff: float
    n_clients: int
    n_used: int
    excluded: tuple[int, ...]
    method: str
    se: float
    se_analytic: float
    used_weight_fraction: float
    n_entries: int = 0

    @property
    def defined(self) -> bool:
        """Whether ``rho`` could be estimated (at least two usable clients)."""
        return self.n_used >= 2 and math.isfinite(self.rho_raw)


# --------------------------------------------------------------------------------------------
# Gram matrices
# --------------------------------------------------------------------------------------------
def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def gram_blocks(increments: Any, n_blocks: int = 16) -> tuple[np.ndarray, np.ndarray, int]:
    """Gram matrices of the clients' increments over ``n_blocks`` contiguous coordinate blocks.

    Parameters
    ----------
    increments:
        ``(N, P)`` numpy array or torch tensor (or ``(N, ...)``, flattened per client). Torch
        tensors are reduced on their own device; only the ``N x N`` results come back.
    n_blocks:
        Number of contiguous coordinate blocks (capped at ``P``); 1 disables the jackknife.

    Returns
    -------
    (gram, blocks, P):
        ``gram`` is ``(N, N)`` float64, ``blocks`` is ``(n_blocks, N, N)`` with ``blocks.sum(0) ==
        gram``, and ``P`` the number of entries per client.

    Raises
    ------
    ValueError
        If the input is not at least 2-D, has no entries, or contains NaN or inf.
    """
    if isinstance(n_blocks, bool) or not isinstance(n_blocks, (int, np.integer)) or n_blocks < 1:
        raise ValueError(f"n_blocks must be an integer >= 1, got {n_blocks!r}")
    shape = tuple(getattr(increments, "shape", ()))
    if len(shape) >= 2 and shape[0] == 0:
        raise ValueError("increments have no clients (N = 0)")
    if _is_torch(increments):
        import torch

        if len(shape) < 2:
            raise ValueError(
                f"increments must have shape (N clients, P entries), got a tensor of shape {shape}"
            )
        x = increments.detach().reshape(shape[0], -1)
        if x.shape[1] == 0:
            raise ValueError("increments have no entries (P = 0); nothing to estimate from")
        if x.is_complex():
            raise ValueError("increments must be real, got a complex tensor")
        x = x.to(torch.float64)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("increments contain non-finite entries (NaN or inf); rho cannot be estimated")
        p = int(x.shape[1])
        k = min(int(n_blocks), p)
        parts = torch.tensor_split(x, k, dim=1)
        blocks = np.stack([(b @ b.T).cpu().numpy() for b in parts])
    else:
        try:
            arr = np.asarray(increments)
        except Exception as exc:  # pragma: no cover - exotic inputs
            raise ValueError(f"increments could not be converted to an array: {exc}") from None
        if arr.ndim >= 2 and arr.shape[0] == 0:
            raise ValueError("increments have no clients (N = 0)")
        if arr.ndim < 2:
            raise ValueError(
                f"increments must have shape (N clients, P entries), got an array of shape {arr.shape}"
            )
        if np.iscomplexobj(arr):
            raise ValueError("increments must be real, got a complex array")
        try:
            x = arr.reshape(arr.shape[0], -1).astype(np.float64, copy=False)
        except (TypeError, ValueError):
            raise ValueError(f"increments must be numeric, got dtype {arr.dtype}") from None
        if x.shape[1] == 0:
            raise ValueError("increments have no entries (P = 0); nothing to estimate from")
        if not np.all(np.isfinite(x)):
            raise ValueError("increments contain non-finite entries (NaN or inf); rho cannot be estimated")
        p = int(x.shape[1])
        k = min(int(n_blocks), p)
        blocks = np.stack([b @ b.T for b in np.array_split(x, k, axis=1)])
    gram = blocks.sum(axis=0)
    return gram, blocks, p


# --------------------------------------------------------------------------------------------
# The estimators on a Gram matrix
# --------------------------------------------------------------------------------------------
def _point_estimate(gram: np.ndarray, w: np.ndarray, method: str) -> float:
    """Weighted ratio / cosine estimate on the used clients' Gram matrix (no checks)."""
    ww = np.outer(w, w)
    np.fill_diagonal(ww, 0.0)
    diag = np.diag(gram)
    if method == "ratio":
        num = float(np.sum(ww * gram))
        den = float(np.sum(ww * (diag[:, None] + diag[None, :]) * 0.5))
    else:
        norms = np.sqrt(diag)
        cos = gram / np.outer(norms, norms)
        num = float(np.sum(ww * cos))
        den = float(np.sum(ww))
    if not den > 0 or not math.isfinite(num):
        return math.nan
    return num / den


def rho_standard_error(rho: float, n_clients: int, n_entries: int) -> float:
    """Leading-order standard error of both estimators under the Gaussian model, equal weights.

    ``sqrt(2 / (N (N - 1) P)) * (1 - rho) * (1 + (N - 1) rho)``. Derived by the delta method on
    ``S / Q`` with Gaussian quadratic-form moments (``Var a = 2 (1'S1)^2``, ``Cov(a, b) = 2 tr(J S^2)``,
    ``Var b = 2 tr S^2`` per entry); the mean pairwise cosine has the same leading term
    (Olkin-Siotani covariances of correlation coefficients). ``P`` is the number of independent
    entries; correlated entries make the true error larger. NaN for ``N < 2``.
    """
    rho = float(rho)
    if not math.isfinite(rho):
        return math.nan
    n = int(n_clients)
    p = int(n_entries)
    if n < 2 or p < 1:
        return math.nan
    return math.sqrt(2.0 / (n * (n - 1) * p)) * abs(1.0 - rho) * abs(1.0 + (n - 1) * rho)


def _checked_gram(gram: np.ndarray, method: str, zero_tol: float) -> np.ndarray:
    """``gram`` as a float64 (N, N) array, after checking it, ``method`` and ``zero_tol``."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
    g = np.asarray(gram, dtype=np.float64)
    if g.ndim != 2 or g.shape[0] != g.shape[1] or g.shape[0] == 0:
        raise ValueError(f"gram must be a square (N, N) matrix with N >= 1, got shape {g.shape}")
    if not np.all(np.isfinite(g)):
        raise ValueError("gram contains non-finite entries (NaN or inf)")
    if np.any(np.diag(g) < 0):
        raise ValueError("gram has a negative diagonal entry; it is not a Gram matrix of real vectors")
    if not (math.isfinite(zero_tol) and 0 <= zero_tol < 1):
        raise ValueError(f"zero_tol must lie in [0, 1), got {zero_tol!r}")
    return g


def _client_weights(weights: Sequence[float] | np.ndarray | None, n: int) -> np.ndarray:
    """One float64 weight per client (equal when ``None``), validated like the rule's weights."""
    if weights is None:
        return np.ones(n)
    weights_sum_squares(weights, n)  # validates: finite, non-negative, not all zero, length N
    return np.asarray(weights, dtype=np.float64).ravel()


def _used_clients(diag: np.ndarray, w_all: np.ndarray, zero_tol: float) -> np.ndarray:
    """Indices of the clients with a non-negligible increment and a positive weight."""
    max_diag = float(diag.max())
    nonzero = diag > (zero_tol**2) * max_diag if max_diag > 0 else np.zeros(diag.size, dtype=bool)
    return np.flatnonzero(nonzero & (w_all > 0))


def _jackknife_se(g: np.ndarray, block_grams: np.ndarray, idx: np.ndarray, w: np.ndarray, method: str) -> float:
    """Block-jackknife standard error of the point estimate over coordinate blocks (NaN if < 2 usable)."""
    bg = np.asarray(block_grams, dtype=np.float64)
    n = g.shape[0]
    if bg.ndim != 3 or bg.shape[1:] != g.shape:
        raise ValueError(f"block_grams must have shape (K, {n}, {n}), got {bg.shape}")
    k = bg.shape[0]
    if k < 2:
        return math.nan
    sub = np.ix_(idx, idx)
    loo = []
    for b in range(k):
        gb = (g - bg[b])[sub]
        if np.any(np.diag(gb) <= 0):
            continue  # a client is all-zero outside this block: skip this replicate
        loo.append(_point_estimate(gb, w, method))
    loo_arr = np.asarray([v for v in loo if math.isfinite(v)])
    m = loo_arr.size
    if m < 2:
        return math.nan
    return float(math.sqrt((m - 1) / m * np.sum((loo_arr - loo_arr.mean()) ** 2)))


def estimate_rho_from_gram(
    gram: np.ndarray,
    weights: Sequence[float] | np.ndarray | None = None,
    *,
    method: str = "ratio",
    block_grams: np.ndarray | None = None,
    n_entries: int = 0,
    zero_tol: float = 1e-12,
) -> RhoEstimate:
    """Estimate ``rho`` from a precomputed ``N x N`` Gram matrix ``G_ij = <x_i, x_j>``.

    Useful when the increments of several layers are reduced separately: Gram matrices add over
    disjoint coordinate sets, so the sum of per-layer Grams is the Gram of the concatenation.

    Parameters
    ----------
    gram:
        Symmetric ``(N, N)`` matrix with a non-negative diagonal.
    weights:
        One non-negative weight per client (unnormalised; default equal).
    method:
        ``"ratio"`` (default) or ``"cosine"``; see the module docstring.
    block_grams:
        Optional ``(K, N, N)`` per-block Grams summing to ``gram`` for the jackknife SE.
    n_entries:
        ``P``, used only for the analytic SE (0: unknown).
    zero_tol:
        A client whose increment norm is at most ``zero_tol`` times the largest client norm
        (in particular, exactly zero) is excluded.
    """
    g = _checked_gram(gram, method, zero_tol)
    n = g.shape[0]
    w_all = _client_weights(weights, n)
    idx = _used_clients(np.diag(g), w_all, zero_tol)
    excluded = tuple(int(i) for i in np.setdiff1d(np.arange(n), idx))
    n_used = int(idx.size)
    used_frac = float(w_all[idx].sum() / float(w_all.sum()))
    p = int(n_entries)
    if n_used < 2:
        n_eff = 1.0 if n_used == 1 else math.nan
        return RhoEstimate(math.nan, math.nan, n_eff, n, n_used, excluded, method, math.nan, math.nan, used_frac, p)
    w = w_all[idx]
    rho_raw = _point_estimate(g[np.ix_(idx, idx)], w, method)
    rho = float(min(1.0, max(0.0, rho_raw)))
    se = _jackknife_se(g, block_grams, idx, w, method) if block_grams is not None else math.nan
    se_an = rho_standard_error(rho, n_used, p) if p > 0 else math.nan
    return RhoEstimate(rho_raw, rho, effective_clients(n_used, rho=rho, weights=w), n, n_used, excluded, method,
                       se, se_an, used_frac, p)


def estimate_rho(
    increments: Any,
    weights: Sequence[float] | np.ndarray | None = None,
    *,
    method: str = "ratio",
    n_blocks: int = 16,
    zero_tol: float = 1e-12,
) -> RhoEstimate:
    """Estimate the client correlation ``rho`` and ``N_eff`` from one round's increments.

    Parameters
    ----------
    increments:
        ``(N, P)`` numpy array or torch tensor: row ``i`` is client ``i``'s flattened adapter
        increment this round (one layer's ``B`` increments, or all layers concatenated;
        ``(N, ...)`` is flattened per client). ``rho`` is the *uncentered* correlation: the
        clients' shared mean direction is the signal it measures, so nothing is demeaned.
    weights:
        Optional non-negative weight per client (aggregation weights or data sizes, normalised
        internally). Zero-weight clients are excluded.
    method:
        ``"ratio"`` (method of moments, default: its ``N_eff`` equals the measured norm shrinkage
        of the aggregate) or ``"cosine"`` (mean pairwise cosine similarity).
    n_blocks:
        Coordinate blocks for the jackknife standard error (1: none).
    zero_tol:
        Relative norm below which a client's increment counts as zero and is excluded.

    Returns
    -------
    RhoEstimate
        Raw and clipped ``rho``, ``n_used``, ``excluded``, ``n_eff`` and standard errors.
        ``defined`` is False with fewer than two usable clients (``rho`` is NaN; the controller
        then keeps its prior / smoothed value).

    Raises
    ------
    ValueError
        On non-finite entries, a wrong shape, invalid weights or an unknown method.

    Examples
    --------
    >>> x = np.array([[1.0, 0.0], [1.0, 0.0]])
    >>> estimate_rho(x).rho
    1.0
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
    gram, blocks, p = gram_blocks(increments, n_blocks=n_blocks)
    return estimate_rho_from_gram(
        gram, weights, method=method, block_grams=blocks if blocks.shape[0] >= 2 else None,
        n_entries=p, zero_tol=zero_tol,
    )


# --------------------------------------------------------------------------------------------
# The controller
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdaptiveStep:
    """One round of :class:`AdaptiveScaler` history."""

    round: int
    rho_raw: float
    rho_clipped: float
    se: float
    step: float
    rho_smoothed: float
    n_eff: float
    gamma: float
    n_used: int


def _check_gamma(name: str, g: float) -> float:
    try:
        g = float(g)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {g!r}") from None
    if not math.isfinite(g) or g <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {g!r}")
    return g


class AdaptiveScaler:
    """State of the "sfed-adaptive" rule: smoothed ``rho`` and the ``gamma`` it implies.

    Each round: estimate ``rho`` (:func:`estimate_rho`), then move the smoothed state towards the
    round's *raw* (unclipped) estimate by ``step = ema * reliability``, where
    ``reliability = 1 / (1 + (se / tau)^2)``. ``ema`` is the usual exponential smoothing across
    rounds (true ``rho`` drifts slowly as training goes on; a single round's increments are one
    noisy draw). The reliability factor is shrinkage toward the current state (initially the
    prior) scaled by how precise the round's estimate is: with large ``P`` and many clients ``se``
    is tiny and the step is plain EMA; with two or three clients, or few effectively independent
    entries, the jackknife ``se`` is large and the round moves the state less. A round with
    fewer than two usable clients (``N = 1``) gives no information about ``rho`` and leaves the
    state unchanged (``step = 0``). With the default ``prior_rho = 0`` the first ``gamma`` is the
    paper's ``alpha * sqrt(N / r)``.

    The raw estimates are averaged and only the smoothed state is clipped to ``[0, 1]``
    (``rho_smoothed``): near ``rho = 0`` about half the raw estimates are negative, and averaging
    clipped values would bias the state upwards by about ``0.4 * se``; averaging first keeps the
    zero-mean noise zero-mean.

    Parameters
    ----------
    alpha, rank:
        LoRA alpha (> 0) and rank ``r`` (integer >= 1).
    prior_rho:
        Starting value of the smoothed ``rho`` in ``[0, 1]`` (0: SFed; 1: rsLoRA).
    ema:
        Smoothing factor in ``(0, 1]`` (1: use each round's estimate as is, when reliable).
    tau:
        Standard-error scale of the reliability factor (> 0; ``inf`` disables the shrinkage).
    method, n_blocks:
        Passed to :func:`estimate_rho`.
    """

    def __init__(
        self,
        alpha: float,
        rank: int,
        *,
        prior_rho: float = 0.0,
        ema: float = 0.3,
        tau: float = 0.05,
        method: str = "ratio",
        n_blocks: int = 16,
    ) -> None:
        alpha_f = _check_gamma("alpha", alpha)
        if isinstance(rank, bool) or not float(rank).is_integer() or int(rank) < 1:
            raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
        pr = float(prior_rho)
        if not (math.isfinite(pr) and 0.0 <= pr <= 1.0):
            raise ValueError(f"prior_rho must lie in [0, 1], got {prior_rho!r}")
        e = float(ema)
        if not (math.isfinite(e) and 0.0 < e <= 1.0):
            raise ValueError(f"ema must lie in (0, 1], got {ema!r}")
        t = float(tau)
        if math.isnan(t) or t <= 0:
            raise ValueError(f"tau must be > 0 (inf disables shrinkage), got {tau!r}")
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
        self.alpha = alpha_f
        self.rank = int(rank)
        self.prior_rho = pr
        self.ema = e
        self.tau = t
        self.method = method
        self.n_blocks = int(n_blocks)
        self._state = pr
        self.history: list[AdaptiveStep] = []

    @property
    def rho_smoothed(self) -> float:
        """The smoothed correlation, clipped to ``[0, 1]``; this is what sets ``gamma``."""
        return min(1.0, max(0.0, self._state))

    @property
    def rho_state(self) -> float:
        """The unclipped smoothed state (may be slightly negative near ``rho = 0``)."""
        return self._state

    def gamma(
        self,
        n_clients: int,
        weights: Sequence[float] | np.ndarray | None = None,
        participating: int | None = None,
    ) -> float:
        """``alpha * sqrt(N_eff / r)`` at the current smoothed ``rho`` for a round's configuration."""
        n_eff = effective_clients(n_clients, rho=self.rho_smoothed, weights=weights, participating=participating)
        return self.alpha * math.sqrt(n_eff / self.rank)

    def observe(
        self,
        estimate: RhoEstimate,
        n_clients: int | None = None,
        weights: Sequence[float] | np.ndarray | None = None,
    ) -> float:
        """Fold a precomputed :class:`RhoEstimate` into the state; return ``gamma`` for the next round.

        ``n_clients`` and ``weights`` describe the next round's aggregation (default: the clients
        of this estimate, equal weights).
        """
        n_next = estimate.n_clients if n_clients is None else n_clients
        step = 0.0
        if estimate.defined:
            se = estimate.se if math.isfinite(estimate.se) else estimate.se_analytic
            reliability = 1.0 if not math.isfinite(se) or math.isinf(self.tau) else 1.0 / (1.0 + (se / self.tau) ** 2)
            step = self.ema * reliability
            self._state = (1.0 - step) * self._state + step * estimate.rho_raw
        n_eff = effective_clients(n_next, rho=self.rho_smoothed, weights=weights)
        g = self.alpha * math.sqrt(n_eff / self.rank)
        self.history.append(
            AdaptiveStep(len(self.history), estimate.rho_raw, estimate.rho, estimate.se, step,
                         self.rho_smoothed, n_eff, g, estimate.n_used)
        )
        return g

    def update(self, increments: Any, weights: Sequence[float] | np.ndarray | None = None) -> float:
        """Estimate ``rho`` from this round's ``(N, P)`` increments, smooth it, return the next ``gamma``.

        The next round is assumed to aggregate the same ``N`` clients with the same ``weights``;
        for another configuration call :meth:`gamma` afterwards.
        """
        est = estimate_rho(increments, weights, method=self.method, n_blocks=self.n_blocks)
        return self.observe(est, est.n_clients, weights)


# --------------------------------------------------------------------------------------------
# Function-preserving rescale
# --------------------------------------------------------------------------------------------
def rescale_for_new_gamma(B: Any, g_old: float, g_new: float, *, inplace: bool = False) -> Any:
    """Rescale ``B`` so that ``g_new * B' @ A == g_old * B @ A`` (the merged function does not jump).

    ``B' = B * g_old / g_new``. Apply it to every trainable ``B`` that enters the model with the
    factor ``gamma``: the global ``B`` for FFA-LoRA (A frozen) and FedIT (rescaling ``B`` alone
    suffices, ``A`` is untouched), and each client's local ``B_i`` for FedSA-LoRA. For the exact
    scheme (average of products merged into ``W0`` each round, adapters restarted at ``B = 0``)
    there is nothing to rescale: the merged update is already in ``W0`` and ``0 * c = 0``. If an
    optimizer keeps state for ``B`` across the change, the gradient w.r.t. ``B`` scales by
    ``g_new / g_old`` (and ``B`` by the inverse), so Adam's ``exp_avg`` should be multiplied by
    ``g_new / g_old`` and ``exp_avg_sq`` by its square to stay consistent; optimizers reset each
    round need nothing.

    Works on numpy arrays and torch tensors (``inplace=True`` multiplies in place, under
    ``torch.no_grad()`` for tensors, e.g. an ``nn.Parameter``); returns the rescaled ``B``.
    """
    g_old = _check_gamma("g_old", g_old)
    g_new = _check_gamma("g_new", g_new)
    c = g_old / g_new
    if _is_torch(B):
        import torch

        if inplace:
            with torch.no_grad():
                B.mul_(c)
            return B
        return B.detach() * c
    if inplace:
        if not isinstance(B, np.ndarray):
            raise ValueError("inplace=True needs a numpy array or a torch tensor")
        B *= c
        return B
    return np.asarray(B) * c
