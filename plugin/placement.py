"""The model made ready to train, in one call from the loop: loaded (quantised where asked), LoRA attached,
the frozen base sharded over the processes or its blocks stored apart (offloaded, fp8), moved to the accelerator,
gradient checkpointing and attention kernels set, compiled. The order matters and lives here: LoRA goes on before
anything moves, so sharding and offloading leave its weights alone, and compilation comes last, over the model as
it will run."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from .compilation import compile_denoiser
from .offloading import BlockOffloader, store_blocks
from .quantization import quantization_plan, quantization_summary
from .sharding import in_turn, shard_frozen_base


@dataclass
class PlacedModel:
    modules: dict[str, torch.nn.Module]  # the components that train (LoRA attached)
    compiled: int  # how many modules were compiled
    offloader: BlockOffloader | None


def place_model(cfg, family, accelerator, weight_dtype: torch.dtype, log=print) -> PlacedModel:
    """Load and place the family's pipeline for training (see the module docstring)."""
    with in_turn(accelerator, enabled=cfg.shard_base_model):  # sharded, one whole base at a time in host memory
        family.load(weight_dtype, quantization_plan(cfg, family, weight_dtype))
        if cfg.base_quantization != "none":
            log(quantization_summary(family.pipe, cfg.base_quantization))
        modules = family.attach_lora()  # before anything moves, so that sharding and offloading leave the LoRA weights out
        if cfg.shard_base_model:
            log(shard_frozen_base(family.denoiser, accelerator.num_processes, accelerator.device))
        offloader = store_blocks(family.denoiser, cfg.offload_blocks, cfg.base_storage_dtype, accelerator.device, cfg.gradient_checkpointing)
        with offloader.held_back() if offloader is not None else nullcontext():
            family.to(accelerator.device, text_encoders=not cfg.offload_text_encoders)  # cached: they leave after; offloaded: they encode on the CPU
    if offloader is not None:
        log(offloader.summary())
    if cfg.gradient_checkpointing:
        family.enable_gradient_checkpointing(modules)
    if cfg.enable_xformers_memory_efficient_attention:
        family.enable_xformers()
    compiled = compile_denoiser(family.denoiser, cfg.torch_compile, cfg.torch_compile_backend)
    return PlacedModel(modules, compiled, offloader)
