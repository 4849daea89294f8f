"""``sfed-validate`` / ``python -m validation``.

    sfed-validate                      # default grid (MiniLM + BBC, CPU, a few minutes) + report + figure
    sfed-validate run [--config grid.json|yaml] [--out DIR] [--ranks 4 16] [--n-clients 1 4] ...
    sfed-validate analyze DIR [--round 1] [--n-boot 1000] [--figures DIR] [--curvature measured]

``run`` skips cells already finished in ``--out`` (``--no-resume`` re-runs them), then analyses
everything in ``--out``. Flags override the config file; ``--set key=value`` sets any RunConfig
field of the base config (JSON values, e.g. ``--set max_examples=500``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import pandas as pd

from validation.config import GridConfig, RunConfig, parse_overrides

__all__ = ["main", "default_grid"]


def default_grid() -> GridConfig:
    """The no-argument grid: MiniLM + BBC, FFA-LoRA, AdamW, one round, 54 runs: ~2 min on 2 idle CPU cores."""
    base = RunConfig(model="minilm", dataset="bbc", scheme="ffa", optimizer="adamw", lr=1e-3, local_steps=2,
                     batch_size=4, rounds=1, max_length=32, eval_size=64, probe_size=32, partition="dirichlet",
                     dirichlet_alpha=0.5)
    return GridConfig(base=base, n_clients=(1, 4, 16), ranks=(4, 16, 64), rules=("lora", "rslora", "sfed"),
                      seeds=(0, 1))


_AXES = {"n_clients": int, "ranks": int, "rules": str, "schemes": str, "optimizers": str, "seeds": int}
_BASE = {"model": str, "dataset": str, "rounds": int, "local_steps": int, "batch_size": int, "lr": float,
         "alpha": float, "max_length": int, "partition": str, "dirichlet_alpha": float, "participating": int,
         "device": str, "max_examples": int, "eval_size": int, "dtype": str}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sfed-validate", description="Federated LoRA validation harness (issue 3).")
    sub = ap.add_subparsers(dest="cmd")
    r = sub.add_parser("run", help="run a grid (default command)")
    r.add_argument("--config", help="grid file (JSON or YAML): {base: {...}, ranks: [...], ...}")
    r.add_argument("--out", default="runs/default", help="results folder (default runs/default)")
    r.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="skip cells already finished in --out (default on)")
    r.add_argument("--loop", action="store_true", help="use the per-client peft loop instead of the batched path")
    r.add_argument("--weighted", action="store_true", help="weight aggregation by client data size")
    r.add_argument("--target-modules", nargs="+", help="LoRA target module names (default query value)")
    r.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="any RunConfig field of the base")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--no-analyze", action="store_true", help="skip the report and figure")
    for name, typ in _AXES.items():
        r.add_argument("--" + name.replace("_", "-"), nargs="+", type=typ)
    for name, typ in _BASE.items():
        r.add_argument("--" + name.replace("_", "-"), type=typ)
    _analysis_args(r)
    a = sub.add_parser("analyze", help="report and figure for a results folder")
    a.add_argument("dir")
    _analysis_args(a)
    return ap


def _analysis_args(p: argparse.ArgumentParser) -> None:
    from validation.refined import CURVATURE_LAWS

    p.add_argument("--round", type=int, default=1, help="round whose measurements are fitted (default 1)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates (default 1000)")
    p.add_argument("--figures", help="figure folder (default: the results folder)")
    p.add_argument("--curvature", choices=CURVATURE_LAWS, default="measured",
                   help="how the refined model's curvature varies (validation.refined.CURVATURE_LAWS): by default it "
                        "follows the secant curvature the pilot runs measured per rule and rank (one curvature, with "
                        "a warning, for a group whose runs did not measure it)")


def _grid_from_args(ns: argparse.Namespace) -> GridConfig:
    grid = GridConfig.from_file(ns.config) if ns.config else default_grid()
    over = {k: getattr(ns, k) for k in _BASE if getattr(ns, k) is not None}
    if ns.loop:
        over["batched"] = False
    if ns.weighted:
        over["weighted"] = True
    if ns.target_modules:
        over["target_modules"] = tuple(ns.target_modules)
    over.update(parse_overrides(ns.set))
    base = RunConfig.from_dict({**grid.base.to_dict(), **over})
    axes = {k: tuple(getattr(ns, k)) for k in _AXES if getattr(ns, k)}
    return dataclasses.replace(grid, base=base, **axes)


def _analyze(out: Path, ns: argparse.Namespace) -> int:
    from validation.analysis import fit_exponents, format_report, is_hetero, refined_fits
    from validation.grid import load_results
    from validation.plots import coordinate_check
    from validation.refined_store import write_params

    df = load_results(out)
    if df.empty:
        print(f"no finished runs in {out}")
        return 1
    n_div = df.loc[df["diverged"].astype(bool), "run_id"].nunique()
    print(f"\n{df['run_id'].nunique()} runs, {len(df)} rows in {out} ({n_div} diverged, excluded from fits)")
    fig_dir = Path(ns.figures) if ns.figures else out
    hetero = is_hetero(df)
    if hetero.any():
        _analyze_hetero(df[hetero], ns, fig_dir)
        df = df[~hetero]
        if df.empty:
            return 0
    params = refined_fits(df, round=ns.round, curvature_law=ns.curvature)
    fits = fit_exponents(df, round=ns.round, n_boot=ns.n_boot, refined=params)
    print(format_report(fits, list(params.values())))
    fig_dir.mkdir(parents=True, exist_ok=True)
    fits.to_csv(fig_dir / "exponents.csv", index=False)
    print(f"table: {fig_dir / 'exponents.csv'}")
    if params:
        write_params(params, fig_dir / "refined_params.csv", df)
        print(f"refined model parameters: {fig_dir / 'refined_params.csv'}")
    for p in coordinate_check(df, fig_dir, round=ns.round):
        print(f"figure: {p}")
    return 0


def _analyze_hetero(df: pd.DataFrame, ns: argparse.Namespace, fig_dir: Path) -> None:
    """The exponents in N of runs whose clients train different ranks (:mod:`validation.hetero_analysis`)."""
    from validation.hetero_analysis import fit_hetero_exponents, format_hetero_report

    fits = fit_hetero_exponents(df, round=ns.round, n_boot=ns.n_boot)
    print(format_hetero_report(fits))
    if not fits.empty:
        fig_dir.mkdir(parents=True, exist_ok=True)
        fits.to_csv(fig_dir / "hetero_exponents.csv", index=False)
        print(f"table: {fig_dir / 'hetero_exponents.csv'}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``sfed-validate``; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("run", "analyze", "-h", "--help"):
        argv = ["run", *argv]
    ns = _parser().parse_args(argv)
    try:
        if ns.cmd == "analyze":
            return _analyze(Path(ns.dir), ns)
        from validation.grid import run_grid

        grid = _grid_from_args(ns)
        out = Path(ns.out)
        cells = grid.runs()
        print(f"grid: {len(cells)} runs -> {out}  (model={grid.base.model}, data={grid.base.dataset}, "
              f"scheme(s)={','.join(grid.schemes)}, optimizer(s)={','.join(grid.optimizers)}, "
              f"rounds={grid.base.rounds}, device={grid.base.device})")
        t0 = time.perf_counter()
        res = run_grid(grid, out, resume=ns.resume, progress=not ns.no_progress)
        print(f"written {len(res.written)}, skipped (already finished) {len(res.skipped)}, "
              f"failed {len(res.failed)}; wall {time.perf_counter() - t0:.1f} s")
        for rid, why in res.failed.items():
            print(f"  FAILED {rid}: {why}")
        code = 0 if not res.failed else 2
        if not ns.no_analyze:
            code = max(code, _analyze(out, ns))
        return code
    except ValueError as e:
        print(f"sfed-validate: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
