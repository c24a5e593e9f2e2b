"""Post-hoc EMA end to end: snapshots written while training, adapters reconstructed afterwards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import base_parameters, load_fresh, render
from plugin.config import parse_parameters
from plugin.errors import ConfigError
from plugin.export import WEIGHTS_NAME
from plugin.main import main
from plugin.posthoc import SNAPSHOT_FOLDER, reconstruct, snapshot_paths
from plugin.tiny import FAMILIES

POSTHOC = dict(use_ema=True, ema_type="posthoc", posthoc_ema_snapshot_steps=2, max_train_steps=12, eval_prompt="")


@pytest.mark.parametrize("family", FAMILIES)
def test_a_posthoc_adapter_of_every_family_loads_and_renders(family, run_training, tiny_models, capsys):
    _, _, paths = run_training(family, **POSTHOC)
    assert list(snapshot_paths(paths.run_dir)) == [2, 4, 6, 8, 10, 12]
    assert main(["--posthoc-ema", str(paths.run_dir), "--sigma-rel", "0.07", "0.05"]) == 0
    folders = {s: paths.run_dir / SNAPSHOT_FOLDER / f"sigma_rel_{s:.3f}_step_12" for s in (0.07, 0.05)}
    assert str(folders[0.07] / WEIGHTS_NAME) in capsys.readouterr().out
    assert "σ_rel 0.07 at step 12" in (folders[0.07] / "README.md").read_text()

    # a tracked length comes back as that profile's own average, which is the run's adapter
    run_adapter, rebuilt = load_file(str(paths.adapter_dir / WEIGHTS_NAME)), load_file(str(folders[0.05] / WEIGHTS_NAME))
    assert run_adapter.keys() == rebuilt.keys()
    assert max((run_adapter[k] - rebuilt[k]).abs().max().item() for k in run_adapter) < 1e-5

    pipe = load_fresh(tiny_models[family])
    kwargs = dict(num_inference_steps=2, height=32, width=32)
    before = render(pipe, "a red circle", 0, **kwargs)
    pipe.load_lora_weights(str(folders[0.07]))
    assert not np.array_equal(render(pipe, "a red circle", 0, **kwargs), before), "the post-hoc adapter changes the image"


def test_lengths_the_snapshots_cannot_stand_in_for_are_refused_naming_the_range(run_training, tmp_path):
    _, _, paths = run_training("sd", **POSTHOC)
    with pytest.raises(ConfigError, match=r"--sigma-rel: 0.005 cannot be reconstructed at step 12 from these snapshots; they cover σ_rel 0\.0\d\d to 0\.\d+"):
        reconstruct(paths.run_dir, [0.005])
    with pytest.raises(ConfigError, match="has no post-hoc EMA snapshots up to step 1 "):
        reconstruct(paths.run_dir, [0.07], at_step=1)
    with pytest.raises(ConfigError, match="has no post-hoc EMA snapshots"):
        reconstruct(tmp_path / "elsewhere", [0.07])


def test_posthoc_settings_are_checked_before_anything_loads(tiny_models, sample_data, tmp_path):
    for bad in ("0.5", "0.05,abc", "", "0.1,0.1"):  # refused with the parameters (tests/test_parameter_phase.py)
        with pytest.raises(ConfigError, match="posthoc_ema_sigma_rels: .* expected|posthoc_ema_sigma_rels: .* is not a list"):
            parse_parameters(base_parameters(tiny_models["sd"], sample_data, tmp_path, **POSTHOC, posthoc_ema_sigma_rels=bad))
    assert main(["--posthoc-ema", str(tmp_path)]) == 2  # no --sigma-rel


def test_the_posthoc_tracker_averages_with_the_power_function_betas():
    """Two steps by hand: β_1 = 0 copies the weights, then the average moves by 1 − β_2 towards them."""
    from plugin.ema import PowerFunctionEMA
    from plugin.phema import power_function_beta

    weight = torch.nn.Parameter(torch.tensor([1.0]))
    tracker = PowerFunctionEMA([weight], (0.1,))
    tracker.update(1)
    with torch.no_grad():
        weight.fill_(3.0)
    tracker.update(2)
    beta = float(power_function_beta(0.1, 2))
    assert tracker.averages[0][0].item() == pytest.approx(beta * 1.0 + (1 - beta) * 3.0)
