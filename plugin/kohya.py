"""The adapter in the layout the community's tools load: kohya's for SD 1.x/2.x and SDXL (what A1111/Forge,
ComfyUI and kohya's sd-scripts read), ComfyUI's for SD3 and Flux.

kohya (SD, SDXL): one module per key prefix, `lora_unet_<Diffusers module path with . as _>` and for text
encoders `lora_te_` (SD) or `lora_te1_`/`lora_te2_` (SDXL) + `text_model_...`, each with `.lora_down.weight`
(PEFT's lora_A), `.lora_up.weight` (lora_B) and `.alpha`, a 0-dim tensor: these tools scale a module by
alpha / rank and by 1.0 when `.alpha` is missing, so it carries the run's scale × rank. ComfyUI's
`model_lora_keys_unet` maps these Diffusers-path names to its own (`unet_to_diffusers`), and Diffusers'
`load_lora_weights` converts them back (`_convert_non_diffusers_lora_to_diffusers`).

ComfyUI (SD3, Flux): Diffusers' own keys (`transformer.<module>.lora_A/B.weight`), which ComfyUI maps
(`mmdit_to_diffusers`, `flux_to_diffusers`), with the scale folded into lora_B and no alpha anywhere: ComfyUI
reads no alpha from file metadata and Diffusers rejects `.alpha` keys for these pipelines, while both apply
a key set without alpha at scale 1. kohya's fused-qkv layout for Flux (BFL block names) is not written.

kohya's `ss_*` metadata (`ModelFamily.kohya_metadata`) travels with both.
"""

from __future__ import annotations

import math

import torch

from .errors import ConfigError

FORMATS = ("diffusers", "kohya")


def parse_export_formats(text: str) -> tuple[str, ...]:
    """"diffusers,kohya" → ("diffusers", "kohya"); anything else is a ConfigError naming export_formats."""
    formats = tuple(dict.fromkeys(part.strip() for part in text.replace(",", " ").split()))
    if not formats or any(f not in FORMATS for f in formats):
        raise ConfigError(f"export_formats: {text!r}; expected a comma-separated list of {', '.join(FORMATS)} such as 'diffusers,kohya'")
    return formats


def module_scale(config: dict, module: str, rank: int) -> float:
    """PEFT's scale of one LoRA module: lora_alpha / r (/ √r with rsLoRA), with its per-module patterns."""
    alpha = next((a for pattern, a in (config.get("alpha_pattern") or {}).items() if module.endswith(pattern)), config["lora_alpha"])
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def lora_modules(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module path: (lora_A, lora_B)} of one component's PEFT state dict."""
    return {key.removesuffix(".lora_A.weight"): (value, state[key.replace(".lora_A.", ".lora_B.")])
            for key, value in state.items() if key.endswith(".lora_A.weight")}  # fmt: skip


def kohya_module_path(component: str, module: str) -> str:
    """A module's path as kohya names it: CLIP text encoders under `text_model.`, which transformers 5 no longer
    has in its module tree (its state dict does) but every kohya-format tool expects."""
    if component.startswith("text_encoder") and not module.startswith("text_model."):
        return f"text_model.{module}"
    return module


def community_file_name(family, adaptor_name: str) -> str:
    """`<adaptor_name>_kohya.safetensors`, or `_comfyui` for the families without a kohya layout."""
    return f"{adaptor_name}_{'kohya' if family.kohya_prefixes else 'comfyui'}.safetensors"


def community_state(family, layers: dict[str, dict], configs: dict[str, dict]) -> dict[str, torch.Tensor]:
    """The tensors of the community layout of `family` (its `kohya_prefixes`; see the module docstring) from
    the LoRA tensors per component (as `export.lora_state` gives them) and their PEFT configs."""
    tensors: dict[str, torch.Tensor] = {}
    for component, state in layers.items():
        for module, (down, up) in lora_modules(state).items():
            scale = module_scale(configs[component], module, down.shape[0])
            if not family.kohya_prefixes:
                tensors[f"{component}.{module}.lora_A.weight"] = down.contiguous()
                tensors[f"{component}.{module}.lora_B.weight"] = (up * scale).contiguous()
            else:
                name = f"{family.kohya_prefixes[component]}_{kohya_module_path(component, module).replace('.', '_')}"
                tensors[f"{name}.lora_down.weight"] = down.contiguous()
                tensors[f"{name}.lora_up.weight"] = up.contiguous()
                tensors[f"{name}.alpha"] = torch.tensor(scale * down.shape[0], dtype=torch.float32)
    return tensors
