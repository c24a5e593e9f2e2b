"""Data-parallel training across processes (`accelerate launch --num_processes N`), by hand and small.

Only the LoRA weights train, so instead of wrapping the denoiser in DDP the processes all-reduce the
trainable gradients once per optimizer step, in one flat tensor (after gradient accumulation, before
clipping). Every process starts from the same LoRA (same seed) and applies the same averaged gradient, so
the weights stay identical everywhere without ever being broadcast. The data split is the sampler's
(`BucketBatchSampler`): each global batch is cut into one slice per process, and `share` weights a slice's
loss by its size, so N processes with batch b make the update of one process with batch N·b.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def average_gradients(parameters: list[torch.nn.Parameter], step_loss: float, num_processes: int) -> float:
    """Replace each parameter's gradient by its mean over the processes (a process whose slices were empty
    contributes zeros) and return the mean of `step_loss`, the loss every process then reports. A parameter
    no process has a gradient for (a LoRA on a layer whose output the model discards, such as the last MMDiT
    block's text stream) keeps none, so the optimizer skips it (no weight decay) as it does in one process."""
    if num_processes == 1:
        return step_loss
    device = parameters[0].device
    present = torch.tensor([float(p.grad is not None) for p in parameters], device=device)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float() for p in parameters]
                     + [present, torch.tensor([step_loss], device=device)])  # fmt: skip
    dist.all_reduce(flat)
    flat /= num_processes
    offset = 0
    for p in parameters:
        p.grad = flat[offset : offset + p.numel()].view_as(p).to(p.dtype).clone()
        offset += p.numel()
    for p, seen in zip(parameters, flat[offset : offset + len(parameters)].tolist()):
        if seen == 0:
            p.grad = None
    return flat[-1].item()


def any_process(flag: bool, num_processes: int, device) -> bool:
    """True on every process when it is True on any (a stop signal may reach only some of them)."""
    if num_processes == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def rng_states(num_processes: int) -> dict[str, torch.Tensor]:
    """Every process's torch RNG states (CPU, and its CUDA device), gathered for the main process to save.
    LoRA dropout draws from them, and each process draws its own."""
    own = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        own["cuda"] = torch.cuda.get_rng_state()
    everyone = [own]
    if num_processes > 1:
        everyone = [None] * num_processes
        dist.all_gather_object(everyone, own)
    return {f"process_{rank}_{name}": state for rank, states in enumerate(everyone) for name, state in states.items()}


def restore_rng_states(states: dict[str, torch.Tensor], process_index: int) -> None:
    torch.set_rng_state(states[f"process_{process_index}_cpu"])
    if torch.cuda.is_available() and f"process_{process_index}_cuda" in states:
        torch.cuda.set_rng_state(states[f"process_{process_index}_cuda"])
