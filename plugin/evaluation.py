"""Evaluation images: rendered by the family's own Diffusers pipeline, sharing the modules being trained."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from .export import save_image_atomic


def eval_prompts(text: str) -> list[str]:
    """One prompt per non-empty line."""
    return [line.strip() for line in text.splitlines() if line.strip()]


@torch.no_grad()
def render_images(family, prompts: list[str], seed: int) -> list[Image.Image]:
    """One image per prompt, prompt k seeded with seed + k on a CPU generator (the same on any device)."""
    pipe = family.eval_pipeline()
    pipe.set_progress_bar_config(disable=True)
    kwargs = family.eval_call_kwargs()
    return [
        pipe(prompt=prompt, generator=torch.Generator("cpu").manual_seed(seed + k), **kwargs).images[0]
        for k, prompt in enumerate(prompts)
    ]


def image_grid(images: list[Image.Image], columns: int = 4) -> Image.Image:
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height))
    for k, image in enumerate(images):
        grid.paste(image, ((k % columns) * width, (k // columns) * height))
    return grid


def save_evaluation(images: list[Image.Image], folder: Path, epoch: int) -> Path:
    """epoch_<n>_<k>.png per prompt and epoch_<n>.png, the grid Transformer Lab shows; n has four digits or
    more, so that sorting by name (as the app does) is sorting by epoch."""
    for k, image in enumerate(images):
        save_image_atomic(image, Path(folder) / f"epoch_{epoch:04d}_{k}.png")
    grid_path = Path(folder) / f"epoch_{epoch:04d}.png"
    save_image_atomic(image_grid(images), grid_path)
    return grid_path
