"""A run folder belongs to one run: each command that writes into one (training, resuming, --posthoc-ema)
holds an exclusive lock on the folder's `.lock` file while it runs, and a second command is refused at once,
told who holds it. The lock is the kernel's (flock): it goes when its process ends, however it ends, so a
SIGKILLed run never leaves a stale lock behind. The file itself stays; it only names the last holder."""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import ConfigError

LOCK_FILE = ".lock"


@contextmanager
def run_folder_lock(run_dir: Path, command: str, create: bool = True):
    """Hold `run_dir`'s lock for the `with` block, creating the folder (unless not `create`: a command that
    reads a finished run leaves a missing folder for its own error). Of a multi-process run, the main process
    (RANK 0, as Accelerate and torchrun number them) holds it for all."""
    run_dir = Path(run_dir)
    if not launch_main_process() or not (create or run_dir.is_dir()):
        yield
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = open(run_dir / LOCK_FILE, "a+", encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"output_dir: cannot write to {str(run_dir)!r} ({error.strerror or error}); expected a writable folder") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise ConfigError(f"output_dir: {str(run_dir)!r} is in use by {holder}; wait for it to end, "
                              "or choose another adaptor_name or output_dir") from None  # fmt: skip
        lock.seek(0)
        lock.truncate()
        lock.write(f"PID {os.getpid()} ({command}, started {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        lock.flush()
        os.chmod(lock.name, 0o644)
        yield


def launch_main_process() -> bool:
    """Whether this is the main process of its launch (RANK 0 as Accelerate and torchrun number them, or a
    single process), known before Accelerate starts: the one that checks and writes the run folder."""
    return os.environ.get("RANK", "0") == "0"
