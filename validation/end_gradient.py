"""The measured end-of-round dL/dB against the largest drop any affine end-gradient model allows.

Under FFA, A is frozen, so dL/dB at the round's start (``grad_B``, B = 0) and at its end (``grad_B_end``)
are the probe gradient before and after the round seen through the same A, both times gamma. Their
ratio ``R = E||dL/dB_end||^2 / E||dL/dB_start||^2`` (seed means of squares, the estimate of the ratio of
second moments) is what the refined model's curvature term describes. Every model whose end gradient
is affine in the update, with increments that do not follow gamma and client noise that averages
(:mod:`sfed_theory.affine_bound`), allows R to drop by at most ``(c - 1)/(c + 1)`` between an SFed
cell and the one with c^2 times the clients; :func:`sfed_drops` sets the measured drops beside it. At a
gamma that does not depend on N (LoRA, rsLoRA) the same class says that the drop from N = 1 to 4 is 4
times the drop from 4 to 16 (only the averaged noise changes, by rho + (1 - rho)/N);
:func:`fixed_gamma_test` measures the excess.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from validation.analysis import identical_n1_runs
from validation.metrics import ALL

__all__ = ["ratio_cube", "end_gradient_ratios", "sfed_drops", "fixed_gamma_test"]

_CELL = ["partition", "rank", "rule", "n_clients"]


def ratio_cube(rows: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """FFA's round-1 ``__all__`` rows as cells x seeds: (cells, start^2, end^2), the squared dL/dB at the
    round's start and end. Cells lacking a seed that others have are an error (the bootstrap pairs seeds)."""
    a = identical_n1_runs(rows)
    a = a[(a.layer == ALL) & (a.scheme == "ffa") & (a["round"] == 1) & ~a.diverged.astype(bool)]
    if a.empty:
        raise ValueError("no FFA round-1 rows: the ratio needs A frozen, so that start and end share it")
    wide = a.assign(s2=a.grad_B**2, e2=a.grad_B_end**2).pivot_table(index=_CELL, columns="seed",
                                                                    values=["s2", "e2"], aggfunc="first")
    if wide.isna().any().any():
        raise ValueError("some cells lack seeds that others have; the paired bootstrap needs every seed per cell")
    cells = wide.index.to_frame(index=False)
    gam = a.groupby(_CELL).gamma.first().reindex(wide.index).to_numpy()
    return cells.assign(gamma=gam), wide["s2"].to_numpy(), wide["e2"].to_numpy()


def end_gradient_ratios(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (partition, rank, rule, N): gamma and R, the ratio of the seed means of the squared dL/dB at
    the round's end and start."""
    cells, s2, e2 = ratio_cube(rows)
    return cells.assign(R=e2.mean(1) / s2.mean(1))


def sfed_drops(rows: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """For each split, rank and consecutive pair of N of the SFed rule (N = 1 is the rsLoRA run): the
    gamma ratio c, R at both cells, the drop ``R(K) - R(K')`` with its 95% percentile bootstrap CI over
    seeds (the same seeds for both cells), the largest drop an affine end-gradient model allows, and
    ``rules_out_affine``: the CI lies above it. The bound assumes the clients' noise correlation is >= 0
    (``N_eff`` grows at most in proportion to K); ``rho_ratio`` at K' is given to judge that."""
    from sfed_theory.affine_bound import drop_bound

    cells, s2, e2 = ratio_cube(rows)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, s2.shape[1], size=(n_boot, s2.shape[1]))
    r_boot = e2[:, draws].mean(2) / s2[:, draws].mean(2)  # cells x n_boot
    r_hat = e2.mean(1) / s2.mean(1)
    rho = rows[(rows.layer == ALL) & (rows.scheme == "ffa")].groupby(["partition", "n_clients"]).rho_ratio.mean()
    out = []
    for (part, rank), g in cells[cells.rule == "sfed"].groupby(["partition", "rank"]):
        g = g.sort_values("n_clients")
        for i, j in zip(g.index[:-1], g.index[1:]):
            c = float(cells.gamma[j] / cells.gamma[i])
            d = r_boot[i] - r_boot[j]
            lo, hi = np.percentile(d, [2.5, 97.5])
            bound = drop_bound(c)
            out.append({"partition": part, "rank": int(rank), "n_from": int(cells.n_clients[i]),
                        "n_to": int(cells.n_clients[j]), "gamma_ratio": c, "R_from": r_hat[i], "R_to": r_hat[j],
                        "drop": r_hat[i] - r_hat[j], "ci_low": lo, "ci_high": hi, "affine_bound": bound,
                        "rules_out_affine": bool(lo > bound),
                        "rho_ratio_to": float(rho.get((part, int(cells.n_clients[j])), np.nan))})
    return pd.DataFrame(out)


def fixed_gamma_test(rows: pd.DataFrame, *, rules: tuple[str, ...] = ("lora", "rslora"), n_boot: int = 1000,
                     seed: int = 0) -> pd.DataFrame:
    """For each rule whose gamma does not depend on N, split and rank with three N (K1 < K2 < K3): the
    drops ``d1 = R(K1) - R(K2)`` and ``d2 = R(K2) - R(K3)``, the weight w every affine end-gradient
    model gives their ratio (4 for 1, 4, 16), ``excess = d1 - w d2`` with its 95% bootstrap CI over
    seeds (0 for the whole class), and ``rules_out_affine``: the CI excludes 0."""
    from sfed_theory.affine_bound import noise_difference_ratio

    cells, s2, e2 = ratio_cube(rows)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, s2.shape[1], size=(n_boot, s2.shape[1]))
    r_boot = e2[:, draws].mean(2) / s2[:, draws].mean(2)
    r_hat = e2.mean(1) / s2.mean(1)
    out = []
    for (rule, part, rank), g in cells[cells.rule.isin(rules)].groupby(["rule", "partition", "rank"]):
        g = g.sort_values("n_clients")
        if len(g) != 3:
            continue
        if not np.allclose(g.gamma, g.gamma.iloc[0]):
            raise ValueError(f"{rule}: gamma changes with N ({g.gamma.tolist()}); the test needs it fixed")
        i, j, k = g.index
        w = noise_difference_ratio(*(int(v) for v in g.n_clients))
        ex = (r_boot[i] - r_boot[j]) - w * (r_boot[j] - r_boot[k])
        lo, hi = np.percentile(ex, [2.5, 97.5])
        d1, d2 = r_hat[i] - r_hat[j], r_hat[j] - r_hat[k]
        out.append({"rule": rule, "partition": part, "rank": int(rank), "gamma": float(g.gamma.iloc[0]),
                    "ns": tuple(int(v) for v in g.n_clients), "d1": d1, "d2": d2, "weight": w,
                    "excess": d1 - w * d2, "ci_low": lo, "ci_high": hi, "rules_out_affine": bool(lo > 0 or hi < 0)})
    return pd.DataFrame(out)
