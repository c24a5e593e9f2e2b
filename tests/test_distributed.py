"""Data-parallel training: two CPU processes (gloo) with batch b train the adapter of one process with batch 2b,
and only the main process writes files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import base_parameters, write_parameter_file
from plugin.buckets import BucketBatchSampler
from plugin.config import parse_parameters
from plugin.export import WEIGHTS_NAME
from plugin.run_lock import LOCK_FILE
from plugin.tiny import FAMILIES, write_sample_dataset
from plugin.trainer import RunPaths, train
from plugin.validation import HISTORY_FILE, read_history


def launch_two_processes(config: Path, port: int, **environment) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2` of plugin/main.py on the CPU (gloo); it must succeed."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
               str(Path(__file__).resolve().parent.parent / "plugin" / "main.py"), "--config", str(config)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "ACCELERATE_USE_CPU": "1", **environment},
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done


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


@pytest.mark.whole_machine  # two processes, one a core
def test_two_processes_train_what_one_process_with_twice_the_batch_trains(tiny_models, tmp_path):
    """5 images: global batches of 2, 2 and 1, so one process's slice of the last is empty. EMA, accumulation
    and checkpoints on, so every main-process-only path runs."""
    data = write_sample_dataset(tmp_path / "data", n=5)
    common = dict(max_train_steps=6, learning_rate=1e-4, gradient_accumulation_steps=2, use_ema=True, ema_decay=0.9,
                  checkpointing_steps=3, log_to_tensorboard=True, eval_num_inference_steps=2)  # fmt: skip
    two = base_parameters(tiny_models["sd"], data, tmp_path / "two", train_batch_size=1, **common)
    done = launch_two_processes(write_parameter_file(tmp_path / "two.json", two), port=29517)
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
    assert [p.name for p in two_dir.rglob(".*")] == [LOCK_FILE], "no temporary files left by a second writer; one lock"


ROOT = Path(__file__).resolve().parent.parent
AVERAGE_GRADIENTS = """
import json, sys, torch, torch.distributed as dist
from plugin.distributed import average_gradients
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
used, discarded, empty = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
used.grad = torch.full((2,), float(rank + 1))
if rank == 0:
    empty.grad = torch.full((2,), 4.0)  # process 1's slice was empty: no gradient there
loss = average_gradients([used, discarded, empty], float(rank), 2)
print(json.dumps([used.grad.tolist(), discarded.grad is None, empty.grad.tolist(), loss]))
dist.destroy_process_group()
"""


def test_averaged_gradients_count_empty_slices_as_zero_and_keep_none_where_no_process_has_one(tmp_path):
    """A gradient no process has (a LoRA on a discarded output, as the last MMDiT block's text stream) stays None,
    so the optimizer skips it as a single process does; a process without a gradient otherwise contributes 0."""
    processes = [subprocess.Popen([sys.executable, "-c", AVERAGE_GRADIENTS, str(rank), str(tmp_path / "rendezvous")], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]  # fmt: skip
    outputs = [process.communicate(timeout=120) for process in processes]
    assert all(process.returncode == 0 for process in processes), outputs
    for out, _ in outputs:
        assert json.loads(out.strip().splitlines()[-1]) == [[1.5, 1.5], True, [2.0, 2.0], 0.5]


def test_lockstep_slices_give_an_empty_slice_one_image_of_no_weight():
    """A sharded base's forwards are collectives: every process must run one for every batch."""
    free, lockstep = (BucketBatchSampler([0] * 3, 1, seed=0, num_processes=2, process_index=1, lockstep=flag) for flag in (False, True))
    assert [len(i) for i, _ in free.slices()] == [1, 0], "3 images in global batches of 2: the last slice of process 1 is empty"
    last = free.batches(0)[-1]
    assert lockstep.slices()[:1] == free.slices()[:1] and lockstep.slices()[1] == (last[:1], 0.0)


@pytest.mark.whole_machine  # two processes, one a core
def test_a_sharded_base_trains_what_an_unsharded_one_trains(tiny_models, tmp_path):
    """Flux with its frozen transformer sharded over two processes (FSDP2 on gloo) against one unsharded
    process with twice the batch: the same adapter, validation losses and eval images. Each process holds
    half the frozen weights. 5 training images, so one slice is empty and its process runs a weightless
    forward; gradient checkpointing, so the backward gathers the blocks again."""
    data = write_sample_dataset(tmp_path / "data", n=6)
    common = dict(max_train_steps=4, learning_rate=1e-3, validation_split=0.17, gradient_checkpointing=True, eval_steps=1,
                  eval_num_inference_steps=2, eval_prompt="a red circle;a blue square")  # fmt: skip
    two = base_parameters(tiny_models["flux"], data, tmp_path / "two", train_batch_size=1, shard_base_model=True, **common)
    done = launch_two_processes(write_parameter_file(tmp_path / "two.json", two), port=29519)
    held, whole = map(float, re.search(r"this process holds ([0-9.]+) MiB of its ([0-9.]+) MiB", done.stdout).groups())
    assert 0.45 < held / whole <= 0.55, done.stdout

    cfg = parse_parameters(base_parameters(tiny_models["flux"], data, tmp_path / "one", train_batch_size=2, **common))
    result = train(cfg, RunPaths.for_config(cfg), log=lambda *_: None)
    one_dir, two_dir = tmp_path / "one" / "test-adapter", tmp_path / "two" / "test-adapter"
    a, b = load_file(str(one_dir / WEIGHTS_NAME)), load_file(str(two_dir / WEIGHTS_NAME))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)
    assert any((a[key] != 0).any() for key in a if "lora_B" in key), "the adapter trained"
    one_losses, two_losses = (read_history(d / HISTORY_FILE) for d in (one_dir, two_dir))
    assert [e["step"] for e in two_losses] == [e["step"] for e in one_losses] == [0, 3, 4], "base, end of epoch 1, end"
    for x, y in zip(one_losses, two_losses):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * abs(x["loss"])
    assert len(result.eval_images) == 2
    for theirs in result.eval_images:
        ours = two_dir / "eval_images" / theirs.name
        difference = np.abs(np.asarray(Image.open(ours), dtype=int) - np.asarray(Image.open(theirs), dtype=int))
        assert difference.max() <= 1, f"{ours.name}: the sharded run rendered other images"


@pytest.mark.whole_machine  # two processes, one a core; `in_turn`'s order is timed
def test_every_family_predicts_with_a_sharded_denoiser_what_it_predicts_whole(tiny_models, sample_data):
    """Each family's denoiser sharded over two processes (its blocks' units and the root's) gives one
    held-out batch the loss and LoRA gradients it gives whole, and each process holds about half of it.
    And `in_turn` (the sharded run's loading) lets one process into its block at a time, in order."""
    script = Path(__file__).resolve().parent / "sharding_checks.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29521", str(script),
               str(sample_data), *(str(tiny_models[family]) for family in FAMILIES)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    first, second = sorted((r for r in results if r["check"] == "turn"), key=lambda r: r["rank"])
    assert first["left"] <= second["entered"], "process 1 waited for process 0 to leave"
    sharded = [r for r in results if r["check"] == "sharded"]
    assert sorted((r["model"], r["rank"]) for r in sharded) == sorted((f, r) for f in FAMILIES for r in (0, 1))
    for r in sharded:
        assert r["same_gradients"] and r["loss_difference"] <= 1e-6 and r["gradient_difference"] <= 1e-5 * r["gradient_scale"], r
        assert 0.4 < r["held_fraction"] < 0.6, r


def test_the_sharded_flux_example_is_a_parameter_file_that_shards():
    """The multi-GPU Flux command in plugin/docs/families-and-memory.md names this file; it must stay valid as the manifest changes."""
    example = Path(__file__).resolve().parent.parent / "examples" / "flux_dev_sharded.json"
    cfg = parse_parameters(json.loads(example.read_text(encoding="utf-8")))
    assert cfg.shard_base_model and cfg.mixed_precision == "bf16" and cfg.cache_text_embeddings and cfg.base_quantization == "none"


FREED_HOST_MEMORY = """
import sys, torch
from contextlib import nullcontext
from plugin.sharding import host_memory_returned
def rss_mib():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024
scenario, returned = sys.argv[1], sys.argv[2] == "returned"
before = rss_mib()
with host_memory_returned() if returned else nullcontext():
    if scenario == "base":  # loaded (after a freed temporary), then sharded: the whole copy freed
        torch.ones(2**18)  # created and freed at once
        loaded = [torch.ones(2**18) for _ in range(125)]
        pinned = torch.ones(2**18)  # allocated after them, so that they are not the heap's top
        before = rss_mib()
        del loaded
if scenario == "gathers":  # a 16 MiB block gathered, used and freed, step after step
    for _ in range(3):
        block = torch.ones(4 * 2**20)
        del block
print(rss_mib() - before)
"""


def held_after(scenario: str, mode: str) -> float:
    """MiB more (or, negative, less) resident after the scenario than before its frees, in a fresh process."""
    done = subprocess.run([sys.executable, "-c", FREED_HOST_MEMORY, scenario, mode], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1], check=True)  # fmt: skip
    return float(done.stdout.split()[-1])


def test_a_process_returns_its_freed_base_and_gathers_to_the_system():
    """glibc keeps freed heap pages and, once a 1 MiB temporary or a 16 MiB block has been freed, serves the
    next of that size from its heap; with host_memory_returned a freed base of 1 MiB tensors leaves the
    process, and so does each gathered block once freed."""
    assert held_after("base", "kept") > -20 and held_after("gathers", "kept") > 12, "glibc's default, which this guards against, is gone"
    assert held_after("base", "returned") < -100, "most of the 125 MiB freed left the process"
    assert held_after("gathers", "returned") < 4, "the gathered blocks left the process when freed"
