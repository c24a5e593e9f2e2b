"""The adapter types, all PEFT's: LoRA; DoRA (LoRA plus a learned magnitude per output feature, the weight
re-normalised row by row); LoKr (the update as a Kronecker product of two small factors, either of them
low-rank); LoHa (the Hadamard product of two low-rank products).

LoRA and DoRA adapters are saved with the pipeline's `save_lora_weights` and load with Diffusers'
`load_lora_weights`. Diffusers reads no LoKr or LoHa file for these pipelines, so those are saved with the
same name and keys (`<component>.<module>.lokr_w1`, ...) and their PEFT configs in the file's metadata, and
`load_lycoris` loads them with PEFT alone (the model card shows its source); the kohya/LyCORIS layout that
ComfyUI and A1111 read is written beside it (plugin/kohya.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from peft import LoHaConfig, LoKrConfig, LoraConfig
from safetensors.torch import save_file


TYPES = ("lora", "dora", "lokr", "loha")
LYCORIS_PEFT_TYPES = ("LOKR", "LOHA")
LYCORIS_METADATA = "lycoris_configs"


def adapter_config(cfg, targets: list[str]):
    """The PEFT config of the run's adapter type on `targets`. LoRA's dropout is LoKr's and LoHa's rank dropout
    (they drop rank components rather than inputs)."""
    if cfg.lora_type in ("lora", "dora"):
        return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, init_lora_weights="gaussian",
                          use_dora=cfg.lora_type == "dora", target_modules=targets)  # fmt: skip
    if cfg.lora_type == "lokr":
        return LoKrConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, rank_dropout=cfg.lora_dropout, decompose_factor=cfg.lokr_factor,
                          decompose_both=cfg.lokr_decompose_both, target_modules=targets)  # fmt: skip
    return LoHaConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, rank_dropout=cfg.lora_dropout, target_modules=targets)


def peft_type(config: dict) -> str:
    """An adapter's PEFT type ("LORA", "LOKR", "LOHA") from its config dict."""
    kind = config.get("peft_type", "LORA")
    return getattr(kind, "value", kind)


def is_lycoris(configs: dict[str, dict]) -> bool:
    """The adapters (their PEFT configs per component) are LoKr or LoHa."""
    return any(peft_type(config) in LYCORIS_PEFT_TYPES for config in configs.values())


def save_lycoris(folder: Path, layers: dict[str, dict], configs: dict[str, dict], weights_name: str) -> None:
    """A LoKr/LoHa adapter as `load_lycoris` reads it: the tensors under `<component>.`, the configs as JSON."""
    tensors = {f"{component}.{key}": value for component, state in layers.items() for key, value in state.items()}
    text = json.dumps(configs, default=lambda value: sorted(value) if isinstance(value, (set, frozenset)) else str(value))
    save_file(tensors, str(Path(folder) / weights_name), metadata={"format": "pt", LYCORIS_METADATA: text})


def load_lycoris(pipe, path, adapter_name="default"):
    """Load a LoKr or LoHa adapter saved by the Diffusion LoRA Trainer (its folder or its
    pytorch_lora_weights.safetensors) into a Diffusers pipeline; needs only PEFT and safetensors."""
    import json
    import os

    from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors import safe_open

    if os.path.isdir(path):
        path = os.path.join(path, "pytorch_lora_weights.safetensors")
    with safe_open(path, "pt") as f:
        configs = json.loads(f.metadata()["lycoris_configs"])
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    for component, config in configs.items():
        config_class = {"LOKR": LoKrConfig, "LOHA": LoHaConfig}[config.pop("peft_type")]
        fields = config_class.__dataclass_fields__
        module = getattr(pipe, component)
        inject_adapter_in_model(config_class(**{k: v for k, v in config.items() if k in fields and fields[k].init}), module, adapter_name)
        state = {key[len(component) + 1 :]: value for key, value in tensors.items() if key.startswith(component + ".")}
        set_peft_model_state_dict(module, state, adapter_name)


def load_adapter(pipe, folder) -> None:
    """Any adapter this trainer saved, into a Diffusers pipeline: LoRA and DoRA with `load_lora_weights`,
    LoKr and LoHa with `load_lycoris`."""
    from safetensors import safe_open

    path = Path(folder) / "pytorch_lora_weights.safetensors" if os.path.isdir(folder) else Path(folder)
    with safe_open(str(path), "pt") as f:
        lycoris = LYCORIS_METADATA in (f.metadata() or {})
    if lycoris:
        load_lycoris(pipe, str(path))
    else:
        pipe.load_lora_weights(str(path))
