"""The suite's own rules (tests/suite_guard.py), tried on a small suite run by pytest in-process: a test over
the time limit fails unless marked slow with a reason, and whole_machine tests never overlap another test."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

TIMED = """
import time
import pytest

def test_quick():
    pass

def test_over_the_limit():
    time.sleep(0.5)

@pytest.mark.slow(reason="a long run is what it checks")
def test_slow_with_a_reason():
    time.sleep(0.5)

@pytest.mark.slow
def test_slow_without_a_reason():
    pass
"""


@pytest.fixture
def suite(pytester, monkeypatch):
    """A pytester whose runs load suite_guard as the suite's own runs do, outside any xdist worker of ours."""
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.setenv("PYTHONPATH", str(HERE))
    return pytester


def test_a_test_over_the_limit_fails_unless_marked_slow_with_a_reason(suite):
    suite.makepyfile(test_timed=TIMED)
    result = suite.runpytest_inprocess("-p", "suite_guard", "-o", "test_time_limit=0.25", "-p", "no:xdist")
    outcomes = {report.head_line: report.outcome for report in result.reprec.getreports("pytest_runtest_logreport")
                if report.when == "call" or report.failed}  # fmt: skip
    assert outcomes == {"test_quick": "passed", "test_over_the_limit": "failed", "test_slow_with_a_reason": "passed",
                        "test_slow_without_a_reason": "failed"}  # fmt: skip
    result.stdout.fnmatch_lines(["*@pytest.mark.slow needs a reason*",  # errors are listed before failures
                                 "*test_over_the_limit took * s, over the suite's limit of 0.25 s a test*"])  # fmt: skip


OVERLAPPING = """
import time
from pathlib import Path
import pytest

LOG = Path(__file__).with_name("intervals.log")

def record(name):
    started = time.monotonic()
    time.sleep(0.3)
    with LOG.open("a") as log:
        log.write(f"{name} {started} {time.monotonic()}\\n")

@pytest.mark.whole_machine
def test_alone():
    record("alone")

@pytest.mark.parametrize("k", range(4))
def test_shared(k):
    record(f"shared{k}")
"""


def test_whole_machine_tests_run_alone_under_xdist(suite):
    pytest.importorskip("xdist")
    suite.makepyfile(test_overlap=OVERLAPPING)
    result = suite.runpytest_subprocess("-p", "suite_guard", "-n", "2", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=5)
    intervals = {name: (float(a), float(b)) for name, a, b in
                 (line.split() for line in (suite.path / "intervals.log").read_text().splitlines())}  # fmt: skip
    alone = intervals.pop("alone")
    assert all(end <= alone[0] or start >= alone[1] for start, end in intervals.values()), "overlapped the whole_machine test"
    shared = sorted(intervals.values())
    assert any(b[0] < a[1] for a, b in zip(shared, shared[1:])), "the other tests ran side by side"
