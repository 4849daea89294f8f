"""Shared builders for the harness tests (no tests here): a tiny random BERT folder and tiny configs."""

from __future__ import annotations

from pathlib import Path

from validation.config import RunConfig

WORDS = "the a cat dog sat on mat market stock film music vote game goal phone ran".split()


def tiny_bert(folder: Path) -> str:
    """Save a randomly initialised 2-layer BERT (hidden 16) and a word-level tokenizer to ``folder``."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    BertModel(cfg).save_pretrained(folder)
    return str(folder)


def tiny_text_dataset(folder: Path, n: int = 40) -> str:
    """A ``datasets`` folder (save_to_disk) of short texts with 3 string labels."""
    import datasets
    import numpy as np

    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, 6)) for _ in range(n)]
    labels = [["sport", "film", "money"][i % 3] for i in range(n)]
    datasets.Dataset.from_dict({"text": texts, "label": labels}).save_to_disk(str(folder))
    return str(folder)


def synth(**kw) -> RunConfig:
    """A small synthetic config (float64 so the two backends agree to ~1e-10)."""
    base = dict(model="synthetic", dataset="synthetic", synth_examples=256, synth_dim=16, synth_classes=3,
                synth_teacher_rank=2, n_clients=3, rank=4, rounds=2, local_steps=2, batch_size=4,
                eval_size=32, probe_size=16, dtype="float64", lr=1e-2)
    base.update(kw)
    return RunConfig(**base)
