"""How much the clients' batches of a round share labels, and whether the client correlation follows it.

The theory takes the client correlation rho as one number. On a label-skewed split it could depend on
which topics the clients' batches hold: two clients training on the same topics may push B the same way.
:func:`label_overlap` is the mean pairwise cosine of the clients' label histograms; :func:`overlap_table`
puts it beside the measured correlations of each run, and :func:`pilot_line` predicts a correlation from
the overlap with a line fitted on the pilot runs only (N <= ``pilot_max_n``), so that the rest of the
grid tests the lead out of sample (notebook 03 runs it on the gradient check). :func:`label_shares` gives
the two label statistics the client correlation's label law takes (:mod:`validation.label_law`): how much
two clients' batches share labels, and how concentrated one client's batch is.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from validation.metrics import ALL

__all__ = ["label_overlap", "label_shares", "run_label_overlap", "run_label_shares", "overlap_table", "pilot_line"]


def _label_counts(labels: np.ndarray, index_sets: list[np.ndarray]) -> np.ndarray:
    """``(sets, labels)`` counts of ``labels[index_sets[i]]`` (an index listed twice counted twice)."""
    return np.array([np.bincount(labels[np.asarray(ix)], minlength=int(labels.max()) + 1) for ix in index_sets], float)


def label_overlap(labels: np.ndarray, index_sets: list[np.ndarray]) -> float:
    """Mean over pairs i != j of the cosine between the label histograms of ``labels[index_sets[i]]``
    and ``labels[index_sets[j]]`` (1: the same label mix, 0: no label in common). NaN for one set."""
    labels = np.asarray(labels)
    if len(index_sets) < 2:
        return float("nan")
    h = _label_counts(labels, index_sets)
    h /= np.linalg.norm(h, axis=1, keepdims=True)
    cos = h @ h.T
    return float(cos[~np.eye(len(h), dtype=bool)].mean())


def label_shares(labels: np.ndarray, index_sets: list[np.ndarray]) -> tuple[float, float, float]:
    """``(cross, own, repeat)`` of the clients' draws ``index_sets[i]`` (example indices, one per draw, an
    example drawn twice counted twice): with ``q_i`` the label fractions of client i's draws (each sums
    to 1), ``cross`` the mean over pairs i != j of ``q_i . q_j`` (NaN for one set), ``own`` the mean of
    ``q_i . q_i`` (1 for a one-label batch, 1/C for an even mix of C labels), and ``repeat`` the mean of
    ``m_i sum_e w_ie^2`` with ``w_ie`` example e's share of client i's m_i draws (1 when no example is drawn
    twice; an example's noise is the same each time it is drawn)."""
    labels = np.asarray(labels)
    draws = [np.asarray(ix) for ix in index_sets]
    h = _label_counts(labels, draws)
    q = h / h.sum(axis=1, keepdims=True)
    g = q @ q.T
    off = ~np.eye(len(q), dtype=bool)
    repeat = np.mean([np.sum(np.unique(ix, return_counts=True)[1] ** 2) / len(ix) for ix in draws])
    return (float(g[off].mean()) if off.any() else float("nan")), float(np.diag(g).mean()), float(repeat)


def _round_batches(cfg, labels: np.ndarray, rnd: int) -> list[np.ndarray]:
    """Each client's training examples of ``cfg``'s round ``rnd``, all local steps together."""
    from validation.federated import client_batch_indices, sample_clients, split_labels

    idx = client_batch_indices(cfg, split_labels(cfg, labels), sample_clients(cfg, rnd), rnd)
    return [np.concatenate(steps) for steps in idx]


def run_label_overlap(cfg, labels: np.ndarray, rnd: int = 1) -> float:
    """:func:`label_overlap` of the batches the clients of ``cfg``'s round ``rnd`` train on (all local steps)."""
    return label_overlap(labels, _round_batches(cfg, labels, rnd))


def run_label_shares(cfg, labels: np.ndarray, rnd: int = 1) -> tuple[float, float, float]:
    """:func:`label_shares` of the batches the clients of ``cfg``'s round ``rnd`` train on (all local steps)."""
    return label_shares(labels, _round_batches(cfg, labels, rnd))


def overlap_table(df: pd.DataFrame, labels_for=None, rnd: int = 1) -> pd.DataFrame:
    """One row per run of ``df`` (harness rows) with more than one client averaged: its configuration
    columns, ``label_overlap`` and the :func:`label_shares` ``label_cross``, ``label_own`` and ``label_repeat`` of its
    round-``rnd`` batches, the number of labels ``n_labels``, and its measured correlations (``__all__``).
    ``labels_for(cfg)``: the run's training labels (default :func:`validation.models.train_labels`; the
    train/eval split of a data set without its own depends on the seed)."""
    from validation.config import RunConfig

    if labels_for is None:
        from validation.models import train_labels as labels_for
    rows = df[(df.layer == ALL) & (df["round"] == rnd) & (df.n_participating > 1)]
    cfg_cols = [c for c in RunConfig.__dataclass_fields__ if c in rows]
    labels: dict[tuple, np.ndarray] = {}
    stats: dict[tuple, tuple[float, float, float, float, int]] = {}
    out = []
    for _, r in rows.iterrows():
        cfg = RunConfig.from_dict({c: _plain(r[c]) for c in cfg_cols})
        data = (cfg.model, cfg.dataset, cfg.max_examples, cfg.seed, cfg.synth_examples)
        key = (*data, cfg.n_clients, cfg.participating, cfg.partition, cfg.dirichlet_alpha, cfg.local_steps,
               cfg.batch_size)  # the batches do not depend on the rule, rank or scheme
        if key not in stats:
            if data not in labels:
                labels[data] = np.asarray(labels_for(cfg))
            batches = _round_batches(cfg, labels[data], rnd)
            stats[key] = (label_overlap(labels[data], batches), *label_shares(labels[data], batches),
                          int(labels[data].max()) + 1)
        out.append(stats[key])
    keep = ["run_id", "scheme", "partition", "rule", "rank", "n_clients", "n_participating", "seed",
            *(c for c in ("rho_ratio", "rho_out", "rho_gA", "rho_gB") if c in rows)]
    cols = np.array(out, dtype=float).reshape(-1, 5)
    return rows[keep].assign(label_overlap=cols[:, 0], label_cross=cols[:, 1], label_own=cols[:, 2],
                             label_repeat=cols[:, 3], n_labels=cols[:, 4].astype(int)).reset_index(drop=True)


def _plain(v):
    """A DataFrame cell as the RunConfig field it came from (arrays back to tuples, NaN back to None)."""
    if isinstance(v, np.ndarray):
        return tuple(v.tolist())
    if isinstance(v, float) and np.isnan(v):
        return None
    return v.item() if isinstance(v, np.generic) else v


def pilot_line(table: pd.DataFrame, column: str = "rho_ratio", pilot_max_n: int = 4) -> pd.DataFrame:
    """Per split: a line ``column ~ a + b * label_overlap`` fitted on the runs with N <= ``pilot_max_n``,
    and per (split, N) the mean measured ``column`` beside the line's prediction at those runs' overlaps
    (in-sample for the pilot N, predicted beyond it) and the pilot's plain mean (the constant-rho guess)."""
    out = []
    for part, g in table.dropna(subset=[column]).groupby("partition"):
        pilot = g[g.n_clients <= pilot_max_n]
        if pilot.label_overlap.nunique() < 2:
            continue
        b, a = np.polyfit(pilot.label_overlap, pilot[column], 1)
        for n, h in g.groupby("n_clients"):
            out.append({"partition": part, "n_clients": int(n), "runs": len(h), "label_overlap": h.label_overlap.mean(),
                        "measured": h[column].mean(), "measured_se": h[column].sem(),
                        "predicted": float(np.mean(a + b * h.label_overlap)), "pilot_mean": pilot[column].mean(),
                        "intercept": a, "slope": b, "sample": "in" if n <= pilot_max_n else "out"})
    return pd.DataFrame(out)
