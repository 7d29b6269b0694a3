"""The command line itself: every subcommand has help, typed options parse, errors are one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from wiola.cli import COMMANDS, build_parser, main


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: wiola {command}") and len(text.splitlines()) > 3


def test_repeated_list_options_accumulate():
    args = build_parser().parse_args(["train", "wiola-nano", "data", "out", "--set", "a=1", "--set", "b=2", "c=3"])
    assert args.set == ["a=1", "b=2", "c=3"]
    assert build_parser().parse_args(["train", "wiola-nano", "data", "out"]).set is None


def test_bool_and_literal_options():
    args = build_parser().parse_args(["train", "wiola-nano", "data", "out", "--compile", "--schedule", "wsd"])
    assert args.compile is True and args.schedule == "wsd"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "wiola-nano", "data", "out", "--schedule", "linear"])


def test_user_error_is_one_line_and_exit_2(capsys, tmp_path):
    assert main(["train", "wiola-giant", str(tmp_path / "nodata"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("wiola train: error:")


def test_python_dash_m_entry_point():
    res = subprocess.run([sys.executable, "-m", "wiola", "presets"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "wiola-nano" in res.stdout and "12,915,888" in res.stdout
