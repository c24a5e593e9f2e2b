"""DoRA, LoKr and LoHa: each trains every family's tiny pipeline to a lower held-out loss and reloads to the
trainer's own images (DoRA with Diffusers' load_lora_weights, LoKr/LoHa with the model card's loader); the
kohya/ComfyUI file applies, by ComfyUI's formulas, the same weight change PEFT trained."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import base_parameters, final_eval_image, heldout_losses, load_fresh, render
from plugin.adapters import load_adapter
from plugin.config import parse_parameters
from plugin.errors import ConfigError
from plugin.export import WEIGHTS_NAME, lora_state
from plugin.families import load_model
from plugin.kohya import community_layout, community_state
from plugin.lora_layouts import comfyui_name
from plugin.trainer import RunPaths, train
from plugin.tiny import FAMILIES

PROMPT = "a red circle on a blue background"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lora_type, learning_rate", [("dora", 2e-3), ("lokr", 1e-2), ("loha", 5e-3)])  # LyCORIS types take larger rates
def test_each_adapter_type_learns_and_reloads_to_the_trainers_images(lora_type, learning_rate, family, tiny_models, sample_data, heldout_data, tmp_path):
    model = tiny_models[family]
    cfg = parse_parameters(base_parameters(model, sample_data, tmp_path / "out", lora_type=lora_type, max_train_steps=40,
                                           learning_rate=learning_rate, lora_r=8, lora_alpha=8, seed=3, eval_prompt=PROMPT))  # fmt: skip
    paths = RunPaths.for_config(cfg)
    result = train(cfg, paths, log=lambda *_: None)
    before, after = heldout_losses(model, cfg, heldout_data), heldout_losses(model, cfg, heldout_data, paths.adapter_dir)
    assert after.objective < 0.95 * before.objective and after.plain_mse < 0.95 * before.plain_mse, (before, after)

    if lora_type == "dora":
        pipe = load_fresh(model)
        pipe.load_lora_weights(str(paths.adapter_dir))  # Diffusers' own loader
    else:
        try:  # Diffusers reads LoKr and LoHa for few families: why the card gives a loader of its own
            pipe = load_fresh(model)
            pipe.load_lora_weights(str(paths.adapter_dir))
        except ValueError as error:
            assert re.match(r"Invalid (LoRA|adapter) checkpoint", str(error)), error
        else:  # where it does read them (Z-Image's LoKr), it renders the trainer's image
            rendered = render(pipe, PROMPT, cfg.eval_seed, num_inference_steps=4, guidance_scale=2.0, height=32, width=32)
            assert np.abs(final_eval_image(result) - rendered).max() <= 1
        card = (paths.adapter_dir / "README.md").read_text()
        code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
        namespace = {}
        exec(code.split("\nimage = ")[0], namespace)  # the model card's own code, as written: its folder, the run's dtype
        pipe = namespace["pipe"]
    rendered = render(pipe, PROMPT, cfg.eval_seed, num_inference_steps=4, guidance_scale=2.0, height=32, width=32)
    assert np.abs(final_eval_image(result) - rendered).max() <= 1


def comfyui_weight(weight: torch.Tensor, tensors: dict, name: str) -> torch.Tensor:
    """A module's weight after ComfyUI applies the community file's entry `name` at strength 1 (its
    comfy/weight_adapter formulas, written out): LoRA up @ down, LoKr kron(w1, w2), LoHa (w1a w1b) * (w2a w2b),
    each scaled by alpha / (the decomposed factor's rank) when `.alpha` is there and by 1 otherwise; DoRA then
    re-normalises each output row and multiplies it by dora_scale."""
    part = lambda suffix: tensors.get(f"{name}.{suffix}")  # noqa: E731
    product = lambda a, b: part(a) @ part(b) if part(a) is not None else None  # noqa: E731
    if part("lora_down.weight") is not None or part("lora_A.weight") is not None:
        down, up = (part("lora_down.weight"), part("lora_up.weight")) if part("lora_down.weight") is not None else (part("lora_A.weight"), part("lora_B.weight"))
        delta, dim = up @ down, down.shape[0]
    elif part("lokr_w1") is not None or part("lokr_w1_a") is not None:
        w1 = part("lokr_w1") if part("lokr_w1") is not None else product("lokr_w1_a", "lokr_w1_b")
        w2 = part("lokr_w2") if part("lokr_w2") is not None else product("lokr_w2_a", "lokr_w2_b")
        delta = torch.kron(w1, w2)
        dim = part("lokr_w2_b").shape[0] if part("lokr_w2_b") is not None else (part("lokr_w1_b").shape[0] if part("lokr_w1_b") is not None else None)
    else:
        delta, dim = product("hada_w1_a", "hada_w1_b") * product("hada_w2_a", "hada_w2_b"), part("hada_w1_b").shape[0]
    alpha = part("alpha")
    updated = weight + delta.reshape(weight.shape) * (alpha.item() / dim if alpha is not None and dim is not None else 1.0)
    if part("dora_scale") is not None:
        updated = part("dora_scale") * updated / updated.reshape(updated.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
    return updated


ADAPTER_TYPES = {"dora": ("dora", {}), "lokr-whole-factors": ("lokr", {}), "lokr-decomposed": ("lokr", {"lokr_decompose_both": True, "lora_r": 2}),
                 "loha": ("loha", {})}  # fmt: skip
COMMUNITY_CASES = {f"{family}-{kind}": (family, *ADAPTER_TYPES[kind]) for family in ("sd", "flux") for kind in ADAPTER_TYPES}
# kohya's layout, ComfyUI's Diffusers-keyed one folded (Flux's) and with alphas under diffusion_model. (Z-Image's)
COMMUNITY_CASES |= {"zimage-lora": ("zimage", "lora", {}), "zimage-lokr-decomposed": ("zimage", *ADAPTER_TYPES["lokr-decomposed"]),
                    "chroma-dora": ("chroma", "dora", {})}  # fmt: skip


@pytest.mark.parametrize("family, lora_type, extra", list(COMMUNITY_CASES.values()), ids=list(COMMUNITY_CASES))
def test_the_community_file_changes_each_weight_as_peft_does(lora_type, extra, family, tiny_models, sample_data, tmp_path):
    settings = {"lora_type": lora_type, "lora_r": 4, "lora_alpha": 6, **extra}
    cfg = parse_parameters(base_parameters(tiny_models[family], sample_data, tmp_path, **settings))
    model = load_model(cfg.model_name, torch.float32)
    cfg, _ = model.configure(cfg)
    modules = model.attach_lora()
    torch.manual_seed(0)
    with torch.no_grad():  # every factor random, so no term of the formulas is zero
        for p in modules[model.denoiser_name].parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.ndim == 1 else 0.0))
    layers, configs = lora_state(modules)
    tensors = community_state(model, layers, configs)
    denoiser = modules[model.denoiser_name]
    checked = 0
    for module_name, layer in denoiser.named_modules():
        if not hasattr(layer, "get_delta_weight"):
            continue
        kohya = community_layout(model, lora_type) == "kohya"
        name = f"lora_unet_{module_name.replace('.', '_')}" if kohya else comfyui_name(model, f"{model.denoiser_name}.{module_name}")
        assert any(key.startswith(name + ".") for key in tensors), name
        base = layer.get_base_layer().weight.detach()
        base = base.clone()
        if lora_type == "dora":  # PEFT's own merge: the re-normalised weight, times the magnitude
            layer.merge()
            expected = layer.get_base_layer().weight.detach().clone()
            layer.unmerge()
        else:
            expected = base + layer.get_delta_weight("default")
        torch.testing.assert_close(comfyui_weight(base, tensors, name), expected, rtol=1e-4, atol=1e-5)
        checked += 1
    assert checked > 0


def test_the_text_encoder_trains_lora_only(tiny_models, sample_data, tmp_path):
    with pytest.raises(ConfigError, match="lora_type: 'lokr' trains the denoiser only"):
        parse_parameters(base_parameters(tiny_models["sd"], sample_data, tmp_path, lora_type="lokr", train_text_encoder=True))


def test_load_adapter_reads_every_type(tiny_models, sample_data, tmp_path):
    """The plugin's loader picks Diffusers' for LoRA and the PEFT one for LoKr, from the file alone."""
    for lora_type in ("lora", "lokr"):
        cfg = parse_parameters(base_parameters(tiny_models["sd"], sample_data, tmp_path / lora_type, lora_type=lora_type,
                                               max_train_steps=2, eval_prompt=""))  # fmt: skip
        paths = RunPaths.for_config(cfg)
        train(cfg, paths, log=lambda *_: None)
        pipe = load_fresh(tiny_models["sd"])
        image = render(pipe, PROMPT, 0, num_inference_steps=2, height=32, width=32)
        load_adapter(pipe, paths.adapter_dir)
        assert not np.array_equal(render(pipe, PROMPT, 0, num_inference_steps=2, height=32, width=32), image)
        assert (lora_type == "lokr") == ("lokr_w1" in " ".join(load_file(str(paths.adapter_dir / WEIGHTS_NAME))))
