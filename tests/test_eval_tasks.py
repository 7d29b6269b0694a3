"""`wiola eval --tasks`: lm-evaluation-harness on trained tiny models of every family, with the shipped offline
task, gives the numbers of `lm_eval.simple_evaluate(model="hf", pretrained=DIR, trust_remote_code=True)`."""

from __future__ import annotations

import json
import sys

import pytest

from tests.train.tinyrun import FAMILIES, FAST, make_dataset, write_model_config
from wiola.cli import main
from wiola.evaluate import TASKS_DIR

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("eval-tasks") / "data")


def train(data, out, family):
    config = write_model_config(out.parent / f"{family}.json", **FAMILIES[family])
    assert main(["train", str(config), str(data), str(out), *FAST, "--max-steps", "2", "--eval-every", "2"]) == 0
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tasks_match_lm_eval_called_directly(data, tmp_path, family, capsys):
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = train(data, tmp_path / "run", family)
    capsys.readouterr()
    assert main(["eval", str(out), "--tasks", "wiola_shakespeare", "--num-fewshot", "1", "--limit", "12",
                 "--device", "cpu", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads((out / "lm_eval" / "wiola_shakespeare_1shot_limit12.json").read_text())
    assert printed["saved"].endswith("wiola_shakespeare_1shot_limit12.json")

    direct = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={out},trust_remote_code=True,device=cpu",
                                     tasks=["wiola_shakespeare"], num_fewshot=1, limit=12, log_samples=False,
                                     task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False))
    ours, theirs = saved["results"]["wiola_shakespeare"], direct["results"]["wiola_shakespeare"]
    assert theirs["sample_len"] == 12 and saved["n-shot"]["wiola_shakespeare"] == 1
    for metric in ("acc,none", "acc_norm,none", "acc_stderr,none"):
        assert ours[metric] == theirs[metric], metric
    assert printed["results"]["wiola_shakespeare"]["acc,none"] == ours["acc,none"]
    assert (out / "README.md").is_file()  # `wiola train` wrote the card


def test_data_and_tasks_together_and_errors(data, tmp_path, monkeypatch, capsys):
    out = train(data, tmp_path / "run", "all-off")
    result = main(["eval", str(out), str(data), "--tasks", "wiola_shakespeare", "--limit", "4", "--device", "cpu",
                   "--seq-len", "16", "--max-batches", "1", "--output", str(tmp_path / "r.json")])
    assert result == 0
    text = capsys.readouterr().out
    assert "bits per byte" in text and "wiola_shakespeare" in text and (tmp_path / "r.json").is_file()

    def error(argv):
        assert main(argv) == 2
        return capsys.readouterr().err.strip()

    assert "give DATA" in error(["eval", str(out)])
    assert "unknown lm-eval task(s): no_such_task_xyz" in error(["eval", str(out), "--tasks", "no_such_task_xyz"])
    assert "--include-path" in error(["eval", str(out), "--tasks", "wiola_shakespeare", "--include-path", str(tmp_path / "x")])
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    assert "pip install 'wiola[eval]'" in error(["eval", str(out), "--tasks", "wiola_shakespeare"])


def test_tasks_outside_a_git_repository_print_no_git_noise(data, tmp_path, monkeypatch, capfd):
    """Issue 26: lm-eval records the working directory's git commit by running `git describe` with git's stderr
    on the terminal, so `wiola eval --tasks` printed "fatal: not a git repository" outside one."""
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("needs git")
    out = train(data, tmp_path / "run", "all-off")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # never a repository above the test folder
    assert subprocess.run(["git", "describe", "--always"], capture_output=True).returncode != 0  # as the user's folder
    capfd.readouterr()
    assert main(["eval", str(out), "--tasks", "wiola_shakespeare", "--limit", "2", "--device", "cpu", "--json"]) == 0
    captured = capfd.readouterr()
    assert "not a git repository" not in captured.err, captured.err
    saved = json.loads((out / "lm_eval" / "wiola_shakespeare_limit2.json").read_text())
    assert "git_hash" in saved and saved["git_hash"] is None  # what lm-eval records here, as before
