"""Qwen-Image-Edit and Edit Plus train on pairs: their controls reach the transformer as tokens after the target's
and reach Qwen2.5-VL with the prompt, so the text depends on the controls. Checked against the pipelines at one
step, bit for bit (prompt read with its image included); on the mirror pairs (each target is its control mirrored)
they learn what the controls tell and the adapter edits in the pipeline, with one control (Edit) and two (Plus); the text
cache keyed by caption and control trains what encoding at every step trains; controls at their own resolution
keep their target's crop and flip; and the processor's stand-in (its video side needs torchvision) reads images by
the processor's documented rules."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions
from PIL import Image
from safetensors.torch import load_file

from conftest import base_parameters, final_eval_image, load_fresh, render
from plugin.cache import CONTROLS, resolve_caching
from plugin.config import parse_parameters
from plugin.data.controls import Pairing
from plugin.data.mixing import load_sources
from plugin.export import WEIGHTS_NAME
from plugin.families import load_model
from plugin.trainer import RunPaths, build_examples, train
from test_conditioning import assert_identical, denoiser_inputs
from test_edit_pairs import assert_learnt_from_the_controls, items_over_epochs, two_references

PROMPT = "make the circle a square"


def edit_parameters(model: Path, data: Path, output: Path, **overrides) -> dict:
    """A run on the 64 px mirror pairs, controls at 64 px (the pipelines' own 1024² would cost 256 times the tokens)."""
    return base_parameters(model, data, output, **{"resolution": 64, "control_resolution": 64, "control_dir": str(data / "controls"), **overrides})


def pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


@pytest.mark.parametrize("name, references", [("qwen_image_edit", 1), ("qwen_image_edit_plus", 2)])
def test_denoiser_inputs_at_a_step_are_the_pipelines(name, references, tiny_models, pair_data, tmp_path):
    """The controls at the size the pipeline gives them (1024² for a square), so both sides read the same pixels; each
    encoded alone, as the pipeline encodes them (a batch of several may differ in the last bits)."""
    model = tiny_models[name]
    family = load_model(str(model), torch.float32)
    family.configure(parse_parameters(edit_parameters(model, pair_data, tmp_path, control_resolution=0)))
    controls = [Image.open(pair_data / "controls" / f"000{k}.png").convert("RGB").resize((1024, 1024), Image.Resampling.LANCZOS) for k in range(references)]
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    pipe = load_fresh(model)
    theirs = denoiser_inputs(pipe.transformer, lambda: pipe(prompt=PROMPT, image=controls if references > 1 else controls[0], height=64, width=64,
                                                            latents=family.pipeline_class._pack_latents(latents, 1, 4, 8, 8),
                                                            num_inference_steps=2, output_type="latent", true_cfg_scale=1.0))  # fmt: skip
    control_pixels = torch.stack([pixels(control) for control in controls])[None]
    encoded = torch.stack([family.encode_images(control_pixels[:, k]) for k in range(references)], dim=1)  # one at a time, as the pipeline does
    text = {**family.encode_text([PROMPT], control_pixels), CONTROLS: encoded}
    timestep = pipe.scheduler.timesteps[:1]
    ours = denoiser_inputs(family.denoiser, lambda: family.predict(latents, timestep, text, batch={}))
    assert ours["hidden_states"].shape[1] == 16 + references * 64 * 64  # the target's tokens, then each control's
    assert ours["img_shapes"] == [[(1, 4, 4)] + [(1, 64, 64)] * references]
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert_identical(ours[key], value, key)
    mirrored = family.encode_text([PROMPT], control_pixels.flip(-1))["encoder_hidden_states"]  # the text is read with its controls
    assert mirrored.shape == ours["encoder_hidden_states"].shape and not torch.allclose(mirrored, ours["encoder_hidden_states"], atol=1e-3)


def test_a_control_at_its_own_resolution_keeps_its_targets_crop_and_flip(pair_data, tmp_path):
    """The Qwen-Image-Edit pipelines' control size (calculate_dimensions) for any aspect ratio, and a control that is
    its target's own picture at 3x the size shows, scaled back down, what the target shows, under random crops and flips."""
    for _ in range(200):
        height, width = random.randrange(64, 2048, 16), random.randrange(64, 2048, 16)
        ours = Pairing(area=1024 * 1024, multiple=32).control_target((height, width))
        theirs = calculate_dimensions(1024 * 1024, width / height)[:2]
        assert ours == (theirs[1], theirs[0])
    data = tmp_path / "same"
    (data / "controls").mkdir(parents=True)
    rows = []
    for k in range(4):  # the targets are the controls, 4:3 and smaller
        control = Image.open(pair_data / "controls" / f"000{k}.png").convert("RGB").resize((144, 108), Image.Resampling.LANCZOS)
        control.save(data / "controls" / f"{k}.png")
        control.resize((48, 36), Image.Resampling.LANCZOS).save(data / f"{k}.png")
        rows.append(f'{{"file_name": "{k}.png", "text": "x"}}')
    (data / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    cfg = parse_parameters({"model_name": "m", "dataset_name": str(data), "adaptor_name": "a", "control_dir": str(data / "controls"), "resolution": 32,
                            "random_flip": True, "center_crop": False, "cache_latents": False})  # fmt: skip
    items = items_over_epochs(build_examples(cfg, load_sources(cfg, None, Pairing(1, area=96 * 96, multiple=16))))
    for item in items:
        target, control = item["pixel_values"], item["control_pixel_values"][0]
        assert control.shape[1:] == Pairing(area=96 * 96, multiple=16).control_target(tuple(target.shape[1:]))
        shrunk = torch.nn.functional.interpolate(control[None], size=target.shape[1:], mode="area")[0]
        assert (shrunk - target).abs().mean() < 0.06, "the control shows what its target shows"
    assert {item["plan"].flip for item in items} == {False, True}


def test_the_stand_in_processor_reads_images_by_the_processors_rules(tiny_models):
    """Transformers' Qwen2VLProcessor needs torchvision for its video side; the stand-in is the same class without it,
    its images read by the PIL image processor: smart_resize (sides rounded to 28, the area kept within the processor's
    pixel bounds), rescale and CLIP normalisation, 14 px patches of 2 frames, one <|image_pad|> per 2x2 patches."""
    model = load_model(str(tiny_models["qwen_image_edit"]), torch.float32)
    processor = model.description.tokenizers["processor"]
    settings = processor.image_processor
    low, high = settings.size["shortest_edge"], settings.size["longest_edge"]
    for width, height, colour in ((300, 100, (200, 30, 90)), (40, 40, (10, 240, 120)), (1024, 768, (0, 0, 0))):
        beta = 1.0
        h, w = round(height / 28) * 28, round(width / 28) * 28
        if h * w > high:
            beta = math.sqrt(height * width / high)
            h, w = math.floor(height / beta / 28) * 28, math.floor(width / beta / 28) * 28
        elif h * w < low:
            beta = math.sqrt(low / (height * width))
            h, w = math.ceil(height * beta / 28) * 28, math.ceil(width * beta / 28) * 28
        out = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[Image.new("RGB", (width, height), colour)], return_tensors="pt")
        assert out["image_grid_thw"].tolist() == [[1, h // 14, w // 14]]
        assert (out["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum() == h * w // 28 // 28
        expected = (torch.tensor(colour) / 255 - torch.tensor(settings.image_mean)) / torch.tensor(settings.image_std)
        patches = out["pixel_values"].view(-1, 3, 2, 14, 14)  # (channels, frames, rows, columns) per patch
        assert patches.shape[0] == h * w // 14 // 14
        assert torch.allclose(patches.mean(dim=(0, 2, 3, 4)), expected.float(), atol=1e-4)


@pytest.mark.parametrize("name", ["qwen_image_edit", "qwen_image_edit_plus"])
def test_trains_on_pairs_and_its_adapter_edits_in_the_pipeline(name, tiny_models, pair_data, heldout_pairs, tmp_path):
    """Plus with two references per target (the control and a greyed copy); its evaluation edits with both (an
    eval_control_image entry of two files), as the pipeline does, and its card says so."""
    model = tiny_models[name]
    plus = name.endswith("plus")
    data, folders = two_references(pair_data, tmp_path / "pairs") if plus else (pair_data, str(pair_data / "controls"))
    held_out, held_out_folders = two_references(heldout_pairs, tmp_path / "heldout") if plus else (heldout_pairs, "")
    files = [held_out / "controls" / "0000.png", *([held_out / "greyed" / "0000.png"] if plus else [])]
    cfg = parse_parameters(edit_parameters(model, data, tmp_path / "out", control_dir=folders, max_train_steps=300, learning_rate=1e-2, lora_r=8,
                                           seed=3, eval_prompt="mirror the picture", eval_control_image="|".join(map(str, files)),
                                           eval_guidance_scale=1.0))  # fmt: skip
    result = train(cfg, paths := RunPaths.for_config(cfg), log=lambda *_: None)
    held_out_cfg = cfg.replace(control_dir=held_out_folders)  # the held-out pairs name their control in a column
    assert_learnt_from_the_controls(model, held_out_cfg, held_out, paths.adapter_dir, tmp_path / "swapped")

    pipe = load_fresh(model)
    references = [Image.open(file).convert("RGB").resize((64, 64), Image.Resampling.LANCZOS) for file in files]
    settings = dict(image=references if plus else references[0], num_inference_steps=cfg.eval_num_inference_steps, height=64, width=64)
    # Its latents: the tiny VAE, normalised as a trained one is, decodes a latent change of the noise's size to a level or two.
    edit = lambda: pipe(prompt="mirror the picture", generator=torch.Generator().manual_seed(0), true_cfg_scale=2.0, negative_prompt=" ",  # noqa: E731
                        output_type="latent", **settings).images
    base = edit()
    pipe.load_lora_weights(str(paths.adapter_dir))  # Diffusers' own loader, into the edit pipeline
    assert (edit() - base).abs().max() > 0.1
    ours = render(pipe, "mirror the picture", cfg.eval_seed, guidance_scale=1.0, **settings)
    assert np.abs(final_eval_image(result) - ours).max() <= 1  # the trainer's evaluation is the pipeline's edit
    card = (paths.adapter_dir / "README.md").read_text()
    call = ", ".join(f"load_image({str(file)!r})" for file in files)
    assert f"{type(pipe).__name__}.from_pretrained" in card and f"image={f'[{call}]' if plus else call}" in card


def test_text_cached_with_its_controls_trains_what_encoding_at_every_step_trains(tiny_models, pair_data, tmp_path):
    """Three ways to the same adapter: both caches; latents cached and the prompts read with their controls at every
    step (the examples then carry the control pixels); neither. A disk cache keys each prompt by its controls too:
    a changed control file is encoded again, the rest reused."""
    model = tiny_models["qwen_image_edit"]
    data = Path(tmp_path / "pairs")
    import shutil

    shutil.copytree(pair_data, data)
    runs = {}
    for label, caches in {"both": (True, True), "latents": (True, False), "neither": (False, False)}.items():
        cfg = parse_parameters(edit_parameters(model, data, tmp_path / label, max_train_steps=6, random_flip=True, cache_latents=caches[0],
                                               cache_text_embeddings=caches[1], eval_prompt=""))  # fmt: skip
        result = train(cfg, paths := RunPaths.for_config(cfg), log=lambda *_: None)
        runs[label] = (result, load_file(paths.adapter_dir / WEIGHTS_NAME))
    assert runs["both"][0].cache_counts == {"latents": (16, 0), "text": (16, 0)}  # 8 pairs, each flipped and not
    for label in ("latents", "neither"):
        assert runs[label][1].keys() == runs["both"][1].keys()
        for key, value in runs["both"][1].items():
            assert torch.equal(runs[label][1][key], value), f"{label}: {key}"

    card = (tmp_path / "both" / "test-adapter" / "README.md").read_text()  # no eval_control_image: the card's call edits an image of yours
    assert "image=load_image('image_to_edit.png')" in card

    def disk_run(output, **overrides):
        logged = []
        cfg = parse_parameters(edit_parameters(model, data, tmp_path / output, max_train_steps=1, cache_dir=str(tmp_path / "cache"), eval_prompt="",
                                               **overrides))  # fmt: skip
        train(cfg, RunPaths.for_config(cfg), log=logged.append)
        return [line for line in logged if line.startswith(("text cache:", "latents cache:"))]

    assert [line.split(" (")[0] for line in disk_run("first")] == ["latents cache: 8 encoded, 0 reused", "text cache: 8 encoded, 0 reused"]
    Image.open(data / "controls" / "0003.png").rotate(90).save(data / "controls" / "0003.png")
    assert [line.split(" (")[0] for line in disk_run("second")] == ["latents cache: 1 encoded, 7 reused", "text cache: 1 encoded, 7 reused"]
    resized = [line.split(" (")[0] for line in disk_run("third", control_resolution=32)]  # controls of another size: new entries
    assert resized == ["latents cache: 8 encoded, 0 reused", "text cache: 8 encoded, 0 reused"]


def test_a_random_crop_turns_off_the_text_cache_of_a_model_that_reads_its_controls():
    """Its prompts are read with controls that a random crop changes every epoch; said before any weights load."""
    cfg = parse_parameters({"model_name": "m", "dataset_name": "d", "adaptor_name": "a", "center_crop": False})
    said = []
    resolved = resolve_caching(cfg, said.append, text_reads_controls=True)
    assert not resolved.cache_latents and not resolved.cache_text_embeddings
    assert any(line.startswith("cache_text_embeddings: off, because the text encoder reads the control images") for line in said), said
    assert resolve_caching(cfg, said.append).cache_text_embeddings  # text read alone is the same every epoch


@pytest.mark.parametrize("name, image_tokens", [("qwen_image_edit", 4), ("qwen_image_edit_plus", 3 * 16)])
def test_the_memory_plan_counts_the_vls_tokens_of_each_control_and_other_sizes_are_warned(name, image_tokens, tiny_models, pair_data, tmp_path):
    """The planner's prompt: 512 tokens and, per control the model takes, 28 px merged patches of the control as the
    VL reads it: Edit's one at 64² (2 x 2), Plus's three at 384² capped by the processor's 16 patches (4 x 4). A
    control resolution other than the pipelines' 1024 is said."""
    model = str(tiny_models[name])
    family = load_model(model, torch.float32)
    with pytest.warns(UserWarning, match=r"control_resolution: 64: .* pipelines give controls about 1024x1024 pixels"):
        family.configure(parse_parameters(edit_parameters(model, pair_data, tmp_path)))
    assert family.planning_text(2)["encoder_hidden_states"].shape[:2] == (2, 512 + image_tokens)
