"""Where Adam's second local step operates on a real round: each client's per-coordinate gradient change.

:mod:`sfed_theory.adam_steps` derives Adam's second step over its first on one coordinate, ``f(x)``, with ``x`` the
relative change of that coordinate's gradient between the two steps, ``x = (g1 - g0) / g0``. Its response to the
first step's own effect (which grows as gamma^2) is weak where ``x`` is near 0 (slope 0.026) and strong near
``x = -1`` (0.75). Which regime a round is in is a measurement: :func:`second_step_changes` runs one configuration
with an AdamW that records each local step's dL/dB, and returns every trained client's ``x`` over the coordinates
of B; :func:`second_step_summary` gives its quantiles and the means over coordinates of ``f(x)`` and ``f'(x)``.
"""

from __future__ import annotations

import dataclasses
from unittest import mock

import numpy as np
import pandas as pd
import torch

from sfed_theory.adam_steps import second_step_ratio, second_step_slope
from validation.config import RunConfig

__all__ = ["second_step_changes", "recorded_round", "second_step_summary", "SMALL_GRADIENT"]

SMALL_GRADIENT = 1e-3
"""Coordinates whose first gradient is below this fraction of the mean absolute one are left out: their ``x`` is a
ratio of noise to almost nothing, and Adam's eps, not ``f``, sets their step."""


class _RecordingAdamW(torch.optim.AdamW):
    """AdamW that keeps a copy of every parameter's gradient at each step, in parameter order."""

    def __init__(self, params, **kw):
        super().__init__(params, **kw)
        self.seen: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        self.seen.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"] if p.grad is not None])
        return super().step(closure)


def second_step_changes(cfg: RunConfig) -> tuple[np.ndarray, pd.DataFrame]:
    """``(x, rows)``: the relative change ``(g1 - g0) / g0`` of every trained client's dL/dB coordinate between its first
    two local steps in round 1 (coordinates with a small first gradient left out, :data:`SMALL_GRADIENT`), and the
    run's own rows. AdamW, FFA (only B trains, so the recorded gradients are B's) and at least two local steps."""
    g0, g1, rows, _ = recorded_round(cfg)
    return np.concatenate([((b - a) / a)[_kept(a)].flatten() for a, b in zip(g0, g1)]), rows


def recorded_round(cfg: RunConfig) -> tuple[list[torch.Tensor], list[torch.Tensor], pd.DataFrame, object]:
    """``(g0, g1, rows, state)`` of round 1: per adapted layer, the K trained clients' dL/dB at the first and second
    local step (float64, ``(K, d, r)``), the run's rows and the server state after the round."""
    from validation.federated import run

    if cfg.optimizer != "adamw" or cfg.scheme != "ffa" or cfg.local_steps < 2:
        raise ValueError("the second step's inputs are measured for AdamW under FFA with at least two local steps, got "
                         f"optimizer={cfg.optimizer!r}, scheme={cfg.scheme!r}, local_steps={cfg.local_steps}")
    made: list[_RecordingAdamW] = []

    def recording(params, name, lr, weight_decay):
        made.append(_RecordingAdamW(params, lr=lr, weight_decay=weight_decay))
        return made[-1]

    with mock.patch("validation.backends.make_optimizer", recording):
        rows, state, _ = run(dataclasses.replace(cfg, rounds=1), return_state=True)
    k = cfg.k  # batched slots beyond the K trained clients are not clients
    g0, g1 = ([g[:k].double().cpu() for g in made[0].seen[t]] for t in (0, 1))
    return g0, g1, rows, state


def _kept(g0: torch.Tensor) -> torch.Tensor:
    return g0.abs() > SMALL_GRADIENT * g0.abs().mean()


def second_step_summary(x: np.ndarray, beta1: float = 0.9, beta2: float = 0.999) -> dict[str, float]:
    """Quantiles of ``x``, the share below -1/2 and -1, and the means of Adam's second-step ratio ``f(x)`` and of its
    derived slope ``f'(x)``: how strongly, averaged over the coordinates, the second
    step responds to a small common change of the gradient such as the first step's own effect."""
    x = np.asarray(x, dtype=float)
    if x.size == 0:
        raise ValueError("no coordinates to summarise")
    slope = second_step_slope(x, beta1, beta2)
    return {"n_coordinates": float(x.size), "x_q10": float(np.quantile(x, 0.1)), "x_median": float(np.median(x)),
            "x_q90": float(np.quantile(x, 0.9)), "share_below_half": float(np.mean(x < -0.5)),
            "share_below_one": float(np.mean(x < -1.0)), "f_mean": float(second_step_ratio(x, beta1, beta2).mean()),
            "f_slope_mean": float(slope.mean())}
