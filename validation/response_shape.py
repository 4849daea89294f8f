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

import torch

from validation.probe_inputs import top_direction

__all__ = ["response_shape"]


def response_shape(grad_change: torch.Tensor, update: torch.Tensor, a: torch.Tensor,
                   x: torch.Tensor) -> tuple[float, float]:
    """``(top-input share, output alignment)`` of one layer's probe-gradient change (see the module docstring).

    ``grad_change``: ``dL/dW`` at the end of the round minus at its start, (d, k); ``update``: the round's
    ``dW`` (d, k); ``a``: the adapter's A (r, k) through which dL/dB sees the change; ``x``: the probe's token
    rows (n, k). Either number is NaN where its denominator is zero (no change, no update along ``v``)."""
    dg, dw, a = (torch.as_tensor(t, dtype=torch.float64) for t in (grad_change, update, a))
    if dg.ndim != 2 or dg.shape != dw.shape or a.ndim != 2 or a.shape[1] != dg.shape[1]:
        raise ValueError(f"need dG and dW (d, k) and A (r, k), got {tuple(dg.shape)}, {tuple(dw.shape)}, "
                         f"{tuple(a.shape)}")
    v = top_direction(x)
    seen = float((dg @ a.T).pow(2).sum())
    top = float((dg @ v).pow(2).sum() * (a @ v).pow(2).sum()) / seen if seen > 0 else math.nan
    out_change, response = dw @ v, dg @ v
    norms = float(out_change.norm() * response.norm())
    alignment = float(out_change @ response) / norms if norms > 0 else math.nan
    return top, alignment
