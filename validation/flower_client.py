"""The harness's Flower ClientApp: one federated client of a :class:`~validation.config.RunConfig`.

Partition ``i`` (the node's ``partition-id``) plays harness client ``i``: the ClientApp rebuilds the
run's task from the config in the train message and trains on ``partition(...)[i]``, the split the
in-process harness uses, with peft LoRA (:class:`~validation.backends.LoopBackend`, the harness's
per-client path: fresh optimizer, the same seeded batches) at the round's ``gamma`` from
:class:`~sfed_theory.flower.SFedStrategy`. It replies with its adapter (``<layer>.lora_A.weight``,
``<layer>.lora_B.weight``; FedSA also ``<layer>.lora_B.start``) and a MetricRecord (per-step losses
and accuracies, its gradient norms at the starting adapter, its increment norms, ``num-examples``).

FedSA: the client's own B lives in ``context.state`` (:func:`sfed_theory.flower_client.load_local_b`),
never on the server. exact: the received ``merged_delta`` is added to the frozen weights.
A local loss that turns non-finite is answered with error code :data:`ERR_DIVERGED` (the server
stops the run there, as the harness does).

Fault injection (testing the server): :func:`inject_faults`, a ClientApp mod, reads the run
config's ``faults`` (:func:`faults_run_config`) and makes a client drop out mid-round or reply with
an adapter of the wrong shape.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from sfed_theory.flower import adapter_key, split_key
from sfed_theory.flower_client import keep_local_b, load_local_b
from sfed_theory.peft import require_peft
from validation.aggregation import SCHEME_TRAINS_A
from validation.backends import Divergence, LoopBackend
from validation.config import RunConfig
from validation.federated import client_batches as harness_batches  # the harness's seeded batches (seed, round, client)
from validation.federated import client_parts, resolve_device
from validation.models import Task, build_task

__all__ = ["client_app", "inject_faults", "faults_run_config", "partition_id", "encode_adapter", "decode_adapter",
           "ClientDropout", "FAULTS", "ERR_DIVERGED", "ERR_CLIENT"]

# Injected faults: "drop" makes the client raise mid-round, "bad-shape" cuts one rank column off
# its first layer's B in the reply.
FAULTS: tuple[str, ...] = ("drop", "bad-shape")
ERR_DIVERGED = 4101  # error code of a client whose local loss became non-finite
ERR_CLIENT = 4102  # error code of any other failure the ClientApp catches and reports


class ClientDropout(RuntimeError):
    """A client leaves in the middle of a round (raised by :func:`inject_faults`)."""


def encode_adapter(A: dict[str, torch.Tensor], B: dict[str, torch.Tensor] | None = None,
                   merged: dict[str, torch.Tensor] | None = None,
                   b_start: dict[str, torch.Tensor] | None = None) -> ArrayRecord:
    """Layer-keyed adapter tensors as an ArrayRecord with SFedStrategy's keys (layer order kept)."""
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    for n in A:
        for kind, part in (("A", A), ("B", B), ("merged", merged), ("B_start", b_start)):
            if part is not None:
                sd[adapter_key(n, kind)] = part[n].detach().cpu().contiguous()
    return ArrayRecord(sd)


def decode_adapter(rec: ArrayRecord) -> dict[str, dict[str, torch.Tensor]]:
    """Inverse of :func:`encode_adapter`: ``{kind: {layer: tensor}}`` (kinds A, B, merged, B_start)."""
    out: dict[str, dict[str, torch.Tensor]] = {"A": {}, "B": {}, "merged": {}, "B_start": {}}
    for key, t in rec.to_torch_state_dict().items():
        layer, kind = split_key(key)
        if kind is None:
            raise ValueError(f"unexpected array {key!r} in an adapter record (keys are <layer>.lora_A.weight, "
                             "<layer>.lora_B.weight, <layer>.merged_delta, <layer>.lora_B.start)")
        out[kind][layer] = t
    return out


# ------------------------------------------------------------------------------------------------
# Per-process cache of a run's task (a ClientApp process serves many rounds and runs)
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
    """Task, partition and backends of one run, cached (deterministic in the config)."""
    with _ENV_LOCK:
        env = _ENVS.get(cfg.run_id)
        if env is None:
            task = build_task(cfg)
            env = _ClientEnv(cfg, task, client_parts(cfg, task), resolve_device(cfg.device))
            _ENVS[cfg.run_id] = env
            while len(_ENVS) > 2:
                _ENVS.popitem(last=False)
        return env


def partition_id(context: Context) -> int:
    """The harness client this node plays (its node config's ``partition-id``)."""
    nc = context.node_config
    if "partition-id" not in nc:
        raise ValueError("this SuperNode has no 'partition-id' in its node config; start it with "
                         "--node-config \"partition-id=<i> num-partitions=<N>\" (i = 0..N-1, one per node)")
    return int(nc["partition-id"])


def _norm(ts: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in ts))


# ------------------------------------------------------------------------------------------------
# Fault injection (a ClientApp mod)
# ------------------------------------------------------------------------------------------------
def faults_run_config(faults: dict[tuple, str]) -> str:
    """The run config value ``faults``: ``{(round, client): fault}`` or ``{(run_id, round, client): fault}``
    as JSON (a ``(round, client)`` key applies to every run)."""
    out = []
    for key, fault in faults.items():
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; allowed: {', '.join(FAULTS)}")
        run_id, rnd, client = key if len(key) == 3 else ("", *key)
        out.append([str(run_id), int(rnd), int(client), fault])
    return json.dumps(out)


def _fault_for(msg: Message, context: Context) -> str | None:
    text = str(context.run_config.get("faults", "") or "")
    if not text or msg.metadata.message_type != "train":
        return None
    conf = msg.content["config"]
    rnd, client, run_id = int(conf["server-round"]), partition_id(context), str(conf.get("run-id", ""))
    for f_run, f_round, f_client, fault in json.loads(text):
        if f_round == rnd and f_client == client and f_run in ("", run_id):
            return fault
    return None


def inject_faults(msg: Message, context: Context, call_next) -> Message:
    """ClientApp mod: the faults the run config's ``faults`` lists for this run, round and client."""
    fault = _fault_for(msg, context)
    if fault == "drop":
        raise ClientDropout(f"client {partition_id(context)} dropped out in the middle of round "
                            f"{int(msg.content['config']['server-round'])} (injected fault)")
    reply = call_next(msg, context)
    if fault == "bad-shape" and not reply.has_error():
        arrays = OrderedDict(reply.content["arrays"].to_torch_state_dict())
        first_b = next(k for k in arrays if split_key(k)[1] == "B")
        arrays[first_b] = arrays[first_b][:, :-1].contiguous()
        reply.content["arrays"] = ArrayRecord(arrays)
    return reply


# ------------------------------------------------------------------------------------------------
# The ClientApp
# ------------------------------------------------------------------------------------------------
client_app = ClientApp()


@client_app.query()
def _client_query(msg: Message, context: Context) -> Message:
    """Handshake: which harness client (partition) this node plays. Also loads peft (and with it
    transformers) now, so that the start-up is not counted in the first run's time."""
    require_peft()
    info = {"partition-id": partition_id(context)}
    if "num-partitions" in context.node_config:
        info["num-partitions"] = int(context.node_config["num-partitions"])
    return Message(RecordDict({"info": ConfigRecord(info)}), reply_to=msg)


def _start_adapter(msg: Message, context: Context, env: _ClientEnv, gamma: float) -> tuple[dict, dict, dict]:
    """(A0, B0, merged) on the device: from the message; FedSA's B0 from the client's own state."""
    dtype, dev, targets = getattr(torch, env.cfg.dtype), env.device, env.task.targets
    got = decode_adapter(msg.content["arrays"])
    shapes = env.backend(gamma).shapes
    if env.cfg.scheme == "fedsa":
        own = load_local_b(context, {n: (shapes[n][0], env.cfg.rank) for n in targets}, gamma, tag=env.cfg.run_id,
                           dtype=dtype)
        got["B"] = own
    A0 = {n: got["A"][n].to(dev, dtype) for n in targets}
    B0 = {n: got["B"][n].to(dev, dtype) for n in targets}
    merged = {n: got["merged"][n].to(dev, dtype) if n in got["merged"]
              else torch.zeros(shapes[n], dtype=dtype, device=dev) for n in targets}
    return A0, B0, merged


def _local_round(env: _ClientEnv, pid: int, rnd: int, gamma: float, A0: dict, B0: dict, merged: dict):
    """The harness's local training of client ``pid`` (same batches and code as in process)."""
    backend = env.backend(gamma)
    backend.set_base_delta(merged)
    batches = [step[0] for step in harness_batches(env.cfg, env.task, {pid: env.parts[pid]}, [pid], rnd, env.device)]
    # the client's own gradient norms at the adapter it starts from, on its first local batch
    g = backend.probe(A0, B0, batches[0][0], batches[0][1], grads=True)
    A1, B1, losses, accs = backend.train_clients(
        {n: a.unsqueeze(0) for n, a in A0.items()}, {n: b.unsqueeze(0) for n, b in B0.items()},
        [[b] for b in batches], train_A=SCHEME_TRAINS_A[env.cfg.scheme], optimizer=env.cfg.optimizer,
        lr=env.cfg.lr, weight_decay=env.cfg.weight_decay)
    return {n: a[0] for n, a in A1.items()}, {n: b[0] for n, b in B1.items()}, losses[0], accs[0], g


@client_app.train(mods=[inject_faults])
def _client_train(msg: Message, context: Context) -> Message:
    """One round of local LoRA training (see module docstring)."""
    t0 = time.perf_counter()
    conf = msg.content["config"]
    cfg = RunConfig.from_dict(json.loads(str(conf["run-config"])))
    rnd, gamma, pid = int(conf["server-round"]), float(conf["gamma"]), partition_id(context)
    if pid >= cfg.n_clients:
        raise ValueError(f"partition-id {pid} is outside this run's {cfg.n_clients} clients")
    env = _client_env(cfg)
    A0, B0, merged = _start_adapter(msg, context, env, gamma)
    try:
        A1, B1, losses, accs, g = _local_round(env, pid, rnd, gamma, A0, B0, merged)
    except Divergence as e:
        return Message(Error(code=ERR_DIVERGED, reason=f"Divergence: client {pid}, round {rnd}: {e}"), reply_to=msg)
    fedsa = cfg.scheme == "fedsa"
    if fedsa:
        keep_local_b(context, B1, gamma, tag=cfg.run_id)
    metrics = MetricRecord({
        "partition-id": pid, "num-examples": int(len(env.parts[pid])),
        "train-losses": [float(x) for x in losses.tolist()], "train-accs": [float(x) for x in accs.tolist()],
        "grad-A-local": _norm(list(g.grad_A.values())), "grad-B-local": _norm(list(g.grad_B.values())),
        "inc-A": _norm([A1[n] - A0[n] for n in A1]), "inc-B": _norm([B1[n] - B0[n] for n in B1]),
        "train-s": time.perf_counter() - t0,
    })
    arrays = encode_adapter(A1, B1, b_start=B0 if fedsa else None)
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)
