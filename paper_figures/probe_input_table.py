"""The probe's input spike for the stored gradient checks: ``results/probe_inputs.csv``.

The harness now records ``probe_top_share`` at every round's start; the checks stored before it did not.
Their probe depends on the seed and the probe settings only (at the round's start B = 0, so the adapted
layers see the base model's activations at every N, rank and split), so one setup per seed re-measures
it exactly (:func:`probe_input_table`). ``paper_figures.exponent_tables`` takes the
refined model's ``nu`` from this file for checks whose probe settings match. About 10 s per seed::

    python -m paper_figures.probe_input_table [--grid gradient_check] [--seeds 0-26]
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch

from paper_figures import provenance
from paper_figures.experiments import DEFAULT_RESULTS, MANIFEST, load_manifest, spec

__all__ = ["TABLE", "PROBE_SETTINGS", "probe_settings", "probe_input_table", "write_table", "stored_nu", "rows_nu", "main"]

TABLE = "probe_inputs.csv"
PROBE_SETTINGS = ("model", "dataset", "max_length", "probe_size", "probe_from", "max_examples", "dtype")
"""The RunConfig fields the probe's inputs at the round's start depend on (besides the seed)."""


def probe_settings(experiment: str, grid_set: str = "cpu") -> dict:
    """The probe settings of a stored experiment's grid (its base RunConfig)."""
    base = spec(experiment, grid_set).runs()[0]
    return {f: getattr(base, f) for f in PROBE_SETTINGS}


def probe_input_table(cfg, seeds) -> pd.DataFrame:
    """Per (seed, layer): the top-direction share and the mean token's share of the probe's inputs at
    the round's start, for ``cfg`` (a :class:`validation.config.RunConfig`; its seed is replaced). The
    probe depends on the seed only (not on N, the rank or the split), so one setup per seed serves every
    run of a grid with the same model, data and probe settings."""
    from dataclasses import replace

    from validation.aggregation import init_state
    from validation.backends import make_backend
    from validation.federated import fixed_batches, resolve_device
    from validation.models import build_task
    from validation.probe_inputs import mean_token_share, top_share

    rows = []
    for seed in seeds:
        c = replace(cfg, seed=int(seed))
        task, device = build_task(c), resolve_device(c.device)
        backend = make_backend(c.batched, task.model, task.targets, c.rank, 1.0, device, 1)
        state = init_state(backend.shapes, c.rank, 1, "ffa", c.seed, torch.ones(1), getattr(torch, c.dtype), device)
        probe_in, probe_y, _, _ = fixed_batches(c, task, device)
        out = backend.probe(state.A, state.B, probe_in, probe_y, capture=True)
        for name, x in out.inputs.items():
            rows.append({"seed": int(seed), "layer": name, "n_tokens": int(x.shape[0]), "k": int(x.shape[1]),
                         "top_share": top_share(x), "mean_token_share": mean_token_share(x)})
    return pd.DataFrame(rows)


def write_table(experiment: str = "gradient_check", seeds=None, results: Path = DEFAULT_RESULTS) -> Path:
    """Measure the probe inputs of ``experiment``'s seeds (default: all of its grid's) into ``results``."""
    runs = spec(experiment).runs()
    seeds = sorted({c.seed for c in runs}) if seeds is None else list(seeds)
    table = probe_input_table(runs[0], seeds)
    settings = probe_settings(experiment)
    path = Path(results) / TABLE
    table.assign(**{f: str(v) for f, v in settings.items()}).to_csv(path, index=False)
    manifest = load_manifest(results)
    manifest["probe_inputs"] = {
        "file": TABLE, "about": __doc__.split("\n")[0], "from_grid": experiment, "seeds": seeds,
        "probe_settings": settings, "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": provenance.versions(), "harness": provenance.harness_pin(), "machine": provenance.machine(),
    }
    (Path(results) / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return path


def stored_nu(rows: pd.DataFrame, results: Path = DEFAULT_RESULTS) -> float:
    """The refined model's ``nu`` for stored results that lack ``probe_top_share``, from ``probe_inputs.csv``
    (its mean over the table's seeds: the probe's spike is a property of the model and the probe settings,
    0.133-0.141 per seed on the default task). ValueError when the file is missing or was measured with other
    probe settings than ``rows`` (harness rows, whose config columns name them)."""
    from validation.probe_inputs import probe_nu

    path = Path(results) / TABLE
    if not path.is_file():
        raise ValueError(f"{path} is missing: run `python -m paper_figures.probe_input_table`")
    table = pd.read_csv(path, dtype={f: str for f in PROBE_SETTINGS}, keep_default_na=False)  # "None" stays
    want = {f: sorted({str(v) for v in rows[f]}) for f in PROBE_SETTINGS}
    have = {f: sorted(set(table[f])) for f in PROBE_SETTINGS}
    if want != have:
        raise ValueError(f"{path} was measured with probe settings {have}, the results use {want}")
    return probe_nu(table)


def rows_nu(rows: pd.DataFrame, results: Path = DEFAULT_RESULTS) -> float | None:
    """``nu`` to pass to :func:`validation.analysis.refined_fits` for ``rows``: None when the runs measured
    their own probe (``probe_top_share``), else :func:`stored_nu` (results stored before the column)."""
    return None if "probe_top_share" in rows else stored_nu(rows, results)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m paper_figures.probe_input_table", description=__doc__.split("\n")[0])
    ap.add_argument("--grid", default="gradient_check", help="the stored experiment whose probe settings to use")
    ap.add_argument("--seeds", help="e.g. 0-26 (default: the grid's seeds)")
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    ns = ap.parse_args(argv)
    seeds = None
    if ns.seeds:
        lo, _, hi = ns.seeds.partition("-")
        seeds = range(int(lo), int(hi or lo) + 1)
    print(f"wrote {write_table(ns.grid, seeds, ns.results)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
