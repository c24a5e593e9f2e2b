"""The validation loss: how well the adapter denoises images it never trains on, as one number per evaluation.

The held-out images come from `validation_split` (a seeded fraction of the dataset) or `validation_dataset`.
Everything random is fixed once: each image sits at its aspect-ratio bucket with a centre crop and no flip,
its caption has the trigger word and no dropout, and its noise and timesteps come from generators keyed by
(seed, draw, image), VALIDATION_DRAWS draws per image. The latents are encoded once, when the set is built.
So the number moves only when the weights do: it is the same in every evaluation of a run, in a repeated
run, with or without the training caches, buckets or augmentations, and in the post-hoc EMA sweep, which
rebuilds the set from the run's config. Its unit is the training objective's own loss (prediction type,
weighting λ, timestep density, loss type); with learned weighting, the λ-weighted loss before e^{u(σ)}.
"""

from __future__ import annotations

import json
import random
from contextlib import nullcontext
from pathlib import Path

import datasets
import torch

from .buckets import BucketLayout
from .data import CaptionOptions
from .data import AugmentOptions, TrainingExamples, collate_examples, load_image_dataset, read_image_headers
from .denoising import denoising_loss, sample_generators
from .errors import ConfigError
from .export import write_json_atomic

VALIDATION_DRAWS = 4  # noise and timestep draws per image: the estimate's spread falls as 1/√(images × draws)
HISTORY_FILE = "validation_loss.json"


def split_dataset(dataset: datasets.Dataset, fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(training rows, held-out rows): round(fraction·N) rows, at least one, drawn by the seed, the rest in
    their order. A split that would leave no training image (or hold none out) is an error."""
    if fraction <= 0:
        return dataset, None
    size = len(dataset)
    held = max(1, round(fraction * size))
    if held >= size:
        raise ConfigError(f"validation_split: {fraction:g} of {size} images holds out {held}, which leaves no training images; "
                          "lower it, add images, or name a validation_dataset")  # fmt: skip
    chosen = set(random.Random(f"{seed}:validation").sample(range(size), held))
    return dataset.select([i for i in range(size) if i not in chosen]), dataset.select(sorted(chosen))


def training_and_validation_data(cfg, dataset: datasets.Dataset) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """The rows to train on and the held-out rows (None without a validation set)."""
    if not cfg.validation_dataset:
        return split_dataset(dataset, cfg.validation_split, cfg.seed)
    try:
        held_out = load_image_dataset(cfg.validation_dataset, cfg.image_column, cfg.caption_column, cfg.follow_symlinks)
    except ConfigError as error:  # the loader's messages name dataset_name, the field it usually reads
        raise ConfigError(str(error).replace("dataset_name:", "validation_dataset:", 1)) from None
    return dataset, held_out


class ValidationSet:
    """Held-out batches (one bucket each) with their latents, and the fixed draws that noise them."""

    def __init__(self, batches: list[tuple[dict, torch.Tensor]], seed: int):
        self.batches = batches
        self.seed = seed
        self.size = sum(len(batch["captions"]) for batch, _ in batches)

    @classmethod
    @torch.no_grad()
    def build(cls, cfg, family, dataset: datasets.Dataset) -> "ValidationSet":
        """Each image at its bucket (buckets on whatever the run's aspect_ratio_buckets, so that setting does
        not move the yardstick), batched train_batch_size at a time per bucket, encoded by the family's VAE."""
        headers = read_image_headers(dataset, cfg.image_column)
        layout = BucketLayout.assign(headers.sizes, cfg.resolution, family.resolution_multiple, enabled=True)
        augment = AugmentOptions(
            resolution=cfg.resolution, center_crop=True, random_flip=False, interpolation=cfg.image_interpolation_mode,
            color_jitter=False, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, random_rotation=False,
            rotation_degrees=0.0, rotation_prob=0.0, alpha_background=cfg.alpha_background,
        )  # fmt: skip
        captions = CaptionOptions(cfg.trigger_word, 0.0, caption_separator=cfg.caption_separator, caption_prefix=cfg.caption_prefix,
                                  caption_suffix=cfg.caption_suffix)  # fixed: no dropout, no shuffle  # fmt: skip
        examples = TrainingExamples(dataset, cfg.image_column, cfg.caption_column, augment, captions, cfg.seed, layout=layout)
        by_bucket: dict[int, list[int]] = {}
        for index, bucket in enumerate(layout.bucket_ids()):
            by_bucket.setdefault(bucket, []).append(index)
        chunks = [rows[i : i + cfg.train_batch_size] for rows in by_bucket.values() for i in range(0, len(rows), cfg.train_batch_size)]
        batches = []
        with family.unparked():
            for chunk in chunks:
                batch = collate_examples([examples[i] for i in chunk])
                latents = family.encode_images(batch.pop("pixel_values")).cpu()
                batches.append((batch, latents))
        return cls(batches, cfg.seed)

    @torch.no_grad()
    def loss(self, family, objective, autocast=nullcontext) -> float:
        """The mean reported loss over every image and draw, with the modules as they are (call it in eval
        mode, so LoRA dropout is off). Prompts are encoded each time: a trained text encoder changes them."""
        device = family.denoiser.device
        total = 0.0
        with family.unparked():
            for batch, latents in self.batches:
                fixed = (latents.to(device), family.encode_prompts(batch["captions"]))
                for draw in range(VALIDATION_DRAWS):
                    generators = sample_generators(self.seed, f"validation:{draw}", batch["indices"])
                    _, reported = denoising_loss(family, objective, lambda _: fixed, batch, generators, autocast)
                    total += reported.item() * len(batch["captions"])
        return total / (self.size * VALIDATION_DRAWS)


class ValidationHistory:
    """The validation losses of a run, `<run>/validation_loss.json` ([{"step", "loss"}, ...]), rewritten
    atomically after each measurement (by one process: `record`). A resumed run keeps the entries up to its
    checkpoint's step."""

    def __init__(self, run_dir: Path, held_out: ValidationSet | None, resumed_step: int | None = None, record: bool = True):
        self.path = Path(run_dir) / HISTORY_FILE
        self.held_out = held_out
        self.record = record
        self.entries: list[dict] = []
        if resumed_step is not None and self.path.is_file():
            self.entries = [e for e in read_history(self.path) if e["step"] <= resumed_step]

    def measure(self, step: int, family, objective, autocast=nullcontext) -> float | None:
        """The validation loss at `step`, recorded; None without a validation set."""
        if self.held_out is None:
            return None
        value = self.held_out.loss(family, objective, autocast)
        self.entries = [e for e in self.entries if e["step"] != step] + [{"step": step, "loss": value}]
        if self.record:
            write_json_atomic(self.path, self.entries)
        return value


def read_history(path: Path) -> list[dict]:
    return json.loads(Path(path).read_text(encoding="utf-8"))
