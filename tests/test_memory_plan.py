"""memory_plan and memory_budget_gb: weights counted from the configs, the training step run on the meta device.

The step's estimate is checked against the same step run for real (its live tensor bytes, every tiny family,
with and without gradient checkpointing); the counter and the attention stand-in against closed forms; the
plans against arithmetic on a described Flux.1-dev (its real config, 11.9 B parameters, on the meta device);
and the trainer applies a plan, refuses a budget nothing fits before any weight loads, and logs its peak."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, FluxTransformer2DModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import CLIPTextConfig, T5Config

from conftest import base_parameters
from plugin.checkpoints import RESOLVED_CONFIG
from plugin.config import parse_parameters
from plugin.errors import ConfigError
from plugin.families import load_model, open_model
from plugin.families.description import describe_model, read_model_index
from plugin.families.flux import Flux
from plugin.memory_plan import GB, LiveBytes, Planner, choose, fused_attention_on_meta, step_bytes
from plugin.tiny import EDIT_FAMILIES, FAMILIES
from plugin.trainer import RunPaths, train

FLUX_DEV_PARAMETERS = 11_901_408_320  # Flux.1-dev's transformer, as published


def test_live_bytes_counts_the_storage_alive_at_once_and_nothing_made_before():
    before = torch.empty(1000)
    with LiveBytes() as live:
        a = torch.empty(1000)  # 4000 bytes
        views = before.view(10, 100), before[:10], a.view(10, 100)  # nothing new
        b = torch.empty(500)  # 6000 alive
        a.add_(1)  # in place: nothing new
        del a, views
        c = torch.empty(250)  # 2000 + 1000 alive
    assert (live.peak, live.now) == (6000, 3000)
    del b, c


def test_attention_on_meta_holds_what_a_fused_kernel_holds_and_elsewhere_is_pytorchs():
    q, k, v = (torch.empty(2, 3, 16, 8, device="meta", requires_grad=True) for _ in range(3))
    with fused_attention_on_meta(), LiveBytes() as live:
        out = F.scaled_dot_product_attention(q, k, v)
    assert out.shape == (2, 3, 16, 8) and live.peak == 2 * 3 * 16 * 8 * 4 + 2 * 3 * 16 * 4  # the output and a float32 log-sum-exp: no 16 x 16 scores
    x = torch.randn(2, 3, 16, 8)
    with fused_attention_on_meta():
        assert torch.equal(F.scaled_dot_product_attention(x, x, x), torch.ops.aten.scaled_dot_product_attention(x, x, x))
    assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention  # restored


@pytest.mark.parametrize("family", FAMILIES)
def test_the_steps_estimate_on_meta_is_within_15_percent_of_the_real_step(family, tiny_models, tmp_path):
    """The real step on the CPU, with PyTorch's fused (flash) kernel as an accelerator would use, against the same
    step on the meta device: batch 2 at 64 px, with and without gradient checkpointing."""
    model = str(tiny_models[family])
    cfg = parse_parameters(base_parameters(model, tmp_path, tmp_path / "out", resolution=64, train_batch_size=2))
    for checkpointing in (False, True):
        planner = Planner(open_model(model), cfg, torch.float32)
        real = load_model(model, torch.float32)
        real.configure(cfg)
        modules = real.attach_lora()
        if checkpointing:
            real.enable_gradient_checkpointing(modules)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            measured = step_bytes(real, 2, 64, text_cached=True)
        estimated = planner.step(checkpointing)
        assert abs(estimated / measured - 1) <= 0.15, (checkpointing, estimated, measured)


@pytest.mark.parametrize("family", EDIT_FAMILIES)
def test_an_edit_models_controls_count_at_their_resolution(family, tiny_models, tmp_path):
    """As many controls as the model takes (Kontext 1, Qwen-Image-Edit Plus 3), each at its control resolution: the
    estimate within 15 % of the real step, and larger controls a larger step."""
    model = str(tiny_models[family])
    estimates = []
    for side in (64, 128):
        cfg = parse_parameters(base_parameters(model, tmp_path, tmp_path / "out", resolution=64, train_batch_size=2, control_resolution=side))
        planner = Planner(open_model(model), cfg, torch.float32)
        real = load_model(model, torch.float32)
        real.configure(cfg)
        real.attach_lora()
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            measured = step_bytes(real, 2, 64, text_cached=True, references=planner.references)
        estimates.append(planner.step(False))
        assert abs(estimates[-1] / measured - 1) <= 0.15, (side, estimates[-1], measured)
    assert estimates[1] > estimates[0]


@pytest.fixture(scope="module")
def flux_dev(tiny_models, tmp_path_factory) -> Planner:
    """Flux.1-dev described: its transformer's real config (FluxTransformer2DModel's defaults, with guidance),
    its VAE, CLIP-L and T5-XXL configs, and no weights; planned at 1024 px, batch 1, rank 16, bf16, gradient
    checkpointing on."""
    folder = tmp_path_factory.mktemp("flux-dev") / "model"
    shutil.copytree(tiny_models["flux"], folder, ignore=shutil.ignore_patterns("*.safetensors"))
    with init_empty_weights():
        FluxTransformer2DModel(guidance_embeds=True).save_config(folder / "transformer")
        AutoencoderKL(latent_channels=16, block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                      up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, scaling_factor=0.3611, shift_factor=0.1159,
                      use_quant_conv=False, use_post_quant_conv=False).save_config(folder / "vae")  # fmt: skip
    CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768).save_pretrained(folder / "text_encoder")
    T5Config(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu").save_pretrained(folder / "text_encoder_2")
    family = Flux(describe_model(str(folder), read_model_index(str(folder)), "transformer", check_files=False))
    cfg, _ = family.configure(parse_parameters(base_parameters(folder, folder, folder / "out", resolution=1024, train_batch_size=1, lora_r=16,
                                                               lora_alpha=16, mixed_precision="bf16", gradient_checkpointing=True, memory_plan="auto")))  # fmt: skip
    planner = Planner(family, cfg, torch.bfloat16)
    planner.step(True)
    return planner


def test_flux_dev_at_bf16_needs_more_than_24_gb_and_fp8_storage_fits_without_offloading(flux_dev):
    as_set = flux_dev.plan({"offload_text_encoders": False, "gradient_checkpointing": True, "base_storage_dtype": "none", "offload_blocks": 0})
    weights = sum(row.size for row in as_set.rows if row.component.startswith("transformer"))
    assert weights == 2 * FLUX_DEV_PARAMETERS  # bf16, counted from the config
    assert 1 * GB < flux_dev.step(True) < 4 * GB  # activations at 4096 + 512 tokens with checkpointing
    assert as_set.total("training") > 24 * GB  # the weights alone are 23.8 GB: bf16 does not fit a 24 GB card
    chosen = choose(flux_dev, 24 * GB, log=lambda *_: None)
    assert chosen.settings["base_storage_dtype"] == "fp8_e4m3" and chosen.settings["offload_blocks"] == 0
    assert chosen.settings["offload_text_encoders"]  # T5-XXL (11.5 GB with its fp32 layers) cannot join the model to render
    fp8_blocks = next(row.size for row in chosen.rows if row.component == "transformer: 57 blocks in fp8")
    assert abs(fp8_blocks - (FLUX_DEV_PARAMETERS - 0.067e9)) < 0.01e9  # one byte a parameter, bar the 67 M outside the blocks


def test_flux_dev_in_12_gb_offloads_the_fewest_blocks_that_fit_and_too_small_a_budget_is_refused_with_the_minimum(flux_dev):
    chosen = choose(flux_dev, 12 * GB, log=lambda *_: None)
    offloaded = chosen.settings["offload_blocks"]
    assert chosen.peak <= 12 * GB and 0 < offloaded < 57
    assert flux_dev.plan({**chosen.settings, "offload_blocks": offloaded - 1}).peak > 12 * GB
    host = next(row for row in chosen.rows if row.where == "host" and row.component.startswith("transformer"))
    assert host.component == f"transformer: last {offloaded} blocks in fp8"
    with pytest.raises(ConfigError, match=r"memory_budget_gb: 3.00 GB is too small for this run: the smallest plan needs 4\.\d\d GB"):
        choose(flux_dev, 3 * GB, log=lambda *_: None)


def test_a_planned_run_trains_with_the_plans_settings_and_logs_its_peak(tiny_models, sample_data, tmp_path):
    model = tiny_models["sd"]
    parameters = base_parameters(model, sample_data, tmp_path / "out", max_train_steps=2, memory_plan="auto")
    cfg, _ = open_model(str(model)).configure(parse_parameters(parameters))
    planner = Planner(open_model(str(model)), cfg, torch.float32)
    without, with_checkpointing = (planner.plan({"offload_text_encoders": True, "gradient_checkpointing": checkpointing, "base_storage_dtype": "none",
                                                 "offload_blocks": 0}).peak for checkpointing in (False, True))  # fmt: skip
    budget = (without + with_checkpointing) / 2  # checkpointing is needed, and enough
    lines = []
    cfg = parse_parameters({**parameters, "memory_budget_gb": budget / GB})
    train(cfg, RunPaths.for_config(cfg), log=lines.append)
    resolved = json.loads((tmp_path / "out" / "test-adapter" / RESOLVED_CONFIG).read_text())
    assert (resolved["gradient_checkpointing"], resolved["offload_text_encoders"], resolved["offload_blocks"]) == (True, True, 0)
    assert any(line.startswith("memory plan (estimated before loading") for line in lines)
    assert any(line.startswith("memory: the process's peak resident memory is") for line in lines)


@pytest.mark.parametrize("plan, needs", [("auto", "the smallest plan needs"), ("manual", "the settings as given need")])
def test_a_budget_nothing_fits_is_refused_before_weights_load(plan, needs, tiny_models, sample_data, tmp_path, monkeypatch):
    monkeypatch.setattr(Flux, "load", lambda *_: pytest.fail("weights loaded"))
    cfg = parse_parameters(base_parameters(tiny_models["flux"], sample_data, tmp_path / "out", memory_plan=plan, memory_budget_gb=1e-5))
    with pytest.raises(ConfigError, match=f"memory_budget_gb: 0.01 MB is too small for this run: {needs} "):
        train(cfg, RunPaths.for_config(cfg), log=lambda *_: None)
