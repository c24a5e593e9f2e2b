"""Captions as trained: one of an image's captions (several: a list in the metadata, or one per line of its
.txt file), `caption_prefix` and `caption_suffix` around it, its tags shuffled with the first `keep_tokens`
in place (kohya's shuffle_caption), the trigger word in front, and dropped to "" at `caption_dropout_rate`
for classifier-free guidance. The choices come from the example's own RNG (see `TrainingExamples`), so a
run's captions are reproducible and resume exactly; `caption_variants` lists every caption that can occur,
for the text-embedding cache."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from itertools import permutations

from ..settings import check_range


@dataclass(frozen=True)
class CaptionOptions:
    """How `caption_for` rewrites captions (the caption_* parameters and the trigger word)."""

    trigger_word: str
    caption_dropout_rate: float
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_separator: str = ","
    caption_prefix: str = ""
    caption_suffix: str = ""

    def __post_init__(self):
        check_range("caption_dropout_rate", self.caption_dropout_rate, 0.0, 1.0)


def caption_choices(caption) -> list[str]:
    """An image's captions, cleaned: a list (metadata), or the lines of a text; [""] when it has none. None
    and NaN (empty cells in CSV metadata) are no caption."""
    if caption is None or (isinstance(caption, float) and math.isnan(caption)):
        return [""]
    lines = caption if isinstance(caption, (list, tuple)) else str(caption).splitlines()
    return [line.strip() for line in map(str, lines) if line.strip()] or [""]


def caption_for(caption, options: CaptionOptions, rng: random.Random, variant_rng: random.Random) -> str:
    """The caption to train with. Dropout draws exactly one number from `rng`, so the image draws after it
    do not depend on the caption settings; the choice of caption and the shuffle draw from `variant_rng`."""
    choices = caption_choices(caption)
    text = choices[variant_rng.randrange(len(choices))]
    kept, rest = kept_and_rest(text, options)
    if options.shuffle_caption:
        variant_rng.shuffle(rest)
    drop = rng.random() < options.caption_dropout_rate
    return "" if drop else joined(kept + rest, options)


def tags_of(text: str, options: CaptionOptions) -> list[str]:
    """The caption with its prefix and suffix (a space between: parameter values come stripped), split at the
    separator into its tags."""
    framed = " ".join(part for part in (options.caption_prefix, text, options.caption_suffix) if part) if text else text
    return [tag.strip() for tag in framed.split(options.caption_separator) if tag.strip()]


def kept_and_rest(text: str, options: CaptionOptions) -> tuple[list[str], list[str]]:
    """The caption's tags split where shuffling starts: the first keep_tokens stay in place."""
    tags = tags_of(text, options)
    return tags[: options.keep_tokens], tags[options.keep_tokens :]


def joined(tags: list[str], options: CaptionOptions) -> str:
    """The tags as one caption, the trigger word in front (always: shuffling never moves it)."""
    separator = f"{options.caption_separator.strip()} " if options.caption_separator.strip() else options.caption_separator
    trigger = options.trigger_word.strip()
    return separator.join(([trigger] if trigger else []) + tags)


def caption_variants(caption, options: CaptionOptions, limit: int) -> set[str] | None:
    """Every caption `caption_for` can give this row ("" with dropout), or None when there are more than `limit`
    (shuffling n tags makes n! orders)."""
    variants = {""} if options.caption_dropout_rate > 0 else set()
    for text in caption_choices(caption):
        kept, rest = kept_and_rest(text, options)
        orders = math.factorial(len(rest)) if options.shuffle_caption else 1
        if len(variants) + orders > limit:
            return None
        variants |= {joined(kept + list(order), options) for order in (permutations(rest) if options.shuffle_caption else [rest])}
    return variants
