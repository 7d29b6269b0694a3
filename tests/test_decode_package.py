"""`wiola.decode`'s layout (issue 27, one simple decoder): imports run one way — the decoder imports the chooser,
the loop and the backends; no backend, nor the loop or the chooser, imports the decoder or the package."""

from __future__ import annotations

import ast
from pathlib import Path

import wiola.decode

PACKAGE = Path(wiola.decode.__file__).parent
LOWER = ["loop", "choose", "torch_backend", "onnx_backend", "caches"]  # the layers below `decoder`


def imported(module: str) -> set[str]:
    """The `wiola.decode` modules that `module` imports (relative or absolute, anywhere in the file)."""
    names = set()
    for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level == 1 or base.startswith("wiola.decode"):
                stem = base.removeprefix("wiola.decode").lstrip(".")
                names |= {stem} if stem else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name.removeprefix("wiola.decode.") for a in node.names if a.name.startswith("wiola.decode")}
    return names


def test_imports_run_one_way():
    assert {"choose", "loop", "torch_backend", "onnx_backend"} <= imported("decoder")
    for module in LOWER:
        assert not imported(module) & {"decoder", "wiola.decode", ""}, module
    assert imported("loop") == set() and imported("choose") == set()  # the loop and the rule stand alone
    assert imported("torch_backend") <= {"caches"} and imported("onnx_backend") <= {"caches"}
    assert wiola.decode.StaticDecoder.__module__ == "wiola.decode.decoder"
