"""The experiments that feed the empirical figures, and the stored results they leave behind.

Four experiments, each a grid file in ``paper_figures/grids/`` (``<grid set>_<experiment>.json``)
and one results file ``<results>/<experiment>.parquet``:

* ``scaling``: one federated round over (N, r, rule): the main figure, (a), (b), (d).
* ``curves``: several rounds at high rank for each rule: figure (c).
* ``convergence``: issue 6, multi-round accuracy/loss over (split, N, r, 5 rules): figure (g).
* ``normcheck``: issue 6, update-norm slopes on real training (5 rules, 2 splits): figure (h).

``scaling`` and ``curves`` (:data:`GRID_EXPERIMENTS`) are plain
:class:`validation.config.GridConfig` files run by the generic path below; their provenance is in
``<results>/manifest.json``. ``convergence`` and ``normcheck`` (:data:`ISSUE6_EXPERIMENTS`) carry
extra keys (splits, oracle rho, N = 1 dedupe) and are run by the issue-6 driver
:mod:`paper_figures.convergence_figs` (``run`` then ``collect``); their provenance is in
``<results>/manifest_issue6.json``. ``rerun`` handles both: it calls that driver for the issue-6
experiments.

``rerun`` runs a grid set through the harness API (:func:`validation.grid.run_grid`, resumable,
one Parquet file per run in a work folder) and consolidates each experiment into ONE tidy
Parquet file ``<results>/<experiment>.parquet`` (one row per run x round x layer, config columns
included), plus the manifest with the grid, package versions, git commit, machine and wall time.
``load`` reads them back and fails with a clear message when a file is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = [
    "EXPERIMENTS",
    "GRID_EXPERIMENTS",
    "ISSUE6_EXPERIMENTS",
    "GRID_SETS",
    "GRID_DIR",
    "DEFAULT_RESULTS",
    "MissingResults",
    "grid_file",
    "load_grid",
    "results_path",
    "load",
    "load_manifest",
    "rerun",
    "harness_pin",
]

GRID_EXPERIMENTS: tuple[str, ...] = ("scaling", "curves")  # GridConfig files, manifest.json
ISSUE6_EXPERIMENTS: tuple[str, ...] = ("convergence", "normcheck")  # convergence_figs driver, manifest_issue6.json
EXPERIMENTS: tuple[str, ...] = GRID_EXPERIMENTS + ISSUE6_EXPERIMENTS
GRID_SETS: tuple[str, ...] = ("cpu", "gpu")
GRID_DIR = Path(__file__).resolve().parent / "grids"
DEFAULT_RESULTS = Path(__file__).resolve().parent.parent / "results"
MANIFEST = "manifest.json"


class MissingResults(FileNotFoundError):
    """A stored results file the figures need is not there."""


def grid_file(experiment: str, grid_set: str = "cpu") -> Path:
    """Path of the grid file of ``experiment`` in ``grid_set``."""
    if experiment not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {experiment!r}; allowed: {', '.join(EXPERIMENTS)}")
    if grid_set not in GRID_SETS:
        raise ValueError(f"unknown grid set {grid_set!r}; allowed: {', '.join(GRID_SETS)}")
    return GRID_DIR / f"{grid_set}_{experiment}.json"


def _grid_dict(experiment: str, grid_set: str) -> dict[str, Any]:
    data = json.loads(grid_file(experiment, grid_set).read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


def load_grid(experiment: str, grid_set: str = "cpu", **base_overrides: Any):
    """The :class:`validation.config.GridConfig` of a :data:`GRID_EXPERIMENTS` experiment (base fields
    overridable). The issue-6 grids have extra keys: read them with
    :func:`paper_figures.convergence_figs.load_spec`."""
    from validation.config import GridConfig

    if experiment in ISSUE6_EXPERIMENTS:
        raise ValueError(f"{experiment!r} is an issue-6 grid with extra keys; read it with "
                         "paper_figures.convergence_figs.load_spec(grid_file(...))")

    d = _grid_dict(experiment, grid_set)
    d["base"] = {**d.get("base", {}), **base_overrides}
    return GridConfig.from_dict(d)


def results_path(experiment: str, results_dir: str | Path = DEFAULT_RESULTS) -> Path:
    """Where the consolidated results of ``experiment`` live."""
    return Path(results_dir) / f"{experiment}.parquet"


def load(experiment: str, results_dir: str | Path = DEFAULT_RESULTS) -> pd.DataFrame:
    """The stored results of ``experiment``; raises :class:`MissingResults` if absent or empty."""
    path = results_path(experiment, results_dir)
    how = f"`sfed-figures --rerun --experiments {experiment}`"
    if experiment in ISSUE6_EXPERIMENTS:
        how += (f" (which calls `python -m paper_figures.convergence_figs run {experiment}` and "
                f"`... collect {experiment}`)")
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
    """The manifest of :data:`GRID_EXPERIMENTS` (grid, versions, commit, machine, wall time per
    experiment); {} if absent. The issue-6 experiments' manifest is ``manifest_issue6.json``."""
    path = Path(results_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("sfed_theory", "validation", "torch", "transformers", "numpy", "pandas", "pyarrow"):
        try:
            m = __import__(mod)
            out[mod] = str(getattr(m, "__version__", "n/a"))
        except ImportError:
            out[mod] = "not installed"
    try:
        from importlib.metadata import version

        out["sfed (package)"] = version("sfed")
    except Exception:  # not installed as a distribution (e.g. run from a checkout)
        pass
    return out


def _source_digest(package: str) -> str:
    """sha256 over the .py files of a package (identifies the harness code even when uncommitted)."""
    import hashlib

    root = Path(__file__).resolve().parent.parent / package
    h = hashlib.sha256()
    for f in sorted(root.glob("*.py")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _git() -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip() != ""
        return {"commit": commit, "dirty": dirty}
    except Exception:
        return {"commit": "unknown", "dirty": None}


HARNESS_PACKAGES: tuple[str, ...] = ("validation", "sfed_theory")


def _blob_sha1(data: bytes) -> str:
    import hashlib

    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def harness_pin(packages: tuple[str, ...] = HARNESS_PACKAGES) -> dict[str, Any]:
    """Pin the harness code a rerun uses to a git commit.

    ``commit`` is HEAD; ``clean`` is True only if every ``.py`` file of ``packages`` on disk is
    byte-identical to the blob committed at HEAD (git's own blob hash is compared, so this holds
    whatever the state of other files in the tree); ``modified`` lists the files that differ or
    are not committed. ``sha256`` is :func:`_source_digest` of each package.
    """
    root = Path(__file__).resolve().parent.parent
    out: dict[str, Any] = {"commit": "unknown", "clean": False, "modified": [],
                           "sha256": {pkg: _source_digest(pkg) for pkg in packages}}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        tree = subprocess.run(["git", "ls-tree", "-r", "HEAD", "--", *packages], cwd=root, capture_output=True,
                              text=True, check=True).stdout
    except Exception:
        return out
    committed = {}
    for line in tree.splitlines():
        meta, _, path = line.partition("\t")
        committed[path] = meta.split()[2]
    modified = []
    for pkg in packages:
        for f in sorted((root / pkg).glob("*.py")):
            rel = f"{pkg}/{f.name}"
            if committed.get(rel) != _blob_sha1(f.read_bytes()):
                modified.append(rel)
        for rel in committed:
            if rel.startswith(pkg + "/") and rel.endswith(".py") and not (root / rel).is_file():
                modified.append(rel + " (deleted)")
    out.update(commit=commit, clean=not modified, modified=modified)
    return out


def _import_harness() -> None:
    """Import every harness module a run may load lazily, so that the code pinned at the start is
    the code used throughout (later edits of the files on disk cannot leak into a long rerun)."""
    import importlib

    for mod in ("validation.config", "validation.data", "validation.models", "validation.backends",
                "validation.batched_lora", "validation.aggregation", "validation.metrics",
                "validation.federated", "validation.grid", "validation.adaptive", "sfed_theory"):
        try:
            importlib.import_module(mod)
        except ImportError:  # optional module absent
            pass


def rerun(results_dir: str | Path = DEFAULT_RESULTS, *, grid_set: str = "cpu",
          experiments: tuple[str, ...] = EXPERIMENTS, work_dir: str | Path = "runs/paper_figures",
          resume: bool = True, progress: bool = True, allow_dirty: bool = False,
          **base_overrides: Any) -> dict[str, Path]:
    """Run the experiments' grids with the harness and store consolidated results + manifest.

    ``work_dir`` keeps the harness's per-run files (resumable; ``resume=False`` re-runs every
    cell) in a subfolder named after the harness sources' digest, so a resumed rerun only reuses
    runs made by byte-identical harness code. ``base_overrides`` set RunConfig fields of every
    grid's base (e.g. ``device="cuda"``
    or ``max_examples=200`` for a smoke test). Returns ``{experiment: results file}``.

    The harness code is pinned first (:func:`harness_pin`): a rerun refuses to start when
    ``validation/`` or ``sfed_theory/`` differ from the committed HEAD unless ``allow_dirty``;
    the manifest records the pin (commit, clean, sha256 of the sources) per experiment.

    The issue-6 experiments (:data:`ISSUE6_EXPERIMENTS`) are run by
    :func:`paper_figures.convergence_figs.run_experiment` (always resumable, one worker with
    torch's current thread count, pilot runs for the oracle rho first) and stored by
    :func:`paper_figures.convergence_figs.collect` (entry in ``manifest_issue6.json``), with the
    same per-harness-digest work folder; ``base_overrides`` and ``resume=False`` are not
    supported for them (edit the grid file / use a fresh ``work_dir``).
    """
    from validation.grid import load_results, run_grid

    unknown = [e for e in experiments if e not in EXPERIMENTS]
    if unknown:
        raise ValueError(f"unknown experiment(s) {unknown}; allowed: {', '.join(EXPERIMENTS)}")
    issue6 = [e for e in experiments if e in ISSUE6_EXPERIMENTS]
    if issue6 and (base_overrides or not resume):
        raise ValueError(f"{issue6}: --set / --no-resume are not supported for the issue-6 experiments "
                         "(edit the grid file, or pass a fresh --work-dir)")
    for e in issue6:
        if not grid_file(e, grid_set).is_file():
            raise ValueError(f"no {grid_set} grid for {e!r} ({grid_file(e, grid_set)} does not exist)")
    _import_harness()
    pin = harness_pin()
    if not pin["clean"] and not allow_dirty:
        raise RuntimeError(f"the harness differs from commit {pin['commit'][:12]} in {pin['modified']}: commit it "
                           "(the manifest pins results to a commit) or pass allow_dirty=True / --allow-dirty")
    state = "clean" if pin["clean"] else "DIRTY: " + ", ".join(pin["modified"])
    print(f"harness pinned to {pin['commit'][:12]} ({state})",
          flush=True)
    # per-run files are kept per harness version: resume never mixes runs of different harness code
    digest = hashlib.sha256("".join(pin["sha256"][p] for p in sorted(pin["sha256"])).encode()).hexdigest()
    harness_key = f"harness-{digest[:12]}"
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(results_dir)
    written: dict[str, Path] = {}
    for exp in experiments:
        folder = Path(work_dir) / harness_key / f"{grid_set}_{exp}"
        if exp in ISSUE6_EXPERIMENTS:
            written[exp] = _rerun_issue6(exp, grid_set, folder, results_dir)
            continue
        grid = load_grid(exp, grid_set, **base_overrides)
        cells = grid.runs()
        print(f"[{exp}] {len(cells)} runs ({grid_file(exp, grid_set).name}) -> {folder}", flush=True)
        t0 = time.perf_counter()
        res = run_grid(grid, folder, resume=resume, progress=progress)
        wall = time.perf_counter() - t0
        df = load_results(folder)
        ids = {c.run_id for c in cells}
        df = df[df["run_id"].isin(ids)] if not df.empty else df
        if df.empty:
            raise RuntimeError(f"[{exp}] no run finished; failures: {res.failed}")
        path = results_path(exp, results_dir)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        df.to_parquet(tmp, index=False, compression="zstd")
        os.replace(tmp, path)
        grid_json = _grid_dict(exp, grid_set)
        grid_json["base"] = {**grid_json.get("base", {}), **base_overrides}
        manifest[exp] = {
            "file": path.name,
            "grid_file": f"paper_figures/grids/{grid_file(exp, grid_set).name}",
            "work_folder": str(folder),
            "grid": grid_json,
            "runs_in_grid": len(cells),
            "runs_stored": int(df["run_id"].nunique()),
            "rows": int(len(df)),
            "failed": res.failed,
            "wall_s_this_call": round(wall, 1),
            "wall_s_sum_of_runs": round(float(df.groupby("run_id")["wall_s"].first().sum()), 1),
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(),
            "harness": pin,
            "git": {**_git(),
                    "note": "whole-tree HEAD/dirty when the results were written; the harness pin is 'harness'"},
            "source_sha256": {**pin["sha256"], "paper_figures": _source_digest("paper_figures")},
            "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                        "argv": " ".join(sys.argv)},
        }
        (results_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        print(f"[{exp}] {manifest[exp]['runs_stored']}/{len(cells)} runs, {len(df)} rows -> {path} "
              f"({path.stat().st_size / 1024:.0f} KiB, {wall:.0f} s)", flush=True)
        written[exp] = path
    return written


def _rerun_issue6(exp: str, grid_set: str, folder: Path, results_dir: Path) -> Path:
    """One issue-6 experiment through :mod:`paper_figures.convergence_figs` (run, then collect)."""
    import torch

    from paper_figures import convergence_figs

    threads = torch.get_num_threads()
    print(f"[{exp}] issue-6 driver: python -m paper_figures.convergence_figs run {exp} --set {grid_set} "
          f"--work {folder} (then collect) -> {results_path(exp, results_dir)}", flush=True)
    t0 = time.perf_counter()
    try:
        convergence_figs.run_experiment(exp, grid_set, folder, threads=threads)
    finally:
        torch.set_num_threads(threads)
    wall = round(time.perf_counter() - t0, 1)
    path = convergence_figs.collect(exp, grid_set, folder, results_dir, wall_s=wall)
    print(f"[{exp}] -> {path} ({wall:.0f} s); provenance in {results_dir / convergence_figs.MANIFEST}", flush=True)
    return path
