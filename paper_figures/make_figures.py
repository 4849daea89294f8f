"""``sfed-figures`` / ``python -m paper_figures``: regenerate every paper figure.

    sfed-figures                          # all figures -> figures/ (PNG + PDF) from results/
    sfed-figures --out DIR --results DIR  # other folders
    sfed-figures --only a d e             # a subset
    sfed-figures --rerun                  # re-run all four CPU grids (harness), store results, then draw
    sfed-figures --rerun --experiments scaling curves   # only the grids of the main figure and (a)-(d)
    sfed-figures --rerun --grids gpu --results-dir results_gpu   # the larger GPU grids
    sfed-figures --update-docs            # also copy the main figure to docs/main_figure.png

Without ``--rerun`` nothing is trained: (a)-(d) and the main figure read the stored results
(``results/scaling.parquet``, ``results/curves.parquet``), (g) and (h) the convergence study and
the norm check (``results/convergence.parquet``, ``results/normcheck.parquet``), (e) and (f) evaluate
the theory API. A missing results file is an error that names the file and how to re-create it.
``--rerun`` runs the experiments' grids through :func:`paper_figures.experiments.rerun` (resumable,
pinned to the committed harness, provenance in ``results/manifest.json``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from paper_figures import experiments
from validation.config import parse_overrides  # torch-free

__all__ = ["FIGURES", "Figure", "expected_files", "build", "main", "MAIN_FIGURE", "DOCS_COPY"]

ROOT = Path(__file__).resolve().parent.parent
MAIN_FIGURE = "fig_main_update_vs_clients"
DOCS_COPY = ROOT / "docs" / "main_figure.png"


@dataclass(frozen=True)
class Figure:
    key: str
    stem: str
    experiment: str | None  # stored results it needs (None: theory only)
    describe: str
    also: tuple[str, ...] = ()  # further stored results it reads

    @property
    def needs(self) -> tuple[str, ...]:
        """Every experiment whose stored results the figure reads."""
        return tuple(e for e in (self.experiment, *self.also) if e)

    def draw(self, results: dict, out: Path, formats: tuple[str, ...]) -> list[Path]:
        from paper_figures import convergence_figs as C
        from paper_figures import correlation_figs as CF
        from paper_figures import empirical_figs as E
        from paper_figures import coherent_share_figs as CS
        from paper_figures import response_figs as RS
        from paper_figures import end_gradient_figs as EG
        from paper_figures import gradient_figs as G
        from paper_figures import hetero_figs as H
        from paper_figures import line_probe_figs as LP
        from paper_figures import local_steps_figs as LS
        from paper_figures import lr_transfer as L
        from paper_figures import matched_step_figs as MS
        from paper_figures import theory_figs as T

        norms = lambda: E.default_slice(results["gradient_check"])  # noqa: E731  FFA, Dirichlet, AdamW
        fns: dict[str, Callable[..., list[Path]]] = {
            "main": lambda: E.fig_main(norms(), out, formats, fit_on=_refined(results)),
            "a": lambda: E.fig_a_grad_vs_rank(norms(), out, formats, fit_on=_refined(results)),
            "b": lambda: E.fig_b_grad_vs_clients(norms(), out, formats, fit_on=_refined(results)),
            "c": lambda: E.fig_c_loss_curves(results["curves"], out, formats),
            "d": lambda: E.fig_d_pred_vs_meas(norms(), out, formats, fit_on=_refined(results)),
            "e": lambda: T.fig_e_moment_heatmap(out, formats=formats),
            "f": lambda: T.fig_f_rho(out, formats=formats),
            "g": lambda: C.fig_convergence(results["convergence"], out, formats),
            # n_boot=400 as in convergence_figs.draw_all (same figure; 1000 takes ~85 s here)
            "h": lambda: C.fig_normcheck(C.normcheck_fits(results["normcheck"], n_boot=400), out, formats),
            "i": lambda: G.fig_gradient_check(G.slope_fits(results["gradient_check"], refined=_refined(results)), out,
                                              formats,
                                              title="AdamW, FFA / FedIT / FedSA x IID / Dirichlet: slopes in N and r "
                                                    "of four norms"),
            "k": lambda: G.fig_gradient_check(G.slope_fits(results["gradient_check_sgd"]), out, formats,
                                              stem="fig_gradient_check_sgd",
                                              title="SGD, FFA / FedIT x IID / Dirichlet: slopes in N and r of four "
                                                    "norms (canonical model)"),
            "j": lambda: L.fig_lr_transfer(results["lr_transfer"], out, formats),
            "l": lambda: H.fig_hetero_ranks(results["hetero_ranks"], out, formats),
            "m": lambda: H.fig_hetero_lr(results["hetero_lr"], out, formats),
            "n": lambda: G.fig_probe_source(results["gradient_check"], results["gradient_check_heldout"], out, formats),
            "o": lambda: EG.fig_end_gradient({"lr 1e-3": results["gradient_check"],
                                              "lr 2.5e-4": results["gradient_check_small_lr"]}, out, formats),
            "p": lambda: CF.fig_client_correlation(_with_two_clients(results), out, formats, refined=_refined(results)),
            "q": lambda: G.fig_probe_size(_probe_fits(results), out, formats),
            "r": lambda: CF.fig_label_law(_with_two_clients(results), results["gradient_check_strong_skew"], out, formats),
            "s": lambda: LP.fig_line_probe(results["gradient_check_line"], out, formats),
            "t": lambda: EG.fig_end_gradient(_one_and_two_steps(results), out, formats, stem="fig_one_step",
                                             title="End-of-round dL/dB over its start, FFA, AdamW, lr 1e-3, one round, "
                                                   "seeds 0-8."),
            "u": lambda: LS.fig_local_steps({1: results["gradient_check_one_step"], 2: results["gradient_check"],
                                             3: results["gradient_check_three_steps"]}, out, formats),
            "v": lambda: CS.fig_coherent_share(results["gradient_check_coherent"], _refined(results), out, formats),
            "w": lambda: RS.fig_response_shape({"12 layers": results["gradient_check_response"],
                                                "one layer": results["gradient_check_one_layer"]}, out, formats),
            "x": lambda: MS.fig_matched_step(results["gradient_check"], results["gradient_check_matched_gamma"], out,
                                             formats, one_client=results["gradient_check_matched_gamma_one_client"]),
        }
        return fns[self.key]()


def _probe_fits(results: dict) -> pd.DataFrame:
    """Slopes in N for the three probes of figure (q): the check's 32 training-set examples, 32 held-out, 128."""
    from paper_figures import gradient_figs as G

    fits = G.probe_variant_fits(results["gradient_check"], {"held-out, 32": results["gradient_check_heldout"],
                                                            "training set, 128": results["gradient_check_large_probe"]})
    return fits.replace({"probe": {"train": "training set, 32"}})


def _one_and_two_steps(results: dict) -> dict[str, pd.DataFrame]:
    """Figure (t)'s runs: the gradient check with one local step and the stored check (two) on the same seeds."""
    one = results["gradient_check_one_step"]
    two = results["gradient_check"]
    return {"two local steps": two[two.seed.isin(one.seed.unique())], "one local step": one}


def _with_two_clients(results: dict) -> pd.DataFrame:
    """The gradient check with its N = 2 pilot runs at its learning rate, when those are among ``results``."""
    from validation.analysis import with_pilot_runs

    return with_pilot_runs(results["gradient_check"], results.get("gradient_check_two_clients"))


_RESULTS_DIR = "_results_dir"
"""Key of ``results`` (besides the experiments' tables): the folder they were read from."""
REFINED_PILOT = "gradient_check_coherent"
"""The pilot rerun that measured the gradient's input direction: when it is stored, the figures' refined model is
the README's (two vectors, the pilot's measured curvature); else one probe vector and one curvature."""
STORED_PARAMS = {True: "gradient_check_two_vectors_measured_curvature_refined_params.csv",
                 False: "gradient_check_refined_params.csv"}
"""Whether :data:`REFINED_PILOT` is stored -> the exponent table whose refined parameters the figures read."""


def _refined(results: dict) -> dict:
    """The refined model fitted once on the gradient check's pilot (N <= 4, with the N = 2 runs), shared by
    every figure drawn from ``results`` (main, a, b, d, i, p and v use it): the exponent table's stored fit
    (:data:`STORED_PARAMS`) when it was fitted on these very rows (:mod:`validation.refined_store`), else fitted
    here."""
    if "_refined_gradient_check" not in results:
        from paper_figures.empirical_figs import refined_params

        rows, pilot = _with_two_clients(results), results.get(REFINED_PILOT)
        stored = Path(results[_RESULTS_DIR]) / STORED_PARAMS[pilot is not None] if _RESULTS_DIR in results else None
        results["_refined_gradient_check"] = refined_params(rows, stored=stored, pilot=pilot)
    return results["_refined_gradient_check"]


FIGURES: tuple[Figure, ...] = (
    Figure("main", MAIN_FIGURE, "gradient_check", "aggregated update norm and adapter output vs N, per rule",
           also=("gradient_check_two_clients",)),
    Figure("a", "fig_a_grad_vs_rank", "gradient_check", "adapter gradient norms vs rank, one line per N, per rule",
           also=("gradient_check_two_clients",)),
    Figure("b", "fig_b_grad_vs_clients", "gradient_check", "adapter gradient norms vs N, one line per rank, per rule",
           also=("gradient_check_two_clients",)),
    Figure("c", "fig_c_loss_curves", "curves", "train loss / eval accuracy per round at high rank, per rule"),
    Figure("d", "fig_d_pred_vs_meas", "gradient_check", "predicted vs measured norms (log-log, y = x)",
           also=("gradient_check_two_clients",)),
    Figure("e", "fig_e_moment_heatmap", None, "theory: adapter output moment over (N, r) per rule"),
    Figure("f", "fig_f_rho_gamma", None, "theory: client correlation rho vs optimal gamma and moment"),
    Figure("g", "fig_convergence", "convergence",
           "final eval accuracy vs rank per rule (one untuned learning rate), eval-loss curves at the top rank"),
    Figure("h", "fig_normcheck", "normcheck",
           "measured vs predicted slope of the update norm in N and r, per rule and split"),
    Figure("i", "fig_gradient_check", "gradient_check",
           "AdamW: measured vs predicted slopes of the four norms (canonical, refined out of sample)",
           also=("gradient_check_two_clients",)),
    Figure("j", "fig_lr_transfer", "lr_transfer", "final eval loss vs learning rate per rule, N and r; optima"),
    Figure("k", "fig_gradient_check_sgd", "gradient_check_sgd", "SGD: measured vs predicted slopes of the four norms"),
    Figure("l", "fig_hetero_ranks", "hetero_ranks",
           "clients of ranks (4, 16, 64): the aggregate's size vs N per rule, measured and derived"),
    Figure("m", "fig_hetero_lr", "hetero_lr",
           "clients of ranks (4, 16, 64): final eval accuracy vs learning rate per rule, tuned optima"),
    Figure("n", "fig_probe_source", "gradient_check_heldout",
           "output and gradient norms vs N with the probe from the training set or from held-out examples",
           also=("gradient_check",)),
    Figure("o", "fig_end_gradient", "gradient_check_small_lr",
           "end-of-round dL/dB over its start vs N (two learning rates) and the floor an affine model allows",
           also=("gradient_check",)),
    Figure("p", "fig_client_correlation", "gradient_check_two_clients",
           "the clients' correlations vs K (2, 4, 16), the 1/(K-1) and 1/K laws fixed at K = 2, 4, the label law, the refined model",
           also=("gradient_check",)),
    Figure("q", "fig_probe_size", "gradient_check_large_probe",
           "slopes in N of the probe-dependent norms with CIs: training-set probe of 32 and 128, held-out probe of 32",
           also=("gradient_check", "gradient_check_heldout")),
    Figure("r", "fig_label_law", "gradient_check_strong_skew",
           "the label law of the client correlation fitted on the pilot, against a Dirichlet(0.1) split and K = 8",
           also=("gradient_check", "gradient_check_two_clients")),
    Figure("s", "fig_line_probe", "gradient_check_line",
           "dL/dB along the round's own update (W0 + c dW) against the affine form, rsLoRA's and SFed's updates"),
    Figure("t", "fig_one_step", "gradient_check_one_step",
           "end-of-round dL/dB over its start vs N with one and with two local steps, and the floor an affine model allows",
           also=("gradient_check",)),
    Figure("u", "fig_local_steps", "gradient_check_three_steps",
           "the gradients' slopes in N against the clients' local steps (one, two, three), SFed and rsLoRA",
           also=("gradient_check", "gradient_check_one_step")),
    Figure("v", "fig_coherent_share", "gradient_check_coherent",
           "the refined model's input-coherent share f_in measured on the clients' B increments vs rank, and as fitted",
           also=("gradient_check", "gradient_check_two_clients")),
    Figure("w", "fig_response_shape", "gradient_check_response",
           "where the probe gradient's change within the round comes from (top input direction, output alignment) "
           "vs rank, twelve adapted layers and one, against the refined model's curvature term",
           also=("gradient_check_one_layer",)),
    Figure("x", "fig_matched_step", "gradient_check_matched_gamma",
           "SFed's N = 16 gamma taken by four clients (alpha 32): end-of-round gradients against N = 16 at the same "
           "gamma, N = 4 at alpha 16, and N = 16 predicted from N = 1 and 4 at its gamma",
           also=("gradient_check", "gradient_check_matched_gamma_one_client")),
)
_BY_KEY = {f.key: f for f in FIGURES}


def expected_files(out: str | Path, keys: Sequence[str] | None = None,
                   formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Every file ``build`` writes for ``keys`` (default all figures)."""
    keys = list(keys) if keys else [f.key for f in FIGURES]
    return [Path(out) / f"{_BY_KEY[k].stem}.{fmt}" for k in keys for fmt in formats]


def build(out: str | Path = "figures", results_dir: str | Path = experiments.DEFAULT_RESULTS, *,
          keys: Sequence[str] | None = None, formats: Sequence[str] = ("png", "pdf"),
          verbose: bool = True) -> list[Path]:
    """Draw the figures ``keys`` (default all) into ``out`` from stored results; return the files.

    Raises :class:`paper_figures.experiments.MissingResults` before drawing anything if a needed
    results file is absent.
    """
    keys = list(keys) if keys else [f.key for f in FIGURES]
    unknown = [k for k in keys if k not in _BY_KEY]
    if unknown:
        raise ValueError(f"unknown figure(s) {unknown}; choose from {[f.key for f in FIGURES]}")
    out = Path(out)
    formats = tuple(formats)
    needed = sorted({e for k in keys for e in _BY_KEY[k].needs})
    results = {exp: experiments.load(exp, results_dir) for exp in needed}  # fail early, before drawing
    if ("gradient_check" in results and REFINED_PILOT not in results
            and experiments.results_path(REFINED_PILOT, results_dir).is_file()):
        results[REFINED_PILOT] = experiments.load(REFINED_PILOT, results_dir)  # optional: the refined model's inputs
    results[_RESULTS_DIR] = Path(results_dir)
    written: list[Path] = []
    for k in keys:
        fig = _BY_KEY[k]
        t0 = time.perf_counter()
        paths = fig.draw(results, out, formats)
        written.extend(paths)
        if verbose:
            print(f"({fig.key}) {fig.describe}: {', '.join(p.name for p in paths)} "
                  f"[{time.perf_counter() - t0:.1f} s]", flush=True)
    return written


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sfed-figures", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="figures: " + "; ".join(f"{f.key} = {f.describe}" for f in FIGURES))
    ap.add_argument("--out", default="figures", help="output folder (default figures/)")
    ap.add_argument("--results", "--results-dir", dest="results", default=str(experiments.DEFAULT_RESULTS),
                    help="stored results folder (default: the committed results/)")
    ap.add_argument("--only", nargs="+", metavar="KEY", help=f"draw only these figures ({', '.join(f.key for f in FIGURES)})")
    ap.add_argument("--formats", nargs="+", default=["png", "pdf"], help="file formats (default png pdf)")
    ap.add_argument("--update-docs", action="store_true", help=f"copy the main figure PNG to {DOCS_COPY}")
    g = ap.add_argument_group("re-running the experiments (trains models; minutes on CPU)")
    g.add_argument("--rerun", action="store_true",
                   help="re-run the experiments' grids (see --experiments), store the results, then draw")
    g.add_argument("--grids", choices=experiments.GRID_SETS, default="cpu",
                   help="grid set: cpu (default; measured on 2 idle CPU cores: scaling 54 runs 99 s, curves "
                        "12 runs 192 s; on 2 shared cores: normcheck 72 runs 27 min with 1 worker, "
                        "convergence 96 runs 29 min with 2 workers), gpu (paper_figures/grids/gpu_*.json; "
                        "no gpu normcheck grid) or quick (the synthetic task, where a grid exists)")
    g.add_argument("--experiments", nargs="+", choices=experiments.EXPERIMENTS, default=None,
                   help="default: every experiment with a grid file in --grids")
    g.add_argument("--work-dir", default="runs/paper_figures",
                   help="per-run files of the harness (resumable; one subfolder per harness-code digest)")
    g.add_argument("--no-resume", action="store_true", help="re-run cells already finished in --work-dir")
    g.add_argument("--allow-dirty", action="store_true",
                   help="run even if validation/ or sfed_theory/ differ from the committed HEAD "
                        "(recorded in the manifest)")
    g.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a RunConfig field of every grid's base, e.g. device=cuda max_examples=300")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 missing results, 2 bad arguments)."""
    ns = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if ns.rerun:
            exps = ns.experiments or [e for e in experiments.EXPERIMENTS if experiments.grid_file(e, ns.grids).is_file()]
            experiments.rerun(ns.results, grid_set=ns.grids, experiments=tuple(exps),
                              work_dir=ns.work_dir, resume=not ns.no_resume, allow_dirty=ns.allow_dirty,
                              **parse_overrides(ns.set))
        t0 = time.perf_counter()
        paths = build(ns.out, ns.results, keys=ns.only, formats=ns.formats)
    except experiments.MissingResults as e:
        print(f"sfed-figures: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, RuntimeError) as e:
        print(f"sfed-figures: error: {e}", file=sys.stderr)
        return 2
    print(f"{len(paths)} files in {Path(ns.out).resolve()} ({time.perf_counter() - t0:.1f} s)")
    if ns.update_docs:
        src = Path(ns.out) / f"{MAIN_FIGURE}.png"
        if not src.is_file():
            print(f"sfed-figures: error: --update-docs needs {src} (draw the main figure too)", file=sys.stderr)
            return 2
        DOCS_COPY.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, DOCS_COPY)
        print(f"main figure copied to {DOCS_COPY}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
