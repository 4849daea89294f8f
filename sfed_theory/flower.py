"""SFedStrategy: the SFed scaling rule in any Flower app, as a subclass of Flower's ``FedAvg``.

A drop-in for ``FedAvg`` in a ServerApp whose clients fine-tune a peft LoRA model::

    strategy = SFedStrategy(alpha=16, fraction_train=0.5)        # was: FedAvg(fraction_train=0.5)
    strategy.start(grid, ArrayRecord(get_peft_model_state_dict(model)), num_rounds=10)

It overrides two hooks and keeps its state on ``self`` (as ``FedAvgM`` keeps its momentum):

* ``configure_train`` samples the round's nodes (FedAvg's rule; :meth:`sample_train_nodes` is the
  hook to change it), computes gamma for the K nodes sampled (:meth:`round_gamma`: the rule's
  :func:`sfed_theory.scaling_factor`; ``sfed-general`` with ``rho`` and data-size weights over all
  N clients; ``sfed-adaptive`` from the estimated client correlation) and sends it in the train
  ConfigRecord as ``"gamma"`` (as ``FedProx`` sends ``"proximal-mu"``), with ``"sfed-scheme"``.
  A client sets its LoRA scaling to it (:func:`sfed_theory.peft.set_scaling`). If the global
  adapter was stored at another gamma, its B is first rescaled so that ``gamma * B`` is unchanged.
* ``aggregate_train`` drops bad replies one by one (an error, a missing layer, a wrong shape, a
  non-finite value, no reply before the timeout; the reason is in :attr:`last_round`), aggregates
  the rest with the scheme (:func:`validation.aggregation.aggregate_layer`: ``fedit`` averages A
  and B, ``ffa`` averages B with A frozen, ``fedsa`` averages A while every client keeps its own B,
  ``exact`` merges ``gamma * avg(B_i A_i)`` into ``merged_delta`` and resets B), weighted by the
  replies' ``"num-examples"`` (``weighted=True``, FedAvg's default) or equally.

Drop-outs. The K clients trained with ``gamma_sent``; when only K' < K are averaged, the round's
gamma is recomputed from them (``gamma_round = round_gamma(K')``) and the aggregated B is rescaled
by ``gamma_sent / gamma_round``: the aggregated model is the average of the K' trained models,
so its output differs from the all-K aggregate only by the dropped clients' share (without the
rescale it would also be multiplied by ``gamma_round / gamma_sent``). FedSA clients hold their own
B and rescale it themselves when the next gamma arrives (:mod:`sfed_theory.flower_client`).

``sfed-adaptive``: after aggregating, rho is estimated from the averaged clients' B increments
(:func:`validation.adaptive.estimate_rho`), smoothed (:class:`validation.adaptive.AdaptiveScaler`,
prior ``rho``), and the adapter is rescaled to the next round's gamma without changing its function.

Arrays (peft's state-dict names, so ``ArrayRecord(get_peft_model_state_dict(model))`` fits): every
adapted layer ``<p>`` has ``<p>.lora_A.weight`` (r, k) and ``<p>.lora_B.weight`` (d, r); ``exact``
adds ``<p>.merged_delta`` (d, k), the learned weight change the client adds to its frozen weight;
FedSA replies add ``<p>.lora_B.start``, the client's B before local training (needed, with B, only
by ``sfed-adaptive``; the server keeps neither). Other arrays are averaged as FedAvg does.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

try:
    import numpy as np
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.common import log
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import FedAvg
    from flwr.serverapp.strategy.strategy_utils import sample_nodes
except ImportError as e:  # pragma: no cover - exercised without flwr only
    raise ImportError("sfed_theory.flower needs Flower and torch: pip install 'flwr[simulation]>=1.42' torch "
                      "(or pip install 'sfed[harness,flower]')") from e

from sfed_theory.rules import RULES, scaling_factor, weights_sum_squares
from validation.adaptive import AdaptiveScaler, RhoEstimate, estimate_rho, rescale_for_new_gamma
from validation.aggregation import SCHEMES, aggregate_layer

__all__ = ["SFedStrategy", "RoundRecord", "ClientOutcome", "AdapterLayout", "STRATEGY_RULES", "adapter_key",
           "split_key", "A_KEY", "B_KEY", "B_START_KEY", "MERGED_KEY"]

ADAPTIVE_RULE = "sfed-adaptive"
STRATEGY_RULES: tuple[str, ...] = RULES + (ADAPTIVE_RULE,)
A_KEY, B_KEY, B_START_KEY, MERGED_KEY = ".lora_A.weight", ".lora_B.weight", ".lora_B.start", ".merged_delta"
_KIND_OF = {A_KEY: "A", B_KEY: "B", B_START_KEY: "B_start", MERGED_KEY: "merged"}
_KEY_OF = {kind: suffix for suffix, kind in _KIND_OF.items()}


def split_key(key: str) -> tuple[str, str | None]:
    """``"<layer>.lora_A.weight" -> ("<layer>", "A")``; kinds A, B, B_start, merged; other keys: ``(key, None)``."""
    for suffix, kind in _KIND_OF.items():
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], kind
    return key, None


def adapter_key(layer: str, kind: str) -> str:
    """Inverse of :func:`split_key`: ``adapter_key("fc1", "B") == "fc1.lora_B.weight"``."""
    return layer + _KEY_OF[kind]


@dataclass(frozen=True)
class AdapterLayout:
    """The adapted layers of the global model (in order), their ``(d, k)`` and the rank."""

    layers: tuple[str, ...]
    shapes: dict[str, tuple[int, int]]
    rank: int
    others: tuple[str, ...] = ()

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor]) -> AdapterLayout:
        """Read the layout from a global adapter's arrays; ``ValueError`` if A/B are missing or disagree."""
        parts: dict[str, dict[str, torch.Tensor]] = OrderedDict()
        others = []
        for key, t in tensors.items():
            layer, kind = split_key(key)
            if kind is None:
                others.append(key)
            else:
                parts.setdefault(layer, {})[kind] = t
        if not parts:
            raise ValueError("the global arrays hold no LoRA adapter: expected keys '<layer>.lora_A.weight' and "
                             "'<layer>.lora_B.weight' (peft's get_peft_model_state_dict)")
        shapes, ranks = {}, set()
        for layer, p in parts.items():
            if "A" not in p or "B" not in p:
                raise ValueError(f"layer {layer!r} needs both {adapter_key(layer, 'A')!r} and {adapter_key(layer, 'B')!r}")
            (r, k), (d, r_b) = tuple(p["A"].shape), tuple(p["B"].shape)
            if r != r_b:
                raise ValueError(f"layer {layer!r}: A is {tuple(p['A'].shape)} and B {tuple(p['B'].shape)}; ranks differ")
            shapes[layer] = (d, k)
            ranks.add(r)
        if len(ranks) != 1:
            raise ValueError(f"SFedStrategy needs one rank for all layers (gamma depends on it), got ranks {sorted(ranks)}")
        return cls(tuple(parts), shapes, ranks.pop(), tuple(others))


@dataclass
class ClientOutcome:
    """What became of one sampled node's reply: ``status`` is ok, error, rejected or no-reply."""

    node_id: int
    status: str
    reason: str = ""
    error_code: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class RoundRecord:
    """One round as the strategy saw it (:attr:`SFedStrategy.last_round`).

    ``sampled``/``accepted``: node ids (accepted in sampled order); ``start``: the global arrays
    sent (at ``gamma_sent``); ``aggregated``: the new global arrays at ``gamma_round`` (before the
    adaptive rule's switch to ``gamma_next``); ``A0, B0, A1, B1``: the accepted clients' adapters
    before/after local training, stacked ``(K', ...)`` per layer; ``p``: their weights."""

    server_round: int
    sampled: list[int]
    gamma_sent: float
    outcomes: dict[int, ClientOutcome] = field(default_factory=dict)
    accepted: list[int] = field(default_factory=list)
    gamma_round: float = float("nan")
    gamma_next: float = float("nan")
    p: torch.Tensor | None = None
    start: dict[str, torch.Tensor] = field(default_factory=dict)
    aggregated: dict[str, torch.Tensor] = field(default_factory=dict)
    A0: dict[str, torch.Tensor] = field(default_factory=dict)
    B0: dict[str, torch.Tensor] = field(default_factory=dict)
    A1: dict[str, torch.Tensor] = field(default_factory=dict)
    B1: dict[str, torch.Tensor] = field(default_factory=dict)
    estimate: RhoEstimate | None = None

    @property
    def dropped(self) -> list[int]:
        """Sampled nodes whose reply was not averaged."""
        return [n for n in self.sampled if n not in self.accepted]


class SFedStrategy(FedAvg):
    """FedAvg with the SFed scaling factor: gamma in every train ConfigRecord, scheme-aware aggregation.

    Subclasses may change the sampling (:meth:`sample_train_nodes`) and list the metrics every
    reply must carry (``required_metrics``); the round just aggregated is :attr:`last_round`.

    Parameters
    ----------
    alpha:
        The LoRA alpha of the rule (> 0).
    rule:
        ``"sfed"`` (default, ``alpha*sqrt(K/r)``), ``"sfed-general"``, ``"sfed-adaptive"``, ``"rslora"``, ``"lora"``.
    scheme:
        ``"fedit"`` (default, FedAvg on A and B), ``"ffa"``, ``"fedsa"`` or ``"exact"``.
    rank:
        The adapters' rank; read from the arrays when ``None``.
    n_clients:
        N, all clients (``sfed-general``/``sfed-adaptive`` with K of N sampled); default: the
        number of connected nodes.
    rho:
        ``sfed-general``: the assumed client correlation; ``sfed-adaptive``: the prior.
    client_weights:
        One weight per client (e.g. data sizes) for the gamma of ``sfed-general``/``sfed-adaptive``
        when ``weighted``; default: learned from the replies' ``num-examples`` once all N answered.
    weighted:
        Average by the replies' ``weighted_by_key`` (FedAvg's default) or with equal weights.
    adaptive_ema:
        ``sfed-adaptive``'s smoothing factor across rounds.
    initial_gamma:
        The gamma the initial arrays' B was trained with (default: the first round's gamma).
    **fedavg_kwargs:
        ``fraction_train``, ``min_train_nodes``, ``fraction_evaluate``, ... as for ``FedAvg``.
    """

    required_metrics: tuple[str, ...] = ()

    def __init__(self, *, alpha: float, rule: str = "sfed", scheme: str = "fedit", rank: int | None = None,
                 n_clients: int | None = None, rho: float = 0.0, client_weights: Sequence[float] | None = None,
                 weighted: bool = True, adaptive_ema: float = 0.3, initial_gamma: float | None = None,
                 **fedavg_kwargs: Any) -> None:
        if rule not in STRATEGY_RULES:
            raise ValueError(f"unknown rule {rule!r}; allowed: {', '.join(STRATEGY_RULES)}")
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}; allowed: {', '.join(SCHEMES)}")
        n_check = 1 if n_clients is None else n_clients
        scaling_factor("sfed-general", alpha, rank or 1, n_check, rho=rho)  # checks alpha, rank, N, rho
        if client_weights is not None:
            weights_sum_squares(client_weights, n_clients)
        if rule == ADAPTIVE_RULE:
            AdaptiveScaler(alpha, rank or 1, prior_rho=rho, ema=adaptive_ema)  # checks its arguments now
        super().__init__(**fedavg_kwargs)
        self.alpha, self.rule, self.scheme, self.rank = float(alpha), rule, scheme, rank
        self.n_clients, self.rho, self.weighted, self.adaptive_ema = n_clients, float(rho), bool(weighted), adaptive_ema
        self.client_weights = None if client_weights is None else list(map(float, client_weights))
        self.gamma: float | None = initial_gamma  # the gamma the arrays Strategy.start holds are at
        self.layout: AdapterLayout | None = None
        self.scaler: AdaptiveScaler | None = None
        self.last_round: RoundRecord | None = None
        self._pending: dict[int, RoundRecord] = {}
        self._n_connected = 0
        self._sizes_seen: dict[int, float] = {}

    # --- gamma ------------------------------------------------------------------------------
    def summary(self) -> None:
        """Log the SFed settings, then FedAvg's."""
        log(INFO, "\t├──> SFed settings:")
        log(INFO, "\t│\t├── rule %s, alpha %s, rank %s, scheme %s", self.rule, self.alpha, self.rank, self.scheme)
        log(INFO, "\t│\t└── N %s, rho %s, weighted %s", self.n_clients, self.rho, self.weighted)
        super().summary()

    def _n_total(self, k: int) -> int:
        n = self.n_clients or max(self._n_connected, k)
        if k > n:
            raise ValueError(f"{k} clients in a round but n_clients={n}")
        return n

    def _gamma_weights(self, n: int) -> list[float] | None:
        """Weights of all N clients for the rule's sum p_i^2 (None: equal)."""
        if not self.weighted or self.rule not in ("sfed-general", ADAPTIVE_RULE):
            return None
        if self.client_weights is not None:
            return self.client_weights
        return list(self._sizes_seen.values()) if len(self._sizes_seen) == n else None

    def round_gamma(self, k: int) -> float:
        """gamma for a round that averages ``k`` clients (see the module docstring)."""
        if self.rank is None:
            raise ValueError("the rank is not known yet: pass rank= or call configure_train first")
        n = self._n_total(k)
        w = self._gamma_weights(n)
        if self.rule == ADAPTIVE_RULE:
            return self._adaptive().gamma(n, weights=w, participating=k)
        if self.rule == "sfed-general":
            return scaling_factor("sfed-general", self.alpha, self.rank, n, rho=self.rho, weights=w, participating=k)
        return scaling_factor(self.rule, self.alpha, self.rank, k)

    def _adaptive(self) -> AdaptiveScaler:
        if self.scaler is None:
            self.scaler = AdaptiveScaler(self.alpha, self.rank, prior_rho=self.rho, ema=self.adaptive_ema)
        return self.scaler

    def _at_gamma(self, tensors: dict[str, torch.Tensor], g_old: float, g_new: float) -> dict[str, torch.Tensor]:
        """The same adapter function at ``g_new``: every B times ``g_old / g_new`` (FedSA: B is on the clients)."""
        if g_old == g_new:
            return tensors
        return {k: rescale_for_new_gamma(t, g_old, g_new) if split_key(k)[1] == "B" else t for k, t in tensors.items()}

    # --- configure ----------------------------------------------------------------------------
    def sample_train_nodes(self, server_round: int, grid: Grid) -> list[int]:
        """The nodes that train in ``server_round`` (FedAvg's rule: ``fraction_train``, ``min_train_nodes``)."""
        num_nodes = int(len(list(grid.get_node_ids())) * self.fraction_train)
        node_ids, all_nodes = sample_nodes(grid, self.min_available_nodes, max(num_nodes, self.min_train_nodes))
        self._n_connected = len(all_nodes)
        return node_ids

    def _global_tensors(self, arrays: ArrayRecord) -> dict[str, torch.Tensor]:
        tensors = OrderedDict(arrays.to_torch_state_dict())
        if self.layout is None:
            self.layout = AdapterLayout.of(tensors)
            if self.rank is not None and self.rank != self.layout.rank:
                raise ValueError(f"rank={self.rank} but the arrays' adapters have rank {self.layout.rank}")
            self.rank = self.layout.rank
        if self.scheme == "exact":
            for layer in self.layout.layers:
                ref = tensors[adapter_key(layer, "B")]
                tensors.setdefault(adapter_key(layer, "merged"), ref.new_zeros(self.layout.shapes[layer]))
        return tensors

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Sample nodes, put this round's ``"gamma"`` into the train config, send the adapter at that gamma."""
        if self.fraction_train == 0.0:
            return []
        tensors = self._global_tensors(arrays)
        nodes = list(self.sample_train_nodes(server_round, grid))
        gamma = self.round_gamma(len(nodes))
        if self.gamma is None:
            self.gamma = gamma
        start = tensors if self.scheme == "fedsa" else self._at_gamma(tensors, self.gamma, gamma)
        self._pending[server_round] = RoundRecord(server_round, nodes, gamma, start=start)
        log(INFO, "configure_train: %d nodes, gamma %.6g (%s, %s)", len(nodes), gamma, self.rule, self.scheme)
        config["server-round"] = server_round
        config["gamma"] = float(gamma)
        config["sfed-scheme"] = self.scheme
        record = RecordDict({self.arrayrecord_key: ArrayRecord(self._outgoing(start)), self.configrecord_key: config})
        return self._construct_messages(record, nodes, MessageType.TRAIN)

    def _outgoing(self, tensors: dict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        """What the server sends and returns: FedSA leaves B out (each client holds its own)."""
        if self.scheme != "fedsa":
            return OrderedDict(tensors)
        return OrderedDict((k, t) for k, t in tensors.items() if split_key(k)[1] != "B")

    # --- replies --------------------------------------------------------------------------------
    def _expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Reply array -> shape; FedSA's B and B start only when sent (required by sfed-adaptive)."""
        lay = self.layout
        want: dict[str, tuple[int, ...]] = {}
        for layer, (d, k) in lay.shapes.items():
            want[adapter_key(layer, "A")] = (lay.rank, k)
            want[adapter_key(layer, "B")] = (d, lay.rank)
            if self.scheme == "fedsa":
                want[adapter_key(layer, "B_start")] = (d, lay.rank)
        return want

    def check_arrays(self, arrays: ArrayRecord, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A reply's arrays as tensors, checked: every layer, the right shapes, floating, finite.

        ``reference``: the arrays sent (their non-LoRA keys must come back with the same shapes).
        Raises ``ValueError`` saying what is wrong."""
        try:
            got = OrderedDict(arrays.to_torch_state_dict())
        except Exception as e:  # an undecodable payload
            raise ValueError(f"adapter record could not be decoded: {type(e).__name__}: {e}") from e
        want = self._expected_shapes()
        want.update({k: tuple(reference[k].shape) for k in self.layout.others})
        optional = set()
        if self.scheme == "fedsa" and self.rule != ADAPTIVE_RULE:
            optional = {k for k in want if split_key(k)[1] in ("B", "B_start")}
        missing = sorted(set(want) - set(got) - optional)
        extra = sorted(set(got) - set(want))
        if missing or extra:
            raise ValueError(f"adapter has the wrong arrays: missing {missing}, unexpected {extra}")
        for key, t in got.items():
            if tuple(t.shape) != want[key]:
                raise ValueError(f"adapter of the wrong shape: {key} is {tuple(t.shape)}, expected {want[key]} "
                                 f"(rank {self.layout.rank})")
            if not t.is_floating_point():
                raise ValueError(f"adapter {key} has dtype {t.dtype}, expected a floating point dtype")
            if not torch.isfinite(t).all():
                raise ValueError(f"adapter {key} has non-finite values")
        return got

    def _screen_reply(self, msg: Message, record: RoundRecord) -> tuple[ClientOutcome, dict | None]:
        node = msg.metadata.src_node_id
        if msg.has_error():
            return ClientOutcome(node, "error", (msg.error.reason or "").strip(), msg.error.code), None
        content = msg.content
        metrics = dict(next(iter(content.metric_records.values()))) if content.metric_records else {}
        try:
            if self.arrayrecord_key not in content.array_records:
                raise ValueError(f"reply has no {self.arrayrecord_key!r} ArrayRecord")
            tensors = self.check_arrays(content[self.arrayrecord_key], record.start)
            if self.weighted and self.weighted_by_key not in metrics:
                raise ValueError(f"reply has no {self.weighted_by_key!r} metric to weight it by")
            missing = [k for k in self.required_metrics if k not in metrics]
            if missing:
                raise ValueError(f"reply has no metric(s) {missing}")
        except ValueError as e:
            return ClientOutcome(node, "rejected", str(e), None, metrics), None
        return ClientOutcome(node, "ok", "", None, metrics), tensors

    def _screen(self, record: RoundRecord, replies: list[Message]) -> list[dict[str, torch.Tensor]]:
        """Fill ``record.outcomes``/``accepted``; return the accepted replies' arrays (sampled order)."""
        ok: dict[int, dict] = {}
        for msg in replies:
            node = msg.metadata.src_node_id
            if node not in record.sampled or node in record.outcomes:
                log(WARNING, "round %d: ignored a reply from node %s (not sampled, or a second reply)",
                    record.server_round, node)
                continue
            outcome, tensors = self._screen_reply(msg, record)
            record.outcomes[node] = outcome
            if tensors is not None:
                ok[node] = tensors
        for node in record.sampled:
            if node not in record.outcomes:
                record.outcomes[node] = ClientOutcome(node, "no-reply", f"node {node} sent no reply in round "
                                                                       f"{record.server_round} (timed out or left)")
        for o in record.outcomes.values():
            if o.status != "ok":
                log(WARNING, "round %d: node %s dropped (%s): %s", record.server_round, o.node_id, o.status, o.reason)
            elif self.weighted_by_key in o.metrics:
                self._sizes_seen[o.node_id] = float(o.metrics[self.weighted_by_key])
        record.accepted = [n for n in record.sampled if n in ok]
        return [ok[n] for n in record.accepted]

    # --- aggregate --------------------------------------------------------------------------------
    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop bad replies, aggregate the rest with the scheme, rescale for the round's gamma (see module docstring)."""
        record = self._pending.pop(server_round, None)
        if record is None:
            raise RuntimeError(f"aggregate_train({server_round}) without a configure_train for that round")
        got = self._screen(record, list(replies))
        self.last_round = record
        if not got:
            log(WARNING, "round %d: no client reply could be averaged; the global adapter is unchanged", server_round)
            return None, None
        new = self._aggregate(record, got)
        if self.rule == ADAPTIVE_RULE:
            new = self._adapt(record, new)
        self.gamma = record.gamma_next if self.rule == ADAPTIVE_RULE else record.gamma_round
        return ArrayRecord(self._outgoing(new)), self._train_metrics(record)

    def _weights(self, record: RoundRecord, dtype: torch.dtype) -> torch.Tensor:
        k = len(record.accepted)
        if not self.weighted:
            return torch.as_tensor(np.full(k, 1 / k), dtype=dtype)
        sizes = np.array([float(record.outcomes[n].metrics[self.weighted_by_key]) for n in record.accepted])
        return torch.as_tensor(sizes / sizes.sum(), dtype=dtype)

    def _stack(self, record: RoundRecord, got: list[dict[str, torch.Tensor]]) -> None:
        """The accepted clients' adapters before (A0, B0) and after (A1, B1) training, stacked per layer."""
        k = len(got)
        for layer in self.layout.layers:
            a, b = adapter_key(layer, "A"), adapter_key(layer, "B")
            record.A1[layer] = torch.stack([g[a] for g in got])
            record.A0[layer] = record.start[a].unsqueeze(0).expand(k, *record.start[a].shape).clone()
            if self.scheme != "fedsa":
                record.B1[layer] = torch.stack([g[b] for g in got])
                record.B0[layer] = record.start[b].unsqueeze(0).expand(k, *record.start[b].shape).clone()
            elif all(b in g for g in got):
                record.B1[layer] = torch.stack([g[b] for g in got])
                start = adapter_key(layer, "B_start")
                if all(start in g for g in got):
                    record.B0[layer] = torch.stack([g[start] for g in got])

    def _aggregate(self, record: RoundRecord, got: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Aggregate at ``gamma_sent`` (what the clients trained with), then rescale to ``gamma_round``."""
        start = record.start
        record.p = p = self._weights(record, next(iter(start.values())).dtype)
        record.gamma_round = self.round_gamma(len(got))
        self._stack(record, got)
        new = OrderedDict(start)
        for layer in self.layout.layers:
            keys = [adapter_key(layer, kind) for kind in ("A", "B", "merged")]
            a, b, m = aggregate_layer(self.scheme, *(start.get(k) for k in keys), record.A1[layer],
                                      record.B1.get(layer), p, record.gamma_sent)
            for key, t in zip(keys, (a, b, m)):
                if t is not None:
                    new[key] = t
        for key in self.layout.others:
            new[key] = torch.tensordot(p, torch.stack([g[key] for g in got]), dims=1)
        if self.scheme != "fedsa":
            new = self._at_gamma(new, record.gamma_sent, record.gamma_round)
        record.aggregated = new
        return new

    def _adapt(self, record: RoundRecord, new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """sfed-adaptive: estimate rho from the B increments, smooth it, move to the next round's gamma."""
        if not record.B0:
            raise ValueError("sfed-adaptive with FedSA needs each client's B before and after training: "
                             "clients must send '<layer>.lora_B.weight' and '<layer>.lora_B.start'")
        k = len(record.accepted)
        inc = torch.cat([(record.B1[n] - record.B0[n]).reshape(k, -1) for n in self.layout.layers], dim=1)
        record.estimate = estimate_rho(inc.detach().double().cpu().numpy(), record.p.detach().double().cpu().numpy())
        scaler = self._adaptive()
        scaler.observe(record.estimate)
        n = self._n_total(len(record.sampled))
        record.gamma_next = scaler.gamma(n, weights=self._gamma_weights(n), participating=len(record.sampled))
        if self.scheme == "fedsa":
            return new
        return self._at_gamma(new, record.gamma_round, record.gamma_next)

    def _train_metrics(self, record: RoundRecord) -> MetricRecord:
        """FedAvg's weighted average of the accepted replies' metrics, plus the round's gammas."""
        contents = [RecordDict({"metrics": MetricRecord(record.outcomes[n].metrics)}) for n in record.accepted]
        metrics = MetricRecord()
        if all(self.weighted_by_key in record.outcomes[n].metrics for n in record.accepted):
            try:
                metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
            except (ValueError, TypeError, KeyError) as e:
                log(WARNING, "round %d: client metrics not aggregated: %s", record.server_round, e)
        metrics["gamma"] = float(record.gamma_round)
        metrics["gamma-sent"] = float(record.gamma_sent)
        metrics["n-dropped"] = len(record.dropped)
        if record.estimate is not None:
            metrics["gamma-next"] = float(record.gamma_next)
            metrics["rho-smoothed"] = float(self.scaler.rho_smoothed)
        return metrics
