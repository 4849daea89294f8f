"""The scaling rule in your own peft code: a ``LoraConfig`` whose scaling is the rule's gamma.

peft scales a LoRA layer by ``lora_alpha / r`` (``use_rslora=False``). :func:`lora_config` picks
``lora_alpha`` so that this quotient *is* the rule's gamma (:func:`sfed_theory.scaling_factor`)::

    from sfed_theory.peft import lora_config
    config = lora_config(rank=16, n_clients=8, alpha=16, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(base_model, config)          # every LoRA layer scales by 16*sqrt(8/16)

When gamma changes during training (clients join or drop out, the adaptive rule moves), either
set the new scaling as is (:func:`set_scaling`: the adapter's output changes by ``new/old``; what a
Flower client does with the round's gamma, whose adapter the server has already rescaled), or
keep the model's function (:func:`rescale_to_gamma`: ``B`` is multiplied by ``old/new`` so that
``gamma * B @ A`` stays the same, with the harness's own
:func:`validation.adaptive.rescale_for_new_gamma`).

peft is imported on first use: ``import sfed_theory`` works without it, and calling these
functions without peft raises ``ImportError`` saying what to install.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sfed_theory.rules import scaling_factor

if TYPE_CHECKING:  # pragma: no cover
    import peft
    from torch import nn

__all__ = ["lora_config", "lora_alpha_for", "lora_scalings", "set_scaling", "rescale_to_gamma", "require_peft"]

# LoraConfig arguments the rule decides; passing them would silently fight it
_RULE_OWNED = ("r", "lora_alpha", "use_rslora", "alpha_pattern")


def require_peft() -> Any:
    """The ``peft`` module, or ``ImportError`` saying how to install it."""
    try:
        import peft
    except ImportError as e:
        raise ImportError("sfed_theory.peft needs the peft package: pip install peft "
                          "(or pip install 'sfed[harness]')") from e
    return peft


def lora_alpha_for(gamma: float, rank: int, *, rslora: bool = False) -> float:
    """The ``lora_alpha`` whose peft scaling (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA) is ``gamma``.

    It is ``gamma * r``; peft's quotient gives back ``gamma`` exactly for most pairs and otherwise
    misses it by one unit in the last place (no float divides back exactly then; checked on
    80,000 pairs). :func:`set_scaling` pins the scaling itself where exactness matters."""
    gamma = float(gamma)
    if not (math.isfinite(gamma) and gamma > 0) or isinstance(rank, bool) or int(rank) != rank or rank < 1:
        raise ValueError(f"gamma must be finite and > 0 and rank an integer >= 1, got gamma={gamma!r}, rank={rank!r}")
    return gamma * (math.sqrt(rank) if rslora else int(rank))


def lora_config(rank: int, n_clients: int, alpha: float, rule: str = "sfed", *, rho: float | None = None,
                weights: Sequence[float] | None = None, participating: int | None = None,
                **lora_kwargs: Any) -> peft.LoraConfig:
    """A ``peft.LoraConfig`` of rank ``rank`` whose every LoRA layer scales by the rule's gamma
    (``lora_alpha = gamma * r``; to one rounding, see :func:`lora_alpha_for`).

    ``rule``, ``alpha``, ``n_clients`` (and for ``"sfed-general"``: ``rho``, ``weights``,
    ``participating``) go to :func:`sfed_theory.scaling_factor`; ``lora_kwargs`` to ``LoraConfig``
    (``target_modules``, ``lora_dropout``, ``task_type``, ...). A ``rank_pattern`` gets the
    matching ``alpha_pattern``, so a layer of rank ``r_k`` scales by the rule's gamma at ``r_k``.
    ``use_rslora`` is off (the rule already holds the rank factor).

    Raises ``ValueError`` for arguments the rule decides (``r``, ``lora_alpha``, ``use_rslora``,
    ``alpha_pattern``) and for what :func:`~sfed_theory.scaling_factor` rejects; ``ImportError``
    without peft.
    """
    clash = sorted(set(lora_kwargs) & set(_RULE_OWNED))
    if clash:
        raise ValueError(f"lora_config sets {clash} itself from the rule (scaling = gamma = lora_alpha / r); "
                         "pass rank=, alpha= and rule= instead")
    extra = {k: v for k, v in (("rho", rho), ("weights", weights), ("participating", participating)) if v is not None}

    def gamma_at(r: int) -> float:
        return scaling_factor(rule, alpha, r, n_clients, **extra)

    gamma = gamma_at(rank)  # validates rule, alpha, rank, n_clients and the sfed-general arguments
    ranks = dict(lora_kwargs.get("rank_pattern") or {})
    alpha_pattern = {k: lora_alpha_for(gamma_at(int(rk)), int(rk)) for k, rk in ranks.items()}
    peft = require_peft()
    return peft.LoraConfig(r=int(rank), lora_alpha=lora_alpha_for(gamma, rank), use_rslora=False,
                           alpha_pattern=alpha_pattern, **lora_kwargs)


def _lora_layers(model: nn.Module, adapter_name: str) -> dict[str, Any]:
    """``{module name: peft LoraLayer}`` of every layer that holds adapter ``adapter_name``."""
    require_peft()
    from peft.tuners.lora import LoraLayer

    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.scaling}
    if not layers:
        raise ValueError(f"model has no LoRA layer with adapter {adapter_name!r}; is it a peft LoRA model?")
    return layers


def _lora_B(layer: Any, adapter_name: str) -> Any:
    """The trainable B of a LoRA layer (linear/conv: ``lora_B``; embedding: ``lora_embedding_B``)."""
    if adapter_name in getattr(layer, "lora_B", {}):
        return layer.lora_B[adapter_name].weight
    return layer.lora_embedding_B[adapter_name]


def lora_scalings(model: nn.Module, adapter_name: str = "default") -> dict[str, float]:
    """Each LoRA layer's scaling (the gamma in ``gamma * B @ A``), by module name."""
    return {n: float(m.scaling[adapter_name]) for n, m in _lora_layers(model, adapter_name).items()}


def _check_gamma(gamma: float) -> float:
    try:
        g = float(gamma)
    except (TypeError, ValueError):
        raise ValueError(f"gamma must be a real number, got {gamma!r}") from None
    if not (math.isfinite(g) and g > 0):
        raise ValueError(f"gamma must be finite and > 0, got {gamma!r}")
    return g


def set_scaling(model: nn.Module, gamma: float, adapter_name: str = "default") -> None:
    """Make every LoRA layer of a peft model scale by exactly ``gamma``; B is left as it is.

    Also records gamma where peft keeps it (each layer's ``lora_alpha`` and the model's
    ``peft_config``), so ``set_scale``/``unscale_layer`` and a save/load round trip keep it."""
    g = _check_gamma(gamma)
    for layer in _lora_layers(model, adapter_name).values():
        rslora = bool(getattr(layer, "use_rslora", {}).get(adapter_name, False))
        layer.lora_alpha[adapter_name] = lora_alpha_for(g, layer.r[adapter_name], rslora=rslora)
        layer.scaling[adapter_name] = g
    cfg = getattr(model, "peft_config", {}).get(adapter_name)
    if cfg is not None:
        cfg.lora_alpha = lora_alpha_for(g, cfg.r, rslora=bool(cfg.use_rslora))
        cfg.alpha_pattern = {k: lora_alpha_for(g, rk, rslora=bool(cfg.use_rslora))
                             for k, rk in (cfg.rank_pattern or {}).items()}


def rescale_to_gamma(model: nn.Module, gamma: float, adapter_name: str = "default") -> dict[str, float]:
    """Change every LoRA layer's scaling to ``gamma`` without changing the model's function.

    Each layer's B is multiplied in place by ``old / gamma`` (so ``gamma * B' @ A == old * B @ A``;
    :func:`validation.adaptive.rescale_for_new_gamma`, the harness's adaptive rescale), then the
    scaling is set (:func:`set_scaling`). Returns each layer's old scaling. An optimizer that keeps
    state for B across the change should be rebuilt (see ``rescale_for_new_gamma``)."""
    from validation.adaptive import rescale_for_new_gamma

    g = _check_gamma(gamma)
    layers = _lora_layers(model, adapter_name)
    old = {n: float(m.scaling[adapter_name]) for n, m in layers.items()}
    for n, layer in layers.items():
        rescale_for_new_gamma(_lora_B(layer, adapter_name), old[n], g, inplace=True)
    set_scaling(model, g, adapter_name)
    return old
