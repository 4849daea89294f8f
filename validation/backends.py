"""Two ways to run the clients' local training on one frozen model, with the same interface.

* :class:`LoopBackend`: peft's LoRA (``get_peft_model``), one client after the other. The
  reference path; ``lora_alpha = gamma * r`` so peft's ``scaling`` is the rule's gamma.
* :class:`BatchedBackend`: :class:`~validation.batched_lora.BatchedLoRALinear` layers, all K
  clients in one forward/backward on a K*b batch. One optimizer over the stacked adapters equals
  K per-client optimizers because SGD and AdamW are elementwise (no global clipping is used).

Both take adapters as tensors (``A[name]: (K, r, k)``, ``B[name]: (K, d, r)``) and return them.
The optimizer is created fresh for every round (clients keep no optimizer state across rounds).

Clients of different ranks (:mod:`validation.hetero_ranks`): every client holds adapters of the
server's width R, its columns of B and rows of A beyond its own rank zero. Such a block gets exactly
zero gradient (``dL/dB[:, l] = gamma G A[l]^T``, ``dL/dA[l] = gamma B[:, l]^T G``) and so stays zero
under SGD and AdamW (tested): the padded adapter is the rank-``r_i`` one. Each client's own gamma is
set with :meth:`set_client_gammas` before :meth:`train_clients`; the global adapter keeps ``gamma``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from validation.batched_lora import attach_batched

__all__ = ["Divergence", "ProbeOut", "LoopBackend", "BatchedBackend", "make_backend", "make_optimizer"]


class Divergence(RuntimeError):
    """A non-finite loss or gradient appeared during local training."""


@dataclass
class ProbeOut:
    """One pass of the global adapter over a fixed batch.

    ``inputs`` and ``grad_W`` keep only the rows of real tokens: a padded position (attention mask 0)
    never reaches the loss (it is masked out of attention and of the mean pooling), so it carries no
    signal, and counting it would dilute every per-row average by the padding fraction.
    ``grad_W[name]`` is the loss gradient w.r.t. the layer's effective weight ``W0 + gamma B A``,
    ``sum over rows of (dL/dy_n) x_n^T`` (d, k); so ``dL/dB = gamma grad_W A^T`` and
    ``dL/dA = gamma B^T grad_W``, which the tests check.
    """

    loss: float
    acc: float
    grad_A: dict[str, torch.Tensor] | None
    grad_B: dict[str, torch.Tensor] | None
    inputs: dict[str, torch.Tensor] | None  # each adapted layer's input rows of real tokens, (n_rows, k)
    grad_W: dict[str, torch.Tensor] | None = None  # dL/dW of each adapted layer, (d, k)


def real_rows(inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Boolean mask over the flattened (example, position) rows of a batch: True for real tokens.

    ``None`` when the batch has no attention mask (feature inputs: every row is real)."""
    mask = inputs.get("attention_mask")
    return None if mask is None else mask.reshape(-1).bool()


def make_optimizer(params: list[torch.Tensor], name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """SGD (no momentum) or AdamW; both elementwise, so stacking clients does not couple them."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


class _Base:
    names: tuple[str, ...]
    layers: dict[str, nn.Module]  # the adapted layers (base + adapter), by module name

    def __init__(self, model: nn.Module, names: tuple[str, ...], rank: int, gamma: float, device: torch.device):
        self.names = names
        self.rank = rank
        self.gamma = gamma
        self.client_gammas: tuple[float, ...] | None = None  # per trained client (heterogeneous ranks)
        self.device = device
        self.w0 = {n: model.get_submodule(n).weight.detach().clone().to(device) for n in names}
        self.shapes = {n: tuple(w.shape) for n, w in self.w0.items()}  # (d, k)

    # --- subclass hooks -------------------------------------------------------------------------
    def _base_linear(self, name: str) -> nn.Linear:
        raise NotImplementedError

    def _params(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------------
    def set_base_delta(self, merged: dict[str, torch.Tensor]) -> None:
        """Frozen weights become ``W0 + merged`` (exact aggregation merges into the base)."""
        with torch.no_grad():
            for n in self.names:
                self._base_linear(n).weight.copy_(self.w0[n] + merged[n])

    def set_gamma(self, gamma: float) -> None:
        """Change the scaling factor of every adapted layer (for adaptive rules between rounds)."""
        self.gamma = float(gamma)
        self._apply_gamma()

    def _apply_gamma(self) -> None:
        raise NotImplementedError

    def set_client_gammas(self, gammas: list[float] | tuple[float, ...] | None) -> None:
        """Each trained client's own gamma for the next :meth:`train_clients` (in the order of its
        adapters); ``None``: every client trains at ``gamma``. Probes and evaluation use ``gamma``."""
        self.client_gammas = None if gammas is None else tuple(float(g) for g in gammas)

    def _check_client_gammas(self, k: int) -> None:
        if self.client_gammas is not None and len(self.client_gammas) != k:
            raise ValueError(f"{len(self.client_gammas)} client gammas set for {k} clients; call set_client_gammas "
                             "with one gamma per trained client")

    def _requires_grad(self, a: bool, b: bool) -> None:
        for n in self.names:
            pa, pb = self._params(n)
            pa.requires_grad_(a)
            pb.requires_grad_(b)

    def _forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**inputs)

    def _set_global(self, A: dict[str, torch.Tensor], B: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def _global_grads(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def probe(self, A: dict[str, torch.Tensor], B: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor],
              labels: torch.Tensor, *, grads: bool = False, capture: bool = False) -> ProbeOut:
        """Loss/accuracy of the single adapter (A, B) on a batch; optionally the gradients of
        the mean loss w.r.t. every A and B, and each adapted layer's input rows."""
        self._set_global(A, B)
        rows = real_rows(inputs) if capture else None
        captured: dict[str, torch.Tensor] = {}
        out_grads: dict[str, torch.Tensor] = {}
        hooks = []
        if capture:
            for n in self.names:
                hooks.append(self.layers[n].register_forward_hook(
                    lambda m, args, out, n=n: self._capture(n, args[0], out, rows, captured, out_grads)))
        try:
            self._requires_grad(grads, grads)
            with torch.set_grad_enabled(grads):
                logits = self._forward(inputs)
                loss = F.cross_entropy(logits, labels)
                ga = gb = None
                if grads:
                    self.model.zero_grad(set_to_none=True)
                    loss.backward()
                    ga, gb = {}, {}
                    for n in self.names:
                        ga[n], gb[n] = self._global_grads(n)
        finally:
            for h in hooks:
                h.remove()
        grad_w = {n: out_grads[n].T @ captured[n] for n in self.names} if capture and grads else None
        acc = (logits.argmax(1) == labels).double().mean().item()
        return ProbeOut(loss.item(), acc, ga, gb, captured if capture else None, grad_w)

    @staticmethod
    def _capture(name: str, x: torch.Tensor, out: torch.Tensor, rows: torch.Tensor | None,
                 inputs: dict[str, torch.Tensor], out_grads: dict[str, torch.Tensor]) -> None:
        """Forward hook body on the adapted layer (base + adapter): keep its input rows and, when
        autograd runs, hook the gradient of its output y (dL/dy)."""
        keep = (lambda t: t.detach().reshape(-1, t.shape[-1])) if rows is None else \
            (lambda t: t.detach().reshape(-1, t.shape[-1])[rows])
        inputs[name] = keep(x)
        if out.requires_grad:
            out.register_hook(lambda g: out_grads.__setitem__(name, keep(g)))

    def evaluate(self, A: dict[str, torch.Tensor], B: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor],
                 labels: torch.Tensor, chunk: int = 64) -> tuple[float, float]:
        """Mean loss and accuracy of the single adapter on a data set, in chunks."""
        tot_loss, tot_ok, n = 0.0, 0.0, len(labels)
        for s in range(0, n, chunk):
            p = self.probe(A, B, {k: v[s:s + chunk] for k, v in inputs.items()}, labels[s:s + chunk])
            m = min(chunk, n - s)
            tot_loss += p.loss * m
            tot_ok += p.acc * m
        return tot_loss / n, tot_ok / n


class LoopBackend(_Base):
    """peft LoRA, clients trained one after the other (reference path)."""

    def __init__(self, model: nn.Module, names: tuple[str, ...], rank: int, gamma: float, device: torch.device):
        from peft import LoraConfig, get_peft_model

        super().__init__(model, names, rank, gamma, device)
        cfg = LoraConfig(r=rank, lora_alpha=gamma * rank, use_rslora=False, lora_dropout=0.0, bias="none",
                         target_modules=list(names))
        self.model = get_peft_model(copy.deepcopy(model), cfg).to(device).eval()
        self.layers = {n: self.model.base_model.model.get_submodule(n) for n in names}
        self._apply_gamma()

    def _apply_gamma(self) -> None:
        for layer in self.layers.values():
            # lora_alpha = gamma*r makes peft's scaling gamma up to one rounding; pin it exactly
            layer.scaling["default"] = self.gamma

    def _base_linear(self, name: str) -> nn.Linear:
        return self.layers[name].base_layer

    def _params(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[name]
        return layer.lora_A["default"].weight, layer.lora_B["default"].weight

    def _set_global(self, A, B) -> None:
        self._load(A, B, None)

    def _load(self, A, B, i: int | None) -> None:
        if self.client_gammas is not None:  # client i's own gamma while it trains, the global one otherwise
            g = self.gamma if i is None else self.client_gammas[i]
            for layer in self.layers.values():
                layer.scaling["default"] = g
        with torch.no_grad():
            for n in self.names:
                pa, pb = self._params(n)
                pa.copy_(A[n] if i is None else A[n][i])
                pb.copy_(B[n] if i is None else B[n][i])

    def _global_grads(self, name: str):
        pa, pb = self._params(name)
        return pa.grad.detach().clone(), pb.grad.detach().clone()

    def train_clients(self, A, B, batches, *, train_A: bool, optimizer: str, lr: float, weight_decay: float):
        """``batches[t][i] = (inputs, labels)`` for step t, client i. Returns (A', B', losses, accs)
        with losses/accs as (K, steps) tensors of each step's pre-update batch loss/accuracy."""
        K = next(iter(A.values())).shape[0]
        steps = len(batches)
        newA = {n: torch.empty_like(A[n]) for n in self.names}
        newB = {n: torch.empty_like(B[n]) for n in self.names}
        losses = torch.zeros(K, steps, dtype=torch.float64)
        accs = torch.zeros(K, steps, dtype=torch.float64)
        self._requires_grad(train_A, True)
        self._check_client_gammas(K)
        for i in range(K):
            self._load(A, B, i)
            params = [p for n in self.names for p, on in zip(self._params(n), (train_A, True)) if on]
            opt = make_optimizer(params, optimizer, lr, weight_decay)
            for t in range(steps):
                inputs, labels = batches[t][i]
                logits = self._forward(inputs)
                loss = F.cross_entropy(logits, labels)
                if not torch.isfinite(loss):
                    raise Divergence(f"non-finite loss {loss.item()} at client {i}, local step {t}")
                losses[i, t] = loss.item()
                accs[i, t] = (logits.argmax(1) == labels).double().mean().item()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            with torch.no_grad():
                for n in self.names:
                    pa, pb = self._params(n)
                    newA[n][i] = pa
                    newB[n][i] = pb
        return newA, newB, losses, accs


class BatchedBackend(_Base):
    """All K clients' adapters in :class:`BatchedLoRALinear` layers; one pass per local step."""

    def __init__(self, model: nn.Module, names: tuple[str, ...], rank: int, gamma: float, device: torch.device,
                 n_slots: int):
        super().__init__(model, names, rank, gamma, device)
        self.model = copy.deepcopy(model).to(device).eval()
        self.layers = attach_batched(self.model, names, n_slots, rank, gamma)

    def _apply_gamma(self) -> None:
        for layer in self.layers.values():
            layer.gamma = self.gamma

    def _base_linear(self, name: str) -> nn.Linear:
        return self.layers[name].base

    def _params(self, name: str):
        layer = self.layers[name]
        return layer.A, layer.B

    def _groups(self, g: int, gammas: tuple[float, ...] | None = None) -> None:
        for layer in self.layers.values():
            layer.groups = g
            layer.slot_gammas = None if gammas is None else torch.tensor(gammas, dtype=layer.A.dtype,
                                                                          device=layer.A.device)

    def _set_global(self, A, B) -> None:
        self._groups(1)
        with torch.no_grad():
            for n in self.names:
                self.layers[n].A[0].copy_(A[n])
                self.layers[n].B[0].copy_(B[n])

    def _global_grads(self, name: str):
        layer = self.layers[name]
        return layer.A.grad[0].detach().clone(), layer.B.grad[0].detach().clone()

    def train_clients(self, A, B, batches, *, train_A: bool, optimizer: str, lr: float, weight_decay: float):
        """Same contract as :meth:`LoopBackend.train_clients`."""
        K = next(iter(A.values())).shape[0]
        steps = len(batches)
        self._check_client_gammas(K)
        self._groups(K, self.client_gammas)
        with torch.no_grad():
            for n in self.names:
                self.layers[n].A[:K].copy_(A[n])
                self.layers[n].B[:K].copy_(B[n])
        self._requires_grad(train_A, True)
        params = [p for n in self.names for p, on in zip(self._params(n), (train_A, True)) if on]
        opt = make_optimizer(params, optimizer, lr, weight_decay)
        losses = torch.zeros(K, steps, dtype=torch.float64)
        accs = torch.zeros(K, steps, dtype=torch.float64)
        for t in range(steps):
            inputs = {k: torch.cat([batches[t][i][0][k] for i in range(K)]) for k in batches[t][0][0]}
            labels = torch.cat([batches[t][i][1] for i in range(K)])
            logits = self._forward(inputs)
            per = F.cross_entropy(logits, labels, reduction="none").view(K, -1).mean(1)
            if not torch.isfinite(per).all():
                bad = int((~torch.isfinite(per)).nonzero()[0, 0])
                raise Divergence(f"non-finite loss {per[bad].item()} at client {bad}, local step {t}")
            losses[:, t] = per.detach().double().cpu()
            accs[:, t] = (logits.argmax(1) == labels).view(K, -1).double().mean(1).cpu()
            opt.zero_grad(set_to_none=True)
            per.sum().backward()  # sum of per-client losses: each client's adapter gets its own gradient
            opt.step()
        with torch.no_grad():
            newA = {n: self.layers[n].A[:K].detach().clone() for n in self.names}
            newB = {n: self.layers[n].B[:K].detach().clone() for n in self.names}
        return newA, newB, losses, accs


def make_backend(batched: bool, model: nn.Module, names: tuple[str, ...], rank: int, gamma: float,
                 device: torch.device, n_slots: int):
    """The batched backend (``batched=True``) or the peft per-client loop."""
    if batched:
        return BatchedBackend(model, names, rank, gamma, device, n_slots)
    return LoopBackend(model, names, rank, gamma, device)
