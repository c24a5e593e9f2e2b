"""Big models on small machines: a quantised frozen base, memory-lean optimizers and text encoders kept off
the accelerator. Each trains every family's tiny pipeline to a lower held-out loss, resumes bit for bit, and
leaves an ordinary adapter; each impossible combination is refused before any weights load."""

from __future__ import annotations

import re
import shutil
import types
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import base_parameters, heldout_losses, load_fresh, render
from plugin.cache import Conditioning
from plugin.config import parse_parameters
from plugin.errors import ConfigError
from plugin.export import WEIGHTS_NAME
from plugin.families import load_model, open_model
from plugin.quantization import quantization_plan, quantization_summary
from plugin.trainer import RunPaths, train
from plugin.tiny import FAMILIES



def run(model, data, out, **overrides):
    logged = []
    settings = dict(max_train_steps=40, learning_rate=2e-3, lora_r=8, lora_alpha=8, seed=3, eval_prompt="")
    cfg = parse_parameters(base_parameters(model, data, out, **{**settings, **overrides}))
    paths = RunPaths.for_config(cfg)
    train(cfg, paths, log=logged.append)
    return cfg, paths, logged


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_a_quantized_base_trains_and_its_adapter_changes_the_unquantized_pipeline(mode, family, tiny_models, sample_data, heldout_data, tmp_path):
    model = tiny_models[family]
    cfg, paths, logged = run(model, sample_data, tmp_path / "out", base_quantization=mode, quantize_text_encoders=True,
                             eval_prompt="a red circle")  # an evaluation renders with the quantised base too
    quantized = next(line for line in logged if line.startswith("base_quantization"))
    assert f"{mode}:" in quantized and " 0 linear" not in quantized, quantized
    before, after = heldout_losses(model, cfg, heldout_data), heldout_losses(model, cfg, heldout_data, paths.adapter_dir)
    assert after.objective < 0.95 * before.objective and after.plain_mse < 0.95 * before.plain_mse, (before, after)
    if family == "sd":  # the adapter is an ordinary one: an unquantised fp32 pipeline loads it and changes
        pipe = load_fresh(model)
        kwargs = dict(num_inference_steps=2, height=32, width=32)
        image = render(pipe, "a red circle", 0, **kwargs)
        pipe.load_lora_weights(str(paths.adapter_dir))
        assert not np.array_equal(render(pipe, "a red circle", 0, **kwargs), image)


def test_quantization_stores_the_base_in_fewer_bytes_and_keeps_lora_in_fp32(tiny_models, sample_data, tmp_path):
    cfg = parse_parameters(base_parameters(tiny_models["flux"], sample_data, tmp_path, base_quantization="int8", mixed_precision="bf16"))
    family = open_model(cfg.model_name)
    cfg, _ = family.configure(cfg)
    family.load(torch.bfloat16, quantization_plan(cfg, family, torch.bfloat16))
    linear = [m for m in family.denoiser.modules() if isinstance(m, torch.nn.Linear)]
    assert linear and all(type(m.weight).__name__ == "Int8Tensor" for m in linear)
    summary = quantization_summary(family.pipe, "int8")
    full, stored = (float(x) for x in re.findall(r"([\d.e+-]+) MiB", summary))
    assert f"{len(linear)} linear layers of transformer;" in summary and stored < 0.6 * full, summary
    trained = family.attach_lora()[family.denoiser_name]
    assert {p.dtype for p in trained.parameters() if p.requires_grad} == {torch.float32}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("optimizer, learning_rate", [("prodigy", 1.0), ("adafactor", 2e-3)])
def test_each_optimizer_lowers_the_heldout_loss(optimizer, learning_rate, family, tiny_models, sample_data, heldout_data, tmp_path):
    model = tiny_models[family]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the settings each optimizer's convention asks for draw no warning
        cfg, paths, _ = run(model, sample_data, tmp_path / "out", optimizer=optimizer, learning_rate=learning_rate)
    before, after = heldout_losses(model, cfg, heldout_data), heldout_losses(model, cfg, heldout_data, paths.adapter_dir)
    assert after.objective < 0.95 * before.objective and after.plain_mse < 0.95 * before.plain_mse, (before, after)


@pytest.mark.parametrize("settings", [dict(optimizer="prodigy", learning_rate=1.0, lr_scheduler="cosine"),
                                      dict(optimizer="adafactor", base_quantization="int8")], ids=["prodigy", "adafactor-int8"])  # fmt: skip
def test_a_resumed_run_equals_the_unbroken_one(settings, tiny_models, sample_data, tmp_path):
    params = base_parameters(tiny_models["sd"], sample_data, tmp_path / "unbroken", eval_prompt="", max_train_steps=10,
                             checkpointing_steps=4, **settings)  # fmt: skip
    cfg = parse_parameters(params)
    train(cfg, RunPaths.for_config(cfg), log=lambda *_: None)
    unbroken = tmp_path / "unbroken" / "test-adapter"
    broken = tmp_path / "broken" / "test-adapter"
    shutil.copytree(unbroken, broken)  # as a run killed after its second checkpoint leaves it
    shutil.rmtree(broken / "checkpoints" / "step_8")
    (broken / WEIGHTS_NAME).unlink()
    resumed = parse_parameters({**params, "output_dir": str(tmp_path / "broken"), "resume_from_checkpoint": "latest"})
    train(resumed, RunPaths.for_config(resumed), log=lambda *_: None)
    a, b = load_file(str(unbroken / WEIGHTS_NAME)), load_file(str(broken / WEIGHTS_NAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = (broken / "checkpoints" / "step_8" / "state.json").read_text()
    assert ('"d":' in state) if settings["optimizer"] == "prodigy" else ('::step"' in state), "the optimizer's own state is saved"


def test_offloaded_text_encoders_stay_on_the_cpu_and_their_embeddings_move(tiny_models):
    family = load_model(str(tiny_models["sd3"]), torch.float32)
    family.to(torch.device("meta"), text_encoders=False)  # meta stands in for an accelerator: nothing moves data
    assert {p.device.type for p in family.denoiser.parameters()} == {"meta"}
    assert family.text_device.type == "cpu" and len(family.parked) == 3
    latents = types.SimpleNamespace(lookup=lambda rows, plans: {"latents": torch.zeros(len(rows), 4, 8, 8)})
    batch = {"indices": [0, 1], "rows": [0, 1], "plans": [None, None], "captions": ["a red circle", "a blue square"]}
    _, text, _ = Conditioning(family, latents)(batch)  # no text cache: encoded on the CPU, then moved
    assert text and {t.device.type for t in text.values()} == {"meta"}


@pytest.mark.parametrize("overrides, message", [
    (dict(base_quantization="nf4"), "base_quantization: 'nf4' needs"),
    (dict(optimizer="adamw_8bit"), "optimizer: 'adamw_8bit' needs"),
    (dict(quantize_text_encoders=True), "quantize_text_encoders: set base_quantization"),
    (dict(optimizer="prodigy", learning_rate=1.0, loss_weighting="learned"), "optimizer: prodigy takes one learning rate"),
    (dict(offload_text_encoders=True, train_text_encoder=True), "offload_text_encoders: the text encoders train"),
])  # fmt: skip
def test_impossible_combinations_are_refused_before_any_weights_load(overrides, message, tiny_models, sample_data, tmp_path, monkeypatch):
    if torch.cuda.is_available() and (overrides.get("base_quantization") == "nf4" or overrides.get("optimizer") == "adamw_8bit"):
        pytest.skip("CUDA is here: these run")
    monkeypatch.setattr("plugin.trainer.open_model", None)  # reaching the model at all would fail
    with pytest.raises(ConfigError, match=message):  # by the parameters, or by train()'s checks of the machine
        cfg = parse_parameters(base_parameters(tiny_models["sd"], sample_data, tmp_path, **overrides))
        train(cfg, RunPaths.for_config(cfg), log=lambda *_: None)


@pytest.mark.parametrize("overrides, message", [
    (dict(learning_rate=1e-4), "learning_rate: 0.0001 with prodigy"),
    (dict(learning_rate=1.0, lr_scheduler="cosine_with_restarts"), "lr_scheduler: 'cosine_with_restarts' with prodigy"),
    (dict(learning_rate=1.0, lr_warmup_steps=10), "prodigy_safeguard_warmup: off with lr_warmup_steps"),
])  # fmt: skip
def test_prodigy_settings_that_fight_it_are_warned(overrides, message, tiny_models, sample_data, tmp_path):
    from plugin.optimizers import check_optimizer

    cfg = parse_parameters(base_parameters(tiny_models["sd"], sample_data, tmp_path, optimizer="prodigy", **overrides))
    with pytest.warns(UserWarning, match=message):
        check_optimizer(cfg)


@pytest.mark.parametrize("family", FAMILIES)
def test_an_evaluation_leaves_the_base_in_its_dtype_and_the_pipeline_settings_as_they_were(family, tiny_models, sample_data, tmp_path):
    """Diffusers' from_pipe casts every module it shares to float32: a bf16 base became fp32 at the first
    evaluation (and a quantised one raised). The eval pipeline shares the modules and keeps the config."""
    cfg = parse_parameters(base_parameters(tiny_models[family], sample_data, tmp_path, mixed_precision="bf16"))
    model = load_model(cfg.model_name, torch.bfloat16)
    model.configure(cfg)
    pipe = model.eval_pipeline()
    assert {p.dtype for p in model.denoiser.parameters()} == {torch.bfloat16}
    assert pipe.components[model.denoiser_name] is model.denoiser
    kept = lambda config: {k: v for k, v in config.items() if k not in ("scheduler", "_name_or_path")}  # noqa: E731
    assert kept(pipe.config) == kept(model.pipe.config)


def test_offloaded_text_encoders_build_the_text_cache_on_the_cpu(run_training, monkeypatch):
    """offload_text_encoders with the text cache: the encoders never go to the accelerator (they would sit there
    beside the whole denoiser while the cache is built)."""
    from plugin.families.base import ModelFamily

    placed = []
    original = ModelFamily.to
    monkeypatch.setattr(ModelFamily, "to", lambda self, device, text_encoders=True: placed.append(text_encoders) or original(self, device, text_encoders))
    _, result, _ = run_training("sd", offload_text_encoders=True, cache_text_embeddings=True, max_train_steps=2, eval_prompt="")
    assert placed == [False] and result.cache_counts["text"][0] > 0
