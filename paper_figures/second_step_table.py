"""Where Adam's second local step operates on the real task: ``results/second_step_x.csv``.

For FFA at r = 64 on the default task (MiniLM + BBC, the gradient check's settings: AdamW, lr 1e-3, two local steps
of batch 4), one round at gamma 0.25, 2, 4 and 8 (LoRA and rsLoRA at N = 1, SFed at N = 4 and 16), seeds 0-1: each
trained client's relative change of its dL/dB coordinates between the two local steps and what Adam's derived
second step makes of it (:func:`validation.second_step.second_step_summary`). About 3 minutes of 2 CPU cores::

    python -m paper_figures.second_step_table [--seeds 0 1] [--results results]
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from paper_figures import provenance
from paper_figures.experiments import DEFAULT_RESULTS, MANIFEST, load_manifest
from validation.config import RunConfig

__all__ = ["TABLE", "GRID", "CELLS", "cell_config", "second_step_table", "write_table", "main"]

TABLE = "second_step_x.csv"
GRID = Path(__file__).parent / "grids" / "cpu_gradient_check.json"
"""The gradient check's grid file, whose base settings every cell here keeps (FFA, IID, r = 64 on top)."""
CELLS = (("lora", 1), ("rslora", 1), ("sfed", 4), ("sfed", 16))
"""(rule, N): gamma 0.25, 2, 4 and 8 at r = 64, alpha 16."""


def cell_config(rule: str, n_clients: int, seed: int, rank: int = 64) -> RunConfig:
    """One cell: the gradient check's base settings under FFA with IID clients."""
    base = json.loads(GRID.read_text())["base"]
    return RunConfig.from_dict({**base, "scheme": "ffa", "partition": "iid", "rank": rank, "rule": rule,
                                "n_clients": n_clients, "seed": seed})


def second_step_table(configs: Iterable[RunConfig]) -> pd.DataFrame:
    """One row per configuration: its rule, N, rank, seed and gamma, and the summary of its clients' changes."""
    from validation.second_step import second_step_changes, second_step_summary

    out = []
    for cfg in configs:
        x, rows = second_step_changes(cfg)
        out.append({"rule": cfg.rule, "n_clients": cfg.n_clients, "rank": cfg.rank, "seed": cfg.seed,
                    "gamma": float(rows.gamma.iloc[0]), **second_step_summary(x)})
    return pd.DataFrame(out)


def write_table(table: pd.DataFrame, results: Path, seeds: list[int]) -> Path:
    """``results/second_step_x.csv`` and its manifest entry (``second_step_x``: cells, seeds, code and machine)."""
    path = Path(results) / TABLE
    table.to_csv(path, index=False)
    manifest = load_manifest(results)
    manifest["second_step_x"] = {
        "file": TABLE, "about": __doc__.split("\n")[0], "from_grid": GRID.name, "cells": [list(c) for c in CELLS],
        "seeds": list(seeds), "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": provenance.versions(), "harness": provenance.harness_pin(), "machine": provenance.machine(),
    }
    (Path(results) / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m paper_figures.second_step_table", description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    ns = ap.parse_args(argv)
    configs = [cell_config(rule, n, s) for rule, n in CELLS for s in ns.seeds]
    table = second_step_table(configs)
    out = write_table(table, ns.results, ns.seeds)
    print(table.groupby(["rule", "n_clients"]).mean(numeric_only=True).round(3).to_string())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
