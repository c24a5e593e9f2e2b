"""The adapter in the layout the community's tools load: kohya's for SD 1.x/2.x, SDXL (what A1111/Forge, ComfyUI
and kohya's sd-scripts read) and Flux's LoRA, ComfyUI's for the others.

kohya (SD, SDXL): one module per key prefix, `lora_unet_<Diffusers module path with . as _>` and for text
encoders `lora_te_` (SD) or `lora_te1_`/`lora_te2_` (SDXL) + `text_model_...`, each with `.lora_down.weight`
(PEFT's lora_A), `.lora_up.weight` (lora_B) and `.alpha`, a 0-dim tensor: these tools scale a module by
alpha / rank and by 1.0 when `.alpha` is missing, so it carries the run's scale × rank. ComfyUI's
`model_lora_keys_unet` maps these Diffusers-path names to its own (`unet_to_diffusers`), and Diffusers'
`load_lora_weights` converts them back (`_convert_non_diffusers_lora_to_diffusers`).

kohya (Flux): its original (BFL) module names, q/k/v and a single block's MLP input fused into one module each
(plugin/lora_layouts.py), as most Flux LoRAs are shared and ComfyUI, Forge and Diffusers read them; for a
plain LoRA, as the fused modules cannot carry DoRA's magnitudes or a LyCORIS factorisation.

ComfyUI (SD3 and the other families, and Flux's DoRA/LoKr/LoHa): Diffusers' own keys
(`transformer.<module>.lora_A/B.weight`), which ComfyUI maps (`mmdit_to_diffusers`, `flux_to_diffusers`), with the scale folded into lora_B and no alpha anywhere: ComfyUI
reads no alpha from file metadata and Diffusers rejects `.alpha` keys for these pipelines, while both apply
a key set without alpha at scale 1.

DoRA adds `.dora_scale`, the magnitude per output feature, which ComfyUI applies as PEFT does (the updated
weight re-normalised per output row, times the magnitude). LoKr and LoHa keep PEFT's tensor names
(`.lokr_w1`, `.lokr_w2_a`, `.hada_w1_a`, ...), which are LyCORIS's, under the same module names.

kohya's `ss_*` metadata (`ModelFamily.kohya_metadata`) travels with both.
"""

from __future__ import annotations

import math

import torch

from .adapters import peft_type
from .lora_layouts import LoraModule, kohya_name, written


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


def community_module(tensors: dict[str, torch.Tensor], scale: float, rank: int, kohya: bool) -> dict[str, torch.Tensor]:
    """One module's tensors in the community layout, by suffix. These tools scale a LoRA (DoRA) module by
    `.alpha` / rank and a LoKr/LoHa module by `.alpha` / (its decomposed factor's rank), both by 1.0 without
    `.alpha`. So: kohya LoRA and every decomposed LyCORIS module carry `.alpha` = scale x rank; ComfyUI's
    Diffusers-keyed LoRA and a LoKr with both factors whole fold the scale into one factor instead."""
    if "lora_A.weight" in tensors:
        down, up = tensors["lora_A.weight"], tensors["lora_B.weight"]
        out = {"lora_down.weight": down, "lora_up.weight": up} if kohya else {"lora_A.weight": down, "lora_B.weight": up * scale}
        if kohya:
            out["alpha"] = torch.tensor(scale * rank, dtype=torch.float32)
        if "lora_magnitude_vector" in tensors:  # DoRA: ComfyUI's dora_scale, the magnitude per output feature
            magnitude = tensors["lora_magnitude_vector"]
            out["dora_scale"] = magnitude.reshape(magnitude.shape[0], *[1] * (down.dim() - 1))
        return out
    decomposed = any(name.endswith("_a") for name in tensors)
    if decomposed:
        return {**tensors, "alpha": torch.tensor(scale * rank, dtype=torch.float32)}
    return {**tensors, "lokr_w1": tensors["lokr_w1"] * scale}


def community_state(family, layers: dict[str, dict], configs: dict[str, dict]) -> dict[str, torch.Tensor]:
    """The tensors of the community layout of `family` (`community_layout`; see the module docstring) from
    the adapter tensors per component (as `export.lora_state` gives them) and their PEFT configs."""
    config = next(iter(configs.values()))
    lora_type = "dora" if config.get("use_dora") else peft_type(config).lower()
    kohya = community_layout(family, lora_type) == "kohya"
    if kohya and family.original_lora_modules:  # Flux: its original modules, q/k/v fused (plugin/lora_layouts.py)
        modules = {f"{component}.{module}": LoraModule(parts["lora_A.weight"], parts["lora_B.weight"],
                                                       module_scale(configs[component], module, parts["lora_A.weight"].shape[0])
                                                       * parts["lora_A.weight"].shape[0])
                   for component, state in layers.items() for module, parts in adapter_modules(state).items()}  # fmt: skip
        return written(family, "kohya", modules)
    tensors: dict[str, torch.Tensor] = {}
    for component, state in layers.items():
        for module, parts in adapter_modules(state).items():
            rank = parts["lora_A.weight"].shape[0] if "lora_A.weight" in parts else configs[component]["r"]
            scale = module_scale(configs[component], module, rank)
            if kohya:
                name = kohya_name(family, component, module)
            else:
                name = f"{component}.{module}"
            for suffix, value in community_module(parts, scale, rank, kohya).items():
                tensors[f"{name}.{suffix}"] = value.contiguous()
    return tensors
