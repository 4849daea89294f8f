"""Coordinate-check figure: measured norm against rank, one line per N, one panel per rule (log-log)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from validation.analysis import QUANTITY_COLUMNS  # noqa: E402
from validation.metrics import ALL  # noqa: E402

__all__ = ["coordinate_check"]


def coordinate_check(df: pd.DataFrame, out_dir: str | Path, *, round: int = 1,
                     quantities: tuple[str, ...] = tuple(QUANTITY_COLUMNS)) -> list[Path]:
    """One PNG per (scheme, optimizer): rows = quantities, columns = rules, x = r, y = seed-mean
    of the layer-summed norm at ``round``, one line per N. Flat lines = the rule keeps the norm
    Theta(1). Returns the written paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sel = df[(df["layer"] == ALL) & (df["round"] == round) & (~df["diverged"].astype(bool))]
    paths = []
    for (scheme, opt), g in sel.groupby(["scheme", "optimizer"]):
        rules = sorted(g["rule"].unique(), key=lambda r: ("lora", "rslora", "sfed", "sfed-general").index(r))
        fig, axes = plt.subplots(len(quantities), len(rules), figsize=(3.2 * len(rules), 2.6 * len(quantities)),
                                 squeeze=False, sharex=True, sharey="row")  # shared y: flat = flat
        ns = sorted(g["n_clients"].unique())
        colors = plt.cm.viridis(np.linspace(0, 0.9, len(ns)))
        for i, q in enumerate(quantities):
            col = QUANTITY_COLUMNS[q]
            for j, rule in enumerate(rules):
                ax = axes[i, j]
                h = g[g["rule"] == rule]
                for n, c in zip(ns, colors):
                    m = h[h["n_clients"] == n].groupby("rank")[col].mean()
                    m = m[m > 0]
                    if len(m):
                        ax.plot(m.index, m.values, "o-", color=c, label=f"N={n}")
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                if i == 0:
                    ax.set_title(rule)
                if j == 0:
                    ax.set_ylabel(f"{q}\n({col})")
                if i == len(quantities) - 1:
                    ax.set_xlabel("rank r")
        axes[0, -1].legend(fontsize=7)
        fig.suptitle(f"coordinate check, round {round}: scheme={scheme}, optimizer={opt}")
        fig.tight_layout()
        p = out_dir / f"coord_check_{scheme}_{opt}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths
