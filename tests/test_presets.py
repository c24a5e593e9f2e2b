"""preset: a family's settings for a GPU size, filling the fields left at their defaults; --presets lists them."""

from __future__ import annotations

import json

import pytest

from conftest import base_parameters
from plugin.config import load_manifest, parse_parameters
from plugin.errors import ConfigError
from plugin.families import FAMILIES
from plugin.main import main
from plugin.presets import presets
from plugin.trainer import RunPaths, train


def test_the_manifest_offers_exactly_the_preset_files_and_each_is_valid():
    assert load_manifest()["parameters"]["preset"]["enum"] == ["none", *sorted(presets())]
    names = {family.name for family in FAMILIES}
    for name, preset in presets().items():
        assert preset["family"] in names and preset["description"], name
        cfg = parse_parameters({"model_name": "m", "dataset_name": "d", "adaptor_name": "a", "preset": name})  # every value valid for its field
        assert all(getattr(cfg, field) == value for field, value in preset["parameters"].items()), name
    for size in ("flux-dev-12gb", "flux-dev-24gb", "sdxl-8gb", "qwen-image-24gb"):
        assert size in presets()
    assert {preset["family"] for name, preset in presets().items() if name.endswith("-16gb")} == names, "one per family at 16 GB"


def test_a_preset_fills_the_defaults_and_the_users_own_values_win():
    cfg = parse_parameters({"model_name": "m", "dataset_name": "d", "adaptor_name": "a", "preset": "flux-dev-12gb", "lora_r": 32, "offload_blocks": 10})
    assert (cfg.lora_r, cfg.offload_blocks) == (32, 10), "set by the user"
    assert (cfg.base_storage_dtype, cfg.gradient_checkpointing, cfg.mixed_precision, cfg.resolution) == ("fp8_e4m3", True, "bf16", 1024)
    assert cfg.replace(lora_r=16).offload_blocks == 10, "a replaced config does not apply the preset again"
    with pytest.raises(ConfigError, match="preset: 'flux-dev-9gb' is not one of 'none', 'chroma-16gb', "):
        parse_parameters({"model_name": "m", "dataset_name": "d", "adaptor_name": "a", "preset": "flux-dev-9gb"})


def test_a_preset_for_another_family_is_refused_before_loading(tiny_models, sample_data, tmp_path, monkeypatch):
    from plugin.families.base import ModelFamily

    monkeypatch.setattr(ModelFamily, "load", lambda *_: pytest.fail("weights loaded before the check"))
    cfg = parse_parameters(base_parameters(tiny_models["sd"], sample_data, tmp_path, preset="flux-dev-24gb"))
    with pytest.raises(ConfigError, match=r"preset: 'flux-dev-24gb' is for another model family than this Stable Diffusion 1\.x/2\.x model; presets for it: sd-16gb"):
        train(cfg, RunPaths.for_config(cfg), log=lambda *_: None)


def test_a_problem_with_a_value_the_preset_set_names_the_preset(tiny_models, sample_data, tmp_path):
    cfg = parse_parameters(base_parameters(tiny_models["flux"], sample_data, tmp_path, preset="flux-dev-12gb", torch_compile="blocks"))
    with pytest.raises(ConfigError, match=r"offload_blocks: a compiled block .* \(offload_blocks 40 comes from preset 'flux-dev-12gb'\)"):
        train(cfg, RunPaths.for_config(cfg), log=lambda *_: None)


def test_a_preset_trains_the_tiny_model_of_its_family(tiny_models, sample_data, tmp_path):
    """flux-dev-12gb on the tiny Flux: fp8 storage, offloading (capped by the tiny model's blocks), checkpointing."""
    cfg = parse_parameters(base_parameters(tiny_models["flux"], sample_data, tmp_path, preset="flux-dev-12gb", offload_blocks=2, resolution=32,
                                           max_train_steps=2, eval_prompt=""))  # fmt: skip
    logged = []
    result = train(cfg, RunPaths.for_config(cfg), log=logged.append)
    assert result.steps == 2 and any("blocks' weights stored in float8_e4m3fn" in line for line in logged)
    assert json.loads((RunPaths.for_config(cfg).run_dir / "config.json").read_text())["preset"] == "flux-dev-12gb"


def test_presets_are_listed(capsys):
    assert main(["--presets"]) == 0
    out = capsys.readouterr().out
    assert all(f"{name}  ({preset['family']})" in out for name, preset in presets().items())
    assert "sets: " in out and '"base_storage_dtype=\\"fp8_e4m3\\""' not in out and 'base_storage_dtype="fp8_e4m3"' in out
