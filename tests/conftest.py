"""Shared fixtures: tiny pipelines of every family and the sample dataset, saved once per session, and a
helper that runs the real trainer from a parameter dict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from plugin.config import parse_parameters
from plugin.tiny import SAMPLE_RESOLUTION, save_tiny_pipeline, write_sample_dataset
from plugin.trainer import RunPaths, train


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {family: save_tiny_pipeline(family, root / family) for family in ("sd", "sdxl", "sd3", "flux")}


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory) -> Path:
    return write_sample_dataset(tmp_path_factory.mktemp("data") / "shapes")


def base_parameters(model: Path, data: Path, output: Path, **overrides) -> dict:
    """A short, fast run on a tiny model; tests override what they examine."""
    return {
        "model_name": str(model),
        "dataset_name": str(data),
        "output_dir": str(output),
        "adaptor_name": "test-adapter",
        "resolution": SAMPLE_RESOLUTION,
        "train_batch_size": 2,
        "max_train_steps": 8,
        "learning_rate": 1e-3,
        "lr_warmup_steps": 0,
        "lora_r": 4,
        "lora_alpha": 8,
        "eval_prompt": "a red circle on a blue background",
        "eval_num_inference_steps": 4,
        "eval_guidance_scale": 2.0,
        "log_to_tensorboard": False,
        "overwrite_output": True,  # tests run several times into one folder; test_checkpoints checks the refusal
        **overrides,
    }


@pytest.fixture
def run_training(tiny_models, sample_data, tmp_path):
    """run_training(family="sd", **overrides) -> (resolved-input cfg, RunResult, RunPaths)."""

    def run(family: str = "sd", **overrides):
        cfg = parse_parameters(base_parameters(tiny_models[family], sample_data, tmp_path / "out", **overrides))
        paths = RunPaths.for_config(cfg)
        return cfg, train(cfg, paths, log=lambda *_: None), paths

    return run


def write_parameter_file(path: Path, parameters: dict) -> Path:
    path.write_text(json.dumps(parameters), encoding="utf-8")
    return path


def render(pipe, prompt: str, seed: int, **kwargs) -> np.ndarray:
    """A uint8 image from a pipeline, seeded as the trainer's evaluation seeds it."""
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt=prompt, generator=torch.Generator("cpu").manual_seed(seed), **kwargs).images[0]
    return np.asarray(image).astype(np.int16)


def load_fresh(model: Path):
    """The pipeline as a user would load it: from the saved folder, with the class model_index.json names."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(model))


@pytest.fixture(scope="session")
def heldout_data(tmp_path_factory) -> Path:
    """Images the runs never train on: the sample set's generator with another seed."""
    return write_sample_dataset(tmp_path_factory.mktemp("heldout") / "shapes", seed=99)


def heldout_loss(model: Path, cfg, data: Path, adapter_dir: Path | None = None, draws: int = 4) -> float:
    """The objective's loss on held-out images with fixed noise and timesteps (eval mode, no grad), for the
    base model or with a saved adapter loaded through Diffusers. Lower after training means the adapter
    learned the data's distribution, not just its training images."""
    from plugin.cache import Conditioning
    from plugin.data import collate_examples, load_image_dataset
    from plugin.families import load_model
    from plugin.trainer import build_examples, denoising_loss, sample_generators

    family = load_model(str(model), torch.float32)
    cfg, _ = family.configure(cfg.replace(caption_dropout_rate=0.0, random_flip=False, color_jitter=False,
                                          random_rotation=False, center_crop=True,
                                          cache_latents=False))
    if adapter_dir is not None:
        family.pipe.load_lora_weights(str(adapter_dir))
    objective = family.make_objective()
    examples = build_examples(cfg, load_image_dataset(str(data), cfg.image_column, cfg.caption_column))
    batch = collate_examples([examples[i] for i in range(len(examples))])
    with torch.no_grad():
        losses = [
            denoising_loss(family, objective, Conditioning(family), batch, sample_generators(1234, draw, batch["indices"])).item()
            for draw in range(draws)
        ]
    return float(np.mean(losses))


def final_eval_image(result, prompt_index: int = 0) -> np.ndarray:
    """The trainer's last evaluation image for one prompt, as int16 for differences."""
    from PIL import Image

    grid = result.eval_images[-1]
    return np.asarray(Image.open(grid.with_name(f"{grid.stem}_{prompt_index}.png"))).astype(np.int16)
