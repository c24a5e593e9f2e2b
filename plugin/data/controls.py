"""Pairs for edit and reference models: each target image comes with control images (the source an instruction
edits, or reference images), one per reference, in one of the layouts users keep them in:

- `control_dir`: a folder holding a file with each target's stem (kohya, ai-toolkit), or several folders
  separated by commas, one per reference;
- the dataset's `control_column` (default `control_image`): in metadata.jsonl/.csv a file name or a list of
  them, relative to the dataset's folder; in a hub or saved dataset, an image or a list of images.

A control follows its target's `ImagePlan` (bucket, resize, crop, flip), resized first to the target's size
when it has another (said once); a model whose pipelines give controls their own resolution (`Pairing.area`) gets
the same picture at that size. Everything about a dataset's controls is checked when it loads, before any
weights: a target without its control, a control that cannot be read, a control that is its own target or
is given twice for one target, rows with different numbers of references."""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import datasets
from PIL import Image, ImageOps

from ..errors import ConfigError
from .sources import files_by_stem, image_paths, open_value, value_bytes
from .transforms import upright_image


@dataclass(frozen=True)
class Pairing:
    """What a model takes of pairs: up to `references` control images per target (0: none), with `optional` only where
    a dataset gives them (else every dataset must), at about `area` pixels in their target's aspect ratio with sides
    multiples of `multiple` (`area` 0: at their target's bucket)."""

    references: int = 0
    optional: bool = False
    area: int = 0
    multiple: int = 1

    def control_target(self, target: tuple[int, int]) -> tuple[int, int]:
        """(height, width) of a control whose target trains at `target`: the edit pipelines' rule
        (calculate_dimensions), sides rounded half to even as Python rounds."""
        if not self.area:
            return target
        ratio = target[1] / target[0]
        width = math.sqrt(self.area * ratio)
        return max(self.multiple, round(width / ratio / self.multiple) * self.multiple), max(self.multiple, round(width / self.multiple) * self.multiple)


@dataclass(frozen=True)
class ControlSource:
    """Each row's control images, undecoded: a file path or a datasets image value ({"bytes", "path"}) per
    reference; and the size rule of the model they are for."""

    values: tuple[tuple[str | dict, ...], ...]
    pairing: Pairing = Pairing()

    @classmethod
    def find(cls, dataset: datasets.Dataset, cfg, folder: str, sizes: list[tuple[int, int]], label: str, pairing: Pairing = Pairing()) -> "ControlSource":
        """The dataset's controls (see the module docstring), checked; `folder` is the dataset's, `sizes` its images'
        (height, width) as displayed."""
        targets = image_paths(dataset, cfg.image_column)
        if folders := control_folders(cfg.control_dir):
            values = tuple(zip(*(files_by_stem(path, targets, label, "control_dir", "control") for path in folders)))
        elif cfg.control_column in dataset.column_names:
            values = tuple(_column_values(dataset, cfg.control_column, Path(folder).expanduser(), label))
        else:
            raise ConfigError(f"{label}: no control images; this model trains on pairs: set control_dir to a folder of controls named like "
                              f"the images, or give each row a {cfg.control_column!r} column naming its control file")  # fmt: skip
        source = cls(values, pairing)
        source._check(targets, sizes, label)
        return source

    @property
    def references(self) -> int:
        return len(self.values[0]) if self.values else 0

    def selected(self, rows: list[int]) -> "ControlSource":
        return replace(self, values=tuple(self.values[i] for i in rows))

    def digests(self) -> list[str]:
        """SHA-256 over each row's control files, in reference order: a disk cache key part."""
        return [hashlib.sha256(b"".join(hashlib.sha256(value_bytes(value)).digest() for value in row)).hexdigest() for row in self.values]

    def images(self, row: int, size: tuple[int, int] | None = None) -> list[Image.Image]:
        """Row `row`'s controls as displayed, in RGB (or RGBA with transparency, as `upright_image` gives), each
        resized to `size` (width, height; its target's) where given."""
        images = []
        for value in self.values[row]:
            with open_value(value) as opened:
                image = upright_image(opened)
            images.append(image if size is None or image.size == size else image.resize(size, resample=Image.Resampling.LANCZOS))
        return images

    def _check(self, targets: list[str | None], sizes: list[tuple[int, int]], label: str) -> None:
        counts = {len(row) for row in self.values}
        if len(counts) > 1:
            first = next(i for i, row in enumerate(self.values) if len(row) != len(self.values[0]))
            raise ConfigError(f"{label}: row {first} has {len(self.values[first])} control images and row 0 has {len(self.values[0])}; "
                              "every target needs the same number of references")  # fmt: skip
        resized = 0
        for target, size, row in zip(targets, sizes, self.values):
            names = [_identity(value) for value in row]
            repeated = sorted({name for name in names if names.count(name) > 1 or (target is not None and name == target)})
            if repeated:
                raise ConfigError(f"{label}: the control {repeated[0]!r} is given twice for the target {target or 'of this row'} (or is the "
                                  "target itself); each reference must be its own image")  # fmt: skip
            for value in row:
                try:
                    with open_value(value) as opened:
                        shown = ImageOps.exif_transpose(opened).size[::-1]
                except (OSError, ValueError) as error:
                    raise ConfigError(f"{label}: the control {_label(value)!r} of {target or 'a row'} cannot be read ({error})") from None
                resized += shown != size
        if resized:
            warnings.warn(f"{label}: {resized} control images differ in size from their target and are resized to it", stacklevel=3)


def control_folders(control_dir: str) -> list[Path]:
    """control_dir's folders, one per reference (separated by commas)."""
    return [Path(name.strip()).expanduser() for name in control_dir.split(",") if name.strip()]


def _column_values(dataset: datasets.Dataset, column: str, folder: Path, label: str) -> list[tuple[str | dict, ...]]:
    """Each row's control column as undecoded values: names resolved against the dataset's folder."""
    feature = dataset.features[column]
    if isinstance(feature, datasets.Image):  # images held in the dataset: read undecoded
        dataset = dataset.cast_column(column, datasets.Image(decode=False))
    elif isinstance(getattr(feature, "feature", None), datasets.Image):  # a list of them
        dataset = dataset.cast_column(column, type(feature)(datasets.Image(decode=False)))
    rows = dataset[column]
    values = []
    for index, entry in enumerate(rows):
        entries = entry if isinstance(entry, (list, tuple)) else [entry]
        if not entries or any(value in (None, "") for value in entries):
            raise ConfigError(f"{label}: row {index} has no control image in its {column!r} column; every target needs one")
        values.append(tuple(_resolved(value, folder, label) for value in entries))
    return values


def _resolved(value: str | dict, folder: Path, label: str) -> str | dict:
    if not isinstance(value, str):
        return value
    path = Path(value).expanduser()
    path = path if path.is_absolute() else folder / path
    if not path.is_file():
        raise ConfigError(f"{label}: the control file {value!r} does not exist (looked for {str(path)!r})")
    return str(path)


def _label(value: str | dict) -> str:
    return value if isinstance(value, str) else value.get("path") or "an image in the dataset"


def _identity(value: str | dict) -> str:
    """What makes two controls the same image: the file, or the bytes of an image held in the dataset."""
    return value if isinstance(value, str) else value.get("path") or hashlib.sha256(value["bytes"]).hexdigest()
