"""Model variants a family must train as their own kind: SD 2.x 768 v-prediction, SD3.5 Medium (a second
image self-attention in its first layers, qk-norm), Flux schnell (no guidance embedding, fixed shift) and
Flux.2 [dev] (Mistral 3 reads the prompt through its processor; a distilled guidance input)."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.torch import load_file

from conftest import base_parameters, heldout_losses, load_fresh, render
from plugin.config import parse_parameters
from plugin.export import WEIGHTS_NAME
from plugin.tiny import VARIANTS, save_tiny_pipeline
from plugin.trainer import RunPaths, train


@pytest.fixture(scope="module")
def variant_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    return {name: save_tiny_pipeline(name, root / name) for name in VARIANTS}


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_variant_trains_lowers_the_heldout_loss_and_its_adapter_reloads(variant, variant_models, sample_data, heldout_data, tmp_path):
    model = variant_models[variant]
    cfg = parse_parameters(base_parameters(model, sample_data, tmp_path / "out", max_train_steps=40, learning_rate=2e-3,
                                           lora_r=8, lora_alpha=8, seed=3, eval_prompt=""))  # fmt: skip
    paths = RunPaths.for_config(cfg)
    train(cfg, paths, log=lambda *_: None)
    before, after = heldout_losses(model, cfg, heldout_data), heldout_losses(model, cfg, heldout_data, paths.adapter_dir)
    assert after.objective < 0.95 * before.objective and after.plain_mse < 0.95 * before.plain_mse, (before, after)
    resolved = (paths.run_dir / "config.json").read_text()
    keys = load_file(str(paths.adapter_dir / WEIGHTS_NAME)).keys()
    if variant == "sd2-v":
        assert '"prediction_type": "v_prediction"' in resolved, "the model's own prediction type trains"
    if variant == "sd35-medium":
        assert any(".attn2.to_q." in k for k in keys), "the dual-attention layers' second self-attention trains too"
    pipe = load_fresh(model)
    kwargs = dict(num_inference_steps=2, height=32, width=32)
    if variant == "flux-schnell":
        assert not pipe.transformer.config.guidance_embeds
    if variant == "flux2-dev":
        assert type(pipe).__name__ == "Flux2Pipeline" and pipe.transformer.config.guidance_embeds
    image = render(pipe, "a red circle", 0, **kwargs)
    pipe.load_lora_weights(str(paths.adapter_dir))
    assert not np.array_equal(render(pipe, "a red circle", 0, **kwargs), image)
