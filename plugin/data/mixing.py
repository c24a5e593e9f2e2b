"""Several datasets in one run, as kohya sd-scripts, OneTrainer and SimpleTuner mix them.

`dataset_name` is the first dataset and each entry of `datasets` one more, with its own `path`, `repeats`,
`is_regularization` and any of the run's data settings (`settings.DATASET_SETTINGS`), which default to the run's. A
folder whose subfolders are named kohya's way, `<repeats>_<name>` (`10_sks dog/`), is one dataset per such
subfolder, with those repeats; an image there without a caption file takes the name as its caption.

An epoch visits every training image `repeats` times (`slot_rows`): repeats weight the sampling without
copying an image, a cache entry or a bucket. Regularisation images (prior preservation) are balanced to the
training images as kohya balances them, and their loss weighs `prior_loss_weight` (Diffusers' DreamBooth and
kohya: the loss is weighted, not the learning rate).
"""

from __future__ import annotations

import random
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import datasets

from ..errors import ConfigError
from ..settings import DATASET_SETTINGS
from .captions import CaptionOptions
from .examples import ExampleSource
from .controls import ControlSource, Pairing
from .masks import MaskSource
from .sources import IMAGE_EXTENSIONS, ImageHeaders, METADATA_FILES, SAVED_DATASET_FILES, load_image_dataset, read_image_headers
from .transforms import AugmentOptions

KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of the run: where it is, how often an epoch visits each image, whether it holds regularisation
    images, and `cfg`, the run's parameters with the dataset's own settings."""

    path: str
    repeats: int
    is_regularization: bool
    cfg: object
    field: str  # how messages name it: dataset_name, datasets[2], or a kohya subfolder of either
    missing_caption: str = ""  # a kohya subfolder's name, the caption of its images without one
    class_prompt: str = ""  # with num_class_images: the base model renders the class images the folder lacks
    num_class_images: int = 0

    @property
    def missing_class_images(self) -> int:
        """How many class images the base model must render into this dataset's folder before it loads."""
        folder = Path(self.path).expanduser()
        if not self.num_class_images:
            return 0
        have = sum(1 for path in folder.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS) if folder.is_dir() else 0
        return max(0, self.num_class_images - have)

    @property
    def augment(self) -> AugmentOptions:
        cfg = self.cfg
        return AugmentOptions(
            resolution=cfg.resolution, center_crop=cfg.center_crop, random_flip=cfg.random_flip, interpolation=cfg.image_interpolation_mode,
            color_jitter=cfg.color_jitter, brightness=cfg.color_jitter_brightness, contrast=cfg.color_jitter_contrast,
            saturation=cfg.color_jitter_saturation, hue=cfg.color_jitter_hue, random_rotation=cfg.random_rotation,
            rotation_degrees=cfg.rotation_degrees, rotation_prob=cfg.rotation_prob, alpha_background=cfg.alpha_background,
        )  # fmt: skip

    @property
    def captions(self) -> CaptionOptions:
        cfg = self.cfg
        return CaptionOptions(cfg.trigger_word, cfg.caption_dropout_rate, cfg.shuffle_caption, cfg.keep_tokens, cfg.caption_separator,
                              cfg.caption_prefix, cfg.caption_suffix)  # fmt: skip


@dataclass(frozen=True)
class Source:
    """A dataset loaded and checked: its rows, their image headers, and with masked loss its masks."""

    spec: DatasetSpec
    dataset: datasets.Dataset
    headers: ImageHeaders
    masks: MaskSource | None = None
    controls: ControlSource | None = None  # an edit model's control images

    def selected(self, rows: list[int]) -> "Source":
        """The source cut to `rows` (a validation split)."""
        headers = ImageHeaders([self.headers.sizes[i] for i in rows], [rows.index(i) for i in self.headers.transparent if i in rows],
                               [self.headers.labels[i] for i in rows])  # fmt: skip
        masks = None if self.masks is None else MaskSource(None if self.masks.files is None else tuple(self.masks.files[i] for i in rows),
                                                           self.masks.column)  # fmt: skip
        controls = None if self.controls is None else self.controls.selected(rows)
        return Source(self.spec, self.dataset.select(rows), headers, masks, controls)


# ---------------------------------------------------------------------------------------------------------
# The datasets a run names


def dataset_specs(cfg) -> list[DatasetSpec]:
    """dataset_name (when set) and every `datasets` entry (their shape checked with the parameters), kohya parent
    folders split into their subfolders; each entry's own settings checked as the run's are."""
    entries = [("dataset_name", {"path": cfg.dataset_name})] if cfg.dataset_name else []
    entries += [(f"datasets[{number}]", entry) for number, entry in enumerate(cfg.datasets)]
    return [spec for field, entry in entries for spec in _kohya_split(_entry_spec(cfg, field, entry))]


def _entry_spec(cfg, field: str, entry: dict) -> DatasetSpec:
    own = {key: entry[key] for key in DATASET_SETTINGS if key in entry}
    try:
        dataset_cfg = cfg.replace(**own) if own else cfg
    except ConfigError as error:
        raise ConfigError(f"{field}: {error}") from None
    return DatasetSpec(entry["path"].strip(), entry.get("repeats", 1), entry.get("is_regularization", False), dataset_cfg, field,
                       class_prompt=entry.get("class_prompt", "").strip(), num_class_images=entry.get("num_class_images", 0))  # fmt: skip


def _kohya_split(spec: DatasetSpec) -> list[DatasetSpec]:
    """A folder holding no images, metadata or saved dataset of its own but `<repeats>_<name>` subfolders is one
    dataset per subfolder (repeats multiplied by the entry's); other subfolders are left out, said."""
    folder = Path(spec.path).expanduser()
    if not folder.is_dir() or any((folder / name).is_file() for name in METADATA_FILES + SAVED_DATASET_FILES):
        return [spec]
    if any(path.suffix.lower() in IMAGE_EXTENSIONS for path in folder.iterdir() if path.is_file()):
        return [spec]
    subfolders = sorted(path for path in folder.iterdir() if path.is_dir())
    named = [(path, KOHYA_FOLDER.match(path.name)) for path in subfolders]
    kohya = [(path, match) for path, match in named if match]
    if not kohya:
        return [spec]
    idle = [path.name for path, match in kohya if int(match[1]) < 1]
    if idle:
        raise ConfigError(f"{spec.field}: subfolders {idle} of {spec.path!r} repeat their images 0 times an epoch; expected "
                          "<repeats>_<name> with repeats of at least 1 (move a folder out to leave it out)")  # fmt: skip
    skipped = [path.name for path, match in named if not match]
    if skipped:
        warnings.warn(f"{spec.field}: subfolders {skipped} of {spec.path!r} are not named <repeats>_<name> like its others; left out",
                      stacklevel=3)  # fmt: skip
    return [DatasetSpec(str(path), spec.repeats * int(match[1]), spec.is_regularization, spec.cfg, f"{spec.field} ({path.name})",
                        match[2].strip()) for path, match in kohya]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Loading, splitting and mixing


def load_sources(cfg, make_class_images=None, pairing: Pairing = Pairing()) -> list[Source]:
    """Every dataset of the run loaded and checked (images, captions, masks, controls: see `load_source`) before
    any weights load; those lacking class images load after `make_class_images(specs)` renders them, so that a
    mistake in any other dataset is said before the base model loads to render. Examples of any two datasets may
    share a batch, so their controls must agree: all with the same number of references, or none."""
    specs = dataset_specs(cfg)
    pending = [spec for spec in specs if spec.missing_class_images]
    if pending and make_class_images is None:
        raise ConfigError(f"{pending[0].field}: {pending[0].missing_class_images} class images are missing and nothing here renders them")
    loaded = {spec.field: load_source(spec, pairing) for spec in specs if spec not in pending}
    if pending:
        make_class_images(pending)
    sources = [loaded.get(spec.field) or load_source(spec, pairing) for spec in specs]
    counts = [source.controls.references if source.controls is not None else 0 for source in sources]
    if len(set(counts)) > 1:
        odd = next(source for source, count in zip(sources, counts) if count != counts[0])
        raise ConfigError(f"{odd.spec.field}: {counts[sources.index(odd)]} control images per target, and {sources[0].spec.field} has "
                          f"{counts[0]}; every dataset of a run needs the same number (or none)")  # fmt: skip
    return sources


def load_source(spec: DatasetSpec, pairing: Pairing = Pairing()) -> Source:
    """One dataset loaded, its headers read, its masks found (with masked_loss), and for a model that takes control
    images (`pairing`) its controls (where optional, only where the dataset gives them: a control_dir, or a
    control column); messages name its field."""
    cfg = spec.cfg
    try:
        dataset = load_image_dataset(spec.path, cfg.image_column, cfg.caption_column, cfg.follow_symlinks, spec.missing_caption)
    except ConfigError as error:  # the loader's messages name dataset_name, the field it usually reads
        raise ConfigError(str(error).replace("dataset_name:", f"{spec.field}:", 1)) from None
    headers = read_image_headers(dataset, cfg.image_column)
    masks = MaskSource.find(dataset, cfg.image_column, cfg.mask_column, cfg.mask_dir, headers.sizes, spec.field) if cfg.masked_loss else None
    wanted = pairing.references and (not pairing.optional or cfg.control_dir.strip() or cfg.control_column in dataset.column_names)
    controls = ControlSource.find(dataset, cfg, spec.path, headers.sizes, spec.field, pairing) if wanted else None
    if controls is not None and controls.references > pairing.references:
        raise ConfigError(f"{spec.field}: {controls.references} control images per target; this model takes at most {pairing.references}")
    return Source(spec, dataset, headers, masks, controls)


def split_sources(sources: list[Source], fraction: float, seed: int) -> tuple[list[Source], list[Source] | None]:
    """(training sources, held-out sources): round(fraction·N) of the N training images (regularisation images
    stay), at least one, drawn by the seed; the rest in their order. A split that would leave no training image
    (or hold none out) is an error."""
    if fraction <= 0:
        return sources, None
    training = [number for number, source in enumerate(sources) if not source.spec.is_regularization]
    rows = [(number, row) for number in training for row in range(len(sources[number].dataset))]
    held = max(1, round(fraction * len(rows)))
    if held >= len(rows):
        raise ConfigError(f"validation_split: {fraction:g} of {len(rows)} images holds out {held}, which leaves no training images; "
                          "lower it, add images, or name a validation_dataset")  # fmt: skip
    chosen = {rows[i] for i in random.Random(f"{seed}:validation").sample(range(len(rows)), held)}
    kept, held_out = [], []
    for number, source in enumerate(sources):
        size = len(source.dataset)
        kept.append(source.selected([row for row in range(size) if (number, row) not in chosen]) if number in training else source)
        out = [row for row in range(size) if (number, row) in chosen]
        if out:
            held_out.append(source.selected(out))
    return [source for source in kept if len(source.dataset)], held_out


def slot_rows(sources: list[Source]) -> list[int]:
    """The row each example of an epoch visits: every training image `repeats` times, then the regularisation
    images as kohya's sd-scripts registers them: in order, each with its repeats, until they match the training
    examples, then one more repeat each in turn while they fall short."""
    offsets = [sum(len(s.dataset) for s in sources[:number]) for number in range(len(sources))]
    counts = Counter()
    for offset, source in zip(offsets, sources):
        if not source.spec.is_regularization:
            counts.update({offset + row: source.spec.repeats for row in range(len(source.dataset))})
    training = sum(counts.values())
    regularization = [(offset + row, source.spec.repeats) for offset, source in zip(offsets, sources) if source.spec.is_regularization
                      for row in range(len(source.dataset))]  # fmt: skip
    registered = 0
    for row, repeats in regularization:
        if registered >= training:
            break
        counts[row] = repeats
        registered += repeats
    while regularization and registered < training:
        for row, _ in regularization:
            counts[row] += 1
            registered += 1
            if registered >= training:
                break
    rows = sorted(counts)
    most = max(counts.values())
    return [row for visit in range(most) for row in rows if counts[row] > visit]


def example_sources(sources: list[Source]) -> list[ExampleSource]:
    """What `TrainingExamples` draws from each source: its options, its loss weight, its masks."""
    return [
        ExampleSource(source.dataset, source.spec.cfg.image_column, source.spec.cfg.caption_column, source.spec.augment,
                      source.spec.captions, source.spec.cfg.prior_loss_weight if source.spec.is_regularization else 1.0, source.masks,
                      source.spec.cfg.masked_loss_floor, source.controls)  # fmt: skip
        for source in sources
    ]


def dataset_table(sources: list[Source], rows: list[int]) -> list[dict]:
    """Per dataset: its name, images, repeats, examples per epoch and share of them (the log's and the card's table)."""
    visits = Counter(rows)
    table, offset = [], 0
    for source in sources:
        size = len(source.dataset)
        examples = sum(visits[row] for row in range(offset, offset + size))
        offset += size
        table.append({"dataset": source.spec.path, "images": size, "repeats": source.spec.repeats, "examples": examples,
                      "share": examples / len(rows), "regularization": source.spec.is_regularization})  # fmt: skip
    return table


def format_dataset_table(table: list[dict]) -> str:
    lines = ["datasets (images x repeats = examples per epoch, share)"]
    for entry in table:
        kind = ", regularisation" if entry["regularization"] else ""
        lines.append(f"  {entry['dataset']}: {entry['images']} x {entry['repeats']} = {entry['examples']} ({entry['share']:.0%}{kind})")
    return "\n".join(lines)
