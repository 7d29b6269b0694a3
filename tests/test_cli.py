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


def _commands_with_a_seed() -> list[str]:
    import inspect

    from wiola.cli import _load

    return [name for name, target in COMMANDS.items() if "seed" in inspect.signature(_load(target)).parameters]


@pytest.mark.parametrize("command", _commands_with_a_seed())
@pytest.mark.parametrize("seed", ["99999999999999999999999", "-1", "4294967296"])
def test_every_seed_is_checked_in_one_line(command, seed, tmp_path, capsys):
    """Issue 26: `--seed 99999999999999999999999` ended in "Overflow when unpacking long long"; numpy and
    transformers' set_seed also refuse seeds outside 0 .. 2**32 - 1. Every command that takes --seed says so first."""
    positionals = {"generate": ["run", "prompt"], "chat": ["run"], "train": ["wiola-nano", "data", "out"],
                   "prepare": ["--source", "corpus.txt", "--out", "out"]}
    args = [str(tmp_path / p) if p in ("run", "data", "out", "corpus.txt") else p for p in positionals.get(command, [])]
    assert command in positionals, f"add {command}'s positional arguments here"
    assert main([command, *args, "--seed", seed]) == 2
    err = capsys.readouterr().err
    assert err == f"wiola {command}: error: --seed must be an integer from 0 to 4294967295 (2**32 - 1), got {int(seed)}\n"


def test_seeds_from_config_files_and_compare_specs_are_checked():
    from wiola.compare.spec import check_seeds
    from wiola.errors import WiolaError
    from wiola.train.config import TrainConfig

    assert TrainConfig.layered({"seed": 2**32 - 1}).finalize(1, 64).seed == 2**32 - 1
    with pytest.raises(WiolaError, match="--seed must be an integer from 0 to 4294967295"):
        TrainConfig.layered({"seed": 10**23}).finalize(1, 64)  # a config file's train: section
    with pytest.raises(WiolaError, match="at most 2"):
        check_seeds([1, 2**40])
