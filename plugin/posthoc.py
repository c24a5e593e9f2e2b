"""Post-hoc EMA's files: the snapshots a run writes while it trains, and the adapters reconstructed from them
afterwards (`plugin/main.py --posthoc-ema RUN_DIR --sigma-rel 0.07 0.12 [--at-step N]`).

A snapshot, `<run>/posthoc_ema/step_<n>.safetensors`, holds every tracked profile's LoRA weights (keys
`<σ_rel>/<component>/<key>`) with the step, the profiles and the LoRA configs in its metadata: the LoRA
weights only, so each is the size of an adapter times the number of profiles.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import ConfigError
from .export import atomic_path, lora_state, save_layers_atomic, write_json_atomic
from .phema import relative_fit_error, solve_posthoc_coefficients
from .settings import SIGMA_REL_RANGE, parse_sigma_rels

SNAPSHOT_FOLDER = "posthoc_ema"
SNAPSHOT_NAME = re.compile(r"step_(\d+)\.safetensors")
MAX_FIT_ERROR = 0.05  # a wanted profile must be matched by the snapshots to within 5 % (relative L2)


def write_snapshot(run_dir: Path, step: int, tracker, modules: dict[str, torch.nn.Module]) -> Path:
    """Every profile of `tracker` (a PowerFunctionEMA) at optimizer step `step`, written atomically."""
    tensors: dict[str, torch.Tensor] = {}
    for profile, sigma_rel in enumerate(tracker.sigma_rels):
        with tracker.swapped_in(profile):  # copied inside: lora_state's CPU fp32 tensors share the live storage
            layers, configs = lora_state(modules)
            tensors.update({f"{sigma_rel!r}/{component}/{key}": value.clone() for component, state in layers.items()
                            for key, value in state.items()})  # fmt: skip
    metadata = {"step": str(step), "sigma_rels": json.dumps(tracker.sigma_rels),
                "lora_configs": json.dumps(configs, default=lambda o: sorted(o) if isinstance(o, set) else str(o))}  # fmt: skip
    path = Path(run_dir) / SNAPSHOT_FOLDER / f"step_{step:08d}.safetensors"
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def snapshot_paths(run_dir: Path) -> dict[int, Path]:
    folder = Path(run_dir) / SNAPSHOT_FOLDER
    paths = {int(m.group(1)): p for p in folder.glob("step_*.safetensors") if (m := SNAPSHOT_NAME.fullmatch(p.name))}
    return dict(sorted(paths.items()))


def discard_snapshots_after(run_dir: Path, step: int) -> None:
    """A resumed run rewrites what the interrupted one wrote after its checkpoint."""
    for snapshot_step, path in snapshot_paths(run_dir).items():
        if snapshot_step > step:
            path.unlink()


@dataclass
class Snapshot:
    step: int
    sigma_rel: float
    layers: dict[str, dict[str, torch.Tensor]]  # per component, as lora_state gives them


def read_snapshots(run_dir: Path, at_step: int | None) -> tuple[list[Snapshot], dict]:
    """The snapshots up to `at_step` (all when None), one per (step, profile), and the LoRA configs."""
    paths = {step: path for step, path in snapshot_paths(run_dir).items() if at_step is None or step <= at_step}
    if not paths:
        where = f" up to step {at_step}" if at_step is not None else ""
        raise ConfigError(f"--posthoc-ema: {str(run_dir)!r} has no post-hoc EMA snapshots{where} ({SNAPSHOT_FOLDER}/step_*.safetensors); "
                          "they are written by runs with use_ema and ema_type 'posthoc'")  # fmt: skip
    snapshots, configs = [], {}
    for step, path in paths.items():
        with safe_open(str(path), framework="pt") as f:
            configs = json.loads(f.metadata()["lora_configs"])
            by_profile: dict[float, dict] = {}
            for name in f.keys():
                sigma_rel, component, key = name.split("/", 2)
                by_profile.setdefault(float(sigma_rel), {}).setdefault(component, {})[key] = f.get_tensor(name)
        snapshots += [Snapshot(step, sigma_rel, layers) for sigma_rel, layers in by_profile.items()]
    return snapshots, configs


def reachable_sigma_rels(steps, sigma_rels, at_step: int) -> tuple[float, float]:
    """The σ_rel range the snapshots can stand in for at `at_step` (fit error within MAX_FIT_ERROR)."""
    grid = np.geomspace(0.001, SIGMA_REL_RANGE[1] * 0.999, 400)
    good = grid[relative_fit_error(steps, sigma_rels, at_step, grid) <= MAX_FIT_ERROR]
    return (float(good.min()), float(good.max())) if len(good) else (float("nan"), float("nan"))


def read_run_config(run_dir: Path, option: str = "--posthoc-ema") -> dict:
    """The resolved config a run wrote (`<run>/config.json`), which names its model family."""
    path = Path(run_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        config["model_family"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"{option}: {str(path)!r} is missing or unreadable; expected a run folder") from None
    return config


def posthoc_coefficients(snapshots: list[Snapshot], at_step: int, sigma_rels, option: str = "--sigma-rel") -> tuple[np.ndarray, np.ndarray]:
    """(coefficients (snapshots × wanted), fit errors (wanted,)) of the least-squares reconstruction of each
    wanted σ_rel at `at_step`; a σ_rel the snapshots cannot stand in for is an error naming the range they cover."""
    steps, tracked = [s.step for s in snapshots], [s.sigma_rel for s in snapshots]
    for sigma_rel in sigma_rels:
        parse_sigma_rels(str(sigma_rel), option)
    errors = relative_fit_error(steps, tracked, at_step, sigma_rels)
    if (errors > MAX_FIT_ERROR).any():
        low, high = reachable_sigma_rels(steps, tracked, at_step)
        raise ConfigError(f"{option}: {', '.join(f'{s:g}' for s, e in zip(sigma_rels, errors) if e > MAX_FIT_ERROR)} cannot be "
                          f"reconstructed at step {at_step} from these snapshots; they cover σ_rel {low:.3f} to {high:.3f}")  # fmt: skip
    return solve_posthoc_coefficients(steps, tracked, at_step, sigma_rels), errors


def combine_snapshots(snapshots: list[Snapshot], coefficients) -> dict[str, dict[str, torch.Tensor]]:
    """Σ_i x_i · snapshot_i, per component and LoRA tensor (accumulated in float64)."""
    return {
        component: {key: sum(float(x) * s.layers[component][key].double() for x, s in zip(coefficients, snapshots)).float()
                    for key in state}  # fmt: skip
        for component, state in snapshots[0].layers.items()
    }


def write_reconstruction(
    run_dir: Path, run_config: dict, family, layers: dict, configs: dict, snapshots: list[Snapshot], sigma_rel: float,
    at_step: int, fit_error: float, note: dict | None = None,
) -> Path:
    """An adapter in `<run>/posthoc_ema/sigma_rel_<σ>_step_<n>/` (in the export formats of `run_config`, the
    run's config.json) with a README line saying what it is and posthoc_ema.json (σ_rel, step, fit error, and
    `note`'s entries)."""
    folder = Path(run_dir) / SNAPSHOT_FOLDER / f"sigma_rel_{sigma_rel:.3f}_step_{at_step}"
    written = save_layers_atomic(family, layers, configs, folder, run_config)
    tracked = sorted({s.sigma_rel for s in snapshots})
    card = (f"Post-hoc EMA reconstruction (Karras et al. 2024): σ_rel {sigma_rel:g} at step {at_step}, from "
            f"{len(snapshots)} snapshots of σ_rel {', '.join(f'{s:g}' for s in tracked)} (fit error {fit_error:.2%}).\n")  # fmt: skip
    if note:
        card += "".join(f"{key.replace('_', ' ').capitalize()}: {value}.\n" for key, value in note.items())
    with atomic_path(folder / "README.md") as tmp:
        tmp.write_text(card, encoding="utf-8")
    write_json_atomic(folder / "posthoc_ema.json", {"sigma_rel": sigma_rel, "step": at_step, "fit_error": float(fit_error), **(note or {})})
    return written


def reconstruct(run_dir: Path, sigma_rels: list[float], at_step: int | None = None, log=print) -> list[Path]:
    """One Diffusers-format adapter per wanted σ_rel, the least-squares combination of the snapshots, in
    `<run>/posthoc_ema/sigma_rel_<σ>_step_<n>/`, each with a README line saying what it is."""
    from .families import family_by_name

    run_dir = Path(run_dir)
    snapshots, configs = read_snapshots(run_dir, at_step)
    at_step = at_step if at_step is not None else max(s.step for s in snapshots)
    coefficients, errors = posthoc_coefficients(snapshots, at_step, sigma_rels)
    run_config = read_run_config(run_dir)
    family = family_by_name(run_config["model_family"])
    written = []
    for column, (sigma_rel, error) in enumerate(zip(sigma_rels, errors)):
        layers = combine_snapshots(snapshots, coefficients[:, column])
        written.append(write_reconstruction(run_dir, run_config, family, layers, configs, snapshots, sigma_rel, at_step, error))
        log(f"σ_rel {sigma_rel:g}: {written[-1]}")
    return written
