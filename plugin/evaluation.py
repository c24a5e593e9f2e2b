"""Evaluation images: rendered by the family's own Diffusers pipeline, sharing the modules being trained."""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from .data import upright_image
from .errors import ConfigError, EvaluationFailed
from .export import save_image_atomic
from .settings import EvalPrompt

CONTROL_IMAGE = "control_"  # control_<k>.png: the control image prompt k edits


def with_eval_controls(prompts: list[EvalPrompt], value: str, family) -> list[EvalPrompt]:
    """The prompts with the control images an edit model edits (eval_control_image: one entry for every prompt, or
    one per prompt, on lines or separated by commas; an entry's references separated by "|") in their settings,
    under the edit pipelines' name, `image` (a list where there are several). Checked before any weights load:
    every file is named when it cannot be read."""
    if not value.strip():
        if prompts and family.renders_edits_only:
            raise ConfigError(f"eval_control_image: {family.title}'s pipeline renders edits of a control image only; give the image each eval_prompt "
                              "edits (one file, or one per prompt), or leave eval_prompt empty")  # fmt: skip
        return prompts
    if not family.control_images:
        raise ConfigError(f"eval_control_image: {family.title} models take no control image; edit models (trained on pairs) do")
    entries = eval_control_paths(value)
    if len(entries) not in (1, len(prompts)):
        raise ConfigError(f"eval_control_image: {len(entries)} entries for {len(prompts)} eval_prompt lines; give one for every prompt, or one each")
    if (most := max(map(len, entries))) > family.control_images:
        raise ConfigError(f"eval_control_image: an entry of {most} references; {family.title} models take at most {family.control_images}")
    controls = [[_read_control(path) for path in entry] for entry in entries]
    controls = [entry[0] if len(entry) == 1 else entry for entry in controls]
    return [replace(prompt, settings={**prompt.settings, "image": controls[k % len(controls)]}) for k, prompt in enumerate(prompts)]


def eval_control_paths(value: str) -> list[list[str]]:
    """eval_control_image's entries (on lines or separated by commas), each a list of its references' files
    (separated by "|")."""
    entries = [[path.strip() for path in entry.split("|") if path.strip()] for entry in re.split(r"[\n,]", value)]
    return [entry for entry in entries if entry]


def _read_control(path: str) -> Image.Image:
    file = Path(path).expanduser()
    try:
        with Image.open(file) as opened:
            return upright_image(opened).convert("RGB")
    except (OSError, ValueError) as error:
        raise ConfigError(f"eval_control_image: {path!r} cannot be read as an image ({error})") from None


@torch.no_grad()
def render_images(family, prompts: list[EvalPrompt], seed: int) -> list[Image.Image]:
    """One image per prompt with its own settings over the eval_* ones; prompt k seeded with its --d, else with
    seed + k, on a CPU generator (the same on any device). An edit's control is resized to the image's size, as
    training sees it."""
    pipe = family.eval_pipeline()
    pipe.set_progress_bar_config(disable=True)
    defaults = family.eval_call_kwargs()
    images = []
    for k, prompt in enumerate(prompts):
        settings = {**defaults, **prompt.settings}
        if "image" in settings:
            size = family.control_size(settings["width"], settings["height"])
            resized = lambda image: image.resize(size, Image.Resampling.LANCZOS)  # noqa: E731
            settings["image"] = [*map(resized, settings["image"])] if isinstance(settings["image"], list) else resized(settings["image"])
        settings = family.pipeline_arguments(settings)
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
    """The images in rows of `columns`, each at the top left of a cell as large as the largest image (a prompt's
    --w/--h, an edit's control beside its result), on black."""
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    width, height = max(image.width for image in images), max(image.height for image in images)
    grid = Image.new("RGB", (columns * width, rows * height))
    for k, image in enumerate(images):
        grid.paste(image, ((k % columns) * width, (k // columns) * height))
    return grid


def save_evaluation(images: list[Image.Image], folder: Path, epoch: int, controls: list | None = None) -> Path:
    """epoch_<n>_<k>.png per prompt and epoch_<n>.png, the grid Transformer Lab shows; n has four digits or
    more, so that sorting by name (as the app does) is sorting by epoch. An edit's control (of several references,
    the first) is control_<k>.png, and stands left of its result in the grid."""
    firsts = [control[0] if isinstance(control, list) else control for control in controls or [None] * len(images)]
    shown = [None if control is None else control.resize(image.size, Image.Resampling.LANCZOS) for image, control in zip(images, firsts)]
    for k, (image, control) in enumerate(zip(images, shown)):
        save_image_atomic(image, Path(folder) / f"epoch_{epoch:04d}_{k}.png")
        if control is not None:
            save_image_atomic(control, Path(folder) / f"{CONTROL_IMAGE}{k}.png")
    grid_path = Path(folder) / f"epoch_{epoch:04d}.png"
    save_image_atomic(image_grid([image if control is None else side_by_side(control, image) for image, control in zip(images, shown)]), grid_path)
    return grid_path


def side_by_side(control: Image.Image, result: Image.Image) -> Image.Image:
    """The control (at the result's size) left of the result."""
    pair = Image.new("RGB", (2 * result.width, result.height))
    pair.paste(control.resize(result.size, Image.Resampling.LANCZOS), (0, 0))
    pair.paste(result, (result.width, 0))
    return pair


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
