"""Full-state checkpoints: everything a run needs to continue as if it had never stopped.

`<run>/checkpoints/step_<n>/` holds
  trainable.safetensors   the LoRA weights, by parameter name
  optimizer.safetensors   the optimizer's per-parameter tensors (Adam moments, step), by parameter name
  ema.safetensors         the averaged weights (the EMA shadow, or each post-hoc EMA profile), when EMA is on
  rng.safetensors         every process's torch RNG states (CPU, and its CUDA device): LoRA dropout draws from them
  state.json              step, data position (epoch, micro-batches done), number of processes, optimizer
                          hyper-parameters (Prodigy's step-size estimate among them) and per-parameter
                          numbers, LR schedule, EMA state, loss-scaler state
  config.json             the resolved config of the run that wrote it (family defaults filled in)
  input_config.json       the config as given, which a resumption is compared with before any model loads

Nothing is pickled, so loading a checkpoint from someone else runs no code. A checkpoint is written into a
hidden temporary folder and renamed into place, so a kill mid-write leaves only complete `step_<n>` folders;
older ones beyond the limit are deleted after the new one is complete. Data order, augmentation, noise and
timesteps are pure functions of (seed, epoch, example), so (epoch, micro-batches done) is the whole data state.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .disk import WRITE_ERRORS
from .distributed import restore_rng_states
from .errors import ConfigError
from .export import make_readable, require_writable_folder
from .posthoc import SNAPSHOT_FOLDER
from .run_lock import LOCK_FILE

STEP_FOLDER = re.compile(r"step_(\d+)")
STATE_FILE = "state.json"
RESOLVED_CONFIG, INPUT_CONFIG = "config.json", "input_config.json"

# Parameters that may change between a checkpoint and its resumption without making it another run.
RESUMABLE_CHANGES = frozenset({
    "max_train_steps", "num_train_epochs", "eval_prompt", "eval_steps", "eval_num_inference_steps",
    "eval_guidance_scale", "eval_seed", "eval_width", "eval_height", "log_to_wandb", "log_to_tensorboard",
    "checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint", "output_dir",
    "dataloader_num_workers", "cache_latents", "cache_text_embeddings", "cache_dir", "gradient_checkpointing",
    "enable_xformers_memory_efficient_attention", "overwrite_output", "posthoc_ema_snapshot_steps", "allow_pickle_checkpoints",
    "offload_text_encoders", "shard_base_model", "offload_blocks", "torch_compile", "torch_compile_backend", "preset",
    "memory_plan", "memory_budget_gb", "eval_control_image",
})  # fmt: skip


@dataclass
class TrainingState:
    """The live objects a checkpoint captures and restores."""

    parameters: dict[str, torch.nn.Parameter]  # trainable, by a stable name
    optimizer: torch.optim.Optimizer
    lr_schedule: object  # a torch LR scheduler (possibly wrapped by Accelerate)
    ema: object | None
    scaler: torch.amp.GradScaler | None
    num_processes: int = 1
    process_index: int = 0


@dataclass(frozen=True)
class Position:
    """Where the run is: optimizer steps done, and micro-batches done in `epoch`."""

    step: int
    epoch: int
    batches_done: int


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(root: Path) -> list[Path]:
    """The `step_<n>` folders under root, oldest first (temporary folders are hidden and never match)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_FOLDER.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(value: str, run_dir: Path) -> Path | None:
    """The checkpoint folder `resume_from_checkpoint` names: "" none, "latest" the newest complete one under
    this run (none yet: a fresh start), else a path that must be a checkpoint."""
    if not value:
        return None
    if value == "latest":
        found = complete_checkpoints(checkpoint_root(run_dir))
        return found[-1] if found else None
    path = Path(value).expanduser()
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"resume_from_checkpoint: {value!r} is not a checkpoint folder (no {STATE_FILE}); "
                          "expected '', 'latest' or a <run>/checkpoints/step_<n> folder")  # fmt: skip
    return path


def check_run_folder(run_dir: Path, cfg) -> None:
    """A run folder belongs to one run, so its config, adapter and checkpoints describe each other. A folder
    that already holds something is continued (resume_from_checkpoint), replaced (overwrite_output, see
    `claim_run_folder`) or refused, before anything else is done or printed. Also fails, naming output_dir,
    when the folder cannot be created or written."""
    run_dir = Path(run_dir)
    require_writable_folder(run_dir, "output_dir")
    if holds_a_run(run_dir) and not cfg.resume_from_checkpoint and not cfg.overwrite_output:
        raise ConfigError(f"output_dir: {str(run_dir)!r} already holds a run; set resume_from_checkpoint to 'latest' to "
                          "continue it, overwrite_output to true to replace it, or choose another adaptor_name")  # fmt: skip


def holds_a_run(run_dir: Path) -> bool:
    return any(p.name != LOCK_FILE for p in Path(run_dir).iterdir())


def claim_run_folder(run_dir: Path, cfg, log=print) -> None:
    """Replacing a run (overwrite_output), done last of the checks: the old checkpoints and snapshots go, so
    that 'latest' can never pick up another run's state."""
    run_dir = Path(run_dir)
    if holds_a_run(run_dir) and not cfg.resume_from_checkpoint:
        for state in (checkpoint_root(run_dir), run_dir / SNAPSHOT_FOLDER):
            if state.is_dir():
                shutil.rmtree(state)
                log(f"overwrite_output: deleted the previous run's {state.name} in {run_dir}")


def check_resumable(folder: Path, cfg, log=print) -> None:
    """A checkpoint continues only the run it came from: other values of the settings that shape training
    (compared with the config as its run was given) are an error naming them; changes to the rest are printed."""
    saved_config = _read_json(folder / INPUT_CONFIG)
    current = cfg.as_dict()
    differing = sorted(k for k in current if k in saved_config and saved_config[k] != current[k])
    blocking = [k for k in differing if k not in RESUMABLE_CHANGES]
    if blocking:
        details = "; ".join(f"{k}: {saved_config[k]!r} in the checkpoint, {current[k]!r} now" for k in blocking)
        raise ConfigError(f"resume_from_checkpoint: the checkpoint belongs to another run ({details}); "
                          "set them back or start a fresh run")  # fmt: skip
    for key in differing:
        log(f"resuming with {key} changed: {saved_config[key]!r} -> {current[key]!r}")


# ---------------------------------------------------------------------------------------------------------
# Save


def save_checkpoint(
    root: Path, position: Position, state: TrainingState, rng: dict[str, torch.Tensor], configs: dict[str, dict], keep: int
) -> Path:
    """Write step_<n> atomically, then delete the oldest beyond `keep` (0 keeps all). Returns its folder."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{position.step}"
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".step_{position.step}."))
    try:
        _write(staging, position, state, rng, configs)
        make_readable(staging)  # mkdtemp's 0700 would hide the checkpoint from other users of the machine
        if final.exists():  # the same step written again (a resumed run stopping where it started)
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if keep > 0:
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _write(folder: Path, position: Position, state: TrainingState, rng: dict[str, torch.Tensor], configs: dict[str, dict]) -> None:
    names = list(state.parameters)
    save_file({n: p.detach().cpu().contiguous() for n, p in state.parameters.items()}, str(folder / "trainable.safetensors"))
    optimizer = state.optimizer.state_dict()
    moments = {f"{names[i]}::{key}": value.detach().cpu().contiguous()
               for i, slots in optimizer["state"].items() for key, value in slots.items() if torch.is_tensor(value)}  # fmt: skip
    # Per-parameter numbers that are not tensors (Adafactor's and 8-bit AdamW's step counts) go to state.json.
    scalars = {f"{names[i]}::{key}": value for i, slots in optimizer["state"].items() for key, value in slots.items()
               if not torch.is_tensor(value)}  # fmt: skip
    save_file(moments, str(folder / "optimizer.safetensors"))
    groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer["param_groups"]]
    save_file(rng, str(folder / "rng.safetensors"))
    if state.ema is not None:
        save_file(state.ema.state_tensors(names), str(folder / "ema.safetensors"))
    summary = {
        "step": position.step,
        "epoch": position.epoch,
        "batches_done": position.batches_done,
        "num_processes": state.num_processes,
        "parameter_names": names,
        "optimizer_param_groups": groups,
        "optimizer_scalars": scalars,
        "lr_schedule": {k: v for k, v in _scheduler(state.lr_schedule).state_dict().items() if k != "lr_lambdas"},
        "ema": state.ema.summary() if state.ema is not None else None,
        "scaler": state.scaler.state_dict() if state.scaler is not None else None,
    }
    (folder / STATE_FILE).write_text(json.dumps(summary, indent=1), encoding="utf-8")
    for name, config in configs.items():
        (folder / name).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def _scheduler(lr_schedule):
    """The torch scheduler inside Accelerate's wrapper (or the scheduler itself)."""
    return getattr(lr_schedule, "scheduler", lr_schedule)


# ---------------------------------------------------------------------------------------------------------
# Load


def load_checkpoint(folder: Path, state: TrainingState) -> Position:
    """Restore every part of `state` from `folder`; a missing or unreadable file is a ConfigError naming it."""
    summary = _read_json(folder / STATE_FILE)
    if summary.get("num_processes", 1) != state.num_processes:
        raise ConfigError(f"resume_from_checkpoint: {folder} was written by a run of {summary.get('num_processes', 1)} "
                          f"processes, this one has {state.num_processes}: the global batch would change; launch "
                          "as many processes")  # fmt: skip
    names = list(state.parameters)
    if summary.get("parameter_names") != names:
        raise ConfigError(f"resume_from_checkpoint: {folder} holds LoRA weights for other layers than this run "
                          f"trains ({len(summary.get('parameter_names') or [])} saved, {len(names)} now)")  # fmt: skip
    weights = _read_tensors(folder / "trainable.safetensors")
    with torch.no_grad():
        for name, parameter in state.parameters.items():
            parameter.copy_(weights[name])
    moments = _read_tensors(folder / "optimizer.safetensors")
    slots: dict[int, dict] = {}
    for key, value in {**moments, **summary.get("optimizer_scalars", {})}.items():
        name, slot = key.split("::")
        slots.setdefault(names.index(name), {})[slot] = value
    groups = [{**group, "params": saved["params"]} for group, saved in
              zip(summary["optimizer_param_groups"], state.optimizer.state_dict()["param_groups"])]  # fmt: skip
    state.optimizer.load_state_dict({"state": slots, "param_groups": groups})
    scheduler = _scheduler(state.lr_schedule)
    scheduler.load_state_dict({**scheduler.state_dict(), **summary["lr_schedule"]})
    if state.ema is not None:
        state.ema.load_state_tensors(_read_tensors(folder / "ema.safetensors"), names)
        state.ema.load_summary(summary["ema"])
    if state.scaler is not None and summary.get("scaler"):
        state.scaler.load_state_dict(summary["scaler"])
    restore_rng_states(_read_tensors(folder / "rng.safetensors"), state.process_index)
    return Position(summary["step"], summary["epoch"], summary["batches_done"])


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"resume_from_checkpoint: cannot read {path} ({error})") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as error:
        raise ConfigError(f"resume_from_checkpoint: cannot read {path} ({type(error).__name__}: {error})") from None


def try_save_checkpoint(
    root: Path, position: Position, state: TrainingState, rng: dict[str, torch.Tensor], configs: dict[str, dict],
    keep: int, log=print,
) -> Path | None:
    """save_checkpoint, but a failure to write (a full disk) is a warning naming the folder: training goes on
    and the previous checkpoint stays the latest."""
    try:
        folder = save_checkpoint(root, position, state, rng, configs, keep)
    except WRITE_ERRORS as error:
        warnings.warn(f"checkpoint at step {position.step} not written under {root} ({error}); "
                      "the previous checkpoint is kept", stacklevel=2)  # fmt: skip
        return None
    log(f"checkpoint: {folder}")
    return folder
