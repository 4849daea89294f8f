"""How the update responds to gamma at a fixed rank and N, with one local step and with two, from stored results.

``results/gamma_response.csv``: per (scheme, split, local steps, rank, N) and rule, the ratio to LoRA's of the
clients' increment size, the first-order probe-loss change per unit gamma and the secant curvature along the update,
each with its seed-paired bootstrap CI (:func:`validation.gamma_response.rule_ratios`), over the default check
(``gradient_check``: two local steps) and its one-step rerun (``gradient_check_one_step``: FFA, seeds 0-8)::

    python -m paper_figures.gamma_response_table [--results results] [--n-boot 1000]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from paper_figures.experiments import DEFAULT_RESULTS, load

__all__ = ["CHECKS", "gamma_response_table", "main"]

CHECKS = ("gradient_check", "gradient_check_one_step")
"""The stored checks compared: two local steps (the default) and one."""


def gamma_response_table(results: Path = DEFAULT_RESULTS, n_boot: int = 1000) -> pd.DataFrame:
    """:func:`validation.gamma_response.rule_ratios` of :data:`CHECKS`' runs, with LoRA as the reference."""
    from validation.gamma_response import rule_ratios

    return pd.concat([rule_ratios(load(check, results), n_boot=n_boot).assign(check=check) for check in CHECKS],
                     ignore_index=True)


def _summary(t: pd.DataFrame) -> str:
    """One line per (local steps, metric, rule): the range of the ratios and how many CIs exclude 1."""
    lines = []
    for (steps, metric, rule), g in t.groupby(["local_steps", "metric", "rule"]):
        moved = int(((g.ci_low > 1) | (g.ci_high < 1)).sum())
        lines.append(f"{steps} step(s) {metric:>14} {rule:>6}: ratio to LoRA {g.ratio.min():.3f}-{g.ratio.max():.3f}, "
                     f"CI excludes 1 at {moved}/{len(g)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m paper_figures.gamma_response_table",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    ap.add_argument("--n-boot", type=int, default=1000)
    ns = ap.parse_args(argv)
    t = gamma_response_table(ns.results, ns.n_boot)
    path = ns.results / "gamma_response.csv"
    t.to_csv(path, index=False)
    print(_summary(t))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
