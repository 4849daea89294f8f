"""Client-rounds per second: batched clients vs the per-client peft loop, side by side.

    python bench/bench_harness.py [--n 1 8 32] [--model minilm] [--repeats 3]

Times one round of local training of all N clients (``train_clients``: 2 local AdamW steps of
batch 4 per client, FFA-LoRA, rank 16, MiniLM + BBC at max_length 32) on the same frozen model,
starting adapters and batches for both paths. Repeats are interleaved (batched, loop, batched,
...) and the best time of each is kept, so a busy shared machine biases neither side.
CPU always; CUDA too when available.
"""

from __future__ import annotations

import argparse
import time

import torch

from validation.aggregation import client_start, init_state
from validation.backends import BatchedBackend, LoopBackend
from validation.config import RunConfig
from validation.data import partition
from validation.federated import _batches, gamma_for
from validation.models import build_task


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def bench_n(cfg: RunConfig, dev: torch.device, repeats: int) -> tuple[float, float]:
    """Best seconds for one round of all clients' local training: (batched, loop)."""
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
    batches = _batches(cfg, task, parts, clients, 1, dev)
    best = {k: float("inf") for k in backends}
    for rep in range(repeats + 1):  # the first pass warms up both paths and is not counted
        for name, be in backends.items():
            _sync(dev)
            t0 = time.perf_counter()
            be.train_clients(A, B, batches, train_A=False, optimizer="adamw", lr=1e-3, weight_decay=0.0)
            _sync(dev)
            if rep:
                best[name] = min(best[name], time.perf_counter() - t0)
    return best["batched"], best["loop"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    dataset = "synthetic" if a.model == "synthetic" else "bbc"
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"model={a.model} data={dataset} rank={a.rank}; one round = 2 local AdamW steps x batch 4 per client, "
          f"FFA, max_length 32; best of {a.repeats}; torch threads={torch.get_num_threads()}")
    print(f"{'device':<7}{'N':>4} | {'batched cr/s':>12} {'loop cr/s':>10} | {'speed-up':>8}")
    for dev in devices:
        for n in a.n:
            cfg = RunConfig(model=a.model, dataset=dataset, n_clients=n, rank=a.rank, local_steps=2, batch_size=4,
                            max_length=32, device=dev, partition="iid")
            tb, tl = bench_n(cfg, torch.device(dev), a.repeats)
            print(f"{dev:<7}{n:>4} | {n / tb:>12.2f} {n / tl:>10.2f} | {tl / tb:>7.2f}x", flush=True)


if __name__ == "__main__":
    main()
