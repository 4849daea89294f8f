"""The federated LoRA validation run on Flower (ServerApp + ClientApp, Flower's Message API).

The same experiment as :func:`validation.federated.run` (one :class:`~validation.config.RunConfig`
in, the same tidy rows out), but the clients are Flower ``ClientApp`` s on (virtual or real)
SuperNodes and every round's adapters travel as Flower messages:

* **Handshake.** The ServerApp sends a ``query`` message to every connected node; each answers
  with its ``partition-id`` (its ``node_config``; Flower's simulation engine sets it, a real
  SuperNode gets it with ``--node-config "partition-id=0 num-partitions=3"``). Partition ``i``
  plays client ``i`` of the harness: the ClientApp rebuilds the run's task from the config and
  trains on ``partition(...)[i]``, the same split the in-process harness uses.
* **Round t.** The server samples K of N clients exactly as the harness does (same seeds),
  computes ``gamma = gamma_for(cfg with K)`` and sends each sampled client a ``train`` message
  with its starting adapter (``A|layer``, ``B|layer``; FedSA: the client's own B; exact: also the
  merged weight ``M|layer``) and a ConfigRecord holding the run config (JSON), the round and
  ``gamma``. The client trains with peft LoRA (:class:`~validation.backends.LoopBackend`, the
  harness's per-client path; fresh optimizer, same seeded batches) and replies with its adapter
  and a MetricRecord (per-step losses/accuracies, its local gradient norms at the starting
  adapter, its increment norms, its data size).
* **Aggregation.** The server checks every reply; a client that raised, sent no reply before the
  round timeout, or sent an adapter with missing keys / the wrong shape / non-finite values is
  dropped from the round with a clear reason (logged, and one row per client and round in the
  events table). The round goes on with the clients that answered: their adapters are averaged
  with :func:`validation.aggregation.aggregate` (weights renormalised over them).
* **gamma under drop-outs.** Clients trained with ``gamma_sent`` (from the K sampled). The
  round's gamma is recomputed from the K' clients actually averaged, ``gamma_round =
  gamma_for(cfg with K')``, and is the gamma used to aggregate (exact: ``merged += gamma_round *
  avg(B_i A_i)``), to measure and evaluate the round's global adapter, and the ``gamma`` column of
  its rows. That is the SFed prescription (the average of K' partly independent increments
  shrinks like 1/K', so it gets ``alpha sqrt(K'/r)``); the adapters themselves are not rescaled.
  ``gamma_sent``, ``n_sampled``, ``n_dropped`` and ``dropped_clients`` are recorded beside it.
  Without drop-outs ``gamma_round == gamma_sent`` and the run is the harness's run.
* **Divergence.** A client whose local loss turns non-finite replies with error code
  ``ERR_DIVERGED``; as in the harness, the run stops there and its rows say ``diverged=True``.
* **Results.** The rows have every column of the harness's rows (built with the same
  :mod:`validation.metrics` functions), ``backend = "flower"``, plus the four columns above; they
  are written with :func:`validation.grid.write_run` to ``<out>/<run_id>.parquet`` so
  :func:`validation.grid.load_results` and :mod:`validation.analysis` read them unchanged. The
  per-client events go to ``<out>/events/<run_id>.parquet`` (a sub-folder, so ``load_results``
  does not mix them in).

Entry points: ``server_app`` / ``client_app`` (for ``flwr run`` and SuperLink/SuperNode
deployments; the ServerApp reads its experiment from the run config, see
:func:`configs_from_run_config`), :func:`make_server_app` (programmatic: configs, output folder,
fault injection, a result sink), :func:`run_simulation_local` (Flower's simulation engine on this
machine) and :func:`run_on_grid` (one run over any Flower ``Grid``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

import sfed_theory
from validation.aggregation import SCHEME_TRAINS_A, aggregate_and_deltas, client_start, eval_adapter, init_state
from validation.backends import Divergence, LoopBackend
from validation.config import GridConfig, RunConfig
from validation.federated import (client_parts, config_columns, fixed_batches, gamma_for, measure_round,
                                  probe_point, resolve_device, sample_clients)
from validation.metrics import ALL
from validation.models import Task, build_task

__all__ = [
    "client_app", "server_app", "make_server_app", "run_on_grid", "run_simulation_local", "FlowerRun",
    "configs_from_run_config", "discover_clients", "check_reply", "encode_adapter", "decode_adapter",
    "EXTRA_COLUMNS", "EVENT_COLUMNS", "FAULTS", "ClientDropout", "events_path",
]

log = logging.getLogger("sfed.flower")

# Columns the Flower rows carry beyond the harness's rows (see module docstring).
EXTRA_COLUMNS: tuple[str, ...] = ("gamma_sent", "n_sampled", "n_dropped", "dropped_clients")
EVENT_COLUMNS: tuple[str, ...] = (
    "run_id", "round", "client", "node_id", "status", "reason", "gamma_sent", "gamma_round", "num_examples",
    "train_loss", "train_acc", "grad_A_local", "grad_B_local", "inc_A", "inc_B", "client_train_s")
# Injected faults (testing the server's handling): "drop" makes the ClientApp raise mid-round,
# "bad-shape" makes it reply with one rank column cut off its first layer's B.
FAULTS: tuple[str, ...] = ("drop", "bad-shape")

ERR_DIVERGED = 4101  # Error code of a client whose local loss became non-finite
ERR_CLIENT = 4102  # Error code of any other failure the ClientApp catches and reports

_SEP = "|"


class ClientDropout(RuntimeError):
    """A client leaves in the middle of a round (raised by the ClientApp; used for fault injection)."""


# ------------------------------------------------------------------------------------------------
# Adapters <-> ArrayRecord
# ------------------------------------------------------------------------------------------------
def encode_adapter(A: dict[str, torch.Tensor], B: dict[str, torch.Tensor],
                   merged: dict[str, torch.Tensor] | None = None) -> ArrayRecord:
    """One client's adapter as an ArrayRecord: keys ``A|layer``, ``B|layer`` (and ``M|layer``)."""
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    for n in A:
        sd[f"A{_SEP}{n}"] = A[n].detach().cpu().contiguous()
        sd[f"B{_SEP}{n}"] = B[n].detach().cpu().contiguous()
        if merged is not None:
            sd[f"M{_SEP}{n}"] = merged[n].detach().cpu().contiguous()
    return ArrayRecord(sd)


def decode_adapter(rec: ArrayRecord) -> tuple[dict, dict, dict]:
    """Inverse of :func:`encode_adapter`: ``(A, B, merged)`` dicts keyed by layer (merged may be empty)."""
    out: dict[str, dict[str, torch.Tensor]] = {"A": {}, "B": {}, "M": {}}
    for key, t in rec.to_torch_state_dict().items():
        kind, _, name = key.partition(_SEP)
        if kind not in out or not name:
            raise ValueError(f"unexpected array {key!r} in an adapter record (keys are A|layer, B|layer, M|layer)")
        out[kind][name] = t
    return out["A"], out["B"], out["M"]


def check_reply(arrays: ArrayRecord, shapes: dict[str, tuple[int, int]], rank: int
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Decode a client's adapter and check it against the model: every layer present, ``A`` of
    shape (r, k), ``B`` of shape (d, r), all finite. Raises ``ValueError`` saying what is wrong."""
    try:
        A, B, _ = decode_adapter(arrays)
    except ValueError:
        raise
    except Exception as e:  # undecodable payload
        raise ValueError(f"adapter record could not be decoded: {type(e).__name__}: {e}") from e
    want = set(shapes)
    for kind, got in (("A", A), ("B", B)):
        if set(got) != want:
            missing, extra = sorted(want - set(got)), sorted(set(got) - want)
            raise ValueError(f"adapter {kind} has the wrong layers: missing {missing}, unexpected {extra}")
    for n, (d, k) in shapes.items():
        for kind, t, exp in (("A", A[n], (rank, k)), ("B", B[n], (d, rank))):
            if tuple(t.shape) != exp:
                raise ValueError(f"adapter of the wrong shape: {kind}{_SEP}{n} is {tuple(t.shape)}, expected {exp} "
                                 f"(rank {rank}, layer {n!r}: d={d}, k={k})")
            if not t.is_floating_point():
                raise ValueError(f"adapter {kind}{_SEP}{n} has dtype {t.dtype}, expected a floating point dtype")
            if not torch.isfinite(t).all():
                raise ValueError(f"adapter {kind}{_SEP}{n} has non-finite values")
    return A, B


# ------------------------------------------------------------------------------------------------
# ClientApp
# ------------------------------------------------------------------------------------------------
@dataclass
class _ClientEnv:
    cfg: RunConfig
    task: Task
    parts: list[np.ndarray]
    device: torch.device
    backends: dict[float, LoopBackend] = field(default_factory=dict)

    def backend(self, gamma: float) -> LoopBackend:
        """A peft LoopBackend whose scaling is ``gamma`` (one per distinct gamma, built on demand)."""
        if gamma not in self.backends:
            if len(self.backends) >= 4:
                self.backends.pop(next(iter(self.backends)))
            self.backends[gamma] = LoopBackend(self.task.model, self.task.targets, self.cfg.rank, gamma, self.device)
        return self.backends[gamma]


_ENV_LOCK = threading.Lock()
_ENVS: OrderedDict[str, _ClientEnv] = OrderedDict()


def _client_env(cfg: RunConfig) -> _ClientEnv:
    """Task, partition and backends of one run, cached per process (a ClientApp process may serve
    many rounds and runs). Deterministic in the config, so a fresh process rebuilds the same."""
    with _ENV_LOCK:
        env = _ENVS.get(cfg.run_id)
        if env is None:
            task = build_task(cfg)
            parts = client_parts(cfg, task)
            env = _ClientEnv(cfg, task, parts, resolve_device(cfg.device))
            _ENVS[cfg.run_id] = env
            while len(_ENVS) > 2:
                _ENVS.popitem(last=False)
        return env


def _partition_id(context: Context) -> int:
    nc = context.node_config
    if "partition-id" not in nc:
        raise ValueError("this SuperNode has no 'partition-id' in its node config; start it with "
                         "--node-config \"partition-id=<i> num-partitions=<N>\" (i = 0..N-1, one per node)")
    return int(nc["partition-id"])


def _client_batches(cfg: RunConfig, task: Task, part: np.ndarray, client: int, rnd: int,
                    device: torch.device) -> list[tuple[dict, torch.Tensor]]:
    """Client ``client``'s local batches of round ``rnd`` with the harness's own batch code and
    seeding (``validation.federated._batches``: ``default_rng([seed, round, client, 1])``)."""
    from validation import federated

    out = federated._batches(cfg, task, {client: part}, [client], rnd, device)
    return [step[0] for step in out]


def _norm(ts: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in ts))


client_app = ClientApp()


@client_app.query()
def _client_query(msg: Message, context: Context) -> Message:
    """Handshake: which harness client (partition) this node plays."""
    nc = context.node_config
    info = {"partition-id": _partition_id(context)}
    if "num-partitions" in nc:
        info["num-partitions"] = int(nc["num-partitions"])
    return Message(RecordDict({"info": ConfigRecord(info)}), reply_to=msg)


@client_app.train()
def _client_train(msg: Message, context: Context) -> Message:
    """One round of local LoRA training (see module docstring)."""
    conf = msg.content["config"]
    cfg = RunConfig.from_dict(json.loads(str(conf["run-config"])))
    rnd, gamma = int(conf["server-round"]), float(conf["gamma"])
    fault = str(conf["fault"]) if "fault" in conf else ""
    pid = _partition_id(context)
    if pid >= cfg.n_clients:
        raise ValueError(f"partition-id {pid} is outside this run's {cfg.n_clients} clients")
    if fault == "drop":
        raise ClientDropout(f"client {pid} dropped out in the middle of round {rnd} (injected fault)")
    t0 = time.perf_counter()
    env = _client_env(cfg)
    dtype = getattr(torch, cfg.dtype)
    A0, B0, M = decode_adapter(msg.content["arrays"])
    A0 = {n: A0[n].to(env.device, dtype) for n in env.task.targets}
    B0 = {n: B0[n].to(env.device, dtype) for n in env.task.targets}
    backend = env.backend(gamma)
    shapes = backend.shapes
    backend.set_base_delta({n: M[n].to(env.device, dtype) if n in M
                            else torch.zeros(shapes[n], dtype=dtype, device=env.device) for n in env.task.targets})
    batches = _client_batches(cfg, env.task, env.parts[pid], pid, rnd, env.device)
    train_A = SCHEME_TRAINS_A[cfg.scheme]
    try:
        # the client's own gradient norms at the adapter it starts from, on its first local batch
        g = backend.probe(A0, B0, batches[0][0], batches[0][1], grads=True)
        A1, B1, losses, accs = backend.train_clients(
            {n: a.unsqueeze(0) for n, a in A0.items()}, {n: b.unsqueeze(0) for n, b in B0.items()},
            [[b] for b in batches], train_A=train_A, optimizer=cfg.optimizer, lr=cfg.lr,
            weight_decay=cfg.weight_decay)
    except Divergence as e:
        return Message(Error(code=ERR_DIVERGED, reason=f"Divergence: client {pid}, round {rnd}: {e}"), reply_to=msg)
    A1 = {n: a[0] for n, a in A1.items()}
    B1 = {n: b[0] for n, b in B1.items()}
    metrics = MetricRecord({
        "partition-id": pid,
        "num-examples": int(len(env.parts[pid])),
        "train-losses": [float(x) for x in losses[0].tolist()],
        "train-accs": [float(x) for x in accs[0].tolist()],
        "grad-A-local": _norm(list(g.grad_A.values())),
        "grad-B-local": _norm(list(g.grad_B.values())),
        "inc-A": _norm([A1[n] - A0[n] for n in A1]),
        "inc-B": _norm([B1[n] - B0[n] for n in B1]),
        "train-s": time.perf_counter() - t0,
    })
    if fault == "bad-shape":
        first = env.task.targets[0]
        B1 = {**B1, first: B1[first][:, :-1]}
    return Message(RecordDict({"arrays": encode_adapter(A1, B1), "metrics": metrics}), reply_to=msg)


# ------------------------------------------------------------------------------------------------
# Server side
# ------------------------------------------------------------------------------------------------
@dataclass
class FlowerRun:
    """One run on a Flower grid: the harness-format rows, the per-client events and (optionally)
    the global adapter state after every round (``states[t-1]`` after round t)."""

    config: RunConfig
    rows: pd.DataFrame
    events: pd.DataFrame
    states: list[Any] = field(default_factory=list)


def discover_clients(grid: Grid, need: int, *, wait_s: float = 300.0, timeout: float = 120.0) -> dict[int, int]:
    """Wait until at least ``need`` nodes are connected, ask each for its partition id, and return
    ``{partition_id: node_id}``. Raises ``RuntimeError`` with what is missing or duplicated."""
    t0 = time.monotonic()
    while len(nodes := sorted(grid.get_node_ids())) < need:
        if time.monotonic() - t0 > wait_s:
            raise RuntimeError(f"only {len(nodes)} Flower nodes connected after {wait_s:.0f} s; the run needs "
                               f"{need} (one SuperNode per client, partition-id 0..{need - 1})")
        time.sleep(0.2)
    msgs = [Message(RecordDict({"info": ConfigRecord({"ask": "partition-id"})}), dst_node_id=n, message_type="query")
            for n in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=timeout))
    mapping: dict[int, int] = {}
    problems = []
    for r in replies:
        node = r.metadata.src_node_id
        if r.has_error():
            problems.append(f"node {node}: {r.error.reason}")
            continue
        pid = int(r.content["info"]["partition-id"])
        if pid in mapping:
            problems.append(f"nodes {mapping[pid]} and {node} both claim partition-id {pid}")
            continue
        mapping[pid] = node
    missing = [i for i in range(need) if i not in mapping]
    if missing:
        raise RuntimeError(f"no node plays client(s) {missing} (partition-ids found: {sorted(mapping)}); "
                           + ("; ".join(problems) if problems else "give each SuperNode partition-id 0..N-1"))
    for p in problems:
        log.warning("handshake: %s", p)
    return mapping


def _sample_clients(cfg: RunConfig, rnd: int) -> list[int]:
    """The harness's client sampling (:func:`validation.federated.sample_clients`): same seed, same clients."""
    return sample_clients(cfg, rnd)


def run_on_grid(cfg: RunConfig, grid: Grid, clients_to_nodes: dict[int, int], *,
                faults: dict[tuple, str] | None = None, round_timeout: float = 600.0,
                task: Task | None = None, keep_states: bool = False) -> FlowerRun:
    """Run one configuration over a Flower ``Grid`` (see module docstring).

    ``clients_to_nodes``: ``{client (partition id): node id}`` from :func:`discover_clients`.
    ``faults``: ``{(round, client): "drop" | "bad-shape"}`` or ``{(run_id, round, client): ...}``,
    injected into that client's message (testing). ``round_timeout``: seconds to wait for replies;
    a client that has not answered by then is dropped from the round.
    """
    t_start = time.perf_counter()
    if cfg.rule == "sfed-adaptive":  # its gamma follows the measured increments; not wired into the app
        raise ValueError("rule 'sfed-adaptive' is supported by the in-process harness "
                         "(validation.federated.run) only, not by the Flower app")
    missing = [c for c in range(cfg.n_clients) if c not in clients_to_nodes]
    if missing:
        raise ValueError(f"no Flower node for client(s) {missing} of this {cfg.n_clients}-client run")
    faults = faults or {}
    task = task or build_task(cfg)
    device = resolve_device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    parts = client_parts(cfg, task)
    sizes = np.array([len(p) for p in parts], dtype=float)
    gamma_plan = gamma_for(cfg, sizes)
    backends: dict[float, LoopBackend] = {}

    def server_backend(g: float) -> LoopBackend:
        if g not in backends:
            backends[g] = LoopBackend(task.model, task.targets, cfg.rank, g, device)
        return backends[g]

    shapes = server_backend(gamma_plan).shapes
    all_w = torch.as_tensor(sizes / sizes.sum() if cfg.weighted else np.full(cfg.n_clients, 1 / cfg.n_clients))
    state = init_state(shapes, cfg.rank, cfg.n_clients, cfg.scheme, cfg.seed, all_w, dtype, device)
    train_A = SCHEME_TRAINS_A[cfg.scheme]

    probe_in, probe_y, eval_in, eval_y = fixed_batches(cfg, task, device)

    cfg_json = json.dumps(cfg.to_dict(), sort_keys=True)
    base = {"run_id": cfg.run_id, "version": sfed_theory.__version__, **config_columns(cfg),
            "backend": "flower", "gamma": gamma_plan, "device_used": str(device)}
    rows: list[dict] = []
    events: list[dict] = []
    states: list[Any] = []
    diverged_round, error = None, ""
    for rnd in range(1, cfg.rounds + 1):
        clients = _sample_clients(cfg, rnd)
        gamma_sent = gamma_for(cfg, sizes, k=len(clients))
        try:
            bk = server_backend(gamma_sent)
            bk.set_base_delta(state.merged)
            start = probe_point(bk, state, clients, probe_in, probe_y, capture=True)

            A0, B0 = client_start(state, clients)
            msgs = []
            for i, c in enumerate(clients):
                conf = {"run-config": cfg_json, "server-round": rnd, "gamma": float(gamma_sent),
                        "n-sampled": len(clients)}
                fault = faults.get((cfg.run_id, rnd, c), faults.get((rnd, c)))
                if fault is not None:
                    if fault not in FAULTS:
                        raise ValueError(f"unknown fault {fault!r}; allowed: {', '.join(FAULTS)}")
                    conf["fault"] = fault
                arrays = encode_adapter({n: A0[n][i] for n in A0}, {n: B0[n][i] for n in B0},
                                        state.merged if cfg.scheme == "exact" else None)
                msgs.append(Message(RecordDict({"arrays": arrays, "config": ConfigRecord(conf)}),
                                    dst_node_id=clients_to_nodes[c], message_type="train", group_id=str(rnd)))
            t0 = time.perf_counter()
            replies = list(grid.send_and_receive(msgs, timeout=round_timeout))
            train_s = time.perf_counter() - t0
            by_node = {r.metadata.src_node_id: r for r in replies}

            ok_pos, newA, newB, losses, accs = [], [], [], [], []
            round_events, diverged = [], []
            for i, c in enumerate(clients):
                node = clients_to_nodes[c]
                ev = {"run_id": cfg.run_id, "round": rnd, "client": c, "node_id": str(node), "status": "ok",
                      "reason": "", "gamma_sent": gamma_sent}
                rep = by_node.get(node)
                if rep is None:
                    ev.update(status="no-reply", reason=f"client {c} (node {node}) sent no reply within "
                                                          f"{round_timeout:g} s: dropped out of round {rnd}")
                elif rep.has_error():
                    reason = (rep.error.reason or "").strip()
                    if rep.error.code == ERR_DIVERGED:  # the harness stops a run on a non-finite loss
                        ev.update(status="diverged", reason=reason)
                        diverged.append(reason)
                    else:
                        ev.update(status="error", reason=f"client {c} (node {node}) failed in round {rnd} and is "
                                                          f"dropped from it: {_short(reason)}")
                else:
                    m = rep.content["metrics"] if "metrics" in rep.content.metric_records else {}
                    ev.update(_client_metrics(m))
                    try:
                        if "arrays" not in rep.content.array_records:
                            raise ValueError("reply has no 'arrays' record")
                        if "train-losses" not in m or "train-accs" not in m:
                            raise ValueError("reply has no 'metrics' record with train-losses and train-accs")
                        a, b = check_reply(rep.content["arrays"], shapes, cfg.rank)
                    except ValueError as e:
                        ev.update(status="rejected", reason=f"client {c} (node {node}) reply rejected in round "
                                                             f"{rnd}: {e}")
                    else:
                        ok_pos.append(i)
                        newA.append({n: a[n].to(device, dtype) for n in shapes})
                        newB.append({n: b[n].to(device, dtype) for n in shapes})
                        losses.append(list(m["train-losses"]))
                        accs.append(list(m["train-accs"]))
                if ev["status"] != "ok":
                    log.warning("%s", ev["reason"])
                round_events.append(ev)

            ok = [clients[i] for i in ok_pos]
            dropped = [c for c in clients if c not in ok]
            K_ok = len(ok)
            gamma_r = gamma_for(cfg, sizes, k=K_ok) if K_ok else float("nan")
            for ev in round_events:
                ev["gamma_round"] = gamma_r
            events.extend(round_events)
            if diverged:
                raise Divergence(diverged[0])
            extra = {"gamma": gamma_r, "gamma_sent": gamma_sent, "n_sampled": len(clients),
                     "n_dropped": len(dropped), "dropped_clients": ",".join(map(str, dropped))}
            if not ok:
                log.warning("round %d: no client answered; the global adapter is unchanged", rnd)
                rows.append({**base, **extra, "round": rnd, "layer": ALL, "n_participating": 0, "clients": "",
                             "train_s": train_s})
                if keep_states:
                    states.append(_copy_state(state))
                continue

            idx = torch.as_tensor(ok_pos)
            A1 = {n: torch.stack([x[n] for x in newA]) for n in shapes}
            B1 = {n: torch.stack([x[n] for x in newB]) for n in shapes}
            A0k = {n: A0[n][idx] for n in A0}
            B0k = {n: B0[n][idx] for n in B0}
            p = torch.as_tensor(sizes[ok] / sizes[ok].sum() if cfg.weighted else np.full(K_ok, 1 / K_ok),
                                dtype=dtype, device=device)
            state, round_delta, tot = aggregate_and_deltas(cfg.scheme, state, ok, A1, B1, p, gamma_r)
            if keep_states:
                states.append(_copy_state(state))

            bk = server_backend(gamma_r)
            bk.set_base_delta(state.merged)
            end = probe_point(bk, state, ok, probe_in, probe_y, capture=True)
            ev_loss, ev_acc = bk.evaluate(*eval_adapter(state), eval_in, eval_y)

            # --- the harness's row building (validation.federated.measure_round), on the averaged clients ---
            measured = measure_round(task.targets, shapes, start.select(ok_pos), end, round_delta, tot, A0k, B0k, A1, B1, train_A, p,
                                     gamma_r)
            common = {"round": rnd, "n_participating": K_ok, "clients": ",".join(map(str, ok)),
                      "train_loss": float(np.mean(losses)), "train_acc": float(np.mean(accs)),
                      "probe_loss_start": start.loss, "probe_loss_end": end.loss,
                      "eval_loss": ev_loss, "eval_acc": ev_acc, "train_s": train_s}
            new_rows = [{**base, **extra, **common, **m} for m in measured]
            if not all(math.isfinite(r[c]) for r in new_rows for c in ("update_fro", "adapter_rms", "eval_loss")):
                raise Divergence(f"non-finite update or eval loss after aggregation in round {rnd}")
            rows.extend(new_rows)
        except Divergence as e:
            diverged_round, error = rnd, str(e)
            rows.append({**base, "round": rnd, "layer": ALL, "n_participating": len(clients)})
            break
    df = pd.DataFrame(rows)
    from validation import federated as _fed  # the harness's stable column set (when it has one)

    for c in (tuple(getattr(_fed, "MEASURED_COLUMNS", ())) + tuple(getattr(_fed, "ADAPTIVE_COLUMNS", ()))
              + EXTRA_COLUMNS):
        if c not in df:
            df[c] = "" if c in ("clients", "dropped_clients") else float("nan")
    df["diverged"] = diverged_round is not None
    df["diverged_round"] = diverged_round if diverged_round is not None else -1
    df["error"] = error
    df["wall_s"] = time.perf_counter() - t_start
    ev_df = pd.DataFrame(events, columns=list(EVENT_COLUMNS))
    return FlowerRun(cfg, df, ev_df, states)


def _short(reason: str, limit: int = 600) -> str:
    """The informative part of a (possibly Ray-wrapped) error reason."""
    lines = [ln for ln in reason.splitlines() if ln.strip()]
    key = [ln for ln in lines if "Exception" in ln or "Error" in ln or "dropped" in ln]
    text = " | ".join(key[-3:] if key else lines[-3:])
    return text if len(text) <= limit else text[:limit] + "..."


def _client_metrics(m) -> dict:
    def get(k, default=float("nan")):
        return m[k] if k in m else default

    losses, accs = get("train-losses", []), get("train-accs", [])
    return {"num_examples": int(get("num-examples", -1)),
            "train_loss": float(np.mean(losses)) if len(losses) else float("nan"),
            "train_acc": float(np.mean(accs)) if len(accs) else float("nan"),
            "grad_A_local": float(get("grad-A-local")), "grad_B_local": float(get("grad-B-local")),
            "inc_A": float(get("inc-A")), "inc_B": float(get("inc-B")), "client_train_s": float(get("train-s"))}


def _copy_state(state):
    return dataclasses.replace(
        state, A={n: t.clone() for n, t in state.A.items()}, B={n: t.clone() for n, t in state.B.items()},
        merged={n: t.clone() for n, t in state.merged.items()},
        B_local=None if state.B_local is None else {n: t.clone() for n, t in state.B_local.items()})


# ------------------------------------------------------------------------------------------------
# Results files
# ------------------------------------------------------------------------------------------------
def events_path(out: str | Path, cfg: RunConfig) -> Path:
    """Where a Flower run's per-client events go: ``<out>/events/<run_id>.parquet``."""
    return Path(out) / "events" / f"{cfg.run_id}.parquet"


def write_flower_run(res: FlowerRun, out: str | Path) -> None:
    """Rows exactly as the harness writes them (``validation.grid``), events beside them."""
    from validation.grid import result_path, write_run

    write_run(res.rows, result_path(out, res.config))
    write_run(res.events, events_path(out, res.config))


# ------------------------------------------------------------------------------------------------
# ServerApp
# ------------------------------------------------------------------------------------------------
def configs_from_run_config(rc: dict) -> list[RunConfig]:
    """The experiment of a ``flwr run``: the app's run config (``[tool.flwr.app.config]`` or
    ``--run-config``) holds ``config`` (JSON: a RunConfig dict, or a GridConfig dict with
    ``base`` and axes) or ``grid-file`` (a grid JSON/YAML file as ``sfed-validate run --config``)."""
    if rc.get("grid-file"):
        return GridConfig.from_file(str(rc["grid-file"])).runs()
    text = str(rc.get("config", "") or "{}")
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"run config 'config' is not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise ValueError("run config 'config' must be a JSON object (RunConfig or GridConfig fields)")
    grid_only = {f.name for f in dataclasses.fields(GridConfig)} - {"base", "n_clients"}  # n_clients: both
    if "base" in d or grid_only & set(d) or isinstance(d.get("n_clients"), list):
        return GridConfig.from_dict(d).runs()
    return [RunConfig.from_dict(d)]


def make_server_app(configs: list[RunConfig] | None = None, *, out: str | Path | None = None,
                    faults: dict[tuple, str] | None = None, sink: list | None = None,
                    round_timeout: float | None = None, node_wait: float | None = None,
                    keep_states: bool = False, resume: bool | None = None) -> ServerApp:
    """A ServerApp running ``configs`` one after the other over the connected nodes.

    Arguments left ``None`` come from the run config (``config``/``grid-file``, ``out-dir``,
    ``round-timeout``, ``node-wait``, ``resume``). Each finished run is written to ``out`` (if any)
    and appended to ``sink`` (if given) as a :class:`FlowerRun`; a run that raises is logged and
    skipped (as ``validation.grid.run_grid`` does), and re-raised if it is the only one.
    """
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        rc = dict(context.run_config)
        cfgs = list(configs) if configs is not None else configs_from_run_config(rc)
        out_dir = out if out is not None else (rc.get("out-dir") or None)
        rt = float(round_timeout if round_timeout is not None else rc.get("round-timeout", 600.0))
        nw = float(node_wait if node_wait is not None else rc.get("node-wait", 300.0))
        res_flag = bool(resume if resume is not None else rc.get("resume", True))
        need = max(c.n_clients for c in cfgs)
        mapping = discover_clients(grid, need, wait_s=nw)
        log.info("Flower nodes for clients: %s", mapping)
        for cfg in cfgs:
            if out_dir and res_flag:
                from validation.grid import is_complete, result_path

                if is_complete(result_path(out_dir, cfg)):
                    log.info("run %s already complete in %s; skipped", cfg.run_id, out_dir)
                    continue
            try:
                res = run_on_grid(cfg, grid, mapping, faults=faults, round_timeout=rt, keep_states=keep_states)
            except Exception as e:
                log.error("run %s failed: %s: %s", cfg.run_id, type(e).__name__, e)
                if len(cfgs) == 1:
                    raise
                continue
            if out_dir:
                write_flower_run(res, out_dir)
            if sink is not None:
                sink.append(res)

    return app


server_app = make_server_app()


_RUNTIME_CRASH = "An error was encountered. Ending simulation."  # flwr: the simulation runtime (Ray) failed


def run_simulation_local(configs: list[RunConfig], *, num_supernodes: int | None = None,
                         out: str | Path | None = None, faults: dict[tuple, str] | None = None,
                         keep_states: bool = False, num_cpus: int = 1, round_timeout: float = 600.0,
                         verbose: bool = False, retries: int = 1) -> list[FlowerRun]:
    """Run ``configs`` in Flower's simulation engine (Ray) on this machine and return their results.

    ``num_supernodes`` defaults to the largest ``n_clients``; Ray gets ``num_cpus`` CPUs and each
    virtual client 1 CPU, so clients run one after the other when ``num_cpus == 1``.
    If the simulation runtime itself crashes before any run finished (e.g. Ray's node start-up
    times out on an overloaded machine), it is started again up to ``retries`` times; errors of
    the app are never retried. Raises ``RuntimeError`` if the simulation ends without finishing
    every run.
    """
    from flwr.simulation import run_simulation

    configs = list(configs)
    n = num_supernodes or max(c.n_clients for c in configs)
    backend_config = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                      "init_args": {"num_cpus": num_cpus, "num_gpus": 0, "include_dashboard": False}}
    for attempt in range(retries + 1):
        sink: list[FlowerRun] = []
        app = make_server_app(configs, out=out, faults=faults, sink=sink, keep_states=keep_states,
                              round_timeout=round_timeout, node_wait=60.0, resume=False)
        try:
            run_simulation(server_app=app, client_app=client_app, num_supernodes=n,
                           backend_config=backend_config, verbose_logging=verbose)
        except RuntimeError as e:
            if str(e) == _RUNTIME_CRASH and not sink and attempt < retries:
                log.warning("Flower simulation runtime crashed before any run finished (%s); retrying", e.__cause__)
                continue
            raise
        break
    if len(sink) != len(configs):
        done = {r.config.run_id for r in sink}
        lost = [c.run_id for c in configs if c.run_id not in done]
        raise RuntimeError(f"the Flower simulation ended without finishing run(s) {lost}; see the Flower log above")
    return sink


# ------------------------------------------------------------------------------------------------
# Command line: simulate a grid, or compare Flower with the in-process harness
# ------------------------------------------------------------------------------------------------
class _CaptureStates:
    """Context manager recording the server state after each aggregation of the in-process
    harness (wraps ``validation.federated.aggregate`` for the duration; the harness's ``run``
    does not return its adapters)."""

    def __enter__(self):
        from validation import federated

        self._mod, self._orig, self.states = federated, federated.aggregate, []

        def spy(*a, **k):
            s, d = self._orig(*a, **k)
            self.states.append(_copy_state(s))
            return s, d

        federated.aggregate = spy
        return self

    def __exit__(self, *exc):
        self._mod.aggregate = self._orig
        return False


def _state_tensors(state) -> dict[str, torch.Tensor]:
    d = {f"A|{n}": t for n, t in state.A.items()}
    d.update({f"B|{n}": t for n, t in state.B.items()})
    d.update({f"M|{n}": t for n, t in state.merged.items()})
    if state.B_local is not None:
        d.update({f"Bloc|{n}": t for n, t in state.B_local.items()})
    return d


def compare_states(s1, s2) -> dict[str, float]:
    """Max abs diff over all adapter tensors, and that divided by the largest |value| of ``s2``."""
    t1, t2 = _state_tensors(s1), _state_tensors(s2)
    if t1.keys() != t2.keys():
        raise ValueError(f"states hold different tensors: {sorted(t1.keys() ^ t2.keys())}")
    mad = max(float((t1[k].double() - t2[k].double()).abs().max()) for k in t1)
    scale = max(float(t2[k].abs().max()) for k in t2)
    return {"max_abs_diff": mad, "max_rel_diff": mad / scale if scale else 0.0, "max_abs_value": scale}


_MEASURES = ("grad_A", "grad_B", "grad_A_end", "grad_B_end", "update_fro", "adapter_rms", "rho_hat", "n_eff_hat",
             "train_loss", "probe_loss_start", "probe_loss_end", "eval_loss")


def compare(configs: list[RunConfig], *, num_cpus: int = 1) -> pd.DataFrame:
    """Run ``configs`` in-process (peft loop and batched backends) and in Flower's simulation
    engine; one row per config with the adapter agreement (final round) and the wall times.
    The Flower wall time of a run is its ``wall_s`` (server loop, Ray already up; the first run
    also pays the Ray actors' start-up and imports); the whole simulation, Ray start-up included,
    is in ``flower_sim_total_s`` (same on every row). In-process times follow a discarded warm-up."""
    out = []
    ref = {}
    from validation import federated

    federated.run(dataclasses.replace(configs[0], batched=False))  # warm-up (imports, first-call costs)
    federated.run(dataclasses.replace(configs[0], batched=True))
    for cfg in configs:
        row = {"run_id": cfg.run_id, "scheme": cfg.scheme, "n_clients": cfg.n_clients, "k": cfg.k,
               "rank": cfg.rank, "rule": cfg.rule, "rounds": cfg.rounds}
        for batched in (False, True):
            c = dataclasses.replace(cfg, batched=batched)
            t0 = time.perf_counter()
            with _CaptureStates() as cap:
                df = federated.run(c)
            row[f"inproc_{'batched' if batched else 'loop'}_s"] = time.perf_counter() - t0
            ref[(cfg.run_id, batched)] = (df, cap.states)
        out.append(row)
    t0 = time.perf_counter()
    runs = {r.config.run_id: r for r in run_simulation_local(configs, keep_states=True, num_cpus=num_cpus)}
    total = time.perf_counter() - t0
    for row, cfg in zip(out, configs):
        res = runs[cfg.run_id]
        row["flower_run_s"] = float(res.rows["wall_s"].iloc[0])
        row["flower_sim_total_s"] = total
        for batched in (False, True):
            tag = "batched" if batched else "loop"
            df, states = ref[(cfg.run_id, batched)]
            d = compare_states(res.states[-1], states[-1])
            row[f"adapter_abs_diff_vs_{tag}"] = d["max_abs_diff"]
            row[f"adapter_rel_diff_vs_{tag}"] = d["max_rel_diff"]
            f = res.rows.set_index(["round", "layer"]).sort_index()
            h = df.set_index(["round", "layer"]).sort_index()
            rel = 0.0
            for col in _MEASURES:
                a, b = f[col].to_numpy(float), h[col].to_numpy(float)
                ok = np.isfinite(a) & np.isfinite(b)
                if ok.any():
                    rel = max(rel, float(np.max(np.abs(a[ok] - b[ok]) / np.maximum(np.abs(b[ok]), 1e-12))))
            row[f"rows_rel_diff_vs_{tag}"] = rel
    return pd.DataFrame(out)


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


def main(argv: list[str] | None = None) -> int:
    """``python -m validation.flower_app {simulate,compare} ...`` (see ``--help``)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m validation.flower_app",
                                 description="The federated LoRA validation on Flower's simulation engine.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, hlp in (("simulate", "run a grid in Flower's simulation engine and write harness-format results"),
                      ("compare", "run a grid in-process and in Flower; print adapter agreement and wall times")):
        p = sub.add_parser(name, help=hlp)
        p.add_argument("--config", help="grid file (JSON/YAML), as for `sfed-validate run --config`")
        p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                       help="override RunConfig fields of every run (JSON values)")
        p.add_argument("--num-cpus", type=int, default=1, help="CPUs Ray may use (default 1)")
        p.add_argument("--out", help="results folder (simulate: default runs/flower; compare: CSV file)")
        if name == "simulate":
            p.add_argument("--num-supernodes", type=int, help="virtual clients (default: largest n_clients)")
    ns = ap.parse_args(argv)
    cfgs = _configs_from_args(ns)
    if ns.cmd == "simulate":
        out = ns.out or "runs/flower"
        runs = run_simulation_local(cfgs, num_supernodes=ns.num_supernodes, out=out, num_cpus=ns.num_cpus)
        for r in runs:
            n_drop = int(r.events["status"].ne("ok").sum())
            print(f"{r.config.run_id}: {len(r.rows)} rows, {n_drop} dropped client replies -> {out}")
        return 0
    res = compare(cfgs, num_cpus=ns.num_cpus)
    with pd.option_context("display.width", 200, "display.max_columns", 50):
        print(res.to_string(index=False))
    if ns.out:
        res.to_csv(ns.out, index=False)
    return 0


if __name__ == "__main__":
    # Re-import under the real module name so that Ray workers unpickle the ClientApp by reference.
    from validation.flower_app import main as _main

    raise SystemExit(_main())
