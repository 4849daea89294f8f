"""The client side of :class:`sfed_theory.flower.SFedStrategy`, for a ClientApp with a peft model.

A FlowerTune-style train handler changes in one place: after loading the received weights, let
:func:`load_round` put the round's adapter into the model, and reply with :func:`reply_arrays`::

    start = load_round(model, msg, context)      # was: set_peft_model_state_dict(model, arrays)
    ...train...
    content = RecordDict({"arrays": reply_arrays(model, start, context), "metrics": metrics})

:func:`load_round` loads the global arrays, sets every LoRA layer's scaling to the round's
``"gamma"`` (:func:`sfed_theory.peft.set_scaling`; the server already sent B at that gamma), and
per scheme: ``exact`` adds the received ``merged_delta`` to each frozen weight, ``fedsa`` loads the
client's own B from ``context.state`` (rescaled to the new gamma so its function is unchanged;
zero in its first round). :func:`reply_arrays` returns peft's LoRA state dict and, for FedSA,
keeps B in ``context.state`` and adds ``lora_B.start``. The state helpers
:func:`load_local_b`/:func:`keep_local_b` work on plain ``{layer: tensor}`` dicts too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message

from sfed_theory.flower import adapter_key, split_key
from sfed_theory.flower_hetero import adapter_rank, cut_to_rank
from sfed_theory.peft import require_peft, set_scaling
from validation.adaptive import rescale_for_new_gamma

__all__ = ["RoundStart", "load_round", "load_adapter", "reply_arrays", "load_local_b", "keep_local_b", "round_config"]

_LOCAL_B, _LOCAL_B_META = "sfed-fedsa-local-b", "sfed-fedsa-local-b-meta"


@dataclass
class RoundStart:
    """What a client needs to reply: the round's gamma and scheme, and FedSA's starting B."""

    gamma: float
    scheme: str
    b_start: dict[str, torch.Tensor] | None = None


def round_config(msg: Message) -> tuple[float, str]:
    """``(gamma, scheme)`` of a train message from SFedStrategy; ``ValueError`` if they are missing."""
    conf = msg.content.config_records.get("config")
    if conf is None or "gamma" not in conf:
        raise ValueError("the train message has no 'gamma' in its 'config' ConfigRecord; is the server "
                         "running sfed_theory.flower.SFedStrategy?")
    return float(conf["gamma"]), str(conf.get("sfed-scheme", "fedit"))


def load_local_b(context: Context, shapes: dict[str, tuple[int, int]], gamma: float, *, tag: str = "",
                 dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """FedSA: this client's own B per layer, at ``gamma`` (``B * gamma_kept / gamma``); zeros at first.

    ``shapes``: ``{layer: (d, r)}``. ``tag`` separates experiments sharing one node (another tag
    starts from zero again)."""
    meta = context.state.config_records.get(_LOCAL_B_META)
    if meta is None or str(meta["tag"]) != tag or _LOCAL_B not in context.state.array_records:
        return {n: torch.zeros(s, dtype=dtype) for n, s in shapes.items()}
    kept = context.state[_LOCAL_B].to_torch_state_dict()
    g_kept = float(meta["gamma"])
    return {n: kept[n] if g_kept == gamma else rescale_for_new_gamma(kept[n], g_kept, gamma) for n in shapes}


def keep_local_b(context: Context, B: dict[str, torch.Tensor], gamma: float, *, tag: str = "") -> None:
    """FedSA: store this client's B (trained at ``gamma``) in ``context.state`` for its next round."""
    context.state[_LOCAL_B] = ArrayRecord({n: b.detach().cpu().contiguous() for n, b in B.items()})
    context.state[_LOCAL_B_META] = ConfigRecord({"gamma": float(gamma), "tag": tag})


def _lora_layers(model: Any) -> dict[str, Any]:
    require_peft()
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _add_merged(model: Any, merged: dict[str, torch.Tensor]) -> None:
    """exact: frozen weight = pretrained weight + merged delta (the pretrained copy is kept on the layer)."""
    layers = _lora_layers(model)
    with torch.no_grad():
        for name, delta in merged.items():
            base = layers[name].get_base_layer()
            if not hasattr(base, "_sfed_w0"):
                base._sfed_w0 = base.weight.detach().clone()
            base.weight.copy_(base._sfed_w0 + delta.to(base.weight))


def load_adapter(model: Any, arrays: ArrayRecord, gamma: float, *, adapter_name: str = "default") -> None:
    """Put a global adapter (SFedStrategy's arrays, at ``gamma``) into a peft model: its LoRA
    weights, ``gamma`` as every layer's scaling and (exact) the merged weight change. Also what a
    ServerApp's ``evaluate_fn`` needs, with ``strategy.gamma``. Arrays of a larger rank than the
    model's (:class:`sfed_theory.flower_hetero.SFedHeteroStrategy` before it knows this client's rank)
    are cut to the model's rank (:func:`sfed_theory.flower_hetero.cut_to_rank`)."""
    from peft import set_peft_model_state_dict

    tensors = arrays.to_torch_state_dict()
    own = next(m.lora_A[adapter_name].weight.shape[0] for m in _lora_layers(model).values() if adapter_name in m.lora_A)
    if adapter_rank(tensors) > own:  # SFedHeteroStrategy did not know this client's rank yet
        tensors = cut_to_rank(tensors, own)
    merged = {split_key(k)[0]: t for k, t in tensors.items() if split_key(k)[1] == "merged"}
    set_peft_model_state_dict(model, {k: t for k, t in tensors.items() if split_key(k)[1] != "merged"},
                              adapter_name=adapter_name)
    set_scaling(model, gamma, adapter_name)
    if merged:
        _add_merged(model, merged)


def load_round(model: Any, msg: Message, context: Context, *, adapter_name: str = "default") -> RoundStart:
    """Put the round's adapter from an SFedStrategy train message into a peft model (see module docstring)."""
    gamma, scheme = round_config(msg)
    load_adapter(model, msg.content["arrays"], gamma, adapter_name=adapter_name)
    if scheme != "fedsa":
        return RoundStart(gamma, scheme)
    layers = {n: m for n, m in _lora_layers(model).items() if adapter_name in m.lora_B}
    weights = {n: m.lora_B[adapter_name].weight for n, m in layers.items()}
    dtype = next(iter(weights.values())).dtype
    b = load_local_b(context, {n: tuple(w.shape) for n, w in weights.items()}, gamma, dtype=dtype)
    with torch.no_grad():
        for n, w in weights.items():
            w.copy_(b[n])
    return RoundStart(gamma, scheme, {n: t.clone() for n, t in b.items()})


def reply_arrays(model: Any, start: RoundStart, context: Context, *, adapter_name: str = "default") -> ArrayRecord:
    """The trained adapter to send back (peft's LoRA state dict); FedSA also keeps B and adds ``lora_B.start``.

    (peft's state-dict prefixes are the LoRA layers' module names, so both index the same dicts.)"""
    from peft import get_peft_model_state_dict

    sd = {k: t.detach().cpu().contiguous() for k, t in get_peft_model_state_dict(model, adapter_name=adapter_name).items()}
    if start.scheme == "fedsa":
        b_now = {split_key(k)[0]: t for k, t in sd.items() if split_key(k)[1] == "B"}
        keep_local_b(context, b_now, start.gamma)
        sd.update({adapter_key(layer, "B_start"): start.b_start[layer] for layer in b_now})
    return ArrayRecord(sd)
