"""A clean stop on SIGTERM or SIGINT (a launcher's Stop, `kill`, Ctrl-C, a cloud machine being pre-empted).

The first signal asks the loop to stop after the optimizer step in progress, so it can write a checkpoint
and the adapter; the loop then raises `TrainingStopped` and the process exits with STOPPED_EXIT_CODE. A
second signal interrupts at once (KeyboardInterrupt): every file is written atomically, so the last
complete checkpoint and adapter are intact either way.
"""

from __future__ import annotations

import signal
import threading

STOPPED_EXIT_CODE = 75  # EX_TEMPFAIL from sysexits.h: the run can be resumed ("try again later")
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Installs the handlers for the duration of a `with` block (main thread only: signals are delivered
    there; elsewhere, as in a launcher's worker thread, it only reports requests made by `request`)."""

    def __init__(self, log=print):
        self.log = log
        self.reason: str | None = None
        self.previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.reason is not None

    def request(self, reason: str) -> None:
        self.reason = self.reason or reason

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.request(signal.Signals(signum).name)
        self.log(f"{self.reason}: stopping after this step with a checkpoint and the adapter (again to stop at once)")

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
