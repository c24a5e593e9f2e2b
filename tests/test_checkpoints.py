"""Checkpoints and resume: a run killed at any step and resumed equals the unbroken run bit for bit, a clean
stop on SIGTERM, atomic checkpoint writes and retention, and bad checkpoints named in clear errors."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import base_parameters, write_parameter_file
from plugin import checkpoints as checkpoints_module
from plugin.config import parse_parameters
from plugin.errors import ConfigError
from plugin.export import WEIGHTS_NAME
from plugin.main import main
from plugin.run_lock import LOCK_FILE, run_folder_lock
from plugin.stopping import BURST_SECONDS, STOPPED_EXIT_CODE, StopRequest
from plugin.tiny import EDIT_FAMILIES
from plugin.trainer import RunPaths, train

ROOT = Path(__file__).resolve().parent.parent
HARD = dict(use_ema=True, ema_decay=0.9, gradient_accumulation_steps=2, train_batch_size=1, lr_scheduler="cosine",
            lr_warmup_steps=3, lora_dropout=0.1)  # EMA, accumulation, a non-constant schedule, dropout's RNG  # fmt: skip
PLAIN = dict(train_batch_size=2, shuffle_caption=True, caption_prefix="shapes, tiny,")  # and captions drawn per epoch
POSTHOC = dict(use_ema=True, ema_type="posthoc", posthoc_ema_snapshot_steps=4, train_batch_size=2)  # the profiles' state
LEARNED = dict(loss_weighting="learned", validation_split=0.25, num_train_epochs=100, eval_steps=4, train_batch_size=2)  # u(σ); the history


def parameters(tiny_models, sample_data, out: Path, family: str = "sd", **overrides) -> dict:
    return base_parameters(tiny_models[family], sample_data, out, **{"eval_prompt": "", "checkpointing_steps": 3, **overrides})


def train_in_process(params: dict, log=None):
    cfg = parse_parameters(params)
    paths = RunPaths.for_config(cfg)
    result = train(cfg, paths, log=log or (lambda *_: None))
    return result, load_file(str(paths.adapter_dir / WEIGHTS_NAME)), paths


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), max((a[k] - b[k]).abs().max().item() for k in a)


def launch(config: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "plugin" / "main.py"), "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"the run ended before {path.name} appeared:\n{process.stdout.read()}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.005)


@pytest.mark.parametrize("family, settings", [("sd", HARD), ("sd", PLAIN), ("sd", POSTHOC), ("sd", LEARNED), ("chroma", PLAIN), ("zimage", PLAIN),
                                              ("qwen_image", PLAIN), ("flux2", PLAIN), ("flux_kontext", PLAIN),
                                              ("qwen_image_edit", {**PLAIN, "control_resolution": 32})],
                         ids=["ema-accumulation-cosine", "plain-shuffled-captions", "posthoc-ema", "learned-weighting-validation", "chroma", "zimage",
                              "qwen_image", "flux2", "flux_kontext-pairs", "qwen_image_edit-pairs-text-read-with-controls"])  # fmt: skip
def test_a_run_killed_at_a_random_step_resumes_to_the_unbroken_adapter(family, settings, tiny_models, sample_data, pair_data, tmp_path):
    pairs = {"control_dir": str(pair_data / "controls")} if family in EDIT_FAMILIES else {}  # an edit model trains on pairs
    params = parameters(tiny_models, pair_data if pairs else sample_data, tmp_path / "killed", family, max_train_steps=60, **settings, **pairs)
    _, unbroken, unbroken_paths = train_in_process({**params, "output_dir": str(tmp_path / "unbroken")})

    # A fork of this process, its imports done, trains and is killed: what a SIGKILL leaves does not depend on how the
    # process started (a fresh interpreter would spend most of the test importing; the SIGTERM test below launches one).
    process = multiprocessing.get_context("fork").Process(target=train_in_process, args=(params,))
    process.start()
    checkpoints = tmp_path / "killed" / "test-adapter" / "checkpoints"
    deadline = time.monotonic() + 120
    while not (checkpoints / "step_3").exists():
        assert process.is_alive(), "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.005)
    time.sleep(random.Random().uniform(0.0, 0.3))
    os.kill(process.pid, signal.SIGKILL)
    process.join()
    assert process.exitcode == -signal.SIGKILL
    steps = sorted(int(p.name.split("_")[1]) for p in checkpoints.glob("step_*"))
    assert steps and steps[-1] < 60, "killed before the end"

    logged = []
    result, resumed, paths = train_in_process({**params, "resume_from_checkpoint": "latest"}, log=logged.append)
    assert any(line.startswith(f"resumed from {checkpoints / f'step_{steps[-1]}'}") for line in logged)
    assert result.steps == 60 and len(result.losses) == 60 - steps[-1]
    assert_identical(unbroken, resumed)
    metrics = [paths.run_dir / "logs" / "metrics.jsonl", unbroken_paths.run_dir / "logs" / "metrics.jsonl"]
    assert metrics[0].read_text() == metrics[1].read_text(), "the metrics history continues as if never broken"
    if settings.get("validation_split"):  # the validation history continues as if never broken
        assert (paths.run_dir / "validation_loss.json").read_text() == (unbroken_paths.run_dir / "validation_loss.json").read_text()


@pytest.mark.whole_machine  # 'stopped within a step or so' is a time bound
def test_sigterm_stops_after_the_step_with_a_checkpoint_and_the_adapter(tiny_models, sample_data, tmp_path):
    """The schedule here does not depend on the total (warm-up, then constant), so the stopped 400-step run
    can be resumed as a shorter one and compared with an unbroken run of that length."""
    settings = {**HARD, "lr_scheduler": "constant_with_warmup"}
    params = parameters(tiny_models, sample_data, tmp_path / "stopped", max_train_steps=400, checkpointing_steps=5, **settings)
    process = launch(write_parameter_file(tmp_path / "run.json", params))
    run_dir = tmp_path / "stopped" / "test-adapter"
    wait_for(run_dir / "checkpoints" / "step_5", process)
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGTERM)  # Transformer Lab's Stop sends two at once: still one request
    started = time.monotonic()
    output, _ = process.communicate(timeout=60)
    assert process.returncode == STOPPED_EXIT_CODE, output
    assert time.monotonic() - started < 5, "stopped within a step or so"
    stopped_at = int(output.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert stopped_at < 400
    assert (run_dir / "checkpoints" / f"step_{stopped_at}" / "state.json").is_file()
    assert (run_dir / WEIGHTS_NAME).is_file() and (run_dir / "raw" / WEIGHTS_NAME).is_file()

    shortened = {**params, "max_train_steps": stopped_at + 10}
    _, resumed, _ = train_in_process({**shortened, "resume_from_checkpoint": "latest"})
    _, unbroken, _ = train_in_process({**shortened, "output_dir": str(tmp_path / "unbroken")})
    assert_identical(unbroken, resumed)


def test_checkpoint_contents_permissions_and_retention(tiny_models, sample_data, tmp_path):
    params = parameters(tiny_models, sample_data, tmp_path / "out", max_train_steps=10, checkpointing_steps=2,
                        checkpoints_total_limit=2, use_ema=True)  # fmt: skip
    _, adapter, paths = train_in_process(params)
    root = paths.run_dir / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_10", "step_8"], "exactly the limit, newest kept"
    newest = root / "step_10"
    assert sorted(p.name for p in newest.iterdir()) == sorted(["trainable.safetensors", "optimizer.safetensors", "ema.safetensors",
        "rng.safetensors", "state.json", "config.json", "input_config.json"])  # fmt: skip
    state = json.loads((newest / "state.json").read_text())
    assert (state["step"], state["epoch"], state["batches_done"]) == (10, 2, 2)  # 4 steps an epoch
    assert json.loads((newest / "config.json").read_text())["resolution"] == 32
    assert any(p.name.endswith("_kohya.safetensors") for p in paths.adapter_dir.iterdir()), "the community file too"
    for path in [newest, *newest.iterdir(), *paths.run_dir.rglob("*"), *paths.adapter_dir.rglob("*")]:  # every output
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), f"{path}: {oct(mode)}"
    trainable = load_file(str(newest / "trainable.safetensors"))
    raw = load_file(str(paths.adapter_dir / "raw" / WEIGHTS_NAME))
    assert len(trainable) == len(raw) and all(torch.equal(a, b) for a, b in zip(sorted(trainable.values(), key=lambda t: t.sum().item()),
                                                                          sorted(raw.values(), key=lambda t: t.sum().item())))  # fmt: skip


def test_a_failed_checkpoint_write_keeps_the_previous_one(tiny_models, sample_data, tmp_path, monkeypatch):
    """A full disk while writing step_6: a warning naming the folder, training goes on, step_3 stays loadable
    and no half-written folder is left. A kill mid-write (here KeyboardInterrupt) leaves the same."""
    original = checkpoints_module.save_file
    calls = {"n": 0}

    def filling_disk(tensors, path):
        calls["n"] += 1
        if "step_6" in path and path.endswith("optimizer.safetensors"):
            original(tensors, path)
            raise OSError(28, "No space left on device")
        return original(tensors, path)

    monkeypatch.setattr(checkpoints_module, "save_file", filling_disk)
    params = parameters(tiny_models, sample_data, tmp_path / "out", max_train_steps=7, checkpoints_total_limit=1)
    with pytest.warns(UserWarning, match=r"checkpoint at step 6 not written under .*checkpoints \(\[Errno 28\] No space"):
        result, _, paths = train_in_process(params)
    assert result.steps == 7
    root = paths.run_dir / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step_3"], "the older one kept; nothing half-written"

    def killed(tensors, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints_module, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        train_in_process({**params, "resume_from_checkpoint": "latest"})
    assert [p.name for p in root.iterdir()] == ["step_3"]
    monkeypatch.setattr(checkpoints_module, "save_file", original)
    assert train_in_process({**params, "resume_from_checkpoint": str(root / "step_3")})[0].steps == 7


def test_a_full_disk_at_the_final_save_ends_in_one_line_naming_what_is_kept(tiny_models, sample_data, tmp_path, monkeypatch, capsys):
    """The adapter of epoch 1 is written, the final one meets a full disk (safetensors' own error): exit 74,
    one line with the folder, the space, and the adapter and checkpoint kept; a warning came before training."""
    import shutil as shutil_module

    from safetensors import SafetensorError

    import plugin.trainer

    saves, original = [], plugin.trainer.save_adapter_atomic

    def full_at_the_end(family, modules, folder, run_config=None):
        saves.append(folder)
        if len(saves) > 1:
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })")
        return original(family, modules, folder, run_config)

    monkeypatch.setattr(plugin.trainer, "save_adapter_atomic", full_at_the_end)
    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr("plugin.disk.shutil.disk_usage", lambda path: usage._replace(free=4096))
    params = parameters(tiny_models, sample_data, tmp_path / "out", max_train_steps=6, num_train_epochs=2, eval_steps=1)
    with pytest.warns(UserWarning, match=r"output_dir: 0.0 MB free on the disk of .*test-adapter', and this run writes about "
                                         r"[\d.]+ MB \(adapters and checkpoints\); a save will fail when it runs out"):  # fmt: skip
        code = main(["--config", str(write_parameter_file(tmp_path / "run.json", params))])
    run_dir = tmp_path / "out" / "test-adapter"
    error = capsys.readouterr().err
    assert code == 74 and "Traceback" not in error, error
    assert error.strip().splitlines()[-1] == (
        f"error: output_dir: the adapter could not be written to {str(run_dir)!r} (Error while serializing: IoError(Os {{ code: 28, "
        'kind: StorageFull, message: "No space left on device" })); it needs about 0.1 MB, 0.0 MB are free; kept: the previous '
        f"adapter in {str(run_dir)!r}, the last checkpoint {str(run_dir / 'checkpoints' / 'step_6')!r} (resume_from_checkpoint: latest)")
    assert len(saves) == 2 and load_file(str(run_dir / WEIGHTS_NAME)), "epoch 1's adapter is intact"


def test_bad_checkpoints_are_clear_errors_before_any_model_loads(tiny_models, sample_data, tmp_path, monkeypatch):
    params = parameters(tiny_models, sample_data, tmp_path / "out", max_train_steps=3)
    _, _, paths = train_in_process(params)
    step_3 = paths.run_dir / "checkpoints" / "step_3"

    from plugin.families.base import ModelFamily

    monkeypatch.setattr(ModelFamily, "load", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(ConfigError, match="resume_from_checkpoint: .*missing.* is not a checkpoint folder"):
        train_in_process({**params, "resume_from_checkpoint": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match=r"another run \(dataset_name: .* in the checkpoint, .* now; lora_r: 4 in the checkpoint, 8 now\)"):
        train_in_process({**params, "resume_from_checkpoint": str(step_3), "lora_r": 8, "dataset_name": str(tmp_path)})
    with pytest.raises(ConfigError, match="model_name"):
        train_in_process({**params, "resume_from_checkpoint": str(step_3), "model_name": str(tiny_models["sdxl"])})

    monkeypatch.undo()  # the model loads again: these checks read the checkpoint's files
    state_file = step_3 / "state.json"
    saved = state_file.read_text()
    state_file.write_text(saved.replace('"num_processes": 1', '"num_processes": 2'))
    with pytest.raises(ConfigError, match="written by a run of 2 processes, this one has 1"):
        train_in_process({**params, "resume_from_checkpoint": str(step_3)})
    state_file.write_text(saved)
    weights = step_3 / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(ConfigError, match=f"cannot read {weights}"):
        train_in_process({**params, "resume_from_checkpoint": str(step_3)})


def test_harmless_changes_are_allowed_and_printed(tiny_models, sample_data, tmp_path):
    params = parameters(tiny_models, sample_data, tmp_path / "out", max_train_steps=3)
    train_in_process(params)
    logged = []
    result, _, _ = train_in_process({**params, "resume_from_checkpoint": "latest", "max_train_steps": 5,
                                     "eval_prompt": "a red circle"}, log=logged.append)  # fmt: skip
    assert result.steps == 5 and len(result.losses) == 2 and result.eval_images
    assert "resuming with eval_prompt changed: '' -> 'a red circle'" in logged
    assert "resuming with max_train_steps changed: 3 -> 5" in logged


def test_latest_without_a_checkpoint_starts_fresh(tiny_models, sample_data, tmp_path):
    params = parameters(tiny_models, sample_data, tmp_path / "out", max_train_steps=2, resume_from_checkpoint="latest")
    assert train_in_process(params)[0].steps == 2


def test_a_run_folder_belongs_to_one_run(tiny_models, sample_data, tmp_path, monkeypatch):
    """A second run into a folder holding a run is refused before any model loads; overwrite_output replaces it
    (its checkpoints deleted, so 'latest' cannot pick up the old run); a file in the way names output_dir."""
    from plugin.families.base import ModelFamily

    params = parameters(tiny_models, sample_data, tmp_path / "out", max_train_steps=3, overwrite_output=False)
    _, _, paths = train_in_process(params)
    config_before = (paths.run_dir / "config.json").read_bytes()
    monkeypatch.setattr(ModelFamily, "load", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(ConfigError, match="output_dir: .*test-adapter' already holds a run; set resume_from_checkpoint"):
        train_in_process({**params, "learning_rate": 1e-2})
    assert (paths.run_dir / "config.json").read_bytes() == config_before, "the refused run wrote nothing"
    blocker = tmp_path / "file"
    blocker.write_text("in the way")
    with pytest.raises(ConfigError, match="output_dir: cannot write to .*Not a directory"):
        train_in_process({**params, "output_dir": str(blocker)})

    monkeypatch.undo()  # the model loads again: these checks read the checkpoint's files
    logged = []
    train_in_process({**params, "overwrite_output": True, "max_train_steps": 2, "checkpointing_steps": 0}, log=logged.append)
    assert any(line.startswith("overwrite_output: deleted the previous run's checkpoints") for line in logged)
    assert not (paths.run_dir / "checkpoints").exists()
    assert json.loads((paths.run_dir / "config.json").read_text())["max_train_steps"] == 2


def test_a_run_refused_for_its_folder_prints_the_refusal_alone(tiny_models, sample_data, tmp_path, capsys):
    params = parameters(tiny_models, sample_data, tmp_path / "out", max_train_steps=2, overwrite_output=False, checkpointing_steps=0)
    config = write_parameter_file(tmp_path / "run.json", params)
    assert main(["--config", str(config)]) == 0
    capsys.readouterr()
    assert main(["--config", str(config)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [f"error: output_dir: {str(tmp_path / 'out' / 'test-adapter')!r} already holds a run; "
                                              "set resume_from_checkpoint to 'latest' to continue it, overwrite_output to true to "
                                              "replace it, or choose another adaptor_name"]  # fmt: skip


HOLD_THE_LOCK = """
import sys, time
from pathlib import Path
from plugin.run_lock import run_folder_lock
with run_folder_lock(Path(sys.argv[1]), "training"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_run_folder_is_locked_while_a_command_writes_it_and_a_kill_leaves_no_stale_lock(tiny_models, sample_data, tmp_path, capsys):
    params = parameters(tiny_models, sample_data, tmp_path / "out", max_train_steps=2, checkpointing_steps=0)
    run_dir, config = tmp_path / "out" / "test-adapter", write_parameter_file(tmp_path / "run.json", params)
    with run_folder_lock(run_dir, "training"):  # another run, started a moment earlier
        assert main(["--config", str(config)]) == 2
        assert main(["--config", str(write_parameter_file(tmp_path / "resume.json", {**params, "resume_from_checkpoint": "latest"}))]) == 2
        assert main(["--posthoc-ema", str(run_dir), "--sigma-rel", "0.07"]) == 2
    refusals = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(refusals) == 3 and all(f"output_dir: {str(run_dir)!r} is in use by PID {os.getpid()} (training, started " in line
                                      for line in refusals), refusals  # fmt: skip
    assert [p.name for p in run_dir.iterdir()] == [LOCK_FILE], "the refused runs wrote nothing"

    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ConfigError, match=f"is in use by PID {holder.pid} \\(training, started "):
        with run_folder_lock(run_dir, "resuming"):
            pass
    holder.kill()
    holder.wait()
    assert main(["--config", str(config)]) == 0, "the kernel released the killed holder's lock"
    assert (run_dir / WEIGHTS_NAME).is_file() and (run_dir / LOCK_FILE).read_text().startswith(f"PID {os.getpid()} (training, ")
    assert stat.S_IMODE((run_dir / LOCK_FILE).stat().st_mode) == 0o644


def test_a_signal_burst_is_one_request_a_later_signal_interrupts_and_the_launcher_flag_is_polled():
    logged, flag = [], []
    with StopRequest(logged.append, poll=lambda: bool(flag)) as stop:
        assert not stop.requested
        flag.append(True)
        assert stop.requested and stop.reason == "the launcher's Stop"
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # within BURST_SECONDS of the first: the same request
        time.sleep(BURST_SECONDS + 0.1)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs between bytecodes; sleeping lets it
    assert signal.getsignal(signal.SIGTERM) != stop._handle, "handlers restored"
    assert len(logged) == 1
