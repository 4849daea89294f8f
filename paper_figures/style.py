"""Shared figure style: sizes for a two-column paper, fonts readable when printed, rule colours."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["COLUMN_W", "PAGE_W", "RULE_COLORS", "RULE_LABELS", "RULE_ORDER", "apply", "save", "rule_label"]

COLUMN_W = 3.3  # inches: one column of a two-column paper
PAGE_W = 7.0  # inches: full page width (multi-panel figures)

RULE_ORDER: tuple[str, ...] = ("lora", "rslora", "sfed", "sfed-general")
RULE_COLORS: dict[str, str] = {  # colour-blind safe (Okabe-Ito)
    "lora": "#D55E00",
    "rslora": "#0072B2",
    "sfed": "#009E73",
    "sfed-general": "#CC79A7",
}
RULE_LABELS: dict[str, str] = {
    "lora": r"LoRA  $\alpha/r$",
    "rslora": r"rsLoRA  $\alpha/\sqrt{r}$",
    "sfed": r"SFed  $\alpha\sqrt{N/r}$",
    "sfed-general": r"SFed-gen.  $\alpha\sqrt{N_\mathrm{eff}/r}$",
}

_RC = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "legend.title_fontsize": 7,
    "lines.linewidth": 1.3,
    "lines.markersize": 3.5,
    "axes.linewidth": 0.6,
    "grid.linewidth": 0.4,
    "grid.alpha": 0.35,
    "axes.grid": True,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.03,
    "pdf.fonttype": 42,  # embed TrueType: editable text, accepted by publishers
    "ps.fonttype": 42,
    "figure.dpi": 100,
}


def apply() -> None:
    """Set the paper rcParams (idempotent)."""
    plt.rcParams.update(_RC)


def rule_label(rule: str) -> str:
    """Legend text for a rule."""
    return RULE_LABELS.get(rule, rule)


def save(fig: plt.Figure, out_dir: str | Path, stem: str, formats: tuple[str, ...] = ("png", "pdf"),
         dpi: int = 250) -> list[Path]:
    """Write ``fig`` as ``out_dir/stem.<fmt>`` for every format, close it, return the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        p = out_dir / f"{stem}.{fmt}"
        fig.savefig(p, dpi=dpi, metadata={"Creator": "sfed paper_figures"} if fmt == "png" else None)
        paths.append(p)
    plt.close(fig)
    return paths
