"""Datasets as users keep them: several datasets with repeats, kohya's `<repeats>_<name>` folders, regularisation
images weighed by prior_loss_weight, and masked loss; each checked by what a run does with them."""

from __future__ import annotations

import json
import shutil
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import base_parameters
from plugin.buckets import BucketBatchSampler
from plugin.config import parse_parameters
from plugin.data import plan_transform
from plugin.data.mixing import load_sources, slot_rows
from plugin.data.transforms import AugmentOptions, apply_plan, apply_plan_to_mask
from plugin.errors import ConfigError
from plugin.export import WEIGHTS_NAME
from plugin.objectives import element_weights, per_sample_loss
from plugin.tiny import write_sample_dataset
from plugin.trainer import RunPaths, bucket_layout, build_examples, train


def config(tiny_models, data: Path, out: Path, **overrides):
    return parse_parameters(base_parameters(tiny_models["sd"], data, out, eval_prompt="", **overrides))


def trained(cfg) -> tuple[dict, object]:
    paths = RunPaths.for_config(cfg)
    result = train(cfg, paths, log=lambda *_: None)
    return load_file(str(paths.adapter_dir / WEIGHTS_NAME)), result


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def kohya_parent(tmp_path) -> Path:
    """A kohya dataset folder: 3 circles-and-squares images visited 3 times an epoch, 2 others once."""
    parent = tmp_path / "kohya"
    write_sample_dataset(parent / "3_sks shapes", n=3, seed=1)
    write_sample_dataset(parent / "1_shapes", n=2, seed=2)
    return parent


# --- several datasets and repeats --------------------------------------------------------------------------


def test_repeats_draw_each_image_their_number_of_times_an_epoch(tiny_models, kohya_parent, tmp_path):
    cfg = config(tiny_models, kohya_parent, tmp_path, train_batch_size=2)
    sources = load_sources(cfg)
    assert [(Path(s.spec.path).name, s.spec.repeats) for s in sources] == [("1_shapes", 1), ("3_sks shapes", 3)]
    rows = slot_rows(sources)
    sampler = BucketBatchSampler([0] * len(rows), 2, cfg.seed)
    for epoch in range(3):
        visits = Counter(rows[i] for batch in sampler.batches(epoch) for i in batch)
        assert [visits[row] for row in range(5)] == [1, 1, 3, 3, 3], "each image of 3_... three times, of 1_... once"
    assert sum(visits[row] for row in (2, 3, 4)) / sum(visits[row] for row in (0, 1)) == 9 / 2  # 3:1 per image


def test_kohya_folder_names_train_what_the_explicit_list_trains(tiny_models, kohya_parent, tmp_path):
    from_folders = config(tiny_models, kohya_parent, tmp_path / "a", max_train_steps=6)
    listed = config(tiny_models, kohya_parent / "1_shapes", tmp_path / "b", max_train_steps=6,
                    datasets=[{"path": str(kohya_parent / "3_sks shapes"), "repeats": 3}])  # fmt: skip
    assert slot_rows(load_sources(from_folders)) == slot_rows(load_sources(listed)) == [0, 1, 2, 3, 4, 2, 3, 4, 2, 3, 4]
    (adapter_a, result_a), (adapter_b, _) = trained(from_folders), trained(listed)
    assert same(adapter_a, adapter_b) and result_a.steps == 6
    card = (result_a.adapter_path.parent / "README.md").read_text()
    assert f"| `{kohya_parent / '3_sks shapes'}` | 3 | 3 | 9 | 82% | training |" in card  # images, repeats, examples, share


def test_a_kohya_folder_without_caption_files_captions_with_its_name(tiny_models, tmp_path):
    folder = tmp_path / "data" / "5_sks dog"
    folder.mkdir(parents=True)
    Image.new("RGB", (40, 32), "red").save(folder / "a.png")
    (folder / "b.txt").write_text("a dog on grass")
    Image.new("RGB", (40, 32), "blue").save(folder / "b.png")
    (source,) = load_sources(config(tiny_models, tmp_path / "data", tmp_path))
    assert source.spec.repeats == 5 and source.dataset["text"] == ["sks dog", "a dog on grass"]


def test_each_dataset_keeps_its_own_settings_and_the_table_lists_them(tiny_models, kohya_parent, sample_data, tmp_path):
    from plugin.families import open_model
    from plugin.data.mixing import dataset_table

    cfg = config(tiny_models, sample_data, tmp_path, trigger_word="main",
                 datasets=[{"path": str(kohya_parent / "1_shapes"), "trigger_word": "other", "resolution": 16, "repeats": 2}])  # fmt: skip
    sources = load_sources(cfg)
    logged = []
    layout = bucket_layout(open_model(cfg.model_name), sources, logged.append)
    examples = build_examples(cfg, sources, layout)
    assert {layout.targets[row] for row in range(8)} == {(32, 32)} and {layout.targets[row] for row in (8, 9)} == {(16, 16)}
    captions = [examples[i]["caption"] for i in range(len(examples))]  # rows 8 and 9 twice
    assert all(c.startswith("main") for c in captions[:8]) and all(c.startswith("other") for c in captions[8:])
    table = dataset_table(sources, examples.slot_rows)
    assert [(t["images"], t["repeats"], t["examples"]) for t in table] == [(8, 1, 8), (2, 2, 4)]
    assert [round(t["share"], 3) for t in table] == [0.667, 0.333]


def cutouts(folder: Path, count: int) -> Path:
    """Subjects cut out of their background: RGBA images whose alpha (a bar at another place in each) is their mask."""
    folder.mkdir(parents=True)
    rows = []
    for i in range(count):
        image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
        image.paste((255, 40 * i, 0, 255), (8 * i, 8, 8 * i + 32, 56))
        image.save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": "a cut-out"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def test_a_run_over_several_datasets_with_masks_resumes_exactly(tiny_models, kohya_parent, tmp_path):
    """Repeats, a regularisation dataset and masked loss (its alpha masks): stopped after a checkpoint (the later
    one deleted) and resumed, the run ends with the unbroken run's adapter."""
    cfg = config(tiny_models, kohya_parent, tmp_path / "out", max_train_steps=12, checkpointing_steps=5, train_batch_size=2,
                 datasets=[{"path": str(cutouts(tmp_path / "class", 3)), "is_regularization": True}], prior_loss_weight=0.5,
                 masked_loss=True, masked_loss_floor=0.25)  # fmt: skip
    unbroken, _ = trained(cfg)
    shutil.rmtree(RunPaths.for_config(cfg).run_dir / "checkpoints" / "step_10")
    resumed, result = trained(cfg.replace(resume_from_checkpoint="latest"))
    assert result.steps == 12 and len(result.losses) == 7
    assert same(unbroken, resumed)


# --- regularisation images ---------------------------------------------------------------------------------


def test_regularisation_images_balance_to_the_training_examples_as_kohya_does(tiny_models, kohya_parent, tmp_path):
    few = write_sample_dataset(tmp_path / "few", n=4, seed=6)  # 11 training examples: 4 images, one extra visit each...
    cfg = config(tiny_models, kohya_parent, tmp_path, datasets=[{"path": str(few), "is_regularization": True}])
    rows = Counter(slot_rows(load_sources(cfg)))
    assert [rows[row] for row in range(5, 9)] == [3, 3, 3, 2], "...in turn until they match"
    many = write_sample_dataset(tmp_path / "many", n=14, seed=7)  # more than needed: the first 11 once, the rest not
    cfg = config(tiny_models, kohya_parent, tmp_path, datasets=[{"path": str(many), "is_regularization": True}])
    rows = Counter(slot_rows(load_sources(cfg)))
    assert [rows[row] for row in range(5, 19)] == [1] * 11 + [0] * 3


def test_prior_loss_weight_weighs_the_regularisation_images_loss(tiny_models, sample_data, tmp_path):
    """At weight 0 the adapter does not depend on the regularisation images at all (other images, same sizes:
    the same adapter to the bit); at weight 1 it does."""
    class_a = write_sample_dataset(tmp_path / "class_a", n=4, seed=11)
    class_b = write_sample_dataset(tmp_path / "class_b", n=4, seed=12)
    adapters = {}
    for weight in (0.0, 1.0):
        for name, folder in (("a", class_a), ("b", class_b)):
            cfg = config(tiny_models, sample_data, tmp_path / f"{weight}{name}", prior_loss_weight=weight, max_train_steps=8,
                         datasets=[{"path": str(folder), "is_regularization": True}])  # fmt: skip
            adapters[weight, name] = trained(cfg)[0]
    assert same(adapters[0.0, "a"], adapters[0.0, "b"])
    assert not same(adapters[1.0, "a"], adapters[1.0, "b"])
    assert not same(adapters[0.0, "a"], adapters[1.0, "a"])


def flat_images(folder: Path, count: int, seed: int, low: int, high: int) -> Path:
    """Noisy images of one brightness (pixels uniform in [low, high)), all captioned "a photo"."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        Image.fromarray(rng.integers(low, high, (64, 64, 3)).astype(np.uint8)).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": "a photo"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def test_prior_preservation_keeps_the_class_loss_lower(tiny_models, tmp_path):
    """DreamBooth's drift, in small: trained on bright photos, "a photo" drifts from the dark photos the model
    knew; with dark regularisation photos (weight 1) the validation loss on held-out dark photos ends lower
    than without them (5% on this model: SD3's flow target, noise − x0, carries the image)."""
    bright = flat_images(tmp_path / "bright", 8, seed=0, low=200, high=256)
    common = dict(max_train_steps=40, learning_rate=1e-2, eval_steps=1000,
                  validation_dataset=str(flat_images(tmp_path / "held", 4, seed=1, low=0, high=56)))  # fmt: skip
    runs = {"without": {}, "with": {"datasets": [{"path": str(flat_images(tmp_path / "class", 8, seed=2, low=0, high=56)),
                                                  "is_regularization": True}]}}  # fmt: skip
    losses = {}
    for name, overrides in runs.items():
        cfg = parse_parameters(base_parameters(tiny_models["sd3"], bright, tmp_path / name, eval_prompt="", **common, **overrides))
        train(cfg, RunPaths.for_config(cfg), log=lambda *_: None)
        losses[name] = json.loads((RunPaths.for_config(cfg).run_dir / "validation_loss.json").read_text())
    assert losses["with"][0] == losses["without"][0], "the same base model measured on the same held-out photos"
    gap = losses["without"][-1]["loss"] - losses["with"][-1]["loss"]
    assert gap > 0.02 * losses["without"][-1]["loss"], losses


def test_missing_class_images_are_rendered_once_and_reused(tiny_models, sample_data, tmp_path, monkeypatch):
    """num_class_images with a class_prompt: the base model renders what the folder lacks (image k seeded with
    seed + k, so the same in another folder), with its prompt as caption; a later run renders nothing."""
    from plugin import class_images

    def entry(folder: Path) -> dict:
        return {"path": str(folder), "is_regularization": True, "class_prompt": "a photo of a shape", "num_class_images": 3}

    folder = tmp_path / "class"
    folder.mkdir()
    Image.new("RGB", (32, 32), "gray").save(folder / "mine.png")  # one the user already has
    cfg = config(tiny_models, sample_data, tmp_path / "a", max_train_steps=2, eval_num_inference_steps=2, datasets=[entry(folder)])
    _, result = trained(cfg)
    rendered = sorted(p.name for p in folder.iterdir())
    assert rendered == ["class_00001.png", "class_00001.txt", "class_00002.png", "class_00002.txt", "mine.png"]
    assert (folder / "class_00001.txt").read_text() == "a photo of a shape\n" and Image.open(folder / "class_00002.png").size == (32, 32)
    assert result.steps == 2

    other = tmp_path / "other"
    trained(config(tiny_models, sample_data, tmp_path / "b", max_train_steps=1, eval_num_inference_steps=2,
                   datasets=[{**entry(other), "num_class_images": 2}]))  # fmt: skip
    assert not np.array_equal(np.asarray(Image.open(other / "class_00000.png")), np.asarray(Image.open(other / "class_00001.png")))
    (other / "class_00000.png").unlink()
    (other / "class_00000.txt").unlink()
    trained(config(tiny_models, sample_data, tmp_path / "c", max_train_steps=1, eval_num_inference_steps=2, datasets=[entry(other)]))
    assert np.array_equal(np.asarray(Image.open(other / "class_00001.png")), np.asarray(Image.open(folder / "class_00001.png")))

    monkeypatch.setattr(class_images, "render_images", lambda *_: pytest.fail("rendered again"))
    trained(config(tiny_models, sample_data, tmp_path / "d", max_train_steps=1, datasets=[entry(folder)]))


# --- masked loss -------------------------------------------------------------------------------------------


def test_masked_loss_is_the_mean_over_the_weighted_elements():
    prediction, target = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    mask = torch.zeros(2, 1, 12, 12)
    mask[:, :, :, :6] = 1.0  # the left half of the pixels
    weights = element_weights(mask, target)
    assert weights.shape == (2, 1, 6, 6) and torch.equal(weights[..., :3], torch.ones(2, 1, 6, 3)) and not weights[..., 3:].any()
    expected = ((prediction - target) ** 2)[..., :3].flatten(1).mean(1)
    torch.testing.assert_close(per_sample_loss(prediction, target, "l2", element_weights=weights), expected)
    torch.testing.assert_close(per_sample_loss(prediction, target, "l2", element_weights=torch.ones(2, 1, 6, 6)),
                               per_sample_loss(prediction, target, "l2"))  # fmt: skip
    edge = torch.zeros(1, 1, 12, 12)
    edge[..., :, :3] = 1.0  # a quarter: latent cells of two pixels count half
    assert element_weights(edge, target[:1])[0, 0, 0].tolist() == [1.0, 0.5, 0, 0, 0, 0]


@pytest.mark.parametrize("floor", [0.0, 0.5])
def test_at_floor_zero_the_masked_out_pixels_do_not_reach_the_loss_or_its_gradient(tiny_models, floor):
    """Flux's flow target holds the image (noise − x0): what the masked-out latents hold changes neither the loss
    nor its gradient at floor 0, and changes both at floor 0.5. (The denoiser sees the whole image either way,
    as context for the pixels that count.)"""
    from plugin.denoising import denoising_loss, sample_generators
    from plugin.families import load_model

    family = load_model(str(tiny_models["flux"]), torch.float32)
    family.configure(parse_parameters({"model_name": "m", "adaptor_name": "a", "dataset_name": "d"}))
    objective = family.make_objective()
    prediction = torch.randn(1, 16, 8, 8, requires_grad=True)
    family.predict = lambda *_: prediction
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :32] = 1.0
    latents = torch.randn(1, 16, 8, 8)
    changed = latents.clone()
    changed[..., 4:] = torch.randn(1, 16, 8, 4)
    results = []
    for x0 in (latents, changed):
        prediction.grad = None
        batch = {"indices": torch.tensor([0]), "loss_weights": torch.ones(1), "masks": floor + (1 - floor) * mask}
        loss, _ = denoising_loss(family, objective, lambda _, x0=x0: (x0, {}, batch["masks"]), batch, sample_generators(0, 0, [0]))
        loss.backward()
        results.append((loss.detach(), prediction.grad.clone()))
    (loss_a, grad_a), (loss_b, grad_b) = results
    assert bool(grad_a[..., 4:].abs().sum() > 0) == (floor > 0)
    assert torch.equal(loss_a, loss_b) == (floor == 0) and torch.equal(grad_a, grad_b) == (floor == 0)


def test_a_mask_follows_its_image_through_rotation_flip_and_crop():
    """An asymmetric mask drawn into the image's red channel: after any plan, the planned mask is that channel."""
    mask = Image.new("L", (60, 40), 0)
    mask.paste(255, (5, 5, 25, 15))
    mask.paste(128, (40, 20, 58, 38))
    image = Image.merge("RGB", (mask, Image.new("L", mask.size, 0), Image.new("L", mask.size, 0)))
    options = AugmentOptions(resolution=24, center_crop=False, random_flip=True, interpolation="bilinear", color_jitter=False,
                             brightness=0, contrast=0, saturation=0, hue=0, random_rotation=True, rotation_degrees=20.0, rotation_prob=0.5)  # fmt: skip
    import random

    flips = rotations = 0
    for seed in range(24):
        plan = plan_transform((40, 60), (24, 32), options, random.Random(seed))
        flips, rotations = flips + plan.flip, rotations + (plan.rotation is not None)
        red = (apply_plan(image, plan)[0] + 1) / 2
        assert (red - apply_plan_to_mask(mask, plan)[0]).abs().max() <= 1.5 / 255
    assert flips and rotations and flips < 24


def test_masks_from_alpha_train_the_same_with_and_without_the_latent_cache(tiny_models, tmp_path):
    """Cached, a mask is stored area-averaged with its latents; uncached it is averaged at the loss: the same
    losses. And the mask matters: the run without masked loss has other losses."""
    data = cutouts(tmp_path / "cutouts", 4)
    runs = {}
    for name, overrides in {"cached": {}, "uncached": {"cache_latents": False}, "unmasked": {"masked_loss": False}}.items():
        cfg = config(tiny_models, data, tmp_path / name, **{"masked_loss": True, "max_train_steps": 4, **overrides})
        result = trained(cfg)[1]
        assert result.cache_counts.get("latents", (0, 0))[0] == (0 if name == "uncached" else 4)
        runs[name] = result.losses
    np.testing.assert_allclose(runs["cached"], runs["uncached"], rtol=1e-4)
    assert not np.allclose(runs["cached"], runs["unmasked"], rtol=1e-2)


# --- bad input, before any weights load --------------------------------------------------------------------


def test_bad_dataset_settings_are_named_before_the_model_loads(tiny_models, kohya_parent, sample_data, tmp_path, monkeypatch):
    from plugin.families.base import ModelFamily

    monkeypatch.setattr(ModelFamily, "load", lambda *_: pytest.fail("weights loaded before the check"))
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.new("L", (64, 64), 255).save(masks / "0000.png")
    idle = tmp_path / "idle"
    shutil.copytree(kohya_parent, idle)
    (idle / "1_shapes").rename(idle / "0_unused")
    cases = [
        ({"datasets": [{"path": str(sample_data), "repeat": 3}]}, r"datasets\[0\]: unknown key 'repeat'; did you mean repeats"),
        ({"datasets": [{"path": str(sample_data), "repeats": 0}]}, r"datasets\[0\].repeats: got 0; expected a whole number of at least 1"),
        ({"datasets": [{"path": str(sample_data), "keep_tokens": -1}]}, r"datasets\[0\]: keep_tokens: -1 is below the minimum"),
        ({"datasets": '[{"path": '}, "datasets: not valid JSON"),
        ({"datasets": {"path": str(sample_data)}}, "datasets: .* expected a list of objects"),
        ({"datasets": ["data/dog"]}, r"datasets\[0\]: got 'data/dog'; expected an object"),
        ({"dataset_name": "", "datasets": []}, "dataset_name: no dataset given"),
        ({"prior_loss_weight": 0.5}, "prior_loss_weight: 0.5 weighs the loss of regularisation images, and no dataset is marked"),
        ({"datasets": [{"path": str(sample_data), "is_regularization": True}], "dataset_name": ""}, "every dataset is marked is_regularization"),
        ({"masked_loss": True, "mask_dir": str(masks)}, r"mask_dir: 7 of 8 images of dataset_name have no mask in .*: 0001.png, 0002.png"),
        ({"datasets": [{"path": str(tmp_path / "nowhere")}]}, r"datasets\[0\]: folder .*nowhere.* does not exist"),
        ({"datasets": [{"path": str(idle)}], "dataset_name": ""}, r"datasets\[0\]: subfolders \['0_unused'\] of .* repeat their images 0 times"),
        ({"datasets": [{"path": "c", "num_class_images": 5, "is_regularization": True}]}, r"datasets\[0\].num_class_images: 5 class images need a class_prompt"),
        ({"datasets": [{"path": "c", "class_prompt": "a dog"}]}, r"datasets\[0\]: class_prompt and num_class_images make regularisation images"),
        ({"datasets": [{"path": str(sample_data), "class_prompt": "a dog", "num_class_images": 20, "is_regularization": True}]},
         r"datasets\[0\]: .* has metadata.jsonl, which would leave the rendered class images out"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            cfg = config(tiny_models, sample_data, tmp_path / "out", **overrides)
            train(cfg, RunPaths.for_config(cfg), log=lambda *_: None)


def test_a_mask_of_another_size_is_resized_and_said(tiny_models, sample_data, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    for i in range(8):
        Image.new("L", (32, 32) if i == 3 else (64, 64), 255).save(masks / f"{i:04d}.png")
    with pytest.warns(UserWarning, match=r"1 of 8 masks of dataset_name differ in size from their image and are resized to it: .*0003.png \(32x32 for 64x64\)"):
        (source,) = load_sources(config(tiny_models, sample_data, tmp_path, masked_loss=True, mask_dir=str(masks)))
    image = Image.new("RGB", (64, 64))
    assert source.masks.mask(source.dataset, 3, image).size == (64, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_sources(config(tiny_models, sample_data, tmp_path, masked_loss=True))  # alpha masks: nothing to say
    assert not [w for w in caught if "masks" in str(w.message)]
