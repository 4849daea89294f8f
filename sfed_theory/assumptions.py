"""The one-round random model of THEORY.md as explicit objects.

Everything the derivation uses is declared here: the sympy symbols, the Gaussian random tensors
(with their shapes, entry variances and client correlation), the named assumptions, the two
optimizer regimes and the four aggregation schemes. :mod:`sfed_theory.schemes` builds the
quantities from these objects and :mod:`sfed_theory.wick` takes expectations; nothing downstream
adds an assumption that is not listed in :data:`ASSUMPTIONS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import sympy as sp

__all__ = [
    "SYM",
    "Symbols",
    "GaussianField",
    "Assumption",
    "Regime",
    "Scheme",
    "FIELDS",
    "DETERMINISTIC",
    "INNER_PRODUCTS",
    "ASSUMPTIONS",
    "REGIMES",
    "SCHEMES",
    "power_sum",
    "MAX_POWER_SUM",
    "range_size",
]


@dataclass(frozen=True)
class Symbols:
    """The sympy symbols of the model (all positive except ``rho``, which lies in [0, 1])."""

    gamma: sp.Symbol  # scaling factor in dW = gamma * B @ A
    alpha: sp.Symbol  # LoRA alpha (target scale of the invariance condition)
    d: sp.Symbol  # output dimension (rows of B)
    k: sp.Symbol  # input dimension (columns of A)
    r: sp.Symbol  # adapter rank
    N: sp.Symbol  # number of clients averaged in one round
    rho: sp.Symbol  # correlation of two clients' increments at the same entry
    s_A: sp.Symbol  # std of the entries of the shared init A
    s_B: sp.Symbol  # std of the entries of a client's B increment (Adam regime)
    s_dA: sp.Symbol  # std of the entries of a client's A increment (Adam regime, not FFA)
    tau: sp.Symbol  # std of the entries of gradients: client G_i = dL_i/dW (SGD) and probe g = dL/dy
    eta: sp.Symbol  # SGD learning rate
    X2: sp.Symbol  # ||x||^2 of the deterministic probe input
    f_in: sp.Symbol  # refined model: share of a client's B increment along its input direction (A x)^T
    phi: sp.Symbol  # refined model: share of that component's output direction along the probe gradient -g
    lam: sp.Symbol  # refined model: output-space curvature, G_end = g x^T + lam dW C
    nu: sp.Symbol  # refined model: the probe's isotropic input bulk, C = x x^T + nu I_k
    kappa: sp.Symbol  # refined model: cosine of the probe gradient's input direction z with the tokens' spike x
    nu_g: sp.Symbol  # refined model: the isotropic bulk of the gradient's token weighting, C_g = z z^T + nu_g I_k
    lam_s: sp.Symbol  # refined model: the curvature met by the update's shared part (lam_s = lam: one curvature)


SYM = Symbols(
    gamma=sp.Symbol("gamma", positive=True),
    alpha=sp.Symbol("alpha", positive=True),
    d=sp.Symbol("d", positive=True, integer=True),
    k=sp.Symbol("k", positive=True, integer=True),
    r=sp.Symbol("r", positive=True, integer=True),
    N=sp.Symbol("N", positive=True, integer=True),
    rho=sp.Symbol("rho", nonnegative=True),
    s_A=sp.Symbol("s_A", positive=True),
    s_B=sp.Symbol("s_B", positive=True),
    s_dA=sp.Symbol("s_dA", positive=True),
    tau=sp.Symbol("tau", positive=True),
    eta=sp.Symbol("eta", positive=True),
    X2=sp.Symbol("X2", positive=True),  # printed as X2 = ||x||^2
    f_in=sp.Symbol("f_in", nonnegative=True),
    phi=sp.Symbol("phi", nonnegative=True),
    lam=sp.Symbol("lambda", real=True),
    nu=sp.Symbol("nu", nonnegative=True),
    kappa=sp.Symbol("kappa", nonnegative=True),
    nu_g=sp.Symbol("nu_g", nonnegative=True),
    lam_s=sp.Symbol("lambda_s", real=True),
)


MAX_POWER_SUM = 8
"""The highest client-weight power sum ``S_m`` a derived closed form may contain (``S_2 .. S_8``)."""


@lru_cache(maxsize=None)
def power_sum(m: int) -> sp.Expr:
    """``S_m = sum_i p_i^m`` over the averaged clients (``S_1 = 1`` because the weights sum to one)."""
    if m < 1:
        raise ValueError(f"power sums start at m = 1, got {m}")
    if m == 1:
        return sp.Integer(1)
    return sp.Symbol(f"S{m}", positive=True)


def range_size(rng: str) -> sp.Expr:
    """Size of an index range: ``d``, ``k``, ``r``, ``N`` (clients) or ``1`` (a column of a vector)."""
    sizes = {"d": SYM.d, "k": SYM.k, "r": SYM.r, "N": SYM.N, "1": sp.Integer(1)}
    if rng not in sizes:
        raise ValueError(f"unknown index range {rng!r}; allowed: {sorted(sizes)}")
    return sizes[rng]


@dataclass(frozen=True)
class GaussianField:
    """A zero-mean Gaussian random tensor with iid entries (up to the client correlation).

    ``Cov(F[i]_a, F[i']_a') = variance * prod(delta(a, a')) * (c + (1 - c) delta(i, i'))`` for a
    per-client field with client correlation ``c`` (``rho`` unless the field says otherwise), and
    ``variance * prod(delta(a, a'))`` for a shared one.
    """

    name: str
    latex: str
    shape: tuple[str, ...]
    variance: sp.Expr
    per_client: bool
    description: str
    correlation: sp.Expr = SYM.rho


FIELDS: dict[str, GaussianField] = {
    f.name: f
    for f in (
        GaussianField("A", "A", ("r", "k"), SYM.s_A**2, False, "shared LoRA init A (r x k), iid N(0, s_A^2)"),
        GaussianField(
            "B", "B", ("d", "r"), SYM.s_B**2, True,
            "client i's increment of B (d x r) in the Adam regime; B starts at 0, so this is B_i",
        ),
        GaussianField(
            "D", r"\Delta", ("r", "k"), SYM.s_dA**2, True,
            "client i's increment of A (r x k) in the Adam regime: A_i = A + Delta_i (absent for FFA)",
        ),
        GaussianField(
            "G", "G", ("d", "k"), SYM.tau**2, True,
            "client i's loss gradient wrt W, G_i = dL_i/dW (d x k), SGD regime",
        ),
        GaussianField("g", "g", ("d", "1"), SYM.tau**2, False, "probe output gradient g = dL/dy (d), iid N(0, tau^2)"),
        GaussianField(
            "Ai", "A", ("r", "k"), SYM.s_A**2, True,
            "client i's own A init (r x k) under an '-indep' scheme, iid N(0, s_A^2), independent across clients",
            correlation=sp.Integer(0),
        ),
        GaussianField(
            "w", "w", ("d", "1"), sp.Integer(1), True,
            "refined model: client i's own output direction of its input-coherent B component (d), iid N(0, 1), "
            "independent across clients", correlation=sp.Integer(0),
        ),
    )
}
"""Every random tensor of the model; they are mutually independent."""

DETERMINISTIC: dict[str, str] = {
    "x": "probe input x (k), deterministic, ||x||^2 = X2 (in the refined regime: the tokens' top input direction)",
    "z": "refined regime: the probe gradient's input direction z (k), deterministic, ||z||^2 = X2, x . z = kappa X2",
}
INNER_PRODUCTS: dict[frozenset[str], sp.Expr] = {
    frozenset({"x"}): SYM.X2, frozenset({"z"}): SYM.X2, frozenset({"x", "z"}): SYM.kappa * SYM.X2,
}
"""The deterministic vectors' inner products, keyed by the set of the two vectors' names."""


@dataclass(frozen=True)
class Assumption:
    """A named assumption of the random model, with a plain-text and a LaTeX statement."""

    name: str
    text: str
    latex: str


ASSUMPTIONS: tuple[Assumption, ...] = (
    Assumption("A_init", "A has iid N(0, s_A^2) entries (Kaiming-like: s_A^2 ~ 1/k)",
               r"A_{lm} \sim \mathcal{N}(0, s_A^2)\ \text{iid}"),
    Assumption("client_correlation",
               "per-client increments have iid entries across positions, and two clients' entries at the "
               "same position have correlation rho",
               r"\mathrm{Cov}(F^{(i)}_{a}, F^{(i')}_{a'}) = s_F^2\,\delta_{aa'}\,(\rho + (1-\rho)\delta_{ii'})"),
    Assumption("gaussian", "all random tensors are jointly Gaussian (Isserlis/Wick gives every moment)",
               r"\mathbb{E}[\prod_n z_n] = \sum_{\text{pairings}} \prod \mathbb{E}[z_a z_b]"),
    Assumption("independence", "A, the B increments, the A increments, the client gradients G and the probe g "
               "are mutually independent", r"A \perp B \perp \Delta \perp G \perp g"),
    Assumption("weights", "the server averages with weights p_i >= 0, sum p_i = 1; S_m = sum p_i^m",
               r"\bar F = \sum_i p_i F^{(i)},\ \sum_i p_i = 1,\ S_m = \sum_i p_i^m"),
    Assumption("participation", "K of N clients are sampled per round and averaged with equal weights, "
               "so S_m = K^(1-m); with unequal weights S_m is that of the renormalised sampled weights",
               r"S_m = K^{1-m}"),
    Assumption("probe", "the adapter is probed with a deterministic input x (||x||^2 = X2) and an output "
               "gradient g with iid N(0, tau^2) entries, independent of everything else",
               r"\|x\|^2 = X_2,\ g_j \sim \mathcal{N}(0, \tau^2)"),
    Assumption("zero_init_B", "B is initialised to zero, so a client's B after the round is its increment",
               r"B_0 = 0"),
)


@dataclass(frozen=True)
class Regime:
    """How a client's increments depend on gamma."""

    name: str
    text: str
    latex: str


REGIMES: dict[str, Regime] = {
    "adam": Regime(
        "adam",
        "Adam/sign-like: increment scale does not depend on gamma; B_i has iid N(0, s_B^2) entries and, "
        "except for FFA, A_i = A + Delta_i with Delta_i iid N(0, s_dA^2); both client-correlated (rho)",
        r"B_i \sim s_B,\ A_i = A + \Delta_i",
    ),
    "adam-refined": Regime(
        "adam-refined",
        "Adam/sign-like with the three mechanisms the canonical model leaves out: (a) a share f_in of each "
        "client's B increment lies along its input direction, u_i (A z)^T, built from A z like Adam's step on "
        "dL/dB = gamma G A^T with the probe gradient G = g z^T (B is no longer independent of A); (b) that "
        "component's output direction u_i is -sqrt(phi) g/tau (the loss-gradient direction every client "
        "descends) plus sqrt(1-phi) w_i (client noise); the rest, sqrt(1-f_in) of it, is the canonical "
        "client-correlated increment; (c) gradients after the round are taken at G_end = g z^T + lambda dW C_g: "
        "each probe token's output gradient moved by the loss curvature lambda (isotropic in output space) times "
        "its output change, summed over the tokens as the gradient weighs them, C_g = z z^T + nu_g I; the update's "
        "shared part dW_s (the -sqrt(phi) g/tau share of u, common to every client) meets its own curvature lambda_s "
        "(a saturating loss along the direction all clients descend; lambda_s = lambda is one curvature). The "
        "output sees the tokens' own input second moment C = x x^T + nu I (their top direction x plus an "
        "isotropic bulk nu per coordinate), so the adapter output is E||dW x||^2 + nu E||dW||_F^2. The two "
        "directions meet at the angle x . z = kappa X2; kappa = 1 and nu_g = nu is the model with one probe "
        "vector (z = x, C_g = C). A increments as in 'adam'",
        r"B_i = s_B\left[\sqrt{f_{in}}\,u_i (A z)^\top/(s_A\|z\|) + \sqrt{1-f_{in}}\,E_i\right],\ "
        r"u_i = -\sqrt{\phi}\,g/\tau + \sqrt{1-\phi}\,w_i,\ G_{end} = g z^\top + \lambda\,(\Delta W - \Delta W_s) C_g "
        r"+ \lambda_s\,\Delta W_s C_g,\ "
        r"C_g = z z^\top + \nu_g I,\ C = x x^\top + \nu I,\ x^\top z = \kappa X_2",
    ),
    "sgd": Regime(
        "sgd",
        "SGD: one local step of size eta from B = 0. dL_i/dB = gamma G_i A^T, so B_i = -gamma eta G_i A^T "
        "(proportional to gamma, aligned with A^T; the client-specific part of G_i is the noise), and "
        "dL_i/dA = gamma B^T G_i = 0 at B = 0, so A_i = A",
        r"B_i = -\gamma\eta\,G_i A^\top,\ A_i = A",
    ),
}


@dataclass(frozen=True)
class Scheme:
    """An aggregation scheme: what the server's update dW is, and the factors of the new adapter."""

    name: str
    text: str
    update_latex: str


SCHEMES: dict[str, Scheme] = {
    "ffa": Scheme("ffa", "FFA-LoRA: A frozen and shared, B averaged; dW = gamma Bbar A, factors (Bbar, A)",
                  r"\gamma \bar B A"),
    "fedit": Scheme("fedit", "FedIT: A and B averaged separately (product of averages); dW = gamma Bbar Abar, "
                    "factors (Bbar, Abar)", r"\gamma \bar B \bar A"),
    "fedsa": Scheme("fedsa", "FedSA-LoRA: A averaged, B stays local; the update is one client c's "
                    "personalised model dW = gamma B_c Abar, factors (B_c, Abar)", r"\gamma B_c \bar A"),
    "fedit-indep": Scheme("fedit-indep", "FedIT with an A init drawn by every client itself (the server averages "
                          "them, as the paper's pseudocode appears to do): dW = gamma Bbar Abar, Abar = sum_i p_i "
                          "(A_i + Delta_i)", r"\gamma \bar B \bar A,\ \bar A = \textstyle\sum_i p_i A_i"),
    "fedsa-indep": Scheme("fedsa-indep", "FedSA-LoRA with an A init drawn by every client itself: dW = gamma B_c Abar",
                          r"\gamma B_c \bar A,\ \bar A = \textstyle\sum_i p_i A_i"),
    "exact": Scheme("exact", "exact aggregation (average of products, FedEx-style): dW = gamma sum_i p_i B_i A_i; "
                    "the whole update is merged into W0 and the adapter restarts at (B, A) = (0, A0), where "
                    "its gradients are taken", r"\gamma \sum_i p_i B_i A_i"),
}
