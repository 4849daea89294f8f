"""Benchmark of sfed_theory (not a test): derivation time and Monte Carlo throughput.

Prints (a) the time of the full derivation (every quantity x scheme x regime, plus solving the
invariance condition for every scheme x regime) cold in a fresh Python process, cold in this
process after clearing the caches, and cached; the closed forms in a fresh process derived against read
from :mod:`sfed_theory.form_store`; (b) samples per second of the vectorised Monte
Carlo sampler and of the plain Python loop over samples, measured side by side in this run on
the same model, and their ratio.

Usage: python bench/bench_theory.py [--samples 200000] [--loop-samples 2000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

_FULL = """
import time, json
t0 = time.perf_counter()
from sfed_theory.derivation import derive_all, solve_invariance
from sfed_theory.assumptions import SCHEMES, REGIMES
t1 = time.perf_counter()
derive_all()
for s in SCHEMES:
    for r in REGIMES:
        solve_invariance(s, r)
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "derive_s": t2 - t1}))
"""

_FORMS = """
import time, json
from sfed_theory.derivation import closed_form, defined_combinations
t = time.perf_counter()
for c in defined_combinations():
    closed_form(*c)
print(json.dumps({"forms": len(defined_combinations()), "s": time.perf_counter() - t}))
"""


def _fresh(code: str, **env: str) -> dict:
    import os

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, **env})
    return json.loads(proc.stdout)


def full_derivation() -> int:
    """Derive every defined quantity and solve every invariance condition; returns the count."""
    from sfed_theory.assumptions import REGIMES, SCHEMES
    from sfed_theory.derivation import derive_all, solve_invariance

    n = len(derive_all())
    for s in SCHEMES:
        for r in REGIMES:
            solve_invariance(s, r)
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=200_000, help="samples for the vectorised sampler")
    ap.add_argument("--loop-samples", type=int, default=2_000, help="samples for the plain Python loop")
    a = ap.parse_args(argv)

    print("== derivation (42 closed forms + 8 invariance solutions) ==")
    fresh = _fresh(_FULL, SFED_FORM_CACHE="off")
    print(f"fresh process : import {fresh['import_s']:.2f} s, derivation {fresh['derive_s']:.2f} s (cold)")
    import tempfile

    with tempfile.TemporaryDirectory() as store:  # closed forms only: derived and stored, then read back
        derived, loaded = (_fresh(_FORMS, SFED_FORM_CACHE=store) for _ in range(2))
    print(f"fresh process : {derived['forms']} closed forms derived {derived['s']:.2f} s, from the form store "
          f"{loaded['s']:.2f} s ({derived['s'] / loaded['s']:.0f}x)")
    from sfed_theory.derivation import clear_caches

    full_derivation()  # warm sympy's own caches once, then time with our caches cleared
    clear_caches()
    t = time.perf_counter()
    n = full_derivation()
    cold = time.perf_counter() - t
    t = time.perf_counter()
    full_derivation()
    cached = time.perf_counter() - t
    print(f"in process    : {n} closed forms, caches cleared {cold:.2f} s, cached {cached * 1e3:.3f} ms")

    from sfed_theory.montecarlo import ModelParams, simulate, simulate_loop

    for dims in ((4, 4, 2, 3), (16, 16, 4, 4)):
        d, k, r, n = dims
        p = ModelParams(d=d, k=k, r=r, n_clients=n, gamma=1.0, rho=0.2, s_A=0.25, s_dA=0.3)
        print(f"== Monte Carlo throughput (fedit / adam, d={d} k={k} r={r} N={n}, all 5 quantities) ==")
        t = time.perf_counter()
        vec = simulate(p, "fedit", "adam", n_samples=a.samples, seed=0)
        t_vec = time.perf_counter() - t
        t = time.perf_counter()
        loop = simulate_loop(p, "fedit", "adam", n_samples=a.loop_samples, seed=1)
        t_loop = time.perf_counter() - t
        r_vec, r_loop = a.samples / t_vec, a.loop_samples / t_loop
        print(f"vectorised numpy : {a.samples:>8d} samples in {t_vec:6.2f} s = {r_vec:12,.0f} samples/s")
        print(f"plain Python loop: {a.loop_samples:>8d} samples in {t_loop:6.2f} s = {r_loop:12,.0f} samples/s")
        print(f"speed-up (vectorised / loop): {r_vec / r_loop:.1f}x")
        q = "adapter_output"
        print(f"sanity ({q}): vectorised {vec[q].mean:.4g} +- {vec[q].se:.2g}, "
              f"loop {loop[q].mean:.4g} +- {loop[q].se:.2g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
