"""The suite's rules about itself, enforced on every run (a pytest plugin; conftest.py loads it):

- no test runs longer than `test_time_limit` seconds (pyproject.toml: 60) unless it is marked
  `@pytest.mark.slow(reason=...)`: a slow test must say why it cannot be cheaper;
- tests marked `whole_machine` (timing bounds, memory measures, two-process runs) run alone: under
  pytest-xdist they hold a lock every other test shares, so no other worker runs beside them;
- each xdist worker's PyTorch, and the processes its tests start, use one thread: two workers with two
  threads each on two cores spend their time waiting on each other's spinning threads.
"""

from __future__ import annotations

import fcntl
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

SINGLE_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def pytest_addoption(parser):
    parser.addini("test_time_limit", "seconds a test may run unless marked slow(reason=...)", default="60")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow(reason): may exceed test_time_limit; the reason says why it cannot be cheaper")
    config.addinivalue_line("markers", "whole_machine: needs both cores to itself (timing, memory, several processes)")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        for variable in SINGLE_THREAD_VARIABLES:  # read by PyTorch when it starts: the worker's later import, its subprocesses
            os.environ[variable] = "1"
        if "torch" in sys.modules:  # conftest.py imported it already
            sys.modules["torch"].set_num_threads(1)


def pytest_runtest_setup(item):
    slow = item.get_closest_marker("slow")
    if slow is not None and not (slow.kwargs.get("reason") or slow.args):
        pytest.fail("@pytest.mark.slow needs a reason: slow(reason='why it cannot be cheaper')", pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    limit = float(item.config.getini("test_time_limit"))
    if report.when == "call" and report.passed and report.duration > limit and item.get_closest_marker("slow") is None:
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} took {report.duration:.1f} s, over the suite's limit of {limit:g} s a test: "
                           "make it cheaper, or mark it @pytest.mark.slow(reason=...)")


@pytest.fixture(autouse=True)
def machine_share(request, tmp_path_factory):
    """A shared lock for every test, an exclusive one for whole_machine tests; only under pytest-xdist."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    exclusive = request.node.get_closest_marker("whole_machine") is not None
    with run_lock(tmp_path_factory, "whole-machine", fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH):
        yield


def run_folder(tmp_path_factory) -> Path:
    """The folder all workers of one run share (each worker's own base folder is inside it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextmanager
def run_lock(tmp_path_factory, name: str, mode: int = fcntl.LOCK_EX):
    with open(run_folder(tmp_path_factory) / f"{name}.lock", "a") as lock:
        fcntl.flock(lock, mode)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
