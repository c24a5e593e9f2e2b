"""Shared fixtures: tiny pipelines of every family and the sample dataset, saved once per session, and a
helper that runs the real trainer from a parameter dict."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from plugin.config import parse_parameters
from plugin.families.base import DDPMFamily
from plugin.tiny import EDIT_FAMILIES, FAMILIES, SAMPLE_RESOLUTION, VARIANTS, save_tiny_pipeline, write_pair_dataset, write_sample_dataset
from plugin.trainer import RunPaths, train
from suite_guard import run_folder, run_lock

pytest_plugins = ["suite_guard", "pytester"]


def built_once(tmp_path_factory, name: str, build) -> Path:
    """`build(folder)` run by the first test worker that asks for `name`; later ones (and later tests) read the
    same folder. Tests treat it as read-only: one that changes a model or dataset copies it first."""
    folder = run_folder(tmp_path_factory) / name
    complete = folder.with_name(f"{folder.name}.complete")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with run_lock(tmp_path_factory, name.replace("/", "-")):
        if not complete.exists():
            shutil.rmtree(folder, ignore_errors=True)
            build(folder)
            complete.touch()
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    return {family: built_once(tmp_path_factory, f"models/{family}", lambda folder: save_tiny_pipeline(family, folder))
            for family in FAMILIES + VARIANTS + EDIT_FAMILIES}  # fmt: skip


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "data/shapes", write_sample_dataset)


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
        "eval_steps": 1000,  # the final evaluation only (a rendering costs more than a tiny step); tests of the schedule set it
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
    """A uint8 image from a pipeline, seeded as the trainer's evaluation seeds it, its settings given to the
    pipeline as the trainer's evaluation gives them (Qwen-Image's guidance is its true_cfg_scale)."""
    from plugin.families import FAMILIES

    family = next(f for f in FAMILIES if type(pipe).__name__ in f.pipeline_class_names)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt=prompt, generator=torch.Generator("cpu").manual_seed(seed), **family.pipeline_arguments(kwargs)).images[0]
    return np.asarray(image).astype(np.int16)


def load_fresh(model: Path):
    """The pipeline as a user would load it: from the saved folder, with the class model_index.json names. Flux.2
    [dev]'s PixtralProcessor and Qwen-Image-Edit's Qwen2VLProcessor need torchvision, absent here: as a user without
    it would, the first's tokenizer is loaded alone, and the second without its video side (`load_text_reader`)."""
    from diffusers import DiffusionPipeline

    from plugin.families.description import component_class, load_text_reader

    index = json.loads((Path(model) / "model_index.json").read_text())
    stand_ins = {name: load_text_reader(component_class(*index[name], name), str(model), name)[0]
                 for name in ("tokenizer", "processor") if index.get(name, [None, ""])[1].endswith("Processor")}  # fmt: skip
    pipe = DiffusionPipeline.from_pretrained(str(model), **dict.fromkeys(stand_ins))
    pipe.register_modules(**stand_ins)
    return pipe


@pytest.fixture(scope="session")
def heldout_data(tmp_path_factory) -> Path:
    """Images the runs never train on: the sample set's generator with another seed."""
    return built_once(tmp_path_factory, "heldout/shapes", lambda folder: write_sample_dataset(folder, seed=99))


@pytest.fixture(scope="session")
def pair_data(tmp_path_factory) -> Path:
    """An edit dataset (targets mirror their controls), its controls in a control_dir: `pair_data / "controls"`."""
    return built_once(tmp_path_factory, "data/pairs", write_pair_dataset)


@pytest.fixture(scope="session")
def heldout_pairs(tmp_path_factory) -> Path:
    """Pairs the runs never train on, their controls named in the metadata's control_image column."""
    return built_once(tmp_path_factory, "heldout/pairs", lambda folder: write_pair_dataset(folder, seed=99, control_dir=False))


class HeldoutLosses(NamedTuple):
    """Two measures of how well a model denoises held-out images; both fall when it learned their distribution."""

    objective: float  # the run's own loss: its prediction type, weighting, timestep density and loss type
    plain_mse: float  # a fixed yardstick no objective setting changes (see plain_denoising_mse)


def plain_denoising_mse(family, cfg, latents, text, batch, generators) -> torch.Tensor:
    """Unweighted MSE at uniformly drawn noise levels against the true noise ε (DDPM: the prediction turned into
    ε̂ by the model's prediction type) or the true velocity ε − x0 (flow). The noising is written out here, not
    taken from plugin.objectives, so a weighting, timestep density or loss type that shrinks the objective's
    number without better denoising cannot make this one fall."""
    levels = torch.stack([torch.rand((), generator=g) for g in generators]).to(latents.device)
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators]).to(latents.device)
    num_train_timesteps = family.pipe.scheduler.config.num_train_timesteps
    if isinstance(family, DDPMFamily):
        schedule = DDPMScheduler.from_config(family.pipe.scheduler.config, rescale_betas_zero_snr=cfg.rescale_betas_zero_snr)
        timesteps = (levels * num_train_timesteps).long().clamp_max(num_train_timesteps - 1)
        abar = schedule.alphas_cumprod.to(latents.device)[timesteps].reshape(-1, 1, 1, 1)
        alpha, sigma = abar.sqrt(), (1.0 - abar).sqrt()
        noisy = alpha * latents + sigma * noise
        prediction = family.predict(noisy, timesteps.float(), text, batch).float()
        predicted_noise = {
            "epsilon": prediction,
            "v_prediction": sigma * noisy + alpha * prediction,
            "sample": (noisy - alpha * prediction) / sigma,
        }[cfg.prediction_type]
        return (predicted_noise - noise).pow(2).mean()
    sigmas = levels.reshape(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    prediction = family.predict(noisy, levels * num_train_timesteps, text, batch).float()
    return (prediction - (noise - latents)).pow(2).mean()


def heldout_losses(model: Path, cfg, data: Path, adapter_dir: Path | None = None, draws: int = 4) -> HeldoutLosses:
    """The objective's loss and the plain MSE yardstick on held-out images with fixed noise and timesteps
    (eval mode, no grad), for the base model or with a saved adapter loaded through Diffusers. Lower after
    training means the adapter learned the data's distribution, not just its training images; the yardstick
    falling too means it learned to denoise, not just to please a mis-wired objective."""
    from plugin.adapters import load_adapter
    from plugin.cache import Conditioning
    from plugin.data import collate_examples
    from plugin.data.mixing import load_sources
    from plugin.families import load_model
    from plugin.denoising import denoising_loss, sample_generators
    from plugin.trainer import build_examples

    family = load_model(str(model), torch.float32)
    cfg, _ = family.configure(cfg.replace(caption_dropout_rate=0.0, random_flip=False, color_jitter=False,
                                          random_rotation=False, center_crop=True,
                                          cache_latents=False))
    if adapter_dir is not None:
        load_adapter(family.pipe, adapter_dir)  # Diffusers' load_lora_weights, or the LoKr/LoHa loader
    objective = family.make_objective()
    examples = build_examples(cfg, load_sources(cfg.replace(dataset_name=str(data)), None, family.pairing()))
    batch = collate_examples([examples[i] for i in range(len(examples))])
    conditioning = Conditioning(family)
    with torch.no_grad():
        latents, text, _ = conditioning(batch)
        objective_losses = [
            denoising_loss(family, objective, conditioning, batch, sample_generators(1234, draw, batch["indices"]))[1].item()
            for draw in range(draws)
        ]
        plain_mses = [
            plain_denoising_mse(family, cfg, latents, text, batch, sample_generators(4321, draw, batch["indices"])).item()
            for draw in range(draws)
        ]
    return HeldoutLosses(float(np.mean(objective_losses)), float(np.mean(plain_mses)))


def final_eval_image(result, prompt_index: int = 0) -> np.ndarray:
    """The trainer's last evaluation image for one prompt, as int16 for differences."""
    from PIL import Image

    grid = result.eval_images[-1]
    return np.asarray(Image.open(grid.with_name(f"{grid.stem}_{prompt_index}.png"))).astype(np.int16)
