"""Latent and text-embedding caches: each image and caption is encoded once before training, not at every step.

A cached tensor is stored under a key that hashes everything that shapes it. Latents: the image's content,
its `ImagePlan` (bucket, resize, crop box, flip, interpolation) and the VAE (config, weights, dtype). Text:
the caption as trained (trigger word in front) and the text encoders and tokenizers (config, weights,
dtype, vocabulary). Changing any of them gives a new key, so a stale tensor is never read. Caches live in
memory for one run by default; with `cache_dir` they are safetensors files, written atomically, that later
runs reuse and a stopped precomputation resumes from.

Precision: latents are stored in fp32 (what `encode_images` returns whatever the VAE's dtype, and what the
objective noises), text embeddings in the dtype the encoders produce (bf16 when the model runs in bf16):
exactly the tensors an uncached step would feed the denoiser.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .data import ImagePlan, TrainingExamples, apply_plan, image_digests
from .objectives import element_weights
from .export import READABLE_FILE, atomic_path, require_writable_folder
from .quantization import plain_tensors

# Config entries that say where a model came from or which library saved it, not what it computes.
PROVENANCE_KEYS = frozenset({"_name_or_path", "_commit_hash", "_diffusers_version", "transformers_version", "_use_default_values"})
CACHE_FORMAT = 1  # bump when the meaning of a cached tensor changes, so older files are never read
TEXT_CACHE_LIMIT = 4096  # captions the text cache encodes before training at the most (shuffled tags multiply them)
LARGE_MEMORY_CACHE = 8 * 1024**3  # an in-memory cache this large is said, with cache_dir as the way to keep it on disk


def resolve_caching(cfg, log=print, text_reads_controls: bool = False):
    """The config with the caches that cannot apply turned off (with a note saying why), checked before any
    weights load: latents when an augmentation gives an image other pixels in every epoch (a flip only
    mirrors them, and both mirror images are cached), and then text too where the text encoder reads the
    control images with the prompt (`text_reads_controls`); text when the text encoder trains."""
    changes = {}
    varying = [name for name, on in {"center_crop": not cfg.center_crop, "color_jitter": cfg.color_jitter,
                                     "random_rotation": cfg.random_rotation}.items() if on]  # fmt: skip
    reasons = ", ".join(_VARYING_REASON[name] for name in varying) + " gives every epoch other pixels"
    fixed_pixels = "(set center_crop on and color_jitter and random_rotation off to cache them)"
    if cfg.cache_latents and varying:
        log(f"cache_latents: off, because {reasons}; images are encoded at every step {fixed_pixels}")
        changes["cache_latents"] = False
    if cfg.cache_text_embeddings and varying and text_reads_controls:
        log(f"cache_text_embeddings: off, because the text encoder reads the control images and {reasons}; prompts are encoded "
            f"with them at every step {fixed_pixels}")  # fmt: skip
        changes["cache_text_embeddings"] = False
    if cfg.cache_text_embeddings and cfg.train_text_encoder:
        log("cache_text_embeddings: off, because the text encoder trains and its embeddings change every step")
        changes["cache_text_embeddings"] = False
    cfg = cfg.replace(**changes) if changes else cfg
    if cfg.cache_dir and (cfg.cache_latents or cfg.cache_text_embeddings):
        require_writable_folder(Path(cfg.cache_dir).expanduser(), "cache_dir")
    return cfg


_VARYING_REASON = {"center_crop": "a random crop (center_crop off)", "color_jitter": "color_jitter", "random_rotation": "random_rotation"}


# ---------------------------------------------------------------------------------------------------------
# Stores


class MemoryStore:
    """Cached tensors for this run only."""

    def __init__(self):
        self.entries: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def bytes(self) -> int:
        return sum(t.nbytes for entry in self.entries.values() for t in entry.values())

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        return self.entries.get(key)

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        self.entries[key] = tensors


class DiskStore:
    """Cached tensors as `<root>/<key[:2]>/<key>.safetensors`, each written atomically. A file that cannot be
    read (truncated by a crash of another tool, or corrupted) is reported by name and recomputed."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return load_file(str(path))
        except Exception as error:
            warnings.warn(f"cache_dir: {path} cannot be read ({type(error).__name__}: {error}); recomputing it", stacklevel=2)
            return None

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        with atomic_path(self.path(key)) as tmp:
            save_file({name: t.contiguous() for name, t in tensors.items()}, str(tmp))
            os.chmod(tmp, READABLE_FILE)


# ---------------------------------------------------------------------------------------------------------
# Keys


def digest(*parts) -> str:
    """SHA-256 of JSON-encoded parts: a cache key."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def module_identity(module: torch.nn.Module) -> str:
    """A hash of a module's class, config, and every weight's name, dtype, shape and bytes."""
    sha = hashlib.sha256(type(module).__name__.encode())
    config = getattr(module, "config", None)  # a Diffusers FrozenDict or a Transformers PretrainedConfig
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    config = {k: v for k, v in config.items() if k not in PROVENANCE_KEYS}
    sha.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in module.state_dict().items():
        sha.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        for part in plain_tensors(tensor):
            sha.update(part.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()



def tokenizer_identity(tokenizer) -> str:
    """A hash of a tokenizer's full definition (vocabulary, merges, normalisation, special tokens, length); of a
    processor's, its tokenizer's and its image processor's settings."""
    if hasattr(tokenizer, "image_processor"):
        settings = json.dumps(tokenizer.image_processor.to_dict(), sort_keys=True, default=str)
        return digest(type(tokenizer).__name__, tokenizer_identity(tokenizer.tokenizer), settings)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return digest(type(tokenizer).__name__, tokenizer.model_max_length, definition)


def text_identity(family) -> str:
    """Everything besides the caption that shapes a text embedding: the family's encoding code and its text
    encoders and tokenizers."""
    components = family.pipe.components
    parts = [family.name]
    for name in sorted(components):
        component = components[name]
        if name.startswith("text_encoder") and component is not None:
            parts.append((name, module_identity(component)))
        elif name in family.description.tokenizers and component is not None:
            parts.append((name, tokenizer_identity(component)))
    return digest(*parts)


# ---------------------------------------------------------------------------------------------------------
# Caches


def fill_store(store, groups: list[list], key, encode, batch_size: int, desc: str) -> tuple[int, int]:
    """Encode the items of `groups` that `store` lacks, `batch_size` at a time within a group (a group's items
    encode to tensors of one shape), and store each under `key(item)`. `encode(chunk)` returns one dict of
    tensors per item. Returns (encoded, reused); a progress bar counts the items encoded."""
    missing = [[item for item in group if store.get(key(item)) is None] for group in groups]
    reused = sum(map(len, groups)) - sum(map(len, missing))
    chunks = [group[i : i + batch_size] for group in missing for i in range(0, len(group), batch_size)]
    with tqdm(total=sum(map(len, chunks)), desc=desc, disable=not chunks) as progress:
        for chunk in chunks:
            for item, tensors in zip(chunk, encode(chunk)):
                store.put(key(item), tensors)
            progress.update(len(chunk))
    return sum(map(len, chunks)), reused


class LatentCache:
    """VAE latents of every (image, plan) the run trains on; with masked loss each with its mask, area-averaged
    to the latent grid (what `objectives.element_weights` makes of it, so the loss reads it unchanged)."""

    def __init__(self, store, vae_identity: str, image_ids: list[str]):
        self.store = store
        self.vae_identity = vae_identity
        self.image_ids = image_ids
        self.computed = self.reused = 0

    def key(self, row: int, plan: ImagePlan) -> str:
        return digest("latents", CACHE_FORMAT, self.vae_identity, self.image_ids[row], plan)

    def fill(self, examples: TrainingExamples, family, batch_size: int) -> None:
        """Encode every (image, plan) not yet stored, batched per bucket."""

        def encode(chunk):
            images = [examples.image(row) for row, _ in chunk]
            pixels = torch.stack([apply_plan(image, plan) for image, (_, plan) in zip(images, chunk)])
            entries = [{"latents": latent.clone()} for latent in family.encode_images(pixels).cpu()]
            if examples.masked:
                for entry, image, (row, plan) in zip(entries, images, chunk):
                    entry["mask"] = element_weights(examples.mask(row, image, plan)[None], entry["latents"][None])[0]
            if examples.references:
                controls = torch.stack([examples.controls(row, image.size, plan) for image, (row, plan) in zip(images, chunk)])
                for entry, encoded in zip(entries, encode_controls(family, controls).cpu()):
                    entry[CONTROLS] = encoded.clone()
            return entries

        self.computed, self.reused = fill_store(self.store, plans_by_bucket(examples), lambda item: self.key(*item),
                                                encode, batch_size, "caching latents")  # fmt: skip

    def lookup(self, rows, plans: list[ImagePlan]) -> dict[str, torch.Tensor]:
        entries = [self._get(int(row), plan) for row, plan in zip(rows, plans)]
        return {name: torch.stack([entry[name] for entry in entries]) for name in entries[0]}

    def _get(self, row: int, plan: ImagePlan) -> dict[str, torch.Tensor]:
        entry = self.store.get(self.key(row, plan))
        if entry is None:
            raise RuntimeError(f"latent cache: no entry for image {row} with {plan}; the cache was filled for other plans")
        return entry


def plans_by_bucket(examples: TrainingExamples) -> list[list[tuple[int, ImagePlan]]]:
    """Every (row, plan) the caches precompute (each row's fixed plans), grouped by bucket: a group encodes as one shape."""
    by_bucket: dict[tuple[int, int], list[tuple[int, ImagePlan]]] = {}
    for row in range(examples.row_count):
        for plan in examples.fixed_plans(row):
            by_bucket.setdefault(plan.target, []).append((row, plan))
    return list(by_bucket.values())


CONTROLS = "control_latents"  # an edit model's encoded control images, (B, references, C, h, w), beside the text in `predict`'s conditioning


def encode_controls(family, pixels: torch.Tensor) -> torch.Tensor:
    """Control images (B, references, 3, H, W) encoded as the targets are: (B, references, C, h, w)."""
    batch, references = pixels.shape[:2]
    latents = family.encode_images(pixels.flatten(0, 1))
    return latents.unflatten(0, (batch, references))


def with_controls(text: dict[str, torch.Tensor], controls: torch.Tensor | None, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The conditioning `predict` takes: the text embeddings, and an edit model's control latents; on `device` where given."""
    conditioning = text if controls is None else {**text, CONTROLS: controls}
    return conditioning if device is None else {name: t.to(device) for name, t in conditioning.items()}


SEQUENCE_MASK = "text_mask"  # an encoding entry marking, as a prefix, the text tokens of a caption that count


def without_padding(entry: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A caption's encoding cut to its own length where a `text_mask` marks it (Z-Image, Qwen-Image): padding belongs
    to the batch it was encoded in, and cached, it would follow a caption into every other batch."""
    if SEQUENCE_MASK not in entry:
        return entry
    full, length = len(entry[SEQUENCE_MASK]), int(entry[SEQUENCE_MASK].sum())
    return {name: t[:length] if t.dim() and t.shape[0] == full else t for name, t in entry.items()}


def stacked(entries: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A batch of cached encodings, those cut by `without_padding` zero-padded (mask included) to the longest."""
    if SEQUENCE_MASK not in entries[0]:
        return {name: torch.stack([entry[name] for entry in entries]) for name in entries[0]}
    longest = max(len(entry[SEQUENCE_MASK]) for entry in entries)
    pad = lambda t, length: torch.nn.functional.pad(t, (0, 0) * (t.dim() - 1) + (0, longest - length)) if t.dim() and t.shape[0] == length else t  # noqa: E731
    return {name: torch.stack([pad(entry[name], len(entry[SEQUENCE_MASK])) for entry in entries]) for name in entries[0]}


class TextCache:
    """Text-encoder outputs of every caption the run trains with, "" (caption dropout) included; where the text
    encoder reads the controls with the prompt (`text_reads_controls`), of every caption of each row with the
    row's controls at each plan they can have, keyed by `controls_key(row, plan)` too."""

    def __init__(self, store, identity: str, controls_key=None):
        self.store = store
        self.identity = identity
        self.controls_key = controls_key
        self.computed = self.reused = 0

    def key(self, caption: str, row: int | None = None, plan: ImagePlan | None = None) -> str:
        controls = () if self.controls_key is None else (self.controls_key(row, plan),)
        return digest("text", CACHE_FORMAT, self.identity, caption, *controls)

    def fill(self, captions: set[str], family, batch_size: int) -> None:
        def encode(chunk):
            return per_caption(family.encode_prompts(chunk), len(chunk))

        self.computed, self.reused = fill_store(self.store, [sorted(captions)], self.key, encode, batch_size,
                                                "caching text embeddings")  # fmt: skip

    def fill_with_controls(self, examples: TrainingExamples, captions: list[set[str]], family, batch_size: int) -> None:
        """Each row's `captions` with its controls at each fixed plan, batched per bucket."""
        groups = [[(caption, row, plan) for row, plan in group for caption in sorted(captions[row])] for group in plans_by_bucket(examples)]

        def encode(chunk):
            controls = {}  # each (row, plan)'s pixels once, whatever its captions
            for _, row, plan in chunk:
                if (row, plan) not in controls:
                    controls[row, plan] = examples.controls(row, examples.image_size(row), plan)
            pixels = torch.stack([controls[row, plan] for _, row, plan in chunk])
            return per_caption(family.encode_text([caption for caption, _, _ in chunk], pixels), len(chunk))

        self.computed, self.reused = fill_store(self.store, groups, lambda item: self.key(*item), encode, batch_size,
                                                "caching text embeddings")  # fmt: skip

    def lookup(self, batch: dict) -> dict[str, torch.Tensor]:
        rows, plans = (batch["rows"].tolist(), batch["plans"]) if self.controls_key is not None else ([None] * len(batch["captions"]),) * 2
        entries = [self.store.get(self.key(caption, row, plan)) for caption, row, plan in zip(batch["captions"], rows, plans)]
        if any(entry is None for entry in entries):
            raise RuntimeError("text cache: a caption of this batch was not cached")
        return stacked(entries)


def per_caption(encoded: dict[str, torch.Tensor], count: int) -> list[dict[str, torch.Tensor]]:
    """A batch's encoding as one entry per caption, on the CPU, cut to its own length (`without_padding`)."""
    return [without_padding({name: t[k].detach().cpu().clone() for name, t in encoded.items()}) for k in range(count)]


# ---------------------------------------------------------------------------------------------------------
# What the training step calls


class Conditioning:
    """Latents and text embeddings of a batch: looked up in the caches that are on, encoded now otherwise."""

    def __init__(self, family, latents: LatentCache | None = None, text: TextCache | None = None):
        self.family = family
        self.latent_cache = latents
        self.text_cache = text

    def __call__(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
        """(latents, the conditioning `predict` takes, the masks of masked loss or None), on the denoiser's device.
        The conditioning is the text embeddings, and for an edit model the control latents (CONTROLS)."""
        device = self.family.denoiser.device
        controls, pixels = None, batch.get("control_pixel_values")
        if self.latent_cache is not None:
            cached = self.latent_cache.lookup(batch["rows"], batch["plans"])
            latents, masks, controls = cached["latents"], cached.get("mask"), cached.get(CONTROLS)
        else:
            latents, masks = self.family.encode_images(batch["pixel_values"]), batch.get("masks")
            if pixels is not None:
                controls = encode_controls(self.family, pixels)
        text = self.text_cache.lookup(batch) if self.text_cache is not None else self.family.encode_text(batch["captions"], pixels)
        return latents.to(device), with_controls(text, controls, device), None if masks is None else masks.to(device)

    def counts(self) -> dict[str, tuple[int, int]]:
        """(computed, reused) entries per cache that is on."""
        caches = {"latents": self.latent_cache, "text": self.text_cache}
        return {name: (cache.computed, cache.reused) for name, cache in caches.items() if cache is not None}


def row_identities(examples: TrainingExamples) -> list[str]:
    """What a disk-cached latent of each row depends on besides its plan and the VAE: the image's bytes, with
    masked loss its mask's bytes (or the alpha channel, which the image's bytes hold) and the floor, and for an
    edit model its control images' bytes."""
    identities = []
    for source in examples.sources:
        images = image_digests(source.dataset, source.image_column)
        if source.masks is not None:
            images = [digest(image, mask, source.mask_floor) for image, mask in zip(images, source.masks.digests(source.dataset))]
        if source.controls is not None:  # the controls' bytes, and the size they train at
            images = [digest(image, controls, source.controls.pairing) for image, controls in zip(images, source.controls.digests())]
        identities += images
    return identities


def build_conditioning(cfg, family, examples: TrainingExamples, log=print) -> Conditioning:
    """Fill the caches the config asks for, then move the encoders they replace off the accelerator (they come
    back only to render evaluation images). Keys hash model weights and image files only for a disk cache:
    an in-memory cache lives and dies with this run's models and images."""
    on_disk = bool(cfg.cache_dir)
    root = Path(cfg.cache_dir).expanduser() if on_disk else None
    latents = text = None
    reads_controls = family.text_reads_controls and examples.references > 0
    keyed_by_row = on_disk and (cfg.cache_latents or (cfg.cache_text_embeddings and reads_controls))
    image_ids = row_identities(examples) if keyed_by_row else [str(row) for row in range(examples.row_count)]
    if cfg.cache_latents:
        vae = f"{module_identity(family.pipe.vae)}:{family.name}" if on_disk else "this run"
        latents = LatentCache(DiskStore(root / "latents") if on_disk else MemoryStore(), vae, image_ids)
        latents.fill(examples, family, cfg.train_batch_size)
    captions = examples.caption_variants(TEXT_CACHE_LIMIT, per_row=reads_controls) if cfg.cache_text_embeddings else None
    if cfg.cache_text_embeddings and captions is None:
        made = (f"there are more than {TEXT_CACHE_LIMIT} prompts with their controls (each caption of each image at each flip; shuffle_caption "
                "multiplies them)") if reads_controls else f"shuffle_caption makes more than {TEXT_CACHE_LIMIT} different captions"  # fmt: skip
        log(f"text cache off: {made}, so each batch's captions are encoded as it trains")
    if captions is not None:
        store, identity = DiskStore(root / "text") if on_disk else MemoryStore(), text_identity(family) if on_disk else "this run"
        if reads_controls:
            text = TextCache(store, identity, lambda row, plan: digest(image_ids[row], plan))
            text.fill_with_controls(examples, captions, family, cfg.train_batch_size)
        else:
            text = TextCache(store, identity)
            text.fill(captions, family, cfg.train_batch_size)
    conditioning = Conditioning(family, latents, text)
    for name, (computed, reused) in conditioning.counts().items():
        log(f"{name} cache: {computed} encoded, {reused} reused" + (f" ({root / name})" if on_disk else " (in memory)"))
    for name, cache in {"latents": latents, "text": text}.items():
        if cache is not None and isinstance(cache.store, MemoryStore) and cache.store.bytes > LARGE_MEMORY_CACHE:
            log(f"{name} cache: {cache.store.bytes / 1024**3:.1f} GiB of host memory; with cache_dir it stays on disk and is read as it trains")
    family.park_encoders(images=latents is not None, text=text is not None)
    examples.load_pixels = latents is None or (reads_controls and text is None)  # a text encoder reading the controls needs their pixels
    return conditioning
