"""Rows as training examples: each example's caption and image plan drawn from its own RNG, and batching."""

import random
from dataclasses import replace

import datasets
import torch
from PIL import Image

from .captions import CaptionOptions, caption_choices, caption_for, caption_variants, joined, tags_of
from .transforms import AugmentOptions, ImagePlan, apply_plan, plan_transform, upright_image

def example_rng(seed: int, epoch: int, index: int | str) -> random.Random:
    """The RNG for one example in one epoch: a pure function of (seed, epoch, index); an index such as
    "3:caption" gives example 3 a second stream, whose draws leave the first one's untouched.

    Seeding with a string hashes it with SHA-512, which is stable across processes and Python runs
    (unlike `hash()`), so worker processes and restarts draw the same augmentations.
    """
    return random.Random(f"{seed}:{epoch}:{index}")


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
