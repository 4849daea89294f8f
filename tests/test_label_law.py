"""The label law of the client correlation: its label statistics by hand, its closed form against a Monte
Carlo of the class-gradient model with the harness's own estimator, and its fit."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from validation.label_law import LabelLaw, fit_label_law, law_table
from validation.label_overlap import label_shares
from validation.metrics import ratio_rho


def test_label_shares_by_hand():
    labels = np.array([0, 0, 1, 1, 2])
    # fractions (1,0,0), (0,1,0), (1/2,1/2,0): own (1 + 1 + 1/2)/3; pairs 0, 1/2, 1/2; no example drawn twice
    cross, own, repeat = label_shares(labels, [np.array([0, 1]), np.array([2, 3]), np.array([0, 2])])
    assert own == pytest.approx(2.5 / 3) and cross == pytest.approx(1 / 3) and repeat == 1.0
    cross, own, repeat = label_shares(labels, [np.array([0, 2, 4]), np.array([1, 3, 4])])  # the same even mix
    assert cross == pytest.approx(1 / 3) and own == pytest.approx(1 / 3)
    # example 0 drawn three times in four draws: m sum w^2 = 4 (9 + 1)/16; the other client 1
    cross, own, repeat = label_shares(labels, [np.array([0, 0, 0, 1]), np.array([2, 3, 4, 4])])
    assert repeat == pytest.approx((2.5 + 4 * (1 + 1 + 4) / 16) / 2) and own == pytest.approx((1 + 0.5) / 2)
    cross, own, repeat = label_shares(labels, [np.array([0, 1])])
    assert math.isnan(cross) and own == 1.0


def _client_gradients(draws, labels, beta, gamma, sigma2, dim, rng):
    """Each client's mean gradient over its draws (example ids; one id may be drawn twice), an example's
    gradient being its label's direction plus that example's own noise, with label directions of Gram
    ``beta J + gamma I`` (``dim`` coordinates, exact Gram only on average)."""
    c = 1 + int(labels.max())
    chol = np.linalg.cholesky(beta * np.ones((c, c)) + gamma * np.eye(c))
    v = chol @ rng.standard_normal((c, dim)) / math.sqrt(dim)
    noise = rng.standard_normal((len(labels), dim)) * math.sqrt(sigma2 / dim)
    return np.stack([(v[labels[d]] + noise[d]).mean(0) for d in draws])


@pytest.mark.parametrize("beta", [-0.1, 0.3])
def test_law_is_the_harness_estimate_of_the_class_gradient_model(beta):
    """The closed form against Monte Carlo of the model it is derived from, estimated as the harness does,
    with examples drawn twice (their noise repeats) as the harness's batches may."""
    rng = np.random.default_rng(1)
    gamma, sigma2, m = 1.0, 1.0, 8
    groups = [[0] * 8, [0] * 6 + [1] * 2, [0] * 4 + [1] * 4, [1] * 5 + [2] * 3, [0, 1] * 4, [3, 4] * 4]
    labels = np.concatenate([np.array(g) for g in groups])  # label 4 keeps beta >= -1/5 meaningful
    ids = np.split(np.arange(len(labels)), np.cumsum([len(g) for g in groups])[:-1])
    draws = [ix if i % 2 else np.concatenate([ix[:2], ix[:2], ix[:4]]) for i, ix in enumerate(ids)]  # repeats
    cross, own, repeat = label_shares(labels, draws)
    assert repeat > 1.2
    law = LabelLaw(beta / gamma, sigma2 / (m * gamma), "rho_ratio", 0, 0.0)
    est = [ratio_rho((x := _client_gradients(draws, labels, beta, gamma, sigma2, 4000, rng)) @ x.T, np.full(6, 1 / 6))
           for _ in range(40)]
    assert np.mean(est) == pytest.approx(float(law.correlation(cross, own, repeat)), abs=0.01)
    # not the law that ignores the repeated draws, nor the one with the noise counted once per client
    assert abs(np.mean(est) - float(law.correlation(cross, own))) > 0.02
    wrong = LabelLaw(beta / gamma, sigma2 / gamma, "rho_ratio", 0, 0.0)
    assert abs(np.mean(est) - float(wrong.correlation(cross, own, repeat))) > 0.1


def _table(b, n, rng, noise=0.0):
    rows = []
    for part, own_range in (("iid", (0.28, 0.33)), ("dirichlet", (0.38, 0.6))):
        for k in (2, 4, 16):
            for _ in range(6):
                own = rng.uniform(*own_range)
                cross = rng.uniform(0.1, 0.22) if part == "dirichlet" else 0.2
                rows.append({"partition": part, "n_clients": k, "n_participating": k, "label_cross": cross,
                             "label_own": own, "n_labels": 5,
                             "rho_ratio": (b + cross) / (b + own + n) + noise * rng.standard_normal()})
    return pd.DataFrame(rows)


def test_fit_recovers_the_parameters_and_predicts_beyond_the_pilot():
    rng = np.random.default_rng(0)
    t = _table(-0.16, 0.7, rng)
    law = fit_label_law(t[t.n_clients <= 4], "rho_ratio")
    assert (law.b, law.n) == pytest.approx((-0.16, 0.7), abs=1e-6) and law.rms_residual < 1e-9
    out = law_table(t, law, pilot_max_n=4).set_index(["partition", "n_participating"])
    assert out.loc[("dirichlet", 16), "sample"] == "out"
    assert out.loc[("dirichlet", 16), "predicted"] == pytest.approx(out.loc[("dirichlet", 16), "measured"])


def test_fit_keeps_the_label_directions_real_and_refuses_what_it_cannot_identify():
    rng = np.random.default_rng(0)
    t = _table(-0.5, 0.7, rng)  # b = -0.5 < -1/5: no five directions have that Gram
    assert fit_label_law(t, "rho_ratio").b >= -0.2 - 1e-12
    with pytest.raises(ValueError, match="two splits"):
        fit_label_law(t[t.partition == "iid"], "rho_ratio")
    flat = t.assign(label_own=0.3, label_cross=0.2)  # two splits, but nothing tells b from n
    with pytest.raises(ValueError, match="not identified"):
        fit_label_law(flat, "rho_ratio")


def test_laws_are_fitted_per_scheme_and_column_where_identified():
    from validation.label_law import fit_label_laws

    rng = np.random.default_rng(0)
    t = pd.concat([_table(-0.16, 0.7, rng).assign(scheme="ffa"),
                   _table(-0.1, 0.3, rng).assign(scheme="fedit", partition="iid")], ignore_index=True)
    laws = fit_label_laws(t, ["rho_ratio"], pilot_max_n=4)
    assert list(laws) == [("ffa", "rho_ratio")]  # FedIT's pilot has one split only
    assert (laws[("ffa", "rho_ratio")].b, laws[("ffa", "rho_ratio")].n) == pytest.approx((-0.16, 0.7), abs=1e-6)
