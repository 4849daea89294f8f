"""Per-round measurements of one adapted layer, and their combination over layers.

Definitions (row of round t; ``p`` are the aggregation weights of the K clients averaged in the round,
``gamma`` the round's scaling factor, or with heterogeneous ranks each client's own ``gamma_i``, which
then takes its place in the client's update ``gamma_i (B1_i A1_i - B0_i A0_i)``):

* ``grad_A``, ``grad_B``: ``||dL/dA||_F``, ``||dL/dB||_F`` of the mean cross-entropy on a fixed probe
  batch (drawn once from the pooled training data) at the adapter the round STARTS from;
  ``grad_A_end``, ``grad_B_end``: the same after the round's aggregation. The adapter is the point
  at which the theory takes its gradients (:func:`sfed_theory.schemes.factors`): FFA and FedIT the
  aggregated ``(Bbar, Abar)``; exact aggregation ``(0, A0)`` (the average of products is merged into
  the frozen weight and the adapter restarts, so ``dL/dA = gamma * 0^T G = 0`` there); FedSA each
  participating client's own ``(B_c, Abar)``, reported as ``sqrt(sum_c p_c ||grad_c||^2)``.
* ``update_fro``: ``||dW||_F`` of the round's change of the effective weight; FedSA
  ``sqrt(sum_c p_c ||dW_c||^2)`` over the participating clients' own models.
* ``adapter_rms``: ``sqrt(mean over real-token rows n and output coordinates j of (dW_total x_n)_j^2)``,
  the cumulative learned change applied to the layer's probe inputs after the round. Padded
  positions are left out (:class:`validation.backends.ProbeOut`): they never reach the loss, and
  counting them would scale the RMS by the square root of the real-token fraction. FedSA:
  ``sqrt(sum_c p_c ms_c)`` over the clients' own models and inputs.
* ``agg_error``: ``||dW - dW_exact||_F`` with ``dW_exact = gamma sum_i p_i (B1_i A1_i - B0_i A0_i)``,
  the product of averages against the average of products (0 for FFA and exact; NaN for FedSA,
  which has no global update).
* ``rho_hat``: mean pairwise cosine of the clients' flattened local increments (B, and A where
  trained); ``rho_ratio``: the ratio (method-of-moments) estimate of the same
  (:func:`validation.adaptive.estimate_rho_from_gram`), UNCLIPPED: a negative value (clients
  pulling apart) is a finding, not noise to hide. ``n_eff_hat``, ``n_eff_ratio``:
  ``1 / (rho + (1 - rho) sum p^2)`` at those estimates (:func:`sfed_theory.effective_clients`;
  above K when rho < 0; 1 with one client). With equal weights ``n_eff_ratio`` is exactly the
  measured shrinkage ``mean_i ||x_i||^2 / ||mean_i x_i||^2``.
* Projected correlations (ratio estimates, unclipped) of each client's contribution to a quantity
  that is linear in the averaged increments:
  ``rho_out``: the client's own update ``gamma (B1_i A1_i - B0_i A0_i)`` applied to the probe inputs
  (adapter output); ``rho_gA``: ``dB_i^T G`` with ``G = dL/dW`` of the probe at the end (the part of
  ``dL/dA`` the B increments contribute); ``rho_gB``: ``G dA_i^T`` (the part of ``dL/dB`` the A
  increments contribute; NaN when A is frozen). The theory's client correlation for a quantity is
  the correlation of these, which can differ a lot from the Frobenius ``rho_ratio``.
* ``loss_change``: ``<G_start, dW>``, the first-order change of the probe loss by the round's
  update (``G_start = dL/dW`` of the probe at the adapter the round starts from; the SGD regime's
  derived ``E<G, dW>``); ``curvature``: ``<G_end - G_start, dW> / ||dW||_F^2``, the loss curvature along
  the update (how much the gradient moved back per unit of step). Both NaN for FedSA.
* ``layer == "__all__"``: norms combined as sqrt of the sum of squares over layers; correlations
  from the summed Gram matrices, i.e. of the concatenation of all layers' vectors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from sfed_theory.rules import effective_clients
from validation.adaptive import estimate_rho_from_gram

__all__ = ["ALL", "NORM_COLUMNS", "GRAM_KINDS", "LayerRound", "gram", "cosine_rho", "ratio_rho", "n_eff_from_rho",
           "weighted_norm", "output_rms", "client_contributions", "layer_metrics", "combine_layers"]

ALL = "__all__"
NORM_COLUMNS = ("grad_A", "grad_B", "grad_A_end", "grad_B_end", "update_fro", "adapter_rms", "agg_error")
GRAM_KINDS = ("inc", "out", "gA", "gB")  # increments, output, dL/dA and dL/dB contributions


@dataclass
class LayerRound:
    """One layer's tensors of one round (stacked ``(K, ...)`` where per client)."""

    grad_A: torch.Tensor  # (r, k), or (K, r, k) at each client's own model (FedSA)
    grad_B: torch.Tensor  # (d, r), or (K, d, r)
    grad_A_end: torch.Tensor
    grad_B_end: torch.Tensor
    grad_W_start: torch.Tensor  # (d, k): dL/dW of the probe at the shared model the round starts from
    grad_W_end: torch.Tensor  # (d, k): the same after the round's aggregation
    round_delta: torch.Tensor  # (d, k), or (K, d, k) per client (FedSA)
    total: torch.Tensor  # (d, k), or (K, d, k)
    inputs: torch.Tensor  # (n, k) real-token rows, or (K, n, k)
    A0: torch.Tensor  # (K, r, k) the clients' adapters before and after local training
    B0: torch.Tensor  # (K, d, r)
    A1: torch.Tensor
    B1: torch.Tensor
    p: torch.Tensor  # (K,) aggregation weights, sum 1
    gamma: float | tuple[float, ...]  # the round's gamma, or each client's own (heterogeneous ranks)
    train_A: bool
    per_client: bool  # FedSA: no global update, every client keeps its own model


def gram(x: torch.Tensor) -> np.ndarray:
    """``(K, K)`` float64 Gram matrix ``<x_i, x_j>`` of the rows of ``x`` (flattened per client)."""
    v = x.detach().reshape(x.shape[0], -1).double()
    return (v @ v.T).cpu().numpy()


def cosine_rho(g: np.ndarray) -> float:
    """Mean pairwise cosine ``mean_{i != j} G_ij / sqrt(G_ii G_jj)``; NaN if K < 2 or a row is zero."""
    k = g.shape[0]
    d = np.diag(g)
    if k < 2 or np.any(d <= 0):
        return float("nan")
    c = g / np.sqrt(np.outer(d, d))
    return float((c.sum() - np.trace(c)) / (k * (k - 1)))


def ratio_rho(g: np.ndarray, p: torch.Tensor | np.ndarray) -> float:
    """The weighted ratio estimate ``sum_{i!=j} p_i p_j G_ij / sum_{i!=j} p_i p_j (G_ii + G_jj)/2``,
    unclipped; NaN with fewer than two non-zero clients."""
    w = p.detach().double().cpu().numpy() if isinstance(p, torch.Tensor) else np.asarray(p, float)
    return float(estimate_rho_from_gram(g, w, method="ratio").rho_raw)


def n_eff_from_rho(rho: float, p: torch.Tensor) -> float:
    """``1 / (rho + (1 - rho) sum p^2)`` (:func:`sfed_theory.effective_clients`), rho NOT clipped.

    1.0 for one client; NaN when rho is NaN with K > 1, or outside the range where it is defined."""
    w = p.detach().double().cpu().numpy()
    if len(w) == 1:
        return 1.0
    if math.isnan(rho):
        return float("nan")
    try:
        return effective_clients(len(w), rho=rho, weights=w)
    except ValueError:
        return float("nan")


def weighted_norm(x: torch.Tensor, p: torch.Tensor, per_client: bool) -> float:
    """``||x||_F``, or ``sqrt(sum_i p_i ||x_i||_F^2)`` over stacked per-client ``x`` (K, ...)."""
    if not per_client:
        return float(x.norm())
    sq = x.reshape(x.shape[0], -1).pow(2).sum(1)
    return float(torch.dot(p.to(sq.dtype), sq).sqrt())


def output_rms(total: torch.Tensor, inputs: torch.Tensor, p: torch.Tensor, per_client: bool) -> float:
    """RMS over input rows and output coordinates of ``total @ x``; per client: ``sqrt(sum_i p_i ms_i)``."""
    if not per_client:
        return float((inputs @ total.T).pow(2).mean().sqrt())
    x = inputs if inputs.dim() == 3 else inputs.expand(total.shape[0], *inputs.shape)
    ms = torch.einsum("ink,idk->ind", x, total).pow(2).mean((1, 2))
    return float(torch.dot(p.to(ms.dtype), ms).sqrt())


def client_contributions(m: LayerRound) -> dict[str, torch.Tensor | None]:
    """Each client's share of the quantities that are linear in the averaged increments (see module doc)."""
    dA, dB = m.A1 - m.A0, m.B1 - m.B0
    gamma = m.gamma if isinstance(m.gamma, (int, float)) else \
        torch.as_tensor(m.gamma, dtype=m.B1.dtype, device=m.B1.device)[:, None, None]
    own = gamma * (torch.bmm(m.B1, m.A1) - torch.bmm(m.B0, m.A0))  # each client's own update (K, d, k)
    x = m.inputs if m.inputs.dim() == 2 else m.inputs.mean(0)  # FedSA: rows differ per client; the mean is a proxy
    G = m.grad_W_end
    return {
        "inc": torch.cat([dB.reshape(len(dB), -1)] + ([dA.reshape(len(dA), -1)] if m.train_A else []), dim=1),
        "out": torch.einsum("nk,idk->ind", x, own),
        "gA": torch.einsum("idr,dk->irk", dB, G),
        "gB": torch.einsum("dk,irk->idr", G, dA) if m.train_A else None,
        "own": own,
    }


def _correlations(grams: dict[str, np.ndarray | None], p: torch.Tensor) -> dict[str, float]:
    nan = float("nan")
    rho_cos = cosine_rho(grams["inc"])
    rho_rat = ratio_rho(grams["inc"], p) if len(p) > 1 else nan
    out = {"rho_hat": rho_cos, "n_eff_hat": n_eff_from_rho(rho_cos, p),
           "rho_ratio": rho_rat, "n_eff_ratio": n_eff_from_rho(rho_rat, p)}
    for kind, col in (("out", "rho_out"), ("gA", "rho_gA"), ("gB", "rho_gB")):
        g = grams[kind]
        out[col] = ratio_rho(g, p) if g is not None and len(p) > 1 else nan
    return out


def layer_metrics(name: str, m: LayerRound) -> tuple[dict[str, float], dict[str, np.ndarray | None]]:
    """The row of one layer (see module docstring) and its Gram matrices for :func:`combine_layers`."""
    contrib = client_contributions(m)
    grams = {k: (None if contrib[k] is None else gram(contrib[k])) for k in GRAM_KINDS}
    nan = float("nan")
    agg_err = loss_change = curvature = nan
    if not m.per_client:
        exact = torch.tensordot(m.p.to(contrib["own"].dtype), contrib["own"], dims=1)
        agg_err = float((m.round_delta - exact).norm())
        loss_change = float((m.grad_W_start * m.round_delta).sum())
        sq = float(m.round_delta.pow(2).sum())
        curvature = float(((m.grad_W_end - m.grad_W_start) * m.round_delta).sum()) / sq if sq > 0 else nan
    pc = m.per_client
    row = {
        "layer": name,
        "grad_A": weighted_norm(m.grad_A, m.p, pc and m.grad_A.dim() == 3),
        "grad_B": weighted_norm(m.grad_B, m.p, pc and m.grad_B.dim() == 3),
        "grad_A_end": weighted_norm(m.grad_A_end, m.p, pc and m.grad_A_end.dim() == 3),
        "grad_B_end": weighted_norm(m.grad_B_end, m.p, pc and m.grad_B_end.dim() == 3),
        "update_fro": weighted_norm(m.round_delta, m.p, pc),
        "adapter_rms": output_rms(m.total, m.inputs, m.p, pc),
        "agg_error": agg_err,
        "loss_change": loss_change,
        "curvature": curvature,
        **_correlations(grams, m.p),
    }
    return row, grams


def combine_layers(rows: list[dict[str, float]], grams: list[dict[str, np.ndarray | None]],
                   p: torch.Tensor) -> dict[str, float]:
    """The ``__all__`` row: sqrt of summed squares of each norm; correlations of the concatenation of
    all layers' vectors (Gram matrices add over disjoint coordinates)."""
    out: dict[str, float] = {"layer": ALL}
    for c in NORM_COLUMNS:
        out[c] = math.sqrt(sum(r[c] ** 2 for r in rows))
    out["loss_change"] = sum(r["loss_change"] for r in rows)
    sq = sum(r["update_fro"] ** 2 for r in rows)
    out["curvature"] = sum(r["curvature"] * r["update_fro"] ** 2 for r in rows) / sq if sq > 0 else float("nan")
    total = {k: (None if grams[0][k] is None else sum(g[k] for g in grams)) for k in GRAM_KINDS}
    out.update(_correlations(total, p))
    return out
