"""Single-file checkpoints as model_name: the family from the file's keys, the architecture from model_config,
what the file lacks from text_encoder_source, and every mistake named before any weight is read."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import base_parameters, load_fresh, render
from plugin.families.original_layout import LDM_UNET_KEY, original_state_dict, save_single_file
from plugin.config import parse_parameters
from plugin.errors import ConfigError
from plugin.export import WEIGHTS_NAME
from plugin.families import open_model
from plugin.tiny import build_tiny_pipeline
from plugin.trainer import RunPaths, train


def fake_checkpoint(path, keys: list[str]):
    """A safetensors file holding zero tensors under `keys`: the names a detector reads, no real model."""
    save_file({key: torch.zeros(1) for key in keys}, str(path))
    return str(path)


def test_a_file_whose_keys_match_no_family_is_named(tmp_path):
    path = fake_checkpoint(tmp_path / "mystery.safetensors", ["encoder.layers.0.weight"])
    with pytest.raises(ConfigError, match="mystery.safetensors.*not a checkpoint of a model this trainer supports"):
        open_model(path)


def test_a_missing_or_truncated_file_is_named(tmp_path, tiny_models):
    with pytest.raises(ConfigError, match="model_name: file .*absent.safetensors.* does not exist"):
        open_model(str(tmp_path / "absent.safetensors"), str(tiny_models["sd"]))
    path = tmp_path / "cut.safetensors"
    fake_checkpoint(path, ["model.diffusion_model.input_blocks.0.0.weight"] + [f"extra.{i}" for i in range(50)])
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ConfigError, match="cut.safetensors.*truncated"):
        open_model(str(path), str(tiny_models["sd"]))


def test_a_pickled_checkpoint_needs_the_opt_in(tmp_path, tiny_models):
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}}, path)
    with pytest.raises(ConfigError, match="old.ckpt.*pickled.*allow_pickle_checkpoints"):
        open_model(str(path), str(tiny_models["sd"]))
    with pytest.raises(ConfigError, match="is not the unet that model_config"):  # read (weights only) once allowed
        open_model(str(path), str(tiny_models["sd"]), allow_pickle=True)


def test_a_config_of_another_family_or_size_is_refused(tmp_path, tiny_models):
    sdxl_file = fake_checkpoint(tmp_path / "xl.safetensors", ["model.diffusion_model.input_blocks.0.0.weight",
                                                              "model.diffusion_model.label_emb.0.0.weight"])
    with pytest.raises(ConfigError, match="model_config: .* is a StableDiffusionPipeline, but .*xl.safetensors.* is a SDXL checkpoint"):
        open_model(sdxl_file, str(tiny_models["sd"]))
    sd_file = fake_checkpoint(tmp_path / "sd.safetensors", ["model.diffusion_model.input_blocks.0.0.weight"])
    with pytest.raises(ConfigError, match=r"sd.safetensors.* is not the unet that model_config .* describes \(missing: "):
        open_model(sd_file, str(tiny_models["sd"]))


# (family, components written to the file, denoiser key prefix): whole SD/SDXL files as A1111 keeps them, an
# SD3 file without its text encoders and VAE, a Flux file in BFL's bare layout, as Black Forest Labs ships it, and a
# Chroma1 and a Z-Image file as ComfyUI saves them, and a Qwen-Image file (bare Diffusers names). Flux, Chroma, Z-Image
# and Qwen-Image files hold the transformer alone, as does a Flux.2 file in BFL's bare layout.
FILES = {"sd": (None, LDM_UNET_KEY), "sdxl": (None, LDM_UNET_KEY), "sd3": (("transformer",), LDM_UNET_KEY), "flux": (None, ""),
         "chroma": (None, LDM_UNET_KEY), "zimage": (None, LDM_UNET_KEY), "qwen_image": (None, ""), "flux2": (None, ""), "flux2-dev": (None, "")}  # fmt: skip
TRANSFORMER_ONLY = ("flux", "chroma", "zimage", "qwen_image", "flux2", "flux2-dev")
# Loaded through the trainer: Diffusers' conversion of Flux and Chroma files cuts at Flux.1's width, and Flux.2
# [dev]'s plain pipeline needs torchvision for its PixtralProcessor (the trainer reads its tokenizer alone).
LOADED_BY_THE_TRAINER = ("flux", "chroma", "flux2-dev")


@pytest.fixture(scope="module")
def single_files(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("single-files")
    return {family: save_single_file(load_fresh(tiny_models[family]), root / f"{family}.safetensors", components, prefix)
            for family, (components, prefix) in FILES.items()}  # fmt: skip


@pytest.mark.parametrize("family", list(FILES))
def test_a_single_file_trains_and_its_adapter_loads_into_the_pipeline_built_from_it(family, single_files, tiny_models, sample_data, tmp_path):
    folder = str(tiny_models[family])
    lacking = FILES[family][0] is not None or family in TRANSFORMER_ONLY
    sources = {"text_encoder_source": folder} if lacking else {"model_config": folder}
    cfg = parse_parameters(base_parameters(single_files[family], sample_data, tmp_path / "file", eval_prompt="", **sources))
    paths = RunPaths.for_config(cfg)
    train(cfg, paths, log=lambda *_: None)
    adapter = load_file(str(paths.adapter_dir / WEIGHTS_NAME))
    card = (paths.adapter_dir / "README.md").read_text()
    assert "from_single_file(" in card and str(single_files[family]) in card

    # The pipeline as the model card builds it from the file; Diffusers' conversion of BFL files assumes Flux.1's
    # width (3072), so a tiny Flux or Chroma file loads only through ours, which cuts at the file's own width.
    family_model = open_model(str(single_files[family]), **sources)
    if family in LOADED_BY_THE_TRAINER:
        family_model.load(torch.float32)
        pipe = family_model.pipe
    else:
        code = family_model.loading_code("torch.float32")
        namespace = {"torch": torch, **{name: getattr(diffusers, name) for name in code["loading_classes"]}}
        exec("\n".join(code["loading"]), namespace)
        pipe = namespace["pipe"]
    kwargs = dict(num_inference_steps=2, height=32, width=32)
    before = render(pipe, "a red circle", 0, **kwargs)
    pipe.load_lora_weights(str(paths.adapter_dir))
    assert not np.array_equal(render(pipe, "a red circle", 0, **kwargs), before)

    # The file's weights are the folder's, so the run is the folder's run, bit for bit.
    folder_cfg = parse_parameters(base_parameters(tiny_models[family], sample_data, tmp_path / "folder", eval_prompt=""))
    folder_paths = RunPaths.for_config(folder_cfg)
    train(folder_cfg, folder_paths, log=lambda *_: None)
    reference = load_file(str(folder_paths.adapter_dir / WEIGHTS_NAME))
    assert adapter.keys() == reference.keys() and all(torch.equal(adapter[k], reference[k]) for k in adapter)


@pytest.mark.parametrize("file_of, pipeline", [("flux", "flux_kontext"), ("qwen_image", "qwen_image_edit"), ("qwen_image", "qwen_image_edit_plus"),
                                              ("flux", "flux"), ("qwen_image", "qwen_image")])
def test_an_edit_models_file_is_its_pipelines_family(file_of, pipeline, single_files, tiny_models):
    """An edit model's file has its base's keys (Kontext's are Flux's): the pipeline its configs come from tells."""
    assert open_model(str(single_files[file_of]), text_encoder_source=str(tiny_models[pipeline])).name == pipeline


@pytest.mark.parametrize("family, lacking", [("flux", "text_encoder, text_encoder_2, vae"), ("flux2", "text_encoder, vae"),
                                             ("qwen_image", "text_encoder, vae")])  # fmt: skip
def test_a_file_lacking_components_needs_text_encoder_source(family, lacking, single_files, tiny_models):
    with pytest.raises(ConfigError, match=f"text_encoder_source: .*{family}.safetensors.* holds no {lacking}"):
        open_model(str(single_files[family]), str(tiny_models[family]))


def test_a_file_of_another_size_is_named_with_the_tensors_that_differ(tiny_models, tmp_path):
    tensors = original_state_dict(build_tiny_pipeline("sd"))
    key = LDM_UNET_KEY + "out.2.weight"
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, *tensors[key].shape[1:])
    save_file(tensors, str(tmp_path / "other.safetensors"))
    with pytest.raises(ConfigError, match=r"other.safetensors.* is not the unet .*other shape: conv_out.weight \(5, "):
        open_model(str(tmp_path / "other.safetensors"), str(tiny_models["sd"]))


def test_an_allowed_pickled_checkpoint_loads_the_same_weights(tiny_models, tmp_path):
    pipe = build_tiny_pipeline("sd")
    torch.save({"state_dict": original_state_dict(pipe), "global_step": 1}, tmp_path / "model.ckpt")
    family = open_model(str(tmp_path / "model.ckpt"), str(tiny_models["sd"]), allow_pickle=True)
    family.load(torch.float32)
    loaded, original = family.pipe.unet.state_dict(), pipe.unet.state_dict()
    assert all(torch.equal(loaded[k], original[k]) for k in original)
