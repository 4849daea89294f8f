"""The shape of the probe gradient's response to the round's update: which inputs and outputs carry it.

The refined model's curvature term moves each probe token's output gradient by its own output change,
``G_end - G_start = lam dW C`` with ``C = sum_t x_t x_t^T`` (``sfed_theory.assumptions``, regime
``adam-refined``). Two numbers test that premise on a real round, whatever ``lam`` is:

* **top-input share** of dL/dB's change, ``||dG v||^2 ||A v||^2 / ||dG A^T||_F^2`` with ``v`` the tokens' top
  input direction: 1 when the change is ``u v^T`` (the response comes through that one direction, as when the
  loss couples the tokens through a pooled representation); under the model's ``lam dW C`` the input bulk
  carries a share that falls with the rank (the spike reaches dL/dB through ``||A v||^2``, about ``r/3k``). It
  can pass 1 where the bulk's part cancels some of the spike's.
* **output alignment** ``cos(dG v, dW v)``: the output-space response to the output change ``dW v`` against
  that change. 1 for any isotropic output curvature (the model's ``lam I``; ``C v`` is ``v`` scaled); below 1
  when the curvature favours some output directions, as a loss with a few classes does.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import NamedTuple

import numpy as np
import torch

from validation.probe_inputs import given_or_top_direction
from validation.refined import RefinedParams, predict_points

__all__ = ["response_shape", "predicted_top_input", "gradient_direction", "gradient_input_shape", "GradientShape"]


def response_shape(grad_change: torch.Tensor, update: torch.Tensor, a: torch.Tensor,
                   x: torch.Tensor, *, top: torch.Tensor | None = None) -> tuple[float, float]:
    """``(top-input share, output alignment)`` of one layer's probe-gradient change (see the module docstring).

    ``grad_change``: ``dL/dW`` at the end of the round minus at its start, (d, k); ``update``: the round's
    ``dW`` (d, k); ``a``: the adapter's A (r, k) through which dL/dB sees the change; ``x``: the probe's token
    rows (n, k); ``top``: their :func:`~validation.probe_inputs.top_direction` when the caller has it. Either
    number is NaN where its denominator is zero (no change, no update along ``v``)."""
    dg, dw, a = (torch.as_tensor(t, dtype=torch.float64) for t in (grad_change, update, a))
    if dg.ndim != 2 or dg.shape != dw.shape or a.ndim != 2 or a.shape[1] != dg.shape[1]:
        raise ValueError(f"need dG and dW (d, k) and A (r, k), got {tuple(dg.shape)}, {tuple(dw.shape)}, "
                         f"{tuple(a.shape)}")
    v = given_or_top_direction(x, top)
    seen = float((dg @ a.T).pow(2).sum())
    top_input = float((dg @ v).pow(2).sum() * (a @ v).pow(2).sum()) / seen if seen > 0 else math.nan
    out_change, response = dw @ v, dg @ v
    norms = float(out_change.norm() * response.norm())
    alignment = float(out_change @ response) / norms if norms > 0 else math.nan
    return top_input, alignment


class GradientShape(NamedTuple):
    """The probe gradient's input shape (:func:`gradient_input_shape`) and its input direction ``x_g``."""

    rank1: float
    input_share: float
    spike_cos: float
    direction: torch.Tensor


def gradient_direction(grad_w: torch.Tensor) -> torch.Tensor:
    """The probe gradient's input direction: the top right singular vector (k,) of ``dL/dW`` (d, k), float64.
    The refined model writes the gradient as ``g x^T``; this is its ``x`` as the gradient sees it."""
    return torch.linalg.svd(_gradient(grad_w), full_matrices=False).Vh[0]


def gradient_input_shape(grad_w: torch.Tensor, x: torch.Tensor, *, top: torch.Tensor | None = None) -> GradientShape:
    """``(rank-one share, input share, |cos| with the spike, x_g)`` of the probe gradient ``G`` (d, k) over the
    token rows ``x`` (n, k): ``s_1^2 / ||G||_F^2`` (1 when ``G = g x_g^T``); ``x_g^T C x_g / tr C`` with
    ``C = X^T X``, the tokens' energy along the gradient's input direction ``x_g`` (the refined model's top share
    when its ``x`` is ``x_g``); ``|cos(x_g, v)|`` with ``v`` the tokens' top direction, which the model takes
    ``x_g`` to be (``top``: that ``v`` when the caller has it); and ``x_g`` itself (:func:`gradient_direction`),
    from the same decomposition."""
    xs = torch.as_tensor(x, dtype=torch.float64)
    _, s, vh = torch.linalg.svd(_gradient(grad_w), full_matrices=False)  # one decomposition: the values and x_g
    xg = vh[0]
    share = float((xs @ xg).pow(2).sum() / xs.pow(2).sum())
    return GradientShape(float(s[0] ** 2 / s.pow(2).sum()), share, abs(float(xg @ given_or_top_direction(xs, top))), xg)


def _gradient(grad_w: torch.Tensor) -> torch.Tensor:
    g = torch.as_tensor(grad_w, dtype=torch.float64)
    if g.ndim != 2 or float(g.pow(2).sum()) == 0:
        raise ValueError(f"need a non-zero dL/dW of shape (d, k), got shape {tuple(g.shape)}")
    return g


def predicted_top_input(p: RefinedParams, rule: str, ranks, ks, alpha: float) -> np.ndarray:
    """The refined model's top-input share at grid points (rank, K clients averaged), as a ratio of its
    expectations. Its response ``lam dW C`` enters ``E||dL/dB_end||^2`` as ``gamma^2 lam^2 E||dW C A^T||^2``,
    read off the derived closed form as the ``lam^2`` coefficient; with ``||x|| = 1`` the spike's part of it is
    the same coefficient at ``nu = 0``, and ``dG x = lam (1 + nu) dW x``, so the share is
    ``(1 + nu)^2 c(0) / c(nu)``. It does not depend on ``lam``. The model with one probe vector only
    (``kappa = 1``, ``nu_g`` unset): with two, the response lives on the gradient's direction, not the spike."""
    if p.kappa != 1.0 or p.nu_g is not None:
        raise ValueError("predicted_top_input reads the one-vector model (kappa = 1, nu_g = nu); these parameters "
                         f"have kappa={p.kappa}, nu_g={p.nu_g}")
    ranks, ks = np.broadcast_arrays(np.atleast_1d(np.asarray(ranks, float)), np.atleast_1d(np.asarray(ks, float)))

    def lam2(nu: float) -> np.ndarray:  # the lam^2 coefficient, from a large lam of either sign (exact: quadratic)
        m = {s: predict_points(replace(p, lam=s * _LARGE, nu=nu), "grad_B", rule, ranks, ks, ks, alpha) ** 2
             for s in (-1.0, 0.0, 1.0)}
        return (m[1.0] + m[-1.0] - 2.0 * m[0.0]) / (2.0 * _LARGE**2)

    return (1.0 + p.nu) ** 2 * lam2(0.0) / lam2(p.nu)


_LARGE = 1e4
