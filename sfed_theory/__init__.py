"""sfed_theory: why averaged LoRA adapters collapse, and the scaling factor that fixes it.

Public API
----------
scaling_factor(rule, alpha, rank, n_clients, **kw) -> float
    gamma for "lora", "rslora", "sfed" and "sfed-general" (rho, weights, participating).
client_scaling_factors(rule, alpha, ranks, *, scheme, weights, rho) -> ClientScaling
    heterogeneous client ranks: the server's gamma, each client's gamma, the function-preserving
    rescale of B between them, and the aggregate's predicted size (sfed_theory.hetero derives it).
effective_clients(n_clients, rho, weights, participating) -> float
    N_eff = 1 / (rho + (1 - rho) * sum p_i^2).
predicted_norm(quantity, rule, *, regime, scheme, rank, n_clients, ...) -> float
    sqrt of a derived second moment (adapter output, update, gradients) under a rule.
predicted_exponent(quantity, rule, *, wrt, ranks, n_clients, ...) -> float
    least-squares log-log slope of predicted_norm over a measurement's grid.
derive(quantity, scheme, regime) -> Derivation;  solve_invariance(scheme, regime) -> Invariance
    the symbolic derivation (index expression, Wick pairings, closed form) and the solved gamma.
lora_config(rank, n_clients, alpha, rule, **lora_kwargs) -> peft.LoraConfig   (needs peft)
    a LoraConfig whose scaling is the rule's gamma; sfed_theory.peft also rescales a model's adapters.
SFedStrategy(alpha=..., rule=..., scheme=...)                                  (needs flwr)
    a Flower FedAvg strategy that sends each round's gamma and aggregates with the chosen scheme.
SFedHeteroStrategy(alpha=..., rule="sfed-hetero", scheme=...)                    (needs flwr)
    the same for clients of different ranks: each node its own gamma and share of the adapter.
"""

from importlib import import_module
from typing import Any

from sfed_theory.hetero_rules import ClientScaling, client_scaling_factors
from sfed_theory.rules import RULES, effective_clients, scaling_factor, weights_sum_squares

# sympy-backed parts load on first use, so `import sfed_theory.rules` stays light
_LAZY = {
    "predicted_norm": "sfed_theory.predict",
    "predicted_exponent": "sfed_theory.predict",
    "derive": "sfed_theory.derivation",
    "derive_all": "sfed_theory.derivation",
    "closed_form": "sfed_theory.derivation",
    "solve_invariance": "sfed_theory.derivation",
    "Derivation": "sfed_theory.derivation",
    "Invariance": "sfed_theory.derivation",
    # framework adapters: their framework is imported on first use (see sfed_theory.peft / .flower)
    "lora_config": "sfed_theory.peft",
    "SFedStrategy": "sfed_theory.flower",
    "SFedHeteroStrategy": "sfed_theory.flower_hetero",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sfed_theory' has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = [
    "RULES",
    "scaling_factor",
    "client_scaling_factors",
    "ClientScaling",
    "effective_clients",
    "weights_sum_squares",
    "predicted_norm",
    "predicted_exponent",
    "derive",
    "derive_all",
    "closed_form",
    "solve_invariance",
    "Derivation",
    "Invariance",
    "lora_config",
    "SFedStrategy",
    "SFedHeteroStrategy",
    "__version__",
]
