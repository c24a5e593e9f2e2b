"""The frozen base spread across the processes (`shard_base_model`), for a base too big for one accelerator.

Data parallelism (distributed.py) gives every process a whole copy of the frozen denoiser; Flux-dev's is
24 GB in bf16, more than an ordinary GPU holds beside its activations. Sharded, each process keeps 1/N of
every frozen weight (PyTorch's FSDP2 `fully_shard`, one unit per block): a block's weights are gathered for
its forward, and again for its backward (the gradient flows through it to the LoRA weights below), and
freed after. The LoRA weights are left out (`ignored_params`): they stay whole and identical on every
process, distributed.average_gradients averages their gradients as it does unsharded, and the optimizer,
EMA, checkpoints and saved adapter see the same tensors either way. So a sharded run trains the adapter an
unsharded one trains; it trades memory for communication.

The gathers are collectives, so every process must run every forward of the denoiser in the same order: a
process whose slice of a small batch is empty still runs one (`BucketBatchSampler`'s `lockstep`), and
evaluation (validation loss and images) runs on every process.

Each process reads the whole base into host memory before it keeps its part; `in_turn` has a machine's
processes load one after another, so that it needs the RAM of one base at a time rather than of one per GPU.
"""

from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from .errors import ConfigError

# What `accelerate launch --use_fsdp / --use_deepspeed` set: those wrap a model handed to accelerator.prepare,
# which this trainer never does (only LoRA trains); the frozen base is sharded by shard_base_model instead.
ACCELERATE_SHARDING_LAUNCHES = {"ACCELERATE_USE_FSDP": "--use_fsdp", "ACCELERATE_USE_DEEPSPEED": "--use_deepspeed"}
# glibc's mallopt parameter, and its default value (128 KiB), which glibc otherwise raises as mapped blocks are freed
M_MMAP_THRESHOLD, GLIBC_DEFAULT_MMAP_THRESHOLD = -3, 128 * 1024


def check_sharding(cfg) -> None:
    """The launch and the settings can shard as asked, checked before any weights load."""
    for variable, flag in ACCELERATE_SHARDING_LAUNCHES.items():
        if os.environ.get(variable, "").lower() in ("1", "true", "yes"):
            raise ConfigError(f"accelerate launch {flag}: this trainer does not hand the model to Accelerate; launch with "
                              "--multi_gpu (no FSDP or DeepSpeed options) and set shard_base_model: true to shard the frozen base")  # fmt: skip


def shard_units(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    """The members of the denoiser's top-level ModuleLists (the transformer blocks; a UNet's down and up
    blocks), one gather each, so a process holds at most one whole block beside its shards. What is left
    (embeddings, the UNet's middle block, the output layers) is the root's unit."""
    return [block for child in denoiser.children() if isinstance(child, torch.nn.ModuleList) for block in child]


def shard_frozen_base(denoiser: torch.nn.Module, num_processes: int, device: torch.device) -> str:
    """Shard `denoiser`'s frozen weights over the processes, each one's part moved to `device` (its
    trainable LoRA weights stay whole and where they are); returns a line saying what each process holds."""
    if num_processes == 1:
        return "shard_base_model: one process, so the frozen base stays whole (launch several to shard it)"
    name = type(denoiser).__name__  # before fully_shard renames the class
    mesh = init_device_mesh(device.type, (num_processes,))
    trainable = {p for p in denoiser.parameters() if p.requires_grad}
    units = shard_units(denoiser)
    for unit in [*units, denoiser]:  # blocks first: the root's unit is what they leave
        fully_shard(unit, mesh=mesh, ignored_params=trainable)
    shards = [p for p in denoiser.parameters() if isinstance(p, DTensor)]
    whole = sum(p.numel() * p.element_size() for p in shards)
    held = sum(p.to_local().numel() * p.element_size() for p in shards)
    return (f"frozen {name} sharded over {num_processes} processes in {len(units) + 1} units: this process holds "
            f"{held / 2**20:.3g} MiB of its {whole / 2**20:.3g} MiB")  # fmt: skip


@contextmanager
def host_memory_returned():
    """Within the block, each large host allocation (>= 128 KiB, glibc's default threshold) is mapped on its
    own and unmapped when freed, as it stays afterwards; at its end, the other freed pages are released. glibc
    otherwise raises that threshold to the size of each mapped block freed (up to 32 MiB), serves what is
    below it from its heaps and keeps their freed pages: a process that loaded and sharded its base keeps
    most of the whole one resident (measured: 6.6 GiB where its part of the base and the rest of the
    pipeline are 4.1), so the next process's turn finds less RAM, and on the CPU, where gathered blocks live
    in host memory, their pages stay too (32 frozen 16 MiB layers in two processes: peak RSS 2.06 GiB
    sharded against 0.88 GiB whole; 0.62 GiB with this). Elsewhere than glibc: nothing to do."""
    libc = ctypes.CDLL(None)
    glibc = hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt")
    if glibc:
        libc.mallopt(M_MMAP_THRESHOLD, GLIBC_DEFAULT_MMAP_THRESHOLD)
    yield
    if glibc:
        libc.malloc_trim(0)


@contextmanager
def in_turn(accelerator, enabled: bool = True):
    """The block runs on one process of each machine after another (local process 0 first), each entering
    once the one before has left it; all at once when not `enabled`. Machines take their turns together
    (host memory is per machine), so each must run as many processes, as Accelerate launches them. The block
    must not hold collectives (creating a device mesh and calling fully_shard communicate nothing). A process
    returns the host memory it freed (host_memory_returned) before the next one enters."""
    if not enabled:
        yield
        return
    turns = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))  # set by torchrun, under accelerate launch
    for _ in range(accelerator.local_process_index):  # the turns before this one's
        accelerator.wait_for_everyone()
    with host_memory_returned():
        yield
    for _ in range(accelerator.local_process_index, turns):  # this one's, and the turns after it
        accelerator.wait_for_everyone()
