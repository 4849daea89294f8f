"""Where stored results come from: the harness code (pinned to a git commit), versions, machine.

:func:`harness_pin` is what a results manifest records about the code that made the results;
:func:`harness_key` names the work folder of per-run files, so a resumed rerun only reuses runs made
by byte-identical harness code.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["ROOT", "HARNESS_PACKAGES", "harness_pin", "harness_key", "source_digest", "versions", "git_head",
           "machine", "import_harness"]

ROOT = Path(__file__).resolve().parent.parent
HARNESS_PACKAGES: tuple[str, ...] = ("validation", "sfed_theory")


def source_digest(package: str) -> str:
    """sha256 over the .py files of a package (identifies the code even when uncommitted)."""
    h = hashlib.sha256()
    for f in sorted((ROOT / package).glob("*.py")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def harness_pin(packages: tuple[str, ...] = HARNESS_PACKAGES) -> dict[str, Any]:
    """Pin the harness code to a git commit.

    ``commit`` is HEAD; ``clean`` is True only if every ``.py`` file of ``packages`` on disk is
    byte-identical to the blob committed at HEAD (git's own blob hash is compared, so this holds
    whatever the state of other files in the tree); ``modified`` lists the files that differ or
    are not committed. ``sha256`` is :func:`source_digest` of each package.
    """
    out: dict[str, Any] = {"commit": "unknown", "clean": False, "modified": [],
                           "sha256": {pkg: source_digest(pkg) for pkg in packages}}
    try:
        commit = _git("rev-parse", "HEAD").strip()
        tree = _git("ls-tree", "-r", "HEAD", "--", *packages)
    except Exception:  # no git here: the pin says "unknown", not clean
        return out
    committed = {}
    for line in tree.splitlines():
        meta, _, path = line.partition("\t")
        committed[path] = meta.split()[2]
    modified = []
    for pkg in packages:
        for f in sorted((ROOT / pkg).glob("*.py")):
            rel = f"{pkg}/{f.name}"
            if committed.get(rel) != _blob_sha1(f.read_bytes()):
                modified.append(rel)
        for rel in committed:
            if rel.startswith(pkg + "/") and rel.endswith(".py") and not (ROOT / rel).is_file():
                modified.append(rel + " (deleted)")
    out.update(commit=commit, clean=not modified, modified=modified)
    return out


def harness_key(pin: dict[str, Any]) -> str:
    """``harness-<12 hex>``: a digest of the harness sources, the name of a work folder."""
    digest = hashlib.sha256("".join(pin["sha256"][p] for p in sorted(pin["sha256"])).encode()).hexdigest()
    return f"harness-{digest[:12]}"


def versions() -> dict[str, str]:
    """Python and the versions of the packages a run depends on."""
    out = {"python": platform.python_version()}
    for mod in ("sfed_theory", "validation", "torch", "transformers", "peft", "numpy", "pandas", "pyarrow"):
        try:
            m = importlib.import_module(mod)
            out[mod] = str(getattr(m, "__version__", "n/a"))
        except ImportError:
            out[mod] = "not installed"
    return out


def git_head() -> dict[str, Any]:
    """Whole-tree HEAD and whether tracked files differ from it."""
    try:
        return {"commit": _git("rev-parse", "HEAD").strip(),
                "dirty": _git("status", "--porcelain", "--untracked-files=no").strip() != ""}
    except Exception:
        return {"commit": "unknown", "dirty": None}


def machine() -> dict[str, Any]:
    """Platform, CPU count and the command line."""
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "argv": " ".join(sys.argv)}


def import_harness() -> None:
    """Import every harness module a run may load lazily, so that the code pinned at the start is the
    code used throughout (later edits of the files on disk cannot leak into a long rerun)."""
    for mod in ("validation.config", "validation.data", "validation.models", "validation.backends",
                "validation.batched_lora", "validation.aggregation", "validation.metrics",
                "validation.federated", "validation.grid", "validation.adaptive", "sfed_theory"):
        try:
            importlib.import_module(mod)
        except ImportError:  # optional module absent
            pass
