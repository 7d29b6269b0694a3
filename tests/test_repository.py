"""A fresh clone is all a user has: no tracked file may refer to a path outside the repository.

The scan reads every tracked text file (`git ls-files`) and reports
* a relative path that starts with `../` and does not land on a tracked file or folder, resolved from the
  file's own folder (links in docs) or from the repository root (commands, configs and scripts run
  there), when it climbs out of the repository from either;
* an absolute path into a workspace or a home folder (`/work/…`, `/root/…`, `/home/USER/…`,
  `/Users/USER/…`, `/mnt/…`), which exists only on the machine that wrote it;
* a tracked symbolic link whose target lies outside the repository.
URLs are ignored, and so are paths glued to something the scan cannot resolve (`$(dirname "$0")/../..`).
It also checks the corpus the comparison specs read is shipped, byte for byte.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://\S*")
RELATIVE = re.compile(r"(?<![\w.~$/\\-])\.\./[^\s\"'`()<>\[\]{},;|*#?\\]*")
ABSOLUTE = re.compile(r"(?<![\w.~$/\\-])(?:/(?:work|root|mnt|home/[\w.-]+|Users/[\w.-]+)/|[A-Za-z]:\\Users\\)[^\s\"'`()<>\[\]{},;|*]*")
# hostile inputs that tests hand to `wiola` on purpose, to check that it refuses paths outside a data folder
DELIBERATE = {
    "tests/data/test_hostile.py": {"../outside"},
    "tests/test_guarantees.py": {"../secrets", "../data/train.bin"},
}
CORPUS = ROOT / "corpora" / "tinyshakespeare.txt"
CORPUS_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def tracked_files(root: Path) -> list[tuple[str, str]]:
    """(mode, path) of every file git tracks under `root`."""
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-s", "-z"], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"not a git checkout ({exc})")
    entries = []
    for record in out.decode("utf-8", "surrogateescape").split("\0"):
        if record:
            meta, path = record.split("\t", 1)
            entries.append((meta.split()[0], path))
    return entries


def _inside(root: str, target: str) -> bool:
    return target == root or target.startswith(root + os.sep)


def outside_references(root: Path, files: list[str], symlinks: list[str] = ()) -> list[str]:
    """`path:line: reference` for every reference in `files` (paths relative to `root`) that points outside it."""
    base = os.path.normpath(str(root))
    known = set()  # tracked files and the folders that hold them, relative to the root
    for name in files:
        parts = Path(name).parts
        known.update(str(Path(*parts[:i])) for i in range(1, len(parts) + 1))
    problems = []
    for name in files:
        try:
            raw = (root / name).read_bytes()
        except OSError:
            continue
        if b"\0" in raw[:8192]:
            continue  # binary
        text = raw.decode("utf-8", "replace")
        folder = os.path.dirname(os.path.join(base, name))
        for number, line in enumerate(text.splitlines(), 1):
            line = URL.sub(" ", line)
            for match in RELATIVE.finditer(line):
                ref = match.group(0)
                if ref.endswith(".") and not ref.endswith(".."):
                    ref = ref.rstrip(".")
                ref = ref.rstrip(":!")
                if ref in DELIBERATE.get(name, ()):
                    continue
                targets = [os.path.normpath(os.path.join(start, ref)) for start in (folder, base)]
                if any(_inside(base, t) and (t == base or os.path.relpath(t, base) in known) for t in targets):
                    continue  # lands on something the repository holds
                if not all(_inside(base, t) for t in targets):
                    problems.append(f"{name}:{number}: {ref}")
            for match in ABSOLUTE.finditer(line):
                problems.append(f"{name}:{number}: {match.group(0)}")
    for name in symlinks:
        target = os.path.normpath(os.path.join(os.path.dirname(os.path.join(base, name)), os.readlink(root / name)))
        if not _inside(base, target):
            problems.append(f"{name}: symbolic link to {os.readlink(root / name)}")
    return problems


def test_no_tracked_file_refers_outside_the_repository():
    entries = tracked_files(ROOT)
    # (this file is left out: its examples point outside on purpose)
    files = [path for mode, path in entries if mode != "120000" and (ROOT / path).is_file() and path != "tests/test_repository.py"]
    links = [path for mode, path in entries if mode == "120000"]
    problems = outside_references(ROOT, files, links)
    assert not problems, "tracked files refer to paths outside the repository (a clone has none of them):\n" + "\n".join(problems)


def test_the_scan_tells_outside_references_from_inside_ones(tmp_path):
    files = {
        "README.md": "see [docs](docs/a.md) and https://example.com/../up and `/tmp/scratch` and `~/.cache/wiola`\n",
        "docs/a.md": "[back](../README.md), [sibling](../docs/a.md#top), [config](../configs/x.yaml).\n",
        "configs/x.yaml": "source: ../workspace/data/corpus.txt\n",
        "scripts/s.sh": 'REPO="$(cd "$(dirname "$0")/.." && pwd)"\ncat ../../notes.md\n',
        "src/m.py": 'SPEC = "/work/shared/SPEC.md"\nHOME = "/home/alice/project"\nOK = "sub/../file"\n',
        "docs/b.md": "[up two](../../elsewhere.md) [root file](../README.md)\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "docs" / "link").symlink_to("../../outside")
    found = outside_references(tmp_path, list(files), ["docs/link"])
    assert sorted(found) == sorted([
        "configs/x.yaml:1: ../workspace/data/corpus.txt",
        "scripts/s.sh:2: ../../notes.md",
        "src/m.py:1: /work/shared/SPEC.md",
        "src/m.py:2: /home/alice/project",
        "docs/b.md:1: ../../elsewhere.md",
        "docs/link: symbolic link to ../../outside",
    ])


def test_the_shipped_corpus_is_nanogpts_tinyshakespeare():
    data = CORPUS.read_bytes()
    assert len(data) == 1_115_394
    assert hashlib.sha256(data).hexdigest() == CORPUS_SHA256


@pytest.mark.parametrize("spec", sorted((ROOT / "configs" / "compare").glob("*.yaml")), ids=lambda p: p.name)
def test_every_comparison_spec_reads_data_that_ships_or_is_fetched(spec):
    from wiola.train.config import read_config_file

    source = str((read_config_file(spec).get("data") or {}).get("source", "shakespeare"))
    if spec.name == "tiny.yaml":
        assert source == "tiny.txt"  # tests/test_compare.py writes this corpus itself
    elif source != "shakespeare" and not source.startswith("hf:"):
        assert (ROOT / source).is_file(), f"{spec.name}: data source {source} is not in the repository"
