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

kohya's `ss_*` metadata travels with both (base model, resolution, network dim and alpha, trigger word).
"""

from __future__ import annotations

import json
import math

import torch

from .errors import ConfigError

FORMATS = ("diffusers", "kohya")
KOHYA_PREFIXES = {
    "sd": {"unet": "lora_unet", "text_encoder": "lora_te"},
    "sdxl": {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
}
FOLDED_FAMILIES = ("sd3", "flux")  # written as Diffusers keys with the scale folded in (ComfyUI's layout)
BASE_MODEL_VERSIONS = {"sd": "sd_v1", "sdxl": "sdxl_base_v1-0", "sd3": "sd3", "flux": "flux1"}


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


def community_state(family: str, layers: dict[str, dict], configs: dict[str, dict]) -> dict[str, torch.Tensor]:
    """The tensors of the community layout of `family` (see the module docstring) from the LoRA tensors per
    component (as `export.lora_state` gives them) and their PEFT configs."""
    tensors: dict[str, torch.Tensor] = {}
    for component, state in layers.items():
        for module, (down, up) in lora_modules(state).items():
            scale = module_scale(configs[component], module, down.shape[0])
            if family in FOLDED_FAMILIES:
                tensors[f"{component}.{module}.lora_A.weight"] = down.contiguous()
                tensors[f"{component}.{module}.lora_B.weight"] = (up * scale).contiguous()
            else:
                name = f"{KOHYA_PREFIXES[family][component]}_{kohya_module_path(component, module).replace('.', '_')}"
                tensors[f"{name}.lora_down.weight"] = down.contiguous()
                tensors[f"{name}.lora_up.weight"] = up.contiguous()
                tensors[f"{name}.alpha"] = torch.tensor(scale * down.shape[0], dtype=torch.float32)
    return tensors


def kohya_metadata(config: dict, configs: dict[str, dict]) -> dict[str, str]:
    """kohya's `ss_*` entries (strings, as safetensors metadata must be) from the run's resolved config."""
    denoiser = next(iter(configs.values()))
    family = config["model_family"]
    version = BASE_MODEL_VERSIONS[family]
    if family == "sd" and config.get("prediction_type") == "v_prediction":
        version = "sd_v2_v"
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(denoiser["r"]),
        "ss_network_alpha": f"{denoiser['lora_alpha']:g}",
        "ss_network_args": json.dumps({"use_rslora": bool(denoiser.get("use_rslora"))}),
        "ss_base_model_version": version,
        "ss_v2": str(version.startswith("sd_v2")),
        "ss_sd_model_name": str(config["model_name"]),
        "ss_output_name": str(config["adaptor_name"]),
        "ss_resolution": f"({config['resolution']}, {config['resolution']})",
        "ss_learning_rate": f"{config['learning_rate']:g}",
        "ss_mixed_precision": str(config["mixed_precision"]),
        "ss_seed": str(config["seed"]),
        "ss_training_comment": f"trigger word: {config['trigger_word']}" if config.get("trigger_word") else "",
        "ss_tag_frequency": json.dumps({"trigger": {config["trigger_word"]: 1}} if config.get("trigger_word") else {}),
    }
