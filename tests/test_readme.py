"""The README's quickstart runs as written, and its preset table shows the real parameter counts."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from wiola import list_presets

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python quickstart"
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code.replace("/tmp/wiola-demo", str(tmp_path / "demo")), "README.md", "exec"), {})
    assert (tmp_path / "demo" / "model.safetensors").exists()


def test_preset_table_matches_code():
    from wiola.configuration_wiola import WiolaConfig, flops_per_token

    rows = {name: (count, flops) for name, count, flops in re.findall(r"^\| `([\w.-]+)` \| ([\d,]+) \| ([\d.]+) \|", README.read_text(), re.M)}
    assert rows == {name: (f"{count:,}", f"{flops_per_token(WiolaConfig.from_preset(name)) / 1e9:.3f}") for name, count in list_presets().items()}


def test_readme_preset_table_is_what_wiola_presets_prints():
    """README's table, line for line, is the Markdown table `wiola presets` prints (run as a user runs it)."""
    res = subprocess.run([sys.executable, "-m", "wiola", "presets"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    printed = [line for line in res.stdout.splitlines() if line.startswith("|")]
    assert len(printed) == 2 + len(list_presets())
    readme = README.read_text().splitlines()
    start = readme.index(printed[0])
    assert readme[start:start + len(printed) + 1] == printed + [""], "README's preset table differs from `wiola presets`"


def test_readme_says_how_to_run_wiola():
    """After the setup commands, README puts `wiola` on PATH (activating .venv) before its first `wiola` command."""
    text = README.read_text()
    assert "source .venv/bin/activate" in text and ".venv/bin/wiola" in text
    assert text.index("source .venv/bin/activate") < text.index("\nwiola ")


def test_command_table_names_every_command_with_its_positional_arguments():
    import inspect

    from wiola.cli import COMMANDS, _load

    rows = re.findall(r"^\| `wiola (\w+)((?: [A-Z]+)*)` \|", README.read_text(), re.M)
    assert sorted(name for name, _ in rows) == sorted(COMMANDS)
    for name, args in rows:
        params = inspect.signature(_load(COMMANDS[name])).parameters.values()
        positional = [p.name.upper() for p in params if p.default is inspect.Parameter.empty]
        assert args.split() == positional, name
