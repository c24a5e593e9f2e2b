"""Bad input fails fast, names what is wrong and never costs data (issue 12): every check that needs only
configs runs before a weight is read, parameter files are checked before PyTorch is imported, broken model
folders and an unreachable hub get one clear line, Ctrl-C never prints a traceback, and what the data
loses (long captions, transparency, missing captions) is said."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import base_parameters, write_parameter_file
from plugin.config import parse_parameters
from plugin.data import AugmentOptions, apply_plan, example_rng, load_image_dataset, plan_transform, upright_image
from plugin.errors import ConfigError
from plugin.families.base import ModelFamily
from plugin.families.description import safetensors_problem
from plugin.main import main
from plugin.stopping import StartupInterrupts
from plugin.trainer import RunPaths, train

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def no_weights(monkeypatch):
    """Any attempt to read weights fails the test: the error had to come first."""

    def load(self, dtype):
        raise AssertionError("weights were loaded before the bad input was reported")

    monkeypatch.setattr(ModelFamily, "load", load)


def run(parameters: dict):
    cfg = parse_parameters(parameters)
    return train(cfg, RunPaths.for_config(cfg), log=lambda *_: None)


def model_copy(source: Path, folder: Path, edit_json: dict[str, dict] | None = None) -> Path:
    """A copy of a saved pipeline with some of its JSON files changed (configs only: no weights are rewritten)."""
    shutil.copytree(source, folder)
    for name, changes in (edit_json or {}).items():
        path = folder / name
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return folder


# --- every config-only check runs before the weights load ---------------------------------------------------


@pytest.mark.parametrize(
    "family, overrides, message",
    [
        ("sd", {"resolution": 33}, "resolution: 33 must be a multiple of 2"),  # tiny VAEs downsample by 2
        ("flux", {"resolution": 34}, "resolution: 34 must be a multiple of 4"),  # ... and 2x2 patches
        ("sd", {"eval_width": 33}, "eval_width"),
        ("sd", {"resolution": 100}, r"resolution \(eval_width 0: the evaluation images take it\): 100 is not a multiple of 8, the sizes "
                                    "StableDiffusionPipeline renders"),  # the tiny VAE takes 100; the pipeline does not
        ("sdxl", {"eval_height": 36}, "eval_height: 36 is not a multiple of 8, the sizes StableDiffusionXLPipeline renders"),
        ("flux", {"eval_width": 34}, "eval_width: 34 is not a multiple of 4, the sizes FluxPipeline renders"),
        ("sd", {"loss_weighting": "cosmap"}, "loss_weighting: 'cosmap' is for flow-matching"),
        ("sd3", {"loss_weighting": "min_snr"}, "loss_weighting: 'min_snr' is for DDPM"),
        ("sd", {"loss_weighting": "min_snr", "snr_gamma": 0}, "snr_gamma"),
        ("flux", {"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
        ("sd3", {"train_text_encoder": True}, "train_text_encoder"),
        ("flux", {"train_text_encoder": True}, "train_text_encoder"),
        ("sd", {"lora_target_modules": "to_q,to_kk"}, r"lora_target_modules: no linear or convolution layer named 'to_kk'.*are: .*to_k, "),
        ("sd", {"lora_target_modules": "norm1"}, "no linear or convolution layer named 'norm1'"),  # PEFT cannot wrap a norm
        ("sd", {"alpha_background": "not-a-colour"}, "alpha_background"),
        ("sd", {"trigger_word": " ".join(["circle"] * 80)}, "trigger_word: .* alone fills the 77-token limit"),
        ("flux", {"shard_base_model": True, "base_quantization": "int8"}, "shard_base_model: a quantised base .* cannot be sharded"),
    ],
)
def test_config_only_mistakes_are_reported_before_any_weight_loads(family, overrides, message, tiny_models, sample_data,
                                                                    tmp_path, no_weights):  # fmt: skip
    with pytest.raises(ConfigError, match=message):
        run(base_parameters(tiny_models[family], sample_data, tmp_path / "out", **overrides))


@pytest.mark.parametrize("variable, flag", [("ACCELERATE_USE_FSDP", "--use_fsdp"), ("ACCELERATE_USE_DEEPSPEED", "--use_deepspeed")])
def test_an_fsdp_or_deepspeed_launch_is_refused_before_loading(variable, flag, tiny_models, sample_data, tmp_path, no_weights,
                                                               monkeypatch):  # fmt: skip
    """Accelerate's sharding wraps a model handed to prepare(), which this trainer never does: such a launch
    would train unsharded while the user believes otherwise."""
    monkeypatch.setenv(variable, "true")
    with pytest.raises(ConfigError, match=f"accelerate launch {flag}: .* shard_base_model: true"):
        run(base_parameters(tiny_models["flux"], sample_data, tmp_path / "out"))


def test_the_default_resolution_trains_at_the_models_native_size(tiny_models, sample_data, tmp_path):
    """resolution 0 (the default) is filled in from the model before anything that needs a size."""
    parameters = base_parameters(tiny_models["sd"], sample_data, tmp_path / "out", max_train_steps=1, eval_prompt="")
    del parameters["resolution"]
    assert parse_parameters(parameters).resolution == 0
    run(parameters)
    resolved = json.loads((tmp_path / "out" / "test-adapter" / "config.json").read_text())
    assert resolved["resolution"] == 32  # the tiny UNet's sample_size 16 x the tiny VAE's factor 2


def test_lora_target_error_lists_the_layer_names_of_the_model(tiny_models, sample_data, tmp_path, no_weights):
    with pytest.raises(ConfigError) as error:
        run(base_parameters(tiny_models["flux"], sample_data, tmp_path / "out", lora_target_modules="attn.to_qq"))
    listed = str(error.value).split("are: ")[1].split(", ")
    assert {"to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "proj_out"} <= set(listed)
    assert "norm" not in listed  # only layers LoRA can wrap (linear, convolution) are offered


def test_inpainting_and_refiner_checkpoints_are_refused_before_loading(tiny_models, sample_data, tmp_path, no_weights):
    inpainting = model_copy(tiny_models["sd"], tmp_path / "inpaint", {"unet/config.json": {"in_channels": 9}})
    with pytest.raises(ConfigError, match="9 input channels.*inpainting"):
        run(base_parameters(inpainting, sample_data, tmp_path / "out"))
    refiner = model_copy(tiny_models["sdxl"], tmp_path / "refiner", {"model_index.json": {"text_encoder": [None, None], "tokenizer": [None, None]}})
    with pytest.raises(ConfigError, match="refiner"):
        run(base_parameters(refiner, sample_data, tmp_path / "out"))


@pytest.mark.parametrize("problem", ["a file in the way", "a name too long"])
def test_an_unusable_output_dir_is_named_before_loading(problem, tiny_models, sample_data, tmp_path, no_weights):
    if problem == "a file in the way":
        output = tmp_path / "taken"
        output.write_text("not a folder")
    else:
        output = tmp_path / ("x" * 300)
    with pytest.raises(ConfigError, match="output_dir: cannot write to"):
        run(base_parameters(tiny_models["sd"], sample_data, output))


def test_a_rejected_overwrite_keeps_the_previous_runs_checkpoints(tiny_models, sample_data, tmp_path):
    """overwrite_output deletes the old run's checkpoints only once every check has passed: a run refused for
    bad input (here a trigger word that fills CLIP's limit, checked late) costs nothing."""
    parameters = base_parameters(tiny_models["sd"], sample_data, tmp_path / "out", max_train_steps=2, checkpointing_steps=1,
                                 eval_prompt="")  # fmt: skip
    run(parameters)
    checkpoints = tmp_path / "out" / "test-adapter" / "checkpoints"
    kept = sorted(p.name for p in checkpoints.iterdir())
    assert kept == ["step_1", "step_2"]
    with pytest.raises(ConfigError, match="trigger_word"):
        run({**parameters, "overwrite_output": True, "trigger_word": " ".join(["circle"] * 80)})
    assert sorted(p.name for p in checkpoints.iterdir()) == kept


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_a_read_only_output_dir_is_named_before_loading(tiny_models, sample_data, tmp_path, no_weights):
    output = tmp_path / "read-only"
    (output / "test-adapter").mkdir(parents=True)
    output.chmod(0o555)
    (output / "test-adapter").chmod(0o555)
    try:
        with pytest.raises(ConfigError, match="output_dir: cannot write to"):
            run(base_parameters(tiny_models["sd"], sample_data, output))
    finally:
        (output / "test-adapter").chmod(0o755)
        output.chmod(0o755)


# --- broken model folders: one line naming the component and file ------------------------------------------


def test_a_missing_component_folder_is_named(tiny_models, sample_data, tmp_path, capsys, no_weights):
    model = model_copy(tiny_models["sd"], tmp_path / "no-vae")
    shutil.rmtree(model / "vae")
    parameters = base_parameters(model, sample_data, tmp_path / "out")
    assert main(["--config", str(write_parameter_file(tmp_path / "run.json", parameters))]) == 2
    err = capsys.readouterr().err
    assert "the vae/ folder is missing" in err and "Traceback" not in err


def test_a_truncated_weights_file_is_named(tiny_models, sample_data, tmp_path, capsys, no_weights):
    model = model_copy(tiny_models["sd"], tmp_path / "cut")
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    assert safetensors_problem(weights) is None
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    assert safetensors_problem(weights) == f"truncated ({len(data) - 100} of {len(data)} bytes)"
    parameters = base_parameters(model, sample_data, tmp_path / "out")
    assert main(["--config", str(write_parameter_file(tmp_path / "run.json", parameters))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unet/diffusion_pytorch_model.safetensors" in err and "truncated" in err
    weights.write_bytes(b"\x10\x00")
    assert safetensors_problem(weights) == "truncated (2 bytes)"
    weights.write_bytes((1000).to_bytes(8, "little") + b"{}")
    assert "header alone" in safetensors_problem(weights)


# --- parameter files: checked before PyTorch is imported ----------------------------------------------------

CHECK_WITHOUT_TORCH = """
import sys
from plugin.main import main
code = main(["--config", sys.argv[1]])
print("exit", code, "torch imported:", "torch" in sys.modules)
"""


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"learning_rate": 1e-4,}', "is not valid JSON"),
        (b'{"learning_rate": 1e-4, "learning_rate": 1e-3}', "'learning_rate' is given more than once"),
        ('{"learning_rate": 1e-4}'.encode("utf-16"), "is UTF-16 text; save it as UTF-8"),
        (b'{"learning_rate": "fast"}', "learning_rate: 'fast' is not a valid number"),
        (b'{"learnig_rate": 1e-4}', "did you mean learning_rate"),
        (b'{"adaptor_name": "a", "model_name": "m", "dataset_name": "d", "lora_r": 0, "learning_rate": "fast", "lr_scheduler": "sometimes"}',
         "error: 3 problems in the parameters:\n  lora_r: 0 is below the minimum 1\n  learning_rate: 'fast' is not a valid number\n"
         "  lr_scheduler: 'sometimes' is not one of"),  # every mistake of the file in one go
        (None, "is a folder; expected a JSON file"),
    ],
)
def test_parameter_file_errors_come_before_pytorch_is_imported(content, message, tmp_path):
    path = tmp_path / "run.json"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    done = subprocess.run([sys.executable, "-c", CHECK_WITHOUT_TORCH, str(path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "exit 2 torch imported: False"
    assert message in done.stderr and "Traceback" not in done.stderr


def test_a_utf8_byte_order_mark_is_accepted(tiny_models, sample_data, tmp_path):
    from plugin.config import read_parameter_file

    path = tmp_path / "run.json"
    path.write_bytes("\ufeff".encode() + json.dumps({"learning_rate": 0.5}).encode())
    assert read_parameter_file(path) == {"learning_rate": 0.5}


# --- the hub ---------------------------------------------------------------------------------------------------


def test_an_unreachable_hub_is_said_to_be_unreachable(sample_data, tmp_path):
    """A hub id that is not cached, with the hub out of reach (a closed local port stands in for no network):
    the message says so and how to use a local folder, instead of 'no file named model_index.json'."""
    parameters = base_parameters(Path("someone/some-model"), sample_data, tmp_path / "out")
    parameters["model_name"] = "someone/some-model"
    file = write_parameter_file(tmp_path / "run.json", parameters)
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
    done = subprocess.run([sys.executable, "plugin/main.py", "--config", str(file)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2
    assert "model_name: 'someone/some-model' is not a local folder" in done.stderr
    assert "could not be reached (offline?)" in done.stderr and "set model_name to a local folder" in done.stderr
    assert "Traceback" not in done.stderr


# --- Ctrl-C ---------------------------------------------------------------------------------------------------


def interrupted(arguments: list[str], presses: list[float], wait_for: str | None = None) -> subprocess.CompletedProcess:
    """Run plugin/main.py, press Ctrl-C (SIGINT) at the given delays (after `wait_for` appears on stderr, if
    given) and collect what it printed."""
    process = subprocess.Popen([sys.executable, "plugin/main.py", *arguments], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    seen = ""
    if wait_for:
        while wait_for not in seen:
            line = process.stderr.readline()
            assert line, f"the run ended before printing {wait_for!r}: {seen[-2000:]}"
            seen += line
    for delay in presses:
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, out, seen + err)


def test_a_failure_while_rendering_is_one_line_saying_the_adapter_was_saved(tiny_models, sample_data, tmp_path, monkeypatch, capsys):
    import plugin.evaluation

    def out_of_memory(*_):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB")

    monkeypatch.setattr(plugin.evaluation, "render_images", out_of_memory)
    parameters = base_parameters(tiny_models["sd"], sample_data, tmp_path / "out", max_train_steps=4, num_train_epochs=2)
    assert main(["--config", str(write_parameter_file(tmp_path / "run.json", parameters))]) == 1
    run_dir = tmp_path / "out" / "test-adapter"
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        "error: the evaluation images of step 4 could not be rendered (RuntimeError: CUDA out of memory. Tried to allocate "
        f"20.00 MiB); the adapter of this step was saved in {str(run_dir)!r}")
    assert (run_dir / "pytorch_lora_weights.safetensors").is_file()


def test_save_tiny_model_writes_a_model_a_config_run_trains_on(sample_data, tmp_path, capsys):
    model = tmp_path / "tiny-sdxl"
    assert main(["--save-tiny-model", str(model), "--family", "sdxl"]) == 0
    assert f"saved a tiny sdxl pipeline (random weights) in {model}" in capsys.readouterr().out
    parameters = {"model_name": str(model), "dataset_name": str(sample_data), "output_dir": str(tmp_path / "out"),
                  "adaptor_name": "rehearsal", "max_train_steps": 2, "resolution": 32}  # fmt: skip
    assert main(["--config", str(write_parameter_file(tmp_path / "run.json", parameters))]) == 0
    assert json.loads((tmp_path / "out" / "rehearsal" / "config.json").read_text())["model_family"] == "sdxl"
    assert main(["--save-tiny-model", str(model)]) == 2, "never over an existing folder"
    assert main(["--save-tiny-model", str(tmp_path / "x"), "--family", "sd4"]) == 2
    assert "--family: 'sd4' is not one of sd, sdxl, sd3, flux, chroma, zimage, qwen_image, flux2" in capsys.readouterr().err


def test_ctrl_c_during_imports_ends_with_one_line(tiny_models, sample_data, tmp_path):
    file = write_parameter_file(tmp_path / "run.json", base_parameters(tiny_models["sd"], sample_data, tmp_path / "out"))
    done = interrupted(["--config", str(file)], presses=[0.5, 0.05, 0.05])
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("interrupted:")


def test_ctrl_c_during_the_heavy_imports_waits_for_their_end_then_stops_before_anything_is_written(
        tiny_models, sample_data, tmp_path, monkeypatch, no_weights, capsys):  # fmt: skip
    """Raised inside PyTorch's import, a KeyboardInterrupt can abort the process (its C++ calls back into
    Python) or be swallowed by a library's import guard (the run then trained and exited 0); so a press
    during the imports is remembered and raised when they are done."""
    import plugin.main

    imports = []

    def imports_taking_a_press():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)  # the handler runs between bytecodes: here, without raising
        imports.append("done")

    monkeypatch.setattr(plugin.main, "quiet_libraries", imports_taking_a_press)
    parameters = write_parameter_file(tmp_path / "run.json", base_parameters(tiny_models["sd"], sample_data, tmp_path / "out"))
    assert main(["--config", str(parameters)]) == 130 and imports == ["done"]
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("interrupted:")
    assert not (tmp_path / "out").exists(), "nothing was written"
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN, "presses while exiting are ignored"
    signal.signal(signal.SIGINT, signal.default_int_handler)

    with StartupInterrupts() as startup:  # outside the imports a press raises; one a library swallows is kept
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        except KeyboardInterrupt:
            pass  # an optional-import guard
        with pytest.raises(KeyboardInterrupt):
            startup.check()


def test_ctrl_c_pressed_repeatedly_while_training_ends_without_a_traceback(tiny_models, sample_data, tmp_path):
    parameters = base_parameters(tiny_models["sd"], sample_data, tmp_path / "out", max_train_steps=100000, eval_prompt="")
    done = interrupted(["--config", str(write_parameter_file(tmp_path / "run.json", parameters))],
                       presses=[0.3, 0.01, 0.01, 0.01], wait_for="training:")  # fmt: skip
    assert done.returncode in (75, 130), done.stderr
    assert "Traceback" not in done.stderr


# --- what the data loses is said -------------------------------------------------------------------------------


def write_folder(folder: Path, images: dict[str, Image.Image], captions: list) -> Path:
    folder.mkdir(parents=True)
    rows = []
    for (name, image), caption in zip(images.items(), captions):
        image.save(folder / name)
        rows.append(json.dumps({"file_name": name, "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def test_long_captions_are_counted_and_said_once(tiny_models, tmp_path):
    long = " ".join(["red circle"] * 60)  # far past CLIP's 77 tokens
    images = {f"{i}.png": Image.new("RGB", (32, 32), (i * 40, 0, 0)) for i in range(4)}
    data = write_folder(tmp_path / "data", images, [long, long + " blue", "a short one", "another short one"])
    with pytest.warns(UserWarning, match=r"2 of 4 captions exceed tokenizer \(CLIPTokenizer, 77 tokens\) and lose up to \d+ tokens"):
        run(base_parameters(tiny_models["sd"], data, tmp_path / "out", max_train_steps=1, eval_prompt=""))


def test_transparency_is_composited_over_alpha_background():
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 255))
    rgba.paste((0, 0, 255, 0), (0, 0, 8, 16))  # left half: fully transparent blue
    palette = rgba.convert("RGB").quantize(colors=4)
    palette.info["transparency"] = palette.getpixel((0, 0))  # the left half's palette entry is transparent
    for image in (rgba, palette):
        for background, expected in (("white", 1.0), ("black", -1.0)):
            options = AugmentOptions(16, True, False, "nearest", False, 0, 0, 0, 0, False, 0, 0, alpha_background=background)
            upright = upright_image(image)
            plan = plan_transform((16, 16), (16, 16), options, example_rng(0, 0, 0))
            tensor = apply_plan(upright, plan)
            assert torch.allclose(tensor[:, :, :8], torch.full((3, 16, 8), expected)), (image.mode, background)
            assert torch.allclose(tensor[:, :, 8:], torch.tensor([1.0, -1.0, -1.0])[:, None, None].expand(3, 16, 8))
    assert plan_transform((16, 16), (16, 16), options, example_rng(0, 0, 0)).background == (0, 0, 0)  # in the cache key


def test_transparent_images_are_counted_in_the_run_log(tiny_models, tmp_path):
    images = {"a.png": Image.new("RGBA", (32, 32), (255, 0, 0, 0)), "b.png": Image.new("RGB", (32, 32))}
    data = write_folder(tmp_path / "data", images, ["a", "b"])
    lines = []
    cfg = parse_parameters(base_parameters(tiny_models["sd"], data, tmp_path / "out", max_train_steps=1, eval_prompt="", alpha_background="#808080"))
    train(cfg, RunPaths.for_config(cfg), log=lines.append)
    assert "1 of 2 images have transparency; composited over '#808080' (alpha_background)" in lines


def test_null_and_blank_captions_are_counted(tmp_path):
    images = {f"{i}.png": Image.new("RGB", (8, 8)) for i in range(4)}
    data = write_folder(tmp_path / "data", images, [None, "", "a caption", "another"])
    with pytest.warns(UserWarning, match="2 of 4 images .* have no caption"):
        load_image_dataset(str(data), "image", "text")


def test_a_malformed_metadata_line_is_named_with_its_line_number(tmp_path):
    data = write_folder(tmp_path / "data", {"a.png": Image.new("RGB", (8, 8)), "b.png": Image.new("RGB", (8, 8))}, ["a", "b"])
    lines = (data / "metadata.jsonl").read_text().splitlines()
    (data / "metadata.jsonl").write_text(f"{lines[0]}\n\n{lines[1][:-1]}\n")  # blank line 2, line 3 cut short
    with pytest.raises(ConfigError, match=r"metadata.jsonl' line 3: not valid JSON"):
        load_image_dataset(str(data), "image", "text")
    (data / "metadata.jsonl").write_text(f'{lines[0]}\n{{"text": "no file"}}\n')
    with pytest.raises(ConfigError, match=r"line 2: expected a JSON object with a \"file_name\" key"):
        load_image_dataset(str(data), "image", "text")


@pytest.mark.parametrize("edm_part", ["scheduler", "vae"])
def test_an_edm_formulated_sdxl_model_is_refused_before_loading(edm_part, tiny_models, sample_data, tmp_path, no_weights):
    """Playground v2.5-style SDXL (an EDM scheduler, a VAE with latents_mean/latents_std) would train on the wrong
    noise process and latent scale: refused, naming the model, before any weight is read. Either sign suffices."""
    model = tmp_path / "playground-like"
    shutil.copytree(tiny_models["sdxl"], model)
    if edm_part == "scheduler":
        index = json.loads((model / "model_index.json").read_text())
        index["scheduler"] = ["diffusers", "EDMDPMSolverMultistepScheduler"]
        (model / "model_index.json").write_text(json.dumps(index))
        (model / "scheduler" / "scheduler_config.json").write_text(json.dumps(
            {"_class_name": "EDMDPMSolverMultistepScheduler", "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5,
             "prediction_type": "epsilon", "num_train_timesteps": 1000}))  # fmt: skip
    else:
        vae = json.loads((model / "vae" / "config.json").read_text())
        vae.update(latents_mean=[0.1] * 4, latents_std=[0.9] * 4)
        (model / "vae" / "config.json").write_text(json.dumps(vae))
    cfg = parse_parameters(base_parameters(model, sample_data, tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"model_name: .*playground-like.* is an EDM-formulated SDXL model"):
        train(cfg, RunPaths.for_config(cfg), log=lambda *_: None)


def test_default_targets_a_model_lacks_are_skipped_with_a_warning(tiny_models, sample_data, tmp_path, monkeypatch):
    """A variant without one of its family's usual layers trains on the others, and says which it skipped; a
    model with none of them is an error, as is a missing target the user named (above)."""
    from plugin.families.sd import StableDiffusion

    monkeypatch.setattr(StableDiffusion, "default_lora_targets", ("to_q", "to_v", "add_q_proj"))
    with pytest.warns(UserWarning, match="lora_target_modules: this Stable Diffusion 1.x/2.x unet has no layer named add_q_proj; LoRA goes on to_q, to_v"):
        result = run(base_parameters(tiny_models["sd"], sample_data, tmp_path / "out", max_train_steps=1, eval_prompt=""))
    modules = {key.split(".lora_")[0].rsplit(".", 1)[-1] for key in load_file(str(result.adapter_path))}
    assert modules == {"to_q", "to_v"}
    resolved = json.loads((tmp_path / "out" / "test-adapter" / "config.json").read_text())
    assert resolved["lora_target_modules"] == "to_q,to_v", "the run's config says what it trained"
    monkeypatch.setattr(StableDiffusion, "default_lora_targets", ("add_q_proj",))
    with pytest.raises(ConfigError, match="no linear or convolution layer named 'add_q_proj'"):
        run(base_parameters(tiny_models["sd"], sample_data, tmp_path / "out"))
