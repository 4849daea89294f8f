"""The refined model's fitted parameters on disk, tied to the rows they were fitted on.

A refined fit (:func:`validation.analysis.refined_fits`) takes minutes on two cores, and the figures and
notebooks that show it are drawn from the same stored results the exponent tables were fitted on. The tables'
``*_refined_params.csv`` carry a fingerprint of those rows, so a figure reads the parameters back only when its
own rows are the same (and refits otherwise): data flow one way, results -> fit -> parameters file -> figure.
"""

from __future__ import annotations

import hashlib
import math
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
    fitted_on = fingerprint(rows)
    out = pd.DataFrame([{**p.to_row(), "optimizer": key[1], "fitted_on": fitted_on} for key, p in params.items()])
    out.to_csv(path, index=False)
    return path


def read_params(path: Path, rows: pd.DataFrame, **settings: float | None) -> dict[Key, RefinedParams] | None:
    """The parameters in ``path`` when they were fitted on ``rows`` (same fingerprint) with ``settings``
    (``RefinedParams`` fields such as ``nu``, ``kappa``, ``nu_g``, ``pilot_max_n``; a setting given as None is
    not compared), else None: no file, a file without a fingerprint or that does not parse, one fitted on other
    rows or with other settings. The code that fitted them is not part of the key: after a change to the fit,
    rewrite the tables (``python -m paper_figures.exponent_tables``); ``tests/test_refined_store.py`` refits
    part of the committed default table to catch a table left stale."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        table = pd.read_csv(path, dtype={"fitted_on": str, "pilot_ks": str})
        if table.empty or "fitted_on" not in table or set(table.fitted_on) != {fingerprint(rows)}:
            return None
        out = [(str(row["optimizer"]), RefinedParams.from_row(row)) for row in table.to_dict("records")]
    except (ValueError, KeyError, TypeError):
        return None
    params = {}
    for optimizer, p in out:
        if len(p.quantities) != 1 or not _same_settings(p, settings):
            return None  # a joint fit of several quantities, or other settings
        params[(p.scheme, optimizer, p.partition, p.quantities[0])] = p
    return params


def _same_settings(p: RefinedParams, settings: dict[str, float | None]) -> bool:
    for name, want in settings.items():
        have = getattr(p, name)
        if want is not None and not (have is not None and math.isclose(float(have), float(want), rel_tol=1e-12)):
            return False
    return True


def stored_or_fitted(rows: pd.DataFrame, path: Path | None, fit: Callable[[], dict[Key, RefinedParams]],
                     **settings: float | None) -> dict[Key, RefinedParams]:
    """The parameters stored in ``path`` for exactly these ``rows`` and ``settings`` (:func:`read_params`),
    else ``fit()`` (not written back: the stored files are the exponent tables' own)."""
    stored = read_params(path, rows, **settings) if path is not None else None
    return stored if stored is not None else fit()
