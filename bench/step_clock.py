"""Run a training script and record when each optimizer step ends, the same way for any trainer.

    python bench/step_clock.py RESULT.json SCRIPT [ARGS...]

Patches `torch.optim.AdamW.step` (both our trainer and Diffusers' example scripts step an AdamW) to note a
timestamp after every step, runs SCRIPT as `__main__`, and at exit writes {"step_ends": [...], "peak_rss_gib"}
to RESULT.json. Step k's time is then end_k − end_(k−1): data loading, encoding, forward, backward and the
update, whatever the script does per step.
"""

import atexit
import json
import resource
import runpy
import sys
import time

import torch

result_path, script = sys.argv[1], sys.argv[2]
step_ends: list[float] = []
original_step = torch.optim.AdamW.step


def timed_step(self, *args, **kwargs):
    output = original_step(self, *args, **kwargs)
    step_ends.append(time.perf_counter())
    return output


def write_result() -> None:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    with open(result_path, "w") as f:
        json.dump({"step_ends": step_ends, "peak_rss_gib": peak}, f)


torch.optim.AdamW.step = timed_step
atexit.register(write_result)
sys.argv = sys.argv[2:]
runpy.run_path(script, run_name="__main__")
