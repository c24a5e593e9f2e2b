"""Wiring between the config, the trainer and the objective, checked by numbers: each test fails if one
connection is cut (a setting that never arrives, a schedule stepped at the wrong place, a weighting told the
wrong prediction type, a memory option that is never switched on) even though every part still works alone."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.models.attention_processor import Attention
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from plugin import trainer as trainer_module
from plugin.objectives import DiffusionObjective


def cosine_with_warmup(step: int, peak: float, warmup: int, total: int) -> float:
    """The learning rate after `step` optimizer steps of Diffusers' 'cosine' schedule (half a cosine cycle
    after a linear warmup), written out here so the test does not ask the scheduler what it should be."""
    if step < warmup:
        return peak * step / warmup
    return peak * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def test_lr_schedule_steps_once_per_optimizer_step(run_training, monkeypatch):
    """With 2 micro-batches per optimizer step, optimizer step k applies the schedule's value at k - 1 and
    logs its value at k; a schedule stepped per micro-batch would run twice as fast and miss both."""
    peak, warmup, total = 1e-2, 2, 6
    applied = []
    original_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        applied.append(self.param_groups[0]["lr"])
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    _, result, paths = run_training(lr_scheduler="cosine", learning_rate=peak, lr_warmup_steps=warmup,
                                    max_train_steps=total, train_batch_size=2, gradient_accumulation_steps=2,
                                    log_to_tensorboard=True, eval_prompt="")  # fmt: skip
    events = EventAccumulator(str(paths.run_dir / "logs"))
    events.Reload()
    logged = {event.step: event.value for event in events.Scalars("train/lr")}
    assert result.steps == total
    steps = range(1, total + 1)
    assert applied == pytest.approx([cosine_with_warmup(k - 1, peak, warmup, total) for k in steps], rel=1e-6)
    assert logged == pytest.approx({k: cosine_with_warmup(k, peak, warmup, total) for k in steps}, rel=1e-6)


def min_snr_x0_loss(prediction_type: str, prediction, x0, x_t, alphas_cumprod, timesteps, gamma: float) -> torch.Tensor:
    """Min-SNR weighting by its definition (Hang et al. 2023): mean over samples of min(SNR_t, γ) times the
    MSE of the clean latent the prediction implies, whatever the model predicts. In float64, from x0 and
    x_t alone, so it shares no code with the objective's targets or its per-prediction-type conversion."""
    abar = alphas_cumprod.double()[timesteps.long()].reshape(-1, *[1] * (x0.ndim - 1))
    alpha, sigma = abar.sqrt(), (1.0 - abar).sqrt()
    prediction, x0, x_t = prediction.double(), x0.double(), x_t.double()
    implied_x0 = {
        "epsilon": (x_t - sigma * prediction) / alpha,
        "v_prediction": alpha * x_t - sigma * prediction,
        "sample": prediction,
    }[prediction_type]
    snr = (abar / (1.0 - abar)).flatten()
    return (snr.clamp_max(gamma) * (implied_x0 - x0).pow(2).flatten(1).mean(dim=1)).mean()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_loss_of_each_prediction_type_is_the_weighted_x0_error(prediction_type):
    """DiffusionObjective's loss, end to end (noising, target, weighting, reduction), equals min(SNR, γ)·‖x̂0 − x0‖²
    for every prediction type: a weighting told another prediction type than the objective's scales the
    v and x0 losses by (SNR + 1)/SNR or 1/SNR and misses it."""
    gamma = 5.0
    betas = torch.linspace(1e-4, 0.02, 1000)  # the DDPM paper's linear schedule
    objective = DiffusionObjective(betas, prediction_type=prediction_type, loss_weighting="min_snr", snr_gamma=gamma)
    x0 = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noised = objective.noise(x0, [torch.Generator().manual_seed(100 + b) for b in range(16)])
    prediction = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    abar = torch.cumprod(1.0 - betas.double(), dim=0)
    abar_t = abar[noised.timesteps.long()]
    snr = abar_t / (1.0 - abar_t)
    assert (snr > gamma).any() and (snr < gamma).any(), "the batch has timesteps on both sides of the clamp"
    expected = min_snr_x0_loss(prediction_type, prediction, x0, noised.model_input, abar, noised.timesteps, gamma)
    assert objective.loss(prediction, noised).item() == pytest.approx(expected.item(), rel=1e-5)


def test_snr_gamma_reaches_the_loss_the_trainer_minimises(run_training, tiny_models, monkeypatch):
    """snr_gamma goes from the parameters through the family's objective into the training loss: the first
    step's loss of an ε-prediction model equals mean(min(SNR, γ)/SNR · ‖ε̂ − ε‖²) for the γ configured, and a
    smaller γ gives a smaller loss on the same batch (same seed: same images, noise, timesteps, prediction)."""
    schedule = DDPMScheduler.from_config(DDPMScheduler.load_config(tiny_models["sd"], subfolder="scheduler"))
    snr_of_timestep = (schedule.alphas_cumprod / (1.0 - schedule.alphas_cumprod)).double()
    calls = []
    original_loss = DiffusionObjective.loss

    def recording_loss(self, prediction, noised):
        loss = original_loss(self, prediction, noised)
        calls.append((prediction.detach(), noised, loss.item()))
        return loss

    monkeypatch.setattr(DiffusionObjective, "loss", recording_loss)
    losses = {}
    for gamma in (0.5, 20.0):
        calls.clear()
        run_training(loss_weighting="min_snr", snr_gamma=gamma, prediction_type="epsilon", train_batch_size=8,
                     max_train_steps=1, eval_prompt="")  # fmt: skip
        [(prediction, noised, losses[gamma])] = calls  # one step, one micro-batch
        snr = snr_of_timestep[noised.timesteps.long()]
        squared_error = (prediction.double() - noised.target.double()).pow(2).flatten(1).mean(dim=1)
        expected = (snr.clamp_max(gamma) / snr * squared_error).mean().item()
        assert losses[gamma] == pytest.approx(expected, rel=1e-5), f"snr_gamma {gamma} did not reach the loss"
    assert losses[0.5] < 0.9 * losses[20.0]


def test_gradient_checkpointing_recomputes_the_denoiser_in_backward(run_training, monkeypatch):
    """gradient_checkpointing: true switches checkpointing on in the denoiser the trainer trains, which then
    runs every attention layer twice per step (forward, and again in backward) where a plain run runs it once."""
    original_loss = trainer_module.denoising_loss

    def observe(gradient_checkpointing: bool) -> tuple[list[bool], int]:
        """Per training step the denoiser's checkpointing flag, and the attention forwards of the whole run."""
        flags, attention_calls, hooks = [], [], []

        def recording_loss(family, *args, **kwargs):
            flags.append(family.denoiser.is_gradient_checkpointing)
            if not hooks:
                attention = [m for m in family.denoiser.modules() if isinstance(m, Attention)]
                hooks.extend(m.register_forward_hook(lambda *_: attention_calls.append(1)) for m in attention)
            return original_loss(family, *args, **kwargs)

        monkeypatch.setattr(trainer_module, "denoising_loss", recording_loss)
        run_training(gradient_checkpointing=gradient_checkpointing, max_train_steps=2, eval_prompt="")
        return flags, len(attention_calls)

    plain_flags, plain_calls = observe(False)
    checkpointed_flags, checkpointed_calls = observe(True)
    assert plain_flags == [False, False] and checkpointed_flags == [True, True]
    assert plain_calls > 0 and checkpointed_calls == 2 * plain_calls
