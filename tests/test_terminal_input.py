"""`wiola generate` and `wiola chat` on input from a terminal (issue 26): bytes that are not UTF-8 get one
line, not a traceback; Ctrl-C during a chat reply stops the reply, not the chat."""

from __future__ import annotations

import contextlib
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.serve.tinymodels import save_tiny_model, tiny_tokenizer
from tests.train.test_chat import _read_until
from wiola.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A randomised tiny Wiola model with a context of 1,024 tokens: its greedy replies run long (no eos)."""
    return save_tiny_model(tmp_path_factory.mktemp("terminal") / "seed", "seed", tiny_tokenizer(), context=1024)


def test_generate_refuses_a_prompt_that_is_not_utf8_in_one_line(model_dir, capsys):
    prompt = os.fsdecode(b"a\xff\xfeb")  # what Python makes of the argument $(printf 'a\xff\xfeb')
    assert main(["generate", str(model_dir), prompt, "--device", "cpu", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err == "wiola generate: error: the prompt is not valid UTF-8 text (byte 0xff at character 1)\n"
    assert main(["generate", str(model_dir), "a\ud800", "--device", "cpu", "--max-new-tokens", "2"]) == 2
    assert "not valid UTF-8 text (a lone surrogate U+D800 at character 1)" in capsys.readouterr().err


# `python -m wiola` as a terminal's foreground program runs it: Ctrl-C at its default. A test run started in the
# background (`cmd &`, nohup, a CI runner) ignores SIGINT, its children inherit that, and Python then installs no
# KeyboardInterrupt handler: the chat would never see the Ctrl-C these tests send.
FOREGROUND = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
              "sys.argv[0] = 'wiola'; runpy.run_module('wiola', run_name='__main__', alter_sys=True)")


@contextlib.contextmanager
def chat(model_dir):
    """(terminal fd, bytes seen) of `wiola chat` (greedy, 900-token replies) on a pseudo-terminal, at its first prompt;
    on leaving, Ctrl-D must end it with status 0 and no traceback."""
    master, slave = pty.openpty()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-c", FOREGROUND, "chat", str(model_dir), "--greedy", "--device", "cpu",
                             "--max-new-tokens", "900"], stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    seen = bytearray()
    try:
        _read_until(master, b"you> ", seen)
        yield master, seen, proc
        os.write(master, b"\x04")  # Ctrl-D at the prompt ends the chat
        assert proc.wait(timeout=30) == 0, bytes(seen)[-500:]
        assert b"Traceback" not in seen and b"interrupted" not in seen
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def test_chat_does_not_send_a_line_that_is_not_utf8(model_dir):
    with chat(model_dir) as (master, seen, _):
        os.write(master, b"a\xff\xfeb\n")  # a note, and the chat goes on
        _read_until(master, b"you> ", seen, len(seen))
        assert b"(message not sent: the line is not valid UTF-8 text" in seen and b"bot> " not in seen
        os.write(master, b"/reset\n")
        _read_until(master, b"(conversation cleared)\r\nyou> ", seen, len(seen))


def _frozen(proc) -> bool:
    """Whether the process is stopped (state T in /proc), i.e. SIGSTOP has landed."""
    stat = Path(f"/proc/{proc.pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] in "Tt"


def _drain(fd: int, seen: bytearray) -> None:
    """Read what the terminal holds into `seen`, until it has been quiet for 0.2 s."""
    while select.select([fd], [], [], 0.2)[0]:
        chunk = os.read(fd, 4096)
        if not chunk:
            return
        seen += chunk


def test_chat_ctrl_c_stops_the_reply_not_the_chat(model_dir):
    """Ctrl-C while a reply is decoded. Timing-proof: the chat is frozen (SIGSTOP) as soon as "bot> " shows and its
    output drained. With nothing of the reply printed yet, it is still inside the reply's `generate` (which prints the
    reply's text itself, word by word or, for text without spaces, all at the end), so Ctrl-C goes in while it is
    frozen and lands on SIGCONT, mid-reply. When some of the reply had been printed (it may have ended), that reply
    is let finish and the question asked again."""
    with chat(model_dir) as (master, seen, proc):
        for _attempt in range(10):
            start = len(seen)
            os.write(master, b"What does the king do?\n")
            _read_until(master, b"bot> ", seen, start)
            reply = seen.index(b"bot> ", start) + len(b"bot> ")
            proc.send_signal(signal.SIGSTOP)
            deadline = time.monotonic() + 10
            while not _frozen(proc):
                assert time.monotonic() < deadline, "the chat did not stop on SIGSTOP"
                time.sleep(0.01)
            _drain(master, seen)
            if not seen[reply:]:
                break  # frozen before any of the reply was printed: inside its generate
            proc.send_signal(signal.SIGCONT)  # let this reply end, then ask again
            _read_until(master, b"you> ", seen, reply)
        else:
            pytest.fail("the chat could not be frozen before its reply printed")
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends; pending until the chat runs again
        proc.send_signal(signal.SIGCONT)
        _read_until(master, b"(reply stopped", seen, reply)
        _read_until(master, b"you> ", seen, seen.index(b"(reply stopped", reply))
        os.write(master, b"/reset\n")
        _read_until(master, b"(conversation cleared)\r\nyou> ", seen, start)
