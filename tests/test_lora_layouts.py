"""`plugin/main.py lora convert`: every layout of every family round-trips to the same weight updates, the
converted files render through Diffusers' own loader as the original does, and Flux's kohya layout fuses q/k/v
into the original modules ComfyUI maps, which Diffusers' converter splits back exactly at Flux.1's full width."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import load_fresh, render
from plugin.errors import ConfigError
from plugin.export import WEIGHTS_NAME
from plugin.families import family_by_name
from plugin.families.flux import Flux
from plugin.lora_layouts import LoraModule, dotted, layouts_of, written
from plugin.lora_tools import convert_adapter, inspect_adapter, read_adapter
from plugin.main import main
from plugin.tiny import FAMILIES, build_tiny_pipeline

KWARGS = dict(num_inference_steps=2, height=32, width=32)


def trained_file(run_training, family: str, **overrides):
    _, _, paths = run_training(family, lora_r=4, lora_alpha=6, max_train_steps=2, eval_prompt="", **overrides)
    return paths.adapter_dir / WEIGHTS_NAME


@pytest.mark.parametrize("family", FAMILIES)
def test_every_layout_round_trips_to_the_same_tensors(family, run_training, tmp_path):
    """diffusers -> layout -> diffusers: the same factors and alphas (comfyui folds the scale into lora_B, so
    there the weight updates are compared)."""
    source = trained_file(run_training, family)
    original = read_adapter(source)
    for layout in layouts_of(family_by_name(family)):
        converted, back = tmp_path / f"{layout}.safetensors", tmp_path / f"{layout}-back.safetensors"
        assert main(["lora", "convert", str(source), "--to", layout, "--out", str(converted)]) == 0
        assert read_adapter(converted).layout == inspect_adapter(converted)["layout"] == layout
        convert_adapter(converted, "diffusers", back, family_name=family)
        returned = read_adapter(back)
        assert returned.modules.keys() == original.modules.keys(), layout
        for name, module in original.modules.items():
            if layout == "comfyui":
                torch.testing.assert_close(returned.modules[name].delta(), module.delta(), rtol=1e-6, atol=1e-9)
            else:
                assert torch.equal(returned.modules[name].down, module.down) and torch.equal(returned.modules[name].up, module.up)
                assert returned.modules[name].alpha == module.alpha == 6.0, (layout, name)


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_converted_files_render_the_original_image_through_diffusers(family, run_training, tiny_models, tmp_path):
    """Each layout Diffusers reads is loaded directly; Flux's fused layouts (whose Diffusers conversion assumes
    Flux.1's width, see the full-width test) and BFL's (ComfyUI's) go through the conversion back."""
    source = trained_file(run_training, family)
    images = {}
    for layout in layouts_of(family_by_name(family)):
        converted = tmp_path / f"{layout}.safetensors"
        convert_adapter(source, layout, converted)
        if family == "flux" and layout in ("kohya", "bfl"):
            convert_adapter(converted, "diffusers", tmp_path / f"{layout}-back.safetensors")
            converted = tmp_path / f"{layout}-back.safetensors"
        pipe = load_fresh(tiny_models[family])
        pipe.load_lora_weights(str(converted))
        images[layout] = render(pipe, "a red circle", 0, **KWARGS)
    pipe = load_fresh(tiny_models[family])
    assert not np.array_equal(render(pipe, "a red circle", 0, **KWARGS), images["diffusers"])
    assert all(np.abs(image - images["diffusers"]).max() <= 1 for image in images.values())


def test_flux_kohya_names_are_comfyuis_original_modules_with_q_k_v_fused(run_training, tiny_models, tmp_path):
    """ComfyUI's model_lora_keys_unet maps `lora_unet_<original key with . as _>` (and `diffusion_model.<key>`) for
    every weight of the original model; the community file of a Flux run is that layout, q/k/v (and a single
    block's MLP input, absent here, as zeros) block-diagonal."""
    from plugin.families.original_layout import original_state_dict

    source = trained_file(run_training, "flux", export_formats="diffusers,kohya")
    community = source.parent / "test-adapter_kohya.safetensors"
    convert_adapter(source, "kohya", tmp_path / "kohya.safetensors")
    assert load_file(str(community)).keys() == load_file(str(tmp_path / "kohya.safetensors")).keys()
    originals = [key.removesuffix(".weight") for key in original_state_dict(build_tiny_pipeline("flux"), ["transformer"], prefix="")
                 if key.endswith(".weight")]  # fmt: skip
    adapter = read_adapter(community)
    assert set(adapter.modules) <= {f"lora_unet_{key.replace('.', '_')}" for key in originals}
    linear1 = adapter.modules["lora_unet_single_blocks_0_linear1"]
    width = linear1.up.shape[0] // 7  # q, k, v and an MLP 4 times as wide
    assert linear1.rank == 16 and not linear1.up[3 * width :].any(), "proj_mlp untrained: its rows are zero"
    for k in range(3):
        block = linear1.up[k * width : (k + 1) * width]
        assert not torch.cat([block[:, : 4 * k], block[:, 4 * (k + 1) :]], dim=1).any(), "each part reads its own rank"
    convert_adapter(tmp_path / "kohya.safetensors", "bfl", tmp_path / "bfl.safetensors")
    assert set(read_adapter(tmp_path / "bfl.safetensors").modules) <= {f"diffusion_model.{key}" for key in originals}


def test_flux2_community_file_names_its_original_modules(run_training):
    """Flux.2's community file is kohya's by BFL's Flux.2 names (what ComfyUI maps for every weight of its model
    and Diffusers' Flux.2 kohya converter reads): q/k/v block-diagonal in one module, the single blocks' fused input
    projection and the MLPs one module each; the header names the model, which Flux.1's alike names could not."""
    from plugin.families.original_layout import original_state_dict

    source = trained_file(run_training, "flux2")
    originals = {key.removesuffix(".weight") for key in original_state_dict(build_tiny_pipeline("flux2"), ["transformer"], prefix="")}
    adapter = read_adapter(source.parent / "test-adapter_kohya.safetensors")
    assert set(adapter.modules) <= {f"lora_unet_{key.replace('.', '_')}" for key in originals}
    assert {"lora_unet_single_blocks_0_linear1", "lora_unet_double_blocks_0_img_mlp_0", "lora_unet_double_blocks_0_txt_attn_qkv"} <= set(adapter.modules)
    qkv = adapter.modules["lora_unet_double_blocks_0_img_attn_qkv"]
    width = qkv.up.shape[0] // 3
    assert qkv.rank == 12 and all(not qkv.up[j * width : (j + 1) * width, k * 4 : (k + 1) * 4].any() for j in range(3) for k in range(3) if j != k)
    assert inspect_adapter(adapter.path)["model"] == "Flux.2"


def test_diffusers_own_conversion_splits_the_fused_layout_exactly_at_full_width(tmp_path):
    """At Flux.1's width (its converter's fixed split of a single block's linear1), with every fused part, one
    part missing and a swapped final modulation: Diffusers' FluxPipeline.lora_state_dict gives back each module's
    weight update."""
    from diffusers import FluxPipeline

    width, generator = 3072, torch.Generator().manual_seed(0)

    def lora(outputs: int, inputs: int, rank: int, alpha: float) -> LoraModule:
        return LoraModule(torch.randn(rank, inputs, generator=generator) * 0.1, torch.randn(outputs, rank, generator=generator) * 0.1, alpha)

    modules = {f"transformer.transformer_blocks.0.attn.{m}": lora(width, width, 2, 4.0) for m in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj")}
    modules |= {f"transformer.single_transformer_blocks.0.attn.{m}": lora(width, width, 2, 4.0) for m in ("to_q", "to_k", "to_v")}
    modules["transformer.single_transformer_blocks.0.proj_mlp"] = lora(4 * width, width, 2, 4.0)
    modules["transformer.norm_out.linear"] = lora(2 * width, width, 2, 2.0)  # Diffusers drops the final layer's alpha: scale 1
    save_file(written(Flux, "kohya", modules), str(tmp_path / "full.safetensors"))
    state = FluxPipeline.lora_state_dict(str(tmp_path / "full.safetensors"))
    probe = torch.randn(width, 3, generator=generator, dtype=torch.float64)  # ΔW compared on random vectors: no 12288 x 3072 products
    for name, module in modules.items():
        key = name if f"{name}.lora_A.weight" in state else name.removeprefix("transformer.")  # its final layer has no prefix
        a, b = state[f"{key}.lora_A.weight"].double(), state[f"{key}.lora_B.weight"].double()
        expected = (module.alpha / module.rank) * module.up.double() @ (module.down.double() @ probe)
        torch.testing.assert_close(b @ (a @ probe), expected, rtol=1e-6, atol=1e-9)
    absent = state["transformer.transformer_blocks.0.attn.add_v_proj.lora_B.weight"]
    assert not absent.any(), "the missing part of txt_attn.qkv loads as a zero update"


def test_kohya_names_read_back_to_every_module_of_sd_and_sdxl():
    for family in ("sd", "sdxl"):
        pipe = build_tiny_pipeline(family)
        for component in ("unet", "text_encoder", "text_encoder_2"):
            model = getattr(pipe, component, None)
            names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))] if model else []
            assert all(dotted(name.replace(".", "_")) == name for name in names), [n for n in names if dotted(n.replace(".", "_")) != n][:3]


def test_conversions_that_cannot_keep_the_adapter_are_refused(run_training, tmp_path):
    dora = trained_file(run_training, "flux", lora_type="dora")
    with pytest.raises(ConfigError, match="a DoRA adapter has no kohya layout for Flux: .* convert it to diffusers or comfyui"):
        convert_adapter(dora, "kohya", tmp_path / "dora.safetensors")
    convert_adapter(dora, "comfyui", tmp_path / "dora-comfyui.safetensors")
    assert read_adapter(tmp_path / "dora-comfyui.safetensors").dora
    sd3 = trained_file(run_training, "sd3")
    with pytest.raises(ConfigError, match="--to: Stable Diffusion 3 LoRAs have the layouts diffusers, comfyui; not 'kohya'"):
        convert_adapter(sd3, "kohya", tmp_path / "sd3.safetensors")
    with pytest.raises(ConfigError, match="exists; the LoRA tools write a new file and never overwrite one"):
        convert_adapter(sd3, "comfyui", sd3)
