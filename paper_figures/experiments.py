"""The experiments that feed the figures: run them, store their results, read them back.

Each experiment is a grid file ``paper_figures/grids/<grid set>_<experiment>.json``
(:mod:`paper_figures.specs`) and one results file ``<results>/<experiment>.parquet`` (one row per
run x round x layer, config columns included) with its provenance in ``<results>/manifest.json``
(grid, versions, the harness commit it was pinned to, machine, wall time).

* ``scaling``: one federated round over (N, r, rule): the main figure, (a), (b), (d).
* ``curves``: several rounds at high rank for each rule: figure (c).
* ``convergence``: multi-round accuracy/loss over (split, N, r, 5 rules), one learning rate: (g).
* ``normcheck``: update-norm slopes on real training (5 rules, 2 splits, 2 rounds): (h).
* ``gradient_check`` / ``gradient_check_sgd``: the four norms (update, adapter output, dL/dA, dL/dB)
  for FFA/FedIT/FedSA x IID/Dirichlet under AdamW / SGD, one round, 27 / 3 seeds: (i), (k).
* ``gradient_check_heldout``: the same at r = 16 (FFA, AdamW) with the probe drawn from held-out
  examples no client trains on, against the stored check's training-set probe: (n).
* ``gradient_check_small_lr``: the check at a 4x smaller learning rate (FFA, FedIT, FedSA): is the end-of-round
  gradient's nonlinearity (``validation.end_gradient``) a matter of the step's size? Figure (o), notebook 03
* ``gradient_check_large_probe``: the same cells with a 4x larger probe (128 examples): is dL/dA's wide CI
  the probe's sampling noise? Figure (q).
* ``gradient_check_two_clients``: the check at N = 2 (9 seeds), a second pilot point: how a projected
  client correlation changes with K, and the refined model's pilot with N in {1, 2, 4}: figure (p).
* ``gradient_check_strong_skew``: FFA at r = 16 on a Dirichlet(0.1) split, N in {2, 4, 8, 16}: the label law
  of the client correlation (:mod:`validation.label_law`) and the refined model, both fitted on the stored
  check's Dirichlet(0.5) pilot, predict a stronger skew and an unseen K (predictions in the grid file): (r).
* ``gradient_check_line``: rsLoRA's FFA runs probed along the round's own update, at ``W0 + c dW`` for c up to 4
  (:mod:`validation.line_probe`): is the end-of-round gradient affine in the update? Figure (s).
* ``gradient_check_one_step``: the check with one local step (Adam's step is then the gradient's sign at any
  gamma, so the increments cannot depend on gamma), each run probed along its own update: figure (t).
* ``gradient_check_three_steps``: the check with three local steps (rsLoRA, SFed, IID): with the one- and two-step
  checks, SFed's dL/dB slopes in N against the number of local steps: figure (u).
* ``gradient_check_coherent``: the check's pilot (N = 1, 4; 3 seeds) with the clients' measured coherent share of
  their B increments (``inc_B_coherent``), the refined model's ``f_in`` as a measured input.
* ``gradient_check_response``: FFA's check (3 seeds) with the shape of the probe gradient's response to the
  round's update (``response_top_input``, ``response_alignment``), against the refined model's ``lam dW C``.
* ``gradient_check_one_layer``: the same with one adapted layer instead of twelve: the response without the
  other layers' updates.
* ``gradient_check_matched_gamma``: the check at N = 4 with alpha 32, so that SFed's gamma equals its gamma at N = 16
  (alpha 16): the same shared step taken by four clients instead of sixteen. Is the probe gradient's shrink at
  SFed's largest steps set by gamma, so that a pilot at N <= 4 with large steps could carry it to N = 16?
* ``gradient_check_matched_gamma_one_client``: the same gamma at N = 1 (alpha 64): with N = 4 it predicts N = 16
  if the clients' noise part of the squared end gradient averages as 1/K at a fixed gamma.
* ``lr_transfer``: the learning-rate sweep across N and r per rule: (j).
* ``hetero_ranks``: clients of ranks (4, 16, 64) cycled to N, one round, per rule: (l).
* ``hetero_lr``: the same rank mix trained 8 rounds at each rule's tuned learning rate: (m).

Commands (resumable; per-run files in a work folder keyed by a digest of the harness code)::

    python -m paper_figures.experiments run lr_transfer [--set cpu] [--reverse]   # a second worker: --reverse
    python -m paper_figures.experiments collect lr_transfer [--set cpu]
    sfed-figures --rerun --experiments lr_transfer                                 # run + collect + draw
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from paper_figures import provenance
from paper_figures.specs import GRID_DIR, ExperimentSpec, load_spec

__all__ = ["EXPERIMENTS", "GRID_EXPERIMENTS", "GRID_SETS", "GRID_DIR", "DEFAULT_RESULTS", "DEFAULT_WORK", "MANIFEST",
           "MissingResults", "grid_file", "spec", "load_grid", "work_folder", "run_experiment", "collect", "rerun",
           "results_path", "load", "load_manifest", "harness_pin", "main"]

EXPERIMENTS: tuple[str, ...] = ("scaling", "curves", "convergence", "normcheck", "gradient_check",
                                "gradient_check_sgd", "gradient_check_heldout", "gradient_check_small_lr",
                                "gradient_check_two_clients", "gradient_check_large_probe", "gradient_check_strong_skew",
                                "gradient_check_line", "gradient_check_one_step",
                                "gradient_check_three_steps", "gradient_check_coherent", "gradient_check_response",
                                "gradient_check_one_layer", "gradient_check_matched_gamma",
                                "gradient_check_matched_gamma_one_client", "lr_transfer", "hetero_ranks", "hetero_lr")
GRID_EXPERIMENTS: tuple[str, ...] = ("scaling", "curves")  # plain GridConfig files (no extra axes)
GRID_SETS: tuple[str, ...] = ("cpu", "gpu", "quick")  # quick: the synthetic task, for checks and tests
DEFAULT_RESULTS = provenance.ROOT / "results"
DEFAULT_WORK = Path("runs/paper_figures")
MANIFEST = "manifest.json"
harness_pin = provenance.harness_pin  # re-exported: what a manifest records


class MissingResults(FileNotFoundError):
    """A stored results file the figures need is not there."""


def _check(experiment: str, grid_set: str) -> None:
    if experiment not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {experiment!r}; allowed: {', '.join(EXPERIMENTS)}")
    if grid_set not in GRID_SETS:
        raise ValueError(f"unknown grid set {grid_set!r}; allowed: {', '.join(GRID_SETS)}")


def grid_file(experiment: str, grid_set: str = "cpu") -> Path:
    """Path of the grid file of ``experiment`` in ``grid_set``."""
    _check(experiment, grid_set)
    return GRID_DIR / f"{grid_set}_{experiment}.json"


def spec(experiment: str, grid_set: str = "cpu", **base_overrides: Any) -> ExperimentSpec:
    """The experiment's grid file as an :class:`ExperimentSpec` (base RunConfig fields overridable)."""
    path = grid_file(experiment, grid_set)
    if not path.is_file():
        raise ValueError(f"no {grid_set} grid for {experiment!r} ({path} does not exist)")
    s = load_spec(path)
    return s.with_base(**base_overrides) if base_overrides else s


def load_grid(experiment: str, grid_set: str = "cpu", **base_overrides: Any):
    """The :class:`validation.config.GridConfig` of a plain-grid experiment (:data:`GRID_EXPERIMENTS`)."""
    s = spec(experiment, grid_set, **base_overrides)
    if not s.plain:
        raise ValueError(f"{experiment!r} has extra axes (splits, learning rates, ...); read it with "
                         "paper_figures.experiments.spec(...), whose runs() lists every cell")
    return s.grid


def work_folder(experiment: str, grid_set: str = "cpu", work_dir: str | Path = DEFAULT_WORK,
                pin: dict[str, Any] | None = None) -> Path:
    """``<work_dir>/harness-<digest>/<grid_set>_<experiment>``: per-run files of one harness version."""
    return Path(work_dir) / provenance.harness_key(pin or harness_pin()) / f"{grid_set}_{experiment}"


def run_experiment(experiment: str, grid_set: str, work: Path, *, reverse: bool = False, resume: bool = True,
                   threads: int | None = None, **base_overrides: Any) -> dict[str, Any]:
    """Run (resume) every cell of the experiment in ``work``, one cell at a time: a cell is re-checked
    just before it runs, so a second worker on the same folder (``reverse=True``, from the other end)
    never repeats a finished one. ``threads``: torch threads (default ``$SFED_THREADS`` or unchanged).
    Returns counts, failures and the wall time."""
    import torch

    from validation.grid import run_grid

    n_threads = threads or int(os.environ.get("SFED_THREADS", "0"))
    if n_threads:
        torch.set_num_threads(n_threads)
    _record_pin(Path(work))
    running = harness_pin()  # the code these runs are made with (before any later edit on disk)
    cfgs = spec(experiment, grid_set, **base_overrides).runs(work)
    if reverse:
        cfgs = cfgs[::-1]
    t0 = time.perf_counter()
    written, skipped, failed = 0, 0, {}
    for i, c in enumerate(cfgs):
        res = run_grid([c], work, resume=resume, progress=False)
        written += len(res.written)
        skipped += len(res.skipped)
        failed.update(res.failed)
        if res.written:
            print(f"[{time.perf_counter() - t0:7.0f} s] {i + 1}/{len(cfgs)} {c.rule} {c.scheme} {c.partition} "
                  f"N={c.n_clients} r={c.rank} lr={c.lr:g} seed={c.seed}", flush=True)
    wall = time.perf_counter() - t0
    if written:
        _record_later_pin(Path(work), running)
    print(f"{experiment}: {len(cfgs)} runs, written {written}, skipped {skipped}, failed {len(failed)}, {wall:.0f} s",
          flush=True)
    for k, v in failed.items():
        print("FAILED", k, v, flush=True)
    return {"runs": len(cfgs), "written": written, "skipped": skipped, "failed": failed, "wall_s": wall}


def _record_pin(work: Path) -> dict[str, Any]:
    """The harness pin of a work folder: written by its first run (``harness.json``), read back later, so
    the manifest names the code that made the runs even when it is collected after later commits."""
    path = work / "harness.json"
    if path.is_file():
        return json.loads(path.read_text())
    pin = harness_pin()
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(pin, indent=1) + "\n")
    return pin


def _record_later_pin(work: Path, now: dict[str, Any]) -> None:
    """Runs added to a folder by a harness other than the one that started it (a grid extended later, or
    resumed after commits): that harness's pin goes to ``harness.json``'s ``added_with`` list, so the
    manifest names every code version that wrote runs into the results."""
    path = work / "harness.json"
    first = json.loads(path.read_text())
    if now["sha256"] == first["sha256"] or now in first.get("added_with", []):
        return
    first.setdefault("added_with", []).append(now)
    path.write_text(json.dumps(first, indent=1) + "\n")


def collect(experiment: str, grid_set: str, work: Path, results: Path = DEFAULT_RESULTS, *,
            wall_s: float | None = None, failed: dict | None = None, **base_overrides: Any) -> Path:
    """Consolidate the work folder into ``results/<experiment>.parquet`` and its manifest entry (the
    harness pin is the one the work folder's runs were made with)."""
    from validation.grid import load_results

    df = load_results(work)
    s = spec(experiment, grid_set, **base_overrides)
    expected = {c.run_id for c in s.runs(work)}
    df = df[df.run_id.isin(expected)] if not df.empty else df
    if df.empty:
        raise ValueError(f"no finished runs of {experiment!r} under {work}")
    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    path = results_path(experiment, results)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    df.to_parquet(tmp, index=False, compression="zstd")
    os.replace(tmp, path)
    pin = _record_pin(Path(work))
    grid_json = {k: v for k, v in json.loads(grid_file(experiment, grid_set).read_text()).items()
                 if not k.startswith("_")}
    grid_json["base"] = {**grid_json.get("base", {}), **base_overrides}
    oracle = Path(work) / "oracle_rho.json"
    entry = {
        "file": path.name, "grid_file": f"paper_figures/grids/{grid_file(experiment, grid_set).name}",
        "about": s.about, "work_folder": str(work), "grid": grid_json,
        "runs_in_grid": len(expected), "runs_stored": int(df["run_id"].nunique()), "rows": int(len(df)),
        "failed": failed or {}, "wall_s_this_call": None if wall_s is None else round(wall_s, 1),
        "wall_s_sum_of_runs": round(float(df.groupby("run_id")["wall_s"].first().sum()), 1),
        "oracle_rho": json.loads(oracle.read_text()) if oracle.is_file() else None,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": provenance.versions(), "harness": pin,
        "git": {**provenance.git_head(), "note": "whole-tree HEAD when the results were written; the harness "
                "pin is 'harness'"},
        "source_sha256": {**pin["sha256"], "paper_figures": provenance.source_digest("paper_figures")},
        "machine": provenance.machine(),
    }
    manifest = load_manifest(results)
    manifest[experiment] = entry
    (results / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    print(f"[{experiment}] {entry['runs_stored']}/{len(expected)} runs, {len(df)} rows -> {path} "
          f"({path.stat().st_size / 1024:.0f} KiB)", flush=True)
    return path


def rerun(results_dir: str | Path = DEFAULT_RESULTS, *, grid_set: str = "cpu",
          experiments: tuple[str, ...] = EXPERIMENTS, work_dir: str | Path = DEFAULT_WORK, resume: bool = True,
          progress: bool = True, allow_dirty: bool = False, **base_overrides: Any) -> dict[str, Path]:
    """Run the experiments' grids with the harness and store consolidated results + manifest.

    The harness code is pinned first (:func:`harness_pin`): a rerun refuses to start when
    ``validation/`` or ``sfed_theory/`` differ from the committed HEAD unless ``allow_dirty``; every
    module is imported up front so later edits cannot leak into a long run. Per-run files go to
    :func:`work_folder` (resumable; ``resume=False`` re-runs every cell). ``base_overrides`` set
    RunConfig fields of every grid's base (e.g. ``device="cuda"`` or ``max_examples=200``).
    ``progress`` is accepted for the CLI (cells print one line each). Returns ``{experiment: file}``.
    """
    for e in experiments:
        spec(e, grid_set)  # unknown names and missing grid files fail before anything runs
    provenance.import_harness()
    pin = harness_pin()
    if not pin["clean"] and not allow_dirty:
        raise RuntimeError(f"the harness differs from commit {pin['commit'][:12]} in {pin['modified']}: commit it "
                           "(the manifest pins results to a commit) or pass allow_dirty=True / --allow-dirty")
    state = "clean" if pin["clean"] else "DIRTY: " + ", ".join(pin["modified"])
    print(f"harness pinned to {pin['commit'][:12]} ({state})", flush=True)
    written: dict[str, Path] = {}
    for exp in experiments:
        folder = work_folder(exp, grid_set, work_dir, pin)
        print(f"[{exp}] {grid_file(exp, grid_set).name} -> {folder}", flush=True)
        done = run_experiment(exp, grid_set, folder, resume=resume, **base_overrides)
        written[exp] = collect(exp, grid_set, folder, Path(results_dir), wall_s=done["wall_s"], failed=done["failed"],
                               **base_overrides)
    return written


def results_path(experiment: str, results_dir: str | Path = DEFAULT_RESULTS) -> Path:
    """Where the consolidated results of ``experiment`` live."""
    return Path(results_dir) / f"{experiment}.parquet"


def load(experiment: str, results_dir: str | Path = DEFAULT_RESULTS) -> pd.DataFrame:
    """The stored results of ``experiment``; raises :class:`MissingResults` if absent or empty."""
    path = results_path(experiment, results_dir)
    how = (f"`sfed-figures --rerun --experiments {experiment}` (or `python -m paper_figures.experiments run "
           f"{experiment}` then `... collect {experiment}`)")
    if not path.is_file():
        raise MissingResults(
            f"results file {path} is missing: the figures are drawn from stored results. Restore it "
            f"(git checkout results/) or re-create it with {how} (runs the '{experiment}' grid)."
        )
    df = pd.read_parquet(path)
    if df.empty:
        raise MissingResults(f"results file {path} holds no rows; re-create it with {how}")
    return df


def load_manifest(results_dir: str | Path = DEFAULT_RESULTS) -> dict[str, Any]:
    """The manifest: per experiment its grid, versions, harness commit, machine and wall time; {} if absent."""
    path = Path(results_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def main(argv: list[str] | None = None) -> int:
    """``python -m paper_figures.experiments run|collect EXPERIMENT``."""
    ap = argparse.ArgumentParser(prog="python -m paper_figures.experiments", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("run", "collect"):
        p = sub.add_parser(name)
        p.add_argument("experiment", choices=EXPERIMENTS)
        p.add_argument("--set", dest="grid_set", default="cpu", choices=GRID_SETS)
        p.add_argument("--work", type=Path, help="work folder (default: runs/paper_figures/harness-<digest>/...)")
        p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
        p.add_argument("--reverse", action="store_true", help="run the cells from the other end (a second worker)")
        p.add_argument("--allow-dirty", action="store_true")
        p.add_argument("--wall-s", type=float, help="collect: the run's wall time, for the manifest")
    ns = ap.parse_args(argv)
    pin = harness_pin()
    if not pin["clean"] and not ns.allow_dirty:
        print(f"error: the harness differs from HEAD in {pin['modified']}; commit it or pass --allow-dirty",
              file=sys.stderr)
        return 2
    work = ns.work or work_folder(ns.experiment, ns.grid_set, pin=pin)
    if ns.cmd == "run":
        provenance.import_harness()
        done = run_experiment(ns.experiment, ns.grid_set, work, reverse=ns.reverse)
        return 0 if not done["failed"] else 1
    print(collect(ns.experiment, ns.grid_set, work, ns.results, wall_s=ns.wall_s))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
