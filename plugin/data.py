"""Training data: load a captioned image dataset, check it, and turn rows into augmented, seeded tensors.

Everything random about an example comes from `example_rng(seed, epoch, index)`, so a run is reproducible
whatever the batch size, number of data-loader workers or the order in which the sampler visits rows.
Augmentations use PIL and numpy only (no torchvision).
"""

import csv
import io
import math
import os
import random
import re
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from .errors import ConfigError

METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

INTERPOLATIONS = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


# ---------------------------------------------------------------------------------------------------------
# Loading


def load_image_dataset(dataset_name: str, image_column: str, caption_column: str) -> datasets.Dataset:
    """Load `dataset_name` (local folder or hub id) and return it checked and ready for `TrainingExamples`.

    Unreadable images are dropped with one warning that names each of them rather than failing the run:
    one broken file in a 1000-image scrape should not cost the user a training run, but they must see
    which files were left out. Only a dataset with no readable image left is an error.
    """
    if image_column == caption_column:
        raise ConfigError(f"image_column and caption_column: both are {image_column!r}; expected two different columns")
    dataset = _resolve_dataset(dataset_name, image_column, caption_column)
    if len(dataset) == 0:
        raise ConfigError(f"dataset_name: dataset {dataset_name!r} has no rows; expected at least one captioned image")
    _require_column(dataset, dataset_name, "image_column", image_column)
    _require_column(dataset, dataset_name, "caption_column", caption_column)
    return _drop_unreadable_images(dataset, dataset_name, image_column)


def _resolve_dataset(dataset_name: str, image_column: str, caption_column: str) -> datasets.Dataset:
    """Pick the loader that fits what `dataset_name` points at (see `load_image_dataset`)."""
    path = Path(os.path.expanduser(dataset_name))
    if path.is_dir():
        if any((path / name).is_file() for name in METADATA_FILES):
            return _load_imagefolder(path)
        if any((path / name).is_file() for name in SAVED_DATASET_FILES):
            return _load_saved(path)
        return _load_kohya_folder(path, image_column, caption_column)
    if path.exists():
        raise ConfigError(f"dataset_name: {dataset_name!r} is a file; expected a folder of images or a hub dataset id")
    if _looks_like_path(dataset_name):
        raise ConfigError(f"dataset_name: folder {dataset_name!r} does not exist")
    return _load_hub(dataset_name)


def _looks_like_path(name: str) -> bool:
    """True when `name` is meant as a local path: explicit path syntax, or a first component that exists here."""
    if name in (".", "..") or name.startswith(("./", "../", "/", "~", ".\\", "..\\")):
        return True
    separators = {os.sep, os.altsep} - {None}
    if not any(sep in name for sep in separators):
        return False
    first_component = re.split(r"[\\/]", name)[0]
    return not HUB_ID.match(name) or Path(first_component).exists()


def _load_imagefolder(path: Path) -> datasets.Dataset:
    """Load a folder of images described by a metadata file, with datasets' imagefolder builder."""
    if not _metadata_has_rows(path):
        raise ConfigError(f"dataset_name: metadata file in {str(path)!r} has no rows; expected one row per image")
    try:
        return datasets.load_dataset("imagefolder", data_dir=str(path), split="train")
    except Exception as error:
        raise ConfigError(f"dataset_name: could not load image folder {str(path)!r}: {_reason(error)}") from error


def _metadata_has_rows(path: Path) -> bool:
    """Check the metadata file for data rows up front: imagefolder fails with a bare IndexError on an empty one."""
    jsonl, csv_file = path / "metadata.jsonl", path / "metadata.csv"
    if jsonl.is_file():
        with open(jsonl, encoding="utf-8") as lines:
            return any(line.strip() for line in lines)
    if csv_file.is_file():
        with open(csv_file, encoding="utf-8", newline="") as lines:
            return sum(1 for row in csv.reader(lines) if row) > 1
    return True  # metadata.parquet: left to imagefolder and the emptiness check after loading


def _load_saved(path: Path) -> datasets.Dataset:
    """Load a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk` (its "train" split)."""
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:
        raise ConfigError(f"dataset_name: could not load saved dataset {str(path)!r}: {_reason(error)}") from error
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise ConfigError(
                f"dataset_name: saved dataset {str(path)!r} has no 'train' split; its splits are {sorted(loaded)}"
            )
        return loaded["train"]
    return loaded


def _load_kohya_folder(path: Path, image_column: str, caption_column: str) -> datasets.Dataset:
    """Build a dataset from images with same-name .txt captions (kohya style), searching subfolders too."""
    images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not images:
        raise ConfigError(
            f"dataset_name: folder {str(path)!r} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) "
            f"and no {' / '.join(METADATA_FILES)}; expected captioned images"
        )
    captions = [_read_caption(image.with_suffix(".txt")) for image in images]
    uncaptioned = sum(caption is None for caption in captions)
    if uncaptioned:
        warnings.warn(
            f"dataset_name: {uncaptioned} of {len(images)} images in {str(path)!r} have no same-name .txt caption; "
            "they are trained with an empty caption",
            stacklevel=4,
        )
    columns = {image_column: [str(image) for image in images], caption_column: [c or "" for c in captions]}
    return datasets.Dataset.from_dict(columns).cast_column(image_column, datasets.Image())


def _read_caption(path: Path) -> str | None:
    """The caption in a kohya .txt file, or None when the image has none."""
    if not path.is_file():
        return None
    return path.read_text(encoding="utf-8", errors="replace").strip()


def _load_hub(dataset_name: str) -> datasets.Dataset:
    """Load the "train" split of a Hugging Face hub dataset."""
    try:
        return datasets.load_dataset(dataset_name, split="train")
    except Exception as error:
        raise ConfigError(
            f"dataset_name: {dataset_name!r} is not a local folder and could not be loaded as a hub dataset: "
            f"{_reason(error)}"
        ) from error


def _reason(error: Exception) -> str:
    """A one-line reason for a wrapped library error."""
    return f"{type(error).__name__}: {error}"


def _require_column(dataset: datasets.Dataset, dataset_name: str, field: str, column: str) -> None:
    """Fail naming the missing column and the ones that exist (never train on silently empty captions)."""
    if column not in dataset.column_names:
        raise ConfigError(
            f"{field}: column {column!r} not found in dataset {dataset_name!r}; "
            f"existing columns: {dataset.column_names}"
        )


def _drop_unreadable_images(dataset: datasets.Dataset, dataset_name: str, image_column: str) -> datasets.Dataset:
    """Open every image once; drop the broken ones with a warning naming each, fail if none is left."""
    try:
        raw = dataset.cast_column(image_column, datasets.Image(decode=False))
    except Exception as error:
        raise ConfigError(
            f"image_column: column {image_column!r} holds {dataset.features[image_column]}; expected images "
            f"({_reason(error)})"
        ) from error
    problems = {}
    for index, value in enumerate(raw.select_columns([image_column])):
        problem = _image_problem(value[image_column])
        if problem:
            problems[index] = f"{_image_label(value[image_column], index)} ({problem})"
    if len(problems) == len(raw):
        raise ConfigError(
            f"dataset_name: none of the {len(raw)} images in {dataset_name!r} can be read: "
            + "; ".join(problems.values())
        )
    if problems:
        warnings.warn(
            f"dataset_name: skipping {len(problems)} unreadable of {len(raw)} images in {dataset_name!r}: "
            + "; ".join(problems.values()),
            stacklevel=3,
        )
        raw = raw.select([index for index in range(len(raw)) if index not in problems])
    return raw.cast_column(image_column, datasets.Image())


def _image_problem(value: dict | None) -> str | None:
    """Why an undecoded image cannot be used, or None if it decodes fully.

    `verify()` catches corrupt PNG chunks, the full `load()` catches truncated files that `verify` misses.
    """
    if value is None or (value.get("bytes") is None and not value.get("path")):
        return "no image in this row"
    try:
        with _open_raw(value) as image:
            image.verify()
        with _open_raw(value) as image:
            image.load()
    except Exception as error:
        return _reason(error)
    return None


def _open_raw(value: dict) -> Image.Image:
    """Open an undecoded datasets image ({"bytes", "path"}) with PIL."""
    if value.get("bytes") is not None:
        return Image.open(io.BytesIO(value["bytes"]))
    return Image.open(value["path"])


def _image_label(value: dict | None, index: int) -> str:
    """How to name an image in a message: its file path when known, else its row."""
    if value and value.get("path"):
        return str(value["path"])
    return f"row {index}"


# ---------------------------------------------------------------------------------------------------------
# Options and randomness


@dataclass(frozen=True)
class AugmentOptions:
    """How `transform_image` resizes, crops and augments; checked on creation so bad values fail early."""

    resolution: int
    center_crop: bool
    random_flip: bool
    interpolation: str
    color_jitter: bool
    brightness: float
    contrast: float
    saturation: float
    hue: float
    random_rotation: bool
    rotation_degrees: float
    rotation_prob: float

    def __post_init__(self):
        if not isinstance(self.resolution, int) or self.resolution < 1:
            raise ConfigError(f"resolution: got {self.resolution!r}; expected a positive number of pixels")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"image_interpolation_mode: got {self.interpolation!r}; expected one of {list(INTERPOLATIONS)}"
            )
        _check_range("color_jitter_brightness", self.brightness, 0.0, math.inf)
        _check_range("color_jitter_contrast", self.contrast, 0.0, math.inf)
        _check_range("color_jitter_saturation", self.saturation, 0.0, math.inf)
        _check_range("color_jitter_hue", self.hue, 0.0, 0.5)
        _check_range("rotation_degrees", self.rotation_degrees, 0.0, 180.0)
        _check_range("rotation_prob", self.rotation_prob, 0.0, 1.0)


@dataclass(frozen=True)
class CaptionOptions:
    """How `caption_for` rewrites captions: an optional trigger word and caption dropout for CFG."""

    trigger_word: str
    caption_dropout_rate: float

    def __post_init__(self):
        _check_range("caption_dropout_rate", self.caption_dropout_rate, 0.0, 1.0)


def _check_range(field: str, value: float, low: float, high: float) -> None:
    """Fail naming `field` unless low <= value <= high."""
    if not isinstance(value, (int, float)) or not low <= value <= high:
        raise ConfigError(f"{field}: got {value!r}; expected a number from {low} to {high}")


def example_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The RNG for one example in one epoch: a pure function of (seed, epoch, index).

    Seeding with a string hashes it with SHA-512, which is stable across processes and Python runs
    (unlike `hash()`), so worker processes and restarts draw the same augmentations.
    """
    return random.Random(f"{seed}:{epoch}:{index}")


# ---------------------------------------------------------------------------------------------------------
# Image transform


def transform_image(
    image: Image.Image, options: AugmentOptions, rng: random.Random
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Resize, augment and crop one image to a (3, R, R) float32 tensor in [-1, 1].

    Returns the tensor, the original (height, width) and the crop's (top, left) in the resized (and flipped)
    image, which are the real values SDXL's add_time_ids need. Draws from `rng`, in this order and only for
    enabled steps: rotation (chance, then angle), flip, crop (top, then left), color jitter.
    EXIF orientation is applied first, so "original" means the image as it is displayed.
    """
    image = ImageOps.exif_transpose(image).convert("RGB")
    original_size = (image.height, image.width)
    image = _resize_shorter_side(image, options.resolution, INTERPOLATIONS[options.interpolation])
    if options.random_rotation:
        image = _maybe_rotate(image, options.rotation_degrees, options.rotation_prob, rng)
    if options.random_flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    top, left = _crop_origin(image, options.resolution, options.center_crop, rng)
    image = image.crop((left, top, left + options.resolution, top + options.resolution))
    if options.color_jitter:
        image = _color_jitter(image, options, rng)
    return _to_tensor(image), original_size, (top, left)


def _resize_shorter_side(image: Image.Image, resolution: int, resample: Image.Resampling) -> Image.Image:
    """Scale so the shorter side is `resolution`, keeping the aspect ratio."""
    scale = resolution / min(image.width, image.height)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    return image.resize(size, resample=resample)


def _maybe_rotate(image: Image.Image, degrees: float, probability: float, rng: random.Random) -> Image.Image:
    """With `probability`, rotate by a uniform angle in [-degrees, degrees] (bicubic, same size).

    The corners are filled by mirroring the image at its edges instead of black, so the model is not
    taught black wedges: the image is reflect-padded just enough to cover the rotated frame, rotated about
    its unchanged centre, and cut back to its size.
    """
    if rng.random() >= probability:
        return image
    angle = rng.uniform(-degrees, degrees)
    pad_x, pad_y = _rotation_padding(image.width, image.height, angle)
    padded = Image.fromarray(np.pad(np.asarray(image), ((pad_y, pad_y), (pad_x, pad_x), (0, 0)), mode="reflect"))
    rotated = padded.rotate(angle, resample=Image.Resampling.BICUBIC, expand=False)
    return rotated.crop((pad_x, pad_y, pad_x + image.width, pad_y + image.height))


def _rotation_padding(width: int, height: int, angle: float) -> tuple[int, int]:
    """Margins (x, y) so that a width x height frame rotated by `angle` stays inside the padded image.

    Two extra pixels cover the bicubic kernel's reach at the border.
    """
    cos, sin = abs(math.cos(math.radians(angle))), abs(math.sin(math.radians(angle)))
    pad_x = math.ceil((width * cos + height * sin - width) / 2) + 2
    pad_y = math.ceil((width * sin + height * cos - height) / 2) + 2
    return pad_x, pad_y


def _crop_origin(image: Image.Image, resolution: int, center: bool, rng: random.Random) -> tuple[int, int]:
    """(top, left) of an R x R crop: centred (rounded down), or uniform over all valid positions."""
    spare_y, spare_x = image.height - resolution, image.width - resolution
    if center:
        return spare_y // 2, spare_x // 2
    top = rng.randint(0, spare_y)
    left = rng.randint(0, spare_x)
    return top, left


def _color_jitter(image: Image.Image, options: AugmentOptions, rng: random.Random) -> Image.Image:
    """Brightness, contrast, saturation and hue jitter, applied in an rng-shuffled order like torchvision's.

    All four factors are drawn first (a fixed number of draws), then the order is shuffled.
    """
    steps = [
        (partial(_enhance, ImageEnhance.Brightness), _jitter_factor(options.brightness, rng)),
        (partial(_enhance, ImageEnhance.Contrast), _jitter_factor(options.contrast, rng)),
        (partial(_enhance, ImageEnhance.Color), _jitter_factor(options.saturation, rng)),
        (_shift_hue, rng.uniform(-options.hue, options.hue)),
    ]
    rng.shuffle(steps)
    for step, amount in steps:
        image = step(image, amount)
    return image


def _jitter_factor(strength: float, rng: random.Random) -> float:
    """An enhancement factor uniform in [max(0, 1 - strength), 1 + strength]."""
    return rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength)


def _enhance(enhancer: type, image: Image.Image, factor: float) -> Image.Image:
    """Apply one PIL.ImageEnhance enhancer (factor 1 leaves the image unchanged)."""
    return enhancer(image).enhance(factor)


def _shift_hue(image: Image.Image, shift: float) -> Image.Image:
    """Rotate the hue by `shift` of a full turn (PIL's HSV hue channel spans 0-255, so steps of 1/256)."""
    steps = round(shift * 256) % 256
    if steps == 0:
        return image  # the HSV round trip is lossy; skip it when there is nothing to shift
    hsv = np.array(image.convert("HSV"))
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + steps) % 256
    return Image.fromarray(hsv, mode="HSV").convert("RGB")


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image to a contiguous (3, H, W) float32 tensor scaled to [-1, 1]."""
    pixels = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


# ---------------------------------------------------------------------------------------------------------
# Captions


def caption_for(caption, options: CaptionOptions, rng: random.Random) -> str:
    """The caption to train with: cleaned, trigger word in front, dropped to "" with caption_dropout_rate.

    Always draws exactly one number from `rng`, so the draws after it do not depend on the rate.
    """
    text = _clean_caption(caption)
    trigger = options.trigger_word.strip()
    if trigger:
        text = f"{trigger}, {text}" if text else trigger
    drop = rng.random() < options.caption_dropout_rate
    return "" if drop else text


def _clean_caption(caption) -> str:
    """A stripped string; None and NaN (empty cells in CSV metadata) become ""."""
    if caption is None or (isinstance(caption, float) and math.isnan(caption)):
        return ""
    return str(caption).strip()


# ---------------------------------------------------------------------------------------------------------
# Torch dataset and collation


class TrainingExamples(torch.utils.data.Dataset):
    """Rows of a checked `datasets.Dataset` as augmented training examples.

    Example `index` in epoch `e` uses `example_rng(seed, e, index)`: first the caption draw, then the image
    draws (see `transform_image`). Call `set_epoch` before each epoch; with data-loader workers, do not use
    `persistent_workers=True`, or the workers keep the epoch they were started with.
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        image_column: str,
        caption_column: str,
        augment: AugmentOptions,
        captions: CaptionOptions,
        seed: int,
    ):
        self.dataset = dataset
        self.image_column = image_column
        self.caption_column = caption_column
        self.augment = augment
        self.captions = captions
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose augmentations `__getitem__` draws."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        row = self.dataset[index]
        rng = example_rng(self.seed, self.epoch, index)
        caption = caption_for(row[self.caption_column], self.captions, rng)
        pixel_values, original_size, crop_top_left = transform_image(row[self.image_column], self.augment, rng)
        return {
            "pixel_values": pixel_values,
            "caption": caption,
            "original_size": original_size,
            "crop_top_left": crop_top_left,
            "index": index,
        }


def collate_examples(examples: list[dict]) -> dict:
    """Batch `TrainingExamples` items for a DataLoader."""
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]).contiguous().float(),
        "captions": [e["caption"] for e in examples],
        "original_sizes": torch.tensor([e["original_size"] for e in examples], dtype=torch.long),
        "crop_top_lefts": torch.tensor([e["crop_top_left"] for e in examples], dtype=torch.long),
        "indices": torch.tensor([e["index"] for e in examples], dtype=torch.long),
    }
