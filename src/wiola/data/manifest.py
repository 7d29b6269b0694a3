"""`manifest.json` of a prepared token directory: reading, fingerprints and atomic writes.

A prepared directory is valid when its `manifest.json` exists and the split files have the
sizes it records; `wiola prepare` removes the manifest before replacing any file and writes
it last, so an interrupted run never leaves a directory that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from wiola.errors import WiolaError

FORMAT = "wiola-tokens"
VERSION = 1
MANIFEST = "manifest.json"


def fingerprint(inputs: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of everything that determines a prepared directory."""
    canonical = json.dumps({"format": FORMAT, "version": VERSION, **inputs}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON to a temporary file next to `path`, then rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Read and check the manifest of a prepared directory."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise WiolaError(f"{directory} is not a prepared token directory (no {MANIFEST}); run `wiola prepare` first")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise WiolaError(f"{path} is not valid JSON: {exc}") from None
    missing = [key for key in ("dtype", "vocab_size", "eos_token_id", "splits", "fingerprint") if key not in manifest]
    if missing:
        raise WiolaError(f"{path} lacks {', '.join(missing)}")
    return manifest


def is_complete(directory: Path, manifest: dict[str, Any]) -> bool:
    """True when every split file exists with the size the manifest records."""
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for info in manifest["splits"].values():
        file = directory / info["file"]
        if not file.is_file() or file.stat().st_size != info["num_tokens"] * itemsize:
            return False
    return (directory / manifest.get("tokenizer", {}).get("path", "tokenizer") / "tokenizer.json").is_file()
