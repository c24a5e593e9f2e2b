"""Validation loss, learned loss weighting (EDM2) and the post-hoc EMA sweep that chooses σ_rel by validation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import base_parameters, heldout_losses, load_fresh, render
from plugin import objectives as obj
from plugin.config import parse_parameters
from plugin.data.mixing import load_sources, split_sources
from plugin.errors import ConfigError
from plugin.export import WEIGHTS_NAME
from plugin.main import main
from plugin.posthoc import SNAPSHOT_FOLDER
from plugin.sweep import sweep
from plugin.tiny import FAMILIES
from plugin.trainer import RunPaths, train
from plugin.validation import HISTORY_FILE

VALIDATED = dict(validation_split=0.25, max_train_steps=12, eval_prompt="", num_train_epochs=100, eval_steps=2)


def history(paths) -> list[dict]:
    return json.loads((paths.run_dir / HISTORY_FILE).read_text())


# --- the split and the settings ---------------------------------------------------------------------------


def test_the_split_is_seeded_disjoint_and_complete(sample_data):
    cfg = parse_parameters({"model_name": "m", "adaptor_name": "a", "dataset_name": str(sample_data)})
    sources = load_sources(cfg)
    captions = lambda parts: [row["text"] for source in parts for row in source.dataset.select_columns(["text"])]  # noqa: E731
    train_rows, held = split_sources(sources, 0.25, seed=3)
    again_train, again_held = split_sources(sources, 0.25, seed=3)
    _, other_held = split_sources(sources, 0.25, seed=4)
    assert len(captions(held)) == 2 and len(captions(train_rows)) == 6
    assert captions(held) == captions(again_held) and captions(train_rows) == captions(again_train)
    assert sorted(captions(held) + captions(train_rows)) == sorted(captions(sources))
    assert captions(other_held) != captions(held), "another seed holds out other images"
    assert split_sources(sources, 0.0, seed=3) == (sources, None)
    assert len(captions(split_sources(sources, 0.01, seed=3)[1])) == 1, "a positive fraction holds out at least one image"


def test_bad_validation_settings_fail_before_the_model_loads(tiny_models, sample_data, tmp_path, monkeypatch):
    from plugin.families.base import ModelFamily

    monkeypatch.setattr(ModelFamily, "load", lambda *_: pytest.fail("weights loaded before the check"))
    cases = [
        ({"validation_split": 0.5, "validation_dataset": str(sample_data)}, "validation_split: 0.5 and validation_dataset .* both set"),
        ({"validation_dataset": str(tmp_path / "missing")}, "validation_dataset: folder .*missing.* does not exist"),
    ]
    for overrides, message in cases:  # the first with the parameters, the second when the dataset is opened
        with pytest.raises(ConfigError, match=message):
            cfg = parse_parameters(base_parameters(tiny_models["sd"], sample_data, tmp_path / "out", **overrides))
            train(cfg, RunPaths.for_config(cfg), log=lambda *_: None)
    one_image = tmp_path / "one"
    one_image.mkdir()
    Image.new("RGB", (32, 32), "red").save(one_image / "a.png")
    (one_image / "a.txt").write_text("a red square")
    cfg = parse_parameters(base_parameters(tiny_models["sd"], one_image, tmp_path / "out", validation_split=0.5))
    with pytest.raises(ConfigError, match="validation_split: 0.5 of 1 images holds out 1, which leaves no training images"):
        train(cfg, RunPaths.for_config(cfg), log=lambda *_: None)


# --- the validation loss -------------------------------------------------------------------------------


def test_validation_loss_is_logged_falls_and_is_the_same_in_a_repeated_and_an_uncached_run(run_training):
    cfg, _, paths = run_training("sd", **VALIDATED, log_to_tensorboard=True, learning_rate=3e-3)
    first = history(paths)
    assert [e["step"] for e in first] == [0, 6, 12], "the base model's, each evaluation's and the final one"
    assert first[-1]["loss"] < first[0]["loss"], first
    events = EventAccumulator(str(paths.run_dir / "logs"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("validation/loss")]
    assert [s for s, _ in logged] == [0, 6, 12]
    assert np.allclose([v for _, v in logged], [e["loss"] for e in first], rtol=1e-6)

    _, _, paths = run_training("sd", **VALIDATED, log_to_tensorboard=True, learning_rate=3e-3)
    assert history(paths) == first, "the same seed gives the same numbers"
    _, _, paths = run_training("sd", **VALIDATED, log_to_tensorboard=True, learning_rate=3e-3, cache_latents=False,
                               cache_text_embeddings=False)  # fmt: skip
    assert history(paths) == first, "caching changes no validation number"
    _, _, paths = run_training("sd", **VALIDATED, log_to_tensorboard=True, learning_rate=3e-3, seed=5)
    assert history(paths)[0] != first[0], "another seed holds out other images"


def test_the_yardstick_does_not_move_with_buckets_or_augmentation(tiny_models, sample_data, tmp_path):
    """Non-square images train at other sizes with buckets off, and flips and jitter change training
    pixels, but the base model's validation loss (step 0) is the same number: the set is fixed."""
    wide = tmp_path / "wide"
    wide.mkdir()
    rows = []
    for k, path in enumerate(sorted(sample_data.glob("*.png"))):
        Image.open(path).resize((96, 48)).save(wide / path.name)
        rows.append(json.dumps({"file_name": path.name, "text": f"shape {k}"}))
    (wide / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    numbers = []
    for overrides in ({}, {"aspect_ratio_buckets": False}, {"random_flip": True, "color_jitter": True, "caption_dropout_rate": 0.5}):
        cfg = parse_parameters(base_parameters(tiny_models["sd"], wide, tmp_path / "out", **{**VALIDATED, "max_train_steps": 1, **overrides}))
        paths = RunPaths.for_config(cfg)
        train(cfg, paths, log=lambda *_: None)
        numbers.append(history(paths)[0]["loss"])
    assert numbers[0] == numbers[1] == numbers[2], numbers


# --- learned loss weighting ---------------------------------------------------------------------------------


def test_uncertainty_weighted_loss_is_minimised_at_the_log_of_the_expected_loss():
    """d/du mean(λL·e^{−u} + u) = 1 − mean(λL)·e^{−u}: zero exactly at u* = log mean(λL)."""
    weighted = torch.tensor([0.3, 1.7, 0.9, 2.4], dtype=torch.float64)
    u_star = torch.log(weighted.mean())
    u = u_star.clone().requires_grad_(True)
    obj.uncertainty_weighted_loss(weighted, u.expand(4)).backward()
    assert abs(u.grad.item()) < 1e-12
    for offset in (-0.3, 0.3):  # and it is a minimum
        assert obj.uncertainty_weighted_loss(weighted, (u_star + offset).expand(4)) > obj.uncertainty_weighted_loss(weighted, u_star.expand(4))
    # at the optimum the minimised loss is 1 + u*: each noise level's loss divided by its own expectation
    close = obj.uncertainty_weighted_loss(weighted, u_star.expand(4)).item()
    assert math.isclose(close, 1 + u_star.item(), rel_tol=1e-12)


def test_fourier_features_have_unit_mean_square_and_u_starts_at_zero():
    weighting = obj.LearnedLossWeighting()
    sigma = torch.logspace(-3, 3, 5000)
    features = obj.fourier_features(obj.noise_conditioning(sigma), weighting.frequencies, weighting.phases)
    assert features.shape == (5000, 128)
    assert abs(features.pow(2).mean().item() - 1.0) < 0.05
    assert torch.equal(weighting(sigma), torch.zeros(5000))
    assert torch.allclose(obj.noise_conditioning(torch.tensor([math.e**4])), torch.tensor([1.0]))


def test_learned_weighting_converges_to_the_log_expected_loss_per_noise_level():
    """A synthetic problem with a known answer: at noise level σ the weighted loss is exponentially
    distributed with mean m(σ) = 0.2 + σ²/(1 + σ²)·3; u trained on samples must reach log m(σ) everywhere."""
    torch.manual_seed(0)
    weighting = obj.LearnedLossWeighting()
    optimizer = torch.optim.Adam(weighting.parameters(), lr=0.02)
    decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1 - t / 3000)  # the sampling noise averages out
    expected = lambda s: 0.2 + 3 * s**2 / (1 + s**2)  # noqa: E731
    for _ in range(3000):
        sigma = torch.exp(torch.randn(256) * 1.5)
        weighted = torch.distributions.Exponential(1 / expected(sigma)).sample()
        optimizer.zero_grad()
        obj.uncertainty_weighted_loss(weighted, weighting(sigma)).backward()
        optimizer.step()
        decay.step()
    probe = torch.tensor([0.1, 0.3, 1.0, 3.0, 10.0])
    with torch.no_grad():
        error = (weighting(probe) - torch.log(expected(probe))).abs().max().item()
    assert error < 0.06, error


def test_the_reported_loss_is_the_unweighted_objective():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    x0, prediction = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    generators = lambda: [torch.Generator().manual_seed(k) for k in range(4)]  # noqa: E731
    learned = obj.DiffusionObjective(betas, loss_weighting="learned")
    edm = obj.DiffusionObjective(betas, loss_weighting="edm")
    noised_learned, noised_edm = learned.noise(x0, generators()), edm.noise(x0, generators())
    torch.testing.assert_close(noised_learned.weights, noised_edm.weights)  # λ is EDM's
    minimised, reported = learned.training_loss(prediction, noised_learned)
    torch.testing.assert_close(reported, edm.loss(prediction, noised_edm))
    torch.testing.assert_close(minimised, reported)  # u = 0 at the start
    with torch.no_grad():
        learned.learned_weighting.linear.bias.fill_(0.5)
    minimised, reported_again = learned.training_loss(prediction, noised_learned)
    torch.testing.assert_close(reported_again, reported)
    torch.testing.assert_close(minimised, reported * math.exp(-0.5) + 0.5)
    fixed = obj.FlowMatchingObjective()
    assert fixed.learned_parameters("cpu") == {} and fixed.training_loss(prediction, fixed.noise(x0, generators()))[0] is not None
    flow = obj.FlowMatchingObjective(loss_weighting="learned")
    assert torch.equal(flow.noise(x0, generators()).weights, torch.ones(4))
    assert set(flow.learned_parameters("cpu")) == {"loss_weighting.linear.weight", "loss_weighting.linear.bias"}


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_training_with_learned_weighting_lowers_the_heldout_loss(family, run_training, tiny_models, heldout_data):
    cfg, result, paths = run_training(family, loss_weighting="learned", max_train_steps=40, learning_rate=2e-3, lora_r=8, lora_alpha=8,
                                      seed=3, checkpointing_steps=40, eval_prompt="")  # fmt: skip
    before = heldout_losses(tiny_models[family], cfg, heldout_data)
    after = heldout_losses(tiny_models[family], cfg, heldout_data, paths.adapter_dir)
    assert after.objective < 0.95 * before.objective, f"{family}: {before.objective:.4f} -> {after.objective:.4f}"
    assert after.plain_mse < 0.95 * before.plain_mse
    checkpoint = load_file(str(paths.run_dir / "checkpoints" / "step_40" / "trainable.safetensors"))
    weighting = obj.LearnedLossWeighting()
    weighting.linear.load_state_dict({k.removeprefix("loss_weighting.linear."): v for k, v in checkpoint.items() if k.startswith("loss_weighting.")})
    with torch.no_grad():
        assert weighting(torch.logspace(-2, 2, 50)).abs().mean() > 0.05, "u(σ) trained"
    assert not any("loss_weighting" in key for key in load_file(str(paths.adapter_dir / WEIGHTS_NAME))), "not in the adapter"
    assert all(math.isfinite(loss) for loss in result.losses)


# --- the post-hoc EMA sweep -------------------------------------------------------------------------------

SWEPT = dict(VALIDATED, use_ema=True, ema_type="posthoc", posthoc_ema_snapshot_steps=2, max_train_steps=16, learning_rate=3e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_sweep_plots_the_curve_and_saves_the_argmin(family, run_training, tiny_models, capsys):
    _, _, paths = run_training(family, **SWEPT)
    assert main(["--posthoc-ema", str(paths.run_dir), "--sweep"]) == 0
    folder = paths.run_dir / SNAPSHOT_FOLDER
    report = json.loads((folder / "sweep_step_16.json").read_text())
    points = report["points"]
    assert len(points) >= 9 and {0.05, 0.1} <= {p["sigma_rel"] for p in points}
    best = min(points, key=lambda p: p["validation_loss"])
    assert report["best_sigma_rel"] == best["sigma_rel"]
    # the sweep's number for the run's own profile is the run's own final validation loss
    tracked = next(p for p in points if p["sigma_rel"] == 0.05)
    assert math.isclose(tracked["validation_loss"], history(paths)[-1]["loss"], rel_tol=1e-4)
    with Image.open(folder / "sweep_step_16.png") as curve:
        assert curve.size == (640, 400) and len(set(curve.convert("RGB").getdata())) > 2
    adapter_dir = folder / f"sigma_rel_{best['sigma_rel']:.3f}_step_16"
    assert json.loads((adapter_dir / "posthoc_ema.json").read_text())["validation_loss"] == best["validation_loss"]
    assert str(adapter_dir / WEIGHTS_NAME) in capsys.readouterr().out
    pipe = load_fresh(tiny_models[family])
    kwargs = dict(num_inference_steps=2, height=32, width=32)
    before = render(pipe, "a red circle", 0, **kwargs)
    pipe.load_lora_weights(str(adapter_dir))
    assert not np.array_equal(render(pipe, "a red circle", 0, **kwargs), before)


def test_the_sweep_refuses_runs_without_a_validation_set_or_snapshots_and_unreachable_lengths(run_training, tmp_path):
    _, _, paths = run_training("sd", **{**SWEPT, "validation_split": 0.0})
    with pytest.raises(ConfigError, match="--sweep: the run in .* has no validation set to choose by"):
        sweep(paths.run_dir)
    assert main(["--posthoc-ema", str(paths.run_dir), "--sweep"]) == 2
    with pytest.raises(ConfigError, match="--sweep: .*config.json.* is missing or unreadable; expected a run folder"):
        sweep(tmp_path / "not-a-run")
    _, _, paths = run_training("sd", **{**SWEPT, "use_ema": False, "ema_type": "ema", "posthoc_ema_snapshot_steps": 100})
    with pytest.raises(ConfigError, match="has no post-hoc EMA snapshots"):
        sweep(paths.run_dir)
    _, _, paths = run_training("sd", **SWEPT)
    with pytest.raises(ConfigError, match="--sigma-rel: 0.005 cannot be reconstructed .* they cover σ_rel"):
        sweep(paths.run_dir, [0.005, 0.05])
