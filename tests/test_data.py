"""Tests for plugin.data: dataset loading and checks, seeded PIL augmentations, captions, batching."""

import codecs
import json
import math
import warnings

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from plugin.data.captions import CaptionOptions, caption_for, caption_variants
from plugin.data import (
    AugmentOptions,
    TrainingExamples,
    collate_examples,
    example_rng,
    load_image_dataset,
    transform_image,
)
from plugin.data.examples import ExampleSource
from plugin.errors import ConfigError


@pytest.fixture(autouse=True)
def _private_hf_cache(tmp_path, monkeypatch):
    """Keep imagefolder's arrow cache out of the user's home."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def noise_image(width=48, height=32, seed=0):
    """A non-trivial RGB image: interpolation, crops and flips all change its pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def write_images(folder, count, size=(12, 10)):
    """Write `count` small PNGs named 0.png, 1.png, ... and return their names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"{i}.png" for i in range(count)]
    for i, name in enumerate(names):
        noise_image(*size, seed=i).save(folder / name)
    return names


def write_jsonl(folder, rows):
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(row) + "\n")


def jsonl_folder(folder, count=3):
    names = write_images(folder, count)
    write_jsonl(folder, [{"file_name": name, "text": f"caption {name}"} for name in names])
    return folder


def augment(**overrides):
    """AugmentOptions with every augmentation off and a deterministic center crop at R=16."""
    values = dict(
        resolution=16,
        center_crop=True,
        random_flip=False,
        interpolation="bicubic",
        color_jitter=False,
        brightness=0.0,
        contrast=0.0,
        saturation=0.0,
        hue=0.0,
        random_rotation=False,
        rotation_degrees=0.0,
        rotation_prob=0.0,
    )
    values.update(overrides)
    return AugmentOptions(**values)


def as_pixels(tensor):
    """(3, H, W) tensor in [-1, 1] back to (H, W, 3) uint8 values."""
    return np.rint((tensor.permute(1, 2, 0).numpy() + 1.0) * 127.5).astype(np.uint8)


def resized(image, resolution, interpolation=Image.Resampling.BICUBIC):
    """The image scaled so its shorter side is `resolution` (what transform_image crops from)."""
    scale = resolution / min(image.size)
    return np.asarray(image.resize((round(image.width * scale), round(image.height * scale)), interpolation))


# --------------------------------------------------------------------------------------------------------
# Loading


def test_imagefolder_with_metadata_jsonl(tmp_path):
    dataset = load_image_dataset(str(jsonl_folder(tmp_path / "data")), "image", "text")
    assert len(dataset) == 3
    assert set(dataset.column_names) == {"image", "text"}
    assert isinstance(dataset[0]["image"], Image.Image)
    assert sorted(dataset["text"]) == ["caption 0.png", "caption 1.png", "caption 2.png"]


def test_imagefolder_with_metadata_csv_and_custom_caption_column(tmp_path):
    folder = tmp_path / "data"
    names = write_images(folder, 2)
    (folder / "metadata.csv").write_text("file_name,prompt\n" + "".join(f"{n},a {n}\n" for n in names))
    dataset = load_image_dataset(str(folder), "image", "prompt")
    assert len(dataset) == 2
    assert set(dataset.column_names) == {"image", "prompt"}


@pytest.mark.parametrize("file_name, message", [
    ("../outside.png", "line 2: file_name '../outside.png' leaves the dataset folder"),
    ("../../etc/passwd", "line 2: file_name '../../etc/passwd' leaves the dataset folder"),
    ("/etc/passwd", "line 2: file_name '/etc/passwd' leaves the dataset folder"),
    ("sub/../../outside.png", "line 2: file_name 'sub/../../outside.png' leaves the dataset folder"),
    ("missing.png", "line 2: file_name 'missing.png' is not a file in the dataset folder"),
])  # fmt: skip
def test_a_metadata_row_naming_a_file_outside_the_folder_or_none_is_refused_with_its_line(file_name, message, tmp_path):
    folder = jsonl_folder(tmp_path / "data", count=2)
    noise_image().save(tmp_path / "outside.png")
    write_jsonl(folder, [{"file_name": "0.png", "text": "a"}, {"file_name": file_name, "text": "b"}])
    with pytest.raises(ConfigError, match=f"dataset_name: .*metadata.jsonl' {message}"):
        load_image_dataset(str(folder), "image", "text")


@pytest.mark.parametrize("layout", ["metadata", "kohya"])
def test_symlinks_out_of_the_dataset_are_followed_only_when_asked(layout, tmp_path):
    outside = tmp_path / "library"
    write_images(outside, 2)
    folder = jsonl_folder(tmp_path / "data", count=2) if layout == "metadata" else tmp_path / "data"
    folder.mkdir(exist_ok=True)
    write_images(folder / "own", 1)
    (folder / "own" / "copy.png").symlink_to(folder / "own" / "0.png")  # a link inside: always fine
    (folder / "linked.png").symlink_to(outside / "1.png")
    (folder / "linked-folder").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ConfigError, match=r"dataset_name: .*(linked.png|linked-folder/\d.png)' is a symbolic link .* to .*library.*"
                                          "outside the dataset folder; set follow_symlinks to true"):  # fmt: skip
        load_image_dataset(str(folder), "image", "text")
    (folder / "linked.png").unlink()
    (folder / "linked-folder").unlink()
    assert len(load_image_dataset(str(folder), "image", "text")) == 2
    (folder / "linked.png").symlink_to(outside / "1.png")
    assert len(load_image_dataset(str(folder), "image", "text", follow_symlinks=True)) == (2 if layout == "metadata" else 3)


def test_kohya_folder_searches_subfolders_and_warns_about_missing_captions(tmp_path):
    folder = tmp_path / "kohya"
    write_images(folder, 2)
    write_images(folder / "10_dog", 1, size=(20, 10))
    (folder / "0.png").with_suffix(".txt").write_text("  a red thing \n")
    (folder / "10_dog" / "0.txt").write_text("a dog")
    with pytest.warns(UserWarning, match="1 of 3 images"):
        dataset = load_image_dataset(str(folder), "image", "text")
    assert len(dataset) == 3
    assert dataset.column_names == ["image", "text"]
    assert isinstance(dataset.features["image"], datasets.Image)
    assert sorted(dataset["text"]) == ["", "a dog", "a red thing"]


def test_kohya_folder_uses_the_configured_column_names(tmp_path):
    folder = tmp_path / "kohya"
    write_images(folder, 1)
    (folder / "0.txt").write_text("hello")
    dataset = load_image_dataset(str(folder), "picture", "prompt")
    assert dataset.column_names == ["picture", "prompt"]
    assert dataset[0]["prompt"] == "hello"
    assert isinstance(dataset[0]["picture"], Image.Image)


def saved_rows(tmp_path):
    paths = [str(tmp_path / "src" / name) for name in write_images(tmp_path / "src", 2)]
    rows = datasets.Dataset.from_dict({"image": paths, "text": ["a", "b"]})
    return rows.cast_column("image", datasets.Image())


def test_save_to_disk_dataset(tmp_path):
    saved_rows(tmp_path).save_to_disk(str(tmp_path / "saved"))
    dataset = load_image_dataset(str(tmp_path / "saved"), "image", "text")
    assert len(dataset) == 2 and dataset["text"] == ["a", "b"]


def test_save_to_disk_dataset_dict_uses_train_split(tmp_path):
    rows = saved_rows(tmp_path)
    datasets.DatasetDict({"train": rows, "test": rows.select([0])}).save_to_disk(str(tmp_path / "saved"))
    dataset = load_image_dataset(str(tmp_path / "saved"), "image", "text")
    assert len(dataset) == 2


def test_save_to_disk_dataset_dict_without_train_lists_splits(tmp_path):
    rows = saved_rows(tmp_path)
    datasets.DatasetDict({"validation": rows, "test": rows}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ConfigError, match=r"no 'train' split.*\['test', 'validation'\]"):
        load_image_dataset(str(tmp_path / "saved"), "image", "text")


# --------------------------------------------------------------------------------------------------------
# Loading errors


@pytest.mark.parametrize("name", ["./no/such/folder", "~/no-such-folder-xyz", "/no/such/folder"])
def test_missing_folder(name):
    with pytest.raises(ConfigError, match="dataset_name: folder .* does not exist"):
        load_image_dataset(name, "image", "text")


def test_missing_folder_under_existing_parent(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_image_dataset(str(tmp_path / "missing"), "image", "text")


def test_hub_failure_is_wrapped(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr("plugin.hub.hub_reachable", lambda: True)
    with pytest.raises(ConfigError, match="dataset_name: 'someone/some-set'.*ConnectionError: no network"):
        load_image_dataset("someone/some-set", "image", "text")
    monkeypatch.setattr("plugin.hub.hub_reachable", lambda: False)  # not even tried: the hub is out of reach
    with pytest.raises(ConfigError, match="dataset_name: 'someone/some-set' is not a local folder, and the Hugging Face hub"):
        load_image_dataset("someone/some-set", "image", "text")


def test_missing_image_column_lists_existing_columns(tmp_path):
    with pytest.raises(ConfigError, match=r"image_column: column 'picture'.*\['image', 'text'\]"):
        load_image_dataset(str(jsonl_folder(tmp_path / "data")), "picture", "text")


def test_missing_caption_column_lists_existing_columns(tmp_path):
    with pytest.raises(ConfigError, match=r"caption_column: column 'caption'.*\['image', 'text'\]"):
        load_image_dataset(str(jsonl_folder(tmp_path / "data")), "image", "caption")


def test_metadata_without_rows_is_empty(tmp_path):
    folder = tmp_path / "data"
    write_images(folder, 1)
    write_jsonl(folder, [])
    with pytest.raises(ConfigError, match="no rows"):
        load_image_dataset(str(folder), "image", "text")


def test_folder_without_images_is_empty(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("nothing here")
    with pytest.raises(ConfigError, match="has no images"):
        load_image_dataset(str(tmp_path / "data"), "image", "text")


def write_broken_images(folder):
    """A file that is not an image at all, and a JPEG cut in half (only a full decode notices)."""
    (folder / "garbage.png").write_bytes(b"not an image")
    noise_image(64, 64).save(folder / "cut.jpg", quality=95)
    data = (folder / "cut.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])
    return ["garbage.png", "cut.jpg"]


def test_unreadable_images_are_dropped_with_a_warning_naming_them(tmp_path):
    folder = tmp_path / "data"
    names = write_images(folder, 2) + write_broken_images(folder)
    write_jsonl(folder, [{"file_name": name, "text": name} for name in names])
    with pytest.warns(UserWarning) as caught:
        dataset = load_image_dataset(str(folder), "image", "text")
    (message,) = [str(w.message) for w in caught if "unreadable" in str(w.message)]
    assert "garbage.png" in message and "cut.jpg" in message and "2 unreadable of 4" in message
    assert sorted(dataset["text"]) == ["0.png", "1.png"]
    assert all(isinstance(image, Image.Image) for image in dataset["image"])


def test_all_images_unreadable(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    names = write_broken_images(folder)
    write_jsonl(folder, [{"file_name": name, "text": name} for name in names])
    with pytest.raises(ConfigError, match="none of the 2 images.*garbage.png"):
        load_image_dataset(str(folder), "image", "text")


def test_same_image_and_caption_column_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="image_column and caption_column"):
        load_image_dataset(str(jsonl_folder(tmp_path / "data")), "text", "text")


# --------------------------------------------------------------------------------------------------------
# Options


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="image_interpolation_mode"):
        augment(interpolation="cubic")
    with pytest.raises(ConfigError, match="color_jitter_hue"):
        augment(hue=0.7)
    with pytest.raises(ConfigError, match="resolution"):
        augment(resolution=0)
    with pytest.raises(ConfigError, match="caption_dropout_rate"):
        CaptionOptions(trigger_word="", caption_dropout_rate=1.5)


# --------------------------------------------------------------------------------------------------------
# Image transform


def test_output_shape_dtype_and_range_with_everything_on():
    options = augment(
        center_crop=False, random_flip=True, color_jitter=True, brightness=0.5, contrast=0.5, saturation=0.5,
        hue=0.2, random_rotation=True, rotation_degrees=30.0, rotation_prob=1.0,
    )
    for seed in range(5):
        tensor, _, _ = transform_image(noise_image(), options, example_rng(seed, 0, 0))
        assert tensor.shape == (3, 16, 16) and tensor.dtype == torch.float32 and tensor.is_contiguous()
        assert tensor.min() >= -1.0 and tensor.max() <= 1.0


def test_grayscale_and_rgba_inputs_become_rgb():
    for mode in ("L", "RGBA", "P"):
        tensor, _, _ = transform_image(noise_image().convert(mode), augment(), example_rng(0, 0, 0))
        assert tensor.shape == (3, 16, 16)


def test_resize_uses_the_chosen_interpolation():
    image = noise_image()
    nearest, _, _ = transform_image(image, augment(interpolation="nearest"), example_rng(0, 0, 0))
    lanczos, _, _ = transform_image(image, augment(interpolation="lanczos"), example_rng(0, 0, 0))
    assert not torch.equal(nearest, lanczos)
    expected = resized(image, 16, Image.Resampling.NEAREST)[0:16, 4:20]
    assert np.array_equal(as_pixels(nearest), expected)


def test_center_crop_reports_resized_coordinates_and_original_size():
    image = noise_image(48, 32)
    tensor, original_size, crop_top_left = transform_image(image, augment(), example_rng(0, 0, 0))
    assert original_size == (32, 48)
    assert crop_top_left == (0, 4)
    assert np.array_equal(as_pixels(tensor), resized(image, 16)[0:16, 4:20])


def test_original_size_follows_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, displayed rotated by 90 degrees
    noise_image(48, 32).save(tmp_path / "sideways.jpg", exif=exif)
    _, original_size, _ = transform_image(Image.open(tmp_path / "sideways.jpg"), augment(), example_rng(0, 0, 0))
    assert original_size == (48, 32)


def test_random_crop_reports_where_the_crop_came_from():
    image = noise_image(40, 24)
    full = resized(image, 16)
    assert full.shape[:2] == (16, 27)
    positions = set()
    for seed in range(20):
        tensor, _, (top, left) = transform_image(image, augment(center_crop=False), example_rng(seed, 0, 0))
        assert np.array_equal(as_pixels(tensor), full[top : top + 16, left : left + 16])
        positions.add((top, left))
    assert len(positions) > 5


def test_random_crop_on_portrait_image_moves_vertically():
    image = noise_image(24, 40)
    full = resized(image, 16)
    tops = set()
    for seed in range(20):
        tensor, _, (top, left) = transform_image(image, augment(center_crop=False), example_rng(seed, 0, 0))
        assert left == 0
        assert np.array_equal(as_pixels(tensor), full[top : top + 16, 0:16])
        tops.add(top)
    assert len(tops) > 5


def test_flip_mirrors_about_half_the_time():
    image = noise_image(48, 32)
    plain, _, _ = transform_image(image, augment(), example_rng(0, 0, 0))
    mirrored = plain.flip(-1)
    flips = 0
    for seed in range(400):
        tensor, _, crop = transform_image(image, augment(random_flip=True), example_rng(seed, 0, 0))
        assert crop == (0, 4)
        assert torch.equal(tensor, plain) or torch.equal(tensor, mirrored)
        flips += torch.equal(tensor, mirrored)
    assert 0.4 < flips / 400 < 0.6


def test_color_jitter_changes_pixels_within_range():
    image = noise_image()
    plain, _, _ = transform_image(image, augment(), example_rng(0, 0, 0))
    options = augment(color_jitter=True, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)
    changed = 0
    for seed in range(20):
        tensor, _, _ = transform_image(image, options, example_rng(seed, 0, 0))
        assert tensor.min() >= -1.0 and tensor.max() <= 1.0
        changed += not math.isclose(tensor.mean().item(), plain.mean().item(), abs_tol=1e-3) or not math.isclose(
            tensor.std().item(), plain.std().item(), abs_tol=1e-3
        )
    assert changed >= 18


def test_brightness_factor_stays_within_its_range():
    image = Image.new("RGB", (16, 16), (100, 100, 100))
    options = augment(color_jitter=True, brightness=0.5)
    values = set()
    for seed in range(50):
        tensor, _, _ = transform_image(image, options, example_rng(seed, 0, 0))
        value = as_pixels(tensor)[0, 0, 0]
        assert 50 <= value <= 150
        values.add(int(value))
    assert len(values) > 10 and min(values) < 80 and max(values) > 120


def test_hue_shift_leaves_gray_alone_and_turns_colors():
    options = augment(color_jitter=True, hue=0.5)
    gray = Image.new("RGB", (16, 16), (90, 90, 90))
    red = Image.new("RGB", (16, 16), (200, 30, 30))
    shifted_red = 0
    for seed in range(10):
        tensor, _, _ = transform_image(gray, options, example_rng(seed, 0, 0))
        assert np.all(as_pixels(tensor) == 90)
        tensor, _, _ = transform_image(red, options, example_rng(seed, 0, 0))
        shifted_red += not np.array_equal(as_pixels(tensor)[0, 0], [200, 30, 30])
    assert shifted_red >= 8


def test_rotation_happens_with_its_probability_and_never_when_off():
    image = noise_image(32, 32)
    plain, _, _ = transform_image(image, augment(), example_rng(0, 0, 0))
    off = augment(random_rotation=False, rotation_degrees=45.0, rotation_prob=1.0)
    on = augment(random_rotation=True, rotation_degrees=45.0, rotation_prob=0.3)
    rotated = 0
    for seed in range(300):
        assert torch.equal(transform_image(image, off, example_rng(seed, 0, 0))[0], plain)
        rotated += not torch.equal(transform_image(image, on, example_rng(seed, 0, 0))[0], plain)
    assert 0.22 < rotated / 300 < 0.38


def test_rotation_fills_corners_by_reflection_not_black():
    image = Image.new("RGB", (32, 32), (200, 120, 40))
    options = augment(random_rotation=True, rotation_degrees=45.0, rotation_prob=1.0)
    for seed in range(10):
        tensor, _, _ = transform_image(image, options, example_rng(seed, 0, 0))
        assert np.abs(as_pixels(tensor).astype(int) - [200, 120, 40]).max() <= 1


# --------------------------------------------------------------------------------------------------------
# Captions


def caption(text, options, seed=0, epoch=0, index=0):
    """The caption TrainingExamples gives example `index` of `epoch`."""
    return caption_for(text, options, example_rng(seed, epoch, index), example_rng(seed, epoch, f"{index}:caption"))


def test_trigger_word_is_prepended():
    options = CaptionOptions(trigger_word="sks dog", caption_dropout_rate=0.0)
    assert caption("  on a beach ", options) == "sks dog, on a beach"
    assert caption("", options) == "sks dog"
    plain = CaptionOptions(trigger_word="", caption_dropout_rate=0.0)
    assert caption(" on a beach", plain) == "on a beach"


@pytest.mark.parametrize("text", [None, float("nan")])
def test_missing_captions_become_empty(text):
    assert caption(text, CaptionOptions(trigger_word="", caption_dropout_rate=0.0)) == ""


@pytest.mark.parametrize("rate, low, high", [(0.0, 0, 0), (1.0, 2000, 2000), (0.3, 520, 680)])
def test_caption_dropout_rate(rate, low, high):
    options = CaptionOptions(trigger_word="sks", caption_dropout_rate=rate)
    dropped = sum(caption("a photo", options, seed=7, index=i) == "" for i in range(2000))
    assert low <= dropped <= high


def test_shuffled_tags_keep_the_trigger_and_the_first_tokens_in_place_and_follow_the_seed():
    options = CaptionOptions("sks", 0.0, shuffle_caption=True, keep_tokens=2, caption_prefix="photo,")
    text = "a dog, on grass, sunny, wide shot"
    draws = [caption(text, options, seed=1, epoch=e) for e in range(200)]
    assert all(d.startswith("sks, photo, a dog, ") for d in draws), "the trigger word, then keep_tokens tags (the prefix is one)"
    assert len(set(draws)) == 6 and {sorted(d.split(", ")[3:]) == ["on grass", "sunny", "wide shot"] for d in draws} == {True}
    assert set(draws) == caption_variants(text, options, 100)
    assert draws == [caption(text, options, seed=1, epoch=e) for e in range(200)], "the same seed, the same captions"
    assert draws != [caption(text, options, seed=2, epoch=e) for e in range(200)]
    assert caption_variants("a, b, c, d, e, f, g, h", options, 4096) is None, "6! orders of the rest: past the limit"
    unshuffled = CaptionOptions("sks", 0.0, caption_separator="|", caption_suffix="| film")
    assert caption("a dog|on grass", unshuffled) == "sks| a dog| on grass| film"


def test_several_captions_of_an_image_are_drawn_per_epoch():
    options = CaptionOptions("", 0.25)
    for captions in (["a dog", "a brown dog", "  "], "a dog\na brown dog\n"):  # a metadata list, the lines of a .txt file
        draws = {caption(captions, options, epoch=e) for e in range(100)}
        assert draws == {"a dog", "a brown dog", ""} == caption_variants(captions, options, 10)


def test_image_draws_do_not_depend_on_the_caption_settings():
    rows = training_rows()
    plain = training_examples(rows)
    shuffled = TrainingExamples([ExampleSource(rows, "image", "text", plain.sources[0].augment, CaptionOptions("sks", 0.3, shuffle_caption=True))], seed=3)
    assert all(torch.equal(plain[i]["pixel_values"], shuffled[i]["pixel_values"]) for i in range(len(rows)))


# --------------------------------------------------------------------------------------------------------
# TrainingExamples and batching


def training_rows(count=5):
    images = [noise_image(48 - 4 * i, 32, seed=i) for i in range(count)]
    return datasets.Dataset.from_dict({"image": images, "text": [f"photo {i}" for i in range(count)]}).cast_column(
        "image", datasets.Image()
    )


def training_examples(rows, seed=3):
    options = augment(
        center_crop=False, random_flip=True, color_jitter=True, brightness=0.3, contrast=0.3, saturation=0.3,
        hue=0.05, random_rotation=True, rotation_degrees=10.0, rotation_prob=0.5,
    )
    return TrainingExamples([ExampleSource(rows, "image", "text", options, CaptionOptions("sks", 0.3))], seed=seed)


def test_same_seed_epoch_index_gives_the_same_example():
    rows = training_rows()
    first, second = training_examples(rows), training_examples(rows)
    for index in range(len(rows)):
        a, b = first[index], second[index]
        assert torch.equal(a["pixel_values"], b["pixel_values"])
        assert (a["caption"], a["crop_top_left"]) == (b["caption"], b["crop_top_left"])


def test_another_epoch_gives_other_augmentations():
    rows = training_rows()
    examples = training_examples(rows)
    before = [examples[i]["pixel_values"] for i in range(len(rows))]
    examples.set_epoch(1)
    after = [examples[i]["pixel_values"] for i in range(len(rows))]
    assert all(not torch.equal(a, b) for a, b in zip(before, after))


def test_example_fields():
    example = training_examples(training_rows())[2]
    assert set(example) == {"pixel_values", "caption", "original_size", "crop_top_left", "index", "row", "plan", "loss_weight"}
    assert example["index"] == example["row"] == 2 and example["original_size"] == (32, 40) and example["loss_weight"] == 1.0
    assert example["caption"] in ("", "sks, photo 2")


def test_dataloader_batches_and_does_not_depend_on_workers_or_batch_size():
    rows = training_rows()
    examples = training_examples(rows)
    loader = torch.utils.data.DataLoader(examples, batch_size=2, collate_fn=collate_examples)
    batches = list(loader)
    batch = batches[0]
    assert set(batch) == {"pixel_values", "captions", "original_sizes", "crop_top_lefts", "indices", "rows", "plans", "loss_weights"}
    assert batch["pixel_values"].shape == (2, 3, 16, 16) and batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_values"].is_contiguous()
    assert len(batch["captions"]) == 2 and all(isinstance(c, str) for c in batch["captions"])
    assert batch["original_sizes"].dtype == torch.long and batch["original_sizes"].shape == (2, 2)
    assert batch["crop_top_lefts"].dtype == torch.long and batch["crop_top_lefts"].shape == (2, 2)
    assert batch["indices"].tolist() == [0, 1]
    assert batches[-1]["pixel_values"].shape == (1, 3, 16, 16)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fork-in-threaded-process notices from some platforms
        workers = torch.utils.data.DataLoader(examples, batch_size=3, num_workers=2, collate_fn=collate_examples)
        other = list(workers)
    assert torch.equal(torch.cat([b["pixel_values"] for b in batches]), torch.cat([b["pixel_values"] for b in other]))
    assert sum((b["captions"] for b in batches), []) == sum((b["captions"] for b in other), [])


# --------------------------------------------------------------------------------------------------------
# Inputs that used to train silently wrong


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    """A 16-bit gradient PNG (PIL mode I;16) keeps its gradient: PIL's own RGB conversion would clip every value
    above 255 to white."""
    gradient = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    Image.fromarray(gradient).save(tmp_path / "deep.png")
    image = Image.open(tmp_path / "deep.png")
    assert image.mode.startswith("I")
    tensor, _, _ = transform_image(image, augment(resolution=64), example_rng(0, 0, 0))
    row = as_pixels(tensor)[32, :, 0].astype(int)
    expected = np.rint(np.linspace(0, 65535, 64) * 255 / 65535)
    assert np.abs(row - expected).max() <= 3, "a ramp from black to white, not a white image"
    floats = Image.fromarray(np.tile(np.linspace(0, 1, 64, dtype=np.float32), (64, 1)), mode="F")
    assert np.abs(as_pixels(transform_image(floats, augment(resolution=64), example_rng(0, 0, 0))[0])[32, :, 0] - expected).max() <= 3


def test_kohya_captions_drop_a_byte_order_mark_and_survive_windows_encodings(tmp_path):
    folder = tmp_path / "data"
    write_images(folder, 3)
    (folder / "0.txt").write_text("a red circle", encoding="utf-8-sig")
    (folder / "1.txt").write_bytes("caf\u00e9 \u2013 na\u00efve".encode("cp1252"))
    (folder / "2.txt").write_text("plain", encoding="utf-8")
    with pytest.warns(UserWarning, match=r"1\.txt' is not UTF-8; read as Windows-1252: 'caf\u00e9 \u2013 na\u00efve'"):
        dataset = load_image_dataset(str(folder), "image", "text")
    assert sorted(dataset["text"]) == sorted(["a red circle", "caf\u00e9 \u2013 na\u00efve", "plain"])


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32", "utf-32-be"])
def test_kohya_captions_with_a_utf16_or_utf32_byte_order_mark_are_decoded(encoding, tmp_path):
    folder = tmp_path / "data"
    write_images(folder, 1)
    text = "caf\u00e9 \u2013 \u732b \U0001f431"
    data = text.encode(encoding)
    (folder / "0.txt").write_bytes(data if encoding in ("utf-16", "utf-32") else {"utf-16-be": codecs.BOM_UTF16_BE, "utf-32-be": codecs.BOM_UTF32_BE}[encoding] + data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Windows-1252 guess
        assert load_image_dataset(str(folder), "image", "text")["text"] == [text]
