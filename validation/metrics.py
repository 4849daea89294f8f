"""Per-round measurements, per adapted layer and summed over layers.

Definitions (row of round t):
* ``grad_A``, ``grad_B``: ``||dL/dA||_F``, ``||dL/dB||_F`` of the mean cross-entropy on a fixed
  probe batch (drawn once from the pooled training data), at the global adapter the round
  STARTS from (round 1: the init, where B = 0 and hence dL/dA = 0 exactly).
* ``grad_A_end``, ``grad_B_end``: the same gradients at the global adapter AFTER the round's
  aggregation (so one round already gives a non-zero dL/dA).
* ``update_fro``: ``||dW||_F`` of the round's aggregated weight change (see
  :mod:`validation.aggregation`); FedSA: sqrt of the p-weighted mean over participating clients
  of ``||dW_i||_F^2`` of each client's own model (B personal, A shared).
* ``adapter_rms``: RMS over all probe rows and output coordinates of ``dW_total x``, the
  cumulative learned weight change applied to the layer's input on the probe batch, after the
  round's aggregation (for FFA/FedIT in round 1 this is ``gamma * Bbar A x``); FedSA: the
  p-weighted RMS over participating clients of ``gamma B_i A x`` (inputs x from the shared pass).
* ``rho_hat``: mean pairwise cosine between clients' flattened local increments (the trained
  factors: B, and A where it is trained); ``n_eff_hat = 1 / (rho + (1 - rho) * sum p_i^2)`` with
  rho clipped to [0, 1]. With one client rho_hat is NaN and n_eff_hat is 1.
* ``rho_ratio``/``n_eff_ratio``: the method-of-moments estimator of
  :func:`validation.adaptive.estimate_rho` (``method="ratio"``), whose N_eff equals the measured
  shrinkage ``mean ||x_i||^2 / ||mean x_i||^2`` of the aggregate (NaN if that module is absent).
* ``inc_A_rms``/``inc_B_rms`` (added by :mod:`validation.federated`): RMS entry of the clients'
  local increments of A and B in the round (the ``s_dA``/``s_B`` of the theory's random model).
* ``layer == "__all__"``: norms combined as sqrt of the sum of squares over layers; rho_hat
  over the concatenation of all layers' increments.
"""

from __future__ import annotations

import math

import torch

__all__ = ["ALL", "NORM_COLUMNS", "pairwise_rho", "n_eff_from_rho", "layer_metrics", "combine_layers"]

ALL = "__all__"
NORM_COLUMNS = ("grad_A", "grad_B", "grad_A_end", "grad_B_end", "update_fro", "adapter_rms")


def pairwise_rho(increments: torch.Tensor) -> float:
    """Mean pairwise cosine similarity of the rows of ``increments`` (K, P); NaN if K < 2."""
    K = increments.shape[0]
    if K < 2:
        return float("nan")
    u = increments.double()
    norms = u.norm(dim=1, keepdim=True)
    if (norms == 0).any():
        return float("nan")
    u = u / norms
    g = u @ u.T
    return float((g.sum() - g.diagonal().sum()) / (K * (K - 1)))


def n_eff_from_rho(rho: float, p: torch.Tensor) -> float:
    """``1 / (rho + (1 - rho) sum p^2)`` with rho clipped to [0, 1]; 1.0 when rho is NaN and K = 1."""
    s2 = float((p.double() ** 2).sum())
    if math.isnan(rho):
        return 1.0 if len(p) == 1 else float("nan")
    r = min(max(rho, 0.0), 1.0)
    return 1.0 / (r + (1.0 - r) * s2)


def layer_metrics(name: str, *, grad_A: torch.Tensor, grad_B: torch.Tensor, grad_A_end: torch.Tensor,
                  grad_B_end: torch.Tensor, round_delta: torch.Tensor,
                  total: torch.Tensor, layer_input: torch.Tensor, increments: torch.Tensor,
                  p: torch.Tensor) -> dict[str, float]:
    """Measurements of one layer (see module docstring)."""
    if total.dim() == 3:  # per-client models (FedSA): p-weighted mean of squared norms
        upd = float(torch.sqrt(torch.tensordot(p, round_delta.pow(2).sum((1, 2)), dims=1)))
        out_ms = torch.tensordot(p, torch.einsum("nk,idk->ind", layer_input, total).pow(2).mean((1, 2)), dims=1)
        rms = float(out_ms.sqrt())
    else:
        upd = float(round_delta.norm())
        rms = float((layer_input @ total.T).pow(2).mean().sqrt())
    rho = pairwise_rho(increments)
    return {**_ratio(increments, p),
        "layer": name,
        "grad_A": float(grad_A.norm()),
        "grad_B": float(grad_B.norm()),
        "grad_A_end": float(grad_A_end.norm()),
        "grad_B_end": float(grad_B_end.norm()),
        "update_fro": upd,
        "adapter_rms": rms,
        "rho_hat": rho,
        "n_eff_hat": n_eff_from_rho(rho, p),
    }


def combine_layers(rows: list[dict[str, float]], all_increments: torch.Tensor, p: torch.Tensor) -> dict[str, float]:
    """The ``__all__`` row: sqrt of summed squares of each norm; rho over all layers' increments."""
    out: dict[str, float] = {"layer": ALL}
    for c in NORM_COLUMNS:
        out[c] = math.sqrt(sum(r[c] ** 2 for r in rows))
    rho = pairwise_rho(all_increments)
    out["rho_hat"] = rho
    out["n_eff_hat"] = n_eff_from_rho(rho, p)
    out.update(_ratio(all_increments, p))
    return out


def _ratio(increments: torch.Tensor, p: torch.Tensor) -> dict[str, float]:
    try:
        from validation.adaptive import estimate_rho
    except ImportError:  # the adaptive module is optional
        return {"rho_ratio": float("nan"), "n_eff_ratio": float("nan")}
    est = estimate_rho(increments.detach().double().cpu().numpy(), p.detach().double().cpu().numpy(),
                       method="ratio")
    return {"rho_ratio": float(est.rho_raw), "n_eff_ratio": float(est.n_eff)}
