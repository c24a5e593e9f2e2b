"""A clean stop on SIGTERM or SIGINT (a launcher's Stop, `kill`, Ctrl-C, a cloud machine being pre-empted).

The first signal asks the loop to stop after the optimizer step in progress, so it can write a checkpoint
and the adapter; the loop then raises `TrainingStopped` and the process exits with STOPPED_EXIT_CODE. A
second signal interrupts at once (KeyboardInterrupt): every file is written atomically, so the last
complete checkpoint and adapter are intact either way. A launcher's own stop flag (Transformer Lab's) is
polled at each step through `poll` and counts as a first signal.
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from typing import Callable

STOPPED_EXIT_CODE = 75  # EX_TEMPFAIL from sysexits.h: the run can be resumed ("try again later")
SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Signals this close together are one request: Transformer Lab's Stop sends SIGTERM twice within milliseconds
# (to the process group and to the process), which must not count as the "again, at once" of a user.
BURST_SECONDS = 0.5


class StopRequest:
    """Installs the handlers for the duration of a `with` block (main thread only: signals are delivered
    there; elsewhere, as in a launcher's worker thread, it only reports requests made by `request`)."""

    def __init__(self, log=print, poll: Callable[[], bool] = lambda: False):
        self.log = log
        self.poll = poll
        self.reason: str | None = None
        self.signalled_at: float | None = None
        self.previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop was asked for; polls the launcher's flag until one was."""
        if self.reason is None and self.poll():
            self.request("the launcher's Stop")
            self.log(f"{self.reason}: stopping after this step with a checkpoint and the adapter")
        return self.reason is not None

    def request(self, reason: str) -> None:
        self.reason = self.reason or reason

    def _handle(self, signum, frame) -> None:
        """The first signal (or burst) asks for a stop; a later one interrupts at once."""
        now = time.monotonic()
        if self.signalled_at is not None:
            if now - self.signalled_at < BURST_SECONDS:
                return
            raise KeyboardInterrupt
        self.signalled_at = now
        if self.reason is None:
            self.request(signal.Signals(signum).name)
            self.log(f"{self.reason}: stopping after this step with a checkpoint and the adapter (again to stop at once)")

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class StartupInterrupts:
    """Ctrl-C while the process starts (imports, parameter checks, building the demo's model): stop, nothing
    written yet.

    Python raises KeyboardInterrupt wherever the interpreter happens to be, which during the heavy imports
    goes wrong two ways: a library can swallow it (on Python 3.11 a class's `__set_name__` wraps it in a
    RuntimeError, which optional-import guards catch: the run went on to train and exit 0), and raised while
    PyTorch's C++ is calling back into Python it aborts the process (std::terminate). So this handler
    remembers every press, and inside `deferred()` (the imports) only remembers it, raising it at the end.
    Inside `with`; the previous handler after, unless the run ignored SIGINT on its way out."""

    def __init__(self):
        self.pressed = False
        self.raising = True
        self.previous = None

    def _handle(self, signum, frame) -> None:
        self.pressed = True
        if self.raising:
            raise KeyboardInterrupt

    def check(self) -> None:
        if self.pressed:
            raise KeyboardInterrupt

    @contextmanager
    def deferred(self):
        """Presses during the block are remembered and raised at its end, not inside it."""
        self.raising = False
        try:
            yield
        finally:
            self.raising = True
        self.check()

    def __enter__(self) -> "StartupInterrupts":
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None and signal.getsignal(signal.SIGINT) == self._handle:  # else set since, on purpose
            signal.signal(signal.SIGINT, self.previous)
