"""Choosing the EMA length after training: `plugin/main.py --posthoc-ema RUN_DIR --sweep [--sigma-rel ...]`.

Each candidate σ_rel is reconstructed from the run's post-hoc EMA snapshots, loaded into the LoRA layers of
the run's model, and scored by the run's validation loss (the same held-out images, noise and timesteps the
run measured, rebuilt from its config). The curve goes to `<run>/posthoc_ema/sweep_step_<n>.png` and
`.json`; the σ_rel with the lowest loss is saved as an ordinary adapter, as `--sigma-rel` would save it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from peft import set_peft_model_state_dict

from .config import parse_parameters
from .data.mixing import load_sources
from .errors import ConfigError
from .evaluation import line_plot
from .export import write_json_atomic
from .families import open_model
from .posthoc import (
    SNAPSHOT_FOLDER, combine_snapshots, posthoc_coefficients, reachable_sigma_rels, read_run_config, read_snapshots,
    write_reconstruction,
)  # fmt: skip
from .validation import ValidationSet, training_and_validation_data

SWEEP_POINTS = 9  # candidates, spaced geometrically over the σ_rel range the snapshots can reconstruct


def sweep_grid(snapshots, at_step: int, points: int = SWEEP_POINTS) -> list[float]:
    """Geometrically spaced σ_rel over what the snapshots reconstruct at `at_step` (their tracked ones too)."""
    low, high = reachable_sigma_rels([s.step for s in snapshots], [s.sigma_rel for s in snapshots], at_step)
    return sorted({*np.geomspace(low, high, points).round(4).tolist(), *(s.sigma_rel for s in snapshots)})


def sweep(run_dir: Path, sigma_rels: list[float] | None = None, at_step: int | None = None, log=print) -> Path:
    """Score each σ_rel (default: `sweep_grid`) by validation loss; returns the best adapter's file."""
    from .trainer import WEIGHT_DTYPES, new_accelerator

    run_dir = Path(run_dir)
    run_config = read_run_config(run_dir, "--sweep")
    cfg = parse_parameters(run_config, ignore=frozenset({"model_family"}))
    if not (cfg.validation_split > 0 or cfg.validation_dataset):
        raise ConfigError(f"--sweep: the run in {str(run_dir)!r} has no validation set to choose by; train with "
                          "validation_split or validation_dataset, or pick σ_rel yourself with --sigma-rel")  # fmt: skip
    snapshots, configs = read_snapshots(run_dir, at_step)
    at_step = at_step if at_step is not None else max(s.step for s in snapshots)
    grid = sorted(sigma_rels) if sigma_rels else sweep_grid(snapshots, at_step)
    coefficients, errors = posthoc_coefficients(snapshots, at_step, grid)

    family = open_model(cfg.model_name, cfg.model_config, cfg.text_encoder_source, cfg.allow_pickle_checkpoints)
    cfg, _ = family.configure(cfg)
    pairing = family.pairing()
    _, held_out_sources = training_and_validation_data(cfg, load_sources(cfg, None, pairing), pairing)
    accelerator = new_accelerator(cfg)
    family.load(WEIGHT_DTYPES[cfg.mixed_precision])
    family.to(accelerator.device)
    modules = family.attach_lora()
    for module in modules.values():
        module.eval()
    objective = family.make_objective()
    held_out = ValidationSet.build(cfg, family, held_out_sources)

    losses = []
    for column, sigma_rel in enumerate(grid):
        layers = combine_snapshots(snapshots, coefficients[:, column])
        with torch.no_grad():
            for component, module in modules.items():
                set_peft_model_state_dict(module, {k: v.to(accelerator.device) for k, v in layers[component].items()})
        losses.append(held_out.loss(family, objective, accelerator.autocast))
        log(f"σ_rel {sigma_rel:.4f}: validation loss {losses[-1]:.5f} (fit error {errors[column]:.2%})")

    best = int(np.argmin(losses))
    folder = run_dir / SNAPSHOT_FOLDER
    curve = line_plot({"validation loss": list(zip(grid, losses))}, folder / f"sweep_step_{at_step}.png",
                      f"post-hoc EMA sweep at step {at_step}: best sigma_rel {grid[best]:.4f}", "sigma_rel", log_x=True,
                      mark=(grid[best], losses[best]))  # fmt: skip
    write_json_atomic(folder / f"sweep_step_{at_step}.json", {
        "step": at_step, "best_sigma_rel": grid[best], "best_validation_loss": losses[best],
        "points": [{"sigma_rel": s, "validation_loss": v, "fit_error": float(e)} for s, v, e in zip(grid, losses, errors)],
    })  # fmt: skip
    layers = combine_snapshots(snapshots, coefficients[:, best])
    adapter = write_reconstruction(run_dir, run_config, family, layers, configs, snapshots, grid[best], at_step, errors[best],
                                   {"validation_loss": losses[best], "chosen_by": f"lowest validation loss of {len(grid)} σ_rel"})  # fmt: skip
    log(f"best σ_rel {grid[best]:.4f} (validation loss {losses[best]:.5f}): {adapter}; curve: {curve}")
    return adapter
