"""The model card: Hugging Face format (YAML header that parses), its pictures present and right."""

from __future__ import annotations

import re

import yaml
from PIL import Image

import numpy as np

from plugin.card import CARD_NAME, CURVES, EVAL_GRID, GAP, LABEL_WIDTH, MIN_CELL, prompt_image
from plugin.reporting import METRICS_FILE, read_metrics

PROMPTS = "a red circle on a blue background\na green square on a yellow background\na blue triangle"


def front_matter(text: str) -> dict:
    match = re.fullmatch(r"---\n(.*?)\n---\n(.*)", text, flags=re.S)
    assert match, "the card starts with a YAML header between --- lines"
    return yaml.safe_load(match.group(1))


def test_the_card_renders_with_its_pictures_and_its_yaml_parses(run_training):
    cfg, result, paths = run_training("sdxl", eval_prompt=PROMPTS, trigger_word="shapes", validation_split=0.25,
                                      num_train_epochs=100, max_train_steps=9, eval_steps=1)  # fmt: skip
    text = (paths.adapter_dir / CARD_NAME).read_text(encoding="utf-8")
    header = front_matter(text)
    assert header["library_name"] == "diffusers" and header["instance_prompt"] == "shapes"
    assert {"lora", "diffusers", "text-to-image", "stable-diffusion-xl"} <= set(header["tags"])
    assert "base_model" not in header, "a local folder is no hub id"
    assert [(w["text"], w["output"]["url"]) for w in header["widget"]] == [(p, prompt_image(k)) for k, p in enumerate(PROMPTS.splitlines())]
    last = result.eval_images[-1]
    for k in range(3):  # each widget shows its own prompt's image of the last evaluation
        with Image.open(paths.adapter_dir / prompt_image(k)) as widget, Image.open(last.with_name(f"{last.stem}_{k}.png")) as own:
            assert np.array_equal(np.asarray(widget), np.asarray(own.convert("RGB")))
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert set(links) == {EVAL_GRID, CURVES}
    evaluations = len(result.eval_images)
    assert evaluations == 3  # 6 training images, batch 2: an evaluation every 3 steps
    with Image.open(paths.adapter_dir / EVAL_GRID) as grid:
        pixels = np.asarray(grid.convert("L")).astype(int)
    cell = max(MIN_CELL, cfg.resolution)
    band = pixels.shape[0] - evaluations * cell - (evaluations - 1) * GAP
    assert pixels.shape[1] == LABEL_WIDTH + 3 * cell + 2 * GAP and 14 <= band <= 4 * 14 + GAP, pixels.shape
    for column in range(3):  # a title band with text above each column, white gaps between the columns
        left = LABEL_WIDTH + column * (cell + GAP)
        assert pixels[:band - GAP, left:left + cell].min() < 100, "the prompt's title"
        if column:
            assert (pixels[band:, left - GAP:left] == 255).all(), "a white gap before the column"
    for row in range(evaluations):  # each row labelled (epoch and step) in the label column
        top = band + row * (cell + GAP)
        assert pixels[top:top + cell, :LABEL_WIDTH].min() < 100
    assert "| batch size | 2 per process x 1 process x 1 accumulation |" in text and "| precision | fp32 |" in text
    assert f"A LoRA adapter for `{cfg.model_name}` (a local folder" in text
    assert f"load_lora_weights({str(paths.adapter_dir.resolve())!r}" in text and "torch_dtype=torch.float32" in text
    assert "path/to" not in text and "bfloat16" not in text
    with Image.open(paths.adapter_dir / CURVES) as curves:
        assert curves.size == (640, 800)
    assert "StableDiffusionXLPipeline.from_pretrained" in text and "load_lora_weights" in text
    assert "| optimizer steps | 9 |" in text and "| training images | 6 |" in text
    assert "| adapter | LoRA, rank 4, alpha 8, dropout 0, targets to_q, to_k, to_v, to_out.0 |" in text, "the family's targets"
    assert "validation loss (last, best)" in text and "not measured" not in text
    steps = [row["step"] for row in read_metrics(paths.run_dir / METRICS_FILE) if "train/loss" in row]
    assert steps == list(range(1, 10)), "every step's metrics, once"


def test_a_card_without_evaluations_says_so_plainly_and_states_the_adapter_trained(run_training):
    """Every LoRA setting away from its default (the run's values, not the manifest's, reach the card)."""
    _, _, paths = run_training("flux", eval_prompt="", max_train_steps=2, lora_type="dora", lora_r=6, lora_alpha=3.5,
                               lora_dropout=0.05, lora_target_modules="to_k, ff.net.2")  # fmt: skip
    text = (paths.adapter_dir / CARD_NAME).read_text(encoding="utf-8")
    assert "| adapter | DoRA, rank 6, alpha 3.5, dropout 0.05, targets to_k, ff.net.2 |" in text
    assert "widget" not in front_matter(text) and EVAL_GRID not in text and not (paths.adapter_dir / EVAL_GRID).exists()
    assert "FluxPipeline" in text and "| validation loss (last, best) | not measured |" in text
    assert (paths.adapter_dir / CURVES).is_file()
