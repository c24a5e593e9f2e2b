"""The adapter's model card: `README.md` beside the weights in the Hugging Face model-card format (YAML header,
then Markdown), with the evaluation images of every evaluation as one grid (prompts × epochs), the training
curves, the settings that matter and how to load the adapter in Diffusers, ComfyUI and A1111/Forge."""

from __future__ import annotations

import inspect
import re
import textwrap
from pathlib import Path

import yaml
from PIL import Image, ImageDraw

from .adapters import load_lycoris
from .evaluation import CONTROL_IMAGE, draw_plot, eval_control_paths
from .export import atomic_path, save_image_atomic
from .reporting import METRICS_FILE, read_metrics
from .validation import HISTORY_FILE, read_history

CARD_NAME = "README.md"
EVAL_GRID, CURVES = "eval_grid.png", "training_curves.png"
EVAL_IMAGE = re.compile(r"epoch_(\d+)_(\d+)\.png")
LABEL_WIDTH = 90  # pixels: the grid's row labels (epoch, step)
GAP = 8  # pixels between the grid's cells, so that neighbouring prompts never read as one image
LINE_HEIGHT, CHARACTER_WIDTH = 14, 6  # PIL's default font, for wrapping the prompts over their columns
PROMPT_LINES = 4  # a longer prompt is cut in its column's title (the card lists each in full)
MIN_CELL = 128  # pixels: smaller evaluation images are scaled up by a whole factor in the grid
FINAL_LOSS_STEPS = 20  # the card's final training loss: the mean of the last this many steps
ADAPTER_TITLES = {"lora": "LoRA", "dora": "DoRA", "lokr": "LoKr", "loha": "LoHa"}  # lora_type as the field writes it


def evaluation_rows(eval_dir: Path, prompts: list[str]) -> list[tuple[int | str, list[Path]]]:
    """(epoch, its image per prompt) of every complete evaluation in `eval_dir`, oldest first; an edit model's
    controls (control_<k>.png) first, as the row "control"."""
    found: dict[int, dict[int, Path]] = {}
    for path in Path(eval_dir).glob("epoch_*_*.png"):
        if match := EVAL_IMAGE.fullmatch(path.name):
            found.setdefault(int(match.group(1)), {})[int(match.group(2))] = path
    rows = [(epoch, [images[k] for k in range(len(prompts))]) for epoch, images in sorted(found.items())
            if prompts and len(images) == len(prompts)]  # fmt: skip
    controls = [Path(eval_dir) / f"{CONTROL_IMAGE}{k}.png" for k in range(len(prompts))]
    return ([("control", controls)] if rows and all(path.is_file() for path in controls) else []) + rows


def evaluation_grid(rows: list[tuple[int, list[Path]]], prompts: list[str], step_of) -> Image.Image:
    """Every evaluation's images in one picture: a column per prompt under a band with its prompt (wrapped),
    a row per evaluation labelled with its epoch and optimizer step (`step_of(epoch)`), a gap between cells.
    Each column keeps its prompt's own image size (a prompt's --w/--h), all enlarged by one whole factor when
    tiny, so that none is stretched."""
    sizes = []
    for path in rows[0][1]:
        with Image.open(path) as image:
            sizes.append(image.size)
    scale = max(1, -(-MIN_CELL // min(min(size) for size in sizes)))  # tiny evaluation images are enlarged to be seen
    cells = [(width * scale, height * scale) for width, height in sizes]
    lefts = [LABEL_WIDTH + sum(width + GAP for width, _ in cells[:column]) for column in range(len(cells))]
    row_height = max(height for _, height in cells)
    titles = [textwrap.wrap(prompt, max(8, width // CHARACTER_WIDTH))[:PROMPT_LINES] or [""] for prompt, (width, _) in zip(prompts, cells)]
    band = LINE_HEIGHT * max(len(t) for t in titles) + GAP
    grid = Image.new("RGB", (lefts[-1] + cells[-1][0], band + (row_height + GAP) * len(rows) - GAP), "white")
    draw = ImageDraw.Draw(grid)
    for left, title in zip(lefts, titles):
        draw.multiline_text((left, 2), "\n".join(title), fill="black", spacing=LINE_HEIGHT - 11)
    for row, (epoch, images) in enumerate(rows):
        top = band + row * (row_height + GAP)
        label = f"epoch {epoch}\nstep {step_of(epoch)}" if isinstance(epoch, int) else epoch
        draw.multiline_text((6, top + row_height // 2 - LINE_HEIGHT), label, fill="black")
        for left, cell, path in zip(lefts, cells, images):
            with Image.open(path) as image:
                grid.paste(image.convert("RGB").resize(cell, Image.Resampling.NEAREST), (left, top))
    return grid


def training_curves(metrics: list[dict], validation: list[dict]) -> Image.Image | None:
    """Loss (training, and validation when measured) over the learning rate, one panel each, by step."""
    losses = [(row["step"], row["train/loss"]) for row in metrics if "train/loss" in row]
    rates = [(row["step"], row["train/lr"]) for row in metrics if "train/lr" in row]
    if not losses:
        return None
    series = {"training loss": losses}
    if validation:
        series["validation loss"] = [(entry["step"], entry["loss"]) for entry in validation]
    top = draw_plot(series, "loss", "optimizer step")
    bottom = draw_plot({"learning rate": rates}, "learning rate", "optimizer step")
    curves = Image.new("RGB", (top.width, top.height + bottom.height), "white")
    curves.paste(top, (0, 0))
    curves.paste(bottom, (0, top.height))
    return curves


def card_text(config: dict, prompts: list[str], images: dict[str, bool], facts: dict, exports: dict[str, str]) -> str:
    """The card's Markdown; `images` says which of EVAL_GRID and CURVES exist, `exports` maps a format to its
    file name, `facts` holds what the run measured (steps, images, final and best validation loss)."""
    hub_id = "/" in config["model_name"] and not Path(config["model_name"]).expanduser().exists()
    header = {
        **({"base_model": config["model_name"]} if hub_id else {}),  # the hub's field names a hub model only
        "library_name": "diffusers",
        "license": "other",
        "tags": ["text-to-image", "diffusers", "lora", "diffusers-training", facts["hub_tag"]],
        **({"instance_prompt": config["trigger_word"]} if config.get("trigger_word") else {}),
        **({"widget": [{"text": prompt, "output": {"url": prompt_image(k)}} for k, prompt in enumerate(prompts)]}
           if images.get(EVAL_GRID) else {}),  # each prompt with its own last image
    }
    name, weights = config["adaptor_name"], exports.get("diffusers", "pytorch_lora_weights.safetensors")
    settings = {
        "optimizer steps": facts["steps"], "training images": facts["images"], "resolution": config["resolution"],
        "batch size": f"{config['train_batch_size']} per process x {plural(facts['processes'], 'process', 'processes')} x "
                      f"{config['gradient_accumulation_steps']} accumulation",
        "learning rate": f"{config['learning_rate']:g}, {config['lr_scheduler']} schedule, {config['lr_warmup_steps']} warmup steps",
        "adapter": f"{ADAPTER_TITLES[config['lora_type']]}, rank {config['lora_r']}, alpha {config['lora_alpha']:g}, "
                   f"{'rank ' if config['lora_type'] in ('lokr', 'loha') else ''}dropout {config['lora_dropout']:g}, "
                   f"targets {', '.join(t.strip() for t in config['lora_target_modules'].split(',') if t.strip())}"
                   + (", text encoder trained" if config.get("train_text_encoder") else ""),
        "objective": f"{config.get('prediction_type', 'flow')} prediction, {config['timestep_sampling']} timesteps, "
                     f"{config['loss_weighting']} weighting, {config['loss_type']} loss",
        "precision": {"no": "fp32", "fp16": "fp16 mixed precision", "bf16": "bf16 mixed precision"}[config["mixed_precision"]],
        "EMA": (f"{config['ema_type']}" + (f" (σ_rel {config['posthoc_ema_sigma_rels']})" if config["ema_type"] == "posthoc"
                else f" (decay {config['ema_decay']:g})")) if config.get("use_ema") else "off",
        **({"masked loss": f"on, floor {config['masked_loss_floor']:g}"} if config.get("masked_loss") else {}),
        **({"base in memory": held} if (held := base_memory(config)) else {}),
        "seed": config["seed"],
        f"final training loss (mean of the last {FINAL_LOSS_STEPS} steps)":
            f"{facts['final_loss']:.4f}" if facts.get("final_loss") is not None else "-",
        "validation loss (last, best)": (f"{facts['validation'][-1]['loss']:.5f}, {min(e['loss'] for e in facts['validation']):.5f}"
                                         if facts.get("validation") else "not measured"),
    }  # fmt: skip
    base = f"`{config['model_name']}`" + ("" if hub_id else " (a local folder: copy it along with the adapter to use both elsewhere)")
    lines = ["---", yaml.safe_dump(header, sort_keys=False, allow_unicode=True).strip(), "---", "", f"# {name}", "",
             f"A LoRA adapter for {base}, a {facts['family_title']} model, trained with the Diffusion LoRA Trainer plugin.", ""]  # fmt: skip
    if config.get("trigger_word"):
        lines += ["## Trigger word", "", f"Put `{config['trigger_word']}` in your prompt.", ""]
    lines += ["## Training", "", "| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in settings.items()] + [""]
    lines += dataset_lines(facts.get("datasets") or [], config)
    if images.get(EVAL_GRID):
        lines += ["## Evaluation images", "", "One row per evaluation (epoch and optimizer step), one column per prompt"
                  + (", under the control image each prompt edits" if config.get("eval_control_image") else "") + ":", ""]
        lines += [f"{k + 1}. {prompt}" for k, prompt in enumerate(prompts)] + ["", f"![evaluation images]({EVAL_GRID})", ""]
    if images.get(CURVES):
        lines += ["## Training curves", "", f"![loss and learning rate]({CURVES})", ""]
    lycoris = config.get("lora_type") in ("lokr", "loha")
    folder = str(facts["adapter_dir"])
    loading = ([*inspect.getsource(load_lycoris).splitlines(), "", *facts["loading"], f"load_lycoris(pipe, {folder!r})"] if lycoris
               else [*facts["loading"], f"pipe.load_lora_weights({folder!r}, weight_name={weights!r})"])  # fmt: skip
    prompt = repr(prompts[0] if prompts else config.get("trigger_word") or "a photo")
    references = next(iter(eval_control_paths(config.get("eval_control_image") or "")), [])  # an edit model's: the images the prompt edits
    control = ", ".join(f"load_image({path!r})" for path in references)
    control = f"[{control}]" if len(references) > 1 else control or ("load_image('image_to_edit.png')" if facts.get("renders_edits_only") else "")
    lines += ["## Use it", "", "Diffusers" + (" (its `load_lora_weights` reads LoRA and DoRA only; this "
              f"{config['lora_type']} adapter loads with PEFT)" if lycoris else "") + ":", "", "```python", "import torch",
              f"from diffusers import {', '.join(facts['loading_classes'])}", *(["from diffusers.utils import load_image"] if control else []), "",
              *loading, f"image = pipe({prompt}, image={control}).images[0]" if control else f"image = pipe({prompt}).images[0]",
              "```", ""]  # fmt: skip
    if "kohya" in exports:
        lines += [f"ComfyUI, A1111/Forge and other kohya-format tools: copy `{exports['kohya']}` into their LoRA folder "
                  "(ComfyUI: `models/loras`, then a LoraLoader node; A1111/Forge: `models/Lora`, then "
                  f"`<lora:{Path(exports['kohya']).stem}:1>` in the prompt).", ""]  # fmt: skip
    return "\n".join(lines)


def base_memory(config: dict) -> str:
    """How the frozen base was held while training, where that is not plainly (an fp8-stored base is trained on as
    rounded to fp8, which matters to whoever uses the adapter): quantisation, storage, offloading, the preset."""
    parts = [f"{config['base_quantization']} quantised"] if config.get("base_quantization", "none") != "none" else []
    if config.get("base_storage_dtype", "none") != "none":
        parts.append(f"blocks stored in {config['base_storage_dtype']} (trained on the base as rounded to it)")
    if config.get("offload_blocks"):
        parts.append(f"last {config['offload_blocks']} blocks offloaded to host memory")
    if config.get("preset", "none") != "none":
        parts.append(f"preset {config['preset']}")
    return "; ".join(parts)


def dataset_lines(table: list[dict], config: dict) -> list[str]:
    """The card's list of datasets, when there is more than one plain dataset to tell apart (several, repeats,
    regularisation images): each one's images, repeats and share of an epoch's examples."""
    if len(table) < 2 and all(entry["repeats"] == 1 for entry in table):
        return []
    rows = [f"| `{entry['dataset']}` | {entry['images']} | {entry['repeats']} | {entry['examples']} | {entry['share']:.0%} | "
            + (f"regularisation (loss weight {config.get('prior_loss_weight', 1.0):g})" if entry["regularization"] else "training") + " |"
            for entry in table]  # fmt: skip
    return ["## Datasets", "", "| dataset | images | repeats | examples per epoch | share | kind |", "|---|---|---|---|---|---|", *rows, ""]


def prompt_image(k: int) -> str:
    return f"eval_prompt_{k}.png"


def rgb_image(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def plural(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def write_model_card(adapter_dir: Path, run_dir: Path, config: dict, prompts: list[str], facts: dict, exports: dict[str, str]) -> Path:
    """README.md, eval_grid.png and training_curves.png in `adapter_dir`, each written atomically."""
    adapter_dir, run_dir = Path(adapter_dir), Path(run_dir)
    validation = read_history(run_dir / HISTORY_FILE) if (run_dir / HISTORY_FILE).is_file() else []
    metrics = read_metrics(run_dir / METRICS_FILE)
    recent = [row["train/loss"] for row in metrics if "train/loss" in row][-FINAL_LOSS_STEPS:]
    facts = {**facts, "validation": validation, "final_loss": sum(recent) / len(recent) if recent else None,
             "adapter_dir": adapter_dir}  # fmt: skip  (as the user gave it, like the base model: a card may be shared)
    rows = evaluation_rows(run_dir / "eval_images", prompts)
    step_of = lambda epoch: min(epoch * facts["steps_per_epoch"], facts["steps"])  # noqa: E731  (evaluations end epochs, or the run)
    pictures = {EVAL_GRID: evaluation_grid(rows, prompts, step_of) if rows else None, CURVES: training_curves(metrics, validation)}
    if rows:  # the widgets' pictures: each prompt's image of the last evaluation
        pictures.update({prompt_image(k): rgb_image(path) for k, path in enumerate(rows[-1][1])})
    for name, picture in pictures.items():
        if picture is not None:
            save_image_atomic(picture, adapter_dir / name)
    text = card_text(config, prompts, {name: p is not None for name, p in pictures.items()}, facts, exports)
    with atomic_path(adapter_dir / CARD_NAME) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return adapter_dir / CARD_NAME
