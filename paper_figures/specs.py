"""Experiment grid files: a :class:`validation.config.GridConfig` plus a few extra axes.

A grid file ``paper_figures/grids/<set>_<experiment>.json`` holds a GridConfig (``base``, ``ranks``,
``n_clients``, ``rules``, ...) and optionally:

* ``partitions``: client splits (``"iid"``, ``"dirichlet"``), an extra grid axis.
* ``lrs``: learning rates, an extra grid axis (the learning-rate sweep): one list for every rule, or
  ``{rule: [...]}`` for a window per rule (a rule whose optimum the theory places far away gets its
  own window; every window must still show an interior optimum).
* ``oracle``: how ``sfed-general``'s configured rho is obtained: the round-1 ``rho_ratio`` (layer
  ``__all__``) of a PILOT run of the same task with rule ``oracle.rule`` at rank ``oracle.rank``, one
  round, averaged over ``oracle.seeds``; measured once per (split, N) and cached in
  ``<work>/oracle_rho.json``. N = 1 gets rho = 0 (N_eff = 1 whatever rho is).
* ``dedupe_n1``: at N = 1 only ``lora`` and ``rslora`` are run: ``sfed``, ``sfed-general`` and
  ``sfed-adaptive`` give ``gamma = alpha/sqrt(r)`` there, i.e. exactly the rsLoRA run; analyses show the
  N = 1 rsLoRA result for those rules (:func:`expand_n1`, marked ``from_rslora``).
* ``target_loss_frac`` (convergence only) and keys starting with ``_`` (comments).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["GRID_DIR", "FAMILY_N1", "RULE_ORDER", "ExperimentSpec", "load_spec", "oracle_rho", "expand_n1"]

GRID_DIR = Path(__file__).resolve().parent / "grids"
from validation.config import SAME_AS_RSLORA_AT_N1 as FAMILY_N1  # noqa: E402  (torch-free)
RULE_ORDER = ("lora", "rslora", "sfed", "sfed-general", "sfed-adaptive")
_EXTRAS = ("partitions", "lrs", "oracle", "dedupe_n1", "target_loss_frac")


@dataclass(frozen=True)
class ExperimentSpec:
    """A grid file's contents: the GridConfig and the extra axes of the module docstring."""

    grid: Any  # validation.config.GridConfig
    partitions: tuple[str, ...] = ()
    lrs: tuple[float, ...] | dict[str, tuple[float, ...]] = ()
    oracle: dict[str, Any] = field(default_factory=dict)
    dedupe_n1: bool = False
    target_loss_frac: float | None = None
    about: str = ""

    @property
    def plain(self) -> bool:
        """True for a plain GridConfig file (no extra axes)."""
        return not (self.partitions or self.lrs or self.oracle or self.dedupe_n1)

    def with_base(self, **overrides: Any) -> ExperimentSpec:
        """The spec with RunConfig fields of the grid's base replaced."""
        from validation.config import RunConfig

        base = RunConfig.from_dict({**self.grid.base.to_dict(), **overrides})
        return dataclasses.replace(self, grid=dataclasses.replace(self.grid, base=base))

    def _all_lrs(self) -> list[float]:
        if isinstance(self.lrs, dict):
            return sorted({x for v in self.lrs.values() for x in v})
        return list(self.lrs or (self.grid.base.lr,))

    def runs(self, work: Path | None = None) -> list:
        """Every RunConfig (oracle rho filled in from pilot runs cached in ``work``; N = 1 deduped if
        asked); seeds outermost, then cheapest first, so a cut-short grid still has whole seeds."""
        parts = list(self.partitions or [self.grid.base.partition])
        rhos: dict[str, float] = {}
        if "sfed-general" in self.grid.rules and self.oracle:
            if work is None:
                raise ValueError("an oracle rho needs a work folder for its pilot runs")
            rhos = oracle_rho(self.grid.base, parts, [n for n in self.grid.n_clients if n > 1], self.oracle, work)
        out = []
        for part in parts:
            for lr in self._all_lrs():
                base = dataclasses.replace(self.grid.base, partition=part, lr=float(lr))
                for c in dataclasses.replace(self.grid, base=base).runs():
                    if self.dedupe_n1 and c.n_clients == 1 and c.rule in FAMILY_N1:
                        continue
                    if isinstance(self.lrs, dict) and float(lr) not in self.lrs.get(c.rule, ()):
                        continue
                    if c.rule == "sfed-general" and c.n_clients > 1 and rhos:
                        c = dataclasses.replace(c, rho=rhos[f"{part}/{c.n_clients}"])
                    out.append(c)
        order = {r: i for i, r in enumerate(RULE_ORDER)}
        out.sort(key=lambda c: (c.seed, c.n_clients, c.partition, c.rank, c.lr, order.get(c.rule, 99)))
        return out


def load_spec(path: str | Path) -> ExperimentSpec:
    """Read a grid file (plain GridConfig or with the extra keys of the module docstring)."""
    from validation.config import GridConfig

    d = json.loads(Path(path).read_text())
    about = str(d.get("_about", ""))
    extras = {k: d.pop(k) for k in _EXTRAS if k in d}
    grid = GridConfig.from_dict(d)  # ignores "_" comment keys
    raw = extras.get("lrs", ())
    lrs = ({rule: tuple(float(x) for x in v) for rule, v in raw.items()} if isinstance(raw, dict)
           else tuple(float(x) for x in raw))
    flat = [x for v in lrs.values() for x in v] if isinstance(lrs, dict) else list(lrs)
    if any(not (x > 0) for x in flat):
        raise ValueError(f"{path}: every entry of 'lrs' must be a learning rate > 0, got {raw}")
    if isinstance(lrs, dict) and set(lrs) != set(grid.rules):
        raise ValueError(f"{path}: 'lrs' per rule must name exactly the grid's rules {list(grid.rules)}, got {list(lrs)}")
    return ExperimentSpec(grid, tuple(extras.get("partitions", ())), lrs, dict(extras.get("oracle", {})),
                          bool(extras.get("dedupe_n1", False)), extras.get("target_loss_frac"), about)


def oracle_rho(base, partitions: list[str], ns: list[int], oracle: dict[str, Any], work: Path) -> dict[str, float]:
    """``{"<split>/<N>": rho}`` measured by pilot runs (cached in ``work/oracle_rho.json``)."""
    from validation.federated import run
    from validation.metrics import ALL

    cache = work / "oracle_rho.json"
    have = json.loads(cache.read_text()) if cache.is_file() else {}
    rule, rank, seeds = oracle.get("rule", "rslora"), int(oracle.get("rank", 16)), list(oracle.get("seeds", [0]))
    changed = False
    for part in partitions:
        for n in ns:
            key = f"{part}/{n}"
            if key in have or n == 1:
                continue
            vals = []
            for s in seeds:
                cfg = dataclasses.replace(base, partition=part, n_clients=n, participating=None, rank=rank, rule=rule,
                                          rho=0.0, rounds=1, seed=s)
                df = run(cfg)
                vals.append(float(df.loc[(df.layer == ALL) & (df["round"] == 1), "rho_ratio"].iloc[0]))
            have[key] = float(min(1.0, max(0.0, np.mean(vals))))
            have[key + "/pilot"] = {"rule": rule, "rank": rank, "seeds": seeds, "rho_ratio": vals}
            changed = True
    if changed:
        work.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(have, indent=1, sort_keys=True))
    return {k: v for k, v in have.items() if not k.endswith("/pilot")}


def expand_n1(df: pd.DataFrame) -> pd.DataFrame:
    """Add the N = 1 rows of the sfed family as copies of rsLoRA's (deduped grids), marked ``from_rslora``
    (:func:`validation.analysis.identical_n1_runs`)."""
    from validation.analysis import identical_n1_runs

    return identical_n1_runs(df)
