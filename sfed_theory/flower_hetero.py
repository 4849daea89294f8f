"""SFedHeteroStrategy: :class:`sfed_theory.flower.SFedStrategy` for Flower clients of different LoRA ranks.

A ServerApp whose clients fine-tune peft LoRA models of different ranks (issue 13)::

    strategy = SFedHeteroStrategy(alpha=16, rule="sfed-hetero", scheme="ffa")
    strategy.start(grid, ArrayRecord(adapter_state_dict_at_the_largest_rank), num_rounds=10)

The server holds the adapter at the largest rank R (the arrays ``Strategy.start`` is given) and its own
gamma. It overrides the hooks of SFedStrategy that differ:

* ``configure_train``: the sampled nodes' ranks (``node_ranks``, or learned from an earlier reply; a node
  not heard from yet is taken to have rank R) give each node its gamma
  (:func:`sfed_theory.client_scaling_factors` with the rule, the scheme, rho and, once every sampled
  node's ``"num-examples"`` is known, their data-size weights). Each node gets its own message: its
  rank's share of the server's adapter (:func:`validation.aggregation.download_hetero_layer`:
  zero-padding's leading columns of B, moved to its gamma, and rows of A; stacking's B = 0 and A's
  leading rows; SVD redistribution's best rank-r approximation of the global change) and, in the train
  ConfigRecord, ``"gamma"``, ``"sfed-rank"``, ``"sfed-scheme"`` and ``"sfed-server-gamma"``.
* replies: each carries its rank as the metric ``"rank"`` (its arrays must have that rank, at most R)
  and may carry ``"gamma"``, the gamma it trained with (default: the one sent to it). Bad replies are
  dropped one by one as in SFedStrategy (a missing or wrong ``"rank"`` is one more reason).
* ``_aggregate``: :func:`validation.aggregation.aggregate_hetero_layer`, so each accepted client enters
  the server's model as ``p_i gamma_i B_i A_i`` whatever the gammas; the node's rank is remembered.

Schemes: ``ffa`` (zero-padding, A frozen), ``fedit`` (zero-padding, padded As averaged), ``exact``
(stacking: the exact sum is added to ``<layer>.merged_delta``, which clients add to their frozen weight),
``svd`` (FlexLoRA: ``merged_delta`` is the global change; clients train on the pretrained weight from its
truncation and are sent no ``merged_delta``). A client whose rank the server did not know yet receives
R-wide arrays; :func:`cut_to_rank` (which :func:`sfed_theory.flower_client.load_adapter` applies) keeps
their leading columns of B and rows of A, and the reply's ``"gamma"`` tells the server what it trained at.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from logging import INFO
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from sfed_theory.flower import ClientOutcome, RoundRecord, SFedStrategy, adapter_key, split_key
from sfed_theory.hetero_rules import HETERO_RULES, ClientScaling, client_scaling_factors
from validation.aggregation import (HETERO_SCHEME, SCHEME_TRAINS_A, aggregate_hetero_layer,
                                    download_hetero_layer)
from validation.hetero_ranks import pad_a, pad_b

__all__ = ["SFedHeteroStrategy", "cut_to_rank", "adapter_rank"]


def adapter_rank(tensors: Mapping[str, torch.Tensor]) -> int:
    """The rank of an adapter's arrays (rows of its first ``lora_A``); ``ValueError`` if it has none."""
    for key, t in tensors.items():
        if split_key(key)[1] == "A" and t.dim() == 2:
            return int(t.shape[0])
    raise ValueError("the arrays hold no '<layer>.lora_A.weight' of two dimensions")


def cut_to_rank(tensors: Mapping[str, torch.Tensor], rank: int) -> OrderedDict[str, torch.Tensor]:
    """The leading ``rank`` rows of every A and columns of every B (zero-padding's download); other arrays
    unchanged. Arrays of rank ``rank`` or less are returned as they are."""
    out = OrderedDict()
    for key, t in tensors.items():
        kind = split_key(key)[1]
        out[key] = t[:rank] if kind == "A" else t[:, :rank] if kind in ("B", "B_start") else t
    return out


class SFedHeteroStrategy(SFedStrategy):
    """SFedStrategy for clients of different ranks (module docstring): per-node gamma and share of the adapter.

    Parameters
    ----------
    alpha:
        The LoRA alpha of the rule (> 0).
    rule:
        ``"sfed-hetero"`` (default), ``"sfed-hetero-shared"``, ``"sfed"``, ``"sfed-general"``, ``"rslora"``
        or ``"lora"``, each as :func:`sfed_theory.client_scaling_factors` defines it.
    scheme:
        ``"ffa"`` (default), ``"fedit"``, ``"exact"`` or ``"svd"``.
    node_ranks:
        ``{node id: rank}`` known in advance; others are learned from the replies' ``"rank"``.
    rank:
        The server's width R; read from the arrays when ``None``.
    rho:
        The client correlation the rule (and the predicted size) assumes.
    **kwargs:
        ``weighted``, ``initial_gamma`` and FedAvg's arguments, as for :class:`SFedStrategy`.
    """

    required_metrics = ("rank",)

    def __init__(self, *, alpha: float, rule: str = "sfed-hetero", scheme: str = "ffa",
                 node_ranks: Mapping[int, int] | None = None, rank: int | None = None, rho: float = 0.0,
                 **kwargs: Any) -> None:
        if rule not in HETERO_RULES:
            raise ValueError(f"unknown rule {rule!r} for clients of different ranks; allowed: {', '.join(HETERO_RULES)}")
        if scheme not in HETERO_SCHEME:
            raise ValueError(f"unknown scheme {scheme!r} for clients of different ranks; allowed: "
                             f"{', '.join(HETERO_SCHEME)}")
        # SFedStrategy checks alpha, rank and rho and sets up its state; rule and scheme are then this class's
        super().__init__(alpha=alpha, rule="sfed", scheme="ffa", rank=rank, rho=rho, **kwargs)
        self.rule, self.scheme = rule, scheme
        self.node_ranks = {int(n): int(r) for n, r in (node_ranks or {}).items()}
        if any(r < 1 for r in self.node_ranks.values()):
            raise ValueError(f"every node rank must be an integer >= 1, got {self.node_ranks}")
        self.last_clients: dict[int, tuple[int, float]] = {}  # node -> (rank, gamma) of the last round averaged
        self._sent: dict[int, dict[int, tuple[int, float]]] = {}

    # --- gammas -------------------------------------------------------------------------------
    def round_scaling(self, nodes: list[int]) -> ClientScaling:
        """The gammas of a round of ``nodes`` (their known ranks; R for a node not heard from yet)."""
        ranks = [self.node_ranks.get(n, self.rank) for n in nodes]
        if max(ranks) > self.rank:
            raise ValueError(f"node ranks {ranks} exceed the server's width R={self.rank}")
        sizes = [self._sizes_seen.get(n) for n in nodes]
        w = sizes if self.weighted and None not in sizes else None
        return client_scaling_factors(self.rule, self.alpha, ranks, scheme=HETERO_SCHEME[self.scheme], weights=w,
                                      rho=self.rho, train_a=SCHEME_TRAINS_A[self.scheme])

    def round_gamma(self, k: int) -> float:
        """Not defined here: each node has its own gamma (:meth:`round_scaling`)."""
        raise NotImplementedError("SFedHeteroStrategy gives each node its own gamma: use round_scaling(nodes)")

    # --- configure ----------------------------------------------------------------------------
    def _global_tensors(self, arrays: ArrayRecord) -> dict[str, torch.Tensor]:
        tensors = super()._global_tensors(arrays)
        if self.scheme in ("exact", "svd"):
            for layer in self.layout.layers:
                ref = tensors[adapter_key(layer, "B")]
                tensors.setdefault(adapter_key(layer, "merged"), ref.new_zeros(self.layout.shapes[layer]))
        return tensors

    def _download(self, server: dict[str, torch.Tensor], rank: int, gamma: float,
                  server_gamma: float) -> OrderedDict[str, torch.Tensor]:
        """A rank-``rank`` node's arrays at ``gamma`` from the server's (at ``server_gamma``)."""
        out = OrderedDict()
        for layer in self.layout.layers:
            ka, kb, km = (adapter_key(layer, kind) for kind in ("A", "B", "merged"))
            out[ka], out[kb] = download_hetero_layer(self.scheme, server[ka], server[kb], server.get(km), rank,
                                                     gamma, server_gamma)
            if self.scheme == "exact":
                out[km] = server[km]
        out.update((k, server[k]) for k in self.layout.others)
        return out

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Sample nodes; send each its rank's share of the adapter and its ``"gamma"`` (module docstring)."""
        if self.fraction_train == 0.0:
            return []
        tensors = self._global_tensors(arrays)
        nodes = list(self.sample_train_nodes(server_round, grid))
        scal = self.round_scaling(nodes)
        if self.gamma is None:
            self.gamma = scal.server
        server = self._at_gamma(tensors, self.gamma, scal.server)
        self._pending[server_round] = RoundRecord(server_round, nodes, scal.server, start=server)
        self._sent[server_round] = {n: (r, g) for n, r, g in zip(nodes, scal.ranks, scal.clients)}
        log(INFO, "configure_train: %d nodes, ranks %s, gammas %s, server gamma %.6g (%s, %s)", len(nodes),
            list(scal.ranks), [round(g, 6) for g in scal.clients], scal.server, self.rule, self.scheme)
        messages: list[Message] = []
        for node, r, g in zip(nodes, scal.ranks, scal.clients):
            conf = ConfigRecord(dict(config))
            conf.update({"server-round": server_round, "gamma": float(g), "sfed-rank": int(r),
                         "sfed-scheme": self.scheme, "sfed-server-gamma": float(scal.server)})
            record = RecordDict({self.arrayrecord_key: ArrayRecord(self._download(server, r, g, scal.server)),
                                 self.configrecord_key: conf})
            messages.extend(self._construct_messages(record, [node], MessageType.TRAIN))
        return messages

    # --- replies ------------------------------------------------------------------------------
    def check_arrays(self, arrays: ArrayRecord, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """SFedStrategy's checks at the reply's own rank (1 to R)."""
        try:
            rank = adapter_rank(arrays.to_torch_state_dict())
        except Exception as e:  # undecodable, or no A
            raise ValueError(f"adapter record could not be read: {type(e).__name__}: {e}") from e
        if not 1 <= rank <= self.layout.rank:
            raise ValueError(f"adapter of rank {rank}; ranks 1 to the server's width {self.layout.rank} are allowed")
        self._reply_rank = rank
        return super().check_arrays(arrays, reference)

    def _expected_shapes(self) -> dict[str, tuple[int, ...]]:
        r = self._reply_rank
        want: dict[str, tuple[int, ...]] = {}
        for layer, (d, k) in self.layout.shapes.items():
            want[adapter_key(layer, "A")], want[adapter_key(layer, "B")] = (r, k), (d, r)
        return want

    def _screen_reply(self, msg: Message, record: RoundRecord) -> tuple[ClientOutcome, dict | None]:
        outcome, tensors = super()._screen_reply(msg, record)
        if tensors is not None and int(outcome.metrics["rank"]) != adapter_rank(tensors):
            reason = f"reply says rank {outcome.metrics['rank']} but its adapter has rank {adapter_rank(tensors)}"
            return ClientOutcome(outcome.node_id, "rejected", reason, None, outcome.metrics), None
        return outcome, tensors

    # --- aggregate ----------------------------------------------------------------------------
    def _aggregate(self, record: RoundRecord, got: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Each accepted reply enters as ``p_i gamma_i B_i A_i``; the server stays at the round's gamma."""
        start, sent = record.start, self._sent.pop(record.server_round, {})
        record.p = p = self._weights(record, next(iter(start.values())).dtype)
        record.gamma_round = record.gamma_sent
        ranks = [adapter_rank(g) for g in got]
        gammas = [float(record.outcomes[n].metrics.get("gamma", sent[n][1])) for n in record.accepted]
        self.last_clients = dict(zip(record.accepted, zip(ranks, gammas)))
        self.node_ranks.update(zip(record.accepted, ranks))
        new, width = OrderedDict(start), self.layout.rank
        for layer in self.layout.layers:
            ka, kb, km = (adapter_key(layer, kind) for kind in ("A", "B", "merged"))
            as_, bs = [g[ka] for g in got], [g[kb] for g in got]
            a, b, m = aggregate_hetero_layer(self.scheme, start[ka], start[kb], start.get(km), as_, bs, p, gammas,
                                             record.gamma_sent)
            new[ka], new[kb] = a, b
            if m is not None:
                new[km] = m
            record.A1[layer] = torch.stack([pad_a(x, width) for x in as_])
            record.B1[layer] = torch.stack([pad_b(x, width) for x in bs])
        for key in self.layout.others:
            new[key] = torch.tensordot(p, torch.stack([g[key] for g in got]), dims=1)
        record.aggregated = new
        return new
