"""The random quantities of one aggregation round, written as index expressions.

For a (quantity, scheme, regime) this module builds the scalar whose expectation the engine in
:mod:`sfed_theory.wick` takes. It only encodes the definitions of
:mod:`sfed_theory.assumptions` (client factors, server update, adapter factors); no moment is
computed here.
"""

from __future__ import annotations

import sympy as sp

from sfed_theory.assumptions import REGIMES, SCHEMES, SYM
from sfed_theory.wick import FIXED_CLIENT, Idx, IndexFactory, Mat, Term, frobenius_inner

__all__ = ["QUANTITIES", "QUANTITY_TEXT", "CLIENT_PROJECTIONS", "check_names", "client_B", "client_A", "update",
           "factors", "build"]

QUANTITY_TEXT: dict[str, str] = {
    "adapter_output": "E||y||^2, y = dW x (aggregated adapter output for a probe input x; adam-refined: "
                      "+ nu E||dW||_F^2 from the probe's input bulk)",
    "update_fro": "E||dW||_F^2 (aggregated update)",
    "grad_A": "E||dL/dA||_F^2 at the aggregated adapter, dL/dA = gamma B^T g x^T",
    "grad_B": "E||dL/dB||_F^2 at the aggregated adapter, dL/dB = gamma g x^T A^T",
    "aggregation_error": "E||dW - dW_exact||_F^2 (product of averages minus average of products)",
    "loss_change": "E<G, dW> (first-order loss change; SGD: G = sum_i p_i G_i, or G_c for FedSA; "
                   "adam-refined: the probe gradient G = g z^T)",
    # one client's contribution to a quantity that is linear in the averaged increments (client c fixed;
    # the p-weighted mean over c), beside the average's: their ratio is the correlation the harness
    # measures for that quantity (rho_out, rho_gA, rho_gB), see validation.refined
    "output_client": "E||y_c||^2, y_c = gamma B_c A_c x (one client's own update applied to the probe)",
    # adam-refined only: the size of the step along the direction every client descends, at which the
    # curvature lambda_s is taken (the loss saturates along it)
    "shared_output": "E||y_s||^2, y_s = dW_s x, the update's shared part on the probe's tokens (+ nu E||dW_s||_F^2)",
    "grad_A_client": "E||gamma B_c^T G_end||^2 (one client's B in dL/dA, at the aggregated adapter's probe gradient)",
    "grad_B_client": "E||gamma G_end D_c^T||^2 (one client's A increment in dL/dB, at the aggregated adapter)",
    "grad_B_increment": "E||gamma G_end Dbar^T||^2 (the clients' mean A increment in dL/dB, at the aggregated adapter)",
}
CLIENT_PROJECTIONS: tuple[str, ...] = ("output_client", "grad_A_client", "grad_B_client", "grad_B_increment")
QUANTITIES: tuple[str, ...] = tuple(QUANTITY_TEXT)


def check_names(quantity: str, scheme: str, regime: str) -> None:
    """Raise ValueError unless the names are known and the combination is defined."""
    if quantity not in QUANTITY_TEXT:
        raise ValueError(f"unknown quantity {quantity!r}; allowed: {', '.join(QUANTITIES)}")
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; allowed: {', '.join(SCHEMES)}")
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; allowed: {', '.join(REGIMES)}")
    if quantity == "aggregation_error" and base_scheme(scheme) == "fedsa":
        raise ValueError("aggregation_error compares a global update with the exact average of products; "
                         "FedSA-LoRA keeps B local, so it is defined for schemes ffa, fedit, exact only")
    if quantity in CLIENT_PROJECTIONS and base_scheme(scheme) not in ("ffa", "fedit"):
        raise ValueError(f"{quantity} is one client's contribution to a quantity of the averaged adapter; it is "
                         "defined for schemes ffa and fedit (FedSA's clients are the same random model as FedIT's)")
    if quantity in ("grad_B_client", "grad_B_increment") and not _a_moves(scheme, regime):
        raise ValueError(f"{quantity} projects the clients' A increments, which exist only where A trains "
                         "(not under FFA, nor in the one-step 'sgd' regime)")
    if quantity == "shared_output" and regime != "adam-refined":
        raise ValueError("shared_output is the update's part along the clients' shared descent direction, a part "
                         "only the 'adam-refined' regime has")
    if quantity == "loss_change" and regime == "adam":
        raise ValueError("loss_change is defined in the 'sgd' and 'adam-refined' regimes only (under 'adam' the "
                         "model's increments are independent of the gradient, so E<G, dW> = 0 by assumption)")


INDEPENDENT_A = "-indep"
"""Scheme suffix: every client draws its own A init (the server averages them), instead of one A
broadcast to all (peft, Flower and the harness broadcast one)."""


def base_scheme(scheme: str) -> str:
    """The aggregation rule of a scheme name, without the A-init suffix."""
    return scheme.removesuffix(INDEPENDENT_A)


def _own_init(scheme: str) -> bool:
    return scheme.endswith(INDEPENDENT_A)


def _a_moves(scheme: str, regime: str) -> bool:
    # FFA freezes A; one SGD step from B = 0 leaves A unchanged (dL/dA = gamma B^T G = 0).
    return regime != "sgd" and base_scheme(scheme) != "ffa"


def _gradient_input(regime: str) -> Mat:
    """The probe gradient's input direction: ``z`` in the refined regime (at angle ``kappa`` to the tokens'
    spike ``x``), else the probe input ``x`` itself."""
    return Mat.vector("z") if regime == "adam-refined" else Mat.vector_x()


def _probe_gradient(regime: str) -> Mat:
    """The probe's loss gradient w.r.t. W before the round, ``g x^T`` (refined: ``g z^T``), d x k."""
    return Mat.field("g") @ _gradient_input(regime).T


def _a_init(scheme: str, i: Idx) -> Mat:
    """Client i's A init: the broadcast A, or its own draw under an ``-indep`` scheme."""
    return Mat.field("Ai", i) if _own_init(scheme) else Mat.field("A")


def client_B(regime: str, i: Idx, scheme: str = "ffa", shared: bool = False) -> Mat:
    """Client i's B after the round (B starts at 0; it is built from the client's own A init). ``shared``
    (refined regime only): its part along the descent direction every client shares, ``-sqrt(phi) g/tau``."""
    if shared and regime != "adam-refined":
        raise ValueError("only the refined regime's B has a shared part")
    if regime == "adam":
        return Mat.field("B", i)
    a0 = _a_init(scheme, i)
    if regime == "adam-refined":
        # u_i = -sqrt(phi) g / tau + sqrt(1 - phi) w_i: the shared descent direction plus client noise
        u = Mat.field("g").scale(-sp.sqrt(SYM.phi) / SYM.tau)
        if not shared:
            u = u + Mat.field("w", i).scale(sp.sqrt(1 - SYM.phi))
        coherent = (u @ (a0 @ Mat.vector("z")).T).scale(sp.sqrt(SYM.f_in) * SYM.s_B / (SYM.s_A * sp.sqrt(SYM.X2)))
        return coherent if shared else coherent + Mat.field("B", i).scale(sp.sqrt(1 - SYM.f_in))
    return (Mat.field("G", i) @ a0.T).scale(-SYM.gamma * SYM.eta)


def client_A(scheme: str, regime: str, i: Idx) -> Mat:
    """Client i's A after the round."""
    a0 = _a_init(scheme, i)
    return a0 + Mat.field("D", i) if _a_moves(scheme, regime) else a0


def _abar(scheme: str, regime: str) -> Mat:
    if not _a_moves(scheme, regime) and not _own_init(scheme):
        return Mat.field("A")  # every client holds the same A: its average is A
    return Mat.client_average(lambda i: client_A(scheme, regime, i), "r", "k")


def _bbar(regime: str, scheme: str, shared: bool = False) -> Mat:
    return Mat.client_average(lambda i: client_B(regime, i, scheme, shared), "d", "r")


def _exact(scheme: str, regime: str, shared: bool = False) -> Mat:
    return Mat.client_average(lambda i: client_B(regime, i, scheme, shared) @ client_A(scheme, regime, i), "d",
                              "k").scale(SYM.gamma)


def update(scheme: str, regime: str, shared: bool = False) -> Mat:
    """The server's update dW (gamma included); ``shared``: its part built from the clients' shared B part
    (:func:`client_B`), the rest of the update being client noise."""
    if base_scheme(scheme) == "exact":
        return _exact(scheme, regime, shared)
    b, a = factors(scheme, regime, shared)
    return (b @ a).scale(SYM.gamma)


def factors(scheme: str, regime: str, shared: bool = False) -> tuple[Mat, Mat]:
    """The factors (B, A) of the adapter after aggregation, at which gradients are taken (``shared``: B's
    shared part in place of B).

    Exact aggregation merges the average of products into the frozen weight and restarts the
    adapter at ``(0, A)`` (B zero, A back at its init, as FLoRA-style methods re-initialise), so
    that is where its gradients are taken: ``dL/dA = gamma 0^T g x^T = 0`` there."""
    if base_scheme(scheme) == "fedsa":
        return client_B(regime, FIXED_CLIENT, scheme, shared), _abar(scheme, regime)
    if scheme == "exact":
        return Mat.zero("d", "r"), Mat.field("A")
    return _bbar(regime, scheme, shared), _abar(scheme, regime)


def _probe_at_end(scheme: str, regime: str) -> Mat:
    """The probe's gradient wrt W at the aggregated adapter (d x k)."""
    probe = _probe_gradient(regime)
    if regime == "adam-refined":  # each token's output gradient moved by the curvature times its output change,
        z = Mat.vector("z")       # summed as the gradient weighs the tokens: dW C_g, C_g = z z^T + nu_g I; lambda
        # along the clients' noise, lambda_s along the shared part dW_s: lambda (dW - dW_s) C_g + lambda_s dW_s C_g
        for dw, lam in ((update(scheme, regime), SYM.lam), (update(scheme, regime, shared=True), SYM.lam_s - SYM.lam)):
            probe = probe + (dw @ z @ z.T).scale(lam) + dw.scale(lam * SYM.nu_g)
    return probe


def _output_norm2(dw: Mat, regime: str, fac: IndexFactory) -> list[Term]:
    """``E||dW X^T||_F^2`` over the probe's tokens: ``||dW x||^2``, plus ``nu ||dW||_F^2`` from the isotropic
    input bulk of the refined regime (``C = x x^T + nu I``)."""
    y = dw @ Mat.vector_x()
    terms = frobenius_inner(y, y, fac)
    if regime == "adam-refined":
        terms += [t.scaled(SYM.nu) for t in frobenius_inner(dw, dw, fac)]
    return terms


def _client_projection(quantity: str, scheme: str, regime: str) -> Mat:
    """One client's (or, for ``grad_B_increment``, the clients' mean) contribution of CLIENT_PROJECTIONS."""
    c = FIXED_CLIENT
    if quantity == "output_client":
        return (client_B(regime, c, scheme) @ client_A(scheme, regime, c)).scale(SYM.gamma)
    probe = _probe_at_end(scheme, regime)
    if quantity == "grad_A_client":
        return (client_B(regime, c, scheme).T @ probe).scale(SYM.gamma)
    if quantity == "grad_B_client":
        return (probe @ Mat.field("D", c).T).scale(SYM.gamma)
    return (probe @ Mat.client_average(lambda i: Mat.field("D", i), "r", "k").T).scale(SYM.gamma)


def build(quantity: str, scheme: str, regime: str) -> list[Term]:
    """The scalar random quantity (before expectation) as a list of index terms."""
    check_names(quantity, scheme, regime)
    fac = IndexFactory()
    if quantity == "adapter_output":
        return _output_norm2(update(scheme, regime), regime, fac)
    if quantity == "shared_output":
        return _output_norm2(update(scheme, regime, shared=True), regime, fac)
    if quantity == "update_fro":
        dw = update(scheme, regime)
        return frobenius_inner(dw, dw, fac)
    if quantity in ("grad_A", "grad_B"):
        b, a = factors(scheme, regime)
        probe = _probe_at_end(scheme, regime)
        grad = (b.T @ probe if quantity == "grad_A" else probe @ a.T).scale(SYM.gamma)
        return frobenius_inner(grad, grad, fac)
    if quantity in CLIENT_PROJECTIONS:
        part = _client_projection(quantity, scheme, regime)
        if quantity == "output_client":  # the client's own update, applied to the probe's tokens
            return _output_norm2(part, regime, fac)
        return frobenius_inner(part, part, fac)
    if quantity == "aggregation_error":
        err = update(scheme, regime) - _exact(scheme, regime)
        return frobenius_inner(err, err, fac)
    # loss_change: the gradient of the objective the update is applied to
    if regime == "adam-refined":
        grad_w = _probe_gradient(regime)
    elif base_scheme(scheme) == "fedsa":
        grad_w = Mat.field("G", FIXED_CLIENT)
    else:
        grad_w = Mat.client_average(lambda i: Mat.field("G", i), "d", "k")
    return frobenius_inner(grad_w, update(scheme, regime), fac)
