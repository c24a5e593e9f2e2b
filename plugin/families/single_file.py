"""Single-file checkpoints: the `.safetensors` (or pickled `.ckpt`) files of A1111, ComfyUI and model sites.

Such a file holds weights in the original (LDM / BFL) layout and no configs, so the architecture comes from
a Diffusers pipeline's configs (`model_config`: a folder or hub id; without it Diffusers' guess for the
file, from the hub), and components the file lacks (the text encoders and VAE of a Flux or SD3 file that
holds only the transformer) load from `text_encoder_source`. Everything here reads the file's header, not
its weights: the family comes from its key names, and converting the header's shapes with Diffusers' own
key mapping proves, before any weight is read, that the file is the denoiser the configs describe.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Mapping

import torch
from accelerate import init_empty_weights
from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES, _should_convert_state_dict_to_diffusers
from diffusers.loaders.single_file_utils import fetch_diffusers_config
from safetensors.torch import load_file

from ..errors import ConfigError
from .description import (
    ModelDescription, check_component_files, component_class, describe_model, is_module_class, read_model_index, safetensors_problem,
)  # fmt: skip

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth")
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
          "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class SingleFileSource:
    """Where a single-file model's pieces come from."""

    path: Path
    config: str  # the Diffusers folder or hub id whose configs describe the file's modules
    components_from: str | None  # text_encoder_source: all but the denoiser load from this folder or hub id


def is_single_file(model_name: str) -> bool:
    return Path(model_name).suffix.lower() in SAFE_SUFFIXES + PICKLE_SUFFIXES and not Path(model_name).expanduser().is_dir()


def read_header(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """The file's tensors as meta tensors of their shapes and dtypes: names and sizes, no data read."""
    if not path.is_file():
        raise ConfigError(f"model_name: file {str(path)!r} does not exist")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ConfigError(f"model_name: {str(path)!r} is a pickled checkpoint, which can carry code; convert it to "
                              ".safetensors, or set allow_pickle_checkpoints if you trust where it came from")  # fmt: skip
        try:
            return pickled_tensors(path, "meta")
        except Exception as error:
            raise ConfigError(f"model_name: cannot read {str(path)!r} as a weights-only checkpoint ({str(error).splitlines()[0]})") from None
    problem = safetensors_problem(path)
    if problem:
        raise ConfigError(f"model_name: {str(path)!r} is {problem}; re-download or re-save the checkpoint")
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return {key: torch.empty(entry["shape"], dtype=DTYPES.get(entry["dtype"], torch.float32), device="meta")
            for key, entry in header.items() if key != "__metadata__"}  # fmt: skip


def pickled_tensors(path: Path, device: str) -> dict[str, torch.Tensor]:
    """A .ckpt's tensors by torch's weights-only unpickler (which runs no code from the file), memory-mapped;
    LDM checkpoints nest them under "state_dict"."""
    tensors = torch.load(path, map_location=device, weights_only=True, mmap=True)
    while isinstance(tensors, dict) and isinstance(tensors.get("state_dict"), dict):
        tensors = tensors["state_dict"]
    return {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}


def has_key(keys, name: str) -> bool:
    """`name` is a key, bare or under a prefix (`model.diffusion_model.`, as LDM files and ComfyUI saves have)."""
    return any(key == name or key.endswith("." + name) for key in keys)


def families_of_file(path: Path, keys, families) -> list[type]:
    """The families whose `single_file_markers` all appear among the file's keys, the most specific first (an
    SDXL UNet has every marker of an SD one, and one more)."""
    matches = [f for f in families if all(has_key(keys, marker) for marker in f.single_file_markers)]
    if not matches:
        raise ConfigError(f"model_name: {str(path)!r} is not a checkpoint of a model this trainer supports (its keys match none of "
                          f"{', '.join(f.title for f in families)}; a Diffusers model is given as its folder)")  # fmt: skip
    return sorted(matches, key=lambda f: -len(f.single_file_markers))


def default_config(path: Path, header: Mapping[str, torch.Tensor]) -> str:
    """Diffusers' choice of hub repo for the file (from key names and shapes), when model_config is empty."""
    try:
        return fetch_diffusers_config(dict(header))["pretrained_model_name_or_path"]
    except Exception:
        raise ConfigError(f"model_config: Diffusers cannot tell which model {str(path)!r} is; set model_config to a Diffusers "
                          "folder or hub id with its architecture's configs") from None  # fmt: skip


def describe_single_file(path: Path, header: Mapping[str, torch.Tensor], families, model_config: str, text_encoder_source: str) -> tuple[type, ModelDescription]:
    """The file's family and the description of its pipeline: the configs of `model_config` (or Diffusers' guess),
    checked against the file's own shapes. With `text_encoder_source` only the file's denoiser is used and the other
    components come from there; without it the file must hold them all. The file's family is the most specific of
    those whose keys it has; where several have the same keys (an edit model's file has its base's: Kontext's Flux's,
    Qwen-Image-Edit's Qwen-Image's), the one the configs' pipeline names."""
    matches = families_of_file(path, header, families)
    field = "model_config" if model_config or not text_encoder_source else "text_encoder_source"
    config = model_config or text_encoder_source or default_config(path, header)
    model_index = read_model_index(config, field)
    alike = [f for f in matches if f.single_file_markers == matches[0].single_file_markers]  # as specific as the most specific
    family = next((f for f in alike if model_index.get("_class_name") in f.pipeline_class_names), matches[0])
    if model_index.get("_class_name") not in family.pipeline_class_names:
        raise ConfigError(f"{field}: {config!r} is a {model_index.get('_class_name')}, but {str(path)!r} is a {family.title} "
                          "checkpoint; give the configs of the file's own architecture")  # fmt: skip
    description = describe_model(config, model_index, family.denoiser_name, field=field, check_files=False)
    _check_denoiser_matches(path, header, description, family, field, config)
    others = [name for name, class_name in description.components.items()
              if class_name is not None and name != family.denoiser_name and is_module_class(_class_of(description, name))]  # fmt: skip
    absent = [name for name in others if not any(key.startswith(family.single_file_components.get(name, "\0")) for key in header)]
    if absent and not text_encoder_source:
        raise ConfigError(f"text_encoder_source: {str(path)!r} holds no {', '.join(absent)}; set text_encoder_source to a "
                          f"Diffusers {family.title} pipeline folder or hub id to take them from")  # fmt: skip
    if text_encoder_source and Path(text_encoder_source).expanduser().is_dir():
        for name in others:
            check_component_files(Path(text_encoder_source).expanduser(), name, _class_of(description, name), "text_encoder_source")
    source = SingleFileSource(path=path, config=config, components_from=text_encoder_source or None)
    return family, dataclasses.replace(description, source=str(path), single_file=source)


def _class_of(description: ModelDescription, name: str) -> type:
    """The class of the pipeline's component `name`."""
    return component_class(description.libraries[name], description.components[name], name)


def diffusers_denoiser_state(family, description: ModelDescription, checkpoint: dict) -> dict:
    """The file's denoiser tensors (real or meta) under Diffusers' names, by Diffusers' key mapping for the
    denoiser class as the family applies it."""
    cls = _class_of(description, family.denoiser_name)
    mapping = SINGLE_FILE_LOADABLE_CLASSES[cls.__name__]["checkpoint_mapping_fn"]
    return family.single_file_to_diffusers(checkpoint, dict(description.denoiser_config), mapping)


def _check_denoiser_matches(path: Path, header, description: ModelDescription, family, field: str, config: str) -> None:
    """Convert the header's shapes as loading will, and compare them with the denoiser the configs build (on
    the meta device): a file of another size or variant is named here, before any weight is read."""
    with init_empty_weights():
        expected = {k: v.shape for k, v in _class_of(description, family.denoiser_name).from_config(description.denoiser_config).state_dict().items()}
    try:
        converted = diffusers_denoiser_state(family, description, dict(header)) if _should_convert_state_dict_to_diffusers(expected, header) else header
    except Exception as error:
        converted, failure = {}, f"{type(error).__name__}: {error}"
    else:
        failure = ""
    missing = [k for k in expected if k not in converted]
    unexpected = [k for k in converted if k not in expected]
    resized = [f"{k} {tuple(converted[k].shape)} vs {tuple(expected[k])}" for k in expected if k in converted and converted[k].shape != expected[k]]
    if failure or missing or unexpected or resized:
        details = failure or "; ".join(f"{what}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
                                       for what, items in (("missing", missing), ("unexpected", unexpected), ("other shape", resized)) if items)  # fmt: skip
        raise ConfigError(f"model_name: {str(path)!r} is not the {family.denoiser_name} that {field} {config!r} describes ({details}); "
                          "give the configs of the file's own architecture")  # fmt: skip


def load_single_file(family, dtype: torch.dtype, quantization: dict):
    """The pipeline from the file. Without text_encoder_source, the whole file loads through Diffusers'
    `from_single_file`; with it, the file gives the denoiser and the rest comes from text_encoder_source. The
    components in `quantization` are quantised as they load (see plugin/quantization.py)."""
    description = family.description
    source, name = description.single_file, family.denoiser_name
    denoiser_class = _class_of(description, name)
    quantized = {"quantization_config": quantization[name]} if name in quantization else {}
    if source.components_from is None:
        if set(quantization) - {name}:
            raise ConfigError("quantize_text_encoders: the text encoders inside a single-file checkpoint load through Diffusers' "
                              "single-file reader, which cannot quantise them; set text_encoder_source to take them from a folder")  # fmt: skip
        denoiser = {name: denoiser_class.from_single_file(str(source.path), config=source.config, subfolder=name, dtype=dtype, **quantized)} if quantized else {}
        return family.pipeline_class.from_single_file(str(source.path), config=source.config, dtype=dtype, **description.loading_tokenizers, **denoiser)
    tensors = pickled_tensors(source.path, "cpu") if source.path.suffix.lower() in PICKLE_SUFFIXES else load_file(str(source.path))
    denoiser = denoiser_class.from_single_file(diffusers_denoiser_state(family, description, tensors), config=source.config,
                                               subfolder=name, dtype=dtype, **quantized)  # fmt: skip
    others = {component: _class_of(description, component).from_pretrained(source.components_from, subfolder=component, dtype=dtype,
                                                                            quantization_config=config)
              for component, config in quantization.items() if component != name}  # fmt: skip
    return family.pipeline_class.from_pretrained(source.components_from, dtype=dtype, **{name: denoiser}, **others, **description.loading_tokenizers)
