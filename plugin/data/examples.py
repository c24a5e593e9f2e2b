"""Rows as training examples: each example's caption and image plan drawn from its own RNG, and batching."""

import random
from dataclasses import dataclass, replace

import datasets
import torch
from PIL import Image

from .captions import CaptionOptions, caption_choices, caption_for, caption_variants, joined, tags_of
from .controls import ControlSource
from .masks import MaskSource
from .transforms import AugmentOptions, ImagePlan, apply_plan, apply_plan_to_mask, plan_at, plan_transform, upright_image

def example_rng(seed: int, epoch: int, index: int | str) -> random.Random:
    """The RNG for one example in one epoch: a pure function of (seed, epoch, index); an index such as
    "3:caption" gives example 3 a second stream, whose draws leave the first one's untouched.

    Seeding with a string hashes it with SHA-512, which is stable across processes and Python runs
    (unlike `hash()`), so worker processes and restarts draw the same augmentations.
    """
    return random.Random(f"{seed}:{epoch}:{index}")


@dataclass(frozen=True)
class ExampleSource:
    """One dataset as examples are drawn from it: its checked rows, their columns, how its images and captions
    are rewritten, the weight of its examples' loss (prior_loss_weight for regularisation images), and with
    masked loss its masks and the weight they leave on the masked-out pixels (`mask_floor`)."""

    dataset: datasets.Dataset
    image_column: str
    caption_column: str
    augment: AugmentOptions
    captions: CaptionOptions
    loss_weight: float = 1.0
    masks: MaskSource | None = None
    mask_floor: float = 0.0
    controls: ControlSource | None = None


class TrainingExamples(torch.utils.data.Dataset):
    """The rows of one or more `ExampleSource`s as augmented training examples.

    Rows are numbered across the sources in order. An example is one visit of a row in an epoch: `slot_rows`
    lists the row each example visits (a row appears once per repeat; by default each row once), so repeats
    weight the sampling without copying an image, its cache entries or its bucket. Example `index` in epoch
    `e` uses `example_rng(seed, e, index)`: first the caption draw, then the image draws (see
    `plan_transform`), so each repeat of an image draws its own augmentations. Each image trains at its
    bucket in `layout` (default: the square of side `augment.resolution`). With `load_pixels` off no image
    is read: items carry the plan only, and the latent cache supplies the latents (and the masks). Call
    `set_epoch` before each epoch; with data-loader workers, do not use `persistent_workers=True`, or the
    workers keep the epoch they were started with.
    """

    def __init__(self, sources: list[ExampleSource], seed: int, layout=None, load_pixels: bool = True, slot_rows: list[int] | None = None):
        if layout is None and not load_pixels:
            raise ValueError("TrainingExamples: without pixels the image sizes must come from a bucket layout")
        self.sources = list(sources)
        self.row_sources = [(number, local) for number, source in enumerate(self.sources) for local in range(len(source.dataset))]
        self.caption_rows = [source.dataset.select_columns([source.caption_column]) for source in self.sources]  # decode no image
        self.seed = seed
        self.layout = layout
        self.load_pixels = load_pixels
        self.slot_rows = list(range(len(self.row_sources))) if slot_rows is None else list(slot_rows)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose augmentations `__getitem__` draws."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.slot_rows)

    @property
    def row_count(self) -> int:
        return len(self.row_sources)

    @property
    def masked(self) -> bool:
        return any(source.masks is not None for source in self.sources)

    def source(self, row: int) -> tuple[ExampleSource, int]:
        """The source of `row` and the row's index within it."""
        number, local = self.row_sources[row]
        return self.sources[number], local

    def target(self, row: int) -> tuple[int, int]:
        """(height, width) this image trains at."""
        resolution = self.source(row)[0].augment.resolution
        return self.layout.targets[row] if self.layout else (resolution, resolution)

    def image(self, row: int) -> Image.Image:
        """The image as displayed (see `upright_image`)."""
        source, local = self.source(row)
        return upright_image(source.dataset[local][source.image_column])

    def image_size(self, row: int) -> tuple[int, int]:
        """(width, height) of the image as displayed: from the bucket layout (its headers), else the image itself."""
        return self.layout.sizes[row][::-1] if self.layout else self.image(row).size

    def mask(self, row: int, image: Image.Image, plan: ImagePlan) -> torch.Tensor:
        """The row's loss weights at its plan, (1, H, W): the mask lifted to `mask_floor` on the masked-out pixels."""
        source, local = self.source(row)
        mask = apply_plan_to_mask(source.masks.mask(source.dataset, local, image), plan)
        return source.mask_floor + (1.0 - source.mask_floor) * mask

    @property
    def references(self) -> int:
        """Control images per target (edit models; 0 otherwise)."""
        return max((source.controls.references for source in self.sources if source.controls is not None), default=0)

    def controls(self, row: int, image_size: tuple[int, int], plan: ImagePlan) -> torch.Tensor:
        """The row's control images at its plan, resized first to its image's size (width, height); where the model
        gives controls their own resolution, at the plan scaled to it: (references, 3, h, w)."""
        source, local = self.source(row)
        target = source.controls.pairing.control_target(plan.target)
        if target == plan.target:
            return torch.stack([apply_plan(control, plan) for control in source.controls.images(local, image_size)])
        scaled = plan_at(plan, target)  # its resize takes each control from its own size straight to the scaled plan's
        return torch.stack([apply_plan(control, scaled) for control in source.controls.images(local)])

    def caption_texts(self) -> set[str]:
        """Each row's captions as trained, in their written order (for length checks: shuffling keeps the tags)."""
        return {joined(tags_of(text, source.captions), source.captions)
                for source, rows in zip(self.sources, self.caption_rows) for row in rows for text in caption_choices(row[source.caption_column])}  # fmt: skip

    def caption_variants(self, limit: int, per_row: bool = False):
        """Every caption an example can train with ("" when captions may drop out), or None past `limit`; with
        `per_row`, each row's (a list of sets), `limit` then counting a row's captions once per fixed plan (what a text
        cache keyed by the row's controls holds)."""
        rows_variants: list[set[str]] = []
        variants: set[str] = set()
        held = 0  # entries so far: distinct captions, or with `per_row` each row's captions times its plans
        for row, (number, local) in enumerate(self.row_sources):
            source = self.sources[number]
            plans = len(self.fixed_plans(row)) if per_row else 1
            found = caption_variants(self.caption_rows[number][local][source.caption_column], source.captions, (limit - held) // plans)
            if found is None:
                return None
            rows_variants.append(found)
            variants |= found
            held = held + plans * len(found) if per_row else len(variants)
        return rows_variants if per_row else variants

    def fixed_plans(self, row: int) -> list[ImagePlan]:
        """The plans this image can have in any epoch when only the flip varies (see `cache.resolve_caching`):
        the latent cache precomputes exactly these."""
        augment = self.source(row)[0].augment
        plan = plan_transform(self.layout.sizes[row], self.target(row), augment, random.Random(0))
        flips = (False, True) if augment.random_flip else (False,)
        return [replace(plan, flip=flip) for flip in flips]

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        row = self.slot_rows[index]
        number, local = self.row_sources[row]
        source = self.sources[number]
        rng = example_rng(self.seed, self.epoch, index)
        caption = caption_for(self.caption_rows[number][local][source.caption_column], source.captions, rng,
                              example_rng(self.seed, self.epoch, f"{index}:caption"))  # fmt: skip
        image = self.image(row) if self.load_pixels else None
        original_size = (image.height, image.width) if image is not None else self.layout.sizes[row]
        plan = plan_transform(original_size, self.target(row), source.augment, rng)
        item = {"caption": caption, "original_size": original_size, "crop_top_left": plan.crop_top_left, "index": index, "row": row,
                "plan": plan, "loss_weight": source.loss_weight}  # fmt: skip
        if image is not None:
            item["pixel_values"] = apply_plan(image, plan)
            if source.masks is not None:
                item["mask"] = self.mask(row, image, plan)
            if source.controls is not None:
                item["control_pixel_values"] = self.controls(row, image.size, plan)
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
        "rows": torch.tensor([e["row"] for e in examples], dtype=torch.long),
        "plans": [e["plan"] for e in examples],
        "loss_weights": torch.tensor([e["loss_weight"] for e in examples], dtype=torch.float32),
    }
    for name, key in (("pixel_values", "pixel_values"), ("mask", "masks"), ("control_pixel_values", "control_pixel_values")):
        if name in examples[0]:
            batch[key] = torch.stack([e[name] for e in examples]).contiguous().float()
    return batch
