"""Figure (u): the gradients' slopes in N against the clients' number of local steps.

Reads the gradient check with one, two and three local steps (``gradient_check_one_step``,
``gradient_check`` restricted to the same seeds, ``gradient_check_three_steps``; FFA, AdamW, lr 1e-3,
IID). Adam's first step is the sign of the client's gradient at any gamma; each later step sees the earlier
ones' effect on the output, which grows with gamma, so SFed's gradients move with the number of steps
while the canonical model's slopes do not.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from paper_figures import style

__all__ = ["local_step_slopes", "fig_local_steps"]

_RANK_COLORS = {4: "#56B4E9", 16: "#E69F00", 64: "#009E73"}
_RULE_LS = {"rslora": "--", "sfed": "-"}
_QUANTITIES = {"grad_B": "dL/dB", "grad_A": "dL/dA"}


def local_step_slopes(runs: dict[int, pd.DataFrame], n_boot: int = 1000, partition: str = "iid") -> pd.DataFrame:
    """Slopes in N (with 95% CIs and the canonical model at rho = 0) of dL/dB and dL/dA per rule and rank,
    one block per number of local steps (the key of ``runs``); FFA rows of ``partition`` only, over the
    seeds every set shares."""
    from validation.analysis import fit_exponents

    seeds = set.intersection(*(set(d.seed.unique()) for d in runs.values()))
    out = []
    for steps, d in sorted(runs.items()):
        if set(d.local_steps.unique()) != {steps}:
            raise ValueError(f"the runs given for {steps} local steps have local_steps {sorted(d.local_steps.unique())}")
        rows = d[(d.scheme == "ffa") & (d.partition == partition) & d.seed.isin(seeds)]
        fits = fit_exponents(rows, n_boot=n_boot, refined=False)
        fits = fits[(fits.wrt == "n_clients") & fits.quantity.isin(list(_QUANTITIES)) & fits.rule.isin(list(_RULE_LS))]
        out.append(fits.assign(local_steps=steps, rank=fits.fixed_value.astype(int), n_seeds_shared=len(seeds)))
    return pd.concat(out, ignore_index=True)


def fig_local_steps(runs: dict[int, pd.DataFrame], out: Path, formats=("png", "pdf"), stem: str = "fig_local_steps",
                    n_boot: int = 1000) -> list[Path]:
    """One panel per gradient: its slope in N (95% CI bars) against the number of local steps, one colour per
    rank, solid SFed, dashed rsLoRA; thin grey: the canonical model's slope for each rule."""
    from matplotlib.lines import Line2D

    style.apply()
    s = local_step_slopes(runs, n_boot=n_boot)
    fig, axes = plt.subplots(1, len(_QUANTITIES), figsize=(style.PAGE_W, 2.6), squeeze=False, constrained_layout=True)
    for ax, (q, label) in zip(axes[0], _QUANTITIES.items()):
        for (rule, rank), g in s[s.quantity == q].groupby(["rule", "rank"]):
            g = g.sort_values("local_steps")
            shift = 0.05 * (list(_RANK_COLORS).index(rank) - 1) if rank in _RANK_COLORS else 0.0  # bars apart
            ax.errorbar(g.local_steps + shift, g.measured, yerr=[g.measured - g.ci_low, g.ci_high - g.measured], marker="o",
                        ms=3, lw=1, capsize=2, ls=_RULE_LS[rule], color=_RANK_COLORS.get(rank))
        for rule, g in s[s.quantity == q].groupby("rule"):
            ax.axhline(g.predicted_rho0.mean(), color="0.6", lw=0.6, ls=_RULE_LS[rule])
        ax.set(xticks=sorted(s.local_steps.unique()), xlabel="local steps per round", title=f"{label}: slope in N")
    axes[0, 0].set_ylabel("slope of the norm in N (N = 1, 4, 16)", fontsize=6)
    handles = [Line2D([], [], color=c, label=f"r = {k}") for k, c in _RANK_COLORS.items()]
    handles += [Line2D([], [], color="0.3", ls=ls, label=style.rule_label(r)) for r, ls in _RULE_LS.items()]
    handles += [Line2D([], [], color="0.6", lw=0.6, label="canonical model, rho = 0")]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=6)
    fig.suptitle(f"FFA, AdamW, lr 1e-3, IID, {int(s.n_seeds_shared.iloc[0])} seeds: the gradients' slopes in N against "
                 "the clients' local steps", fontsize=7)
    return style.save(fig, out, stem, formats)
