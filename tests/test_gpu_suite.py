"""`scripts/gpu_suite.sh`, the staged runbook for the GPU work that needs more than one call (larger presets,
comparisons), cannot be run here; what can go wrong without a GPU is checked: the script parses, every
`wiola` command line in it parses with the real CLI, a stage without the carried `.gpu/` folder stops with
one clear line, and the stages that moved to `scripts/gpu_check.sh` are refused with a pointer to it."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from wiola.cli import build_parser

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_suite.sh"
PLACEHOLDERS = {"$OUT": "/tmp/out", "$preset": "wiola-micro", "$batch": "8", '"$spec"': "spec.yaml", "$name": "x"}


def wiola_commands() -> list[list[str]]:
    text = SCRIPT.read_text().replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        match = re.search(r"\$PY -m wiola (.*?)(?:\s*\|\||\s*\||$)", line)
        if match:
            command = match.group(1)
            for name, value in PLACEHOLDERS.items():
                command = command.replace(name, value)
            command = re.sub(r'"\$\{only\[@\]\}"', "", command)
            commands.append(shlex.split(command))
    return commands


def test_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_every_wiola_command_line_parses():
    commands = wiola_commands()
    assert {c[0] for c in commands} == {"bench", "compare"}
    parser = build_parser()
    for command in commands:
        args = parser.parse_args(command)  # argparse exits on an unknown or malformed option
        assert args.command == command[0]


@pytest.mark.parametrize("stage", ["presets", "compare-char", "compare-bpe", "compare-candidate"])
def test_a_stage_without_the_carried_folder_stops_clearly(tmp_path, stage):
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    (repo / "scripts" / "gpu_suite.sh").write_text(SCRIPT.read_text())
    result = subprocess.run(["bash", "scripts/gpu_suite.sh", stage], cwd=repo, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "gpu_suite: .gpu/ is missing: run 'bash scripts/gpu_suite.sh prep' here and carry .gpu"


@pytest.mark.parametrize("stage", ["bench", "atm", "main"])
def test_a_stage_that_moved_to_gpu_check_is_refused_with_a_pointer(stage):
    result = subprocess.run(["bash", str(SCRIPT), stage], capture_output=True, text=True)
    assert result.returncode == 2
    assert "scripts/gpu_check.sh" in result.stderr and len(result.stderr.strip().splitlines()) == 1
