"""The registry of model families, and a model's family from its model_index.json."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError
from .base import ModelFamily
from .description import describe_model, read_model_index
from .single_file import describe_single_file, is_single_file, read_header
from .chroma import Chroma
from .flux import Flux
from .flux_kontext import FluxKontext
from .flux2 import Flux2
from .sd import StableDiffusion
from .qwen_image import QwenImage
from .qwen_image_edit import QwenImageEdit, QwenImageEditPlus
from .sd3 import StableDiffusion3
from .sdxl import StableDiffusionXL
from .zimage import ZImage

FAMILIES: tuple[type[ModelFamily], ...] = (StableDiffusion, StableDiffusionXL, StableDiffusion3, Flux, Chroma, ZImage, QwenImage, Flux2, FluxKontext, QwenImageEdit,
                                             QwenImageEditPlus)


def family_by_name(name: str) -> type[ModelFamily]:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ConfigError(f"unknown model family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")


def family_of_index(model_name: str, model_index: dict) -> type[ModelFamily]:
    """The family whose pipeline classes include model_index.json's _class_name."""
    class_name = model_index.get("_class_name")
    for family in FAMILIES:
        if class_name in family.pipeline_class_names:
            return family
    supported = ", ".join(name for family in FAMILIES for name in family.pipeline_class_names)
    raise ConfigError(f"model_name: {model_name!r} is a {class_name}, which this trainer does not support; supported: {supported}")


def detect_family(model_name: str) -> type[ModelFamily]:
    """The family of a local pipeline folder or hub id, from model_index.json alone."""
    return family_of_index(model_name, read_model_index(model_name))


def open_model(model_name: str, model_config: str = "", text_encoder_source: str = "", allow_pickle: bool = False) -> ModelFamily:
    """The model's family, described from its config files (see `describe_model`) or, for a single-file
    checkpoint, from its header and the configs of `model_config` (see `describe_single_file`): every
    setting can be checked against it before `load` reads a single weight."""
    if is_single_file(model_name):
        path = Path(model_name).expanduser()
        header = read_header(path, allow_pickle)
        family, description = describe_single_file(path, header, FAMILIES, model_config, text_encoder_source)
        return family(description)
    model_index = read_model_index(model_name)
    family = family_of_index(model_name, model_index)
    return family(describe_model(model_name, model_index, family.denoiser_name))


def load_model(model_name: str, dtype: torch.dtype) -> ModelFamily:
    """open_model, then load its weights: the family ready for `configure` and training."""
    family = open_model(model_name)
    family.load(dtype)
    return family
