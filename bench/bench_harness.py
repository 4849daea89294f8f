"""Client-rounds per second: batched clients vs the per-client peft loop, side by side.

    python bench/bench_harness.py [--n 1 8 32] [--model minilm] [--repeats 3] [--devices cuda] [--csv out.csv]

Times one round of local training of all N clients (``train_clients``: 2 local AdamW steps of
batch 4 per client, FFA-LoRA, rank 16, MiniLM + BBC at max_length 32) on the same frozen model,
starting adapters and batches for both paths. Repeats are interleaved (batched, loop, batched,
...) and the best time of each is kept, so a busy shared machine biases neither side.
CPU always; CUDA too when available (``--devices`` picks). On CUDA the peak memory of each
path is recorded too (``torch.cuda.max_memory_allocated``, reset before every timed pass).
"""

from __future__ import annotations

import argparse
import csv
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from validation.aggregation import client_start, init_state
from validation.backends import BatchedBackend, LoopBackend
from validation.config import RunConfig
from validation.data import partition
from validation.federated import client_batches, gamma_for
from validation.models import build_task

__all__ = ["BenchPoint", "measure_n", "bench_n", "bench_config", "main"]


@dataclass
class BenchPoint:
    """One N on one device: best seconds per round for each path, and CUDA memory (NaN on CPU).

    ``*_peak_mib``: peak allocated memory during a pass; ``*_base_mib``: allocated before it (both
    frozen models, data and adapters), so ``peak - base`` is what the pass itself needed."""

    device: str
    n: int
    batched_s: float
    loop_s: float
    batched_peak_mib: float = float("nan")
    loop_peak_mib: float = float("nan")
    batched_base_mib: float = float("nan")
    loop_base_mib: float = float("nan")

    @property
    def speedup(self) -> float:
        """Batched client-rounds/s over the loop's (= loop time / batched time)."""
        return self.loop_s / self.batched_s

    def row(self) -> dict[str, float | int | str]:
        """Flat dict for a CSV row, with the client-rounds/s of both paths and the speed-up."""
        return {**asdict(self), "batched_cr_s": self.n / self.batched_s, "loop_cr_s": self.n / self.loop_s,
                "speedup": self.speedup}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _mib(nbytes: int) -> float:
    return nbytes / 2**20


def measure_n(cfg: RunConfig, dev: torch.device, repeats: int) -> BenchPoint:
    """Best seconds for one round of all clients' local training, both paths, and their CUDA peaks."""
    task = build_task(cfg)
    parts = partition(task.train_labels.numpy(), cfg.n_clients, "iid", seed=0)
    gamma = gamma_for(cfg)
    backends = {"batched": BatchedBackend(task.model, task.targets, cfg.rank, gamma, dev, cfg.n_clients),
                "loop": LoopBackend(task.model, task.targets, cfg.rank, gamma, dev)}
    dtype = torch.float32
    state = init_state(backends["loop"].shapes, cfg.rank, cfg.n_clients, "ffa", 0,
                       torch.ones(cfg.n_clients) / cfg.n_clients, dtype, dev)
    clients = list(range(cfg.n_clients))
    A, B = client_start(state, clients)
    batches = client_batches(cfg, task, parts, clients, 1, dev)
    best = {k: float("inf") for k in backends}
    cuda = dev.type == "cuda"
    peak = {k: 0.0 if cuda else float("nan") for k in backends}
    base = {k: float("nan") for k in backends}
    for rep in range(repeats + 1):  # the first pass warms up both paths and is not counted
        for name, be in backends.items():
            _sync(dev)
            if cuda:
                torch.cuda.reset_peak_memory_stats(dev)
                base[name] = _mib(torch.cuda.memory_allocated(dev))
            t0 = time.perf_counter()
            be.train_clients(A, B, batches, train_A=False, optimizer="adamw", lr=1e-3, weight_decay=0.0)
            _sync(dev)
            if rep:
                best[name] = min(best[name], time.perf_counter() - t0)
            if cuda:  # the warm-up pass counts here too: it is the one that allocates what the others reuse
                peak[name] = max(peak[name], _mib(torch.cuda.max_memory_allocated(dev)))
    return BenchPoint(dev.type, cfg.n_clients, best["batched"], best["loop"], peak["batched"], peak["loop"],
                      base["batched"], base["loop"])


def bench_n(cfg: RunConfig, dev: torch.device, repeats: int) -> tuple[float, float]:
    """Best seconds for one round of all clients' local training: (batched, loop)."""
    p = measure_n(cfg, dev, repeats)
    return p.batched_s, p.loop_s


def bench_config(model: str, n: int, rank: int, device: str) -> RunConfig:
    """The benchmark's run: 2 local steps of batch 4 per client, max_length 32, IID split."""
    dataset = "synthetic" if model == "synthetic" else "bbc"
    return RunConfig(model=model, dataset=dataset, n_clients=n, rank=rank, local_steps=2, batch_size=4,
                     max_length=32, device=device, partition="iid")


def main(argv: list[str] | None = None) -> None:
    """CLI; see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--devices", nargs="+", choices=["cpu", "cuda"],
                    help="default: cpu, and cuda when available")
    ap.add_argument("--csv", type=Path, help="also write one row per (device, N) here, flushed as it goes")
    ap.add_argument("--budget-s", type=float,
                    help="start no new N after this many seconds (the rows so far are kept)")
    a = ap.parse_args(argv)
    devices = a.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    t_start = time.perf_counter()
    print(f"model={a.model} rank={a.rank}; one round = 2 local AdamW steps x batch 4 per client, "
          f"FFA, max_length 32; best of {a.repeats}; torch threads={torch.get_num_threads()}")
    print(f"{'device':<7}{'N':>4} | {'batched cr/s':>12} {'loop cr/s':>10} | {'speed-up':>8}")
    writer = None
    fh = a.csv.open("w", newline="") if a.csv else None
    try:
        for dev in devices:
            for n in a.n:
                if a.budget_s is not None and time.perf_counter() - t_start > a.budget_s:
                    print(f"{dev:<7}{n:>4} | skipped: time budget of {a.budget_s:.0f} s spent", flush=True)
                    continue
                p = measure_n(bench_config(a.model, n, a.rank, dev), torch.device(dev), a.repeats)
                row = p.row()
                print(f"{dev:<7}{n:>4} | {row['batched_cr_s']:>12.2f} {row['loop_cr_s']:>10.2f} | "
                      f"{p.speedup:>7.2f}x", flush=True)
                if fh is not None:
                    if writer is None:
                        writer = csv.DictWriter(fh, fieldnames=list(row))
                        writer.writeheader()
                    writer.writerow(row)
                    fh.flush()
    finally:
        if fh is not None:
            fh.close()


if __name__ == "__main__":
    main()
