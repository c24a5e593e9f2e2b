"""The validation loss: how well the adapter denoises images it never trains on, as one number per evaluation.

The held-out images come from `validation_split` (a seeded fraction of the training images, regularisation
images left in) or `validation_dataset`.
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
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch

from .buckets import BucketLayout
from .cache import CONTROLS, encode_controls, with_controls
from .data import TrainingExamples, collate_examples
from .data.controls import Pairing
from .data.examples import ExampleSource
from .data.mixing import DatasetSpec, Source, load_source, split_sources
from .denoising import denoising_loss, sample_generators
from .export import write_json_atomic

VALIDATION_DRAWS = 4  # noise and timestep draws per image: the estimate's spread falls as 1/√(images × draws)
HISTORY_FILE = "validation_loss.json"


def training_and_validation_data(cfg, sources: list[Source], pairing: Pairing = Pairing()) -> tuple[list[Source], list[Source] | None]:
    """The datasets to train on and the held-out ones (None without a validation set); `pairing`: the control images
    an edit model takes (`load_source`; a validation_dataset has them as the training data does)."""
    if not cfg.validation_dataset:
        return split_sources(sources, cfg.validation_split, cfg.seed)
    return sources, [load_source(DatasetSpec(cfg.validation_dataset, 1, False, cfg, "validation_dataset"), pairing)]


class ValidationSet:
    """Held-out batches (one bucket each) with their latents, and the fixed draws that noise them."""

    def __init__(self, batches: list[tuple[dict, torch.Tensor]], seed: int):
        self.batches = batches
        self.seed = seed
        self.size = sum(len(batch["captions"]) for batch, _ in batches)

    @classmethod
    @torch.no_grad()
    def build(cls, cfg, family, sources: list[Source]) -> "ValidationSet":
        """Each image at its bucket (buckets on whatever the run's aspect_ratio_buckets, so that setting does
        not move the yardstick), batched train_batch_size at a time per bucket, encoded by the family's VAE."""
        fixed = [ExampleSource(source.dataset, source.spec.cfg.image_column, source.spec.cfg.caption_column, _fixed_augment(source.spec),
                               _fixed_captions(source.spec), controls=source.controls) for source in sources]  # fmt: skip
        layout = BucketLayout.joined([BucketLayout.assign(source.headers.sizes, source.spec.cfg.resolution, family.resolution_multiple,
                                                          enabled=True) for source in sources])  # fmt: skip
        examples = TrainingExamples(fixed, cfg.seed, layout=layout)
        by_bucket: dict[int, list[int]] = {}
        for index, bucket in enumerate(layout.bucket_ids()):
            by_bucket.setdefault(bucket, []).append(index)
        chunks = [rows[i : i + cfg.train_batch_size] for rows in by_bucket.values() for i in range(0, len(rows), cfg.train_batch_size)]
        batches = []
        with family.unparked():
            for chunk in chunks:
                batch = collate_examples([examples[i] for i in chunk])
                latents = family.encode_images(batch.pop("pixel_values")).cpu()
                if "control_pixel_values" in batch:  # the pixels kept where the text encoder reads them with each prompt
                    pixels = batch["control_pixel_values"] if family.text_reads_controls else batch.pop("control_pixel_values")
                    batch[CONTROLS] = encode_controls(family, pixels).cpu()
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
                conditioning = with_controls(family.encode_text(batch["captions"], batch.get("control_pixel_values")), batch.get(CONTROLS), device)
                fixed = (latents.to(device), conditioning, None)  # no mask: every pixel counts
                for draw in range(VALIDATION_DRAWS):
                    generators = sample_generators(self.seed, f"validation:{draw}", batch["indices"])
                    _, reported = denoising_loss(family, objective, lambda _: fixed, batch, generators, autocast)
                    total += reported.item() * len(batch["captions"])
        return total / (self.size * VALIDATION_DRAWS)


def _fixed_augment(spec: DatasetSpec):
    """The dataset's image settings with a centre crop and no augmentation."""
    return replace(spec.augment, center_crop=True, random_flip=False, color_jitter=False, random_rotation=False)


def _fixed_captions(spec: DatasetSpec):
    """The dataset's captions as written: the trigger word, prefix and suffix, no dropout and no shuffle."""
    return replace(spec.captions, caption_dropout_rate=0.0, shuffle_caption=False)


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
