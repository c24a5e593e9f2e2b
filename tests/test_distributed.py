"""Data-parallel training: two CPU processes (gloo) with batch b train the adapter of one process with batch 2b,
and only the main process writes files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import base_parameters, write_parameter_file
from plugin.buckets import BucketBatchSampler
from plugin.config import parse_parameters
from plugin.export import WEIGHTS_NAME
from plugin.tiny import write_sample_dataset
from plugin.trainer import RunPaths, train


def test_process_slices_cover_each_global_batch_and_weigh_it_evenly():
    bucket_ids = [0] * 5 + [1] * 4
    for epoch in range(3):
        samplers = [BucketBatchSampler(bucket_ids, 2, seed=3, num_processes=3, process_index=r) for r in range(3)]
        for sampler in samplers:
            sampler.set_epoch(epoch)
        whole = BucketBatchSampler(bucket_ids, 6, seed=3)
        whole.set_epoch(epoch)
        slices = [sampler.slices() for sampler in samplers]
        assert all(len(s) == len(whole.batches(epoch)) == len(samplers[0]) for s in slices)
        for k, batch in enumerate(whole.batches(epoch)):
            parts = [slices[r][k] for r in range(3)]
            assert sum((indices for indices, _ in parts), []) == batch, "the slices, in order, are the batch"
            values = {i: float(i * i + 1) for i in batch}  # per-example losses
            averaged = sum(share * sum(values[i] for i in indices) / max(len(indices), 1) for indices, share in parts) / 3
            assert abs(averaged - sum(values.values()) / len(batch)) < 1e-12, "the processes' mean is the batch mean"


def test_two_processes_train_what_one_process_with_twice_the_batch_trains(tiny_models, tmp_path):
    """5 images: global batches of 2, 2 and 1, so one process's slice of the last is empty. EMA, accumulation
    and checkpoints on, so every main-process-only path runs."""
    data = write_sample_dataset(tmp_path / "data", n=5)
    common = dict(max_train_steps=6, learning_rate=1e-4, gradient_accumulation_steps=2, use_ema=True, ema_decay=0.9,
                  checkpointing_steps=3, log_to_tensorboard=True, eval_num_inference_steps=2)  # fmt: skip
    two = base_parameters(tiny_models["sd"], data, tmp_path / "two", train_batch_size=1, **common)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
               str(Path(__file__).resolve().parent.parent / "plugin" / "main.py"), "--config",
               str(write_parameter_file(tmp_path / "two.json", two))]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "ACCELERATE_USE_CPU": "1"}, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("trained 6 steps") == 1, "one process reports"

    cfg = parse_parameters(base_parameters(tiny_models["sd"], data, tmp_path / "one", train_batch_size=2, **common))
    train(cfg, RunPaths.for_config(cfg), log=lambda *_: None)
    one_dir, two_dir = tmp_path / "one" / "test-adapter", tmp_path / "two" / "test-adapter"
    for name in (WEIGHTS_NAME, f"raw/{WEIGHTS_NAME}", "checkpoints/step_6/trainable.safetensors"):
        a, b = load_file(str(one_dir / name)), load_file(str(two_dir / name))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)
    assert len(list((two_dir / "logs").glob("events.out.tfevents.*"))) == 1, "only the main process logs"
    assert sorted(p.name for p in (two_dir / "checkpoints").iterdir()) == ["step_3", "step_6"]
    assert not list(two_dir.rglob(".*")), "no temporary files left by a second writer"
