"""The gradient checks' stored exponent tables, regenerated from the stored results.

``results/<check>_exponents.csv``: one row per slope (scheme, split, rule, quantity, axis, fixed value)
with its bootstrap CI and every prediction (:func:`validation.analysis.fit_exponents`), over the check's own
grid (N in {1, 4, 16}, r in {4, 16, 64});
``results/<check>_refined_params.csv``: the refined model's parameters behind ``predicted_refined``,
fitted on the check's pilot, with its N = 2 runs at the same learning rate where :data:`PILOT_RUNS` names them
(:func:`validation.analysis.with_pilot_runs`), and the probe's input bulk ``nu`` measured at the round's start
(``results/probe_inputs.csv`` for checks stored before the harness recorded it,
:mod:`paper_figures.probe_input_table`). With ``--f-in top`` or ``--f-in probe`` the input-coherent share
``f_in`` is not fitted but held at the clients' share measured on the check's pilot (:data:`MEASURED_F_IN`,
:func:`validation.analysis.measured_f_in`): along the probe's top input direction (``inc_B_coherent``) or over
its whole input spectrum (``inc_B_coherent_probe``), into ``results/<check>_f_in_<top|probe>_{exponents,
refined_params}.csv``; ``--f-in grad`` takes the model's probe vector to be the probe gradient's own input
direction (:data:`GRADIENT_DIRECTION`): f_in along it (``inc_B_coherent_grad``) and ``nu`` from the tokens'
energy along it (``grad_input_share``). ``--two-vectors`` keeps both of the data's directions: the gradient's
``z`` (the probe gradient ``g z^T``, B's coherent part built from ``A z``, the curvature response summed as the
gradient weighs the tokens, with the bulk from ``grad_input_share``) and the tokens' spike ``x`` (the output, with
the check's own bulk), at the angle measured on the same pilot (``kappa``,
:func:`validation.analysis.measured_kappa`), into ``results/<check>[_f_in_grad]_two_vectors_{exponents,
refined_params}.csv`` (with ``--f-in grad``, f_in held at the share along ``A z``). ``--pilot-max-n 16`` fits
the refined model on every N of the grid (``_pilot_n16`` in the file names): every slope is then in-sample, so the
table measures how far the model's form can follow the data at all (a ceiling of the form), not a prediction.
``--rule sfed`` fits and tabulates one rule's runs alone (``_rule_sfed``; its N = 1 runs are rsLoRA's where the grid
ran only rsLoRA there): parameters free to differ between rules, so a slope missed even then is missed by the form at
that rule's steps, not by parameters that fail to carry over from one rule's gamma to another's.
``--saturating`` gives the update's shared part (along the direction every client descends) a curvature of its
own that falls with its step, ``lambda/(1 + step/t0)``, ``t0`` fitted on the pilot (``_saturating``).
``--rank-curvature`` lets the curvature follow a rank law instead, ``lambda (r/16)^lam_rank``, its exponent fitted
on the pilot (``_rank_curvature``): the measured secant curvature along the update (``curvature``) grows about as
``r^1`` at every rule, N and step size, faster than the model's geometry gives a rank-free ``lambda``.
``--measured-curvature`` takes that measurement itself instead: lambda at each point is such that the model's secant
curvature along its update is one fitted scale times the pilot's measured one at the point's rule and rank
(``_measured_curvature``; :func:`validation.analysis.measured_curvature`, FedSA takes FedIT's).
``--measured-correlation`` is a diagnostic: the client correlations measured at every K of the grid, N = 16 included
(:func:`validation.analysis.measured_correlation_targets`), replace the label law's prediction from the pilot
(``_measured_correlation``; every slope in-sample), so a slope missed even then is not missed for the correlation.
Deterministic given ``n_boot`` and the seed::

    python -m paper_figures.exponent_tables [--checks gradient_check gradient_check_small_lr] [--n-boot 1000]
    python -m paper_figures.exponent_tables --checks gradient_check --f-in probe
    python -m paper_figures.exponent_tables --checks gradient_check --two-vectors
    python -m paper_figures.exponent_tables --checks gradient_check --two-vectors --pilot-max-n 16
    python -m paper_figures.exponent_tables --checks gradient_check --two-vectors --pilot-max-n 16 --rule sfed
    python -m paper_figures.exponent_tables --checks gradient_check --two-vectors --saturating
    python -m paper_figures.exponent_tables --checks gradient_check --two-vectors --rank-curvature
    python -m paper_figures.exponent_tables --checks gradient_check --two-vectors --measured-curvature
    python -m paper_figures.exponent_tables --checks gradient_check --two-vectors --measured-curvature --measured-correlation
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import pandas as pd

from paper_figures.experiments import DEFAULT_RESULTS, load
from paper_figures.probe_input_table import rows_nu
from validation.config import PILOT_MAX_N  # the pilot's default largest N: slopes reaching N = 16 are predictions

__all__ = ["PILOT_MAX_N", "PILOT_RUNS", "MEASURED_F_IN", "F_IN_CHOICES", "GRADIENT_DIRECTION", "exponent_table", "write_tables",
           "two_vector_inputs", "main"]

PILOT_RUNS = {"gradient_check": "gradient_check_two_clients", "gradient_check_small_lr": "gradient_check_two_clients",
              "gradient_check_one_step": None, "gradient_check_sgd": None}
"""Each check -> the experiment whose runs join its pilot at its learning rate (None: its own pilot only). The
refined model is AdamW's: the SGD check's table has no refined column."""
MEASURED_F_IN = {"gradient_check": "gradient_check_coherent"}
"""Each check -> the experiment that reran its pilot with ``inc_B_coherent`` (the same settings and seeds 0-2)."""
F_IN_CHOICES = {"fitted": None, "top": "inc_B_coherent", "probe": "inc_B_coherent_probe", "grad": "inc_B_coherent_grad"}
"""``--f-in`` -> the measured column f_in is held at (None: fitted)."""
GRADIENT_DIRECTION = ("grad",)
"""``--f-in`` choices whose model takes its probe vector ``x`` to be the probe gradient's input direction ``x_g``
rather than the tokens' spike: ``nu`` then comes from the pilot's share of the tokens' energy along ``x_g``
(``grad_input_share``)."""
CURVATURE_STEMS = {"one": "", "saturating": "_saturating", "rank": "_rank_curvature", "measured": "_measured_curvature"}
"""Each curvature law (:data:`validation.refined.CURVATURE_LAWS`) -> its tables' file-name part."""


def exponent_table(check: str, results: Path = DEFAULT_RESULTS, n_boot: int = 1000,
                   f_in: str = "fitted", two_vectors: bool = False,
                   pilot_max_n: int = PILOT_MAX_N, rule: str | None = None,
                   curvature_law: str = "one", correlation_law: str = "label") -> tuple[pd.DataFrame, dict]:
    """``(fits, refined parameters)`` of a stored check (:data:`PILOT_RUNS`); ``f_in``: a key of
    :data:`F_IN_CHOICES` (``"top"``, ``"probe"``: held at :data:`MEASURED_F_IN`'s pilot measurement);
    ``two_vectors``: the gradient's direction and the tokens' spike as two vectors (:func:`_input_directions`);
    ``pilot_max_n``: the largest N the refined model is fitted on (the measured inputs f_in, kappa and nu_g
    keep their own pilot); ``refined_sample`` labels a slope in-sample when its N stay within it. ``rule``: fit and
    tabulate that rule's runs alone (None: every rule, one fit for all); the measured inputs keep every rule's runs.
    ``curvature_law`` (:data:`validation.refined.CURVATURE_LAWS`): ``"saturating"``, the update's shared part meets
    a curvature that falls with its own step (one more fitted parameter, ``t0``); ``"rank"``, the curvature follows
    a rank law (one more fitted parameter, ``lam_rank``); ``"measured"``, lambda follows the pilot's measured secant
    curvature per rule and rank (no parameter added); ``"one"``, one curvature. ``correlation_law``
    (:data:`validation.analysis.CORRELATION_LAWS`): ``"label"``, the label law fitted on the pilot; ``"measured"``, the
    correlation measured at every K (a diagnostic: every slope is then in-sample, ``refined_sample == "in"``)."""
    fits, params, _ = _fit_tables(check, results, n_boot, f_in, two_vectors, pilot_max_n, rule, curvature_law,
                                  correlation_law)
    return fits, params


def _fit_tables(check: str, results: Path, n_boot: int, f_in: str, two_vectors: bool, pilot_max_n: int,
                rule: str | None, curvature_law: str,
                correlation_law: str = "label") -> tuple[pd.DataFrame, dict, pd.DataFrame]:
    """:func:`exponent_table`'s ``(fits, params)`` and the rows the parameters were fitted on."""
    from validation.analysis import fit_exponents, measured_f_in, refined_fits

    if check not in PILOT_RUNS:
        raise ValueError(f"unknown check {check!r}; allowed: {', '.join(PILOT_RUNS)}")
    if pilot_max_n < 1:
        raise ValueError(f"pilot_max_n must be at least 1, got {pilot_max_n}")
    if f_in not in F_IN_CHOICES:
        raise ValueError(f"f_in must be one of {tuple(F_IN_CHOICES)}, got {f_in!r}")
    if (F_IN_CHOICES[f_in] or two_vectors) and check not in MEASURED_F_IN:
        raise ValueError(f"no measured f_in or kappa for {check!r}; measured for: {', '.join(MEASURED_F_IN)}")
    df = load(check, results)
    if rule is not None and rule not in set(df.rule):
        raise ValueError(f"no {rule!r} runs in {check!r}; its rules: {', '.join(sorted(set(df.rule)))}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        column = F_IN_CHOICES[f_in]
        pilot = load(MEASURED_F_IN[check], results) if column or two_vectors else None
        held = measured_f_in(pilot, column=column) if column else None
        nu, kappa, nu_g = _input_directions(df, pilot, results, f_in in GRADIENT_DIRECTION, two_vectors)
        rows = _one_rule(fitted_rows(check, results), rule)
        params = refined_fits(rows, nu=nu, f_in=held, kappa=kappa, nu_g=nu_g, pilot_max_n=pilot_max_n,
                              curvature_law=curvature_law, correlation_law=correlation_law)
        fits = fit_exponents(_one_rule(df, rule), n_boot=n_boot, refined=params or False, pilot_max_n=pilot_max_n)
        if correlation_law == "measured":  # N = 16's own correlation entered: no slope is a prediction
            fits.loc[fits["refined_sample"] == "out", "refined_sample"] = "in"
        return fits, params, rows  # slopes over the check's own grid


def fitted_rows(check: str, results: Path = DEFAULT_RESULTS) -> pd.DataFrame:
    """The rows the check's refined model is fitted on: its own, with :data:`PILOT_RUNS`' pilot runs."""
    from validation.analysis import with_pilot_runs

    extra = PILOT_RUNS[check]
    df = load(check, results)
    return with_pilot_runs(df, load(extra, results)) if extra else df


def _one_rule(rows: pd.DataFrame, rule: str | None) -> pd.DataFrame:
    """``rows`` of ``rule`` alone, its N = 1 runs included where only rsLoRA ran them
    (:func:`validation.analysis.identical_n1_runs`); None: ``rows`` as they are."""
    from validation.analysis import identical_n1_runs

    if rule is None:
        return rows
    rows = identical_n1_runs(rows)
    return rows[rows.rule == rule]


def _input_directions(df: pd.DataFrame, pilot: pd.DataFrame | None, results: Path, gradient_x: bool,
                      two_vectors: bool) -> tuple[float, float, float | None]:
    """``(nu, kappa, nu_g)`` of the refined model: one probe vector at the tokens' spike (its bulk from the
    check's runs), or (``gradient_x``) at the gradient's input direction (its bulk from the tokens' share along
    it), or (``two_vectors``) both: the spike's bulk for the output, the gradient direction's for the gradients,
    at the angle measured on the pilot rerun."""
    from validation.analysis import measured_kappa, measured_nu
    from validation.metrics import ALL

    if not (gradient_x or two_vectors):
        return rows_nu(df, results), 1.0, None
    assert pilot is not None
    rows = pilot[pilot.n_clients <= 4]
    grad_nu = measured_nu(rows[rows.layer == ALL], "grad_input_share")
    if two_vectors:
        return rows_nu(df, results), measured_kappa(rows), grad_nu
    return grad_nu, 1.0, None


def two_vector_inputs(df: pd.DataFrame, pilot: pd.DataFrame,
                      results: Path = DEFAULT_RESULTS) -> tuple[float, float, float]:
    """``(nu, kappa, nu_g)`` of the two-vector model (``--two-vectors``) for a check's rows ``df`` and its pilot
    rerun ``pilot`` (:data:`MEASURED_F_IN`'s experiment): the tokens' bulk, the angle between the gradient's input
    direction and the tokens' spike, and the gradient direction's bulk, as the stored tables use them."""
    nu, kappa, nu_g = _input_directions(df, pilot, results, False, True)
    assert nu_g is not None
    return nu, kappa, nu_g


def write_tables(check: str, results: Path = DEFAULT_RESULTS, n_boot: int = 1000, f_in: str = "fitted",
                 two_vectors: bool = False, pilot_max_n: int = PILOT_MAX_N, rule: str | None = None,
                 curvature_law: str = "one", correlation_law: str = "label") -> list[Path]:
    """Write the check's exponent table (and its refined parameters) into ``results``; returns the paths."""
    fits, params, rows = _fit_tables(check, results, n_boot, f_in, two_vectors, pilot_max_n, rule, curvature_law,
                                     correlation_law)
    stem = (check + ("" if f_in == "fitted" else f"_f_in_{f_in}") + ("_two_vectors" if two_vectors else "")
            + CURVATURE_STEMS[curvature_law] + ("_measured_correlation" if correlation_law == "measured" else "")
            + ("" if pilot_max_n == PILOT_MAX_N else f"_pilot_n{pilot_max_n}") + (f"_rule_{rule}" if rule else ""))
    out = [results / f"{stem}_exponents.csv"]
    fits.to_csv(out[0], index=False)
    if params:
        out.append(results / f"{stem}_refined_params.csv")
        from validation.refined_store import write_params

        write_params(params, out[1], rows)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m paper_figures.exponent_tables", description=__doc__.split("\n")[0])
    ap.add_argument("--checks", nargs="+", default=["gradient_check", "gradient_check_small_lr"], choices=list(PILOT_RUNS))
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--f-in", choices=list(F_IN_CHOICES), default="fitted",
                    help="fit the refined model's coherent share, or hold it at the pilot's measurement along the "
                         "probe's top input direction (top), over its whole input spectrum (probe), or along the "
                         "probe gradient's own input direction, which the model's x then is (grad)")
    ap.add_argument("--two-vectors", action="store_true",
                    help="the probe gradient's input direction (the gradients) and the tokens' spike (the output) as "
                         "two vectors at their measured angle (default: one probe vector)")
    ap.add_argument("--pilot-max-n", type=int, default=PILOT_MAX_N,
                    help="the largest N the refined model is fitted on; the grid's largest makes every slope "
                         "in-sample: a ceiling of the model's form, not a prediction")
    ap.add_argument("--rule", default=None,
                    help="fit and tabulate this rule's runs alone (lora, rslora, sfed, ...): whether the model's form "
                         "follows one rule's steps when its parameters need not carry over to another rule's")
    law = ap.add_mutually_exclusive_group()  # one curvature law at a time; default: one curvature
    law.add_argument("--saturating", dest="curvature_law", action="store_const", const="saturating", default="one",
                     help="the update's shared part (along the direction every client descends) meets a curvature "
                          "falling with its own step, lambda/(1 + step/t0), t0 fitted on the pilot (default: one "
                          "curvature)")
    law.add_argument("--rank-curvature", dest="curvature_law", action="store_const", const="rank",
                     help="the curvature follows a rank law, lambda (r/16)^lam_rank, its exponent fitted on the pilot "
                          "(default: the same curvature at every rank)")
    law.add_argument("--measured-curvature", dest="curvature_law", action="store_const", const="measured",
                     help="lambda follows the secant curvature along the update measured on the pilot per rule and "
                          "rank (default: the same curvature everywhere)")
    ap.add_argument("--measured-correlation", dest="correlation_law", action="store_const", const="measured",
                    default="label", help="a diagnostic: the client correlation measured at every K, N = 16 included, "
                                          "instead of the label law's prediction from the pilot (every slope in-sample)")
    ns = ap.parse_args(argv)
    for check in ns.checks:
        for path in write_tables(check, ns.results, ns.n_boot, ns.f_in, ns.two_vectors, ns.pilot_max_n, ns.rule,
                                 ns.curvature_law, ns.correlation_law):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
