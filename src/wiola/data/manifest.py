"""`manifest.json` of a prepared token directory: reading, fingerprints and atomic writes.

A prepared directory is valid when its `manifest.json` exists and the split files have the
sizes it records; `wiola prepare` removes the manifest before replacing any file and writes
it last, so an interrupted run never leaves a directory that looks complete.

A manifest is untrusted input: every path in it (`splits.*.file`, `tokenizer.path`) must be a
relative path that resolves inside the data directory, and only the files a tokenizer needs
(`TOKENIZER_FILES`, by name, regular files, no links) are ever read from or copied out of the
tokenizer folder. `verify` checks the split sizes and the tokenizer hash (cheap: the tokenizer
files are small); `verify(..., deep=True)` also re-hashes the splits against their recorded sha256.
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
# The only files taken from a tokenizer folder (copied next to models, hashed, loaded).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "chat_template.jinja")


def _sha256_json(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj` (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def fingerprint(inputs: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of everything that determines a prepared directory."""
    return _sha256_json({"format": FORMAT, "version": VERSION, **inputs})


def content_id(manifest: dict[str, Any]) -> str:
    """sha256 of what training reads from a prepared directory: the token dtype, vocabulary size and special
    ids, the tokenizer's hash, and each split's token count and sha256.

    `fingerprint` identifies the inputs (source paths, sizes and modification times, options) so that
    `wiola prepare` knows when to run again; a copied or touched corpus changes it although the tokens do
    not. Training and comparisons identify their data by this id instead. A manifest without split hashes
    (written before they were recorded) falls back to its fingerprint."""
    splits = manifest["splits"]
    if not splits or any(not isinstance(info, dict) or not info.get("sha256") for info in splits.values()):
        return manifest["fingerprint"]
    tokenizer = manifest.get("tokenizer") if isinstance(manifest.get("tokenizer"), dict) else {}
    content = {"dtype": manifest["dtype"], "vocab_size": manifest["vocab_size"], "tokenizer": tokenizer.get("sha256"),
               "special": [manifest.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")],
               "splits": {name: [info["num_tokens"], info["sha256"]] for name, info in sorted(splits.items())}}
    return _sha256_json(content)


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
    if not isinstance(manifest, dict):
        raise WiolaError(f"{path} is not a manifest (expected a JSON object)")
    missing = [key for key in ("dtype", "vocab_size", "eos_token_id", "splits", "fingerprint") if key not in manifest]
    if missing:
        raise WiolaError(f"{path} lacks {', '.join(missing)}")
    try:
        np.dtype(manifest["dtype"])
    except TypeError:
        raise WiolaError(f"{path}: unknown dtype {manifest['dtype']!r}") from None
    if not isinstance(manifest["splits"], dict):
        raise WiolaError(f"{path}: 'splits' must be a mapping")
    for name, info in manifest["splits"].items():
        if not isinstance(info, dict) or not isinstance(info.get("num_tokens"), int) or info["num_tokens"] < 0:
            raise WiolaError(f"{path}: split {name!r} needs a non-negative integer num_tokens")
        inside(directory, info.get("file"), f"splits.{name}.file")
    inside(directory, tokenizer_rel(manifest), "tokenizer.path")
    return manifest


def tokenizer_rel(manifest: dict[str, Any]) -> str:
    """The tokenizer folder named by a manifest (relative to the data directory)."""
    entry = manifest.get("tokenizer")
    return entry.get("path", "tokenizer") if isinstance(entry, dict) else (entry or "tokenizer")


def inside(directory: str | Path, rel: Any, what: str = "path") -> Path:
    """`directory / rel`, refusing anything that is not a relative path resolving inside `directory`."""
    if not isinstance(rel, str) or not rel or "\0" in rel:
        raise WiolaError(f"manifest {what} must be a relative path inside {directory}, got {rel!r}")
    root = Path(directory).resolve()
    target = (root / rel).resolve()
    if Path(rel).is_absolute() or (target != root and root not in target.parents):
        raise WiolaError(f"manifest {what} {rel!r} points outside the data directory {directory}; refusing to read it")
    return target


def tokenizer_files(folder: str | Path, follow_links: bool = False) -> list[Path]:
    """The allowlisted tokenizer files present in `folder`; a link (unless `follow_links`, for a folder
    the user names directly, such as a Hub cache snapshot) or a non-file under those names is refused."""
    folder = Path(folder)
    found = []
    for name in TOKENIZER_FILES:
        path = folder / name
        if (path.is_symlink() and not follow_links) or (path.exists() and not path.is_file()):
            raise WiolaError(f"{path} is a link or not a regular file; tokenizer files must be plain files")
        if path.is_file():
            found.append(path)
    return found


def tokenizer_dir(directory: str | Path, manifest: dict[str, Any]) -> Path:
    """The tokenizer folder of a prepared directory (checked to lie inside it)."""
    return inside(directory, tokenizer_rel(manifest), "tokenizer.path")


def split_file(directory: str | Path, manifest: dict[str, Any], split: str) -> Path:
    """The token file of `split` (checked to lie inside the data directory)."""
    return inside(directory, manifest["splits"][split].get("file"), f"splits.{split}.file")


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def problems(directory: str | Path, manifest: dict[str, Any], deep: bool = False) -> list[str]:
    """What is wrong with a prepared directory: split files missing or of the wrong size, a
    tokenizer whose hash differs from the manifest's, and (`deep`) split contents whose sha256
    differs. An empty list means the directory is as `wiola prepare` left it."""
    from wiola.data.tokenizer import tokenizer_hash

    directory = Path(directory)
    found = []
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for name, info in manifest["splits"].items():
        file = split_file(directory, manifest, name)
        if not file.is_file():
            found.append(f"{name} split file {file.name} is missing")
        elif file.stat().st_size != info["num_tokens"] * itemsize:
            found.append(f"{file.name} has {file.stat().st_size} bytes, the manifest records {info['num_tokens']} tokens")
        elif deep and info.get("sha256") and file_sha256(file) != info["sha256"]:
            found.append(f"{file.name} does not match the sha256 the manifest records")
    tok = tokenizer_dir(directory, manifest)
    if not (tok / "tokenizer.json").is_file():
        found.append(f"{tok.name}/tokenizer.json is missing")
    else:
        recorded = manifest.get("tokenizer", {}).get("sha256") if isinstance(manifest.get("tokenizer"), dict) else None
        if recorded and tokenizer_hash(tok) != recorded:
            found.append(f"{tok.name}/ has changed since it was prepared (its hash differs from the manifest's)")
    return found


def verify(directory: str | Path, manifest: dict[str, Any], deep: bool = False) -> None:
    """Raise a one-line `WiolaError` when `problems` finds anything."""
    found = problems(directory, manifest, deep)
    if found:
        raise WiolaError(f"{directory} does not match its manifest: {'; '.join(found)}; run `wiola prepare --force` again")


def is_complete(directory: Path, manifest: dict[str, Any]) -> bool:
    """True when every split file has the size the manifest records and the tokenizer its hash."""
    try:
        return not problems(directory, manifest)
    except WiolaError:
        return False
