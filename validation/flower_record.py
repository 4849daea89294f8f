"""The harness's measurement of a Flower run: the same rows as :func:`validation.federated.run`.

:class:`RunRecorder` follows a run round by round beside the strategy. It keeps the harness's view
of the server state (:class:`~validation.aggregation.ServerState`: the global adapter the strategy
holds, and for FedSA a mirror of every client's own B as the clients report it, which the shared
evaluation pass needs), probes the global adapter before and after each round at the theory's
point (:func:`validation.federated.probe_point`), evaluates it, and builds the rows with
:func:`validation.federated.measure_round`, plus per-client events. Rows carry every harness column,
``backend = "flower"`` and :data:`EXTRA_COLUMNS`: ``gamma`` is the round's gamma (recomputed from
the clients averaged), ``gamma_sent`` what they trained with.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

import sfed_theory
from sfed_theory.flower import RoundRecord, adapter_key
from validation.adaptive import rescale_for_new_gamma
from validation.aggregation import (SCHEME_TRAINS_A, ServerState, client_deltas, eval_adapter, init_state,
                                    total_delta)
from validation.backends import Divergence, LoopBackend
from validation.config import RunConfig
from validation.federated import (ADAPTIVE_COLUMNS, MEASURED_COLUMNS, client_parts, config_columns, fixed_batches,
                                  gamma_for, measure_round, probe_point, resolve_device)
from validation.flower_client import ERR_DIVERGED, encode_adapter
from validation.metrics import ALL
from validation.models import Task

__all__ = ["RunRecorder", "FlowerRun", "EXTRA_COLUMNS", "EVENT_COLUMNS", "copy_state", "state_tensors"]

EXTRA_COLUMNS: tuple[str, ...] = ("gamma_sent", "n_sampled", "n_dropped", "dropped_clients")
EVENT_COLUMNS: tuple[str, ...] = (
    "run_id", "round", "client", "node_id", "status", "reason", "gamma_sent", "gamma_round", "num_examples",
    "train_loss", "train_acc", "grad_A_local", "grad_B_local", "inc_A", "inc_B", "client_train_s")


@dataclass
class FlowerRun:
    """One run on a Flower grid: the harness-format rows, the per-client events and (optionally)
    the global adapter state after every round's aggregation (``states[t-1]`` after round t)."""

    config: RunConfig
    rows: pd.DataFrame
    events: pd.DataFrame
    states: list[Any] = field(default_factory=list)


def copy_state(state: ServerState) -> ServerState:
    """A deep copy of a server state (its tensors cloned)."""
    clone = lambda d: None if d is None else {n: t.clone() for n, t in d.items()}  # noqa: E731
    return dataclasses.replace(state, A=clone(state.A), B=clone(state.B), merged=clone(state.merged),
                               B_local=clone(state.B_local))


def state_tensors(state: ServerState) -> dict[str, torch.Tensor]:
    """Every tensor of a server state by a flat name (``A|layer``, ``B|layer``, ``M|layer``, ``Bloc|layer``)."""
    d = {f"A|{n}": t for n, t in state.A.items()}
    d.update({f"B|{n}": t for n, t in state.B.items()})
    d.update({f"M|{n}": t for n, t in state.merged.items()})
    if state.B_local is not None:
        d.update({f"Bloc|{n}": t for n, t in state.B_local.items()})
    return d


def _short(reason: str, limit: int = 600) -> str:
    """The informative part of a (possibly Ray-wrapped) error reason."""
    lines = [ln for ln in reason.splitlines() if ln.strip()]
    key = [ln for ln in lines if "Exception" in ln or "Error" in ln or "dropped" in ln]
    text = " | ".join(key[-3:] if key else lines[-3:])
    return text if len(text) <= limit else text[:limit] + "..."


def _client_metrics(m: dict) -> dict:
    get = lambda k, default=float("nan"): m.get(k, default)  # noqa: E731
    losses, accs = get("train-losses", []), get("train-accs", [])
    return {"num_examples": int(get("num-examples", -1)),
            "train_loss": float(np.mean(losses)) if len(losses) else float("nan"),
            "train_acc": float(np.mean(accs)) if len(accs) else float("nan"),
            "grad_A_local": float(get("grad-A-local")), "grad_B_local": float(get("grad-B-local")),
            "inc_A": float(get("inc-A")), "inc_B": float(get("inc-B")), "client_train_s": float(get("train-s"))}


class RunRecorder:
    """Rows, events and states of one harness run on Flower (see module docstring)."""

    def __init__(self, cfg: RunConfig, task: Task, *, round_timeout: float = 600.0, keep_states: bool = False):
        self.cfg, self.task, self.round_timeout, self.keep_states = cfg, task, round_timeout, keep_states
        self.device, self.dtype = resolve_device(cfg.device), getattr(torch, cfg.dtype)
        self.sizes = np.array([len(p) for p in client_parts(cfg, task)], dtype=float)
        self.gamma = gamma_for(cfg, self.sizes)  # the gamma the mirrored state is at
        self._backends: dict[float, LoopBackend] = {}
        self.shapes = self.backend(self.gamma).shapes
        n = cfg.n_clients
        all_w = torch.as_tensor(self.sizes / self.sizes.sum() if cfg.weighted else np.full(n, 1 / n))
        self.state = init_state(self.shapes, cfg.rank, n, cfg.scheme, cfg.seed, all_w, self.dtype, self.device)
        self.batches = fixed_batches(cfg, task, self.device)  # probe_in, probe_y, eval_in, eval_y
        self.base = {"run_id": cfg.run_id, "version": sfed_theory.__version__, **config_columns(cfg),
                     "backend": "flower", "gamma": self.gamma, "device_used": str(self.device)}
        self.rows: list[dict] = []
        self.events: list[dict] = []
        self.states: list[ServerState] = []
        self.diverged_round: int | None = None
        self.error = ""
        self._clients: list[int] = []
        self._start = None
        self._t_sent = 0.0

    def backend(self, gamma: float) -> LoopBackend:
        """A peft backend at ``gamma`` for the server's probes and evaluation (one per gamma)."""
        if gamma not in self._backends:
            self._backends[gamma] = LoopBackend(self.task.model, self.task.targets, self.cfg.rank, gamma, self.device)
        return self._backends[gamma]

    def initial_arrays(self):
        """The run's initial global adapter (seeded A, B = 0) as the strategy's ArrayRecord."""
        return encode_adapter(self.state.A, self.state.B)

    # --- one round ------------------------------------------------------------------------------
    def _rescale_local_b(self, g_old: float, g_new: float) -> None:
        """FedSA mirror: every client's B to ``g_new`` (what the clients do when the next gamma arrives)."""
        if self.state.B_local is not None and g_old != g_new:
            B_local = {n: rescale_for_new_gamma(b, g_old, g_new) for n, b in self.state.B_local.items()}
            self.state = dataclasses.replace(self.state, B_local=B_local)

    def _with_global(self, tensors: dict[str, torch.Tensor]) -> ServerState:
        """The mirrored state with the strategy's global arrays (FedSA: no B there; exact: merged)."""
        pick = lambda kind, old: {n: tensors[adapter_key(n, kind)].to(self.device, self.dtype)  # noqa: E731
                                  if adapter_key(n, kind) in tensors else old[n] for n in self.task.targets}
        return dataclasses.replace(self.state, A=pick("A", self.state.A), B=pick("B", self.state.B),
                                   merged=pick("merged", self.state.merged))

    def start_round(self, clients: list[int], gamma_sent: float, start: dict[str, torch.Tensor]) -> None:
        """Before the messages go out: sync the global adapter sent, probe it at the theory's point."""
        self._rescale_local_b(self.gamma, gamma_sent)
        self.gamma, self._clients = gamma_sent, clients
        self.state = self._with_global(start)
        bk = self.backend(gamma_sent)
        bk.set_base_delta(self.state.merged)
        probe_in, probe_y = self.batches[:2]
        self._start = probe_point(bk, self.state, clients, probe_in, probe_y, capture=True)
        self._t_sent = time.perf_counter()

    def _events(self, record: RoundRecord, client_of: dict[int, int]) -> list[dict]:
        rnd, out = record.server_round, []
        for node in record.sampled:
            o, c = record.outcomes[node], client_of[node]
            ev = {"run_id": self.cfg.run_id, "round": rnd, "client": c, "node_id": str(node), "status": o.status,
                  "reason": "", "gamma_sent": record.gamma_sent, "gamma_round": record.gamma_round,
                  **_client_metrics(o.metrics)}
            if o.status == "no-reply":
                ev["reason"] = (f"client {c} (node {node}) sent no reply within {self.round_timeout:g} s: "
                                f"dropped out of round {rnd}")
            elif o.status == "error" and o.error_code == ERR_DIVERGED:
                ev.update(status="diverged", reason=o.reason)
            elif o.status == "error":
                ev["reason"] = f"client {c} (node {node}) failed in round {rnd} and is dropped from it: {_short(o.reason)}"
            elif o.status == "rejected":
                ev["reason"] = f"client {c} (node {node}) reply rejected in round {rnd}: {o.reason}"
            out.append(ev)
        return out

    def finish_round(self, record: RoundRecord, client_of: dict[int, int], rho_smoothed: float = math.nan) -> None:
        """After aggregation: events, then the round's rows (raises Divergence like the harness)."""
        train_s = time.perf_counter() - self._t_sent
        events = self._events(record, client_of)
        self.events.extend(events)
        diverged = [e["reason"] for e in events if e["status"] == "diverged"]
        if diverged:
            raise Divergence(diverged[0])
        ok = [client_of[n] for n in record.accepted]
        dropped = [c for c in self._clients if c not in ok]
        extra = {"gamma": record.gamma_round, "gamma_sent": record.gamma_sent, "n_sampled": len(self._clients),
                 "n_dropped": len(dropped), "dropped_clients": ",".join(map(str, dropped))}
        if not ok:
            self.rows.append({**self.base, **extra, "round": record.server_round, "layer": ALL, "n_participating": 0,
                              "clients": "", "train_s": train_s})
            if self.keep_states:
                self.states.append(copy_state(self.state))
            return
        new_rows = self._measure(record, ok, train_s)
        for r in new_rows:
            r.update(extra)
        if record.estimate is not None:
            self._adaptive_columns(new_rows, record, rho_smoothed)
        self.rows.extend(new_rows)

    def _aggregated_state(self, record: RoundRecord, ok: list[int]) -> ServerState:
        """The harness's state after the round: the strategy's arrays, and FedSA's reported B mirrored."""
        new = self._with_global(record.aggregated)
        if new.B_local is None:
            return new
        B_local = {n: t.clone() for n, t in new.B_local.items()}
        for n in self.task.targets:
            B_local[n][ok] = record.B1[n].to(self.device, self.dtype)
        new = dataclasses.replace(new, B_local=B_local)
        if record.gamma_round != record.gamma_sent:
            new = dataclasses.replace(new, B_local={n: rescale_for_new_gamma(b, record.gamma_sent, record.gamma_round)
                                                    for n, b in B_local.items()})
        return new

    def _deltas(self, before: ServerState, after: ServerState, ok: list[int], g0: float, g1: float):
        """The round's change of the effective weight and the cumulative change (as aggregate_and_deltas)."""
        if self.cfg.scheme == "fedsa":
            old, now = client_deltas(before, ok, g0), client_deltas(after, ok, g1)
        else:
            old, now = total_delta(before, g0), total_delta(after, g1)
        return {n: now[n] - old[n] for n in now}, now

    def _measure(self, record: RoundRecord, ok: list[int], train_s: float) -> list[dict]:
        """Aggregated state, end probe, evaluation and :func:`measure_round`, as the harness does."""
        before, g = self.state, record.gamma_round
        after = self._aggregated_state(record, ok)
        round_delta, tot = self._deltas(before, after, ok, record.gamma_sent, g)
        self.state, self.gamma = after, g
        if self.keep_states:
            self.states.append(copy_state(after))
        bk = self.backend(g)
        bk.set_base_delta(after.merged)
        probe_in, probe_y, eval_in, eval_y = self.batches
        end = probe_point(bk, after, ok, probe_in, probe_y, capture=True)
        ev_loss, ev_acc = bk.evaluate(*eval_adapter(after), eval_in, eval_y)
        pos = [self._clients.index(c) for c in ok]
        on_dev = lambda d: {n: d[n].to(self.device, self.dtype) for n in self.task.targets}  # noqa: E731
        A0, A1, B1 = on_dev(record.A0), on_dev(record.A1), on_dev(record.B1)
        B0 = {n: before.B_local[n][ok] for n in self.task.targets} if before.B_local is not None else on_dev(record.B0)
        p = record.p.to(self.device)
        measured = measure_round(self.task.targets, self.shapes, self._start.select(pos), end, round_delta, tot,
                                 A0, B0, A1, B1, SCHEME_TRAINS_A[self.cfg.scheme], p, g)
        losses = [record.outcomes[n].metrics["train-losses"] for n in record.accepted]
        accs = [record.outcomes[n].metrics["train-accs"] for n in record.accepted]
        common = {"round": record.server_round, "n_participating": len(ok), "clients": ",".join(map(str, ok)),
                  "train_loss": float(np.mean(losses)), "train_acc": float(np.mean(accs)),
                  "probe_loss_start": self._start.loss, "probe_loss_end": end.loss,
                  "eval_loss": ev_loss, "eval_acc": ev_acc, "train_s": train_s}
        rows = [{**self.base, **common, **m} for m in measured]
        if not all(math.isfinite(r[c]) for r in rows for c in ("update_fro", "adapter_rms", "eval_loss")):
            raise Divergence(f"non-finite update or eval loss after aggregation in round {record.server_round}")
        return rows

    def _adaptive_columns(self, rows: list[dict], record: RoundRecord, rho_smoothed: float) -> None:
        """The adaptive rule's record (as validation.federated.run writes it); FedSA's mirror follows gamma_next."""
        est, g_next = record.estimate, record.gamma_next
        rec = {"gamma_next": g_next, "rho_est_raw": est.rho_raw, "rho_est_se": est.se,
               "rho_est_smoothed": rho_smoothed, "n_eff_est": est.n_eff,
               "n_eff_smoothed": self.cfg.rank * (g_next / self.cfg.alpha) ** 2}
        for r in rows:
            r.update(rec)
        self._rescale_local_b(self.gamma, g_next)
        self.gamma = g_next

    # --- the run --------------------------------------------------------------------------------
    def diverged(self, rnd: int, error: str) -> None:
        """The run stopped in round ``rnd`` on a non-finite loss: one row saying so."""
        self.diverged_round, self.error = rnd, error
        self.rows.append({**self.base, "round": rnd, "layer": ALL, "n_participating": len(self._clients)})

    def result(self, wall_s: float) -> FlowerRun:
        """The run's rows (every harness column plus :data:`EXTRA_COLUMNS`), events and states."""
        df = pd.DataFrame(self.rows)
        for c in MEASURED_COLUMNS + ADAPTIVE_COLUMNS + EXTRA_COLUMNS:
            if c not in df:
                df[c] = "" if c in ("clients", "dropped_clients") else float("nan")
        df["diverged"] = self.diverged_round is not None
        df["diverged_round"] = self.diverged_round if self.diverged_round is not None else -1
        df["error"] = self.error
        df["wall_s"] = wall_s
        return FlowerRun(self.cfg, df, pd.DataFrame(self.events, columns=list(EVENT_COLUMNS)), self.states)
