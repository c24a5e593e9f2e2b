"""Disk space: what a run will write, said before training when the output folder's disk lacks it, and a
failed save of the adapter said in one line (the folder, the bytes needed and free, what was kept) instead
of the writer library's traceback. Every save is atomic, so what was kept is intact."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

from safetensors import SafetensorError

from .errors import OutputError
from .settings import parse_export_formats

WRITE_ERRORS = (OSError, SafetensorError)  # safetensors reports a full disk as its own error, not OSError
FLOAT32_BYTES = 4
OPTIMIZER_STATES = {"adamw": 2, "adamw_8bit": 0.5, "prodigy": 4, "adafactor": 1}  # tensors kept per weight, in fp32 units


def adapter_files(cfg) -> int:
    """Adapter files a save writes: the Diffusers file, the community one, and the raw weights' beside EMA's."""
    return (1 + ("kohya" in parse_export_formats(cfg.export_formats))) * (1 + cfg.use_ema)


def run_bytes(cfg, trainable: int) -> int:
    """About what the run keeps on disk at most: its adapters, and its checkpoints (weights, optimizer state,
    EMA) times checkpoints_total_limit plus the one being written."""
    adapter = trainable * FLOAT32_BYTES
    checkpoint = adapter * (1 + OPTIMIZER_STATES[cfg.optimizer] + cfg.use_ema)
    kept = (cfg.checkpoints_total_limit or 10) + 1 if cfg.checkpointing_steps else 0
    return int(adapter * adapter_files(cfg) + checkpoint * kept)


def warn_if_short_of_space(folder: Path, cfg, trainable: int) -> None:
    needed, free = run_bytes(cfg, trainable), shutil.disk_usage(folder).free
    if free < needed:
        warnings.warn(f"output_dir: {megabytes(free)} free on the disk of {str(folder)!r}, and this run writes about "
                      f"{megabytes(needed)} (adapters and checkpoints); a save will fail when it runs out", stacklevel=2)  # fmt: skip


def save_failure(error: Exception, folder: Path, cfg, trainable: int, checkpoint: Path | None) -> OutputError:
    """The one-line error of an adapter that could not be written, naming what is still there."""
    kept = [f"the previous adapter in {str(folder)!r}"] if any(Path(folder).glob("*.safetensors")) else []
    kept += [f"the last checkpoint {str(checkpoint)!r} (resume_from_checkpoint: latest)"] if checkpoint is not None else []
    return OutputError(f"output_dir: the adapter could not be written to {str(folder)!r} ({error}); it needs about "
                       f"{megabytes(trainable * FLOAT32_BYTES * adapter_files(cfg))}, {megabytes(shutil.disk_usage(folder).free)} "
                       f"are free; kept: {', '.join(kept) or 'nothing from this run yet'}")  # fmt: skip


def megabytes(size: int) -> str:
    return f"{size / 2**20:.1f} MB"
