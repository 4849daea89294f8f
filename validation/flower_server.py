"""The harness's Flower ServerApp: each run of a grid is one :class:`SFedStrategy` run, measured.

* **Handshake** (:func:`discover_clients`): the ServerApp asks every connected node which
  ``partition-id`` it plays; partition ``i`` is harness client ``i``.
* **A run** (:func:`run_on_grid`): :class:`HarnessStrategy`, a subclass of
  :class:`sfed_theory.flower.SFedStrategy` (itself Flower's ``FedAvg``), runs Flower's own round
  loop (``Strategy.start``). It only changes the sampling (the harness's seeded draw of K of N
  clients, so the same clients train as in process) and, around its parent's hooks, lets a
  :class:`~validation.flower_record.RunRecorder` probe, evaluate and record each round. Gamma, the
  drop-out rescale, FedSA's client-held B and the adaptive rule are the strategy's.
* **The app** (:func:`make_server_app`, :data:`server_app`): runs the experiment of the run config
  (``config`` / ``grid-file``, see :func:`configs_from_run_config`) one run after the other over the
  same nodes, writes each to ``out-dir`` in the harness's format and skips runs already there.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from sfed_theory.flower import SFedStrategy
from sfed_theory.peft import require_peft
from validation.backends import Divergence
from validation.config import GridConfig, RunConfig
from validation.federated import sample_clients
from validation.flower_record import FlowerRun, RunRecorder, state_tensors
from validation.models import Task, build_task

__all__ = ["HarnessStrategy", "run_on_grid", "discover_clients", "configs_from_run_config", "make_server_app",
           "server_app", "write_flower_run", "events_path", "states_path", "read_states"]

log = logging.getLogger("sfed.flower")


class HarnessStrategy(SFedStrategy):
    """SFedStrategy for one harness run: the harness's sampling, and every round measured."""

    required_metrics = ("train-losses", "train-accs")

    def __init__(self, cfg: RunConfig, task: Task, clients_to_nodes: dict[int, int], *,
                 round_timeout: float = 600.0, keep_states: bool = False) -> None:
        if cfg.client_ranks is not None:
            raise ValueError("the harness's Flower app runs clients of one rank; run client_ranks with "
                             "validation.federated.run, or use sfed_theory.flower_hetero.SFedHeteroStrategy in a Flower app")
        self.recorder = RunRecorder(cfg, task, round_timeout=round_timeout, keep_states=keep_states)
        super().__init__(alpha=cfg.alpha, rule=cfg.rule, scheme=cfg.scheme, rank=cfg.rank, n_clients=cfg.n_clients,
                         rho=cfg.rho, client_weights=list(self.recorder.sizes), weighted=cfg.weighted,
                         adaptive_ema=cfg.adaptive_ema, fraction_evaluate=0.0)
        self.cfg = cfg
        self.node_of = dict(clients_to_nodes)
        self.client_of = {node: c for c, node in clients_to_nodes.items()}
        self.current_round = 0

    def sample_train_nodes(self, server_round: int, grid: Grid) -> list[int]:
        """The harness's clients of this round (:func:`validation.federated.sample_clients`), as nodes."""
        return [self.node_of[c] for c in sample_clients(self.cfg, server_round)]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """SFedStrategy's messages; the recorder probes the adapter they carry before they go out."""
        self.current_round = server_round
        messages = super().configure_train(server_round, arrays, config, grid)
        sent = self._pending[server_round]
        self.recorder.start_round([self.client_of[n] for n in sent.sampled], sent.gamma_sent, sent.start)
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """SFedStrategy's aggregation; then the recorder measures the round (Divergence stops the run)."""
        out = super().aggregate_train(server_round, replies)
        rho = self.scaler.rho_smoothed if self.scaler is not None else float("nan")
        self.recorder.finish_round(self.last_round, self.client_of, rho)
        return out


def run_on_grid(cfg: RunConfig, grid: Grid, clients_to_nodes: dict[int, int], *, round_timeout: float = 600.0,
                task: Task | None = None, keep_states: bool = False) -> FlowerRun:
    """Run one configuration over a Flower ``Grid`` with :class:`HarnessStrategy` (Flower's round loop).

    ``clients_to_nodes``: ``{client (partition id): node id}`` from :func:`discover_clients`;
    ``round_timeout``: seconds to wait for replies (a client that has not answered is dropped)."""
    t0 = time.perf_counter()
    missing = [c for c in range(cfg.n_clients) if c not in clients_to_nodes]
    if missing:
        raise ValueError(f"no Flower node for client(s) {missing} of this {cfg.n_clients}-client run")
    strategy = HarnessStrategy(cfg, task or build_task(cfg), clients_to_nodes, round_timeout=round_timeout,
                               keep_states=keep_states)
    train_config = ConfigRecord({"run-config": json.dumps(cfg.to_dict(), sort_keys=True), "run-id": cfg.run_id})
    try:
        strategy.start(grid, strategy.recorder.initial_arrays(), num_rounds=cfg.rounds, timeout=round_timeout,
                       train_config=train_config)
    except Divergence as e:
        strategy.recorder.diverged(strategy.current_round, str(e))
    return strategy.recorder.result(time.perf_counter() - t0)


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
    mapping: dict[int, int] = {}
    problems = []
    for r in grid.send_and_receive(msgs, timeout=timeout):
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


# ------------------------------------------------------------------------------------------------
# Results files
# ------------------------------------------------------------------------------------------------
def events_path(out: str | Path, cfg: RunConfig) -> Path:
    """Where a Flower run's per-client events go: ``<out>/events/<run_id>.parquet``."""
    return Path(out) / "events" / f"{cfg.run_id}.parquet"


def states_path(out: str | Path, cfg: RunConfig) -> Path:
    """Where a run's server states go when kept (``keep-states``): ``<out>/states/<run_id>.pt``."""
    return Path(out) / "states" / f"{cfg.run_id}.pt"


def write_flower_run(res: FlowerRun, out: str | Path) -> None:
    """Rows exactly as the harness writes them (``validation.grid``), events (and states) beside them."""
    from validation.grid import result_path, write_run

    write_run(res.events, events_path(out, res.config))
    if res.states:
        path = states_path(out, res.config)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save([state_tensors(s) for s in res.states], path)
    write_run(res.rows, result_path(out, res.config))  # last: its presence marks the run complete


def read_states(out: str | Path, cfg: RunConfig) -> list[dict[str, torch.Tensor]]:
    """The kept server states of a run (:func:`write_flower_run`), as flat tensor dicts per round."""
    return torch.load(states_path(out, cfg))


# ------------------------------------------------------------------------------------------------
# ServerApp
# ------------------------------------------------------------------------------------------------
def configs_from_run_config(rc: dict) -> list[RunConfig]:
    """The experiment of a ``flwr run``: the app's run config holds ``config`` (JSON: a RunConfig
    dict, a list of them, or a GridConfig dict with ``base`` and axes) or ``grid-file`` (a grid
    JSON/YAML file as ``sfed-validate run --config``)."""
    if rc.get("grid-file"):
        return GridConfig.from_file(str(rc["grid-file"])).runs()
    text = str(rc.get("config", "") or "{}")
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"run config 'config' is not valid JSON: {e}") from e
    if isinstance(d, list):
        return [RunConfig.from_dict(x) for x in d]
    if not isinstance(d, dict):
        raise ValueError("run config 'config' must be a JSON object (RunConfig or GridConfig fields) or a list")
    grid_only = {f.name for f in dataclasses.fields(GridConfig)} - {"base", "n_clients"}  # n_clients: both
    if "base" in d or grid_only & set(d) or isinstance(d.get("n_clients"), list):
        return GridConfig.from_dict(d).runs()
    return [RunConfig.from_dict(d)]


def _settings(rc: dict, overrides: dict) -> dict:
    """The ServerApp's settings: explicit arguments first, then the run config, then defaults."""
    defaults = {"out-dir": "", "round-timeout": 600.0, "node-wait": 300.0, "resume": True, "keep-states": False,
                "grid-pull-interval": 0.0}
    return {k: overrides[k] if overrides.get(k) is not None else rc.get(k, v) for k, v in defaults.items()}


def _run_all(cfgs: list[RunConfig], grid: Grid, s: dict, sink: list | None) -> None:
    """Every run over the same nodes; a failing run is logged and skipped (re-raised if it is the only one)."""
    from validation.grid import is_complete, result_path

    require_peft()  # the server's probes use peft: load it before the first run's clock starts
    mapping = discover_clients(grid, max(c.n_clients for c in cfgs), wait_s=float(s["node-wait"]))
    log.info("Flower nodes for clients: %s", mapping)
    out = s["out-dir"] or None
    for cfg in cfgs:
        if out and s["resume"] and is_complete(result_path(out, cfg)):
            log.info("run %s already complete in %s; skipped", cfg.run_id, out)
            continue
        try:
            res = run_on_grid(cfg, grid, mapping, round_timeout=float(s["round-timeout"]),
                              keep_states=bool(s["keep-states"]))
        except Exception as e:
            log.error("run %s failed: %s: %s", cfg.run_id, type(e).__name__, e)
            if len(cfgs) == 1:
                raise
            continue
        if out:
            write_flower_run(res, out)
        if sink is not None:
            sink.append(res)


def make_server_app(configs: list[RunConfig] | None = None, *, out: str | Path | None = None,
                    sink: list | None = None, round_timeout: float | None = None, node_wait: float | None = None,
                    keep_states: bool | None = None, resume: bool | None = None) -> ServerApp:
    """A ServerApp running ``configs`` one after the other over the connected nodes.

    Arguments left ``None`` come from the run config (``config``/``grid-file``, ``out-dir``,
    ``round-timeout``, ``node-wait``, ``resume``, ``keep-states``; ``grid-pull-interval`` > 0 makes
    an in-memory (simulation) grid poll for replies that often instead of Flower's 0.1 s). Each
    finished run is written to the output folder (if any) and appended to ``sink`` (if given)."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        rc = dict(context.run_config)
        cfgs = list(configs) if configs is not None else configs_from_run_config(rc)
        s = _settings(rc, {"out-dir": None if out is None else str(out), "round-timeout": round_timeout,
                           "node-wait": node_wait, "resume": resume, "keep-states": keep_states})
        interval = float(s["grid-pull-interval"])
        if interval > 0 and hasattr(grid, "pull_interval"):
            grid.pull_interval = interval
        _run_all(cfgs, grid, s, sink)

    return app


server_app = make_server_app()
