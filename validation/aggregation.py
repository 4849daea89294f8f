"""Server state and the four aggregation schemes.

All schemes act per adapted layer on the participating clients' final adapters
``A_i: (K, r, k)``, ``B_i: (K, d, r)`` with aggregation weights ``p`` (sum to one):

* ``fedit``: average A and B separately (the product of averages).
* ``fedsa``: FedSA-LoRA, average A; each client keeps its own B (the global B is not used).
* ``ffa``:   FFA-LoRA, A frozen at its init (clients do not train it), average B.
* ``exact``: the average of products ``gamma * sum_i p_i B_i A_i`` is merged into the frozen
  weight; then B is reset to zero and A is kept at its init (clients start every round from
  B = 0, so ``gamma B_i A_i`` is exactly client i's update).

``round_delta`` is the change of the effective weight in the round (what the model gains);
``total_delta`` is the cumulative learned weight change relative to the pretrained weight.
For ``fedsa`` (personalised B) :func:`client_deltas` gives each client's own ``gamma B_i A`` and
the metrics average over clients the squared norms of those (each client's model is what FedSA
deploys); :func:`eval_adapter` uses the weighted mean of the local Bs for the shared eval/probe pass.

Clients of different ranks ``r_i`` (:func:`client_start_hetero`, :func:`aggregate_hetero`, built on
:mod:`validation.hetero_ranks`; :data:`HETERO_SCHEME` names the scheme of each harness scheme). The
server holds width ``R = max r_i`` at its gamma ``g_s``; client i trains at its own ``g_i`` on adapters
of width R whose columns of B / rows of A beyond ``r_i`` are zero (they stay zero in training), and
every move of B between them is function-preserving (``g_i B_i = g_s B_s``):

* ``ffa`` / ``fedit``: zero-padding (HetLoRA). A client downloads the leading ``r_i`` columns of B and
  rows of A; the server averages the moved, padded Bs (``ffa`` keeps its A, ``fedit`` averages the
  padded As, so a row few clients hold shrinks).
* ``exact``: stacking (FLoRA). Clients start from B = 0 and the leading rows of the A init; the exact
  sum ``sum_i p_i g_i B_i A_i`` is added to ``merged``.
* ``svd``: SVD redistribution (FlexLoRA). ``merged`` is the global learned change; a client trains
  on the pretrained weight from the best rank-``r_i`` approximation of ``merged`` (where it has fewer
  than ``r_i`` non-zero singular values, e.g. in round 1, the A init's rows fill the rest, with zero
  B columns); the server's new ``merged`` is the exact sum of the clients' final products.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from collections.abc import Sequence

import torch

from validation.hetero_ranks import download_zero_pad, exact_sum, pad_a, pad_b, svd_download, zero_pad_a, zero_pad_b

__all__ = ["ServerState", "init_state", "client_start", "aggregate", "aggregate_layer", "aggregate_and_deltas",
           "total_delta", "client_deltas", "eval_adapter", "client_start_hetero", "aggregate_hetero",
           "download_hetero_layer", "aggregate_hetero_layer",
           "SCHEME_TRAINS_A", "SCHEMES", "HETERO_SCHEME"]

SCHEME_TRAINS_A = {"fedit": True, "fedsa": True, "ffa": False, "exact": True, "svd": True}
SCHEMES: tuple[str, ...] = ("fedit", "fedsa", "ffa", "exact")  # aggregate_layer's; "svd" needs client ranks
# clients of different ranks: the harness scheme -> sfed_theory.hetero_rules' scheme
HETERO_SCHEME: dict[str, str] = {"ffa": "zero-pad", "fedit": "zero-pad", "exact": "stack", "svd": "svd"}


@dataclass
class ServerState:
    """Global adapters per layer; ``B_local`` (N, d, r) only for fedsa; ``merged`` (d, k) for exact."""

    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    merged: dict[str, torch.Tensor]
    B_local: dict[str, torch.Tensor] | None = None
    client_weights: torch.Tensor = field(default_factory=lambda: torch.ones(1))  # all N clients, sum 1


def init_state(shapes: dict[str, tuple[int, int]], rank: int, n_clients: int, scheme: str, seed: int,
               client_weights: torch.Tensor, dtype: torch.dtype, device: torch.device) -> ServerState:
    """A ~ U(-1/sqrt(k), 1/sqrt(k)) (peft's kaiming_uniform(a=sqrt 5) init), seeded per layer; B = 0."""
    A, B, merged = {}, {}, {}
    for j, (name, (d, k)) in enumerate(shapes.items()):
        g = torch.Generator().manual_seed(seed * 100_003 + j)
        bound = 1.0 / k ** 0.5
        A[name] = ((torch.rand(rank, k, generator=g, dtype=torch.float64) * 2 - 1) * bound).to(dtype).to(device)
        B[name] = torch.zeros(d, rank, dtype=dtype, device=device)
        merged[name] = torch.zeros(d, k, dtype=dtype, device=device)
    B_local = ({n: torch.zeros(n_clients, *B[n].shape, dtype=dtype, device=device) for n in B}
               if scheme == "fedsa" else None)
    return ServerState(A, B, merged, B_local, client_weights.to(device=device, dtype=dtype))


def client_start(state: ServerState, clients: list[int]) -> tuple[dict, dict]:
    """Stacked starting adapters of the participating clients: (K, r, k) and (K, d, r)."""
    K = len(clients)
    A = {n: a.unsqueeze(0).expand(K, *a.shape).clone() for n, a in state.A.items()}
    if state.B_local is not None:
        B = {n: state.B_local[n][clients].clone() for n in state.B}
    else:
        B = {n: b.unsqueeze(0).expand(K, *b.shape).clone() for n, b in state.B.items()}
    return A, B


def _wavg(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return torch.tensordot(p, x, dims=1)


def eval_adapter(state: ServerState) -> tuple[dict, dict]:
    """The single adapter used to evaluate the global model (fedsa: weighted mean of local Bs)."""
    if state.B_local is None:
        return state.A, state.B
    return state.A, {n: _wavg(state.B_local[n], state.client_weights) for n in state.B}


def total_delta(state: ServerState, gamma: float) -> dict[str, torch.Tensor]:
    """Cumulative learned weight change per layer (d, k) relative to the pretrained weight."""
    A, B = eval_adapter(state)
    return {n: state.merged[n] + gamma * B[n] @ A[n] for n in state.A}


def client_deltas(state: ServerState, clients: list[int], gamma: float) -> dict[str, torch.Tensor]:
    """FedSA only: each listed client's own learned change ``gamma B_i A`` per layer, (K, d, k)."""
    if state.B_local is None:
        raise ValueError("client_deltas needs per-client B (scheme 'fedsa')")
    return {n: gamma * torch.matmul(state.B_local[n][clients], state.A[n]) for n in state.A}


def aggregate_layer(scheme: str, A: torch.Tensor, B: torch.Tensor | None, merged: torch.Tensor | None,
                    A_new: torch.Tensor, B_new: torch.Tensor, p: torch.Tensor, gamma: float
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One layer's server-held ``(A, B, merged)`` after a round, from the averaged clients'
    ``A_new: (K, r, k)``, ``B_new: (K, d, r)`` and weights ``p`` (see the module docstring).

    FedSA leaves ``B`` as it is (each client keeps its own B; :func:`aggregate` stores them for
    the harness, a Flower strategy leaves them on the clients). ``gamma`` enters only ``exact``."""
    if scheme == "fedit":
        return _wavg(A_new, p), _wavg(B_new, p), merged
    if scheme == "ffa":
        return A, _wavg(B_new, p), merged
    if scheme == "fedsa":
        return _wavg(A_new, p), B, merged
    if scheme == "exact":
        return A, torch.zeros_like(B), merged + gamma * _wavg(torch.bmm(B_new, A_new), p)
    raise ValueError(f"unknown scheme {scheme!r}; allowed: {', '.join(SCHEMES)}")


def aggregate(scheme: str, state: ServerState, clients: list[int], A_new: dict, B_new: dict, p: torch.Tensor,
              gamma: float) -> tuple[ServerState, dict[str, torch.Tensor]]:
    """Apply one aggregation; returns the new state and each layer's round delta (d, k)."""
    old = total_delta(state, gamma)
    A, B, merged = dict(state.A), dict(state.B), dict(state.merged)
    B_local = None if state.B_local is None else {n: t.clone() for n, t in state.B_local.items()}
    for n in state.A:
        A[n], B[n], merged[n] = aggregate_layer(scheme, A[n], B[n], merged[n], A_new[n], B_new[n], p, gamma)
        if scheme == "fedsa":
            B_local[n][clients] = B_new[n]
    new = ServerState(A, B, merged, B_local, state.client_weights)
    now = total_delta(new, gamma)
    return new, {n: now[n] - old[n] for n in now}


def aggregate_and_deltas(scheme: str, state: ServerState, clients: list[int], A_new: dict, B_new: dict,
                         p: torch.Tensor, gamma: float, *, ranks: Sequence[int] | None = None,
                         client_gammas: Sequence[float] | None = None) -> tuple[ServerState, dict, dict]:
    """:func:`aggregate`, plus what the metrics measure: the round's change of the effective weight and
    the cumulative learned change, each (d, k), or for FedSA each averaged client's own, (K, d, k).
    With ``ranks`` (and ``client_gammas``; ``gamma`` is the server's): :func:`aggregate_hetero`."""
    if ranks is not None:
        new, round_delta = aggregate_hetero(scheme, state, ranks, A_new, B_new, p, client_gammas, gamma)
        return new, round_delta, total_delta(new, gamma)
    if scheme != "fedsa":
        new, round_delta = aggregate(scheme, state, clients, A_new, B_new, p, gamma)
        return new, round_delta, total_delta(new, gamma)
    old = client_deltas(state, clients, gamma)
    new, _ = aggregate(scheme, state, clients, A_new, B_new, p, gamma)
    now = client_deltas(new, clients, gamma)
    return new, {n: now[n] - old[n] for n in now}, now


# --- clients of different ranks ------------------------------------------------------------------------------
def _check_hetero(scheme: str) -> None:
    if scheme not in HETERO_SCHEME:
        raise ValueError(f"scheme {scheme!r} has no heterogeneous-rank form; allowed: {', '.join(HETERO_SCHEME)}")


def download_hetero_layer(scheme: str, A: torch.Tensor, B: torch.Tensor, merged: torch.Tensor | None, rank: int,
                          gamma: float, server_gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's starting factors ``(r, k)``, ``(d, r)`` of a rank-``rank`` client at ``gamma`` from the
    server's ``A: (R, k)``, ``B: (d, R)`` at ``server_gamma`` and ``merged`` (see the module docstring)."""
    _check_hetero(scheme)
    if HETERO_SCHEME[scheme] == "zero-pad":
        b, a = download_zero_pad(B, A, rank, server_gamma, gamma)
        return a, b
    if scheme == "exact":
        return A[:rank], B.new_zeros(B.shape[0], rank)
    b, a = svd_download(merged, A, rank, gamma)
    return a, b


def aggregate_hetero_layer(scheme: str, A: torch.Tensor, B: torch.Tensor, merged: torch.Tensor | None,
                           as_: Sequence[torch.Tensor], bs: Sequence[torch.Tensor], p: torch.Tensor,
                           gammas: Sequence[float], server_gamma: float
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One layer's server-held ``(A, B, merged)`` (width R, at ``server_gamma``) after a round, from the
    averaged clients' own factors ``as_[i]: (r_i, k)``, ``bs[i]: (d, r_i)`` trained at ``gammas``."""
    _check_hetero(scheme)
    w, width = p.detach().double().cpu(), A.shape[0]
    if HETERO_SCHEME[scheme] == "zero-pad":
        a_new = pad_a(zero_pad_a(as_, w), width) if scheme == "fedit" else A
        return a_new, pad_b(zero_pad_b(bs, w, gammas, server_gamma), width), merged
    total = exact_sum(bs, as_, w, gammas)
    return A, torch.zeros_like(B), merged + total if scheme == "exact" else total


def client_start_hetero(scheme: str, state: ServerState, ranks: Sequence[int], gammas: Sequence[float],
                        server_gamma: float) -> tuple[dict, dict, dict]:
    """Starting adapters of the averaged clients of ranks ``ranks`` at their ``gammas``, padded to the
    server's width R: ``(K, R, k)``, ``(K, d, R)``; and the learned change their frozen weights carry
    (``merged``; zero under ``svd``, whose clients hold the global change in their adapters)."""
    _check_hetero(scheme)
    A, B, base = {}, {}, {}
    for n, a_srv in state.A.items():
        width = a_srv.shape[0]
        pairs = [download_hetero_layer(scheme, a_srv, state.B[n], state.merged[n], r, g, server_gamma)
                 for r, g in zip(ranks, gammas)]
        A[n] = torch.stack([pad_a(a, width) for a, _ in pairs])
        B[n] = torch.stack([pad_b(b, width) for _, b in pairs])
        base[n] = torch.zeros_like(state.merged[n]) if scheme == "svd" else state.merged[n]
    return A, B, base


def aggregate_hetero(scheme: str, state: ServerState, ranks: Sequence[int], A_new: dict, B_new: dict,
                     p: torch.Tensor, gammas: Sequence[float], server_gamma: float
                     ) -> tuple[ServerState, dict[str, torch.Tensor]]:
    """The server's state after a round of clients of ranks ``ranks`` (adapters ``(K, R, k)``,
    ``(K, d, R)`` trained at ``gammas``; see the module docstring), and each layer's round delta."""
    _check_hetero(scheme)
    old = total_delta(state, server_gamma)
    A, B, merged = dict(state.A), dict(state.B), dict(state.merged)
    for n in state.A:
        as_ = [A_new[n][i][:r] for i, r in enumerate(ranks)]
        bs = [B_new[n][i][:, :r] for i, r in enumerate(ranks)]
        A[n], B[n], merged[n] = aggregate_hetero_layer(scheme, A[n], B[n], merged[n], as_, bs, p, gammas, server_gamma)
    new = ServerState(A, B, merged, None, state.client_weights)
    now = total_delta(new, server_gamma)
    return new, {n: now[n] - old[n] for n in now}
