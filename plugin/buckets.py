"""Aspect-ratio buckets: train each image at a size of about resolution² pixels whose shape is nearest its own,
instead of cutting every photo to a square, and batch only images of one bucket together.

The bucket sides are multiples of a step that is itself a multiple of the family's `resolution_multiple`
(VAE downsampling times patch size), so every bucket's latent is a valid denoiser input. The step is about
resolution/16 (64 px at 1024, as kohya sd-scripts and SimpleTuner use): finer steps make buckets whose
shapes differ by a pixel or two, which only splits batches.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass

import torch

MAX_ASPECT_RATIO = 4.0  # buckets span 1:4 to 4:1


def bucket_step(resolution: int, multiple: int) -> int:
    """The side increment between buckets: about resolution/16, rounded up to a multiple of `multiple`."""
    return max(multiple, math.ceil(resolution / 16 / multiple) * multiple)


def bucket_sizes(resolution: int, multiple: int, max_aspect_ratio: float = MAX_ASPECT_RATIO) -> list[tuple[int, int]]:
    """(height, width) of every bucket, from the tallest to the widest.

    For each width on the step grid, the tallest height on the grid whose area does not exceed resolution²;
    shapes beyond the aspect-ratio bound are left out. The square (resolution, resolution) is always one.
    """
    step = bucket_step(resolution, multiple)
    area = resolution * resolution
    sizes = {(resolution, resolution)}
    for width in range(step, math.ceil(resolution * math.sqrt(max_aspect_ratio)) + step, step):
        height = area // width // step * step
        if height >= step and max(width / height, height / width) <= max_aspect_ratio:
            sizes.add((height, width))
    return sorted(sizes, key=lambda size: size[1] / size[0])


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's, measured as |log(w/h) − log(bw/bh)|.

    On a tie the larger bucket wins (less upscaling); `buckets` order decides any remaining tie.
    """
    height, width = size
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[1] / b[0]) - ratio), -b[0] * b[1]))


@dataclass(frozen=True)
class BucketLayout:
    """Where every image of the dataset trains: its displayed (height, width) and its bucket's."""

    sizes: tuple[tuple[int, int], ...]
    targets: tuple[tuple[int, int], ...]

    @classmethod
    def assign(cls, sizes: list[tuple[int, int]], resolution: int, multiple: int, enabled: bool) -> "BucketLayout":
        """Nearest-aspect buckets when `enabled`, otherwise the one square bucket of side `resolution`."""
        buckets = bucket_sizes(resolution, multiple) if enabled else [(resolution, resolution)]
        return cls(tuple(sizes), tuple(nearest_bucket(size, buckets) for size in sizes))

    @classmethod
    def joined(cls, layouts: list["BucketLayout"]) -> "BucketLayout":
        """The layouts of several datasets, their images numbered in order."""
        return cls(tuple(s for layout in layouts for s in layout.sizes), tuple(t for layout in layouts for t in layout.targets))

    def bucket_ids(self, rows: list[int] | None = None) -> list[int]:
        """A small integer naming the bucket (the order of first appearance) of each image, or of each of `rows`."""
        ids: dict[tuple[int, int], int] = {}
        return [ids.setdefault(self.targets[row], len(ids)) for row in (range(len(self.targets)) if rows is None else rows)]

    def undersized(self) -> list[int]:
        """Images smaller than their bucket in either side: they are upscaled to cover it."""
        return [i for i, (size, target) in enumerate(zip(self.sizes, self.targets)) if size[0] < target[0] or size[1] < target[1]]

    def upscale(self, index: int) -> float:
        """How much image `index` is enlarged to cover its bucket (1 or less: not at all)."""
        (height, width), (target_height, target_width) = self.sizes[index], self.targets[index]
        return max(target_height / height, target_width / width)

    def table(self) -> str:
        """The bucket table printed at the start of a run: size → image count, widest last."""
        counts = Counter(self.targets)
        rows = [f"  {w:>5} x {h:<5} {counts[(h, w)]:>6}" for h, w in sorted(counts, key=lambda s: s[1] / s[0])]
        return "\n".join(["buckets (width x height: images)", *rows])


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of image indices, each from one bucket, in an order that is a pure function of (seed, epoch).

    The epoch's permutation of all images does not depend on the batch size: walking it, each image joins
    its bucket's open batch, and a batch is emitted when it is full; the buckets' unfilled batches follow
    at the end, so no image is left out. With one bucket the batches are consecutive slices of the
    permutation, so batch 4 sees what two batches of 2 (gradient accumulation) see.

    With `num_processes` > 1 the global batches hold batch_size x num_processes images and each process
    iterates over its slice of every one (an unfilled batch is split as evenly as it goes, so a slice may
    be empty); `shares` gives the weight of each slice's mean loss that makes the processes' average the
    global batch's mean. With `lockstep` (a sharded base, whose forwards are collectives) an empty slice is
    the batch's first image at share 0, so that every process runs a forward for every batch.
    """

    def __init__(self, bucket_ids: list[int], batch_size: int, seed: int, num_processes: int = 1, process_index: int = 0,
                 lockstep: bool = False):  # fmt: skip
        self.bucket_ids = list(bucket_ids)
        self.batch_size = batch_size * num_processes
        self.seed = seed
        self.num_processes = num_processes
        self.process_index = process_index
        self.lockstep = lockstep
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Choose the epoch to yield, leaving out its first `skip` batches (already trained before a resume)."""
        self.epoch = epoch
        self.skip = skip

    def batches(self, epoch: int) -> list[list[int]]:
        """The global batches of an epoch."""
        order = list(range(len(self.bucket_ids)))
        random.Random(f"{self.seed}:{epoch}:order").shuffle(order)
        batches, open_batches = [], {}
        for index in order:
            batch = open_batches.setdefault(self.bucket_ids[index], [])
            batch.append(index)
            if len(batch) == self.batch_size:
                batches.append(open_batches.pop(self.bucket_ids[index]))
        return batches + list(open_batches.values())

    def slices(self) -> list[tuple[list[int], float]]:
        """This process's (indices, share) of each remaining global batch of the current epoch."""
        result = []
        for batch in self.batches(self.epoch)[self.skip :]:
            base, extra = divmod(len(batch), self.num_processes)
            start = self.process_index * base + min(self.process_index, extra)
            size = base + (self.process_index < extra)
            if size == 0 and self.lockstep:
                result.append((batch[:1], 0.0))
            else:
                result.append((batch[start : start + size], size * self.num_processes / len(batch)))
        return result

    def shares(self) -> list[float]:
        return [share for _, share in self.slices()]

    def __iter__(self):
        return iter([indices for indices, _ in self.slices()])

    def __len__(self) -> int:
        return sum(math.ceil(n / self.batch_size) for n in Counter(self.bucket_ids).values())
