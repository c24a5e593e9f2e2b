"""The tiny pipelines behave like real ones: they render, save, reload offline and round-trip a LoRA."""

import json
import socket

import datasets
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.training_utils import _collate_lora_metadata
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from plugin.errors import ConfigError
from plugin.tiny import FAMILIES, SAMPLE_RESOLUTION, build_tiny_pipeline, save_tiny_pipeline, write_sample_dataset

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
JOINT_ATTENTION = ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def render(pipe, prompt="a red circle"):
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt=prompt,
        num_inference_steps=2,
        height=SAMPLE_RESOLUTION,
        width=SAMPLE_RESOLUTION,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images


def denoiser_name(family):
    return "unet" if family in ("sd", "sdxl") else "transformer"


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach the hub fails loudly instead of silently downloading."""

    def refuse(*args, **kwargs):
        raise OSError("network access in an offline test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("family", FAMILIES)
def test_renders_finite_image_that_depends_on_prompt(family):
    pipe = build_tiny_pipeline(family)
    image = render(pipe)
    assert image.shape == (1, SAMPLE_RESOLUTION, SAMPLE_RESOLUTION, 3)
    assert np.isfinite(image).all()
    assert not np.allclose(image, render(pipe, "a blue square on a white background"))


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_reload_offline_gives_same_image(family, tmp_path, no_network):
    folder = save_tiny_pipeline(family, tmp_path / "model")
    expected = render(build_tiny_pipeline(family))
    pipeline_class = type(build_tiny_pipeline(family))
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == pipeline_class.__name__
    for loader in (DiffusionPipeline, pipeline_class):
        pipe = loader.from_pretrained(folder)
        assert type(pipe) is pipeline_class
        # Weights reload bit for bit, but mmapped tensors are aligned differently, which changes BLAS sums.
        np.testing.assert_allclose(render(pipe), expected, rtol=0, atol=1e-5)


def test_seed_decides_weights_and_leaves_caller_rng_alone():
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    first = build_tiny_pipeline("sd", seed=0).unet.state_dict()
    assert torch.equal(torch.rand(3), expected_draw)
    same = build_tiny_pipeline("sd", seed=0).unet.state_dict()
    other = build_tiny_pipeline("sd", seed=1).unet.state_dict()
    assert all(torch.equal(first[k], same[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_unknown_family_is_a_config_error():
    with pytest.raises(ConfigError, match="sdxl"):
        build_tiny_pipeline("sd2")


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_round_trip(family, tmp_path):
    """What the trainer does: add a PEFT adapter, change it, save it with metadata, load it elsewhere."""
    pipe = build_tiny_pipeline(family)
    base = render(pipe)
    name = denoiser_name(family)
    denoiser = getattr(pipe, name)
    targets = ATTENTION if name == "unet" else ATTENTION + JOINT_ATTENTION
    denoiser.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="gaussian"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param_name, param in denoiser.named_parameters():
            if "lora_B" in param_name:  # gaussian init leaves B at zero: stand in for training
                param.normal_(0.0, 0.2, generator=generator)
    trained = render(pipe)
    type(pipe).save_lora_weights(
        tmp_path,
        **{f"{name}_lora_layers": get_peft_model_state_dict(denoiser)},
        **_collate_lora_metadata({name: denoiser}),
    )

    fresh = build_tiny_pipeline(family)
    fresh.load_lora_weights(tmp_path)
    reloaded = render(fresh)

    assert np.allclose(reloaded, trained, atol=1e-4)
    assert not np.allclose(reloaded, base, atol=1e-3)


def test_sample_dataset_loads_as_imagefolder_and_is_deterministic(tmp_path):
    folder = write_sample_dataset(tmp_path / "a", n=5, size=48, seed=3)
    dataset = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train", cache_dir=str(tmp_path / "cache"))
    assert {"image", "text"} <= set(dataset.column_names)
    assert len(dataset) == 5
    assert dataset[0]["image"].size == (48, 48)
    assert all(caption.startswith("a ") and caption.endswith(" background") for caption in dataset["text"])

    again = write_sample_dataset(tmp_path / "b", n=5, size=48, seed=3)
    other = write_sample_dataset(tmp_path / "c", n=5, size=48, seed=4)
    files = sorted(path.name for path in folder.iterdir())
    assert files == sorted(path.name for path in again.iterdir())
    assert all((folder / f).read_bytes() == (again / f).read_bytes() for f in files)
    assert any((folder / f).read_bytes() != (other / f).read_bytes() for f in files)


def test_default_sample_dataset_is_small(tmp_path):
    folder = write_sample_dataset(tmp_path)
    assert len(list(folder.glob("*.png"))) == 8
    assert sum(path.stat().st_size for path in folder.iterdir()) < 200_000
