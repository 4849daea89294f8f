"""The clients' pairwise correlation predicted from the labels of their batches (the label law).

A client's increment in a round is, to first order, the mean of its m batch draws' example gradients. Take an
example's gradient as its label's direction plus noise, ``g_e = v_{y_e} + eps_e``, with label directions of
one size and one overlap, ``v_c . v_c' = beta + gamma [c = c']`` (``gamma > 0``; ``beta >= -gamma/C`` for C
labels, so that the directions exist), and noise of variance ``sigma^2`` independent across examples (the
same each time an example is drawn). For clients whose draws have label fractions ``q_i`` and repeat
factor ``repeat_i = m sum_e w_ie^2`` (``w_ie``: example e's share of client i's draws; 1 when no example is
drawn twice),

    E<g_i, g_j> = beta + gamma q_i.q_j  (i != j),      E||g_i||^2 = beta + gamma q_i.q_i + repeat_i sigma^2 / m,

so the harness's ratio estimate of the pairwise correlation (equal weights: the mean pairwise inner product
over the mean squared norm) concentrates, as the dimension grows, on the ratio of expectations

    rho = (b + cross) / (b + own + n repeat),      b = beta / gamma,  n = sigma^2 / (m gamma),

with ``cross`` (mean ``q_i.q_j`` over pairs), ``own`` (mean ``q_i.q_i``) and ``repeat`` (mean repeat factor)
the batches' statistics (:func:`validation.label_overlap.label_shares`). ``b`` and ``n`` describe the
gradients, not the split: fitted on pilot runs of an IID and a label-skewed split together, which differ in
``cross`` and ``own``, the law predicts the correlation at any K on either split from draws known before any
training. On a label-skewed split it has the shape the gradient check measures: anticorrelated at K = 2 (the
two clients' label shares are complementary), rising with K as that constraint loosens, and below IID at
every K (a purer client's increment is larger). Adam's per-coordinate normalisation, the projections the
harness measures and the second-order A increments (``rho_gB``: A's first-round increment is ``B_i^T G_i``, a
product of two client-specific terms, not a mean of example gradients) are outside this picture; the law is
checked on the measured correlations (:func:`law_table`, notebook 03, figures (p) and (r)). It assumes equal
aggregation weights and the same number of draws per client.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.optimize import least_squares

__all__ = ["LabelLaw", "MAX_CONDITION", "fit_label_law", "fit_label_laws", "law_table"]


@dataclass(frozen=True)
class LabelLaw:
    """``rho = (b + cross) / (b + own + n repeat)`` for one measured correlation ``column``."""

    b: float  # the label directions' common overlap over their own variance, >= -1/C
    n: float  # the per-example noise over (draws per client x the label variance), >= 0
    column: str
    n_runs: int  # the runs it was fitted on
    rms_residual: float  # of the per-run correlations it was fitted on

    def correlation(self, cross, own, repeat=1.0) -> np.ndarray:
        """The law's correlation at label statistics ``cross``, ``own`` and ``repeat`` (numbers or arrays)."""
        return (self.b + np.asarray(cross, float)) / (self.b + np.asarray(own, float) + self.n * np.asarray(repeat, float))

    def describe(self) -> str:
        """One line: the law and its fitted parameters."""
        return (f"{self.column} = (b + cross)/(b + own + n repeat): b={self.b:+.4f}, n={self.n:.4f} "
                f"({self.n_runs} runs, rms residual {self.rms_residual:.3f})")


MAX_CONDITION = 1e6
"""A fit whose Jacobian is worse conditioned than this does not identify b and n separately."""


def fit_label_law(table: pd.DataFrame, column: str) -> LabelLaw:
    """Least squares of the law over the runs of ``table`` (:func:`validation.label_overlap.overlap_table`:
    ``label_cross``, ``label_own``, ``label_repeat`` (1 when absent), ``n_labels``, ``partition`` and the
    measured ``column``), with ``b >= -1/C`` and ``n >= 0``. Raises ValueError when the runs cannot identify
    both parameters: they must come from at least two splits (an IID and a label-skewed one differ in
    ``own``), and the fit's Jacobian must be well conditioned (:data:`MAX_CONDITION`)."""
    t = table.dropna(subset=[column, "label_cross", "label_own"])
    if len(t) < 3 or t.partition.nunique() < 2:
        raise ValueError(f"the label law needs runs of at least two splits whose batches differ in label "
                         f"concentration (an IID and a label-skewed one); got {len(t)} runs of {column} on "
                         f"{sorted(t.partition.unique())}")
    cross, own, rho = (t[c].to_numpy(float) for c in ("label_cross", "label_own", column))
    repeat = t["label_repeat"].to_numpy(float) if "label_repeat" in t else np.ones(len(t))
    b_min = -1.0 / float(t.n_labels.max())

    def resid(x: np.ndarray) -> np.ndarray:
        return (x[0] + cross) / (x[0] + own + x[1] * repeat) - rho

    fit = least_squares(resid, x0=[0.0, 1.0], bounds=([b_min, 0.0], [np.inf, np.inf]))
    cond = np.linalg.cond(fit.jac)
    if not np.isfinite(cond) or cond > MAX_CONDITION:
        raise ValueError(f"the label law is not identified by these runs of {column} (condition {cond:.3g}: "
                         "their label statistics barely vary)")
    return LabelLaw(float(fit.x[0]), float(fit.x[1]), column, len(t), float(np.sqrt(np.mean(fit.fun**2))))


def fit_label_laws(table: pd.DataFrame, columns, pilot_max_n: int) -> dict[tuple[str, str], LabelLaw]:
    """``{(scheme, column): law}`` fitted on the runs of ``table`` with ``n_clients <= pilot_max_n`` (all its
    splits together), for each scheme and each of ``columns`` the pilot identifies (:func:`fit_label_law`)."""
    laws = {}
    for scheme, g in table.groupby("scheme"):
        for col in columns:
            try:
                laws[(str(scheme), col)] = fit_label_law(g[g.n_clients <= pilot_max_n], col)
            except ValueError:
                continue
    return laws


def law_table(table: pd.DataFrame, law: LabelLaw, pilot_max_n: int | None = None) -> pd.DataFrame:
    """Per (partition, K clients averaged): the measured mean of ``law.column`` (and its standard error
    over runs) beside the law's mean over the same runs; ``sample`` says whether that N was in the pilot."""
    repeat = table["label_repeat"] if "label_repeat" in table else 1.0
    t = table.assign(law=law.correlation(table.label_cross, table.label_own, repeat)).dropna(subset=[law.column])
    out = t.groupby(["partition", "n_participating"]).agg(
        runs=(law.column, "size"), measured=(law.column, "mean"), measured_se=(law.column, "sem"),
        predicted=("law", "mean"), label_cross=("label_cross", "mean"), label_own=("label_own", "mean"),
        n_clients=("n_clients", "max"))
    out = out.reset_index().assign(column=law.column)
    if pilot_max_n is not None:
        out["sample"] = np.where(out.n_clients <= pilot_max_n, "in", "out")
    return out.drop(columns="n_clients")
