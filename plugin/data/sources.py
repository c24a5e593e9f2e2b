"""Loading a dataset: a local folder (metadata file, saved dataset or kohya-style images with .txt captions), or
a hub dataset; its files checked to stay inside the folder, its captions read in whatever encoding Windows
tools wrote, its unreadable images dropped with a warning naming each, its image headers read without
decoding a pixel."""

import codecs
import csv
import hashlib
import io
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import datasets
from huggingface_hub import constants as hub_constants
from PIL import Image

from ..errors import ConfigError
from ..hub import require_hub
from .captions import caption_choices

METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
EXIF_ORIENTATION = 0x0112
# Byte-order marks and the codecs that read past them; UTF-32 first, as its little-endian mark begins with UTF-16's.
UNICODE_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16"),
                (codecs.BOM_UTF16_BE, "utf-16"))  # fmt: skip
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def load_image_dataset(dataset_name: str, image_column: str, caption_column: str, follow_symlinks: bool = False,
                       missing_caption: str = "") -> datasets.Dataset:
    """Load `dataset_name` (local folder or hub id) and return it checked and ready for `TrainingExamples`.

    Unreadable images are dropped with one warning that names each of them rather than failing the run:
    one broken file in a 1000-image scrape should not cost the user a training run, but they must see
    which files were left out. Only a dataset with no readable image left is an error. A local folder's
    files stay inside it (`check_dataset_paths`).
    """
    if image_column == caption_column:
        raise ConfigError(f"image_column and caption_column: both are {image_column!r}; expected two different columns")
    dataset = _resolve_dataset(dataset_name, image_column, caption_column, follow_symlinks, missing_caption)
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


def _resolve_dataset(dataset_name: str, image_column: str, caption_column: str, follow_symlinks: bool, missing_caption: str) -> datasets.Dataset:
    """Pick the loader that fits what `dataset_name` points at (see `load_image_dataset`); `missing_caption`
    is the caption of a kohya folder's images without a .txt file (the name in `<repeats>_<name>`)."""
    path = Path(os.path.expanduser(dataset_name))
    if path.is_dir():
        check_dataset_paths(path, follow_symlinks)
        if any((path / name).is_file() for name in METADATA_FILES):
            return _load_imagefolder(path)
        if any((path / name).is_file() for name in SAVED_DATASET_FILES):
            return _load_saved(path)
        return _load_kohya_folder(path, image_column, caption_column, missing_caption)
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


def _load_kohya_folder(path: Path, image_column: str, caption_column: str, missing_caption: str = "") -> datasets.Dataset:
    """Build a dataset from images with same-name .txt captions (kohya style), searching subfolders too."""
    images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not images:
        raise ConfigError(
            f"dataset_name: folder {str(path)!r} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) "
            f"and no {' / '.join(METADATA_FILES)}; expected captioned images"
        )
    captions = [_read_caption(image.with_suffix(".txt")) for image in images]
    columns = {image_column: [str(image) for image in images], caption_column: [c or missing_caption for c in captions]}
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
        with open_raw(value) as image:
            image.verify()
        with open_raw(value) as image:
            image.load()
    except Exception as error:
        return _reason(error)
    return None


def open_raw(value: dict) -> Image.Image:
    """Open an undecoded datasets image ({"bytes", "path"}) with PIL."""
    if value.get("bytes") is not None:
        return Image.open(io.BytesIO(value["bytes"]))
    return Image.open(value["path"])


def open_value(value: str | dict) -> Image.Image:
    """Open an image given as a file path or as an undecoded datasets image."""
    return Image.open(value) if isinstance(value, str) else open_raw(value)


def value_bytes(value: str | dict) -> bytes:
    """The encoded bytes of an image given as a file path or as an undecoded datasets image."""
    if isinstance(value, str):
        return Path(value).read_bytes()
    return value["bytes"] if value.get("bytes") is not None else Path(value["path"]).read_bytes()


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
        with open_raw(value) as image:
            width, height = image.size
            if image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
                width, height = height, width
            if image.has_transparency_data:
                transparent.append(index)
        sizes.append((height, width))
    return ImageHeaders(sizes, transparent, labels)


def image_paths(dataset: datasets.Dataset, image_column: str) -> list[str | None]:
    """Each image's file path, None where the dataset holds its bytes only."""
    return [(value or {}).get("path") for value in dataset.cast_column(image_column, datasets.Image(decode=False))[image_column]]


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


def files_by_stem(folder: Path, images: list[str | None], label: str, field: str, what: str) -> list[str]:
    """The file in `folder` with each image's stem (any image extension): a mask or a control per image, found by
    `field` (mask_dir, control_dir); every image without one named in the error. Files matching no image are left
    out, said once."""
    if not folder.is_dir():
        raise ConfigError(f"{field}: {str(folder)!r} is not a folder; expected a folder of {what}s named like {label}'s images")
    by_stem = {path.stem: str(path) for path in sorted(folder.iterdir()) if path.suffix.lower() in IMAGE_EXTENSIONS}
    if any(path is None for path in images):
        raise ConfigError(f"{field}: the images of {label} have no file names to match {what}s by; use a {what} column instead")
    missing = [Path(path).name for path in images if Path(path).stem not in by_stem]
    if missing:
        raise ConfigError(f"{field}: {len(missing)} of {len(images)} images of {label} have no {what} in {str(folder)!r} (a file "
                          f"with the image's name and an image extension): " + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))  # fmt: skip
    extra = sorted(set(by_stem) - {Path(path).stem for path in images})
    if extra:
        warnings.warn(f"{field}: {len(extra)} files in {str(folder)!r} match no image of {label} and are left out: "
                      + ", ".join(Path(by_stem[stem]).name for stem in extra[:10]) + (" ..." if len(extra) > 10 else ""), stacklevel=3)  # fmt: skip
    return [by_stem[Path(path).stem] for path in images]
