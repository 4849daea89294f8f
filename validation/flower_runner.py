"""Run the harness's Flower app in Flower's simulation runtime, the way Flower runs apps now.

:func:`simulate` starts a SuperLink in simulation mode (``flower-superlink --simulation``, on a
free local port, with its own ``FLWR_HOME``; stopped afterwards) and submits the app in ``flower/``
to it once with ``flwr run`` (Flower's entry point since ``flwr.simulation.run_simulation`` was
deprecated): one simulation start-up for the whole grid, every run inside it. The experiment
travels in the run config (a TOML file of overrides); results come back through the output folder
(:func:`validation.flower_server.write_flower_run`).

:func:`compare` runs a grid in process (peft loop and batched backends) and in Flower, and prints
the adapter agreement and the wall times side by side, with Flower's start-up (everything outside
the runs) apart from the runs' own time. :func:`main` is the ``sfed-flower`` command.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from validation.config import GridConfig, RunConfig
from validation.flower_client import faults_run_config
from validation.flower_record import FlowerRun, state_tensors
from validation.flower_server import events_path, read_states, states_path

__all__ = ["simulate", "run_app", "SimulationResult", "local_superlink", "load_flower_run", "compare",
           "compare_summary", "compare_states", "main", "APP_DIR"]

APP_DIR = Path(__file__).resolve().parents[1] / "flower"  # the Flower app bundle (its pyproject.toml)
_CONNECTION = "sfed-local"


@dataclass
class SimulationResult:
    """The runs of one ``flwr run`` simulation, its wall time (SuperLink start included) and its log."""

    runs: list[FlowerRun]
    wall_s: float
    log: str

    @property
    def startup_s(self) -> float:
        """Wall time outside the runs: SuperLink, simulation runtime and client start-ups, handshake."""
        return self.wall_s - sum(float(r.rows["wall_s"].iloc[0]) for r in self.runs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flower_env(home: Path) -> dict[str, str]:
    """The environment of the Flower processes: this interpreter's scripts and this checkout's code."""
    env = dict(os.environ)
    root = str(APP_DIR.parent)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               RAY_DISABLE_DOCKER_CPU_WARNING="1", TOKENIZERS_PARALLELISM="false")
    return env


def _wait_healthy(proc: subprocess.Popen, port: int, timeout: float) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {proc.returncode} before it was ready")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        time.sleep(0.2)
    raise RuntimeError(f"flower-superlink was not ready on port {port} after {timeout:.0f} s")


@contextlib.contextmanager
def local_superlink(home: Path, *, startup_timeout: float = 120.0) -> Iterator[str]:
    """A SuperLink in simulation mode for this process only; yields the connection name for ``flwr run``.

    It listens on a free port of 127.0.0.1 (insecure: local only), keeps its state in memory, does
    not install app dependencies (the app runs from this environment) and is stopped on exit,
    with the simulation processes it started."""
    home.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "{_CONNECTION}"\n\n[superlink.{_CONNECTION}]\n'
                                      f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    cmd = ["flower-superlink", "--insecure", "--simulation", "--host", "127.0.0.1", "--port", str(port),
           "--disable-runtime-dependency-installation"]
    with open(home / "superlink.log", "wb") as log_file:
        proc = subprocess.Popen(cmd, env=_flower_env(home), stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _wait_healthy(proc, port, startup_timeout)
        yield _CONNECTION
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """Stop the SuperLink and its process group (the simulation processes it started)."""
    import signal

    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)


def load_flower_run(out: str | Path, cfg: RunConfig, *, keep_states: bool = False) -> FlowerRun:
    """A run written by the ServerApp, read back (rows, events, and the kept states as flat tensor dicts)."""
    from validation.grid import result_path

    rows = pd.read_parquet(result_path(out, cfg))
    events = pd.read_parquet(events_path(out, cfg))
    states = read_states(out, cfg) if keep_states and states_path(out, cfg).exists() else []
    return FlowerRun(cfg, rows, events, states)


def run_app(app_dir: str | Path, run_config: dict, *, num_supernodes: int, num_cpus: int = 1,
            timeout: float = 3600.0, stream: bool = False) -> tuple[int, str]:
    """``flwr run`` of the Flower app in ``app_dir`` on a local simulation SuperLink of its own.

    ``run_config``: overrides of the app's ``[tool.flwr.app.config]`` (written to a TOML file).
    Returns ``flwr run``'s exit code and output (its log stream; empty with ``stream=True``, which
    shows it as it comes). Runs not only this project's app: any app whose code this environment has."""
    import tomli_w

    fed = (f"num-supernodes={num_supernodes} client-resources-num-cpus=1 client-resources-num-gpus=0 "
           f"init-args-num-cpus={num_cpus} init-args-num-gpus=0")
    with tempfile.TemporaryDirectory(prefix="sfed-flwr-") as tmp:
        home, rc_file = Path(tmp) / "flwr-home", Path(tmp) / "run_config.toml"
        rc_file.write_text(tomli_w.dumps(run_config))
        with local_superlink(home) as conn:
            cmd = ["flwr", "run", str(Path(app_dir).resolve()), conn, "--stream", "--run-config", str(rc_file),
                   "--federation-config", fed]
            proc = subprocess.run(cmd, env=_flower_env(home), timeout=timeout, text=True,
                                  stdout=None if stream else subprocess.PIPE, stderr=subprocess.STDOUT)
    return proc.returncode, proc.stdout or ""


def simulate(configs: list[RunConfig], out: str | Path, *, num_supernodes: int | None = None, num_cpus: int = 1,
             faults: dict | None = None, keep_states: bool = False, round_timeout: float = 600.0,
             pull_interval: float = 0.005, timeout: float = 3600.0, stream: bool = False) -> SimulationResult:
    """Run ``configs`` in one Flower simulation (``flwr run`` of ``flower/`` on a local simulation SuperLink).

    ``num_supernodes`` defaults to the largest ``n_clients``; Ray gets ``num_cpus`` CPUs and each
    virtual client one. ``faults``: ``{(run_id, round, client) | (round, client): "drop" | "bad-shape"}``.
    ``pull_interval``: how often the ServerApp polls for replies (Flower's default 0.1 s dominates
    tiny runs). ``stream``: show the simulation's log while it runs. Raises ``RuntimeError`` with the
    log's tail if a run did not finish."""
    from validation.grid import is_complete, result_path

    configs, out = list(configs), Path(out)
    if not (APP_DIR / "pyproject.toml").exists():
        raise RuntimeError(f"the Flower app bundle {APP_DIR} is missing; run from a checkout of the project")
    out.mkdir(parents=True, exist_ok=True)
    rc = {"config": json.dumps([c.to_dict() for c in configs]), "grid-file": "", "out-dir": str(out.resolve()),
          "round-timeout": float(round_timeout), "node-wait": 120.0, "resume": False, "keep-states": keep_states,
          "faults": faults_run_config(faults or {}), "grid-pull-interval": float(pull_interval)}
    t0 = time.perf_counter()
    code, text = run_app(APP_DIR, rc, num_supernodes=num_supernodes or max(c.n_clients for c in configs),
                         num_cpus=num_cpus, timeout=timeout, stream=stream)
    wall = time.perf_counter() - t0
    lost = [c.run_id for c in configs if not is_complete(result_path(out, c))]
    if code != 0 or lost:
        tail = "\n".join(text.splitlines()[-40:])
        raise RuntimeError(f"the Flower simulation (flwr run, exit code {code}) did not finish run(s) {lost}; "
                           f"its log ends:\n{tail}")
    return SimulationResult([load_flower_run(out, c, keep_states=keep_states) for c in configs], wall, text)


# ------------------------------------------------------------------------------------------------
# Flower against the in-process harness
# ------------------------------------------------------------------------------------------------
def compare_states(t1: dict[str, torch.Tensor], t2: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max abs diff over all adapter tensors (flat dicts, :func:`state_tensors`), and relative to max |t2|."""
    if t1.keys() != t2.keys():
        raise ValueError(f"states hold different tensors: {sorted(t1.keys() ^ t2.keys())}")
    mad = max(float((t1[k].double() - t2[k].double()).abs().max()) for k in t1)
    scale = max(float(t2[k].abs().max()) for k in t2)
    return {"max_abs_diff": mad, "max_rel_diff": mad / scale if scale else 0.0, "max_abs_value": scale}


_MEASURES = ("grad_A", "grad_B", "grad_A_end", "grad_B_end", "update_fro", "adapter_rms", "rho_hat", "n_eff_hat",
             "train_loss", "probe_loss_start", "probe_loss_end", "eval_loss")


def _rows_rel_diff(flower: pd.DataFrame, harness: pd.DataFrame) -> float:
    f, h = flower.set_index(["round", "layer"]).sort_index(), harness.set_index(["round", "layer"]).sort_index()
    rel = 0.0
    for col in _MEASURES:
        a, b = f[col].to_numpy(float), h[col].to_numpy(float)
        ok = np.isfinite(a) & np.isfinite(b)
        if ok.any():
            rel = max(rel, float(np.max(np.abs(a[ok] - b[ok]) / np.maximum(np.abs(b[ok]), 1e-12))))
    return rel


def _in_process(cfg: RunConfig, batched: bool, threads: int | None) -> tuple[pd.DataFrame, dict, float]:
    """One in-process harness run with ``threads`` torch threads (None: torch's default): rows,
    final server state (flat tensors), wall time."""
    from validation import federated

    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        t0 = time.perf_counter()
        df, state, _ = federated.run(dataclasses.replace(cfg, batched=batched), return_state=True)
        return df, state_tensors(state), time.perf_counter() - t0
    finally:
        torch.set_num_threads(before)


def _in_process_rows(configs: list[RunConfig]) -> tuple[list[dict], dict]:
    """Wall times of every config in process: peft loop and batched at one torch thread (what each
    of Flower's virtual clients gets: Ray sets OMP_NUM_THREADS to its one CPU), and the loop at
    torch's default thread count (as ``sfed-validate`` runs); after a discarded warm-up."""
    for threads in (1, None):
        _in_process(configs[0], False, threads), _in_process(configs[0], True, threads)
    rows, ref = [], {}
    for cfg in configs:
        row = {"run_id": cfg.run_id, "scheme": cfg.scheme, "n_clients": cfg.n_clients, "k": cfg.k, "rank": cfg.rank,
               "rule": cfg.rule, "rounds": cfg.rounds}
        for tag, batched, threads in (("loop", False, 1), ("batched", True, 1), ("loop_default_threads", False, None)):
            df, state, wall = _in_process(cfg, batched, threads)
            row[f"inproc_{tag}_s"], ref[(cfg.run_id, tag)] = wall, (df, state)
        rows.append(row)
    return rows, ref


def compare(configs: list[RunConfig], *, num_cpus: int = 1, out: str | Path | None = None) -> pd.DataFrame:
    """``configs`` in process (:func:`_in_process_rows`) and in one Flower simulation.

    One row per config: the final adapters' and the rows' agreement with the in-process loop and
    batched paths, the in-process wall times, ``flower_run_s`` (the ServerApp's own clock for the
    run); every row also carries ``flower_sim_total_s`` and ``flower_startup_s`` (the simulation's
    wall time outside the runs). :func:`compare_summary` reduces it to the totals and the ratio."""
    rows, ref = _in_process_rows(configs)
    with contextlib.ExitStack() as stack:
        folder = Path(out) if out else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sfed-cmp-")))
        sim = simulate(configs, folder, num_cpus=num_cpus, keep_states=True)
    runs = {r.config.run_id: r for r in sim.runs}
    for row in rows:
        res = runs[row["run_id"]]
        row.update(flower_run_s=float(res.rows["wall_s"].iloc[0]), flower_sim_total_s=sim.wall_s,
                   flower_startup_s=sim.startup_s)
        for tag in ("loop", "batched"):
            df, state = ref[(row["run_id"], tag)]
            d = compare_states(res.states[-1], state)
            row[f"adapter_abs_diff_vs_{tag}"], row[f"adapter_rel_diff_vs_{tag}"] = d["max_abs_diff"], d["max_rel_diff"]
            row[f"rows_rel_diff_vs_{tag}"] = _rows_rel_diff(res.rows, df)
    return pd.DataFrame(rows)


def compare_summary(res: pd.DataFrame) -> dict[str, float]:
    """Totals of a :func:`compare` table and the ratios Flower (runs only) / in process."""
    tot = lambda c: float(res[c].sum())  # noqa: E731
    s = {"runs": len(res), "inproc_loop_s": tot("inproc_loop_s"), "inproc_batched_s": tot("inproc_batched_s"),
         "inproc_loop_default_threads_s": tot("inproc_loop_default_threads_s"), "flower_runs_s": tot("flower_run_s"),
         "flower_startup_s": float(res["flower_startup_s"].iloc[0]),
         "flower_total_s": float(res["flower_sim_total_s"].iloc[0]),
         "max_adapter_rel_diff_vs_loop": float(res["adapter_rel_diff_vs_loop"].max())}
    s["ratio_flower_runs_to_inproc_loop"] = s["flower_runs_s"] / s["inproc_loop_s"]
    s["ratio_flower_runs_to_inproc_loop_default_threads"] = s["flower_runs_s"] / s["inproc_loop_default_threads_s"]
    return s


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def _configs_from_args(ns) -> list[RunConfig]:
    if ns.config:
        cfgs = GridConfig.from_file(ns.config).runs()
    else:
        cfgs = [RunConfig(model="synthetic", dataset="synthetic", n_clients=3, rank=4, rounds=2,
                          synth_examples=512, synth_dim=32, device="cpu")]
    sets = {}
    for kv in ns.set:
        k, _, v = kv.partition("=")
        try:
            sets[k] = json.loads(v)
        except json.JSONDecodeError:
            sets[k] = v
    return [RunConfig.from_dict({**c.to_dict(), **sets}) for c in cfgs] if sets else cfgs


def _parser():
    import argparse

    ap = argparse.ArgumentParser(prog="sfed-flower", description="The federated LoRA validation in Flower's "
                                 "simulation runtime (flwr run on a local simulation SuperLink).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, hlp in (("simulate", "run a grid in one Flower simulation and write harness-format results"),
                      ("compare", "run a grid in process and in Flower; print adapter agreement and wall times")):
        p = sub.add_parser(name, help=hlp)
        p.add_argument("--config", help="grid file (JSON/YAML), as for `sfed-validate run --config`")
        p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                       help="override RunConfig fields of every run (JSON values)")
        p.add_argument("--num-cpus", type=int, default=1, help="CPUs Ray may use (default 1)")
        p.add_argument("--out", help="simulate: results folder (default runs/flower); compare: CSV file")
        if name == "simulate":
            p.add_argument("--num-supernodes", type=int, help="virtual clients (default: largest n_clients)")
    return ap


def _summary_text(s: dict) -> str:
    return (f"\n{s['runs']} runs, wall time of the runs:\n"
            f"  in process, peft loop, 1 torch thread (as each Flower client)  {s['inproc_loop_s']:7.2f} s\n"
            f"  in process, batched, 1 torch thread                           {s['inproc_batched_s']:7.2f} s\n"
            f"  in process, peft loop, torch's default threads                {s['inproc_loop_default_threads_s']:7.2f} s\n"
            f"  Flower simulation, the runs                                    {s['flower_runs_s']:7.2f} s\n"
            f"  Flower simulation, start-up (once per grid)                    {s['flower_startup_s']:7.2f} s\n"
            f"Flower runs / in process (loop, 1 thread) = {s['ratio_flower_runs_to_inproc_loop']:.2f}; "
            f"/ (loop, default threads) = {s['ratio_flower_runs_to_inproc_loop_default_threads']:.2f} (goal <= 2); "
            f"max adapter difference {s['max_adapter_rel_diff_vs_loop']:.1e} (relative)")


def main(argv: list[str] | None = None) -> int:
    """``sfed-flower {simulate,compare} ...`` (see ``--help``)."""
    ns = _parser().parse_args(argv)
    cfgs = _configs_from_args(ns)
    if ns.cmd == "simulate":
        out = ns.out or "runs/flower"
        sim = simulate(cfgs, out, num_supernodes=ns.num_supernodes, num_cpus=ns.num_cpus, stream=True)
        for r in sim.runs:
            n_drop = int(r.events["status"].ne("ok").sum())
            print(f"{r.config.run_id}: {len(r.rows)} rows, {n_drop} dropped client replies -> {out}")
        print(f"simulation wall time {sim.wall_s:.1f} s (start-up {sim.startup_s:.1f} s)")
        return 0
    res = compare(cfgs, num_cpus=ns.num_cpus)
    with pd.option_context("display.width", 220, "display.max_columns", 50):
        print(res.to_string(index=False))
    print(_summary_text(compare_summary(res)))
    if ns.out:
        res.to_csv(ns.out, index=False)
    return 0
