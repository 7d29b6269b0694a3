"""A lost node: `torchrun` with 2 nodes x 1 process on localhost, one node killed or frozen mid-run.

Each node is its own `torchrun --nnodes 2 --nproc-per-node 1 --node-rank R` (static rendezvous on
127.0.0.1, gloo). A node is lost as a whole: its torchrun agent and its worker together (torchrun starts
workers in their own session, so killing the agent alone would leave the worker training). The survivor
must end on its own, promptly and in one line naming the checkpoint, and the same commands with
`--resume` must finish with the per-step losses and validation losses of an uninterrupted run, exactly.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from wiola.cli import main
from wiola.train import checkpoint, distributed

from .tinyrun import FAST, read_log, train_losses

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds a node's processes in /proc")

SRC = Path(__file__).resolve().parents[2] / "src"
MAX_STEPS = 60
# checkpoints every 5 steps; a short --dist-timeout, so that a silent node ends the run in seconds
STEPS = ["--max-steps", str(MAX_STEPS), "--eval-every", "30", "--save-every", "5", "--dist-timeout", "8"]
RUN_TIMEOUT = 120  # seconds for a whole 2-node run (most of it is starting python and torch twice)
SURVIVOR_TIMEOUT = 60  # seconds for the surviving node to end after the other is lost


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nodes(model_config: Path, dataset: Path, out: Path, *extra: str) -> list[subprocess.Popen]:
    """Both nodes of one run; each writes its output to out.nodeR.log."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    nodes = []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
               "--master-addr", "127.0.0.1", "--master-port", str(port),
               "-m", "wiola", "train", str(model_config), str(dataset), str(out), *FAST, *STEPS, *extra]
        log = open(f"{out}.node{rank}.log", "a")
        nodes.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        log.close()
    return nodes


def node_output(out: Path, rank: int) -> str:
    return Path(f"{out}.node{rank}.log").read_text(errors="replace")


def processes_of(pid: int) -> list[int]:
    """`pid` and all its descendants (a node's agent and its workers), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def signal_all(pids: list[int], sig: int) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def end_nodes(nodes: list[subprocess.Popen]) -> None:
    """Make sure nothing of a run outlives the test."""
    for node in nodes:
        if node.poll() is None:
            signal_all(processes_of(node.pid), signal.SIGKILL)
            node.wait()


def wait_nodes(nodes: list[subprocess.Popen], out: Path, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [node.wait(timeout=max(0.1, deadline - time.monotonic())) for node in nodes]
    except subprocess.TimeoutExpired:
        end_nodes(nodes)
        pytest.fail(f"the 2-node run did not end in {timeout} s\n{node_output(out, 0)[-2000:]}\n{node_output(out, 1)[-2000:]}")


def wait_for_checkpoint(nodes: list[subprocess.Popen], out: Path) -> int:
    """Poll until checkpoints/latest exists (the nodes still running); its step."""
    state = out / "checkpoints" / "latest" / checkpoint.STATE_JSON
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        if state.is_file():
            try:
                return int(json.loads(state.read_text())["step"])
            except (ValueError, KeyError):
                pass  # (the directory is renamed into place whole, so this is not expected)
        if any(node.poll() is not None for node in nodes):
            end_nodes(nodes)
            pytest.fail(f"a node ended before the first checkpoint\n{node_output(out, 0)[-3000:]}\n{node_output(out, 1)[-3000:]}")
        time.sleep(0.01)
    end_nodes(nodes)
    pytest.fail(f"no checkpoint after {RUN_TIMEOUT} s")


def val_losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["val_loss"]) for r in read_log(out) if "val_loss" in r]


@pytest.fixture(scope="module")
def uninterrupted(dataset, model_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("multinode") / "uninterrupted"
    nodes = start_nodes(model_config, dataset, out)
    assert wait_nodes(nodes, out, RUN_TIMEOUT) == [0, 0], node_output(out, 0)[-3000:] + node_output(out, 1)[-3000:]
    assert sorted(train_losses(out)) == list(range(1, MAX_STEPS + 1))
    assert [r["world_size"] for r in read_log(out) if r.get("event") == "start"] == [2]
    return out


def lose_node(dataset: Path, model_config: Path, out: Path, lost: int, how: int) -> int:
    """Start the run, lose node `lost` (`how`: SIGKILL, or SIGSTOP for a silent node) after its first checkpoint,
    check that the survivor ends on its own in one line; the step of the checkpoint to resume from."""
    survivor = 1 - lost
    nodes = start_nodes(model_config, dataset, out)
    try:
        wait_for_checkpoint(nodes, out)
        victims = processes_of(nodes[lost].pid)
        assert len(victims) >= 2  # the node's torchrun agent and its worker
        signal_all(victims, how)
        lost_at = time.monotonic()
        try:
            code = nodes[survivor].wait(timeout=SURVIVOR_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the surviving node still ran {SURVIVOR_TIMEOUT} s after node {lost} was lost (a hang)")
        took = time.monotonic() - lost_at
    finally:
        end_nodes(nodes)  # SIGKILL also ends a stopped process
    text = node_output(out, survivor)
    assert code != 0, text[-3000:]
    # the worker's own message: one line, which rank, why, and the checkpoint to resume from
    lines = [line for line in text.splitlines() if line.startswith("wiola train: error:")]
    assert len(lines) == 1, text[-3000:]
    latest = out / "checkpoints" / "latest"
    step = int(json.loads((latest / checkpoint.STATE_JSON).read_text())["step"])
    assert 0 < step < MAX_STEPS and step % 5 == 0
    assert f"rank {survivor}: lost the other processes of the run" in lines[0]
    assert f"the last checkpoint is {latest} (step {step}): start every node again with --resume" in lines[0]
    assert "Traceback" not in text.split("wiola train: error:")[0]  # no traceback from the worker (torchrun adds its own report)
    assert not (out / "checkpoints" / "final").exists()
    if how == signal.SIGSTOP:  # a silent node: gloo waits out --dist-timeout (8 s), then fails
        assert "Timed out" in lines[0] and took >= 7, (took, lines[0])
    else:  # a dead one: its closed connections fail the next collective, without waiting for the timeout
        assert "Timed out" not in lines[0], lines[0]
    return step


def resume_and_compare(uninterrupted: Path, dataset: Path, model_config: Path, out: Path, step: int) -> None:
    """Rerun both nodes with --resume: the losses of the uninterrupted run, exactly."""
    nodes = start_nodes(model_config, dataset, out, "--resume")
    try:
        codes = wait_nodes(nodes, out, RUN_TIMEOUT)
    finally:
        end_nodes(nodes)
    assert codes == [0, 0], node_output(out, 0)[-3000:] + node_output(out, 1)[-3000:]
    assert [r["step"] for r in read_log(out) if r.get("event") == "resume"] == [step]
    assert train_losses(out) == train_losses(uninterrupted)  # every step's loss, exactly
    assert val_losses(out) == val_losses(uninterrupted) and len(val_losses(out)) == 2
    a, b = checkpoint.load_weights(uninterrupted / "checkpoints" / "final"), checkpoint.load_weights(out / "checkpoints" / "final")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf"])
def test_dist_timeout_must_be_positive(dataset, model_config, tmp_path, capsys, value):
    assert main(["train", str(model_config), str(dataset), str(tmp_path / "out"), *FAST, "--dist-timeout", value]) == 2
    assert capsys.readouterr().err.strip() == f"wiola train: error: --dist-timeout must be a positive number of seconds, got {float(value)!r}"
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_only_a_collective_failure_becomes_the_lost_node_line(tmp_path):
    two = distributed.Dist(rank=1, world_size=2, local_rank=0, device=torch.device("cpu"))
    latest = tmp_path / "checkpoints" / "latest"
    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:4242: Connection reset"
                        " by peer. This is typically caused by a remote worker hanging or bugs in the application. GLHF!")
    with pytest.raises(distributed.LostPeer) as caught, distributed.peer_failures(two, latest):
        raise gloo
    assert str(caught.value) == ("rank 1: lost the other processes of the run (Read error [127.0.0.1]:4242: Connection reset by peer);"
                                 " no checkpoint was written yet: start the run again")
    latest.mkdir(parents=True)
    (latest / checkpoint.STATE_JSON).write_text(json.dumps({"step": 15}))
    with pytest.raises(distributed.LostPeer, match=r"the last checkpoint is .*latest \(step 15\): start every node again with --resume"), \
            distributed.peer_failures(two, latest):
        raise dist.DistBackendError("NCCL watchdog: collective timed out")
    # this rank's own errors, and anything in a single process, pass through unchanged
    for d, exc in ((two, RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)")),
                   (distributed.Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")), gloo)):
        with pytest.raises(RuntimeError) as caught, distributed.peer_failures(d, latest):
            raise exc
        assert caught.value is exc


@pytest.mark.slow
@linux_only
def test_killed_node_ends_the_run_and_resume_matches_uninterrupted(uninterrupted, dataset, model_config, tmp_path):
    # node 1 dies (its agent and worker SIGKILLed): its connections close, so the survivor fails at the next
    # collective, long before --dist-timeout
    out = tmp_path / "killed"
    step = lose_node(dataset, model_config, out, lost=1, how=signal.SIGKILL)
    resume_and_compare(uninterrupted, dataset, model_config, out, step)


@pytest.mark.slow
@linux_only
def test_silent_node_ends_the_run_after_dist_timeout(dataset, model_config, tmp_path):
    # node 0 (global rank 0, the checkpoint writer, and the host of torchrun's store) freezes: no connection
    # closes, so only the collective timeout ends the survivor; with the former fixed 30 minutes it hung that long
    # (the resume after it is the one above: the same commands with --resume)
    lose_node(dataset, model_config, tmp_path / "frozen", lost=0, how=signal.SIGSTOP)
