"""Figure (x): SFed's N = 16 gamma taken by four clients, against sixteen clients at that gamma and four at theirs.

Reads ``gradient_check_matched_gamma`` (N = 4, alpha 32: SFed's gamma at N = 16 with alpha 16), the stored check and
``gradient_check_matched_gamma_one_client`` (N = 1, alpha 64); :mod:`validation.matched_step` gives the ratios of the
end-of-round gradients' seed RMS and the prediction of N = 16 from N = 1 and 4 at the same gamma.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from paper_figures import style

__all__ = ["fig_matched_step"]

_AGAINST = {"same gamma": ("o", "against N = 16 at the same gamma"), "same N": ("s", "against N = 4 at alpha 16"),
            "from N = 1 and 4": ("^", "N = 16 predicted from N = 1 and 4 at its gamma (S + n/K), over measured")}
_COLUMNS = {"grad_B_end": "dL/dB, round's end", "grad_A_end": "dL/dA, round's end"}


def fig_matched_step(reference: pd.DataFrame, matched: pd.DataFrame, out: Path, formats=("png", "pdf"),
                     stem: str = "fig_matched_step", n_boot: int = 1000,
                     one_client: pd.DataFrame | None = None) -> list[Path]:
    """One row per end gradient, one column per (scheme, split): the ratio per unit gamma (95% CI bars) of its seed
    RMS at N = 4 with SFed's N = 16 gamma to the reference cells, against rank; 1 (grey): against the same gamma, "the
    step sets it"; against the same N, "it grew with gamma as the start gradient does". With ``one_client`` (the
    same gamma at N = 1): triangles, the square root of N = 16's squared end gradient predicted from N = 1 and 4 by
    a noise part averaging as 1/K, over the measured (1: the prediction holds)."""
    from matplotlib.lines import Line2D

    from validation.matched_step import matched_step_ratios, one_over_k_prediction

    style.apply()
    t = matched_step_ratios(reference, matched, columns=tuple(_COLUMNS), n_boot=n_boot)
    if one_client is not None:
        pooled = pd.concat([one_client, matched, reference[reference.n_clients == 16]], ignore_index=True)
        pred = one_over_k_prediction(pooled, columns=tuple(_COLUMNS), n_boot=n_boot)
        t = pd.concat([t, pred.assign(against="from N = 1 and 4", per_gamma=pred.ratio, per_gamma_low=pred.ci_low,
                                      per_gamma_high=pred.ci_high)], ignore_index=True)
    groups = sorted(t.groupby(["scheme", "partition"]).groups)
    fig, axes = plt.subplots(len(_COLUMNS), len(groups), figsize=(style.PAGE_W, 4.2), squeeze=False, sharex=True,
                             sharey="row", constrained_layout=True)
    for i, (column, label) in enumerate(_COLUMNS.items()):
        for j, (scheme, part) in enumerate(groups):
            ax = axes[i, j]
            g = t[(t.column == column) & (t.scheme == scheme) & (t.partition == part)]
            for k, (against, (marker, _)) in enumerate(_AGAINST.items()):
                h = g[g.against == against].sort_values("rank")
                x = h["rank"] * 1.08 ** (k - 1)  # the comparisons side by side
                ax.errorbar(x, h.per_gamma, yerr=[h.per_gamma - h.per_gamma_low, h.per_gamma_high - h.per_gamma],
                            marker=marker, ms=3.5, lw=1, capsize=2, color=style.RULE_COLORS["sfed"],
                            mfc="white" if k else None)
            ax.axhline(1, color="0.6", lw=0.6)
            ax.set(xscale="log", xticks=[4, 16, 64], xticklabels=["4", "16", "64"])
            ax.minorticks_off()
            ax.set_title(f"{scheme.upper()}, {part}: {label}", fontsize=6)
        axes[i, 0].set_ylabel("seed-RMS ratio per unit gamma,\nN = 4 at alpha 32 over", fontsize=6)
    for ax in axes[-1]:
        ax.set_xlabel("rank r")
    handles = [Line2D([], [], color=style.RULE_COLORS["sfed"], marker=m, mfc="white" if k else None, label=lab)
               for k, (against, (m, lab)) in enumerate(_AGAINST.items()) if (t.against == against).any()]
    fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=6)
    same, pred = t[t.against == "same gamma"], t[t.against == "from N = 1 and 4"]
    negative = f"; the S + n/K prediction negative (not drawn): {int(pred.ratio.isna().sum())}/{len(pred)}" if len(pred) else ""
    fig.suptitle(f"SFed, AdamW, lr 1e-3, one round: N = 4 with alpha 32 takes the gamma of N = 16 (alpha 16). "
                 f"CI contains 1 against the same gamma: {int(same.inside.sum())}/{len(same)}{negative}", fontsize=7)
    return style.save(fig, out, stem, formats)
