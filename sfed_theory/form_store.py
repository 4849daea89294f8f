"""Derived closed forms kept on disk between processes.

A refined-regime derivation takes up to a minute of one core, and every notebook, figure build, analysis
and GPU-check step is a new process that would derive the same forms again. The store keeps each derived
closed form as a pickle under a key that changes whenever the code that derives it (or sympy) changes, so
a stored form is always what this code derives; a missing, stale or unreadable entry is derived afresh.

Where: ``$SFED_FORM_CACHE`` if set and not empty (``off`` turns the store off), else ``$XDG_CACHE_HOME/sfed-theory``
(default ``~/.cache/sfed-theory``).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
from functools import lru_cache
from pathlib import Path

import sympy as sp

__all__ = ["store_dir", "code_key", "load", "save"]

_DERIVING_CODE = ("assumptions.py", "schemes.py", "wick.py", "derivation.py")
"""The modules whose text decides what a derivation returns."""


def store_dir() -> Path | None:
    """The store's directory, or None when ``SFED_FORM_CACHE=off``."""
    env = os.environ.get("SFED_FORM_CACHE", "").strip()
    if env:
        return None if env.lower() == "off" else Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sfed-theory"


@lru_cache(maxsize=1)
def code_key() -> str:
    """Hash of the deriving modules' text and the sympy version (16 hex digits)."""
    h = hashlib.sha256(sp.__version__.encode())
    here = Path(__file__).resolve().parent
    for name in _DERIVING_CODE:
        h.update(name.encode())
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]


def _path(quantity: str, scheme: str, regime: str) -> Path | None:
    root = store_dir()
    return None if root is None else root / code_key() / f"{quantity}__{scheme}__{regime}.pickle"


def load(quantity: str, scheme: str, regime: str) -> sp.Expr | None:
    """The stored closed form, or None (store off, nothing stored, or an entry that does not unpickle)."""
    path = _path(quantity, scheme, regime)
    if path is None or not path.is_file():
        return None
    try:
        expr = pickle.loads(path.read_bytes())
    except Exception:  # a truncated or foreign file: derive again, and overwrite it then
        return None
    return expr if isinstance(expr, sp.Expr) else None


def save(quantity: str, scheme: str, regime: str, expr: sp.Expr) -> None:
    """Store a derived closed form (atomically: concurrent processes never read half a file). A store that
    cannot be written (read-only home, full disk) is skipped silently: it only saves time."""
    path = _path(quantity, scheme, regime)
    if path is None:
        return
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".tmp") as f:
            tmp = f.name
            f.write(pickle.dumps(expr))
        os.replace(tmp, path)
    except Exception:  # unwritable, full, or an expression that does not pickle: derive next time
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
