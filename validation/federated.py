"""One federated LoRA run: config in, tidy rows out (one per round x layer, plus ``__all__``).

Round t: sample K of N clients (seeded); measure gradients of the probe loss at the starting
global adapter; every participating client starts from the global adapter (FedSA: its own B),
runs ``local_steps`` steps of SGD/AdamW with a FRESH optimizer (no state kept across rounds) on
its own data; the server aggregates (:mod:`validation.aggregation`) with equal weights or weights
proportional to client data size; then the update norm, adapter output RMS, client correlation
and eval loss/accuracy are measured. gamma comes from the rule with ``n_clients = K`` (the number
of clients averaged per round); for ``sfed-general`` also rho, the data-size weights and K of N.
A non-finite loss stops the run; its rows are returned with ``diverged=True``.

``sfed-adaptive`` (harness-only rule). Round 1 uses ``gamma = alpha*sqrt(N_eff(prior)/r)`` with the
prior ``cfg.rho`` (default 0: SFed's ``alpha*sqrt(K/r)``). After each round the server estimates
rho from the participating clients' *B* increments of all adapted layers concatenated
(:func:`validation.adaptive.estimate_rho`, "ratio" method: its plug-in N_eff is exactly the measured
shrinkage ``mean ||x_i||^2 / ||mean x_i||^2`` of the aggregate, the quantity gamma must undo; B only,
because B is what every scheme aggregates and A is frozen under FFA), folds it into
:class:`~validation.adaptive.AdaptiveScaler` (EMA ``cfg.adaptive_ema`` times a reliability factor from
the jackknife standard error; a round with one usable client leaves the state unchanged), and sets
``gamma_next = alpha*sqrt(N_eff(rho_smoothed)/r)`` via ``backend.set_gamma``. The server's B is
rescaled by ``gamma/gamma_next`` (:func:`apply_gamma_change`) so ``gamma*B@A`` and hence the merged
model function do not jump. Rows record ``gamma`` (used in the round), ``gamma_next``, ``rho_est_raw``,
``rho_est_se``, ``rho_est_smoothed``, ``n_eff_est`` (this round's plug-in) and ``n_eff_smoothed`` (the
N_eff behind ``gamma_next``); all NaN for the fixed rules.

Clients of different ranks (``cfg.client_ranks``). Each round the gammas come from
:func:`sfed_theory.client_scaling_factors` over the averaged clients' ranks (N = K, the aggregation
weights, ``cfg.rho``): the server's adapter moves to the new server gamma without changing its function
(:func:`apply_gamma_change`), every client trains at its own gamma (``backend.set_client_gammas``) from
its rank's share of the server's adapter, and the server aggregates with
:func:`validation.aggregation.aggregate_hetero`. Rows add ``client_ranks``, ``gamma_clients`` (the
averaged clients' gammas, in their order), ``size_pred`` (the predicted size of the aggregate relative to
one rank-1 client at ``gamma = alpha``, :class:`sfed_theory.ClientScaling`) and ``gamma`` is the
server's gamma of the round.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

import sfed_theory
from validation.aggregation import (HETERO_SCHEME, SCHEME_TRAINS_A, ServerState, aggregate_and_deltas, client_start,
                                   client_start_hetero, eval_adapter, init_state)
from validation.backends import Divergence, make_backend
from validation.adaptive import AdaptiveScaler, estimate_rho, rescale_for_new_gamma
from validation.config import ADAPTIVE_RULE, RunConfig
from validation.data import partition
from validation.line_probe import probe_line
from validation.metrics import ALL, LayerRound, combine_layers, layer_metrics
from validation.probe_inputs import mean_coherent_shares, mean_share_along, top_direction, top_share
from validation.response_shape import gradient_input_shape, response_shape
from validation.models import Task, build_task

__all__ = ["run", "resolve_device", "gamma_for", "config_columns", "apply_gamma_change", "eval_indices",
           "sample_clients", "measure_round", "probe_point", "ProbePoint", "client_batches", "client_batch_indices",
           "client_parts", "split_labels", "client_scaling",
           "MEASURED_COLUMNS", "ADAPTIVE_COLUMNS", "HETERO_COLUMNS"]

# every measured column of a row (a run that diverges in round 1 still gets them, as NaN)
MEASURED_COLUMNS: tuple[str, ...] = (
    "clients", "train_loss", "train_acc", "probe_loss_start", "probe_loss_end", "eval_loss", "eval_acc", "train_s",
    "grad_A", "grad_B", "grad_A_end", "grad_B_end", "update_fro", "adapter_rms", "agg_error", "loss_change", "curvature", "rho_hat", "n_eff_hat",
    "rho_ratio", "n_eff_ratio", "rho_out", "rho_gA", "rho_gB", "inc_A_rms", "inc_B_rms", "inc_B_coherent", "inc_B_coherent_probe",
    "probe_top_share", "response_top_input", "response_alignment", "grad_rank1", "grad_input_share", "grad_spike_cos",
    "inc_B_coherent_grad",
    "d_out", "k_in")
# the adaptive rule's per-round record (NaN for the fixed rules; see module docstring)
ADAPTIVE_COLUMNS: tuple[str, ...] = ("gamma_next", "rho_est_raw", "rho_est_se", "rho_est_smoothed", "n_eff_est",
                                      "n_eff_smoothed")
# the rows of a run with client ranks add (see module docstring)
HETERO_COLUMNS: tuple[str, ...] = ("gamma_clients", "size_pred")


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' requested but CUDA is not available")
    return torch.device(device)


def gamma_for(cfg: RunConfig, client_sizes: np.ndarray | None = None, k: int | None = None) -> float:
    """The rule's scaling factor for this run (see module docstring for N).

    ``k``: clients averaged in the round (default ``cfg.k``; the Flower app passes the number that
    actually answered). ``sfed-adaptive``: the first round's gamma, i.e. sfed-general at the prior
    ``cfg.rho``. With client ranks: the server's gamma of round 1 (:func:`client_scaling`)."""
    if cfg.client_ranks is not None:
        return client_scaling(cfg, sample_clients(cfg, 1), client_sizes).server
    k = cfg.k if k is None else int(k)
    if cfg.rule in ("sfed-general", ADAPTIVE_RULE):
        w = client_sizes if (cfg.weighted and client_sizes is not None) else None
        return sfed_theory.scaling_factor("sfed-general", cfg.alpha, cfg.rank, cfg.n_clients, rho=cfg.rho,
                                          weights=w, participating=k)
    return sfed_theory.scaling_factor(cfg.rule, cfg.alpha, cfg.rank, k)


def client_scaling(cfg: RunConfig, clients: list[int],
                   client_sizes: np.ndarray | None = None) -> sfed_theory.ClientScaling | None:
    """The gammas of a round that averages ``clients`` when they train different ranks (``None`` without
    ``cfg.client_ranks``): the rule over their ranks, weighted by their data sizes when ``cfg.weighted``."""
    if cfg.client_ranks is None:
        return None
    w = client_sizes[clients] if (cfg.weighted and client_sizes is not None) else None
    return sfed_theory.client_scaling_factors(cfg.rule, cfg.alpha, [cfg.client_ranks[c] for c in clients],
                                              scheme=HETERO_SCHEME[cfg.scheme], weights=w, rho=cfg.rho,
                                              train_a=SCHEME_TRAINS_A[cfg.scheme])


def sample_clients(cfg: RunConfig, rnd: int) -> list[int]:
    """The K clients of round ``rnd`` (sorted): all N, or a seeded draw ``rng([seed, rnd, 9])``."""
    if cfg.k < cfg.n_clients:
        return sorted(np.random.default_rng([cfg.seed, rnd, 9]).choice(cfg.n_clients, cfg.k, replace=False).tolist())
    return list(range(cfg.n_clients))


@dataclass
class ProbePoint:
    """The probe batch at the adapter where the theory takes its gradients (see :mod:`validation.metrics`).

    ``loss``/``acc`` and ``grad_W`` are those of the shared (evaluated) adapter; ``grad_A``/``grad_B``
    (and the captured ``inputs``) are at the theory's point: the shared adapter, or for FedSA each
    participating client's own ``(B_c, Abar)``, stacked ``(K, ...)``."""

    loss: float
    acc: float
    grad_A: dict[str, torch.Tensor]
    grad_B: dict[str, torch.Tensor]
    grad_W: dict[str, torch.Tensor] | None
    inputs: dict[str, torch.Tensor] | None
    per_client: bool = False

    def select(self, positions: list[int]) -> ProbePoint:
        """The point restricted to the clients at ``positions`` (a no-op unless per client)."""
        if not self.per_client:
            return self
        idx = torch.as_tensor(positions, dtype=torch.long)
        pick = lambda d: None if d is None else {n: t[idx] for n, t in d.items()}  # noqa: E731
        return ProbePoint(self.loss, self.acc, pick(self.grad_A), pick(self.grad_B), self.grad_W, pick(self.inputs),
                          True)


def probe_point(backend, state: ServerState, clients: list[int], probe_in: dict, probe_y: torch.Tensor, *,
                capture: bool = False) -> ProbePoint:
    """Probe ``state`` (after ``backend.set_base_delta(state.merged)``) at the theory's point."""
    shared = backend.probe(*eval_adapter(state), probe_in, probe_y, grads=True, capture=capture)
    if state.B_local is None:
        return ProbePoint(shared.loss, shared.acc, shared.grad_A, shared.grad_B, shared.grad_W, shared.inputs)
    own = [backend.probe(state.A, {n: b[c] for n, b in state.B_local.items()}, probe_in, probe_y, grads=True,
                         capture=capture) for c in clients]
    stack = lambda key: {n: torch.stack([getattr(o, key)[n] for o in own]) for n in state.A}  # noqa: E731
    return ProbePoint(shared.loss, shared.acc, stack("grad_A"), stack("grad_B"), shared.grad_W,
                      stack("inputs") if capture else None, True)


def measure_round(targets: tuple[str, ...], shapes: dict[str, tuple[int, int]], start: ProbePoint, end: ProbePoint,
                  round_delta: dict[str, torch.Tensor], total: dict[str, torch.Tensor], A0: dict, B0: dict,
                  A1: dict, B1: dict, train_A: bool, p: torch.Tensor, gamma: float) -> list[dict]:
    """One round's measurement rows: one per adapted layer, then ``__all__`` (see :mod:`metrics`).

    ``start``/``end``: the probe before/after the round (both with captured inputs and ``grad_W``);
    ``A0``/``B0``/``A1``/``B1``: the averaged clients' adapters before/after local training,
    stacked (K, ...); ``p``: their aggregation weights; ``gamma``: the round's scaling factor, or one
    per client (heterogeneous ranks)."""
    per_client = next(iter(total.values())).dim() == 3  # FedSA: every client keeps its own model
    layer_rows, grams, sq = [], [], {"A": [0.0, 0], "B": [0.0, 0]}
    for n in targets:
        lr = LayerRound(start.grad_A[n], start.grad_B[n], end.grad_A[n], end.grad_B[n], start.grad_W[n], end.grad_W[n],
                        round_delta[n], total[n], end.inputs[n], A0[n], B0[n], A1[n], B1[n], p, gamma,
                        train_A, per_client)
        m, g = layer_metrics(n, lr)
        m["d_out"], m["k_in"] = shapes[n]
        x0 = start.inputs[n][0] if start.per_client else start.inputs[n]  # round 1: the same at every client
        m["probe_top_share"] = top_share(x0)  # the probe's input spike, the refined model's nu (probe_inputs)
        top = top_direction(x0)  # one decomposition of the tokens' second moment for the three measurements below
        # the B increments' share along A x_top: the refined model's f_in, measured (ranks alike only)
        m["inc_B_coherent"], m["inc_B_coherent_probe"] = (  # along A x_top; over the probe's whole spectrum
            mean_coherent_shares(B1[n] - B0[n], A0[n], x0, top=top) if isinstance(gamma, float)
            else (float("nan"),) * 2)
        # the probe gradient's response to the shared update, against the refined model's lam dW C
        m["response_top_input"], m["response_alignment"] = (
            response_shape(end.grad_W[n] - start.grad_W[n], round_delta[n], A0[n][0], x0, top=top)
            if isinstance(gamma, float) and not per_client else (float("nan"),) * 2)
        # the probe gradient's own input direction x_g, which the model takes to be the tokens' spike
        shape = gradient_input_shape(start.grad_W[n], x0, top=top)
        m["grad_rank1"], m["grad_input_share"], m["grad_spike_cos"] = shape.rank1, shape.input_share, shape.spike_cos
        m["inc_B_coherent_grad"] = (mean_share_along(B1[n] - B0[n], A0[n], shape.direction)
                                    if isinstance(gamma, float) else float("nan"))
        for f, dx in (("A", A1[n] - A0[n]), ("B", B1[n] - B0[n])):  # raw increment scale, for predict's s_B
            m[f"inc_{f}_rms"] = float(dx.pow(2).mean().sqrt())
            sq[f][0] += float(dx.pow(2).sum())
            sq[f][1] += dx.numel()
        layer_rows.append(m)
        grams.append(g)
    allrow = combine_layers(layer_rows, grams, p)
    for f in ("A", "B"):
        allrow[f"inc_{f}_rms"] = math.sqrt(sq[f][0] / sq[f][1])
    allrow["probe_top_share"] = float(np.mean([m["probe_top_share"] for m in layer_rows]))  # layers alike
    for col in ("inc_B_coherent", "inc_B_coherent_probe", "response_top_input", "response_alignment", "grad_rank1",
                "grad_input_share", "grad_spike_cos", "inc_B_coherent_grad"):
        coherent = [m[col] for m in layer_rows if math.isfinite(m[col])]
        allrow[col] = float(np.mean(coherent)) if coherent else float("nan")
    sh = set(shapes.values())
    allrow["d_out"], allrow["k_in"] = sh.pop() if len(sh) == 1 else (-1, -1)
    return layer_rows + [allrow]


def apply_gamma_change(state: ServerState, backend, g_old: float, g_new: float) -> ServerState:
    """Switch the run to ``g_new`` without changing the merged model function.

    Every B that enters the model with the factor gamma is multiplied by ``g_old / g_new``
    (:func:`validation.adaptive.rescale_for_new_gamma`): the global B (FFA, FedIT; under exact
    aggregation it is zero, so nothing changes: the learned update already sits in ``merged``) and,
    for FedSA, every client's local B (all N, sampled or not). A is untouched, ``merged`` is
    gamma-free. Local optimizers are fresh each round, so there is no optimizer state to rescale.
    Returns the new state; the backend's gamma is set to ``g_new``.
    """
    if g_new != g_old:
        B = {n: rescale_for_new_gamma(b, g_old, g_new) for n, b in state.B.items()}
        B_local = (None if state.B_local is None
                   else {n: rescale_for_new_gamma(b, g_old, g_new) for n, b in state.B_local.items()})
        state = ServerState(state.A, B, state.merged, B_local, state.client_weights)
    backend.set_gamma(g_new)
    return state


def eval_indices(n_eval: int, eval_size: int) -> torch.Tensor:
    """The held-out examples a run evaluates on: ``min(eval_size, n_eval)`` of them, drawn by a fixed
    permutation (the same subset for every run and seed of a task, so runs are comparable).

    Not the first ``eval_size``: the eval split keeps the data set's order, and a data set stored
    sorted by label (BBC News is) would be evaluated on one class only."""
    if eval_size >= n_eval:
        return torch.arange(n_eval)
    perm = np.random.default_rng([n_eval, 11]).permutation(n_eval)[:eval_size]
    return torch.as_tensor(np.sort(perm))


def config_columns(cfg: RunConfig) -> dict:
    """The config as flat row columns (lists joined to strings so Parquet columns stay scalar)."""
    d = cfg.to_dict()
    d["target_modules"] = ",".join(cfg.target_modules) if cfg.target_modules else ""
    d["participating"] = cfg.k
    if cfg.line_scales is None:
        del d["line_scales"]
    else:
        d["line_scales"] = ",".join(map(repr, map(float, cfg.line_scales)))
    if cfg.client_ranks is None:
        del d["client_ranks"]  # rows of runs without client ranks keep their columns
    else:
        d["client_ranks"] = ",".join(map(str, cfg.client_ranks))
    return d


def client_batch_indices(cfg: RunConfig, parts: list[np.ndarray], clients: list[int], rnd: int) -> list[list[np.ndarray]]:
    """``idx[i][t]``: the training-example indices of client clients[i]'s batch at local step t of round
    ``rnd``, seeded by (seed, round, client)."""
    idx = []
    for c in clients:
        rng = np.random.default_rng([cfg.seed, rnd, c, 1])
        n = len(parts[c])
        idx.append([parts[c][rng.choice(n, cfg.batch_size, replace=n < cfg.batch_size)] for _ in range(cfg.local_steps)])
    return idx


def client_batches(cfg: RunConfig, task: Task, parts: list[np.ndarray], clients: list[int], rnd: int,
             device: torch.device) -> list[list[tuple[dict, torch.Tensor]]]:
    """``out[t][i]``: step t's batch of client clients[i] (:func:`client_batch_indices`)."""
    idx = client_batch_indices(cfg, parts, clients, rnd)
    out = []
    for t in range(cfg.local_steps):
        step = []
        for i in range(len(clients)):
            sel = torch.as_tensor(idx[i][t])
            step.append(({k: v[sel].to(device) for k, v in task.train_inputs.items()}, task.train_labels[sel].to(device)))
        out.append(step)
    return out


def client_parts(cfg: RunConfig, task: Task) -> list[np.ndarray]:
    """The clients' training-example indices: the seeded IID/Dirichlet split every driver of a run uses."""
    return split_labels(cfg, task.train_labels.numpy())


def split_labels(cfg: RunConfig, labels: np.ndarray) -> list[np.ndarray]:
    """:func:`client_parts` from the training labels alone (no task needed)."""
    return partition(np.asarray(labels), cfg.n_clients, cfg.partition, concentration=cfg.dirichlet_alpha, seed=cfg.seed)


def fixed_batches(cfg: RunConfig, task: Task, device: torch.device) -> tuple[dict, torch.Tensor, dict, torch.Tensor]:
    """The run's fixed probe batch (for the norms) and eval subset.

    The probe is a seeded draw of ``probe_size`` examples: from the training set (``probe_from="train"``,
    where a client may train on a probe example in the round, more often the more clients there are), or
    from the held-out split outside the eval subset (``"heldout"``: never trained on)."""
    ev_idx = eval_indices(len(task.eval_labels), cfg.eval_size)
    g = np.random.default_rng([cfg.seed, 5])
    if cfg.probe_from == "heldout":
        pool = np.setdiff1d(np.arange(len(task.eval_labels)), ev_idx.numpy())
        if len(pool) < cfg.probe_size:
            raise ValueError(f"probe_from='heldout' needs probe_size={cfg.probe_size} held-out examples outside the "
                             f"eval subset; the task has {len(pool)} (lower eval_size or probe_size)")
        inputs, labels = task.eval_inputs, task.eval_labels
    else:
        pool, inputs, labels = np.arange(len(task.train_labels)), task.train_inputs, task.train_labels
    probe_idx = torch.as_tensor(np.sort(pool[g.choice(len(pool), min(cfg.probe_size, len(pool)), replace=False)]))
    probe_in = {k: v[probe_idx].to(device) for k, v in inputs.items()}
    probe_y = labels[probe_idx].to(device)
    eval_in = {k: v[ev_idx].to(device) for k, v in task.eval_inputs.items()}
    eval_y = task.eval_labels[ev_idx].to(device)
    return probe_in, probe_y, eval_in, eval_y


@dataclass
class _Run:
    """What every round of one run uses (built once by :func:`_setup`)."""

    cfg: RunConfig
    task: Task
    device: torch.device
    dtype: torch.dtype
    parts: list[np.ndarray]
    sizes: np.ndarray
    backend: object
    probe: tuple[dict, torch.Tensor]
    evalset: tuple[dict, torch.Tensor]
    base: dict
    scaler: AdaptiveScaler | None


def _setup(cfg: RunConfig, task: Task | None) -> tuple[_Run, ServerState, float]:
    task = task or build_task(cfg)
    device = resolve_device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    parts = client_parts(cfg, task)
    sizes = np.array([len(p) for p in parts], dtype=float)
    gamma = gamma_for(cfg, sizes)
    backend = make_backend(cfg.batched, task.model, task.targets, cfg.rank, gamma, device, cfg.k)
    all_w = torch.as_tensor(sizes / sizes.sum() if cfg.weighted else np.full(cfg.n_clients, 1 / cfg.n_clients))
    state = init_state(backend.shapes, cfg.rank, cfg.n_clients, cfg.scheme, cfg.seed, all_w, dtype, device)
    scaler = (AdaptiveScaler(cfg.alpha, cfg.rank, prior_rho=cfg.rho, ema=cfg.adaptive_ema)
              if cfg.rule == ADAPTIVE_RULE else None)
    probe_in, probe_y, eval_in, eval_y = fixed_batches(cfg, task, device)
    base = {"run_id": cfg.run_id, "version": sfed_theory.__version__, **config_columns(cfg),
            "backend": "batched" if cfg.batched else "loop", "gamma": gamma, "device_used": str(device)}
    ctx = _Run(cfg, task, device, dtype, parts, sizes, backend, (probe_in, probe_y), (eval_in, eval_y), base, scaler)
    return ctx, state, gamma


def _round(ctx: _Run, state: ServerState, gamma: float, rnd: int) -> tuple[list[dict], ServerState, float]:
    """One round: train the sampled clients, aggregate, measure; raises Divergence on a non-finite value."""
    cfg, backend, K = ctx.cfg, ctx.backend, ctx.cfg.k
    train_A = SCHEME_TRAINS_A[cfg.scheme]
    clients = sample_clients(cfg, rnd)
    p = torch.as_tensor(ctx.sizes[clients] / ctx.sizes[clients].sum() if cfg.weighted else np.full(K, 1 / K),
                        dtype=ctx.dtype, device=ctx.device)
    scal = client_scaling(cfg, clients, ctx.sizes)
    if scal is not None:  # clients of different ranks: the server moves to this round's gamma
        state, gamma = apply_gamma_change(state, backend, gamma, scal.server), scal.server
        backend.set_client_gammas(scal.clients)
    backend.set_base_delta(state.merged)
    start = probe_point(backend, state, clients, *ctx.probe, capture=True)
    ranks = None if scal is None else scal.ranks
    if scal is None:
        A0, B0 = client_start(state, clients)
    else:
        A0, B0, base = client_start_hetero(cfg.scheme, state, ranks, scal.clients, gamma)
        backend.set_base_delta(base)
    batches = client_batches(cfg, ctx.task, ctx.parts, clients, rnd, ctx.device)
    t0 = time.perf_counter()
    A1, B1, losses, accs = backend.train_clients(A0, B0, batches, train_A=train_A, optimizer=cfg.optimizer,
                                                 lr=cfg.lr, weight_decay=cfg.weight_decay)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    B_start = state.B
    state, round_delta, tot = aggregate_and_deltas(cfg.scheme, state, clients, A1, B1, p, gamma, ranks=ranks,
                                                   client_gammas=None if scal is None else scal.clients)
    backend.set_base_delta(state.merged)
    end = probe_point(backend, state, clients, *ctx.probe, capture=True)
    ev_loss, ev_acc = backend.evaluate(*eval_adapter(state), *ctx.evalset)
    measured = measure_round(ctx.task.targets, backend.shapes, start, end, round_delta, tot, A0, B0, A1, B1,
                             train_A, p, gamma if scal is None else scal.clients)
    if cfg.line_scales is not None:  # FFA only (RunConfig checks): W0 + c dW is the adapter (A, B0 + c dB)
        line = probe_line(backend, state.A, B_start, state.B, cfg.line_scales, *ctx.probe)
        measured = [{**m, **line[m["layer"]]} for m in measured]
    common = {"round": rnd, "n_participating": K, "clients": ",".join(map(str, clients)),
              "train_loss": float(losses.mean()), "train_acc": float(accs.mean()),
              "probe_loss_start": start.loss, "probe_loss_end": end.loss,
              "eval_loss": ev_loss, "eval_acc": ev_acc, "train_s": train_s}
    if scal is not None:
        common.update(gamma=gamma, gamma_clients=",".join(map(repr, scal.clients)), size_pred=scal.size)
    rows = [{**ctx.base, **common, **m} for m in measured]
    if not all(math.isfinite(r[c]) for r in rows for c in ("update_fro", "adapter_rms", "eval_loss")):
        raise Divergence(f"non-finite update or eval loss after aggregation in round {rnd}")
    if ctx.scaler is not None:
        state, gamma = _adaptive_step(ctx, state, gamma, B1, B0, p, rows)
    return rows, state, gamma


def _adaptive_step(ctx: _Run, state: ServerState, gamma: float, B1: dict, B0: dict, p: torch.Tensor,
                   rows: list[dict]) -> tuple[ServerState, float]:
    """sfed-adaptive: fold this round's rho estimate in, record it in ``rows``, switch to the next gamma."""
    cfg, K = ctx.cfg, ctx.cfg.k
    inc_B = torch.cat([(B1[n] - B0[n]).reshape(K, -1) for n in ctx.task.targets], dim=1)
    est = estimate_rho(inc_B.detach().double().cpu().numpy(), p.detach().double().cpu().numpy())
    ctx.scaler.observe(est)
    g_next = ctx.scaler.gamma(cfg.n_clients, weights=ctx.sizes if cfg.weighted else None, participating=K)
    rec = {"gamma": gamma, "gamma_next": g_next, "rho_est_raw": est.rho_raw, "rho_est_se": est.se,
           "rho_est_smoothed": ctx.scaler.rho_smoothed, "n_eff_est": est.n_eff,
           "n_eff_smoothed": cfg.rank * (g_next / cfg.alpha) ** 2}
    for r in rows:
        r.update(rec)
    return apply_gamma_change(state, ctx.backend, gamma, g_next), g_next


def run(cfg: RunConfig, task: Task | None = None, *, return_state: bool = False):
    """Run one federated LoRA configuration and return its tidy rows (with ``return_state=True``:
    ``(rows, final ServerState, final gamma)``)."""
    t_start = time.perf_counter()
    ctx, state, gamma = _setup(cfg, task)
    rows: list[dict] = []
    diverged_round, error = None, ""
    for rnd in range(1, cfg.rounds + 1):
        try:
            new_rows, state, gamma = _round(ctx, state, gamma, rnd)
            rows.extend(new_rows)
        except Divergence as e:
            diverged_round, error = rnd, str(e)
            rows.append({**ctx.base, "round": rnd, "layer": ALL, "n_participating": cfg.k, "gamma": gamma})
            break
    df = pd.DataFrame(rows)
    for c in MEASURED_COLUMNS + ADAPTIVE_COLUMNS + (HETERO_COLUMNS if cfg.client_ranks is not None else ()):
        if c not in df:
            df[c] = "" if c in ("clients", "gamma_clients") else float("nan")
    df["diverged"] = diverged_round is not None
    df["diverged_round"] = diverged_round if diverged_round is not None else -1
    df["error"] = error
    df["wall_s"] = time.perf_counter() - t_start
    return (df, state, gamma) if return_state else df
