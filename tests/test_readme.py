"""The README's quickstart runs as written, and its preset table shows the real parameter counts."""

from __future__ import annotations

import re
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


def test_command_table_names_every_command_with_its_positional_arguments():
    import inspect

    from wiola.cli import COMMANDS, _load

    rows = re.findall(r"^\| `wiola (\w+)((?: [A-Z]+)*)` \|", README.read_text(), re.M)
    assert sorted(name for name, _ in rows) == sorted(COMMANDS)
    for name, args in rows:
        params = inspect.signature(_load(COMMANDS[name])).parameters.values()
        positional = [p.name.upper() for p in params if p.default is inspect.Parameter.empty]
        assert args.split() == positional, name
