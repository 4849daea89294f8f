# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 — Validation results and what they show
#
# Real federated LoRA training (the `validation` harness: all-MiniLM-L6-v2 on BBC News, FFA-LoRA,
# AdamW, Dirichlet(0.5) label split) against the one-round theory. The stored results in
# `results/` were produced on a 2-core CPU by `sfed-figures --rerun` (grid files in
# `paper_figures/grids/`); this notebook only reads them. Every number and every
# "above/below the prediction" statement below is computed from those files, so the text stays
# true when the results are re-run; the fixed prose only explains mechanisms.
#
# 1. what was run (manifest: grid, versions, commit, wall time);
# 2. the main figure: aggregated update and adapter output against N, per rule;
# 3. measured log-log exponents with bootstrap CIs beside the predicted ones;
# 4. where the measurement disagrees with the theory;
# 5. training curves at high rank;
# 6. the gradient check (four norms, three predictions);
# 7. learning-rate transfer across N and r.

# %% tags=["parameters"]
# Parameters (small settings; the test suite runs the notebook with these)
RESULTS_DIR = None  # None: the committed results/ folder
ROUND = 1  # the round the one-round theory describes
N_BOOT = 200  # bootstrap replicates for the exponent CIs
TOLERANCE = 0.05  # "within tolerance": |measured - predicted| <= TOLERANCE (a separate claim from "inside the CI")

# %%
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from IPython.display import Image, Markdown, display

from paper_figures import empirical_figs, experiments
from validation.analysis import fit_exponents

results_dir = Path(RESULTS_DIR) if RESULTS_DIR else experiments.DEFAULT_RESULTS
scaling = experiments.load("scaling", results_dir)
curves = experiments.load("curves", results_dir)
manifest = experiments.load_manifest(results_dir)
fig_dir = Path(tempfile.mkdtemp(prefix="sfed_nb03_"))
pd.set_option("display.width", 160)
pd.set_option("display.max_rows", 120)

# %% [markdown]
# ## 1. What was run

# %%
for name, m in manifest.items():
    if "grid" not in m:  # an entry moved from an older manifest format
        print(f"[{name}] {m.get('runs_found', '?')} runs; {m.get('note', '')}")
        continue
    grid = {k: v for k, v in m["grid"].items() if k != "base"}
    pin = m.get("harness")
    harness = (f"harness (validation/, sfed_theory/) = commit {pin['commit'][:10]}, "
               f"{'clean' if pin['clean'] else 'MODIFIED: ' + ', '.join(pin['modified'])}"
               if pin else f"commit {m['git']['commit'][:10]} (harness not pinned: files may have differed)")
    print(f"[{name}] {m['runs_stored']}/{m['runs_in_grid']} runs, {m['rows']} rows, "
          f"sum of run wall times {m['wall_s_sum_of_runs']:.0f} s on {m['machine']['cpu_count']} CPU(s), "
          f"created {m['created_utc']}; {harness}")
    print(f"    axes: {json.dumps(grid)}")
    print(f"    base: {json.dumps(m['grid']['base'])}")
    print(f"    versions: {json.dumps(m['versions'])}")
first = scaling.iloc[0]
layers = sorted(scaling.loc[scaling.layer != "__all__", "layer"].unique())
print(f"\nlayers adapted: {len(layers)} (e.g. {layers[0]}, {layers[-1]}), each {first['d_out']} x {first['k_in']}; "
      f"LoRA alpha = {first['alpha']}; seeds: {sorted(map(int, scaling['seed'].unique()))} (scaling), "
      f"{sorted(map(int, curves['seed'].unique()))} (curves)")

# %% [markdown]
# The measured quantities (column definitions from the harness, `validation.metrics`):
# `update_fro` = $\|\Delta W\|_F$ of the round's aggregated update; `adapter_rms` = RMS of
# $\Delta W x$ on a fixed probe batch; `grad_A_end`, `grad_B_end` = $\|\partial L/\partial A\|_F$,
# $\|\partial L/\partial B\|_F$ at the aggregated adapter; `rho_hat` = mean pairwise cosine of
# the clients' increments; `inc_B_rms` = RMS entry of a client's B increment (the $s_B$ the
# theory's predictions are given). All are summed over the adapted layers (row
# `layer == "__all__"`); the table shows seed means.

# %%
r1 = empirical_figs.round_rows(scaling, ROUND)
show = r1.pivot_table(index=["rule", "rank"], columns="n_participating",
                      values=["update_fro", "adapter_rms", "grad_A_end", "grad_B_end"])
show.round(4)

# %% [markdown]
# ## 2. The main figure
# Dashed lines: the theory at the measured client correlation and increment scale, one fitted
# constant per row (the gradient scale and $\|x\|$ are not part of the random model); vertical
# bars: range over seeds.

# %%
p = empirical_figs.fig_main(scaling, fig_dir, formats=("png",))[0]
display(Image(filename=str(p), width=800))

# %%
flat = r1.groupby("rule")["update_fro"].agg(lambda v: v.max() / v.min())
for rule, ratio in flat.items():
    print(f"{rule:>7}: ||dW||_F varies by a factor {ratio:.1f} over the (N, r) grid "
          f"({r1.loc[r1.rule == rule, 'update_fro'].min():.3f} .. {r1.loc[r1.rule == rule, 'update_fro'].max():.3f})")

# %% [markdown]
# ## 3. Exponents: measured (95 % bootstrap CI over seeds x layers) against predicted
# `validation.analysis.fit_exponents` fits $\log(\text{norm})$ against $\log r$ at each fixed N and
# against $\log N$ at each fixed r (the seed mean of each grid point), and asks
# `sfed_theory.predicted_exponent` for the slope on the same grid points, at $\rho = 0$ and at the
# measured $\hat\rho$, with the measured increment scales.

# %%
fits = fit_exponents(scaling, round=ROUND, n_boot=N_BOOT)
pred = fits["predicted_rho_hat"].fillna(fits["predicted_rho0"])  # N = 1: no rho to measure
fits["predicted"] = pred
fits["in_ci"] = (fits.ci_low <= pred) & (pred <= fits.ci_high)  # strictly inside the 95% CI
fits["agrees"] = (pred - fits.measured).abs() <= TOLERANCE  # within the stated tolerance
table = fits.assign(ci=fits.apply(lambda r: f"[{r.ci_low:+.2f}, {r.ci_high:+.2f}]", axis=1))
table = table[["quantity", "rule", "wrt", "fixed", "measured", "ci", "predicted_rho0", "predicted", "in_ci", "agrees"]]
table.round(3).sort_values(["quantity", "wrt", "rule", "fixed"]).reset_index(drop=True)

# %% [markdown]
# Agreement as two numbers: strictly inside the 95% CI, and within the tolerance. The prediction
# here uses each point's measured $\hat
ho$, so it follows the data by construction (section 6 has
# the out-of-sample test).

# %%
summary = fits.groupby(["quantity", "wrt"]).agg(fits=("agrees", "size"), inside_ci=("in_ci", "sum"),
                                                within_tol=("agrees", "sum"))
display(Markdown(f"Over all {len(fits)} fits: **{int(fits.in_ci.sum())} strictly inside the 95% CI**, "
                 f"**{int(fits.agrees.sum())} within {TOLERANCE}** of the measured slope."))
summary

# %% [markdown]
# Averaged over the fixed values, per rule: the exponent in N and in r of each quantity.

# %%
mean_exp = fits.groupby(["quantity", "wrt", "rule"])[["measured", "predicted"]].mean().unstack("rule").round(2)
mean_exp

# %%
def line(q: str, wrt: str, rule: str) -> str:
    m = mean_exp.loc[(q, wrt)]
    return f"{m[('measured', rule)]:+.2f} (theory {m[('predicted', rule)]:+.2f})"


lines = [f"- **aggregated update** $\\|\\Delta W\\|_F$, exponent in N: LoRA {line('update_fro', 'n_clients', 'lora')}, "
         f"rsLoRA {line('update_fro', 'n_clients', 'rslora')}, SFed {line('update_fro', 'n_clients', 'sfed')}; "
         f"in r: LoRA {line('update_fro', 'rank', 'lora')}, rsLoRA {line('update_fro', 'rank', 'rslora')}, "
         f"SFed {line('update_fro', 'rank', 'sfed')}.",
         f"- **adapter output** RMS, exponent in r: LoRA {line('adapter_output', 'rank', 'lora')}, "
         f"rsLoRA {line('adapter_output', 'rank', 'rslora')}, SFed {line('adapter_output', 'rank', 'sfed')}; "
         f"in N: rsLoRA {line('adapter_output', 'n_clients', 'rslora')}, SFed {line('adapter_output', 'n_clients', 'sfed')}.",
         f"- $\\|\\partial L/\\partial B\\|$, exponent in N: rsLoRA {line('grad_B', 'n_clients', 'rslora')}, "
         f"SFed {line('grad_B', 'n_clients', 'sfed')}.",
         f"- $\\|\\partial L/\\partial A\\|$, exponent in N: LoRA {line('grad_A', 'n_clients', 'lora')}, "
         f"rsLoRA {line('grad_A', 'n_clients', 'rslora')}, SFed {line('grad_A', 'n_clients', 'sfed')}."]
display(Markdown("**Mean exponents in the committed results** (measured, theory at $\\hat\\rho$):\n\n" + "\n".join(lines)))

# %% [markdown]
# ## 4. Where the measurement disagrees with the theory
# Fits whose prediction is more than the tolerance away from the measured slope:

# %%
bad = table[~table.agrees].sort_values(["quantity", "wrt", "rule"]).reset_index(drop=True)
print(f"{len(bad)} of {len(table)} fits disagree")
bad.round(3)

# %% [markdown]
# Reading the disagreements. The cell below states, from the fits, where each of three
# quantities sits relative to the prediction; the mechanism notes after it say why a deviation in
# that direction is expected, and apply only where the computed statement shows one.

# %%
def verdict(q: str, wrt: str, rule: str, fixed: int | None = None) -> tuple[str, float, float]:
    """'above' / 'below' the prediction (beyond the CI widened by TOLERANCE) or 'within' (within TOLERANCE), over the fits of
    (q, wrt, rule) [at one fixed value]: mean measured and mean predicted exponents."""
    f = fits[(fits.quantity == q) & (fits.wrt == wrt) & (fits.rule == rule)]
    if fixed is not None:
        f = f[f.fixed_value == fixed]
    if f.empty:
        return "n/a", float("nan"), float("nan")
    above = (f.ci_low - TOLERANCE > f.predicted).all()
    below = (f.ci_high + TOLERANCE < f.predicted).all()
    word = "above" if above else "below" if below else (
        "within" if f.agrees.all() else "mixed: outside the CI at some fixed values")
    return word, f.measured.mean(), f.predicted.mean()


RULES = [r for r in ("lora", "rslora", "sfed") if r in set(fits.rule)]
NAMES = {"lora": "LoRA", "rslora": "rsLoRA", "sfed": "SFed"}


def sentence(q: str, wrt: str, title: str, rules=RULES, fixed=None) -> str:
    parts = []
    for rule in rules:
        word, m, p_ = verdict(q, wrt, rule, fixed)
        parts.append(f"{NAMES[rule]} {m:+.2f} vs {p_:+.2f} ({word})")
    at = "" if fixed is None else f" at {'N' if wrt == 'rank' else 'r'} = {fixed}"
    return f"- **{title}**, exponent in {'r' if wrt == 'rank' else 'N'}{at}, measured vs theory: " + "; ".join(parts) + "."


r_max = int(fits.loc[fits.wrt == "n_clients", "fixed_value"].max())
notes = [sentence("adapter_output", "rank", "adapter output"),
         sentence("update_fro", "rank", "aggregated update $\\|\\Delta W\\|_F$"),
         sentence("grad_A", "n_clients", "$\\|\\partial L/\\partial A\\|$"),
         sentence("grad_B", "n_clients", "$\\|\\partial L/\\partial B\\|$", rules=["sfed"]),
         sentence("grad_B", "n_clients", "$\\|\\partial L/\\partial B\\|$", rules=["sfed"], fixed=r_max)]
display(Markdown("\n".join(notes)))

# %% [markdown]
# Mechanisms behind deviations in these directions:
#
# * **Adapter output vs rank, above the prediction.** The theory treats B as independent of A and
#   of the probe input, so $\|B A x\|^2$ grows like $r$ and a $1/\sqrt r$ factor makes it flat. In
#   training, B's gradient is $g\,(A x)^\top$, so B's columns line up with the directions $A x$ of
#   the data and the output can grow faster in r than the independent model says, while the
#   *update* norm $\|\Delta W\|_F$, which does not involve the data direction, need not deviate.
# * **Gradient wrt A vs N, above the prediction** (falling more slowly in N).
#   $\partial L/\partial A = \gamma B^\top g x^\top$ projects the averaged B on the loss gradient g.
#   The clients' B increments share a component along g (they descend the same kind of loss),
#   which averaging does not shrink, although the increments' overall correlation $\hat\rho$ is
#   small. The theory's $\rho$ is one number for all directions; a deviation of this sign says
#   the correlation along the gradient is larger than the average one.
# * $\|\partial L/\partial B\|$ under SFed is $\gamma\|g\|\|Ax\|$ and SFed's $\gamma$ grows like
#   $\sqrt N$: the price of keeping the aggregated update at size is a larger B gradient per
#   client at larger N. Where the measured growth is below the prediction, $\|g\|$ (the loss
#   gradient at the aggregated adapter) shrinks with N, which the one-round model holds fixed.
#
# ## 5. Training at high rank
# Train loss is the mean of the clients' local losses during the round; eval accuracy is that of
# the aggregated adapter after the round, on held-out articles.

# %%
p = empirical_figs.fig_c_loss_curves(curves, fig_dir, formats=("png",))[0]
display(Image(filename=str(p), width=520))

# %%
allc = curves[curves.layer == "__all__"]
last = allc[allc["round"] == allc["round"].max()]
first_round = allc[allc["round"] == allc["round"].min()]
end = last.groupby(["n_participating", "rule"])[["train_loss", "eval_loss", "eval_acc", "gamma"]].mean()
end["train_loss_round1"] = first_round.groupby(["n_participating", "rule"])["train_loss"].mean()
end.round(3)

# %%
gam = end["gamma"].unstack("rule")
order = {n: " > ".join(f"{NAMES.get(r, r)} {g:.3g}" for r, g in row.sort_values(ascending=False).items())
         for n, row in gam.iterrows()}
drop = (end["train_loss_round1"] - end["train_loss"]).unstack("rule")
best = {n: NAMES.get(row.idxmax(), row.idxmax()) for n, row in drop.iterrows()}
acc = (100 * end["eval_acc"]).unstack("rule")
n_seeds_c, n_rounds_c = curves["seed"].nunique(), int(allc["round"].max())
rank_c = int(allc["rank"].max())
txt = [f"With the same AdamW step size the rules differ only in $\\gamma$ (at r = {rank_c}: "
       + "; ".join(f"N = {n}: {o}" for n, o in order.items()) + ").",
       "Train-loss drop from round 1 to round " + str(n_rounds_c) + ": "
       + "; ".join(f"N = {n}: " + ", ".join(f"{NAMES.get(r, r)} {v:.3f}" for r, v in row.items())
                   + f" (largest: {best[n]})" for n, row in drop.iterrows()) + ".",
       f"Eval accuracy after round {n_rounds_c} (%): "
       + "; ".join(f"N = {n}: " + ", ".join(f"{NAMES.get(r, r)} {v:.0f}" for r, v in row.items())
                   for n, row in acc.iterrows()) + "."]
same = all(best[n] == NAMES.get(gam.loc[n].idxmax(), "") for n in best)
txt.append("In every panel the rule with the largest $\\gamma$ reduced the train loss most." if same else
           "The rule with the largest $\\gamma$ did not reduce the train loss most in every panel: "
           "a larger effective step is not the whole story at this size.")
display(Markdown(" ".join(txt)))

# %% [markdown]
# This is a small CPU run (the seeds and rounds printed in section 1, short sequences, a 64-article
# eval set): it shows the direction of the effect, not converged accuracies; the GPU grid files
# in `paper_figures/grids/` describe the larger experiment.

# %% [markdown]
# ## 6. The gradient check: four norms, three predictions, two kinds of agreement
# `results/gradient_check.parquet`: one round on MiniLM + BBC under AdamW for FFA, FedIT and FedSA,
# IID and Dirichlet(0.5) splits, N in {1, 4, 16}, r in {4, 16, 64}, 27 seeds, with every quantity
# measured where the theory takes it. Three predictions per slope: the canonical model at $\rho=0$,
# the canonical model at each point's measured $\hat\rho$ (follows the data by construction), and
# the refined model (`sfed_theory` regime `adam-refined`, in the README's form: two vectors, the gradient's input
# direction and the tokens' spike at the angle measured on the pilot rerun, and lambda following the pilot's measured
# secant curvature per rule and rank) with its parameters estimated from the
# runs with N <= 4 only (N = 1 and 4 of the check, and the N = 2 runs of
# `results/gradient_check_two_clients.parquet`, 9 seeds), its client correlations at every N from the label
# law fitted on that pilot (below); its slopes that reach N = 16 are out of sample. `within_tol_ceiling` is the
# number of slopes a prediction equal to the TRUE slope would be expected to get within the tolerance,
# given each measured slope's bootstrap spread: the ceiling the measurement's own noise sets.

# %%
from paper_figures.empirical_figs import refined_params  # noqa: E402
from paper_figures.exponent_tables import two_vector_inputs  # noqa: E402
from paper_figures.probe_input_table import stored_nu  # noqa: E402
from validation.analysis import agreement_summary, refined_fits, with_pilot_runs  # noqa: E402
from validation.refined_store import read_params  # noqa: E402

grad = experiments.load("gradient_check", results_dir)
two_clients = experiments.load("gradient_check_two_clients", results_dir)
coherent = experiments.load("gradient_check_coherent", results_dir)  # the pilot rerun that measured kappa and nu_g
# the probe's input bulk, measured on its inputs at the round's start (these results predate the harness column)
nu = stored_nu(grad, results_dir)
print(f"probe input bulk nu = {nu:.4f} (results/probe_inputs.csv)")
# The README's refined model: two vectors (the gradient's input direction and the tokens' spike) and lambda from the
# pilot's measured secant curvature per rule and rank. The exponent table's fit
# (results/gradient_check_two_vectors_measured_curvature_refined_params.csv) is read when it was fitted on these very
# rows, else fitted here (minutes): validation.refined_store checks the rows' fingerprint
pilot_rows = with_pilot_runs(grad, two_clients)
stored = results_dir / "gradient_check_two_vectors_measured_curvature_refined_params.csv"
kappa, nu_g = two_vector_inputs(pilot_rows, coherent, results_dir)[1:]
print(f"kappa = {kappa:.3f}, nu_g = {nu_g:.4f} (the pilot rerun)")
read = read_params(stored, pilot_rows, nu=nu, kappa=kappa, nu_g=nu_g, pilot_max_n=4)
print("refined parameters:", "fitted here" if read is None else "read from " + stored.name)
params = read if read is not None else refined_params(pilot_rows, ROUND, stored=stored, pilot=coherent)
gfits = fit_exponents(grad, round=ROUND, n_boot=N_BOOT, refined=params)
agree = agreement_summary(gfits)
agree["inside_ci_share"] = (agree.in_ci / agree.slopes).round(3)
agree["within_tol_share"] = (agree.within_tol / agree.slopes).round(3)
agree["ceiling_share"] = (agree.within_tol_ceiling / agree.slopes).round(3)
agree

# %%
by_q = gfits.groupby("quantity")[["in_ci_rho0", "in_ci_rho_hat", "in_ci_refined", "agrees_rho0", "agrees_rho_hat",
                                  "agrees_refined"]].mean().round(2)
by_q["median CI width"] = gfits.assign(w=gfits.ci_high - gfits.ci_low).groupby("quantity").w.median().round(2)
by_q["exact-model ceiling"] = gfits.groupby("quantity").p_within_tol.mean().round(2)
by_q

# %%
out = agree.set_index("prediction").loc["refined, out-of-sample"]
display(Markdown(
    f"Refined model, out of sample (slopes reaching N = 16): **{int(out.in_ci)}/{int(out.slopes)} strictly inside "
    f"the 95% CI**, **{int(out.within_tol)}/{int(out.slopes)} within {TOLERANCE}**. The quantity whose slopes the "
    f"measurement pins worst is dL/dA (median CI width {by_q.loc['grad_A', 'median CI width']:.2f}, several times the "
    f"tolerance): even the true slopes would be within {TOLERANCE} of its measured ones for only about "
    f"{by_q.loc['grad_A', 'exact-model ceiling']:.0%} of them, and inside-the-CI is the informative number there. Over "
    f"all slopes that ceiling is {agree.set_index('prediction').loc['refined', 'ceiling_share']:.0%}."))
print("\n".join(p.describe() for p in params.values() if p.scheme == "ffa"))

# %% [markdown]
# **The input-coherent share, measured instead of fitted.** The harness measures the share of the clients' B
# increments that the refined model's `f_in` stands for, two ways (`validation.probe_inputs`): along `A x_top`
# alone (`inc_B_coherent`), and as the share at which the model's B reproduces the increments' alignment with the
# probe's whole input spectrum (`inc_B_coherent_probe`), as the adapter output over the probe's tokens sees it.
# `results/gradient_check_coherent.parquet` reran the check's pilot (N = 1, 4; seeds 0-2) with both. Holding
# `f_in` at the pilot mean of either (phi and lambda still fitted) gives the stored tables
# `results/gradient_check_f_in_{top,probe}_exponents.csv` (`python -m paper_figures.exponent_tables --f-in top`,
# five minutes each; read here, not refitted), beside the same one-vector model with `f_in` fitted
# (`results/gradient_check_exponents.csv`) and the README's model above (two vectors, measured curvature):

# %%
from validation.analysis import F_IN_COLUMNS, measured_f_in  # noqa: E402

display(pd.DataFrame({c: measured_f_in(coherent, column=c) for c in F_IN_COLUMNS}).round(3))
held = {"one vector, fitted": pd.read_csv(results_dir / "gradient_check_exponents.csv")}
held.update({f"held at {c}": pd.read_csv(results_dir / f"gradient_check_f_in_{c}_exponents.csv") for c in ("top", "probe")})
held["two vectors, measured curvature (above)"] = gfits
pd.DataFrame({k: f[f.predicted_refined.notna()].groupby("quantity").agrees_refined.sum() for k, f in held.items()}).assign(
    slopes=gfits.groupby("quantity").size()).T

# %% [markdown]
# Does the probe's source matter? The probe is drawn from the training set, so at N = 16 the clients
# train on a few of its examples in the round (none at N = 1), which could tilt the slopes in N of
# the probe-dependent norms. `results/gradient_check_heldout.parquet` repeats the check at r = 16
# (FFA) with a probe of held-out examples no client trains on (figure n):

# %%
from paper_figures.gradient_figs import probe_source_fits  # noqa: E402

probe_fits = probe_source_fits(grad, experiments.load("gradient_check_heldout", results_dir), n_boot=N_BOOT)
probe_fits.pivot_table(index=["partition", "quantity", "rule"], columns="probe", values="measured").round(3)

# %% [markdown]
# Does the probe's size set dL/dA's wide CIs? `results/gradient_check_large_probe.parquet` repeats the same
# cells with 128 probe examples instead of 32 (figure q). If the probe's sampling noise dominated, the CIs of
# dL/dA's slopes would halve (predicted before the runs: median width ~0.18 instead of 0.36):

# %%
from paper_figures.gradient_figs import probe_variant_fits  # noqa: E402

sizes = probe_variant_fits(grad, {"training set, 128": experiments.load("gradient_check_large_probe", results_dir)},
                           n_boot=N_BOOT)
sizes.assign(ci_width=sizes.ci_high - sizes.ci_low).groupby(["quantity", "probe"]).ci_width.median().unstack().round(3)

# %% [markdown]
# **How the clients' correlation changes with K.** A zero-sum part of the increments (the clients' label
# shares add up to the global ones) correlates -1/(K-1) between two clients, so `rho_K = rho_inf - s/(K-1)`;
# `rho_inf - s/K` is the alternative. Both were fixed on the N = 4 and 16 means before the N = 2 runs,
# and their K = 2 values written in the grid file; the figure fixes each law at K = 2 and 4 instead, so
# its K = 16 values are predictions. The orange line is the refined model's own value of each
# correlation: it reproduces the pilot (K = 2, 4) by construction of its fit (`rho_K` in the model's units,
# `rho_skew` in the parameters above).

# %%
from paper_figures.correlation_figs import fig_client_correlation  # noqa: E402
from validation.correlation_law import correlation_by_k, k_law_predictions  # noqa: E402

both = with_pilot_runs(grad, two_clients)
p = fig_client_correlation(both, fig_dir, formats=("png",), refined=params)[0]
display(Image(filename=str(p), width=800))
by_k = correlation_by_k(both)
laws = k_law_predictions(by_k, (2, 4), [16]).merge(by_k[by_k.K == 16].astype({"K": float}),
                                                   on=["scheme", "partition", "column", "K"])
laws["off_in_se"] = ((laws.predicted - laws["mean"]) / laws.se).round(1)
laws[laws.scheme != "fedsa"][["scheme", "partition", "column", "law", "predicted", "mean", "se", "off_in_se"]].round(3)

# %% [markdown]
# An alternative lead, checked here and refuted: clients whose
# batches hold the same topics push B the same way. `label_overlap` is the mean pairwise cosine of the
# clients' batch label histograms (known before training); a line fitted on the N = 4 runs only does not
# predict the correlation at N = 16: the overlap barely changes with N and hardly correlates with rho.

# %%
from validation.label_overlap import overlap_table, pilot_line  # noqa: E402

overlaps = overlap_table(grad)
print("correlation of rho_ratio with the label overlap, per split:",
      overlaps.groupby("partition").apply(lambda g: round(g.rho_ratio.corr(g.label_overlap), 2)).to_dict())
pd.concat([pilot_line(overlaps, c).assign(column=c) for c in ("rho_ratio", "rho_out", "rho_gA")])[
    ["column", "partition", "n_clients", "label_overlap", "measured", "measured_se", "predicted", "pilot_mean", "sample"]]

# %% [markdown]
# What the cosine leaves out is how concentrated each batch is. The **label law** (`validation.label_law`):
# with an example's gradient its label's direction plus noise, the harness's ratio estimate concentrates on
# `rho = (b + cross) / (b + own + n repeat)`, `cross` the mean `q_i . q_j` over client pairs and `own` the mean
# `q_i . q_i` of the batches' label fractions, `repeat` 1 unless a client draws an example twice. Fitted on the pilot (N <= 4) of both splits at
# once, it predicts N = 16, and the Dirichlet(0.1) split with N in {2, 4, 8, 16} of
# `results/gradient_check_strong_skew.parquet` (its predictions were written in the grid file before the
# runs; figure r).

# %%
from paper_figures.correlation_figs import fig_label_law, label_law_check  # noqa: E402

strong = experiments.load("gradient_check_strong_skew", results_dir)
p = fig_label_law(with_pilot_runs(grad, two_clients), strong, fig_dir, formats=("png",))[0]
display(Image(filename=str(p), width=800))
law = label_law_check(with_pilot_runs(grad, two_clients), strong)
law["off_in_se"] = ((law.predicted - law.measured) / law.measured_se).round(1)
law[["column", "split", "n_participating", "sample", "label_cross", "label_own", "measured", "measured_se", "predicted",
     "off_in_se", "b", "n"]].round(3)

# %% [markdown]
# The same model at a 4x smaller learning rate, from the stored table (`results/gradient_check_small_lr_exponents.csv`,
# regenerated by `python -m paper_figures.exponent_tables`; FFA, FedIT and FedSA, 9 seeds, its own N = 2 pilot):

# %%
small_fits = pd.read_csv(results_dir / "gradient_check_small_lr_exponents.csv")
small_agree = agreement_summary(small_fits)
small_agree["within_tol_share"] = (small_agree.within_tol / small_agree.slopes).round(3)
small_agree

# %% [markdown]
# **Can any model of the refined model's kind get the end-of-round dL/dB?** Under FFA (A frozen) the
# ratio R of the squared dL/dB at the round's end to its start is what the refined model's curvature
# term describes. Every model whose end gradient is affine in the update (any curvature), with client
# increments that do not follow gamma and noise that averages, lets R drop by at most
# `(c - 1)/(c + 1)` = 1/3 between an SFed cell and the one with 4x the clients
# (`sfed_theory.affine_bound`, derived in sympy); at a fixed gamma it makes the drop from N = 1 to 4
# four times the drop from 4 to 16. Figure (o) shows R at this learning rate (solid) and at a 4x smaller
# one (dashed); the tables set the drops beside both bounds.

# %%
from paper_figures.end_gradient_figs import fig_end_gradient  # noqa: E402
from validation.end_gradient import fixed_gamma_test, sfed_drops  # noqa: E402

small = experiments.load("gradient_check_small_lr", results_dir)
p = fig_end_gradient({"lr 1e-3": grad, "lr 2.5e-4": small}, fig_dir, formats=("png",), n_boot=N_BOOT)[0]
display(Image(filename=str(p), width=800))
drops = sfed_drops(grad, n_boot=N_BOOT)
drops.round(3)

# %%
fixed = fixed_gamma_test(grad, n_boot=N_BOOT)
flagged = drops[drops.above_affine_bound]
display(Markdown(
    f"SFed drops beyond the affine bound (95% CI above 1/3): **{len(flagged)} of {len(drops)}** pairs, at r = "
    f"{sorted(set(flagged['rank']))}, where R falls from {drops.R_from.max():.2f} at N = 1 to "
    f"{drops[drops.n_to == 16].R_to.min():.2f} at N = 16. At a fixed gamma the excess of the N = 1 to 4 drop over "
    f"4x the 4 to 16 drop is positive in {int((fixed.excess > 0).sum())} of {len(fixed)} cells, and its CI "
    f"excludes 0 in {int(fixed.excess_nonzero.sum())} (the cells share their seeds)."))
fixed.round(3)

# %% [markdown]
# The same at a 4x smaller learning rate (`results/gradient_check_small_lr.parquet`, FFA, FedIT and
# FedSA, 9 seeds; the drops are FFA's; its predictions were written in the grid file before the runs):

# %%
small_drops = sfed_drops(small, n_boot=N_BOOT)
print(f"SFed drops above the bound: {int(small_drops.above_affine_bound.sum())} of {len(small_drops)}")
small_drops.round(3)

# %% [markdown]
# **Along the round's own update.** Under FFA `W0 + c dW` is an adapter, so the harness probes dL/dB along
# the round's own update (`RunConfig.line_scales`, `validation.line_probe`; `results/gradient_check_line.parquet`:
# rsLoRA at N in {1, 4, 16} and SFed at N in {4, 16}, IID, lr 1e-3, seeds 0-8; predictions in its grid file,
# written before the runs). Any affine end gradient puts R(c) on the quadratic through c = 0, 1/2, 1; the x axis
# of figure (s) is the step in units of rsLoRA's gamma, where SFed's round (c = 1) meets rsLoRA's line at sqrt(N).

# %%
from paper_figures.line_probe_figs import affine_misses, fig_line_probe  # noqa: E402
from validation.line_probe import line_summary, line_table  # noqa: E402

line_rows = experiments.load("gradient_check_line", results_dir)
p = fig_line_probe(line_rows, fig_dir, formats=("png",), n_boot=N_BOOT)[0]
display(Image(filename=str(p), width=800))
line = line_summary(line_table(line_rows), n_boot=N_BOOT)
side = {c: affine_misses(line, c).measured_vs_affine.value_counts().to_dict() for c in (2.0, 4.0)}
sf, rs = line[line.rule == "sfed"], line[line.rule == "rslora"]
own = sf[sf.scale == 1.0].set_index(["rank", "n_clients"]).ratio_B
at_sfed_step = rs[np.isclose(rs.scale, np.sqrt(rs.n_clients))].set_index(["rank", "n_clients"]).ratio_B
display(Markdown(
    f"The affine form against the 95% CI of R: at c = 2 {side[2.0]}, at c = 4 {side[4.0]} (of 15 lines). SFed's own "
    "round against rsLoRA's update at SFed's step: " + ", ".join(
        f"r = {r}, N = {n}: {own[(r, n)]:.2f} vs {at_sfed_step[(r, n)]:.2f}" for r, n in own.index) + "."))
line[line.scale.isin([1.0, 2.0, 4.0])][["rule", "rank", "n_clients", "scale", "step", "ratio_B", "ratio_B_low",
                                         "ratio_B_high", "ratio_B_quadratic", "gap_B"]].round(3)

# %% [markdown]
# **With one local step** Adam's step is the gradient's sign at any gamma, so the clients' increments cannot follow
# gamma (`results/gradient_check_one_step.parquet`: FFA, lr 1e-3, both splits, all rules, seeds 0-8; predictions in
# its grid file). Figure (t) sets R against N beside the stored two-step check on the same seeds; the refined model
# is fitted on each check's own pilot (N in {1, 4}) for the comparison.

# %%
one = experiments.load("gradient_check_one_step", results_dir)
two = grad[(grad.scheme == "ffa") & grad.seed.isin(one.seed.unique())]
p = fig_end_gradient({"two local steps": two, "one local step": one}, fig_dir, formats=("png",), n_boot=N_BOOT,
                     stem="fig_one_step")[0]
display(Image(filename=str(p), width=800))
steps = {}
for name, rows in (("one local step", one), ("two local steps", two)):
    fits = fit_exponents(rows, n_boot=N_BOOT, refined=refined_fits(rows, nu=nu))
    steps[name] = fits.groupby("quantity")[["agrees_refined", "in_ci_refined"]].sum()
    steps[name].loc["all"] = steps[name].sum()
    drops_n = sfed_drops(rows, n_boot=N_BOOT)
    print(f"{name}: SFed drops above the affine bound {int(drops_n.above_affine_bound.sum())} of {len(drops_n)}; "
          f"refined within {TOLERANCE} of {int(fits.agrees_refined.sum())} of {len(fits)} FFA slopes")
pd.concat(steps, axis=1)

# %% [markdown]
# And with three local steps (`results/gradient_check_three_steps.parquet`: rsLoRA and SFed, IID, seeds 0-8;
# predictions in its grid file): figure (u) sets the gradients' slopes in N against the number of local steps.

# %%
from paper_figures.local_steps_figs import fig_local_steps, local_step_slopes  # noqa: E402

three = experiments.load("gradient_check_three_steps", results_dir)
by_steps = {1: one, 2: grad, 3: three}
p = fig_local_steps(by_steps, fig_dir, formats=("png",), n_boot=N_BOOT)[0]
display(Image(filename=str(p), width=800))
local_step_slopes(by_steps, n_boot=N_BOOT).pivot_table(index=["quantity", "rule", "rank"], columns="local_steps",
                                                       values="measured").round(3)

# %% [markdown]
# ## 7. Learning-rate transfer: does a tuned learning rate carry across N and r?
# `results/lr_transfer.parquet`: each rule (lora, rslora, sfed) at 7-8 learning rates spaced by 2x, for
# N in {1, 4, 16} and r in {16, 256}, 8 rounds of 5 local steps, 2 seeds. The prediction is fixed before the
# data: the canonical model's `lr* ~ 1 / (gamma sqrt(r c_N))`, anchored at the one tuned cell N = 1, r = 16;
# the refined model's version takes its coherent share from the gradient check's pilot (section 6).

# %%
from paper_figures import lr_transfer  # noqa: E402

sweep = experiments.load("lr_transfer", results_dir)
opt = lr_transfer.optimum_table(sweep)
opt[["rule", "n_clients", "rank", "lr_star_fit", "lr_star_pred", "lr_star_refined", "steps_off", "best_acc"]]

# %%
errors = lr_transfer.prediction_errors(opt)
products = lr_transfer.product_table(opt)
betas = lr_transfer.rank_exponents(opt)
errors

# %%
canon = errors.set_index(["model", "cells"]).loc["canonical"]
display(Markdown(
    f"Across N at r = 16 the canonical prediction is on average **{canon.loc['across N (r = 16)', 'mean_steps_off']:.2f}"
    f" grid steps** off (largest {canon.loc['across N (r = 16)', 'max_steps_off']:.2f}); at the other rank "
    f"**{canon.loc['other ranks', 'mean_steps_off']:.2f}** (largest {canon.loc['other ranks', 'max_steps_off']:.2f}). "
    f"`gamma x lr*` agrees across the rules within {products.spread_steps.max():.2f} grid steps in every cell: with A "
    f"frozen and Adam a rule only moves the optimum. It falls with the rank as r^-beta with beta from "
    f"{betas.beta.min():.2f} to {betas.beta.max():.2f} (canonical 0.5). Best tuned accuracy per rule: "
    + ", ".join(f"{r} {g.best_acc.mean():.3f}" for r, g in opt.groupby("rule")) + " (mean over cells)."))
