"""Figure (w): the shape of the probe gradient's response to the round's update, measured and as the model says.

Reads ``gradient_check_response`` (FFA's one-round check, AdamW, lr 1e-3, seeds 0-2) with the harness's
``response_top_input`` and ``response_alignment`` (:mod:`validation.response_shape`). The refined model's
line for the top-input share (:func:`validation.response_shape.predicted_top_input`) takes its inputs from
the same runs' pilot (N <= 4), measured, none fitted: f_in (``inc_B_coherent_probe``), the Frobenius client
correlation (``rho_ratio``) and the probe's input bulk nu (``probe_top_share``), with phi = 0 (the gradient
fits' value). Its output alignment is 1 whatever its parameters. Beside it, ``gradient_check_one_layer``: the
same with one adapted layer, so that no other layer's update moves the probe gradient.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from paper_figures import style

__all__ = ["response_table", "model_inputs", "fig_response_shape"]

COLUMNS = {"response_top_input": "top-input share of dL/dB's change",
           "response_alignment": "output alignment cos(dG v, dW v)"}
_N_MARKER = {1: "o", 4: "s", 16: "^"}
_ALPHA = 16.0  # the grid's alpha; the model's shares do not depend on it (gamma cancels)


def _rows(rows: pd.DataFrame) -> pd.DataFrame:
    from validation.analysis import identical_n1_runs
    from validation.metrics import ALL

    missing = [c for c in COLUMNS if c not in rows]
    if missing:
        raise ValueError(f"the rows lack {', '.join(missing)} (measured by the harness since the response shape)")
    a = identical_n1_runs(rows)
    return a[(a.layer == ALL) & (a.scheme == "ffa") & (a["round"] == 1) & ~a.diverged.astype(bool)]


def response_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (measure, partition, rule, rank, n_clients): the seeds' mean of the layers' mean, its standard error
    over the seeds, and the number of seeds (FFA, round 1)."""
    long = _rows(rows).melt(id_vars=["partition", "rule", "rank", "n_clients", "seed"], value_vars=list(COLUMNS),
                            var_name="measure", value_name="value")
    t = long.groupby(["measure", "partition", "rule", "rank", "n_clients"]).value.agg(["mean", "std", "count"])
    t = t.reset_index()
    t["se"] = t["std"] / np.sqrt(t["count"])
    return t.rename(columns={"mean": "value", "count": "n_seeds"}).drop(columns="std")


def model_inputs(rows: pd.DataFrame, partition: str):
    """The refined model's :class:`validation.refined.RefinedParams` for FFA on ``partition`` from the pilot
    (N <= 4) of these runs: f_in, rho and nu measured, phi = 0; sizes that cancel in a share set to 1."""
    from validation.probe_inputs import bulk_nu
    from validation.refined import PILOT_MAX_N, RefinedParams

    a = _rows(rows)
    pilot = a[(a.partition == partition) & (a.n_clients <= PILOT_MAX_N)]
    if pilot.empty:
        raise ValueError(f"no pilot runs (N <= {PILOT_MAX_N}) on the {partition!r} split")
    k = int(pilot.k_in.iloc[0])
    rules = sorted(pilot.rule.unique())
    return RefinedParams(scheme="ffa", partition=partition, f_in=float(pilot.inc_B_coherent_probe.mean()), phi=0.0,
                         rho_f=float(pilot[pilot.n_clients > 1].rho_ratio.mean()), lam=0.0,
                         tau2x2={int(r): 1.0 for r in pilot["rank"].unique()}, s_B={u: 1.0 for u in rules},
                         s_dA={u: 0.0 for u in rules}, d=int(pilot.d_out.iloc[0]), k=k, pilot_max_n=PILOT_MAX_N,
                         n_pilot_points=len(pilot), rms_log_residual=float("nan"),
                         nu=bulk_nu(float(pilot.probe_top_share.mean()), k))


def fig_response_shape(runs: dict[str, pd.DataFrame], out: Path, formats=("png", "pdf"),
                       stem: str = "fig_response_shape") -> list[Path]:
    """Top row: the top-input share against the rank (+- SE over seeds; colour the rule, marker N; filled: the
    first run set of ``runs``, open: the second) with the refined model's line at N = 1 for each set and the
    probe's own spike share (grey, dotted: a response whose input side follows the tokens' whole spectrum);
    bottom row: the output alignment, the model's 1 dashed. One column per split."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullFormatter

    from validation.response_shape import predicted_top_input

    style.apply()
    sets = list(runs.items())[:2]
    tables = {label: response_table(rows) for label, rows in sets}
    first = next(iter(tables.values()))
    parts = sorted(first.partition.unique(), key=lambda p: p != "iid")
    ranks = sorted(first["rank"].unique())
    fig, axes = plt.subplots(2, len(parts), figsize=(style.PAGE_W, 4.4), squeeze=False, sharex=True,
                             constrained_layout=True)
    for j, part in enumerate(parts):
        for (label, rows), ls, fill in zip(sets, ("-", ":"), (True, False)):
            _draw_set(axes[:, j], tables[label], part, fill)
            inputs = model_inputs(rows, part)
            axes[0, j].plot(ranks, predicted_top_input(inputs, "rslora", ranks, [1] * len(ranks), _ALPHA), color="k",
                            lw=1.0, ls=ls)
            axes[0, j].axhline(_spike_share(rows, part), color="0.6", lw=0.8, ls=ls)
        axes[1, j].axhline(1.0, color="k", lw=1.0, ls="--")
        for i, measure in enumerate(COLUMNS):
            ax = axes[i, j]
            ax.set(xscale="log", xticks=ranks, xticklabels=ranks, ylim=(-0.05 if i else 0, 1.1))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"FFA, {part}: {COLUMNS[measure]}", fontsize=7)
        axes[-1, j].set_xlabel("rank r")
    rules = sorted(first.rule.unique())
    handles = [Line2D([], [], color=style.RULE_COLORS.get(u, "0.3"), label=u) for u in rules]
    handles += [Line2D([], [], color="0.5", marker=m, ls="", label=f"N = {n}") for n, m in _N_MARKER.items()]
    for (label, _), ls, fill in zip(sets, ("-", ":"), (True, False)):
        handles += [Line2D([], [], color="0.3", marker="o", mfc="0.3" if fill else "white", ls="", label=label),
                    Line2D([], [], color="k", ls=ls, label=f"refined model, N = 1 ({label}; measured inputs)"),
                    Line2D([], [], color="0.6", ls=ls, label=f"the probe's spike share ({label})")]
    handles.append(Line2D([], [], color="k", ls="--", label="refined model's alignment (1)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=4, fontsize=6)
    fig.suptitle(f"AdamW, lr 1e-3, {int(first.n_seeds.max())} seeds: where the probe gradient's change within the "
                 "round comes from, against the refined model's lam dW C", fontsize=7)
    return style.save(fig, out, stem, formats)


def _draw_set(axes, t: pd.DataFrame, part: str, filled: bool) -> None:
    for ax, measure in zip(axes, COLUMNS):
        for (rule, n), g in t[(t.partition == part) & (t.measure == measure)].groupby(["rule", "n_clients"]):
            g = g.sort_values("rank")
            color = style.RULE_COLORS.get(rule, "0.3")
            ax.errorbar(g["rank"] * (1 + 0.04 * np.log2(n)), g.value, yerr=g.se, marker=_N_MARKER.get(int(n), "D"),
                        ms=3, lw=0.7, capsize=2, color=color, mfc=color if filled else "white",
                        ls="-" if filled else ":")


def _spike_share(rows: pd.DataFrame, part: str) -> float:
    a = _rows(rows)
    return float(a[a.partition == part].probe_top_share.mean())
