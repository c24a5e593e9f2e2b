"""Writing results atomically: a crash or Ctrl-C mid-write leaves the previous good file in place."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from .errors import ConfigError
from .adapters import is_lycoris, save_lycoris
from .kohya import community_file_name, community_state
from .settings import parse_export_formats

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
READABLE_FILE, READABLE_FOLDER = 0o644, 0o755  # results are read by other users and services (a launcher, a web UI)


def make_readable(folder: Path) -> None:
    """Give a folder written by temp-file helpers (0700 folders, 0600 files) the usual modes, recursively."""
    os.chmod(folder, READABLE_FOLDER)
    for path in Path(folder).rglob("*"):
        os.chmod(path, READABLE_FOLDER if path.is_dir() else READABLE_FILE)


@contextmanager
def atomic_path(path: Path):
    """Yields a temp file beside `path`; on success it is renamed over `path`, on any failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        yield Path(tmp)
        os.chmod(tmp, READABLE_FILE)  # after the write: mkstemp's 0600, or a writer's own (safetensors replaces the file)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def require_writable_folder(folder: Path, field: str) -> None:
    """Create `folder` and write a file in it, or fail naming `field`: a file in the way, a read-only folder or
    a name too long for the file system is found before any weights load, not when the first file is saved."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / ".write-test") as probe:
            probe.write_bytes(b"")
        (folder / ".write-test").unlink()
    except OSError as error:
        raise ConfigError(f"{field}: cannot write to {str(folder)!r} ({error.strerror or error}); expected a writable folder") from None


def write_json_atomic(path: Path, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_image_atomic(image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def lora_state(modules: dict[str, torch.nn.Module]) -> tuple[dict[str, dict], dict[str, dict]]:
    """Per component: the LoRA tensors (fp32, CPU) and the LoRA config that Diffusers needs as metadata."""
    layers = {
        name: {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(module).items()}
        for name, module in modules.items()
    }
    metadata = {name: module.peft_config["default"].to_dict() for name, module in modules.items()}
    return layers, metadata


def save_adapter_atomic(family, modules: dict[str, torch.nn.Module], folder: Path, run_config: dict | None = None) -> Path:
    """Save the modules' current LoRA weights into folder/pytorch_lora_weights.safetensors, atomically (and
    the other formats `run_config` asks for, see `save_layers_atomic`)."""
    return save_layers_atomic(family, *lora_state(modules), folder, run_config)


def save_layers_atomic(family, layers: dict[str, dict], metadata: dict[str, dict], folder: Path, run_config: dict | None = None) -> Path:
    """Save LoRA tensors (per component, as `lora_state` gives them) with the family's pipeline class into
    folder/pytorch_lora_weights.safetensors. The file is written in a sibling temp folder and renamed into
    place, so the previous adapter survives any failure while writing. With "kohya" in the export_formats of
    `run_config` (the run's resolved config), the community layout (`plugin/kohya.py`) is written beside it,
    atomically too."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".saving-"))
    try:
        if is_lycoris(metadata):
            save_lycoris(staging, layers, metadata, WEIGHTS_NAME)
        else:
            family.save_lora(staging, layers, metadata)
        os.chmod(staging / WEIGHTS_NAME, READABLE_FILE)  # the library writes it 0600: unreadable to other users
        os.replace(staging / WEIGHTS_NAME, folder / WEIGHTS_NAME)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if run_config is not None and "kohya" in parse_export_formats(run_config.get("export_formats", "diffusers")):
        with atomic_path(folder / community_file_name(family, run_config["adaptor_name"], run_config["lora_type"])) as tmp:
            save_file(community_state(family, layers, metadata), str(tmp), metadata=family.kohya_metadata(run_config, metadata))
    return folder / WEIGHTS_NAME
