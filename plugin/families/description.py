"""What a pipeline is, read from its config files alone: no weights are loaded.

Every setting that depends on the model (resolution multiple, objective defaults, LoRA target names,
inpainting or refiner checkpoints, caption lengths) is checked against this description, so a mistake is
reported in seconds rather than after minutes of loading. For a local folder the files the weights will
come from are checked too: a missing component folder or a truncated safetensors file is named here, in one
line, instead of failing deep inside `from_pretrained`.
"""

from __future__ import annotations

import importlib
import inspect
import json
import struct
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from accelerate import init_empty_weights
from diffusers import DiffusionPipeline

from ..compilation import repeated_blocks
from ..errors import ConfigError
from ..hub import require_hub

if TYPE_CHECKING:
    from .single_file import SingleFileSource

LOCAL_EXAMPLE = "./models/stable-diffusion-xl-base-1.0"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


@dataclass(frozen=True)
class ModelDescription:
    """A pipeline's configs (with every default filled in, as the loaded modules would have them), the names
    of its denoiser's layers, and its tokenizers (small, and handed to the pipeline when it loads)."""

    source: str  # model_name as given: a local folder, a hub id or a single-file checkpoint
    components: Mapping[str, str | None]  # component -> class name; None where the pipeline has none
    libraries: Mapping[str, str]  # component -> the package (or Diffusers pipeline module) of its class
    scheduler_config: Mapping[str, Any]
    vae_config: Mapping[str, Any]
    denoiser_config: Mapping[str, Any]
    denoiser_module_names: tuple[str, ...]  # the linear and convolution layers LoRA can wrap, in full
    denoiser_block_count: int  # its repeated blocks (compilation.repeated_blocks), which offload_blocks counts in
    tokenizers: Mapping[str, Any]  # the components that read text (see `reads_text`): tokenizers, and an edit model's processor
    single_file: SingleFileSource | None = None  # set when model_name is a single-file checkpoint
    stand_ins: tuple[str, ...] = ()  # readers that stand in for a processor this installation cannot load

    @property
    def loading_tokenizers(self) -> dict[str, Any]:
        """The tokenizers to hand Diffusers' loader: a stand-in is left out (None), as Diffusers checks a given
        component against the class the folder names; `ModelFamily.load` registers it afterwards."""
        return {**self.tokenizers, **dict.fromkeys(self.stand_ins)}

    @property
    def denoiser_layer_names(self) -> tuple[str, ...]:
        """The distinct short names of those layers, as a user writes them in lora_target_modules (`to_out.0`
        where the last part is an index)."""
        short = {".".join(name.split(".")[-2:]) if name.split(".")[-1].isdigit() else name.split(".")[-1]
                 for name in self.denoiser_module_names}  # fmt: skip
        return tuple(sorted(short))


def read_model_index(model_name: str, field: str = "model_name") -> dict:
    """model_index.json of a local pipeline folder or hub id (from the cache when it is there)."""
    if not model_name:
        raise ConfigError(f"{field} is required: a Diffusers pipeline folder or hub id")
    path = Path(model_name).expanduser()
    looks_local = path.is_absolute() or model_name.startswith((".", "~")) or model_name.count("/") > 1
    if looks_local and not path.is_dir():
        raise ConfigError(f"{field}: folder {model_name!r} does not exist")
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ConfigError(f"{field}: {model_name!r} has no model_index.json; expected a Diffusers pipeline folder")
        return _read_json(path / "model_index.json", field)
    try:
        with warnings.catch_warnings():  # Diffusers passes huggingface_hub a deprecated argument: noise here
            warnings.simplefilter("ignore", UserWarning)
            return dict(DiffusionPipeline.load_config(model_name, local_files_only=True))
    except (OSError, ValueError):
        pass  # not cached: the hub it is
    require_hub(field, model_name, LOCAL_EXAMPLE)
    try:
        return dict(DiffusionPipeline.load_config(model_name))
    except Exception as error:
        raise ConfigError(f"{field}: cannot read model_index.json of {model_name!r} ({error})") from None


def describe_model(model_name: str, model_index: Mapping, denoiser_name: str, field: str = "model_name", check_files: bool = True) -> ModelDescription:
    """The description of the pipeline at `model_name` whose model_index.json is `model_index` (`field` names
    the parameter that gave it, in errors). `check_files`: the folder must hold every component's weights (a
    folder giving only the configs of a single-file checkpoint need not)."""
    components = {
        name: entry[1] if entry[0] is not None else None
        for name, entry in model_index.items()
        if isinstance(entry, (list, tuple)) and len(entry) == 2
    }
    libraries = {name: entry[0] for name, entry in model_index.items() if name in components}
    local = Path(model_name).expanduser()
    if check_files and local.is_dir():
        for name, class_name in components.items():
            if class_name is not None:
                check_component_files(local, name, component_class(libraries[name], class_name, name), field)
    for required in ("scheduler", "vae", denoiser_name):
        if components.get(required) is None:
            raise ConfigError(f"{field}: {model_name!r} has no {required} in model_index.json; expected a complete text-to-image pipeline")
    scheduler = component_class(libraries["scheduler"], components["scheduler"], "scheduler")
    scheduler_config = scheduler.from_config(_component_config(scheduler, model_name, "scheduler", field)).config
    vae_config, _ = _built_on_meta(libraries, components, model_name, "vae", field)
    denoiser_config, denoiser = _built_on_meta(libraries, components, model_name, denoiser_name, field)
    readers = {
        name: load_text_reader(component_class(libraries[name], class_name, name), model_name, name)
        for name, class_name in components.items()
        if reads_text(name) and class_name is not None
    }
    tokenizers = {name: reader for name, (reader, _) in readers.items()}
    return ModelDescription(
        source=model_name,
        components=components,
        libraries=libraries,
        scheduler_config=scheduler_config,
        vae_config=vae_config,
        denoiser_config=denoiser_config,
        denoiser_module_names=tuple(name for name, m in denoiser.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))),
        denoiser_block_count=len(repeated_blocks(denoiser)),
        tokenizers=tokenizers,
        stand_ins=tuple(name for name, (_, stand_in) in readers.items() if stand_in),
    )


@contextmanager
def without_diffusers_deprecations():
    """Diffusers' FutureWarnings about its own internal names (its ChromaTransformer2DModel builds the deprecated
    FluxPosEmbed) say nothing a user of this trainer can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module="diffusers")
        yield


def _built_on_meta(libraries, components, model_name: str, name: str, field: str) -> tuple[Mapping, torch.nn.Module]:
    """The component's full config and module structure, built with no memory behind its weights."""
    cls = component_class(libraries[name], components[name], name)
    config = _component_config(cls, model_name, name, field)
    with init_empty_weights(), without_diffusers_deprecations():
        module = cls.from_config(config)
    return module.config, module


def reads_text(component: str) -> bool:
    """A pipeline component that turns prompts into tokens: a tokenizer, or the processor of an edit model that
    reads the prompt with its control images (Qwen-Image-Edit's Qwen2VLProcessor)."""
    return component.startswith("tokenizer") or component == "processor"


def load_text_reader(cls: type, model_name: str, component: str) -> tuple[Any, bool]:
    """The component, and whether it stands in for the class the folder names. A multimodal processor that
    cannot load here, because its image or video side needs torchvision (absent from CPU-only and ROCm installs),
    is replaced: one that also reads videos (Qwen2VLProcessor) by the same class without its video processor,
    its images read by the PIL image processor Transformers falls back to (the same steps, so the same numbers);
    another (Flux.2 [dev]'s PixtralProcessor) by its tokenizer, which is all that reading prompts needs, with
    what that disables said once."""
    try:
        return cls.from_pretrained(model_name, subfolder=component), False
    except (ImportError, AttributeError) as error:
        stand_in_mapping = isinstance(error, AttributeError) and "_MAPPING" in str(error)  # Transformers' stand-in for a torchvision-only mapping
        if not cls.__name__.endswith("Processor") or (isinstance(error, AttributeError) and not stand_in_mapping):
            raise
        from transformers import AutoImageProcessor, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_name, subfolder=component)
        if "video_processor" in inspect.signature(cls.__init__).parameters:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*falling back.*")
                images = AutoImageProcessor.from_pretrained(model_name, subfolder=component)
            return without_video(cls)(image_processor=images, tokenizer=tokenizer), True
        missing = "torchvision" if stand_in_mapping or "torchvision" in str(error).lower() else "an optional package"
        warnings.warn(f"{missing} is not installed, so the {cls.__name__} of {model_name!r} cannot load: its tokenizer reads the "
                      "prompts (all training needs); image inputs to the pipeline are unavailable", stacklevel=2)  # fmt: skip
        return tokenizer, True


def without_video(cls: type) -> type:
    """`cls`, a processor of text, images and videos, made without a video processor (which needs torchvision):
    its text and image calls are the class's own. It saves as the hub's folders hold one (the tokenizer's files
    and the image processor's preprocessor_config.json), under the class's name, so `cls` loads it where it can."""

    def check_argument_for_proper_class(self, name, argument):
        return None if argument is None else cls.check_argument_for_proper_class(self, name, argument)

    def save_pretrained(self, save_directory, **_):
        self.tokenizer.save_pretrained(save_directory)
        self.image_processor.save_pretrained(save_directory)

    methods = {"check_argument_for_proper_class": check_argument_for_proper_class, "save_pretrained": save_pretrained, "__module__": cls.__module__}
    return type(cls.__name__, (cls,), methods)


def component_class(library: str, class_name: str, component: str) -> type:
    """The class model_index.json names: `library` is a package, or (safety checkers) a Diffusers pipeline module."""
    for module in (library, f"diffusers.pipelines.{library}"):
        try:
            return getattr(importlib.import_module(module), class_name)
        except (ImportError, AttributeError):
            continue
    raise ConfigError(f"the pipeline's {component} is a {library}.{class_name}, which this installation does not have")


def _component_config(cls: type, model_name: str, component: str, field: str) -> dict:
    try:
        return cls.load_config(model_name, subfolder=component)
    except Exception as error:
        raise ConfigError(f"{field}: cannot read the {component} config of {model_name!r} ({str(error).splitlines()[0]})") from None


def is_module_class(cls) -> bool:
    """A component with weights (a scheduler or tokenizer has none)."""
    return isinstance(cls, type) and issubclass(cls, torch.nn.Module)


def check_component_files(folder: Path, component: str, cls: type, field: str = "model_name") -> None:
    """The component's folder exists; a module's folder has weights, and every safetensors file is whole."""
    where = folder / component
    if not where.is_dir():
        raise ConfigError(f"{field}: the {component}/ folder is missing from {str(folder)!r} (model_index.json lists a {cls.__name__})")
    if not is_module_class(cls):
        return
    weights = [file for pattern in WEIGHT_PATTERNS for file in where.glob(pattern)]
    if not weights:
        raise ConfigError(f"{field}: {component}/ in {str(folder)!r} has no weights file (.safetensors or .bin)")
    for file in weights:
        if file.name.endswith(".index.json"):
            for shard in sorted(set(_read_json(file, field).get("weight_map", {}).values())):
                if not (where / shard).is_file():
                    raise ConfigError(f"{field}: {component}/{shard}, listed in {file.name}, is missing from {str(folder)!r}")
        elif file.suffix == ".safetensors":
            problem = safetensors_problem(file)
            if problem:
                raise ConfigError(f"{field}: {component}/{file.name} in {str(folder)!r} is {problem}; re-download or re-save the model")


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file cannot be whole, from its header and size alone (no tensor read), or None.

    The format is an 8-byte little-endian header length, a JSON header giving each tensor's byte range, then
    the data: a file shorter than the last range's end was cut off while copying or downloading."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < 8:
            return f"truncated ({size} bytes)"
        (header_length,) = struct.unpack("<Q", f.read(8))
        if 8 + header_length > size:
            return f"truncated ({size} bytes, its header alone declares {8 + header_length})"
        try:
            header = json.loads(f.read(header_length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "not a safetensors file (unreadable header)"
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__" and isinstance(entry, dict)]
    expected = 8 + header_length + max(ends, default=0)
    if size < expected:
        return f"truncated ({size} of {expected} bytes)"
    return None


def _read_json(path: Path, field: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{field}: {str(path)!r} is not readable JSON ({error})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{field}: {str(path)!r} must hold a JSON object")
    return data
