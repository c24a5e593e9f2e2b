"""The registry of model families and detection of a model's family from its model_index.json."""

from __future__ import annotations

from pathlib import Path

from diffusers import DiffusionPipeline

from ..errors import ConfigError
from .base import ModelFamily
from .flux import Flux
from .sd import StableDiffusion
from .sd3 import StableDiffusion3
from .sdxl import StableDiffusionXL

FAMILIES: tuple[type[ModelFamily], ...] = (StableDiffusion, StableDiffusionXL, StableDiffusion3, Flux)


def family_by_name(name: str) -> type[ModelFamily]:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ConfigError(f"unknown model family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")


def detect_family(model_name: str) -> type[ModelFamily]:
    """The family of a local pipeline folder or hub id, from model_index.json's _class_name (no weights read)."""
    if not model_name:
        raise ConfigError("model_name is required: a Diffusers pipeline folder or hub id")
    path = Path(model_name).expanduser()
    looks_local = path.is_absolute() or model_name.startswith((".", "~")) or model_name.count("/") > 1
    if looks_local and not path.is_dir():
        raise ConfigError(f"model_name: folder {model_name!r} does not exist")
    if path.is_dir() and not (path / "model_index.json").is_file():
        raise ConfigError(f"model_name: {model_name!r} has no model_index.json; expected a Diffusers pipeline folder")
    try:
        class_name = DiffusionPipeline.load_config(str(path) if path.is_dir() else model_name)["_class_name"]
    except Exception as error:
        raise ConfigError(f"model_name: cannot read model_index.json of {model_name!r} ({error})") from None
    for family in FAMILIES:
        if class_name in family.pipeline_class_names:
            return family
    supported = ", ".join(name for family in FAMILIES for name in family.pipeline_class_names)
    raise ConfigError(f"model_name: {model_name!r} is a {class_name}, which this trainer does not support; supported: {supported}")
