"""A real SIGINT/SIGTERM from outside: checkpoint written, clean exit, and the run resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wiola.cli import main
from wiola.train import checkpoint

from .tinyrun import FAST, read_log, train_losses

SRC = Path(__file__).resolve().parents[2] / "src"


def wait_for_step(log: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        if log.is_file():
            steps = [json.loads(line).get("step", 0) for line in log.read_text().splitlines() if line.endswith("}")]
            if steps and max(steps) >= step:
                return
        time.sleep(0.05)
    raise AssertionError("training made no progress")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_writes_checkpoint_and_resumes(dataset, model_config, tmp_path, sig):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "wiola", "train", str(model_config), str(dataset), str(out), *FAST,
           "--max-steps", "100000", "--eval-every", "100000", "--save-every", "100000"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(out / "log.jsonl", 3, proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, err[-2000:]
    assert f"{signal.Signals(sig).name}: saved" in err and "--resume" in err

    state = checkpoint.load_state(out / "checkpoints" / "latest")
    stopped = state["step"]
    assert stopped >= 3
    assert [r["step"] for r in read_log(out) if r.get("event") == "interrupted"] == [stopped]

    assert main(["train", str(model_config), str(dataset), str(out), "--resume", "--max-steps", str(stopped + 2)]) == 0
    assert sorted(train_losses(out)) == list(range(1, stopped + 3))  # continuous, no step repeated or lost
    assert checkpoint.load_state(out / "checkpoints" / "final")["step"] == stopped + 2
