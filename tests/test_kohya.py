"""The community layout of the adapter: kohya's for SD 1.x/2.x, SDXL and Flux (its original modules, q/k/v fused),
ComfyUI's for the others. Each loads through Diffusers' own conversion (Flux's, at the tiny width, through ours) to
the images of the Diffusers-format file, and its names and alphas follow
the rules of the tools that read it (ComfyUI's comfy/lora.py mapping, kohya's alpha / rank scale)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import base_parameters, load_fresh, render
from plugin.config import parse_parameters
from plugin.errors import ConfigError
from plugin.export import WEIGHTS_NAME
from plugin.families import family_by_name
from plugin.kohya import community_layout
from plugin.lora_layouts import comfyui_name
from plugin.lora_tools import convert_adapter
from plugin.main import main
from plugin.posthoc import SNAPSHOT_FOLDER
from plugin.tiny import FAMILIES

R, ALPHA = 4, 16.0  # alpha ≠ r: a tool that ignored alpha would apply the adapter at a quarter of its strength
CLIP_LAYERS = r"text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc1|mlp_fc2)"  # ComfyUI's LORA_CLIP_MAP
TEXT_PREFIXES = {"sd": {"lora_te"}, "sdxl": {"lora_te1", "lora_te2"}}


def community_file(paths, family: str):
    return paths.adapter_dir / f"test-adapter_{community_layout(family_by_name(family), 'lora')}.safetensors"


@pytest.mark.parametrize("family", FAMILIES)
def test_the_community_file_renders_as_the_diffusers_file(family, run_training, tiny_models):
    text = family in TEXT_PREFIXES
    _, _, paths = run_training(family, lora_r=R, lora_alpha=ALPHA, train_text_encoder=text, max_train_steps=6, eval_prompt="",
                               trigger_word="shapes")  # fmt: skip
    path = community_file(paths, family)
    if family == "flux":  # Flux's fused layout: Diffusers' conversion of it assumes Flux.1's width (Flux.2's reads any)
        path = convert_adapter(path, "diffusers", paths.adapter_dir / "back.safetensors") and paths.adapter_dir / "back.safetensors"
    kwargs = dict(num_inference_steps=2, height=32, width=32)  # width (tests/test_lora_layouts.py checks it at that width)
    images = []
    for weight_name in (None, WEIGHTS_NAME, path.name):
        pipe = load_fresh(tiny_models[family])
        if weight_name:
            pipe.load_lora_weights(str(paths.adapter_dir), weight_name=weight_name)
        images.append(render(pipe, "a red circle", 0, **kwargs))
    base, diffusers_format, community = images
    assert not np.array_equal(base, diffusers_format)
    assert np.abs(diffusers_format - community).max() <= 1, "the same adapter in either layout"
    if text:  # the text-encoder LoRA came through Diffusers' kohya conversion too
        assert all(any("lora_A" in n for n, _ in getattr(pipe, c).named_parameters()) for c in ("text_encoder", "text_encoder_2")[: len(TEXT_PREFIXES[family])])

    with safe_open(str(community_file(paths, family)), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["ss_network_dim"] == str(R) and metadata["ss_network_alpha"] == "16"
    assert metadata["ss_base_model_version"] == {"sd": "sd_v1", "sdxl": "sdxl_base_v1-0", "sd3": "sd3", "flux": "flux1", "chroma": "chroma", "zimage": "zimage", "qwen_image": "qwen_image", "flux2": "flux2"}[family]
    assert metadata["ss_resolution"] == "(32, 32)" and "shapes" in metadata["ss_tag_frequency"]


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_kohya_names_are_those_comfyui_maps_and_alpha_is_the_scale_times_rank(family, run_training, tiny_models):
    _, _, paths = run_training(family, lora_r=R, lora_alpha=ALPHA, train_text_encoder=True, max_train_steps=2, eval_prompt="")
    tensors = load_file(str(community_file(paths, family)))
    pipe = load_fresh(tiny_models[family])
    # ComfyUI's model_lora_keys_unet: "lora_unet_" + a Diffusers UNet module path with "." as "_"
    unet_names = {f"lora_unet_{n.replace('.', '_')}" for n, m in pipe.unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    modules: dict[str, set[str]] = {}
    for key in tensors:
        name, part = re.fullmatch(r"(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)", key).groups()
        modules.setdefault(name, set()).add(part)
    assert all(parts == {"lora_down.weight", "lora_up.weight", "alpha"} for parts in modules.values())
    unet = [n for n in modules if n.startswith("lora_unet_")]
    assert unet and set(unet) <= unet_names, sorted(set(unet) - unet_names)[:3]
    text = [n for n in modules if not n.startswith("lora_unet_")]
    prefixes = {n.split("_text_model")[0] for n in text}
    assert prefixes == TEXT_PREFIXES[family] and all(re.fullmatch(f"lora_te[12]?_{CLIP_LAYERS}", n) for n in text), text[:3]
    for name in modules:  # the tools scale by alpha / rank, rank = lora_down's rows: alpha = (lora_alpha / r) * r
        assert tensors[f"{name}.alpha"].ndim == 0 and tensors[f"{name}.alpha"].item() == ALPHA
        assert tensors[f"{name}.lora_down.weight"].shape[0] == R


@pytest.mark.parametrize("family", ["sd3", "zimage"])
def test_comfyui_layout_names_and_scales_modules_as_its_readers_expect(family, run_training):
    """Z-Image's (and Qwen-Image's) under `diffusion_model.` with `.alpha`, as musubi-tuner and ai-toolkit write them;
    SD3's under `transformer.` with the scale folded into lora_B, as Diffusers refuses `.alpha` for its pipeline."""
    _, _, paths = run_training(family, lora_r=R, lora_alpha=ALPHA, max_train_steps=2, eval_prompt="")
    ours, community = load_file(str(paths.adapter_dir / WEIGHTS_NAME)), load_file(str(community_file(paths, family)))
    model = family_by_name(family)
    prefix = {"sd3": "transformer.", "zimage": "diffusion_model."}[family]
    assert all(key.startswith(prefix) for key in community) and len(community) == len(ours) * (1.5 if model.comfyui_alpha else 1)
    for key, value in ours.items():
        module, part = key.split(".lora_")
        name = comfyui_name(model, module)
        if model.comfyui_alpha:
            assert torch.equal(community[f"{name}.lora_{part}"], value) and community[f"{name}.alpha"].item() == ALPHA
        else:
            torch.testing.assert_close(community[f"{name}.lora_{part}"], value * (ALPHA / R) if part.startswith("B") else value)


def test_export_formats_are_honoured_and_checked_before_loading(run_training, tiny_models, sample_data, tmp_path, monkeypatch):
    _, _, paths = run_training("sd", export_formats="diffusers", max_train_steps=1, eval_prompt="")
    assert not community_file(paths, "sd").exists() and (paths.adapter_dir / WEIGHTS_NAME).is_file()
    _, _, paths = run_training("sd", use_ema=True, ema_type="posthoc", posthoc_ema_snapshot_steps=1, max_train_steps=4, eval_prompt="")
    assert community_file(paths, "sd").is_file() and (paths.adapter_dir / "raw" / "test-adapter_kohya.safetensors").is_file()
    assert main(["--posthoc-ema", str(paths.run_dir), "--sigma-rel", "0.07"]) == 0
    assert (paths.run_dir / SNAPSHOT_FOLDER / "sigma_rel_0.070_step_4" / "test-adapter_kohya.safetensors").is_file()

    from plugin.families.base import ModelFamily

    monkeypatch.setattr(ModelFamily, "load", lambda *_: pytest.fail("weights loaded before the check"))
    for bad in ("", "kohya,a1111", "safetensors"):  # refused with the parameters (tests/test_parameter_phase.py)
        with pytest.raises(ConfigError, match="export_formats: .* expected a comma-separated list of diffusers, kohya"):
            parse_parameters(base_parameters(tiny_models["sd"], sample_data, tmp_path / "out", export_formats=bad))
