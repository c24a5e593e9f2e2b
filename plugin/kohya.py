"""The adapter in the layout the community's tools load: kohya's for SD 1.x/2.x, SDXL (what A1111/Forge, ComfyUI
and kohya's sd-scripts read) and Flux's LoRA, ComfyUI's for the others.

kohya (SD, SDXL): one module per key prefix, `lora_unet_<Diffusers module path with . as _>` and for text
encoders `lora_te_` (SD) or `lora_te1_`/`lora_te2_` (SDXL) + `text_model_...`, each with `.lora_down.weight`
(PEFT's lora_A), `.lora_up.weight` (lora_B) and `.alpha`, a 0-dim tensor: these tools scale a module by
alpha / rank and by 1.0 when `.alpha` is missing, so it carries the run's scale × rank. ComfyUI's
`model_lora_keys_unet` maps these Diffusers-path names to its own (`unet_to_diffusers`), and Diffusers'
`load_lora_weights` converts them back (`_convert_non_diffusers_lora_to_diffusers`).

kohya (Flux, Flux.2): their original (BFL) module names, q/k/v (and Flux.1's single-block MLP input) fused into
one module each (plugin/lora_layouts.py), as most Flux LoRAs are shared and ComfyUI, Forge and Diffusers read
them; for a plain LoRA, as the fused modules cannot carry DoRA's magnitudes or a LyCORIS factorisation.

ComfyUI (SD3, Chroma, Z-Image, Qwen-Image, and the DoRA/LoKr/LoHa of Flux's): Diffusers' module names, which
ComfyUI maps to its own (`mmdit_to_diffusers`, `flux_to_diffusers`, `z_image_to_diffusers`; Qwen-Image's are
its own), under `diffusion_model.` for Z-Image and Qwen-Image as their peers write them, and with `.alpha` where
Diffusers' loader reads it; SD3's and Flux's have the scale folded into lora_B, as Diffusers refuses `.alpha` keys
for their pipelines and both tools apply a module without alpha at scale 1 (`lora_layouts.written`).

DoRA adds `.dora_scale`, the magnitude per output feature, which ComfyUI applies as PEFT does (the updated
weight re-normalised per output row, times the magnitude). LoKr and LoHa keep PEFT's tensor names
(`.lokr_w1`, `.lokr_w2_a`, `.hada_w1_a`, ...), which are LyCORIS's, under the same module names.

kohya's `ss_*` metadata (`ModelFamily.kohya_metadata`) travels with both.
"""

from __future__ import annotations

import math

import torch

from .adapters import peft_type
from .lora_layouts import LoraModule, comfyui_name, kohya_name, written


# PEFT's tensor names within an adapter module: LoRA, DoRA's magnitude, LoKr's and LoHa's factors.
TENSOR_NAMES = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2",
                "lokr_w2_a", "lokr_w2_b", "lokr_t2", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")  # fmt: skip


def module_scale(config: dict, module: str, rank: int) -> float:
    """PEFT's scale of one adapter module: alpha / r (/ √r with rsLoRA), with its per-module patterns (LoRA
    and DoRA call alpha `lora_alpha`, LoKr and LoHa `alpha`)."""
    alpha = next((a for pattern, a in (config.get("alpha_pattern") or {}).items() if module.endswith(pattern)),
                 config.get("lora_alpha", config.get("alpha")))  # fmt: skip
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def adapter_modules(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{module path: {PEFT tensor name (lora_A.weight, lora_magnitude_vector, lokr_w1, hada_w1_a, ...): tensor}}
    of one component's PEFT state dict."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, name = next((key[: -len(n) - 1], n) for n in TENSOR_NAMES if key.endswith("." + n))
        modules.setdefault(module, {})[name] = value
    return modules


def community_layout(family, lora_type: str) -> str:
    """kohya where the family has a kohya layout for the adapter type (Flux's fuses modules, which only a plain
    LoRA survives), ComfyUI's Diffusers-keyed layout otherwise."""
    if family.original_lora_modules:
        return "kohya" if lora_type == "lora" else "comfyui"
    return "kohya" if family.kohya_prefixes else "comfyui"


def community_file_name(family, adaptor_name: str, lora_type: str) -> str:
    """`<adaptor_name>_kohya.safetensors`, or `_comfyui` (see `community_layout`)."""
    return f"{adaptor_name}_{community_layout(family, lora_type)}.safetensors"


def lycoris_module(tensors: dict[str, torch.Tensor], scale: float, rank: int) -> dict[str, torch.Tensor]:
    """One LoKr/LoHa module's tensors in the community layout, by suffix (PEFT's names, LyCORIS's). These tools
    scale it by `.alpha` / (its decomposed factor's rank), by 1.0 without `.alpha`: a decomposed module carries
    `.alpha` = scale x rank, a LoKr with both factors whole has the scale folded into w1."""
    decomposed = any(name.endswith("_a") for name in tensors)
    if decomposed:
        return {**tensors, "alpha": torch.tensor(scale * rank, dtype=torch.float32)}
    return {**tensors, "lokr_w1": tensors["lokr_w1"] * scale}


def community_state(family, layers: dict[str, dict], configs: dict[str, dict]) -> dict[str, torch.Tensor]:
    """The tensors of the community layout of `family` (`community_layout`; see the module docstring) from
    the adapter tensors per component (as `export.lora_state` gives them) and their PEFT configs: a LoRA (DoRA)
    written as `lora convert` writes one (plugin/lora_layouts.py), a LoKr/LoHa under the same module names."""
    config = next(iter(configs.values()))
    lora_type = "dora" if config.get("use_dora") else peft_type(config).lower()
    layout = community_layout(family, lora_type)
    modules = {f"{component}.{module}": parts for component, state in layers.items() for module, parts in adapter_modules(state).items()}
    if lora_type in ("lora", "dora"):
        loras = {}
        for name, parts in modules.items():
            component, _, module = name.partition(".")
            rank = parts["lora_A.weight"].shape[0]
            alpha = module_scale(configs[component], module, rank) * rank
            loras[name] = LoraModule(parts["lora_A.weight"], parts["lora_B.weight"], alpha, parts.get("lora_magnitude_vector"))
        return written(family, layout, loras)
    tensors: dict[str, torch.Tensor] = {}
    for name, parts in modules.items():
        component, _, module = name.partition(".")
        rank = configs[component]["r"]
        key = kohya_name(family, component, module) if layout == "kohya" else comfyui_name(family, name)
        for suffix, value in lycoris_module(parts, module_scale(configs[component], module, rank), rank).items():
            tensors[f"{key}.{suffix}"] = value.contiguous()
    return tensors
