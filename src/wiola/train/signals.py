"""Graceful stop on SIGINT/SIGTERM: the first signal asks the loop to checkpoint and exit.

The handler only records the signal; the training loop polls `requested` after each step
(all ranks agree on it through the per-step all-reduce), saves `latest` and returns exit
status 128 + signal number. A second SIGINT while that happens aborts at once.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType


class GracefulStop:
    """Context manager that turns SIGINT/SIGTERM into a polled flag (in the main thread only)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signum = signum

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    @property
    def exit_code(self) -> int:
        return 128 + self.signum if self.signum is not None else 0

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""
