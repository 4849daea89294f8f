"""Adam's second step over its first (sfed_theory.adam_steps) against torch's own AdamW."""

from __future__ import annotations

import math

import numpy as np
import pytest
import sympy as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sfed_theory.adam_steps import beta1, beta2, derive_second_step, second_step_ratio, x


def torch_second_over_first(change: float, b1: float, b2: float, g0: float = 0.7, lr: float = 1e-3) -> float:
    """Two AdamW steps (no weight decay, eps 0) on ``g0 w + h w^2 / 2`` with h set so that the first step changes the
    gradient by ``change * g0``: the second step's length over the first's."""
    h = -change * abs(g0) / lr  # the first step is -lr sign(g0): it moves the gradient by -h lr sign(g0)
    w = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.AdamW([w], lr=lr, betas=(b1, b2), eps=0.0, weight_decay=0.0)
    steps = []
    for _ in range(2):
        opt.zero_grad()
        (g0 * w + 0.5 * h * w**2).sum().backward()
        before = w.item()
        opt.step()
        steps.append(w.item() - before)
    return steps[1] / steps[0]


@settings(max_examples=60, deadline=None)
@given(change=st.floats(-3.0, 2.0), b1=st.floats(0.5, 0.99), b2=st.floats(0.9, 0.9999))
def test_the_derived_ratio_is_torchs_adamw(change, b1, b2):
    assert second_step_ratio(change, b1, b2) == pytest.approx(torch_second_over_first(change, b1, b2), rel=1e-9,
                                                              abs=1e-12)


def test_first_order_the_second_step_ignores_the_first_and_it_vanishes_at_minus_one_minus_beta1():
    """The derived slope at x = 0 and zero, against torch's steps (a central difference and the step there)."""
    d = derive_second_step()
    at = {beta1: 0.9, beta2: 0.999}
    slope = float(d.slope.subs(at))
    fd = (torch_second_over_first(1e-4, 0.9, 0.999) - torch_second_over_first(-1e-4, 0.9, 0.999)) / 2e-4
    assert slope == pytest.approx(fd, rel=1e-6) and slope == pytest.approx(0.0261, abs=1e-4)
    assert sp.simplify(d.slope - (beta2 - beta1) / ((1 + beta1) * (1 + beta2))) == 0
    zero = float(d.zero.subs(at))
    assert zero == pytest.approx(-1.9) and abs(torch_second_over_first(zero, 0.9, 0.999)) < 1e-9
    # the threshold: barely moved at half the gradient cancelled, a third off at all of it
    assert second_step_ratio([-0.5, -1.0]) == pytest.approx([0.9322, 0.6701], abs=1e-4)
    assert d.ratio.free_symbols == {x, beta1, beta2}


def test_bad_betas_are_refused():
    for b1, b2 in ((0.0, 0.999), (0.9, 1.0), (1.2, 0.5)):
        with pytest.raises(ValueError, match="betas"):
            second_step_ratio(0.0, b1, b2)
    assert np.all(np.isfinite(second_step_ratio(np.linspace(-10, 10, 41))))
    assert math.isclose(float(second_step_ratio(0.0)), 1.0)
