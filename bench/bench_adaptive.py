"""Bias and standard deviation of the rho estimators against N (issue 6, estimator part).

Synthetic increments with known rho: ``x_i = sqrt(rho) z + sqrt(1 - rho) e_i`` (z, e_i iid N(0, I_P)),
redrawn every repeat. Prints, for the ratio (method of moments) and the mean-pairwise-cosine
estimators, the bias (with its Monte Carlo standard error) and the standard deviation next to the
analytic standard error ``rho_standard_error``. Two further tables:

* heterogeneous client scales (``x_i`` multiplied by a log-normal ``sigma_i``): the two estimators
  then estimate different things; the ratio one tracks the measured norm shrinkage of the mean;
* entries correlated within a client (each independent value repeated ``m`` times, P_eff = P/m):
  the analytic SE (which assumes P independent entries) under-covers, the block jackknife does not.

Usage: ``python bench/bench_adaptive.py [--repeats 400] [--p 4096] [--seed 0]`` (about a minute on
one core).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from validation.adaptive import estimate_rho, rho_standard_error

NS = (2, 4, 8, 16, 32)
RHOS = (0.0, 0.1, 0.5, 0.9)


def _draw(rng: np.random.Generator, reps: int, n: int, p: int, rho: float) -> np.ndarray:
    z = rng.standard_normal((reps, 1, p))
    e = rng.standard_normal((reps, n, p))
    return math.sqrt(rho) * z + math.sqrt(1.0 - rho) * e


def _both(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised ratio and cosine estimates for a batch ``(R, N, P)``; same formulas as the module."""
    n = x.shape[1]
    g = np.einsum("rnp,rmp->rnm", x, x)
    d = np.einsum("rnn->rn", g)
    off = g.sum(axis=(1, 2)) - d.sum(axis=1)
    ratio = off / ((n - 1) * d.sum(axis=1))
    c = g / np.sqrt(d[:, :, None] * d[:, None, :])
    cos = (c.sum(axis=(1, 2)) - n) / (n * (n - 1))
    return ratio, cos


def main_table(repeats: int, p: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    chunk = max(1, min(repeats, 2_000_000 // (p * 8)))
    print(f"\nHomogeneous Gaussian model, P = {p}, {repeats} repeats per cell (bias +- MC s.e.; sd; analytic se)")
    hdr = f"{'rho':>4} {'N':>3} | {'ratio bias':>19} {'ratio sd':>9} | {'cosine bias':>19} {'cos sd':>9} | {'analytic':>9} | {'P(raw<0) ratio':>14}"
    print(hdr)
    print("-" * len(hdr))
    for rho in RHOS:
        for n in NS:
            rs, cs = [], []
            done = 0
            while done < repeats:
                k = min(chunk if n <= 8 else max(1, chunk * 8 // n), repeats - done)
                r_, c_ = _both(_draw(rng, k, n, p, rho))
                rs.append(r_)
                cs.append(c_)
                done += k
            r = np.concatenate(rs)
            c = np.concatenate(cs)
            se_r = r.std(ddof=1) / math.sqrt(repeats)
            se_c = c.std(ddof=1) / math.sqrt(repeats)
            print(
                f"{rho:4.1f} {n:3d} | {r.mean() - rho:+9.5f} +- {se_r:7.5f} {r.std(ddof=1):9.5f} | "
                f"{c.mean() - rho:+9.5f} +- {se_c:7.5f} {c.std(ddof=1):9.5f} | {rho_standard_error(rho, n, p):9.5f} | "
                f"{np.mean(r < 0):14.3f}"
            )


def small_p_table(repeats: int, seed: int) -> None:
    rng = np.random.default_rng(seed + 3)
    print(f"\nSmall P (bias is O(1/P) and visible here), {repeats} repeats; leading-order cosine bias -rho(1-rho^2)/(2P)")
    hdr = f"{'P':>3} {'rho':>4} {'N':>3} | {'ratio bias':>10} {'ratio sd':>8} {'ratio rmse':>10} | {'cos bias':>9} {'cos sd':>8} {'cos rmse':>9} | {'-rho(1-rho^2)/2P':>16}"
    print(hdr)
    print("-" * len(hdr))
    for p in (16, 64):
        for rho in (0.1, 0.5, 0.9):
            for n in (2, 8):
                r, c = _both(_draw(rng, repeats, n, p, rho))
                rm = math.sqrt(np.mean((r - rho) ** 2))
                cm = math.sqrt(np.mean((c - rho) ** 2))
                print(
                    f"{p:3d} {rho:4.1f} {n:3d} | {r.mean() - rho:+10.5f} {r.std():8.4f} {rm:10.4f} | "
                    f"{c.mean() - rho:+9.5f} {c.std():8.4f} {cm:9.4f} | {-rho * (1 - rho**2) / (2 * p):+16.5f}"
                )


def hetero_table(repeats: int, p: int, seed: int, log_sd: float = 0.5) -> None:
    rng = np.random.default_rng(seed + 1)
    print(f"\nHeterogeneous client scales sigma_i ~ LogNormal(0, {log_sd}), P = {p}, {repeats} repeats")
    print("  target 'shrink' = rho implied by the measured shrinkage mean||x_i||^2 / ||mean x||^2 (what gamma undoes)")
    hdr = f"{'rho':>4} {'N':>3} | {'ratio mean':>10} {'cosine mean':>11} {'shrink target':>13}"
    print(hdr)
    print("-" * len(hdr))
    for rho in (0.1, 0.5, 0.9):
        for n in (2, 8, 32):
            x = _draw(rng, repeats, n, p, rho)
            sig = np.exp(log_sd * rng.standard_normal((repeats, n, 1)))
            x = x * sig
            r, c = _both(x)
            # expected shrinkage-implied rho: rho * sum_{i!=j} s_i s_j / ((N-1) sum s_i^2)
            s = sig[:, :, 0]
            target = rho * ((s.sum(1) ** 2 - (s**2).sum(1)) / ((n - 1) * (s**2).sum(1)))
            print(f"{rho:4.1f} {n:3d} | {r.mean():10.4f} {c.mean():11.4f} {target.mean():13.4f}")


def coverage_table(repeats: int, p: int, seed: int) -> None:
    rng = np.random.default_rng(seed + 2)
    print(f"\nStandard errors vs the empirical sd, P = {p}, ratio estimator, {repeats} repeats")
    print("  m = each independent value repeated m times within a client (P_eff = P/m); jackknife: 16 contiguous blocks")
    hdr = f"{'m':>3} {'rho':>4} {'N':>3} | {'emp sd':>8} {'mean jack se':>12} {'analytic(P)':>11} {'analytic(P_eff)':>15}"
    print(hdr)
    print("-" * len(hdr))
    for m in (1, 16):
        for rho, n in ((0.0, 4), (0.5, 4), (0.5, 16)):
            ests, ses = [], []
            for _ in range(repeats):
                x = _draw(rng, 1, n, p // m, rho)[0]
                if m > 1:
                    x = np.repeat(x, m, axis=1)
                e = estimate_rho(x, n_blocks=16)
                ests.append(e.rho_raw)
                ses.append(e.se)
            print(
                f"{m:3d} {rho:4.1f} {n:3d} | {np.std(ests, ddof=1):8.5f} {np.mean(ses):12.5f} "
                f"{rho_standard_error(rho, n, p):11.5f} {rho_standard_error(rho, n, p // m):15.5f}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=400)
    ap.add_argument("--p", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    t0 = time.perf_counter()
    main_table(a.repeats, a.p, a.seed)
    small_p_table(50 * a.repeats, a.seed)
    hetero_table(min(a.repeats, 200), a.p, a.seed)
    coverage_table(min(a.repeats, 200), a.p, a.seed)
    print(f"\n({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
