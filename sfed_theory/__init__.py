"""sfed_theory: why averaged LoRA adapters collapse, and the scaling factor that fixes it.

Public API
----------
scaling_factor(rule, alpha, rank, n_clients, **kw) -> float
    gamma for "lora", "rslora", "sfed" and "sfed-general" (rho, weights, participating).
effective_clients(n_clients, rho, weights, participating) -> float
    N_eff = 1 / (rho + (1 - rho) * sum p_i^2).
"""

from sfed_theory.rules import RULES, effective_clients, scaling_factor, weights_sum_squares

__version__ = "0.1.0"

__all__ = ["RULES", "scaling_factor", "effective_clients", "weights_sum_squares", "__version__"]
