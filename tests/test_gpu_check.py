"""`scripts/gpu_check.sh`, the one-call GPU check, tested without a GPU: the script parses, every command line
of the GPU run parses with the real parsers, it stops with one clear line where CUDA is missing, a failing or
overrunning stage never stops the later ones, and a CPU dry run at toy sizes runs every stage's real code
(correctness checks, `wiola bench` twice, the ATM benchmark) and leaves at most 8 files in $OUT."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wiola.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
FILES = {"summary.md", "log.txt", "correctness.json", "bench_wiola-nano.json", "bench_wiola-120m.json", "atm_bench.md",
         "main_job.txt", "main_job_loss.png"}


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(*args: str, tmp_path: Path, python: str = sys.executable, **env) -> subprocess.CompletedProcess:
    empty = tmp_path / "empty-cache"
    empty.mkdir(exist_ok=True)
    environ = dict(os.environ, PYTHON=python, OUT=str(tmp_path / "out"), WIOLA_CACHE=str(empty), OMP_NUM_THREADS="1", **env)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, env=environ, timeout=600)


def stage_table(stdout: str) -> dict[str, tuple[str, str]]:
    """{stage: (status, note)} from the table the script prints last."""
    rows = {}
    for line in stdout.split("## Stages")[-1].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0][:1].isdigit():
            rows[cells[0]] = (cells[1], cells[3])
    return rows


def test_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_every_command_line_of_the_gpu_run_parses(tmp_path):
    result = run("--commands", tmp_path=tmp_path, python="python3")
    assert result.returncode == 0, result.stderr
    lines = [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]
    assert [line[1] if line[0] == "python3" else line[-1] for line in lines] == [
        "scripts/gpu_check.py", "-m", "-m", "benchmarks/atm_bench.py", "scripts/main_job.sh"]  # in order of value

    correctness = load(ROOT / "scripts" / "gpu_check.py").build_parser().parse_args(lines[0][2:])
    assert correctness.command == "correctness" and correctness.device == "cuda" and not correctness.tiny
    assert correctness.out == str(tmp_path / "out" / "correctness.json")

    parser = build_parser()
    for line, preset in zip(lines[1:3], ("wiola-nano", "wiola-120m")):
        assert line[2] == "wiola"
        args = parser.parse_args(line[3:])  # argparse exits on an unknown or malformed option
        assert args.command == "bench" and args.config == preset and args.device == "cuda"
        assert args.compile and args.decode and args.decode_batch == [1]  # train eager + compiled, decode at batch 1
        assert args.seq_len == 1024 and args.train_steps <= 10 and args.out == str(tmp_path / "out" / f"bench_{preset}.json")

    atm = load(ROOT / "benchmarks" / "atm_bench.py").build_parser().parse_args(lines[3][2:])
    assert atm.device == "cuda" and not atm.tiny

    main_job = (ROOT / "scripts" / "main_job.sh").read_text()
    knobs = [item.split("=", 1)[0] for item in lines[4][1:] if re.fullmatch(r"[A-Z_]+=.*", item)]
    assert set(knobs) >= {"WIOLA_SETUP", "PYTHON", "OUT", "STEPS"}
    for knob in knobs:
        assert re.search(r"\$\{?" + knob + r"\b", main_job), f"main_job.sh does not read {knob}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_stops_with_one_clear_line(tmp_path):
    result = run(tmp_path=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == ("gpu_check: no CUDA device (torch.cuda.is_available() is False); "
                                     "run it on a GPU machine, or use --dry-run for the CPU smoke run")
    assert not (tmp_path / "out").exists()


def test_without_torch_it_stops_with_one_clear_line(tmp_path):
    result = run(tmp_path=tmp_path, python="/bin/false")
    assert result.returncode == 2
    assert result.stderr.strip() == "gpu_check: /bin/false cannot import torch; run it with the GPU machine's python3 (or set PYTHON)"


def test_a_failing_or_overrunning_stage_never_stops_the_next(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(f"""#!/usr/bin/env bash
case "$*" in
  *"gpu_check.py summary"*) exec {shlex.quote(sys.executable)} "$@" ;;
  *correctness*) echo "correctness broke" >&2; exit 3 ;;
  *wiola-nano*) sleep 30 ;;
  *atm_bench*) echo "| atm figures |" ;;
esac
""")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    result = run("--dry-run", tmp_path=tmp_path, python=str(fake), GPU_CHECK_BUDGETS="60 1 60 60 60")
    assert result.returncode == 1
    table = stage_table(result.stdout)
    assert table["1 correctness"][0] == "FAIL" and "exit status 3" in table["1 correctness"][1]
    assert table["2 bench wiola-nano"] == ("FAIL", "cut off at 1 s")
    assert table["2 bench wiola-120m"][0] == "PASS" and table["3 atm_bench"][0] == "PASS"
    assert table["4 main job"][0] == "SKIP" and "gpu_suite.sh prep" in table["4 main job"][1]
    assert (tmp_path / "out" / "atm_bench.md").read_text() == "| atm figures |\n"


def test_out_of_time_stages_are_skipped_and_said_so(tmp_path):
    result = run("--dry-run", tmp_path=tmp_path, GPU_CHECK_SECONDS="10")
    assert result.returncode == 0
    table = stage_table(result.stdout)
    assert len(table) == 5 and all(status == "SKIP" for status, _ in table.values())
    assert "out of time: " in table["1 correctness"][1]


def test_cpu_dry_run_runs_every_stage_and_returns_at_most_eight_files(tmp_path):
    result = run("--dry-run", tmp_path=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "out"
    names = {p.name for p in out.rglob("*")}
    assert names <= FILES and len(names) <= 8
    assert names >= {"summary.md", "log.txt", "correctness.json", "bench_wiola-nano.json", "bench_wiola-120m.json", "atm_bench.md"}

    table = stage_table(result.stdout)
    assert [table[s][0] for s in ("1 correctness", "2 bench wiola-nano", "2 bench wiola-120m", "3 atm_bench")] == ["PASS"] * 4
    assert table["1 correctness"][1] == "4 pass, 0 fail, 3 skip"
    assert table["4 main job"][0] == "SKIP"  # no corpus in the empty cache
    assert result.stdout.rstrip().endswith("|") and "## Stages" in (out / "summary.md").read_text()

    checks = {r["check"]: r for r in json.loads((out / "correctness.json").read_text())["checks"]}
    assert checks["flex fp32"]["status"] == "PASS" and checks["flex fp32"]["figures"]["logits_rel"] < 1e-4
    assert 0.3 < checks["flex fp32"]["figures"]["mu"] < 0.6  # merging really ran (τ = −1)
    assert checks["flex bf16"]["status"] == "PASS"
    for name in ("decode wiola-nano", "decode wiola-120m", "decode wiola-nano+ATM τ=−1"):
        assert checks[name]["status"] == "SKIP" and checks[name]["note"].startswith("CUDA graphs need a CUDA device")
    for name in ("train bf16 wiola-nano", "train bf16 wiola-120m"):
        assert checks[name]["status"] == "PASS" and checks[name]["figures"]["grad_cos"] > 0.99

    for preset in ("wiola-nano", "wiola-120m"):
        rows = json.loads((out / f"bench_{preset}.json").read_text())["rows"]
        assert {(r["model"], r["what"]) for r in rows} == {(m, w) for m in ("wiola", "llama") for w in ("train", "decode generate()", "decode static loop")}
        assert f"| {preset} | train eager tokens/s" in result.stdout
    assert "| 128 | fwd+bwd |" in (out / "atm_bench.md").read_text()
