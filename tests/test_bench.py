"""The bench scripts report failures through their exit status, so a script or CI step running them notices."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def bench_families(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_families", REPO / "bench" / "families.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["families.py", "--families", "sd", "--steps", "2"])
    monkeypatch.setattr(module, "variants", lambda cuda: [{"mixed_precision": "no"}, {"mixed_precision": "bf16"}])
    return module


def test_families_bench_exits_nonzero_when_a_case_fails(bench_families, monkeypatch, capsys):
    def crash_on_bf16(model, data, root, family, options, steps, cuda):
        if options["mixed_precision"] == "bf16":
            raise RuntimeError("boom")
        return "row", True

    monkeypatch.setattr(bench_families, "run_case", crash_on_bf16)
    assert bench_families.main() == 1
    out = capsys.readouterr().out
    assert "FAILED: RuntimeError: boom" in out and "1 failed: sd (mixed_precision=bf16)" in out

    monkeypatch.setattr(bench_families, "run_case", lambda *a: ("row", a[4]["mixed_precision"] == "no"))
    assert bench_families.main() == 1  # a case whose loss did not fall or whose adapter did not reload

    monkeypatch.setattr(bench_families, "run_case", lambda *a: ("row", True))
    assert bench_families.main() == 0
