"""bench/gpu_check.sh cannot rot: its --dry-run runs every step on CPU at tiny sizes and the files it
writes are checked for content (not just the exit code); a failing and a timed-out step are recorded
and make the script exit non-zero without stopping the others."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
STEPS = ["setup", "pack", "pytest", "bench", "grid"]


def _run(out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    # the caller's own budget overrides or pack location must not leak into the checks
    e = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_") and k != "PACK"}
    e.update(OUT=str(out), PYTHON=sys.executable, **env)
    return subprocess.run(["bash", str(SCRIPT), *args], env=e, capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


def _steps(out: Path) -> list[list[str]]:
    return [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def dry(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu_out")
    return _run(out, "--dry-run"), out


@pytest.mark.slow
def test_dry_run_every_step_ok(dry):
    proc, out = dry
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _steps(out)
    assert [r[0] for r in rows] == STEPS
    for name, status, rc, seconds, budget in rows:
        assert (status, rc) == ("ok", "0"), name
        assert 0 < float(seconds) < float(budget), name
    s = json.loads((out / "summary.json").read_text())
    assert s["mode"] == "dry" and s["failed_steps"] == [] and 0 < s["total_s"] < 300
    assert "=== sfed GPU check: mode dry" in proc.stdout
    assert "result: 0 of 5 steps failed" in proc.stdout
    assert (out / "summary.txt").read_text().strip() in proc.stdout
    env = json.loads((out / "env.json").read_text())
    assert env["problems"] == [] and env["versions"]["torch"]


@pytest.mark.slow
def test_dry_run_bench_numbers(dry):
    proc, out = dry
    rows = _csv(out / "bench.csv")
    assert [int(r["n"]) for r in rows] == [1, 2, 4] and {r["device"] for r in rows} == {"cpu"}
    for r in rows:
        n, tb, tl = int(r["n"]), float(r["batched_s"]), float(r["loop_s"])
        assert tb > 0 and tl > 0
        assert math.isclose(float(r["batched_cr_s"]), n / tb) and math.isclose(float(r["loop_cr_s"]), n / tl)
        assert math.isclose(float(r["speedup"]), tl / tb)
        assert math.isnan(float(r["batched_peak_mib"]))  # no CUDA memory on CPU
    # the summary's bench table shows the same numbers
    shown = re.findall(r"^\s+cpu\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x", proc.stdout, flags=re.M)
    assert [int(n) for n, *_ in shown] == [1, 2, 4]
    for (n, b, lp, sp), r in zip(shown, rows):
        assert float(b) == pytest.approx(float(r["batched_cr_s"]), abs=0.06)
        assert float(sp) == pytest.approx(float(r["speedup"]), abs=0.006)
    goal = json.loads((out / "summary.json").read_text())["goal"]
    assert goal == {"n": 32, "needed": pytest.approx(22.4), "measured": None, "met": None}
    assert "not measured" in proc.stdout


@pytest.mark.slow
def test_dry_run_grid_and_exponent_report(dry):
    _, out = dry
    status = json.loads((out / "grid_status.json").read_text())
    assert status["cells"] == status["written"] == 27 and status["failed"] == status["out_of_time"] == 0
    assert len(list((out / "grid" / "runs").glob("*.parquet"))) == 27
    runs = _csv(out / "grid_runs.csv")
    assert len(runs) == 27 and {r["status"] for r in runs} == {"written"}
    assert {int(r["n_clients"]) for r in runs} == {1, 2, 4} and {int(r["rank"]) for r in runs} == {2, 4, 8}
    fits = _csv(out / "exponents.csv")
    assert len(fits) == status["fits"] > 0
    assert {f["wrt"] for f in fits} == {"rank", "n_clients"}
    assert all(math.isfinite(float(f["measured"])) and math.isfinite(float(f["predicted_rho0"])) for f in fits)
    report = (out / "exponents.txt").read_text()
    assert "== scheme=ffa optimizer=adamw" in report
    table_rows = re.findall(r"^(adapter_output|update_fro|grad_A|grad_B)\s+(lora|rslora|sfed)\s", report, flags=re.M)
    assert len(table_rows) == len(fits)
    # SFed keeps ||dW|| from collapsing in N where rsLoRA does not (the point of the whole grid)
    dw = {f["rule"]: float(f["measured"]) for f in fits
          if f["quantity"] == "update_fro" and f["wrt"] == "n_clients" and f["fixed"] == "r=4"}
    assert dw["sfed"] > dw["rslora"] + 0.3


@pytest.mark.slow
def test_dry_run_pack_loads_fp16_as_exact_fp32(dry):
    _, out = dry
    p = json.loads((out / "pack_load.json").read_text())
    assert p["ok"] and p["exact"] and p["param_dtypes"] == ["float32"]
    assert p["n_checked"] == p["n_packed"] > 0 and p["n_missing"] == 0
    man = p["manifest"]
    assert man["dtype"] == "float16" and 0 < man["max_abs_rounding_error"] < 1e-3
    assert 0 < man["output_drift"]["rel_fro_hidden_diff"] < 1e-2
    assert math.isfinite(p["eval_loss"]) and p["device_used"] == "cpu"


@pytest.mark.slow
def test_dry_run_pytest_step_collected_the_gpu_test(dry):
    _, out = dry
    root = ET.parse(out / "pytest_gpu.xml").getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    assert int(suite.get("tests")) == 1 and int(suite.get("failures")) == int(suite.get("errors")) == 0


def test_failed_step_is_recorded_and_the_script_goes_on(tmp_path):
    # GPU mode without a pack: setup and pack fail fast (even on a CUDA machine), the summary still comes
    proc = _run(tmp_path, "--only", "pack", PACK=str(tmp_path / "no_pack"))
    assert proc.returncode == 1
    assert [(r[0], r[1]) for r in _steps(tmp_path)] == [("setup", "FAILED"), ("pack", "FAILED")]
    assert "no pack at" in (tmp_path / "env.json").read_text()
    assert "result: 2 of 2 steps failed (setup, pack)" in proc.stdout
    assert "bench: not run" in proc.stdout and not (tmp_path / "pack_load.json").exists()


def test_timed_out_step_is_recorded(tmp_path):
    proc = _run(tmp_path, "--dry-run", "--only", "bench", GPU_CHECK_BUDGET_BENCH="1")
    assert proc.returncode == 1
    assert [(r[0], r[1], r[2]) for r in _steps(tmp_path)] == [("setup", "ok", "0"), ("bench", "TIMEOUT", "124")]
    assert "result: 1 of 2 steps failed (bench)" in proc.stdout
