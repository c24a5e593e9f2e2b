"""Launched the way each generation of Transformer Lab launches it, in a subprocess from another working
directory, reporting to a job record through the app's real SDK (`transformerlab`):

- plugin era: the manifest's `files` copied to `<workspace>/plugins/<uniqueId>`, `bash setup.sh` run there
  with the app's venv active, then the app's harness (`sys.path.append(plugin_dir); import main; main.main()`)
  with the input file the app writes;
- today: a task (task.yaml's `setup`, then its `run`) in a venv of its own, with `_TFL_JOB_ID` and the
  workspace in the environment and the parameters in the job.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import time

import pytest
import torch
import yaml

from conftest import base_parameters
from plugin.config import load_manifest, parameter_specs
from plugin.docs import TASK_PATH, task_yaml
from plugin.export import WEIGHTS_NAME
from plugin.reporting import SETUP_PERCENT

REPO = Path(__file__).resolve().parent.parent
MANIFEST = load_manifest()
TASK = yaml.safe_load(TASK_PATH.read_text())
# The keys today's app accepts in task.yaml and in each of its parameters (its schema forbids any other).
TASK_KEYS = {"name", "resources", "envs", "setup", "run", "parameters", "github_repo_url", "github_repo_dir",
             "github_repo_branch", "sweeps", "minutes_requested"}  # fmt: skip
TASK_PARAMETER_KEYS = {"type", "default", "min", "max", "step", "options", "enum", "title", "ui_widget", "required"}

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


def install_files(folder: Path) -> Path:
    """Copy the files the manifest lists into `folder` (nothing else comes along)."""
    for name in MANIFEST["files"]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, folder / name)
    return folder


def install_plugin(workspace: Path) -> Path:
    """As the app installs a plugin."""
    return install_files(workspace / "plugins" / MANIFEST["uniqueId"])


def venv_environment(venv: Path, **variables) -> dict[str, str]:
    """The environment of a process run in `venv` (activated, as the app runs plugins and tasks)."""
    return {**os.environ, "VIRTUAL_ENV": str(venv), "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
            **{k: str(v) for k, v in variables.items()}}  # fmt: skip


def layered_venv(venv: Path) -> Path:
    """A venv that also sees this checkout's packages through a .pth file, so that installing into it
    downloads only what the checkout lacks."""
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "checkout.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


@pytest.fixture(scope="session")
def app_venv(tmp_path_factory) -> Path:
    """The venv the app makes for a task (or plugin), set up by task.yaml's own `setup` command, which brings
    the app's SDK. Kept beside .venv between runs: setup.sh's stamp makes the second setup instant. Test
    workers (pytest-xdist) share it: one builds it while the others wait on the lock, then find it ready."""
    venv = REPO / ".venv" / "transformerlab-task"
    venv.parent.mkdir(exist_ok=True)
    with open(venv.parent / "transformerlab-task.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        layered_venv(venv)
        folder = install_files(tmp_path_factory.mktemp("task-setup"))
        done = subprocess.run(["bash", "-c", TASK["setup"]], cwd=folder, env=venv_environment(venv), capture_output=True,
                              text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return venv


def new_job(workspace: Path, job_id: int, parameters: dict | None = None) -> Path:
    """A job as the app creates it before it launches the run; returns the job's folder."""
    job_dir = workspace / "experiments" / "alpha" / "jobs" / str(job_id)
    job_dir.mkdir(parents=True)
    job_data = {"parameters": parameters} if parameters is not None else {}
    record = {"id": str(job_id), "experiment_id": "alpha", "job_data": job_data, "status": "QUEUED", "type": "TRAIN", "progress": 0}
    (job_dir / "index.json").write_text(json.dumps(record))
    return job_dir


def job_record(job_dir: Path) -> dict:
    """The job's record as the app reads it (retried while the SDK is rewriting it)."""
    for _ in range(50):
        try:
            return json.loads((job_dir / "index.json").read_text())
        except json.JSONDecodeError:
            time.sleep(0.05)
    raise AssertionError(f"{job_dir / 'index.json'} stays unreadable")


def assert_adapter_changes_the_model(model: Path, adapter_dir: Path) -> None:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(model))
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, pipe.unet.config.in_channels, 16, 16, generator=generator)
    text = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        before = pipe.unet(latents, 500, text).sample
        pipe.load_lora_weights(str(adapter_dir))
        after = pipe.unet(latents, 500, text).sample
    assert (after - before).abs().max() > 1e-4, "the adapter changes the model"


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


def harness_run(tmp_path: Path, python: Path, tiny_models, sample_data, **config) -> tuple[subprocess.CompletedProcess, Path]:
    """The app's launch: job 7 created, dataset registered in the workspace, input file in workspace/temp,
    harness started from the API's folder by `python`. Returns the process and the workspace."""
    workspace = tmp_path / "workspace"
    new_job(workspace, 7)
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
        [str(python), "plugin_harness.py", "--plugin_dir", str(plugin_dir), "--input_file", str(input_file),
         "--experiment_name", "alpha"],
        cwd=api_dir, capture_output=True, text=True, timeout=600,
        env={**os.environ, "TFL_WORKSPACE_DIR": "", "TFL_HOME_DIR": tmp_path},
    )  # fmt: skip
    return done, workspace


def test_the_plugin_harness_trains_into_the_apps_folders_and_completes_the_job(app_venv, tiny_models, sample_data, tmp_path):
    done, workspace = harness_run(tmp_path, app_venv / "bin" / "python", tiny_models, sample_data)
    assert done.returncode == 0, done.stderr[-3000:]
    adapter_dir = workspace / "adaptors" / "tiny-sd" / "test-adapter"
    assert (adapter_dir / WEIGHTS_NAME).is_file()
    run_dir = workspace / "experiments" / "alpha" / "tensorboards" / "shapes-lora" / "test-adapter"
    resolved = json.loads((run_dir / "config.json").read_text())
    assert resolved["dataset_name"] == str(workspace / "datasets" / "shapes-set")  # the registry id, resolved
    record = job_record(workspace / "experiments" / "alpha" / "jobs" / "7")
    assert (record["status"], record["progress"]) == ("COMPLETE", 100)
    assert record["job_data"]["eval_images_dir"] == str(run_dir / "eval_images")
    assert "epoch_0001.png" in os.listdir(record["job_data"]["eval_images_dir"])
    assert_adapter_changes_the_model(tiny_models["sd"], adapter_dir)


def test_a_bad_value_from_the_app_fails_the_harness_and_the_job_naming_the_field(app_venv, tiny_models, sample_data, tmp_path):
    done, workspace = harness_run(tmp_path, app_venv / "bin" / "python", tiny_models, sample_data, learning_rate="fast")
    assert done.returncode == 2
    message = "learning_rate: 'fast' is not a valid number"
    assert message in done.stderr and "Traceback" not in done.stderr
    record = job_record(workspace / "experiments" / "alpha" / "jobs" / "7")
    assert record["status"] == "FAILED" and message in record["job_data"]["completion_details"]


def test_task_yaml_is_generated_from_the_manifest_in_the_apps_task_format():
    assert TASK_PATH.read_text() == task_yaml(MANIFEST), "run `python -m plugin.docs` to regenerate task.yaml"
    assert set(TASK) <= TASK_KEYS and {"name", "run", "setup", "parameters"} <= set(TASK)
    specs = parameter_specs(MANIFEST)
    assert set(TASK["parameters"]) == set(specs)
    types = {"integer": "int", "number": "float", "boolean": "bool", "string": "string"}
    for name, parameter in TASK["parameters"].items():
        spec = specs[name]
        assert set(parameter) <= TASK_PARAMETER_KEYS, name
        assert (parameter["title"], parameter["default"]) == (spec["title"], spec["default"]), name
        assert parameter["type"] == ("enum" if "enum" in spec else types[spec["type"]]), name
        assert parameter.get("options") == spec.get("enum"), name
        assert (parameter.get("min"), parameter.get("max"), parameter.get("step")) == (spec.get("minimum"), spec.get("maximum"), spec.get("multipleOf")), name
    assert TASK["parameters"]["model_name"]["required"] and TASK["parameters"]["dataset_name"]["required"]


def start_task(tmp_path: Path, venv: Path, parameters: dict, job_id: int = 42) -> tuple[subprocess.Popen, Path]:
    """Today's app: a job holding the parameters, the task folder, task.yaml's `run` in the task's venv."""
    home = tmp_path / "home"
    job_dir = new_job(home / "workspace", job_id, parameters)
    folder = install_files(tmp_path / f"task-{job_id}")
    env = venv_environment(venv, TFL_HOME_DIR=home, TFL_WORKSPACE_DIR=home / "workspace", _TFL_JOB_ID=job_id, _TFL_EXPERIMENT_ID="alpha")
    process = subprocess.Popen(["bash", "-c", TASK["run"]], cwd=folder, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)  # fmt: skip
    return process, job_dir


def test_a_task_of_todays_app_reports_progress_images_model_and_score_to_its_job(app_venv, tiny_models, sample_data, tmp_path):
    """And a second job with the same parameters completes too: each job trains in its own folder."""
    parameters = base_parameters(tiny_models["sd"], sample_data, tmp_path / "out", max_train_steps=8, eval_steps=1, overwrite_output=False)
    parameters["lora_dropout"] = TASK["parameters"]["lora_dropout"]  # left untouched: the app sends its definition
    parameters["output_dir"] = TASK["parameters"]["output_dir"]  # so is the output folder: the job's own
    process, job_dir = start_task(tmp_path, app_venv, parameters)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    record = job_record(job_dir)
    assert (record["status"], record["progress"]) == ("COMPLETE", 100)
    job_data = record["job_data"]
    assert job_data["score"]["loss"] > 0 and "train/loss" in job_data["current_metrics"]
    rows = [json.loads(line) for line in (job_dir / "metrics.jsonl").read_text().splitlines()]
    progress = [row["progress"] for row in rows]
    assert progress == sorted(progress) and progress[:3] == [1, 2, SETUP_PERCENT] and progress[-1] == 100
    assert [row["step"] for row in rows if "step" in row] == list(range(1, 9))
    assert sorted(os.listdir(job_data["eval_images_dir"]))[:2] == ["epoch_0001.png", "epoch_0001_0.png"]
    assert (job_dir / "artifacts" / "epoch_0001.png").is_file()
    assert_adapter_changes_the_model(tiny_models["sd"], job_dir / "models" / "42_test-adapter")
    assert (job_dir / "test-adapter" / WEIGHTS_NAME).is_file(), "the run folder is the job's"

    again, again_dir = start_task(tmp_path, app_venv, parameters, job_id=43)
    output, _ = again.communicate(timeout=600)
    assert again.returncode == 0, output[-3000:]
    assert job_record(again_dir)["status"] == "COMPLETE" and (again_dir / "test-adapter" / WEIGHTS_NAME).is_file()


def test_a_bad_parameter_fails_the_task_and_its_job_naming_the_field(app_venv, tiny_models, sample_data, tmp_path):
    parameters = base_parameters(tiny_models["sd"], sample_data, tmp_path / "out", lr_scheduler="sometimes")
    process, job_dir = start_task(tmp_path, app_venv, parameters)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 2, output[-3000:]
    record = job_record(job_dir)
    assert record["status"] == "FAILED" and "lr_scheduler: 'sometimes' is not one of" in record["job_data"]["completion_details"]


def test_the_apps_stop_ends_the_task_with_a_checkpoint_and_the_adapter(app_venv, tiny_models, sample_data, tmp_path):
    parameters = base_parameters(tiny_models["sd"], sample_data, tmp_path / "out", max_train_steps=5000)
    process, job_dir = start_task(tmp_path, app_venv, parameters)
    try:
        deadline = time.monotonic() + 300
        while job_record(job_dir)["progress"] <= SETUP_PERCENT:
            assert process.poll() is None and time.monotonic() < deadline, "training never started"
            time.sleep(0.1)
        while process.poll() is None:  # as the app's Stop: the flag in the job's data (set again if a write of
            record = job_record(job_dir)  # the run's own raced with ours and lost it)
            record["job_data"]["stop"] = True
            staged = job_dir / "index.json.stop"
            staged.write_text(json.dumps(record))
            os.replace(staged, job_dir / "index.json")
            assert time.monotonic() < deadline, "the run did not stop"
            time.sleep(0.2)
    finally:
        if process.poll() is None:
            process.kill()
    output = process.stdout.read()
    assert process.returncode == 0, output[-3000:]
    record = job_record(job_dir)
    assert record["status"] == "STOPPED" and "stopped by the launcher's Stop" in record["job_data"]["completion_details"]
    run_dir = tmp_path / "out" / "test-adapter"
    assert (run_dir / WEIGHTS_NAME).is_file() and list((run_dir / "checkpoints").glob("step_*/state.json"))


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
    noise = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith(("training:", "caching "))]
    assert not noise, "the demo's terminal holds the trainer's own lines only"
