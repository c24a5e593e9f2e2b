"""Launched the way plugin-era Transformer Lab launches a trainer plugin: the manifest's `files` copied to
`<workspace>/plugins/<uniqueId>`, `bash setup.sh` run there with the app's venv active, then the app's
harness (`sys.path.append(plugin_dir); import main; main.main()`) started from another working directory
with the input file the app writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from conftest import base_parameters
from plugin.config import load_manifest, parameter_specs
from plugin.export import WEIGHTS_NAME

REPO = Path(__file__).resolve().parent.parent
MANIFEST = load_manifest()

# Transformer Lab's plugin_harness.py, reduced to what it does with a plugin (the org context it also sets up
# needs the app's database).
HARNESS = """
import argparse, sys, traceback
parser = argparse.ArgumentParser()
parser.add_argument("--plugin_dir", type=str, required=True)
args, unknown = parser.parse_known_args()
sys.path.append(args.plugin_dir)
try:
    import main
except ImportError as e:
    print(f"Error executing plugin: {e}")
    traceback.print_exc()
    sys.exit(1)
if "main" in dir(main) and callable(getattr(main, "main")):
    main.main()
"""


def install_plugin(workspace: Path) -> Path:
    """Copy the files the manifest lists, as the app installs a plugin (nothing else comes along)."""
    plugin_dir = workspace / "plugins" / MANIFEST["uniqueId"]
    for name in MANIFEST["files"]:
        (plugin_dir / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, plugin_dir / name)
    return plugin_dir


def test_the_manifest_lists_every_file_the_plugin_runs_from():
    code = {str(path.relative_to(REPO)) for path in [REPO / "main.py", *(REPO / "plugin").rglob("*.py")]}
    assert code <= set(MANIFEST["files"]), f"missing from index.json files: {sorted(code - set(MANIFEST['files']))}"
    assert {"setup.sh", "requirements.txt", "index.json"} <= set(MANIFEST["files"])


def test_the_form_leaves_the_model_dataset_and_output_to_the_app():
    form = MANIFEST["parameters"]
    assert not {"model_name", "dataset_name", "output_dir"} & set(form)  # the app's own choices are not overwritten
    assert {"model_name", "dataset_name", "output_dir"} <= set(parameter_specs(MANIFEST))  # a parameter file takes them
    assert form["adaptor_name"]["default"]  # an untouched form can be submitted
    for name, hints in MANIFEST["parameters_ui"].items():
        if hints.get("ui:widget") == "RangeWidget" and form[name]["type"] == "number":
            assert 0 < form[name]["multipleOf"] <= 0.01, f"{name}: a 0..1 slider without a step only takes its ends"


def harness_run(tmp_path: Path, tiny_models, sample_data, **config) -> tuple[subprocess.CompletedProcess, Path]:
    """The app's launch: dataset registered in the workspace, input file in workspace/temp, harness started from
    the API's folder. Returns the process and the workspace."""
    workspace = tmp_path / "workspace"
    plugin_dir = install_plugin(workspace)
    shutil.copytree(sample_data, workspace / "datasets" / "shapes-set")
    api_dir = tmp_path / "api"
    api_dir.mkdir()
    (api_dir / "plugin_harness.py").write_text(HARNESS)
    experiment = workspace / "experiments" / "alpha"
    form = {key: str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
            for key, value in base_parameters(tiny_models["sd"], sample_data, tmp_path, max_train_steps=2).items()
            if key in MANIFEST["parameters"]}  # fmt: skip  (the form sends what it renders, often as strings)
    launcher = {
        "template_name": "shapes-lora", "plugin_name": MANIFEST["uniqueId"], "model_name": str(tiny_models["sd"]),
        "model_architecture": "StableDiffusionPipeline", "foundation_model_file_path": "", "embedding_model": "",
        "embedding_model_architecture": "", "embedding_model_file_path": "", "dataset_name": "shapes-set",
        "type": "LoRA", "chatml_formatted_column": "", "run_sweeps": False, "sweep_config": {}, "job_id": 7,
        "adaptor_output_dir": str(workspace / "adaptors" / "tiny-sd" / form["adaptor_name"]),
        "output_dir": str(experiment / "tensorboards" / "shapes-lora"),
    }  # fmt: skip
    input_file = workspace / "temp" / "plugin_input_7.json"
    input_file.parent.mkdir(parents=True)
    input_file.write_text(json.dumps({"experiment": {"name": "alpha", "id": 1}, "config": {**form, **launcher, **config}}))
    done = subprocess.run(
        [sys.executable, "plugin_harness.py", "--plugin_dir", str(plugin_dir), "--input_file", str(input_file),
         "--experiment_name", "alpha"],
        cwd=api_dir, capture_output=True, text=True, timeout=600, env={**os.environ, "TFL_WORKSPACE_DIR": ""},
    )  # fmt: skip
    return done, workspace


def test_the_plugin_harness_trains_into_the_apps_folders(tiny_models, sample_data, tmp_path):
    done, workspace = harness_run(tmp_path, tiny_models, sample_data)
    assert done.returncode == 0, done.stderr[-3000:]
    adapter_dir = workspace / "adaptors" / "tiny-sd" / "test-adapter"
    assert (adapter_dir / WEIGHTS_NAME).is_file()
    run_dir = workspace / "experiments" / "alpha" / "tensorboards" / "shapes-lora" / "test-adapter"
    resolved = json.loads((run_dir / "config.json").read_text())
    assert resolved["dataset_name"] == str(workspace / "datasets" / "shapes-set")  # the registry id, resolved
    assert (run_dir / "eval_images" / "epoch_1.png").is_file()

    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(tiny_models["sd"]))
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, pipe.unet.config.in_channels, 16, 16, generator=generator)
    text = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        before = pipe.unet(latents, 500, text).sample
        pipe.load_lora_weights(str(adapter_dir))
        after = pipe.unet(latents, 500, text).sample
    assert (after - before).abs().max() > 1e-4, "the adapter the app would load changes the model"


def test_a_bad_value_from_the_app_fails_the_harness_naming_the_field(tiny_models, sample_data, tmp_path):
    done, _ = harness_run(tmp_path, tiny_models, sample_data, learning_rate="fast")
    assert done.returncode == 2
    assert "learning_rate: 'fast' is not a valid number" in done.stderr and "Traceback" not in done.stderr


def test_setup_installs_into_the_active_venv_the_app_made(tmp_path):
    """With VIRTUAL_ENV set, setup.sh installs into that venv and creates no .venv of its own. (The venv sees
    this checkout's packages through a .pth file, so pip finds everything installed and the test downloads
    nothing.)"""
    plugin_dir = install_plugin(tmp_path / "workspace")
    venv = plugin_dir / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "checkout.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {**os.environ, "VIRTUAL_ENV": str(venv), "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", "setup.sh"], cwd=plugin_dir, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert not (plugin_dir / ".venv").exists()
    assert (venv / ".setup-stamp").is_file()
    again = subprocess.run(["bash", "setup.sh"], cwd=plugin_dir, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stdout == "", "a second run is a no-op"


@pytest.mark.parametrize("entry", ["main.py", "plugin/main.py"])
def test_both_entry_points_run_the_demo_from_elsewhere(entry, tmp_path):
    done = subprocess.run([sys.executable, str(REPO / entry), "--demo"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "output" / "demo-sd" / WEIGHTS_NAME).is_file()
