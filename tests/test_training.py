"""The training loop on the tiny SD model: the reference trainer's defects (../shared/PITFALLS.md) are absent,
runs are reproducible, bad input fails early, outputs survive interruption, and every objective learns."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import base_parameters, final_eval_image, heldout_losses, load_fresh, render, write_parameter_file
from plugin.config import parse_parameters
from plugin.errors import ConfigError
from plugin.export import WEIGHTS_NAME
from plugin.families.base import ModelFamily
from plugin.main import main


def adapter(paths) -> dict[str, torch.Tensor]:
    return load_file(str(paths.adapter_dir / WEIGHTS_NAME))


def test_gradient_clipping_really_clips(run_training, monkeypatch):
    """Pitfall 1: the global grad norm seen by the optimizer is at most max_grad_norm."""
    seen = []
    original_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    run_training(max_grad_norm=1e-4, max_train_steps=4, learning_rate=1e-2, eval_prompt="")
    clipped = list(seen)
    seen.clear()
    run_training(max_grad_norm=0, max_train_steps=4, learning_rate=1e-2, eval_prompt="")
    assert len(clipped) == 4 and max(clipped) <= 1e-4 * (1 + 1e-4)
    assert min(seen) > 1e-3, "without clipping the norms are far above the bound, so the bound really acted"


def test_gradient_accumulation_keeps_the_effective_learning_rate(run_training):
    """Pitfall 2 and 12: batch 4 x accumulation 1 and batch 2 x accumulation 2 give the same update and the
    same logged loss (the mean over the accumulated micro-batches). Adam's epsilon is set large so the
    update is linear in the gradient: an undivided loss would double it."""
    common = dict(max_train_steps=1, learning_rate=1e-2, adam_epsilon=1.0, max_grad_norm=0, eval_prompt="",
                  adam_weight_decay=0.0)
    _, whole, whole_paths = run_training(train_batch_size=4, gradient_accumulation_steps=1, adaptor_name="whole", **common)
    _, accumulated, acc_paths = run_training(train_batch_size=2, gradient_accumulation_steps=2, adaptor_name="acc", **common)
    a, b = adapter(whole_paths), adapter(acc_paths)
    up = [k for k in a if "lora_B" in k or "lora.up" in k]
    assert up and max(a[k].abs().max().item() for k in up) > 1e-4, "the step changed the weights"
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-7)
    assert whole.losses == pytest.approx(accumulated.losses, rel=1e-5)


def test_ema_weights_are_saved_and_rendered(run_training, tiny_models):
    """Pitfall 3: with use_ema the adapter and the eval images come from the EMA weights; raw ones go to raw/.

    With ema_update_every beyond the run the average stays at the initial LoRA (lora_B = 0, no change to
    the model), so the saved adapter is a no-op and the eval image equals the base model's, while the raw
    weights did train."""
    cfg, result, paths = run_training(use_ema=True, ema_update_every=1000, max_train_steps=6)
    averaged, raw = adapter(paths), load_file(str(paths.adapter_dir / "raw" / WEIGHTS_NAME))
    up = [k for k in averaged if "lora_B" in k or "lora.up" in k]
    assert all(averaged[k].abs().max() == 0 for k in up)
    assert max(raw[k].abs().max().item() for k in up) > 1e-4
    base = load_fresh(tiny_models["sd"])
    expected = render(base, "a red circle on a blue background", cfg.eval_seed, num_inference_steps=4,
                      guidance_scale=2.0, height=32, width=32)
    assert np.abs(final_eval_image(result) - expected).max() <= 1


def test_ema_follows_its_closed_form():
    from plugin.ema import EMA

    weight = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([weight], decay=0.5, update_every=2)
    expected = torch.zeros(3)
    for step in range(1, 7):
        with torch.no_grad():
            weight.fill_(float(step))
        ema.update(step)
        if step % 2 == 0:
            n = ema.num_updates - 1
            d = 0.0 if n == 0 else min(0.5, (1 + n) / (10 + n))  # Diffusers' EMAModel: the first update copies
            expected = d * expected + (1 - d) * step
    torch.testing.assert_close(ema.shadow[0], expected)
    with ema.swapped_in():
        torch.testing.assert_close(weight.data, expected)
    assert weight.data.eq(6.0).all(), "live weights come back after the block"


def test_noise_offset_keeps_its_fraction(tiny_models, sample_data, tmp_path):
    """Pitfall 4: '0.05' from a form stays 0.05 all the way into the objective, and shows in the noise."""
    from plugin.families import load_model

    cfg = parse_parameters(base_parameters(tiny_models["sd"], sample_data, tmp_path, noise_offset="0.05"))
    family = load_model(cfg.model_name, torch.float32)
    family.configure(cfg)
    objective = family.make_objective()
    assert objective.noise_offset == 0.05
    x0 = torch.zeros(256, 4, 16, 16)
    gens = [torch.Generator().manual_seed(i) for i in range(256)]
    noised = objective.noise(x0, gens)  # epsilon target = the noise itself
    channel_means = noised.target.mean(dim=(2, 3))
    assert 0.04 < (channel_means.std() ** 2 - 1 / 256).clamp(min=0).sqrt() < 0.06


def test_the_models_own_prediction_type_is_respected(tmp_path, sample_data):
    """Pitfall 6: 'auto' keeps the model scheduler's v_prediction; an explicit setting overrides it."""
    from plugin.families import load_model
    from plugin.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("sd")
    pipe.scheduler.register_to_config(prediction_type="v_prediction")
    pipe.save_pretrained(tmp_path / "vpred")
    family = load_model(str(tmp_path / "vpred"), torch.float32)
    auto = parse_parameters(base_parameters(tmp_path / "vpred", sample_data, tmp_path))
    assert family.configure(auto)[0].prediction_type == "v_prediction"
    assert family.make_objective().prediction_type == "v_prediction"
    assert family.eval_pipeline().scheduler.config.prediction_type == "v_prediction"
    family.configure(auto.replace(prediction_type="epsilon"))
    assert family.make_objective().prediction_type == "epsilon"


def test_a_seed_makes_runs_reproducible(run_training):
    """Pitfall 10: same seed, same adapter bit for bit; another seed, another adapter."""
    options = dict(max_train_steps=3, eval_prompt="", random_flip=True, caption_dropout_rate=0.3)
    _, first, p1 = run_training(seed=7, adaptor_name="one", **options)
    _, second, p2 = run_training(seed=7, adaptor_name="two", **options)
    _, third, p3 = run_training(seed=8, adaptor_name="three", **options)
    a, b, c = adapter(p1), adapter(p2), adapter(p3)
    assert first.losses == second.losses
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_adapter_with_alpha_not_r_reloads_to_the_trained_model(run_training, tiny_models):
    """Pitfall 13: alpha != r survives the round trip through load_lora_weights (adapter metadata)."""
    cfg, result, paths = run_training(lora_r=4, lora_alpha=12, max_train_steps=6, learning_rate=3e-3)
    pipe = load_fresh(tiny_models["sd"])
    kwargs = dict(num_inference_steps=4, guidance_scale=2.0, height=32, width=32)
    base = render(pipe, "a red circle on a blue background", cfg.eval_seed, **kwargs)
    pipe.load_lora_weights(str(paths.adapter_dir))
    loaded = render(pipe, "a red circle on a blue background", cfg.eval_seed, **kwargs)
    assert np.abs(loaded - final_eval_image(result)).max() <= 1
    assert np.abs(loaded - base).mean() > 0.5


def _failing_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the input was checked")


@pytest.mark.parametrize(
    "overrides, culprit",
    [
        ({"model_name": "./no/such/model"}, "no/such/model"),
        ({"dataset_name": "./no/such/data"}, "no/such/data"),
        ({"image_column": "picture"}, "picture"),
        ({"caption_column": "prompt"}, "prompt"),
        ({"mixed_precision": "fp16"}, "mixed_precision"),
    ],
)
def test_bad_input_fails_before_any_model_is_loaded(tiny_models, sample_data, tmp_path, monkeypatch, capsys,
                                                     overrides, culprit):
    monkeypatch.setattr(ModelFamily, "load", classmethod(_failing_load))
    file = write_parameter_file(tmp_path / "run.json", base_parameters(tiny_models["sd"], sample_data, tmp_path, **overrides))
    assert main(["--config", str(file)]) == 2
    assert culprit in capsys.readouterr().err


def test_unsupported_family_and_empty_dataset_are_named(tmp_path, sample_data, tiny_models, monkeypatch):
    monkeypatch.setattr(ModelFamily, "load", classmethod(_failing_load))
    other = tmp_path / "kandinsky"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ConfigError, match="KandinskyPipeline.*supported: StableDiffusionPipeline"):
        run_with(base_parameters(other, sample_data, tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metadata.jsonl").write_text("")
    with pytest.raises(ConfigError, match="empty|no rows|no images"):
        run_with(base_parameters(tiny_models["sd"], empty, tmp_path))


def run_with(parameters: dict):
    from plugin.trainer import RunPaths, train

    cfg = parse_parameters(parameters)
    return train(cfg, RunPaths.for_config(cfg), log=lambda *_: None)


def test_an_interrupted_save_leaves_the_last_good_adapter(run_training, monkeypatch):
    """A crash or Ctrl-C while writing never corrupts the adapter already on disk."""
    _, _, paths = run_training(max_train_steps=2, eval_prompt="")
    good = (paths.adapter_dir / WEIGHTS_NAME).read_bytes()

    def interrupted(self, folder, layers, metadata):
        (Path(folder) / WEIGHTS_NAME).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(ModelFamily, "save_lora", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_training(max_train_steps=4, eval_prompt="", learning_rate=1e-2)
    assert (paths.adapter_dir / WEIGHTS_NAME).read_bytes() == good
    assert not [p for p in paths.adapter_dir.iterdir() if p.name.startswith(".")], "no temp files left behind"


def test_transformer_lab_input_file(tiny_models, sample_data, tmp_path, capsys, monkeypatch):
    """--input_file: launcher keys accepted, adapter goes to adaptor_output_dir, eval images to output_dir."""
    for variable in ("_TFL_JOB_ID", "_TFL_EXPERIMENT_ID", "TFL_WORKSPACE_DIR"):  # what attaching to job_id may set
        monkeypatch.delenv(variable, raising=False)
    parameters = base_parameters(tiny_models["sd"], sample_data, tmp_path / "logs", max_train_steps=2)
    launcher = {"job_id": 12, "template_name": "t", "plugin_name": "diffusion_lora_trainer", "model_architecture":
                "StableDiffusionPipeline", "foundation_model_file_path": "", "model_path": "", "type": "trainer",
                "run_sweeps": False, "embedding_model": "", "chatml_formatted_column": "",
                "adaptor_output_dir": str(tmp_path / "adaptors" / "test-adapter")}
    launcher["train_final_model"] = True  # a key from another launcher version: ignored with a note
    file = write_parameter_file(tmp_path / "input.json", {"experiment": {"name": "e"}, "config": {**parameters, **launcher}})
    # the harness also passes flags of its own
    assert main(["--plugin_dir", str(tmp_path), "--input_file", str(file), "--experiment_name", "e"]) == 0
    assert "train_final_model" in capsys.readouterr().err
    assert (tmp_path / "adaptors" / "test-adapter" / WEIGHTS_NAME).is_file()
    assert (tmp_path / "logs" / "test-adapter" / "eval_images" / "epoch_0001.png").is_file()
    assert json.loads((tmp_path / "logs" / "test-adapter" / "config.json").read_text())["max_train_steps"] == 2


@pytest.mark.parametrize("family", ["flux", "flux_kontext"])
def test_demo_family_alone_runs_that_demo_whose_model_card_code_works(family, tmp_path, monkeypatch, capsys):
    """`--demo-family flux` means the Flux demo; its model, kept in output/, is what the card's code loads. An edit
    model's demo trains on sample pairs and edits one of their controls."""
    monkeypatch.chdir(tmp_path)
    assert main(["--demo-family", family]) == 0
    out = tmp_path / "output" / f"demo-{family}"
    assert (out / WEIGHTS_NAME).is_file() and json.loads((out / "config.json").read_text())["model_family"] == family
    assert sorted(p.name for p in (out / "eval_images").glob("epoch_????.png")) == ["epoch_0004.png", "epoch_0008.png"]
    assert "adapter" in capsys.readouterr().out
    code = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1).split("\nimage = ")[0]
    namespace = {}
    exec(code, namespace)  # as written in the card: the base model's folder, the adapter's, the run's dtype
    assert str(tmp_path / "output" / f"tiny-{family}") in code and "torch.float32" in code
    assert (family == "flux_kontext") == (out / "eval_images" / "control_0.png").is_file()
    assert any("lora" in name for name, _ in namespace["pipe"].transformer.named_modules())


def test_each_eval_prompt_renders_with_its_own_sample_settings(run_training, tiny_models, sample_data, tmp_path):
    """kohya's flags after a prompt: --w/--h size, --s steps, --l guidance, --d seed, --n negative prompt."""
    from PIL import Image

    prompts = ("a red circle --w 48 --h 24 --s 3 --l 1.5 --d 7 --n blurry\n"
               "a red circle --d 7 --n blurry --s 3 --l 1.5 --h 24 --w 48\n"  # the same settings in another order
               "a red circle")  # fmt: skip
    _, result, _ = run_training("sd", eval_prompt=prompts, max_train_steps=2)
    grid = result.eval_images[-1]
    images = [Image.open(grid.with_name(f"{grid.stem}_{k}.png")) for k in range(3)]
    assert [image.size for image in images] == [(48, 24), (48, 24), (32, 32)]
    assert np.array_equal(np.asarray(images[0]), np.asarray(images[1])), "one seed, one image"
    with Image.open(grid.parent.parent / "eval_grid.png") as card_grid:  # each column at its own size, unstretched
        scale = 6  # the whole factor that brings the smallest side (24) to 128 pixels
        assert card_grid.width == 90 + scale * 48 + 8 + scale * 48 + 8 + scale * 32 and card_grid.height > scale * 32, card_grid.size
    card = (grid.parent.parent / "README.md").read_text()
    assert "- text: a red circle\n" in card and "--w" not in card, "the card shows the prompts without their flags"
    with pytest.raises(ConfigError, match=r"eval_prompt: prompt 2's --w: 36 is not a multiple of 8, the sizes StableDiffusionPipeline renders"):
        run_training("sd", eval_prompt="a\nb --w 36")
    with pytest.raises(ConfigError, match=r"eval_prompt: prompt 1's --n: Flux renders without a negative prompt"):
        run_training("flux", eval_prompt="a --n blurry")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("loss_weighting", ["uniform", "min_snr"])
def test_every_objective_learns(run_training, tiny_models, heldout_data, prediction_type, loss_weighting):
    """Issue 3: for each prediction type x {uniform, min_snr}, training lowers the held-out loss measured
    in that same objective, and the plain ε-MSE that no objective setting changes."""
    cfg, _, paths = run_training(prediction_type=prediction_type, loss_weighting=loss_weighting, snr_gamma=5.0,
                                 max_train_steps=40, learning_rate=3e-3, lora_r=8, lora_alpha=8, eval_prompt="",
                                 train_batch_size=4)
    before = heldout_losses(tiny_models["sd"], cfg, heldout_data)
    after = heldout_losses(tiny_models["sd"], cfg, heldout_data, paths.adapter_dir)
    assert after.objective < 0.97 * before.objective, (before, after)
    assert after.plain_mse < 0.97 * before.plain_mse, (before, after)


def test_bf16_keeps_lora_weights_and_optimizer_state_fp32(run_training, monkeypatch):
    """Pitfall 9: the frozen base runs in bf16 under autocast; trainable weights and Adam state stay fp32."""
    import plugin.trainer as trainer

    seen = {"params": set(), "state": set(), "base": set()}
    original_step = torch.optim.AdamW.step
    original_loss = trainer.denoising_loss

    def recording_step(self, *args, **kwargs):
        out = original_step(self, *args, **kwargs)
        for group in self.param_groups:
            for p in group["params"]:
                seen["params"].add(p.dtype)
                seen["state"].update(v.dtype for v in self.state[p].values() if torch.is_tensor(v) and v.ndim)
        return out

    def recording_loss(family, *args):
        seen["base"].add(family.denoiser.conv_in.weight.dtype)
        loss, reported = original_loss(family, *args)
        assert torch.isfinite(loss) and torch.isfinite(reported)
        return loss, reported

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    monkeypatch.setattr(trainer, "denoising_loss", recording_loss)
    _, result, paths = run_training(mixed_precision="bf16", max_train_steps=3, eval_prompt="")
    assert seen == {"params": {torch.float32}, "state": {torch.float32}, "base": {torch.bfloat16}}
    assert all(t.dtype == torch.float32 for t in adapter(paths).values())


def test_gradient_checkpointing_gives_the_same_update(run_training):
    """Checkpointing only trades memory for compute: the trained adapter is the same."""
    options = dict(max_train_steps=2, eval_prompt="", learning_rate=1e-2)
    _, _, plain = run_training(adaptor_name="plain", **options)
    _, _, checkpointed = run_training(adaptor_name="ckpt", gradient_checkpointing=True, **options)
    a, b = adapter(plain), adapter(checkpointed)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_xformers_request_falls_back_to_sdpa_with_a_warning(run_training):
    with pytest.warns(UserWarning, match="xFormers is not usable here"):
        run_training(enable_xformers_memory_efficient_attention=True, max_train_steps=1, eval_prompt="")


def test_logging_sinks_write_offline(run_training, monkeypatch, tmp_path):
    """TensorBoard event files appear; W&B runs offline without an API key and never prompts."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", "/nonexistent")
    monkeypatch.setenv("HOME", str(tmp_path / "no-home"))  # no ~/.netrc with a key
    from plugin.reporting import wandb_mode

    assert wandb_mode() == "offline"
    _, _, paths = run_training(log_to_tensorboard=True, log_to_wandb=True, max_train_steps=2, eval_prompt="")
    assert list((paths.run_dir / "logs").glob("events.out.tfevents.*"))
    assert list((paths.run_dir / "logs").rglob("offline-run-*"))


def test_training_steps_avoid_the_cudnn_attention_kernel(run_training, monkeypatch):
    """cuDNN's attention backward gives NaN gradients on Hopper for some sequence lengths (Flux on an H100
    trained to NaN after one step): forward and backward of every step run with it disabled, and the
    setting is restored afterwards for the rest of the process."""
    seen = []
    original = ModelFamily.encode_images

    def spying_encode(self, pixel_values):
        seen.append(("forward", torch.backends.cuda.cudnn_sdp_enabled()))
        latents = original(self, pixel_values).requires_grad_()
        latents.register_hook(lambda grad: seen.append(("backward", torch.backends.cuda.cudnn_sdp_enabled())))
        return latents

    monkeypatch.setattr(ModelFamily, "encode_images", spying_encode)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    run_training(max_train_steps=2, eval_prompt="", cache_latents=False)
    assert {phase for phase, _ in seen} == {"forward", "backward"}
    assert not any(enabled for _, enabled in seen)
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_ema_adapter_is_the_average_of_the_raw_trajectory(run_training):
    """Pitfall 3, by numbers: with decay 0.5 updated every step, the saved lora_B weights (which start at
    zero) equal the warmed-up EMA of the raw weights after steps 1..4, taken from runs stopped at each step;
    raw/ holds the last raw weights."""
    options = dict(eval_prompt="", lr_scheduler="constant", learning_rate=1e-2)
    trajectory = [adapter(run_training(adaptor_name=f"raw{k}", max_train_steps=k, **options)[2]) for k in range(1, 5)]
    _, _, paths = run_training(adaptor_name="ema", use_ema=True, ema_decay=0.5, ema_update_every=1, max_train_steps=4, **options)
    averaged, raw = adapter(paths), load_file(str(paths.adapter_dir / "raw" / WEIGHTS_NAME))
    up = [k for k in averaged if "lora_B" in k]
    expected = {k: torch.zeros_like(averaged[k]) for k in up}
    for n, weights in enumerate(trajectory):
        decay = 0.0 if n == 0 else min(0.5, (1 + n) / (10 + n))
        expected = {k: decay * expected[k] + (1 - decay) * weights[k] for k in up}
    for k in up:
        torch.testing.assert_close(averaged[k], expected[k], rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(raw[k], trajectory[-1][k])
    assert max((averaged[k] - raw[k]).abs().max().item() for k in up) > 1e-4


@pytest.mark.parametrize(
    "baseline, changed",
    [
        ({"lr_scheduler": "constant"}, {"lr_scheduler": "linear"}),
        ({"lr_scheduler": "constant_with_warmup"}, {"lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 2}),
        ({"lr_scheduler": "cosine_with_restarts"}, {"lr_scheduler": "cosine_with_restarts", "lr_num_cycles": 3}),
        ({"lr_scheduler": "polynomial"}, {"lr_scheduler": "polynomial", "lr_power": 3.0}),
        ({}, {"adam_beta1": 0.5}),
        ({}, {"adam_beta2": 0.9}),
        ({}, {"adam_weight_decay": 0.5}),
        ({}, {"adam_epsilon": 1e-2}),
        ({}, {"lora_dropout": 0.5}),
        ({"family": "flux"}, {"family": "flux", "guidance_scale": 4.0}),
    ],
    ids=lambda options: ",".join(f"{k}={v}" for k, v in options.items()) or "default",
)
def test_optimisation_parameters_change_the_trained_adapter(run_training, baseline, changed):
    """Each of these parameters reaches the optimizer, schedule or model: changing it changes the weights."""
    options = dict(max_train_steps=4, eval_prompt="", learning_rate=1e-2)
    _, _, before = run_training(adaptor_name="before", **options, **baseline)
    _, _, after = run_training(adaptor_name="after", **options, **changed)
    a, b = adapter(before), adapter(after)
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 1e-6


def test_a_diverging_run_stops_and_keeps_the_last_good_adapter(run_training, tiny_models, sample_data, tmp_path,
                                                               monkeypatch, capsys):
    """A NaN loss ends the run with a one-line error (exit 1) instead of saving NaN weights over the last
    good adapter: here the one saved after epoch 1 (8 images, batch 4: steps 1-2), NaN coming at step 3."""
    options = dict(max_train_steps=4, train_batch_size=4, eval_prompt="", eval_steps=1)
    _, _, clean = run_training(adaptor_name="clean", **{**options, "max_train_steps": 2})
    from plugin import trainer as trainer_module

    calls = []
    original = trainer_module.denoising_loss

    def nan_from_step_three(*args, **kwargs):
        calls.append(1)
        losses = original(*args, **kwargs)
        return tuple(loss * float("nan") for loss in losses) if len(calls) >= 3 else losses

    monkeypatch.setattr(trainer_module, "denoising_loss", nan_from_step_three)
    file = write_parameter_file(tmp_path / "run.json", base_parameters(tiny_models["sd"], sample_data, tmp_path / "out", adaptor_name="diverged", **options))
    assert main(["--config", str(file)]) == 1
    assert "the loss became nan at step 3" in capsys.readouterr().err
    kept = load_file(str(tmp_path / "out" / "diverged" / WEIGHTS_NAME))
    expected = adapter(clean)
    assert all(torch.isfinite(t).all() and torch.equal(t, expected[k]) for k, t in kept.items())


def test_evaluation_reuses_the_loaded_pipeline(run_training, monkeypatch):
    """Pitfall 11: the model is read from disk once per run; evaluations share the training modules."""
    from diffusers import DiffusionPipeline

    loads = []
    original = DiffusionPipeline.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(cls.__name__)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", classmethod(counting))
    _, result, _ = run_training(max_train_steps=4, train_batch_size=4, eval_steps=1)  # two epochs
    assert len(result.eval_images) == 2 and loads == ["StableDiffusionPipeline"]
