"""Training data: load a captioned image dataset, check it, and turn rows into augmented, seeded tensors.

Everything random about an example comes from `example_rng(seed, epoch, index)`, so a run is reproducible
whatever the batch size, number of data-loader workers or the order in which the sampler visits rows.
Augmentations use PIL and numpy only (no torchvision).
"""

import codecs
import csv
import hashlib
import io
import json
import math
import os
import random
import re
import warnings
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import datasets
import numpy as np
import torch
from huggingface_hub import constants as hub_constants
from PIL import Image, ImageEnhance, ImageOps

from .captions import CaptionOptions, caption_choices, caption_for, caption_variants, joined, tags_of
from .errors import ConfigError
from .settings import background_rgb, check_range
from .hub import require_hub

METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
EXIF_ORIENTATION = 0x0112
# Byte-order marks and the codecs that read past them; UTF-32 first, as its little-endian mark begins with UTF-16's.
UNICODE_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16"),
                (codecs.BOM_UTF16_BE, "utf-16"))  # fmt: skip
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


def load_image_dataset(dataset_name: str, image_column: str, caption_column: str, follow_symlinks: bool = False) -> datasets.Dataset:
    """Load `dataset_name` (local folder or hub id) and return it checked and ready for `TrainingExamples`.

    Unreadable images are dropped with one warning that names each of them rather than failing the run:
    one broken file in a 1000-image scrape should not cost the user a training run, but they must see
    which files were left out. Only a dataset with no readable image left is an error. A local folder's
    files stay inside it (`check_dataset_paths`).
    """
    if image_column == caption_column:
        raise ConfigError(f"image_column and caption_column: both are {image_column!r}; expected two different columns")
    dataset = _resolve_dataset(dataset_name, image_column, caption_column, follow_symlinks)
    if len(dataset) == 0:
        raise ConfigError(f"dataset_name: dataset {dataset_name!r} has no rows; expected at least one captioned image")
    _require_column(dataset, dataset_name, "image_column", image_column)
    _require_column(dataset, dataset_name, "caption_column", caption_column)
    _warn_uncaptioned(dataset, dataset_name, caption_column)
    return _drop_unreadable_images(dataset, dataset_name, image_column)


def _warn_uncaptioned(dataset: datasets.Dataset, dataset_name: str, caption_column: str) -> None:
    """Rows whose caption is missing, null or blank train with an empty caption (the trigger word alone): said
    once with a count, so a mis-named .txt file or an empty metadata cell is not trained on silently."""
    captions = dataset[caption_column]
    uncaptioned = sum(caption_choices(caption) == [""] for caption in captions)
    if uncaptioned:
        warnings.warn(
            f"dataset_name: {uncaptioned} of {len(captions)} images in {dataset_name!r} have no caption (a null or blank "
            f"{caption_column!r} value, or no same-name .txt file); they train with an empty caption and the trigger word",
            stacklevel=3,
        )


def _resolve_dataset(dataset_name: str, image_column: str, caption_column: str, follow_symlinks: bool) -> datasets.Dataset:
    """Pick the loader that fits what `dataset_name` points at (see `load_image_dataset`)."""
    path = Path(os.path.expanduser(dataset_name))
    if path.is_dir():
        check_dataset_paths(path, follow_symlinks)
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


def check_dataset_paths(folder: Path, follow_symlinks: bool) -> None:
    """The policy for what a dataset folder may point at. A metadata row's file_name must stay inside the
    folder (no absolute path, no `..` out of it) and name a file that exists: otherwise an error naming the
    file and line. An image that is a symbolic link leading out of the folder (or a file under a linked
    folder) is refused unless follow_symlinks is on, as rsync copies what a link points to only when asked:
    a dataset shared or downloaded with a link to `/etc` or a home folder must not train on, cache or render
    what it points at without the user saying so. Links that stay inside the folder are always followed."""
    root = folder.resolve()
    for metadata, line, name in _metadata_file_names(folder):
        where = f"dataset_name: {str(metadata)!r} line {line}: file_name {name!r}"
        if os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] == "..":
            raise ConfigError(f"{where} leaves the dataset folder; expected a path inside {str(folder)!r}")
        if not (folder / name).is_file():
            raise ConfigError(f"{where} is not a file in the dataset folder")
    if follow_symlinks:
        return
    for image in (p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
        target = image.resolve()
        if target != root and root not in target.parents:
            raise ConfigError(f"dataset_name: {str(image)!r} is a symbolic link (or under one) to {str(target)!r}, outside the "
                              "dataset folder; set follow_symlinks to true to train on what links point at")  # fmt: skip


def _metadata_file_names(folder: Path):
    """(metadata file, line number, file_name) of each row of metadata.jsonl or metadata.csv. Every non-blank
    line of metadata.jsonl must be a JSON object with a file_name: a bad line is named by its real line number
    (the imagefolder builder reports neither the file nor the line)."""
    jsonl, table = folder / "metadata.jsonl", folder / "metadata.csv"
    if jsonl.is_file():
        with open(jsonl, encoding="utf-8-sig") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ConfigError(f"dataset_name: {str(jsonl)!r} line {number}: not valid JSON ({error.msg}, column {error.colno})") from None
                if not isinstance(row, dict) or "file_name" not in row:
                    raise ConfigError(f"dataset_name: {str(jsonl)!r} line {number}: expected a JSON object with a \"file_name\" key")
                if isinstance(row["file_name"], str):
                    yield jsonl, number, row["file_name"]
    elif table.is_file():
        with open(table, encoding="utf-8-sig", newline="") as rows:
            for number, row in enumerate(csv.DictReader(rows), start=2):
                if row.get("file_name"):
                    yield table, number, row["file_name"]


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
    columns = {image_column: [str(image) for image in images], caption_column: [c or "" for c in captions]}
    return datasets.Dataset.from_dict(columns).cast_column(image_column, datasets.Image())


def _read_caption(path: Path) -> str | None:
    """The caption in a kohya .txt file, or None when the image has none.

    UTF-8, with a byte-order mark dropped (Windows editors write one); UTF-16 or UTF-32 when the file starts
    with their byte-order mark (Notepad's "Unicode", PowerShell's `>`). Other text that is not UTF-8 was most
    likely written by a Windows tool: it is read as cp1252 (bytes cp1252 leaves undefined as latin-1), with a
    warning naming it, so a mis-encoded caption is never trained on silently.
    """
    if not path.is_file():
        return None
    data = path.read_bytes()
    encoding = next((name for bom, name in UNICODE_BOMS if data.startswith(bom)), None)
    if encoding is not None:
        try:
            return data.decode(encoding).strip()
        except UnicodeDecodeError as error:
            raise ConfigError(f"dataset_name: caption {str(path)!r} starts with a {encoding.upper()} byte-order mark but is not "
                              f"{encoding.upper()} text (byte {error.start}); save it as UTF-8") from None  # fmt: skip
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        text = "".join(_cp1252_or_latin1(bytes([byte])) for byte in data).strip()
        warnings.warn(f"dataset_name: caption {str(path)!r} is not UTF-8; read as Windows-1252: {text!r}", stacklevel=5)
        return text


def _cp1252_or_latin1(byte: bytes) -> str:
    try:
        return byte.decode("cp1252")
    except UnicodeDecodeError:
        return byte.decode("latin-1")


def _load_hub(dataset_name: str) -> datasets.Dataset:
    """Load the "train" split of a Hugging Face hub dataset (from the cache when HF_HUB_OFFLINE is set)."""
    if not hub_constants.HF_HUB_OFFLINE:
        require_hub("dataset_name", dataset_name, "./data/my-images")
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


@dataclass(frozen=True)
class ImageHeaders:
    """What bucket assignment and the run's notes need before training, read from file headers alone."""

    sizes: list[tuple[int, int]]  # (height, width) as displayed: EXIF orientations 5-8 turn the image by 90 degrees
    transparent: list[int]  # rows whose image has an alpha channel or a transparent palette entry
    labels: list[str]  # how messages name each image: its file, or its row


def read_image_headers(dataset: datasets.Dataset, image_column: str) -> ImageHeaders:
    """Every image's displayed size and whether it has transparency, without decoding a pixel."""
    sizes, transparent, labels = [], [], []
    for index, value in enumerate(dataset.cast_column(image_column, datasets.Image(decode=False))[image_column]):
        labels.append(_image_label(value, index))
        with _open_raw(value) as image:
            width, height = image.size
            if image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
                width, height = height, width
            if image.has_transparency_data:
                transparent.append(index)
        sizes.append((height, width))
    return ImageHeaders(sizes, transparent, labels)


def image_digests(dataset: datasets.Dataset, image_column: str) -> list[str]:
    """SHA-256 of every image's encoded bytes: the identity of its content for the disk cache's keys (a
    file replaced under the same name gets a new digest)."""
    digests = []
    for value in dataset.cast_column(image_column, datasets.Image(decode=False))[image_column]:
        data = value["bytes"] if value.get("bytes") is not None else Path(value["path"]).read_bytes()
        digests.append(hashlib.sha256(data).hexdigest())
    return digests


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
    alpha_background: str = "white"

    def __post_init__(self):
        if not isinstance(self.resolution, int) or self.resolution < 1:
            raise ConfigError(f"resolution: got {self.resolution!r}; expected a positive number of pixels")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"image_interpolation_mode: got {self.interpolation!r}; expected one of {list(INTERPOLATIONS)}"
            )
        check_range("color_jitter_brightness", self.brightness, 0.0, math.inf)
        check_range("color_jitter_contrast", self.contrast, 0.0, math.inf)
        check_range("color_jitter_saturation", self.saturation, 0.0, math.inf)
        check_range("color_jitter_hue", self.hue, 0.0, 0.5)
        check_range("rotation_degrees", self.rotation_degrees, 0.0, 180.0)
        check_range("rotation_prob", self.rotation_prob, 0.0, 1.0)
        background_rgb(self.alpha_background)

    @property
    def background(self) -> tuple[int, int, int]:
        return background_rgb(self.alpha_background)


def example_rng(seed: int, epoch: int, index: int | str) -> random.Random:
    """The RNG for one example in one epoch: a pure function of (seed, epoch, index); an index such as
    "3:caption" gives example 3 a second stream, whose draws leave the first one's untouched.

    Seeding with a string hashes it with SHA-512, which is stable across processes and Python runs
    (unlike `hash()`), so worker processes and restarts draw the same augmentations.
    """
    return random.Random(f"{seed}:{epoch}:{index}")


# ---------------------------------------------------------------------------------------------------------
# Image transform


@dataclass(frozen=True)
class ImagePlan:
    """Everything `apply_plan` does to one image, drawn before any pixel is read.

    A plan with its image fully determines the training pixels, so it is what the latent cache keys on.
    Sizes are (height, width); the crop is (top, left) in the resized, rotated and flipped image.
    """

    target: tuple[int, int]
    resized: tuple[int, int]
    crop_top_left: tuple[int, int]
    flip: bool
    interpolation: str
    rotation: float | None = None  # degrees, None when this example is not rotated
    jitter: tuple[tuple[str, float], ...] | None = None  # (adjustment, amount) in the order applied
    background: tuple[int, int, int] = (255, 255, 255)  # what transparent pixels are composited over


def plan_transform(
    original_size: tuple[int, int], target: tuple[int, int], options: AugmentOptions, rng: random.Random
) -> ImagePlan:
    """Draw one example's augmentations for an image of `original_size` trained at `target`.

    Draws from `rng`, in this order and only for enabled steps: rotation (chance, then angle), flip, crop
    (top, then left), color jitter (four amounts, then their order).
    """
    resized = _cover_size(original_size, target)
    rotation = None
    if options.random_rotation and rng.random() < options.rotation_prob:
        rotation = rng.uniform(-options.rotation_degrees, options.rotation_degrees)
    flip = options.random_flip and rng.random() < 0.5
    crop = _crop_origin(resized, target, options.center_crop, rng)
    jitter = _draw_jitter(options, rng) if options.color_jitter else None
    return ImagePlan(target, resized, crop, flip, options.interpolation, rotation, jitter, options.background)


def apply_plan(image: Image.Image, plan: ImagePlan) -> torch.Tensor:
    """The planned compositing over the background, resize (to cover the target), rotation, flip, crop and
    jitter: a (3, H, W) tensor in [-1, 1].

    `image` is already upright and 8-bit (`upright_image`), as every caller has it: the plan was drawn for
    the displayed size. Transparency is flattened first, so resizing never blends in the colour hidden
    under transparent pixels."""
    image = _flatten(image, plan.background)
    image = image.resize(plan.resized[::-1], resample=INTERPOLATIONS[plan.interpolation])
    if plan.rotation is not None:
        image = _rotate(image, plan.rotation)
    if plan.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    (top, left), (height, width) = plan.crop_top_left, plan.target
    image = image.crop((left, top, left + width, top + height))
    for adjustment, amount in plan.jitter or ():
        image = JITTER_ADJUSTMENTS[adjustment](image, amount)
    return _to_tensor(image)


def transform_image(
    image: Image.Image, options: AugmentOptions, rng: random.Random, target: tuple[int, int] | None = None
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Plan and apply in one call, at `target` (default: the square of side `options.resolution`).

    Returns the tensor, the original (height, width) and the crop's (top, left) in the resized (and flipped)
    image, which are the real values SDXL's add_time_ids need. EXIF orientation is applied first, so
    "original" means the image as it is displayed.
    """
    upright = upright_image(image)
    original_size = (upright.height, upright.width)
    plan = plan_transform(original_size, target or (options.resolution, options.resolution), options, rng)
    return apply_plan(upright, plan), original_size, plan.crop_top_left


def upright_image(image: Image.Image) -> Image.Image:
    """The image as displayed (EXIF orientation applied), in RGB, or RGBA when it has transparency (which
    `apply_plan` composites over the plan's background); high-bit-depth grey scaled to 8 bits."""
    image = _to_8_bit(ImageOps.exif_transpose(image))
    return image.convert("RGBA" if image.has_transparency_data else "RGB")


def _flatten(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """An RGBA image composited over an opaque background, as RGB; an RGB image unchanged."""
    if image.mode != "RGBA":
        return image
    return Image.alpha_composite(Image.new("RGBA", image.size, (*background, 255)), image).convert("RGB")


def _to_8_bit(image: Image.Image) -> Image.Image:
    """High-bit-depth grey (PIL modes I;16*, I and F) scaled to 8 bits: PIL's own conversion to RGB clips at 255,
    which turns most of a 16-bit image white. 16-bit modes span 65535; I holding values above 255 is taken as
    16-bit too; F in [0, 1] spans 1."""
    if not (image.mode.startswith("I;16") or image.mode in ("I", "F")):
        return image
    pixels = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16") or (image.mode == "I" and pixels.max() > 255):
        full_scale = 65535.0
    elif image.mode == "F" and pixels.max() <= 1.0:
        full_scale = 1.0
    else:
        full_scale = 255.0
    return Image.fromarray(np.clip(np.rint(pixels * (255.0 / full_scale)), 0, 255).astype(np.uint8), mode="L")


def _cover_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the image scaled, keeping its aspect ratio, to just cover `target`."""
    scale = max(target[0] / size[0], target[1] / size[1])
    return max(target[0], round(size[0] * scale)), max(target[1], round(size[1] * scale))


def _rotate(image: Image.Image, angle: float) -> Image.Image:
    """Rotate by `angle` degrees (bicubic, same size).

    The corners are filled by mirroring the image at its edges instead of black, so the model is not
    taught black wedges: the image is reflect-padded just enough to cover the rotated frame, rotated about
    its unchanged centre, and cut back to its size.
    """
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


def _crop_origin(size: tuple[int, int], target: tuple[int, int], center: bool, rng: random.Random) -> tuple[int, int]:
    """(top, left) of a target-sized crop from an image of `size`: centred (rounded down), or uniform over all
    valid positions."""
    spare_y, spare_x = size[0] - target[0], size[1] - target[1]
    if center:
        return spare_y // 2, spare_x // 2
    top = rng.randint(0, spare_y)
    left = rng.randint(0, spare_x)
    return top, left


def _draw_jitter(options: AugmentOptions, rng: random.Random) -> tuple[tuple[str, float], ...]:
    """Brightness, contrast, saturation and hue amounts, in an rng-shuffled order like torchvision's.

    All four amounts are drawn first (a fixed number of draws), then the order is shuffled.
    """
    steps = [
        ("brightness", _jitter_factor(options.brightness, rng)),
        ("contrast", _jitter_factor(options.contrast, rng)),
        ("saturation", _jitter_factor(options.saturation, rng)),
        ("hue", rng.uniform(-options.hue, options.hue)),
    ]
    rng.shuffle(steps)
    return tuple(steps)


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


JITTER_ADJUSTMENTS = {
    "brightness": partial(_enhance, ImageEnhance.Brightness),
    "contrast": partial(_enhance, ImageEnhance.Contrast),
    "saturation": partial(_enhance, ImageEnhance.Color),
    "hue": _shift_hue,
}


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image to a contiguous (3, H, W) float32 tensor scaled to [-1, 1]."""
    pixels = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


# ---------------------------------------------------------------------------------------------------------
# Torch dataset and collation


class TrainingExamples(torch.utils.data.Dataset):
    """Rows of a checked `datasets.Dataset` as augmented training examples.

    Example `index` in epoch `e` uses `example_rng(seed, e, index)`: first the caption draw, then the image
    draws (see `plan_transform`). Each image trains at its bucket in `layout` (default: the square of side
    `augment.resolution`). With `load_pixels` off no image is read: items carry the plan only, and the
    latent cache supplies the latents. Call `set_epoch` before each epoch; with data-loader workers, do not
    use `persistent_workers=True`, or the workers keep the epoch they were started with.
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        image_column: str,
        caption_column: str,
        augment: AugmentOptions,
        captions: CaptionOptions,
        seed: int,
        layout=None,
        load_pixels: bool = True,
    ):
        if layout is None and not load_pixels:
            raise ValueError("TrainingExamples: without pixels the image sizes must come from a bucket layout")
        self.dataset = dataset
        self.image_column = image_column
        self.caption_column = caption_column
        self.caption_rows = dataset.select_columns([caption_column])  # reading a caption decodes no image
        self.augment = augment
        self.captions = captions
        self.seed = seed
        self.layout = layout
        self.load_pixels = load_pixels
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose augmentations `__getitem__` draws."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def target(self, index: int) -> tuple[int, int]:
        """(height, width) this image trains at."""
        return self.layout.targets[index] if self.layout else (self.augment.resolution, self.augment.resolution)

    def image(self, index: int) -> Image.Image:
        """The image as displayed (see `upright_image`)."""
        return upright_image(self.dataset[index][self.image_column])

    def caption_texts(self) -> set[str]:
        """Each row's captions as trained, in their written order (for length checks: shuffling keeps the tags)."""
        options = self.captions
        return {joined(tags_of(text, options), options) for row in self.caption_rows for text in caption_choices(row[self.caption_column])}

    def caption_variants(self, limit: int) -> set[str] | None:
        """Every caption an example can train with ("" when captions may drop out), or None past `limit`."""
        variants: set[str] = set()
        for row in self.caption_rows:
            found = caption_variants(row[self.caption_column], self.captions, limit - len(variants))
            if found is None:
                return None
            variants |= found
        return variants

    def fixed_plans(self, index: int) -> list[ImagePlan]:
        """The plans this image can have in any epoch when only the flip varies (see `cache.resolve_caching`):
        the latent cache precomputes exactly these."""
        plan = plan_transform(self.layout.sizes[index], self.target(index), self.augment, random.Random(0))
        flips = (False, True) if self.augment.random_flip else (False,)
        return [replace(plan, flip=flip) for flip in flips]

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        rng = example_rng(self.seed, self.epoch, index)
        caption = caption_for(self.caption_rows[index][self.caption_column], self.captions, rng,
                              example_rng(self.seed, self.epoch, f"{index}:caption"))  # fmt: skip
        image = self.image(index) if self.load_pixels else None
        original_size = (image.height, image.width) if image is not None else self.layout.sizes[index]
        plan = plan_transform(original_size, self.target(index), self.augment, rng)
        item = {"caption": caption, "original_size": original_size, "crop_top_left": plan.crop_top_left, "index": index, "plan": plan}
        if image is not None:
            item["pixel_values"] = apply_plan(image, plan)
        return item


def collate_examples(examples: list[dict]) -> dict | None:
    """Batch `TrainingExamples` items for a DataLoader (pixels only when the items carry them); None for a
    process's empty slice of a small global batch."""
    if not examples:
        return None
    batch = {
        "captions": [e["caption"] for e in examples],
        "original_sizes": torch.tensor([e["original_size"] for e in examples], dtype=torch.long),
        "crop_top_lefts": torch.tensor([e["crop_top_left"] for e in examples], dtype=torch.long),
        "indices": torch.tensor([e["index"] for e in examples], dtype=torch.long),
        "plans": [e["plan"] for e in examples],
    }
    if "pixel_values" in examples[0]:
        batch["pixel_values"] = torch.stack([e["pixel_values"] for e in examples]).contiguous().float()
    return batch
