"""Masked loss: a mask per image, white where the pixels count, from one of three places, in this order: a
`mask_dir` holding a file with each image's stem, a mask column of the dataset, or the image's own alpha
channel (a subject cut out of its background). A mask file with transparency gives its alpha, any other its
grey level. The mask follows its image through every `ImagePlan` (`apply_plan_to_mask`); the loss then
area-averages it to the latent grid (`objectives.element_weights`)."""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import datasets
from PIL import Image, ImageOps

from .sources import files_by_stem, image_paths, open_value, value_bytes


@dataclass(frozen=True)
class MaskSource:
    """Where one dataset's masks come from: `files` (one per row, from mask_dir), else `column`, else the alpha."""

    files: tuple[str, ...] | None = None
    column: str | None = None

    @classmethod
    def find(cls, dataset: datasets.Dataset, image_column: str, mask_column: str, mask_dir: str, sizes: list[tuple[int, int]],
             label: str) -> "MaskSource":  # fmt: skip
        """The dataset's masks, checked before training: every image has its file in mask_dir (the missing ones
        are named), and a mask of another size than its image is said (it is resized to fit)."""
        if mask_dir:
            source = cls(files=tuple(files_by_stem(Path(mask_dir).expanduser(), image_paths(dataset, image_column), label, "mask_dir", "mask")))
        elif mask_column in dataset.column_names:
            source = cls(column=mask_column)
        else:
            return cls()
        mismatched = [f"{name} ({mask[1]}x{mask[0]} for {image[1]}x{image[0]})"
                      for name, mask, image in zip(source.labels(dataset), source.sizes(dataset), sizes) if mask != image]  # fmt: skip
        if mismatched:
            warnings.warn(f"masks: {len(mismatched)} of {len(sizes)} masks of {label} differ in size from their image and are "
                          "resized to it: " + ", ".join(mismatched[:10]) + (" ..." if len(mismatched) > 10 else ""), stacklevel=2)  # fmt: skip
        return source

    def raw(self, dataset: datasets.Dataset) -> list:
        """Each row's undecoded mask: a file path or a datasets image value."""
        if self.files is not None:
            return list(self.files)
        return list(dataset.cast_column(self.column, datasets.Image(decode=False))[self.column])

    def digests(self, dataset: datasets.Dataset) -> list[str]:
        """SHA-256 of each row's mask file ("alpha" where the image's own alpha is the mask): a disk cache key part."""
        if self.files is None and self.column is None:
            return ["alpha"] * len(dataset)
        return [hashlib.sha256(value_bytes(value)).hexdigest() for value in self.raw(dataset)]

    def labels(self, dataset: datasets.Dataset) -> list[str]:
        return [value if isinstance(value, str) else (value or {}).get("path") or f"row {i}" for i, value in enumerate(self.raw(dataset))]

    def sizes(self, dataset: datasets.Dataset) -> list[tuple[int, int]]:
        """(height, width) of each mask as displayed."""
        sizes = []
        for value in self.raw(dataset):
            with open_value(value) as mask:
                sizes.append(ImageOps.exif_transpose(mask).size[::-1])
        return sizes

    def mask(self, dataset: datasets.Dataset, index: int, image: Image.Image) -> Image.Image:
        """Row `index`'s mask ("L", the size of `image`, its upright image): white where the loss counts."""
        if self.files is None and self.column is None:
            return image.getchannel("A") if image.mode == "RGBA" else Image.new("L", image.size, 255)
        value = self.files[index] if self.files is not None else dataset.cast_column(self.column, datasets.Image(decode=False))[index][self.column]
        with open_value(value) as opened:
            mask = ImageOps.exif_transpose(opened)
            mask = mask.convert("RGBA").getchannel("A") if mask.has_transparency_data else mask.convert("L")
        return mask if mask.size == image.size else mask.resize(image.size, resample=Image.Resampling.BILINEAR)
