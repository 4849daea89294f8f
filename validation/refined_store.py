"""The refined model's fitted parameters on disk, tied to the rows they were fitted on.

A refined fit (:func:`validation.analysis.refined_fits`) takes minutes on two cores, and the figures and
notebooks that show it are drawn from the same stored results the exponent tables were fitted on. The tables'
``*_refined_params.csv`` carry a fingerprint of those rows, so a figure reads the parameters back only when its
own rows are the same (and refits otherwise): data flow one way, results -> fit -> parameters file -> figure.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from validation.refined import RefinedParams

__all__ = ["fingerprint", "write_params", "read_params", "stored_or_fitted"]

Key = tuple[str, str, str, str]  # (scheme, optimizer, partition, quantity), as refined_fits returns them


def fingerprint(rows: pd.DataFrame) -> str:
    """A hash of ``rows``' values and column names (16 hex digits); row order and index do not count."""
    h = pd.util.hash_pandas_object(rows.reset_index(drop=True), index=False).sort_values().to_numpy()
    return hashlib.sha256(h.tobytes() + ",".join(map(str, rows.columns)).encode()).hexdigest()[:16]


def write_params(params: dict[Key, RefinedParams], path: Path, rows: pd.DataFrame) -> Path:
    """Write ``params`` (one CSV row each, :meth:`RefinedParams.to_row`) with ``rows``' fingerprint."""
    out = pd.DataFrame([{**p.to_row(), "optimizer": key[1], "fitted_on": fingerprint(rows)}
                        for key, p in params.items()])
    out.to_csv(path, index=False)
    return path


def read_params(path: Path, rows: pd.DataFrame) -> dict[Key, RefinedParams] | None:
    """The parameters in ``path`` when they were fitted on ``rows`` (same fingerprint), else None (no file, a
    file without a fingerprint, or one fitted on other rows)."""
    path = Path(path)
    if not path.is_file():
        return None
    table = pd.read_csv(path, keep_default_na=True)
    if table.empty or "fitted_on" not in table or set(table.fitted_on.astype(str)) != {fingerprint(rows)}:
        return None
    out = {}
    for row in table.to_dict("records"):
        p = RefinedParams.from_row(row)
        if len(p.quantities) != 1:
            return None  # a joint fit of several quantities: not refined_fits' per-quantity layout
        out[(p.scheme, str(row["optimizer"]), p.partition, p.quantities[0])] = p
    return out


def stored_or_fitted(rows: pd.DataFrame, path: Path | None, fit: Callable[[], dict[Key, RefinedParams]]
                     ) -> dict[Key, RefinedParams]:
    """The parameters stored in ``path`` for exactly these ``rows``, else ``fit()`` (not written back: the
    stored files are the exponent tables' own)."""
    stored = read_params(path, rows) if path is not None else None
    return stored if stored is not None else fit()
