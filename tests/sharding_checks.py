"""Run under `torch.distributed.run --nproc_per_node 2` (gloo). Process 0 prints JSON lines, one per process
and check: when each process was inside an `in_turn` block ("turn"), and for each tiny model folder given,
the loss and LoRA gradients of one held-out batch with the denoiser whole, then sharded by
plugin.sharding.shard_frozen_base (the largest differences, and the fraction of the frozen weights the
process holds)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from plugin.config import parse_parameters  # noqa: E402
from plugin.denoising import denoising_loss, sample_generators  # noqa: E402
from plugin.data.mixing import load_sources  # noqa: E402
from plugin.families import open_model  # noqa: E402
from plugin.sharding import in_turn, shard_frozen_base  # noqa: E402
from plugin.validation import ValidationSet  # noqa: E402


def loss_and_gradients(family, objective, batch, latents) -> tuple[float, dict[str, torch.Tensor]]:
    trainable = {n: p for n, p in family.denoiser.named_parameters() if p.requires_grad}
    for p in trainable.values():
        p.grad = None
    fixed = (latents, family.encode_prompts(batch["captions"]), None)
    loss, _ = denoising_loss(family, objective, lambda _: fixed, batch, sample_generators(0, "check", batch["indices"]))
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in trainable.items() if p.grad is not None}  # (none where the output is discarded)


def compare(model: str, data: str) -> dict:
    cfg = parse_parameters({"model_name": model, "dataset_name": data, "adaptor_name": "check", "resolution": 32, "lora_r": 4,
                            "lora_alpha": 4})
    family = open_model(cfg.model_name)
    cfg, _ = family.configure(cfg)
    family.load(torch.float32)
    torch.manual_seed(0)
    family.attach_lora()
    for name, p in family.denoiser.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # non-zero, so every LoRA weight gets a gradient
    objective = family.make_objective()
    batch, latents = ValidationSet.build(cfg, family, load_sources(cfg)).batches[0]
    whole_loss, whole_grads = loss_and_gradients(family, objective, batch, latents)
    shard_frozen_base(family.denoiser, dist.get_world_size(), torch.device("cpu"))
    sharded_loss, sharded_grads = loss_and_gradients(family, objective, batch, latents)
    shards = [p for p in family.denoiser.parameters() if isinstance(p, DTensor)]
    return {
        "model": Path(model).name,
        "loss_difference": abs(whole_loss - sharded_loss),
        "same_gradients": sorted(whole_grads) == sorted(sharded_grads),
        "gradient_difference": max((whole_grads[n] - sharded_grads[n]).abs().max().item() for n in whole_grads),
        "gradient_scale": max(g.abs().max().item() for g in whole_grads.values()),
        "held_fraction": sum(p.to_local().numel() for p in shards) / sum(p.numel() for p in shards),
    }


def turn() -> dict:
    """When this process entered and left an in_turn block that takes 0.3 s."""
    processes = SimpleNamespace(local_process_index=dist.get_rank(), num_processes=dist.get_world_size(), wait_for_everyone=dist.barrier)
    with in_turn(processes):
        entered = time.time()
        time.sleep(0.3)
        left = time.time()
    return {"check": "turn", "entered": entered, "left": left}


def report(result: dict) -> None:
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, {"rank": dist.get_rank(), **result})
    if dist.get_rank() == 0:
        print("\n".join(json.dumps(r) for r in everyone), flush=True)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    data, models = sys.argv[1], sys.argv[2:]
    report(turn())
    for model in models:
        report({"check": "sharded", **compare(model, data)})
    dist.barrier()  # nothing in flight when the group goes: gloo's threads can otherwise abort the exit (std::terminate)
    dist.destroy_process_group()
