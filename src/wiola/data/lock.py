"""Directory locks: one writer per output directory, no writer while a reader trains on data.

`wiola prepare` (its output, the data directory), `wiola train` (its `--out`) and `wiola convert`
(its destination) hold an exclusive `fcntl.flock` on `DIR/.wiola.lock` while they write; `wiola
train` holds a shared one on its data directory, so `prepare` cannot rewrite data under a running
training. A second writer fails at once with one line naming the holder's pid. The lock dies
with its process (also on SIGKILL), so a stale lock file never blocks anyone; the exclusive
holder deletes the file when it is done.

`claim_dir(path, what)` creates a directory (and its missing parents), locks it, and when the
body fails removes what it created if nothing but the lock file is in it, so a failed command
never leaves an empty output directory behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path
from typing import Iterator

from wiola.errors import WiolaError

LOCK_NAME = ".wiola.lock"


class DirLock:
    """An exclusive (or shared) non-blocking lock on `file`; `what` names the holder in messages."""

    def __init__(self, file: str | Path, what: str, shared: bool = False):
        self.file, self.what, self.shared = Path(file), what, shared
        self.fd: int | None = None

    def acquire(self) -> "DirLock":
        mode = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
        for _ in range(10):
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                raise WiolaError(f"{self.file.parent} is in use by another wiola process{self._holder()}; "
                                 f"wait for it to finish or choose another directory") from None
            try:  # the holder before us may have deleted the file between our open and our lock
                same = os.fstat(fd).st_ino == os.stat(self.file).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                if not self.shared:
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()} {self.what}\n".encode())
                return self
            os.close(fd)
        raise WiolaError(f"could not lock {self.file}")  # pragma: no cover - needs a pathological race

    def _holder(self) -> str:
        try:
            text = self.file.read_text().strip()
        except OSError:
            return ""
        pid, _, what = text.partition(" ")
        return f" (pid {pid}: {what})" if pid else ""

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            if self.shared:  # the last reader out removes the file (an exclusive lock proves nobody else holds it)
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.file.unlink()
        os.close(self.fd)  # closing drops the flock
        self.fd = None

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def shared_lock(directory: str | Path, what: str) -> DirLock | None:
    """A shared lock on a directory we only read (None when it cannot hold a lock file, e.g. read-only)."""
    lock = DirLock(Path(directory) / LOCK_NAME, what, shared=True)
    try:
        return lock.acquire()
    except OSError:
        return None


@contextlib.contextmanager
def claim_dir(path: str | Path, what: str) -> Iterator[Path]:
    """Create `path` if needed and hold its exclusive lock; on failure remove what was created when empty."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise WiolaError(f"{path} exists and is not a directory")
    created: list[Path] = []
    probe = path
    while not probe.exists() and probe != probe.parent:
        created.append(probe)
        probe = probe.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
        lock = DirLock(path / LOCK_NAME, what)
        lock.acquire()
    except OSError as exc:
        _remove_empty(created)
        raise WiolaError(f"output directory {path} is not writable ({exc.strerror or exc})") from None
    except BaseException:
        _remove_empty(created)
        raise
    try:
        yield path
    except BaseException:
        lock.release()
        _remove_empty(created)
        raise
    lock.release()


def _remove_empty(created: list[Path]) -> None:
    """Remove the directories this process created (deepest first) while they are empty."""
    for directory in created:
        with contextlib.suppress(OSError):
            directory.rmdir()
