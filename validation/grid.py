"""Grid runner with atomic per-run Parquet files, resume, and a progress bar.

Layout: ``<out>/<run_id>.parquet``, one file per finished run (all its rounds x layers).
A file is written to a temporary name and moved into place with ``os.replace`` (atomic on one
file system), and carries a completion marker in its Parquet footer; a file that cannot be read
or lacks the marker is treated as unfinished and is never loaded as a result.
"""

from __future__ import annotations

import os
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from validation.config import LATER_FIELD_DEFAULTS, GridConfig, RunConfig
from validation.federated import run

__all__ = ["GridResult", "run_grid", "load_results", "result_path", "is_complete", "write_run",
           "fill_later_fields"]

_MARK = b"sfed_complete"


@dataclass
class GridResult:
    """What a grid call did: run ids written, skipped (already complete) and failed (with reason)."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def result_path(out: str | Path, cfg: RunConfig) -> Path:
    """Where the finished run ``cfg`` lives."""
    return Path(out) / f"{cfg.run_id}.parquet"


def is_complete(path: str | Path) -> bool:
    """True only for a readable Parquet file carrying the completion marker."""
    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception:  # missing, truncated or not Parquet: not a finished result
        return False
    return meta.get(_MARK) == b"1"


def write_run(df: pd.DataFrame, path: str | Path) -> None:
    """Write ``df`` atomically: temporary file in the same folder, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), _MARK: b"1"})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def run_grid(grid: GridConfig | list[RunConfig], out: str | Path, *, resume: bool = True,
             progress: bool = True) -> GridResult:
    """Run every cell of ``grid`` not yet finished in ``out``.

    ``resume=True`` skips cells whose complete file exists; ``resume=False`` re-runs them.
    A run that raises (bad data-dependent input, e.g. N larger than the data) is reported in
    ``failed`` and the grid continues; finished files are never touched by a later failure.
    A diverged run (non-finite loss) is a finished result with ``diverged=True`` rows.
    """
    cfgs = grid.runs() if isinstance(grid, GridConfig) else list(grid)
    res = GridResult()
    todo = []
    for c in cfgs:
        if resume and is_complete(result_path(out, c)):
            res.skipped.append(c.run_id)
        else:
            todo.append(c)
    bar = tqdm(todo, desc="grid", unit="run", disable=not progress)
    for c in bar:
        bar.set_postfix_str(f"{c.rule} {c.scheme} N={c.n_clients} r={c.rank} seed={c.seed}")
        try:
            df = run(c)
        except Exception as e:  # keep going: one bad cell must not lose or block the others
            res.failed[c.run_id] = f"{type(e).__name__}: {e}"
            warnings.warn(f"run {c.run_id} ({c.rule}, N={c.n_clients}, r={c.rank}) failed: {e}\n"
                          f"{traceback.format_exc(limit=3)}", stacklevel=2)
            continue
        write_run(df, result_path(out, c))
        res.written.append(c.run_id)
    return res


def load_results(out: str | Path) -> pd.DataFrame:
    """All complete runs under ``out`` as one DataFrame (incomplete/temporary files are ignored)."""
    files = sorted(p for p in Path(out).glob("*.parquet") if not p.name.startswith("."))
    frames = []
    for p in files:
        if is_complete(p):
            frames.append(pd.read_parquet(p))
        else:
            warnings.warn(f"ignoring incomplete results file {p}", stacklevel=2)
    if not frames:
        return pd.DataFrame()
    return fill_later_fields(pd.concat(frames, ignore_index=True))


def fill_later_fields(rows: pd.DataFrame) -> pd.DataFrame:
    """Runs written before a config field of ``LATER_FIELD_DEFAULTS`` existed hold no value for it (no column,
    or NaN once concatenated with newer runs); they ran with its default, so that is filled in."""
    fill = {k: v for k, v in LATER_FIELD_DEFAULTS.items() if v is not None}
    out = rows.assign(**{k: v for k, v in fill.items() if k not in rows})
    return out.fillna({k: v for k, v in fill.items() if k in rows})
