"""The compiled training step (`torch_compile`): `blocks` compiles each repeated block of the denoiser (regional
compilation: one compiled graph per block class, reused by every block of it, so compiling takes seconds, not
minutes); `full` compiles the denoiser's whole forward. Backward is compiled with it (AOTAutograd).

The blocks are those the model names in Diffusers' `_repeated_blocks` (what `compile_repeated_blocks` reads);
a denoiser that names none (SD3's) has its repeated blocks found as the element class of each of its block
lists. The LoRA layers inside the blocks are compiled with them. A new bucket shape recompiles once, then the
shape is marked dynamic (PyTorch's automatic dynamic shapes), so aspect-ratio buckets do not recompile forever.
"""

from __future__ import annotations

import torch

from .errors import ConfigError

def check_compilation(cfg) -> None:
    """The combinations compile cannot do, refused by name before any weights load."""
    if cfg.torch_compile == "none":
        return
    if cfg.shard_base_model:
        raise ConfigError("torch_compile: a sharded base (shard_base_model) runs FSDP's collectives inside each block, which this "
                          "compiled step does not trace; turn one of them off")  # fmt: skip
    if cfg.base_quantization == "nf4":
        raise ConfigError("torch_compile: bitsandbytes' nf4 layers do not compile; use base_quantization int8 or fp8 (torchao), or none")
    if cfg.torch_compile == "full" and cfg.gradient_checkpointing:
        raise ConfigError("torch_compile: 'full' traces the whole forward, which gradient checkpointing cuts into pieces; use 'blocks' "
                          "(each block compiled, checkpointing between them) or turn gradient_checkpointing off")  # fmt: skip
    if cfg.enable_xformers_memory_efficient_attention:
        raise ConfigError("torch_compile: xFormers' attention kernels do not compile; PyTorch's scaled-dot-product attention does")


def repeated_blocks(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    """The denoiser's repeated blocks: the classes its `_repeated_blocks` names, else each block list's elements."""
    names = set(getattr(denoiser, "_repeated_blocks", None) or ())
    if not names:
        names = {type(block).__name__ for child in denoiser.children() if isinstance(child, torch.nn.ModuleList) and len(child) > 1
                 for block in child}  # fmt: skip
    return [module for module in denoiser.modules() if type(module).__name__ in names]


def compile_denoiser(denoiser: torch.nn.Module, mode: str, backend: str) -> int:
    """Compile the denoiser in place (`torch_compile`); returns how many modules were compiled."""
    if mode == "none":
        return 0
    targets = repeated_blocks(denoiser) if mode == "blocks" else [denoiser]
    if not targets:
        raise ConfigError(f"torch_compile: {type(denoiser).__name__} has no repeated blocks to compile; use 'full'")
    for module in targets:
        module.compile(backend=backend)
    return len(targets)
