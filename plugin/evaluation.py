"""Evaluation images: rendered by the family's own Diffusers pipeline, sharing the modules being trained."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image

from .errors import EvaluationFailed
from .export import save_image_atomic
from .settings import EvalPrompt


@torch.no_grad()
def render_images(family, prompts: list[EvalPrompt], seed: int) -> list[Image.Image]:
    """One image per prompt with its own settings over the eval_* ones; prompt k seeded with its --d, else with
    seed + k, on a CPU generator (the same on any device)."""
    pipe = family.eval_pipeline()
    pipe.set_progress_bar_config(disable=True)
    defaults = family.eval_call_kwargs()
    images = []
    for k, prompt in enumerate(prompts):
        settings = family.pipeline_arguments({**defaults, **prompt.settings})
        generator = torch.Generator("cpu").manual_seed(settings.pop("seed", seed + k))
        images.append(pipe(prompt=prompt.text, generator=generator, **settings).images[0])
    return images


def rendered_evaluation(family, prompts: list[EvalPrompt], seed: int, step: int, adapter_dir: Path) -> list[Image.Image]:
    """render_images, with a failure (out of memory, a pipeline's refusal) made one line that says the adapter
    of this step was saved first; Ctrl-C passes through."""
    try:
        return render_images(family, prompts, seed)
    except Exception as error:
        raise EvaluationFailed(f"the evaluation images of step {step} could not be rendered ({type(error).__name__}: {error}); "
                               f"the adapter of this step was saved in {str(adapter_dir)!r}") from error  # fmt: skip


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


PLOT_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189))
MAX_DOTS = 60  # points are drawn as dots up to this many per curve; beyond, the line alone


def _padded_range(values: list[float]) -> tuple[float, float]:
    """(low, high) of the values; a flat range (a constant learning rate) is widened by 5 % either side."""
    low, high = min(values), max(values)
    if high > low:
        return low, high
    pad = abs(low) * 0.05 or 1.0
    return low - pad, high + pad


def line_plot(series: dict[str, list[tuple[float, float]]], path: Path, title: str, x_label: str, **options) -> Path:
    """`draw_plot`'s picture saved as a PNG at `path`."""
    save_image_atomic(draw_plot(series, title, x_label, **options), path)
    return Path(path)


def draw_plot(
    series: dict[str, list[tuple[float, float]]], title: str, x_label: str, log_x: bool = False,
    mark: tuple[float, float] | None = None, size: tuple[int, int] = (640, 400),
) -> Image.Image:
    """Curves of (x, y) points, drawn with PIL alone (no plotting library is a dependency): axes with their
    ranges printed, one colour per named series, and `mark`, a point to circle (the chosen one). Text is
    ASCII: PIL's bundled font has no Greek letters."""
    from PIL import ImageDraw

    width, height = size
    left, right, top, bottom = 70, 20, 30, 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    points = [p for curve in series.values() for p in curve]
    xs = [math.log(x) if log_x else x for x, _ in points]
    ys = [y for _, y in points]
    x0, x1 = _padded_range(xs)
    y0, y1 = _padded_range(ys)

    def at(x: float, y: float) -> tuple[float, float]:
        u = ((math.log(x) if log_x else x) - x0) / (x1 - x0)
        return left + u * (width - left - right), top + (1 - (y - y0) / (y1 - y0)) * (height - top - bottom)

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.text((left, 8), title, fill="black")
    draw.text((left, height - bottom + 6), f"{math.exp(x0) if log_x else x0:.4g}", fill="black")
    right_label = f"{math.exp(x1) if log_x else x1:.4g}"
    draw.text((width - right - 6 * len(right_label), height - bottom + 6), right_label, fill="black")
    draw.text(((width - 6 * len(x_label)) // 2, height - bottom + 24), x_label + (" (log scale)" if log_x else ""), fill="black")
    draw.text((4, top), f"{y1:.4g}", fill="black")
    draw.text((4, height - bottom - 10), f"{y0:.4g}", fill="black")
    for k, (name, curve) in enumerate(series.items()):
        colour = PLOT_COLOURS[k % len(PLOT_COLOURS)]
        line = [at(x, y) for x, y in sorted(curve)]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        for x, y in line if len(line) <= MAX_DOTS else []:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        draw.text((width - right - 150, top + 6 + 14 * k), name, fill=colour)
    if mark is not None:
        x, y = at(*mark)
        draw.ellipse([x - 8, y - 8, x + 8, y + 8], outline="black", width=2)
    return image
