"""The measured end-of-round dL/dB against the largest drop any affine end-gradient model allows.

Under FFA, A is frozen, so dL/dB at the round's start (``grad_B``, B = 0) and at its end (``grad_B_end``)
are the probe gradient before and after the round seen through the same A, both times gamma. Their
ratio ``R = E||dL/dB_end||^2 / E||dL/dB_start||^2`` (seed means of squares, the estimate of the ratio of
second moments) is what the refined model's curvature term describes. Every model whose end gradient
is affine in the update, with increments that do not follow gamma and client noise that averages
(:mod:`sfed_theory.affine_bound`), allows R to drop by at most ``(c - 1)/(c + 1)`` between an SFed
cell and the one with c^2 times the clients; :func:`sfed_drops` sets the measured drops beside it. At a
gamma that does not depend on N (LoRA, rsLoRA) the same class says that the drop from N = 1 to 4 is 4
times the drop from 4 to 16; :func:`fixed_gamma_test` measures the excess. Both bootstraps resample
seeds with one draw for every cell: the cells of a seed share the probe and the A init, so their
start gradients are the same up to gamma, and the pairing is what makes the drops' CIs narrow.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from validation.analysis import identical_n1_runs
from validation.metrics import ALL

__all__ = ["squared_grad_table", "end_gradient_ratios", "sfed_drops", "fixed_gamma_test"]

_CELL = ["partition", "rank", "rule", "n_clients"]


def squared_grad_table(rows: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """FFA's round-1 ``__all__`` rows as (cells, start^2, end^2): cells x seeds arrays of the squared dL/dB
    at the round's start and end; ``cells`` has gamma and the measured ``n_eff_ratio`` (1 at N = 1). One
    learning rate per call; duplicate (cell, seed) rows, a gamma that varies within a cell, and cells
    lacking a seed that others have are errors (the bootstrap pairs seeds across cells)."""
    a = identical_n1_runs(rows)
    a = a[(a.layer == ALL) & (a.scheme == "ffa") & (a["round"] == 1) & ~a.diverged.astype(bool)]
    if a.empty:
        raise ValueError("no FFA round-1 rows: the ratio needs A frozen, so that start and end share it")
    if "lr" in a and a.lr.nunique() > 1:
        raise ValueError(f"rows of several learning rates {sorted(a.lr.unique())}: pass one at a time")
    dup = a.duplicated(_CELL + ["seed"])
    if dup.any():
        raise ValueError(f"duplicate (cell, seed) rows, e.g. {a.loc[dup, _CELL + ['seed']].iloc[0].to_dict()}")
    by_cell = a.groupby(_CELL)
    if (by_cell.gamma.nunique() > 1).any():
        raise ValueError("gamma varies within a cell")
    wide = a.assign(s2=a.grad_B**2, e2=a.grad_B_end**2).pivot(index=_CELL, columns="seed", values=["s2", "e2"])
    missing = wide.index[wide.isna().any(axis=1)]
    if len(missing):
        raise ValueError(f"{len(missing)} cells lack seeds that others have (first: {missing[0]}); the paired "
                         "bootstrap needs every seed in every cell")
    neff = by_cell.n_eff_ratio.mean().reindex(wide.index).fillna(1.0) if "n_eff_ratio" in a else np.nan
    cells = wide.index.to_frame(index=False).assign(gamma=by_cell.gamma.first().reindex(wide.index).to_numpy(),
                                                    n_eff=np.asarray(neff, dtype=float))
    return cells, wide["s2"].to_numpy(), wide["e2"].to_numpy()


def _ratio(s2: np.ndarray, e2: np.ndarray) -> np.ndarray:
    """R: the ratio of the seed means (last axis) of the squares, the estimate of a ratio of second moments."""
    return e2.mean(-1) / s2.mean(-1)


def _paired_ratios(s2: np.ndarray, e2: np.ndarray, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """R per cell, and its bootstrap replicates (cells x n_boot) with one seed draw shared by every cell."""
    draws = np.random.default_rng(seed).integers(0, s2.shape[1], size=(n_boot, s2.shape[1]))
    return _ratio(s2, e2), _ratio(s2[:, draws], e2[:, draws])


def end_gradient_ratios(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (partition, rank, rule, N): gamma, n_eff and R, the ratio of the seed means of the squared
    dL/dB at the round's end and start."""
    cells, s2, e2 = squared_grad_table(rows)
    return cells.assign(R=_ratio(s2, e2))


def sfed_drops(rows: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """For each split, rank and consecutive pair of N of the SFed rule (N = 1 is the rsLoRA run): the
    gamma ratio c (from the gamma column), R at both cells, the drop ``R(N) - R(N')`` with its 95%
    percentile bootstrap CI over seeds, the largest drop an affine end-gradient model allows, and
    ``above_affine_bound``: the whole CI lies above it. The bound needs ``N_eff' <= c^2 N_eff`` for the
    clients' noise; ``neff_premise`` checks it on the measured Frobenius ``n_eff_ratio`` (a proxy: the
    correlation that matters is the noise's, projected on the probe)."""
    from sfed_theory.affine_bound import drop_bound

    cells, s2, e2 = squared_grad_table(rows)
    r_hat, r_boot = _paired_ratios(s2, e2, n_boot, seed)
    out = []
    for (part, rank), g in cells[cells.rule == "sfed"].groupby(["partition", "rank"]):
        g = g.sort_values("n_clients")
        for i, j in zip(g.index[:-1], g.index[1:]):
            c = float(cells.gamma[j] / cells.gamma[i])
            lo, hi = np.percentile(r_boot[i] - r_boot[j], [2.5, 97.5])
            bound = drop_bound(c)
            out.append({"partition": part, "rank": int(rank), "n_from": int(cells.n_clients[i]),
                        "n_to": int(cells.n_clients[j]), "gamma_ratio": c, "R_from": r_hat[i], "R_to": r_hat[j],
                        "drop": r_hat[i] - r_hat[j], "ci_low": lo, "ci_high": hi, "affine_bound": bound,
                        "above_affine_bound": bool(lo > bound), "n_eff_from": cells.n_eff[i],
                        "n_eff_to": cells.n_eff[j], "neff_premise": bool(cells.n_eff[j] <= c * c * cells.n_eff[i])})
    return pd.DataFrame(out)


def fixed_gamma_test(rows: pd.DataFrame, *, rules: tuple[str, ...] = ("lora", "rslora"), n_boot: int = 1000,
                     seed: int = 0) -> pd.DataFrame:
    """For each rule whose gamma does not depend on N, split and rank with three N (N1 < N2 < N3): the
    drops ``d1 = R(N1) - R(N2)`` and ``d2 = R(N2) - R(N3)``, the weight w every affine end-gradient
    model gives their ratio (4 for 1, 4, 16), ``excess = d1 - w d2`` with its 95% bootstrap CI over
    seeds (0 for the whole class), and ``excess_nonzero``: the CI excludes 0. Groups without exactly
    three N are left out with a warning."""
    from sfed_theory.affine_bound import noise_difference_ratio

    cells, s2, e2 = squared_grad_table(rows)
    r_hat, r_boot = _paired_ratios(s2, e2, n_boot, seed)
    out = []
    for (rule, part, rank), g in cells[cells.rule.isin(rules)].groupby(["rule", "partition", "rank"]):
        g = g.sort_values("n_clients")
        if len(g) != 3:
            warnings.warn(f"{rule}/{part}/r={rank}: {len(g)} values of N, the test needs 3; left out", stacklevel=2)
            continue
        if not np.allclose(g.gamma, g.gamma.iloc[0]):
            raise ValueError(f"{rule}: gamma changes with N ({g.gamma.tolist()}); the test needs it fixed")
        i, j, k = g.index
        w = noise_difference_ratio(*(int(v) for v in g.n_clients))
        lo, hi = np.percentile((r_boot[i] - r_boot[j]) - w * (r_boot[j] - r_boot[k]), [2.5, 97.5])
        d1, d2 = r_hat[i] - r_hat[j], r_hat[j] - r_hat[k]
        out.append({"rule": rule, "partition": part, "rank": int(rank), "gamma": float(g.gamma.iloc[0]),
                    "ns": tuple(int(v) for v in g.n_clients), "d1": d1, "d2": d2, "weight": w,
                    "excess": d1 - w * d2, "ci_low": lo, "ci_high": hi, "excess_nonzero": bool(lo > 0 or hi < 0)})
    return pd.DataFrame(out)
