"""Edit models train on pairs: a control image per target (control_dir or a control_image column), following the
target's plan, encoded (or cached) beside it, and packed into the denoiser's input as the edit pipeline packs it.
The tiny Flux Kontext is checked against FluxKontextPipeline at one step; on pairs whose targets are their controls
mirrored it learns what the controls tell (its held-out loss is lower with each target's own control than with
another's) and its adapter loads into the pipeline; cached and uncached controls train the same adapter; bad pair
datasets are refused, or said, before any weights load. (The tiny edit models' VAEs are normalised as trained ones
are, see `tiny._latent_statistics`: a random VAE's latents barely differ from image to image, and nothing a control
holds would be worth learning.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import base_parameters, final_eval_image, heldout_losses, load_fresh, render
from plugin.cache import CONTROLS
from plugin.config import parse_parameters
from plugin.data.controls import Pairing
from plugin.data.mixing import DatasetSpec, load_source, load_sources
from plugin.errors import ConfigError
from plugin.evaluation import eval_control_paths, image_grid, side_by_side
from plugin.export import WEIGHTS_NAME
from plugin.families import load_model
from plugin.families.flux import pack_latents
from plugin.data import apply_plan
from plugin.trainer import RunPaths, build_examples, train
from test_conditioning import PROMPTS, assert_identical, denoiser_inputs


def pair_parameters(tiny_models, pair_data, output, **overrides) -> dict:
    return base_parameters(tiny_models["flux_kontext"], pair_data, output, control_dir=str(pair_data / "controls"), **overrides)


def test_kontexts_denoiser_inputs_at_a_step_are_the_pipelines(tiny_models, pair_data, tmp_path):
    model = tiny_models["flux_kontext"]
    cfg, _ = (family := load_model(str(model), torch.float32)).configure(parse_parameters(pair_parameters(tiny_models, pair_data, tmp_path,
                                                                                                           guidance_scale=3.5, resolution=16)))  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    latents, controls = (torch.randn(len(PROMPTS), 4, 8, 8, generator=generator) for _ in range(2))
    pipe = load_fresh(model)
    theirs = denoiser_inputs(pipe.transformer, lambda: pipe(prompt=list(PROMPTS), image=controls, latents=pack_latents(latents), height=16, width=16,
                                                            num_inference_steps=2, output_type="latent", guidance_scale=cfg.guidance_scale, max_area=16 * 16))  # fmt: skip
    timestep = pipe.scheduler.timesteps[:1].expand(len(PROMPTS))
    text = {**family.encode_prompts(PROMPTS), CONTROLS: controls[:, None]}
    ours = denoiser_inputs(family.denoiser, lambda: family.predict(latents, timestep, text, batch={}))
    assert ours["hidden_states"].shape[1] == 2 * 16  # the target's 16 tokens, then the control's
    assert sorted(ours) == sorted(theirs)
    for name, value in theirs.items():
        assert_identical(ours[name], value, name)


def test_kontext_trains_on_pairs_and_its_adapter_edits_in_the_pipeline(tiny_models, pair_data, heldout_pairs, tmp_path):
    """Also the evaluation of edits: eval_control_image's control is edited by each prompt, saved beside the results,
    set left of each in the grid, and shown in the card, whose code is the edit pipeline's call."""
    model, control_file = tiny_models["flux_kontext"], heldout_pairs / "controls" / "0000.png"
    cfg = parse_parameters(pair_parameters(tiny_models, pair_data, tmp_path / "out", max_train_steps=300, learning_rate=1e-2, lora_r=8, seed=3,
                                           eval_prompt="mirror the picture\nmirror it --d 5", eval_control_image=str(control_file)))  # fmt: skip
    result = train(cfg, paths := RunPaths.for_config(cfg), log=lambda *_: None)
    held_out = cfg.replace(control_dir="")  # the held-out pairs name their controls in a control_image column
    assert_learnt_from_the_controls(model, held_out, heldout_pairs, paths.adapter_dir, tmp_path / "swapped")

    pipe = load_fresh(model)
    control = Image.open(control_file).convert("RGB").resize((32, 32), Image.Resampling.LANCZOS)
    edit = lambda: render(pipe, "mirror the picture", cfg.eval_seed, image=control, num_inference_steps=4, guidance_scale=2.0, height=32, width=32)  # noqa: E731
    base = edit()
    pipe.load_lora_weights(str(paths.adapter_dir))  # Diffusers' own loader, into the edit pipeline
    edited = edit()
    assert np.abs(edited - base).max() > 8
    assert np.abs(final_eval_image(result) - edited).max() <= 1  # the trainer's evaluation is the pipeline's edit
    folder = paths.run_dir / "eval_images"
    assert np.array_equal(np.asarray(Image.open(folder / "control_1.png")), np.asarray(control))  # saved at the size it was edited at
    assert Image.open(result.eval_images[-1]).size == (2 * 2 * 32, 32)  # [control | edit] per prompt, side by side
    card = (paths.adapter_dir / "README.md").read_text()
    assert "FluxKontextPipeline.from_pretrained" in card and f"image=load_image({str(control_file)!r})" in card


def assert_learnt_from_the_controls(model, cfg, held_out, adapter_dir, scratch) -> None:
    """The held-out loss falls by more than 5 %, and is more than 2 % lower with each target's own controls than with
    another target's: the adapter learnt what the controls tell, not only what the targets look like."""
    before, after = heldout_losses(model, cfg, held_out), heldout_losses(model, cfg, held_out, adapter_dir)
    assert after.objective < 0.95 * before.objective and after.plain_mse < 0.95 * before.plain_mse, (before, after)
    swapped = shutil.copytree(held_out, scratch)
    for folder in {path.parent for path in swapped.glob("*/*.png")}:  # each control folder's files passed one along
        files = sorted(folder.glob("*.png"))
        contents = [file.read_bytes() for file in files]
        for file, content in zip(files, contents[1:] + contents[:1]):
            file.write_bytes(content)
    swapped_cfg = cfg.replace(control_dir=",".join(str(swapped / Path(path).relative_to(held_out)) for path in cfg.control_dir.split(",") if path))
    others = heldout_losses(model, swapped_cfg, swapped, adapter_dir)
    assert after.objective < 0.98 * others.objective and after.plain_mse < 0.98 * others.plain_mse, (after, others)


def test_eval_control_images_are_checked_before_loading(tiny_models, pair_data, sample_data, tmp_path):
    assert eval_control_paths("a.png | b.png,\n c.png, |, ") == [["a.png", "b.png"], ["c.png"]]  # entries, each its references
    cases = [(pair_parameters(tiny_models, pair_data, tmp_path, eval_control_image=str(tmp_path / "nowhere.png")), r"eval_control_image: '.*nowhere\.png' cannot be read"),
             (pair_parameters(tiny_models, pair_data, tmp_path, eval_prompt="a\nb\nc", eval_control_image=f"{pair_data / '0000.png'}, {pair_data / '0001.png'}"),
              r"eval_control_image: 2 entries for 3 eval_prompt lines"),
             (pair_parameters(tiny_models, pair_data, tmp_path, eval_control_image=f"{pair_data / '0000.png'}|{pair_data / '0001.png'}"),
              r"eval_control_image: an entry of 2 references; Flux Kontext models take at most 1"),
             (base_parameters(tiny_models["qwen_image_edit"], pair_data, tmp_path, control_dir=str(pair_data / "controls")),
              r"eval_control_image: Qwen-Image-Edit's pipeline renders edits of a control image only"),
             (pair_parameters(tiny_models, pair_data, tmp_path, datasets=[{"path": str(tmp_path / "class"), "is_regularization": True,
                                                                           "class_prompt": "a picture", "num_class_images": 4}]),
              r"datasets\[0\].num_class_images: Flux Kontext models train on pairs, and rendered class images have no controls"),
             (base_parameters(tiny_models["flux"], sample_data, tmp_path, eval_control_image=str(pair_data / "0000.png")),
              r"eval_control_image: Flux models take no control image")]  # fmt: skip
    for parameters, message in cases:
        cfg = parse_parameters(parameters)
        with pytest.raises(ConfigError, match=message):
            train(cfg, RunPaths.for_config(cfg), log=lambda *_: None)


def test_cached_and_uncached_controls_train_the_same_adapter(tiny_models, pair_data, tmp_path):
    adapters = []
    for cached in (True, False):
        cfg = parse_parameters(pair_parameters(tiny_models, pair_data, tmp_path / f"out-{cached}", max_train_steps=4, cache_latents=cached))
        train(cfg, paths := RunPaths.for_config(cfg), log=lambda *_: None)
        adapters.append(load_file(paths.adapter_dir / WEIGHTS_NAME))
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])


def load_pairs(folder, **settings):
    cfg = parse_parameters({"model_name": "m", "dataset_name": str(folder), "adaptor_name": "a", **settings})
    return load_source(DatasetSpec(str(folder), 1, False, cfg, "dataset_name"), Pairing(references=1))


def test_a_pair_dataset_loads_its_controls_from_a_folder_or_a_column(pair_data, heldout_pairs):
    by_folder = load_pairs(pair_data, control_dir=str(pair_data / "controls"))
    by_column = load_pairs(heldout_pairs)
    for source, folder in ((by_folder, pair_data), (by_column, heldout_pairs)):
        assert source.controls.references == 1
        assert [row[0] for row in source.controls.values] == [str(folder / "controls" / f"{i:04d}.png") for i in range(8)]


def test_bad_pair_datasets_are_named_before_any_weights_load(pair_data, tmp_path):
    data = shutil.copytree(pair_data, tmp_path / "pairs")
    (data / "controls" / "0003.png").unlink()
    with pytest.raises(ConfigError, match=r"control_dir: 1 of 8 images of dataset_name have no control in .*: 0003\.png"):
        load_pairs(data, control_dir=str(data / "controls"))
    with pytest.raises(ConfigError, match=r"dataset_name: no control images; this model trains on pairs"):
        load_pairs(data)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    (data / "metadata.jsonl").write_text("".join(json.dumps({**row, "control_image": row["file_name"]}) + "\n" for row in rows))
    with pytest.raises(ConfigError, match=r"the control '.*0000\.png' is given twice for the target .*0000\.png \(or is the target itself\)"):
        load_pairs(data)
    (data / "metadata.jsonl").write_text("".join(json.dumps({**row, "control_image": "controls/missing.png"}) + "\n" for row in rows))
    with pytest.raises(ConfigError, match=r"the control file 'controls/missing\.png' does not exist"):
        load_pairs(data)


def test_extra_control_files_and_controls_of_another_size_are_said_once(pair_data, tmp_path):
    data = shutil.copytree(pair_data, tmp_path / "pairs")
    Image.new("RGB", (8, 8)).save(data / "controls" / "unpaired.png")
    Image.open(data / "controls" / "0002.png").resize((48, 40)).save(data / "controls" / "0002.png")
    with pytest.warns(UserWarning) as warned:
        source = load_pairs(data, control_dir=str(data / "controls"))
    messages = [str(w.message) for w in warned]
    assert any("1 files in" in m and "match no image of dataset_name and are left out: unpaired.png" in m for m in messages), messages
    assert any("1 control images differ in size from their target and are resized to it" in m for m in messages), messages
    assert source.controls.images(2, (64, 64))[0].size == (64, 64)


@pytest.mark.parametrize("setting", [{"control_dir": "."}, {"control_resolution": 512}])
def test_a_model_that_takes_no_controls_refuses_control_settings(setting, tiny_models, sample_data, tmp_path):
    cfg = parse_parameters(base_parameters(tiny_models["flux"], sample_data, tmp_path, **setting))
    with pytest.raises(ConfigError, match=rf"{next(iter(setting))}: Flux models take no control images"):
        train(cfg, RunPaths.for_config(cfg), log=lambda *_: None)


def two_references(pairs, folder):
    """The pair dataset at `folder` with a second reference per target: a copy of each control, greyed."""
    data = shutil.copytree(pairs, folder)
    (data / "greyed").mkdir()
    for control in sorted((data / "controls").glob("*.png")):
        Image.open(control).convert("L").convert("RGB").save(data / "greyed" / control.name)
    return data, f"{data / 'controls'},{data / 'greyed'}"


def test_flux2s_reference_images_reach_the_denoiser_as_the_pipeline_gives_them(tiny_models, sample_data, tmp_path):
    model = tiny_models["flux2"]
    family = load_model(str(model), torch.float32)
    family.configure(parse_parameters(base_parameters(model, sample_data, tmp_path, resolution=64)))
    pipe = load_fresh(model)
    references = [Image.open(sample_data / f"000{k}.png").convert("RGB") for k in range(2)]  # 64 px: the pipelines' smallest reference
    controls = torch.stack([family.encode_images(pipe.image_processor.preprocess(image, 64, 64, resize_mode="crop"))[0] for image in references])
    latents = torch.randn(len(PROMPTS), *controls.shape[1:], generator=torch.Generator().manual_seed(0))
    theirs = denoiser_inputs(pipe.transformer, lambda: pipe(prompt=list(PROMPTS), image=references, latents=latents, height=64, width=64,
                                                            num_inference_steps=2, output_type="latent", guidance_scale=1.0))  # fmt: skip
    timestep = pipe.scheduler.timesteps[:1].expand(len(PROMPTS))
    text = {**family.encode_prompts(PROMPTS), CONTROLS: controls.expand(len(PROMPTS), -1, -1, -1, -1)}
    ours = denoiser_inputs(family.denoiser, lambda: family.predict(latents, timestep, text, batch={}))
    assert ours["hidden_states"].shape[1] == 3 * 16 * 16  # the target's tokens, then each reference's
    assert sorted(ours) == sorted(theirs)
    for name, value in theirs.items():
        assert_identical(ours[name], value, name)


def test_flux2_trains_on_two_references_per_target_and_its_adapter_edits_in_the_pipeline(tiny_models, pair_data, heldout_pairs, tmp_path):
    model = tiny_models["flux2"]
    data, folders = two_references(pair_data, tmp_path / "pairs")
    cfg = parse_parameters(base_parameters(model, data, tmp_path / "out", control_dir=folders, max_train_steps=40, learning_rate=1e-2, lora_r=8, seed=3))
    train(cfg, paths := RunPaths.for_config(cfg), log=lambda *_: None)
    held_out, held_out_folders = two_references(heldout_pairs, tmp_path / "heldout")
    held_out_cfg = cfg.replace(control_dir=held_out_folders)
    before, after = heldout_losses(model, held_out_cfg, held_out), heldout_losses(model, held_out_cfg, held_out, paths.adapter_dir)
    assert after.objective < 0.95 * before.objective and after.plain_mse < 0.95 * before.plain_mse, (before, after)
    pipe = load_fresh(model)
    references = [Image.open(held_out / folder / "0000.png").convert("RGB") for folder in ("controls", "greyed")]
    edit = lambda: render(pipe, "mirror the picture", 0, image=references, num_inference_steps=4, guidance_scale=2.0, height=64, width=64)  # noqa: E731
    base = edit()
    pipe.load_lora_weights(str(paths.adapter_dir))
    assert np.abs(edit() - base).max() > 8


def test_datasets_of_one_run_agree_on_their_references(pair_data, sample_data):
    """Flux.2 takes references where a dataset gives them; examples of two datasets may share a batch, so a run's
    datasets all give the same number, or none."""
    cfg = parse_parameters({"model_name": "m", "adaptor_name": "a", "datasets": [{"path": str(pair_data), "control_dir": str(pair_data / "controls")},
                                                                                  {"path": str(sample_data)}]})  # fmt: skip
    with pytest.raises(ConfigError, match=r"datasets\[1\]: 0 control images per target, and datasets\[0\] has 1; every dataset of a run needs the same"):
        load_sources(cfg, None, Pairing(10, True))
    assert [source.controls for source in load_sources(cfg.replace(datasets=cfg.datasets[1:], dataset_name=""), None, Pairing(10, True))] == [None]


def test_a_control_follows_its_targets_flip_and_crop_and_caption_dropout_spares_it(pair_data):
    """With random flips and crops, each example's control is its target's plan applied to the control image: the
    mirror task's pairs stay mirror images of each other, flipped or not; with every caption dropped the controls stay."""
    cfg = parse_parameters({"model_name": "m", "dataset_name": str(pair_data), "adaptor_name": "a", "control_dir": str(pair_data / "controls"),
                            "resolution": 48, "random_flip": True, "center_crop": False, "caption_dropout_rate": 1.0, "cache_latents": False})  # fmt: skip
    items = items_over_epochs(build_examples(cfg, load_sources(cfg, None, Pairing(1))))
    for item in items:
        assert item["caption"] == "" and item["control_pixel_values"].shape == (1, 3, 48, 48)
        control = Image.open(pair_data / "controls" / f"{item['row']:04d}.png").convert("RGB")
        assert torch.equal(item["control_pixel_values"][0], apply_plan(control, item["plan"]))
    assert {item["plan"].flip for item in items} == {False, True}


def items_over_epochs(examples, epochs: int = 3) -> list[dict]:
    """Every example of `epochs` epochs, as each epoch draws it."""
    items = []
    for epoch in range(epochs):
        examples.set_epoch(epoch)
        items += [examples[index] for index in range(len(examples))]
    return items


@pytest.mark.parametrize("example", ["flux_kontext_edit.json", "qwen_image_edit_plus.json"])
def test_the_edit_examples_are_valid_parameter_files(example):
    cfg = parse_parameters(json.loads((Path(__file__).resolve().parent.parent / "examples" / example).read_text()))
    assert cfg.control_dir and cfg.eval_control_image and cfg.memory_plan == "auto"


def test_the_evaluation_grid_keeps_each_image_whole_whatever_its_size():
    """Prompts of their own sizes (--w/--h) and edits beside their controls: each cell is as large as the largest image."""
    colours = iter(range(40, 250, 40))
    result, control = (Image.new("RGB", (32, 32), (next(colours),) * 3) for _ in range(2))
    images = [result, side_by_side(control, result), Image.new("RGB", (48, 40), (next(colours),) * 3)]
    grid = image_grid(images)
    assert grid.size == (3 * 64, 40)
    for k, image in enumerate(images):
        assert np.array_equal(np.asarray(grid.crop((64 * k, 0, 64 * k + image.width, image.height))), np.asarray(image))
    assert np.array_equal(np.asarray(images[1].crop((0, 0, 32, 32))), np.asarray(control))  # the control left of its result
