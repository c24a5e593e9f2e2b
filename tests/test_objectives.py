"""Tests for plugin.objectives: closed forms on hand-computed numbers, parity with Diffusers, sampler statistics."""

import math

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as diffusers_rescale
from diffusers.training_utils import (
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
    compute_snr,
)
from scipy.stats import ks_2samp, kstest

from plugin import objectives as obj
from plugin.errors import ConfigError

ATOL = 1e-6

# ᾱ with exact square roots: (√ᾱ, √(1−ᾱ)) = (0.8, 0.6), (0.6, 0.8), (0, 1) — the last is zero terminal SNR.
ABAR = torch.tensor([0.64, 0.36, 0.0], dtype=torch.float64)
T3 = torch.tensor([0, 1, 2])
X0 = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 4.0]])
EPS = torch.tensor([[0.5, -1.0], [2.0, 1.0], [-3.0, 0.25]])
X_T = torch.tensor([[1.1, 1.0], [3.4, 0.2], [-3.0, 0.25]])
V = torch.tensor([[-0.2, -2.0], [-1.2, 1.4], [-0.5, -4.0]])
SNRS = torch.tensor([0.5, 5.0, 20.0])


def close(actual, expected, atol=ATOL, rtol=0.0):
    torch.testing.assert_close(
        torch.as_tensor(actual).double(), torch.as_tensor(expected).double(), atol=atol, rtol=rtol
    )


def sd_betas(n=1000):
    return torch.linspace(0.00085**0.5, 0.012**0.5, n, dtype=torch.float32) ** 2


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


# --- VP closed forms ------------------------------------------------------------------------------------


def test_add_noise_and_targets_closed_form():
    close(obj.add_noise(X0, EPS, ABAR, T3), X_T)
    close(obj.prediction_target("epsilon", X0, EPS, ABAR, T3), EPS)
    close(obj.prediction_target("v_prediction", X0, EPS, ABAR, T3), V)
    close(obj.prediction_target("sample", X0, EPS, ABAR, T3), X0)


def test_add_noise_broadcasts_over_non_batch_dims():
    x0, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    expected = torch.stack([ABAR[i].sqrt() * x0[i] + (1 - ABAR[i]).sqrt() * eps[i] for i in range(3)])
    close(obj.add_noise(x0, eps, ABAR, T3.float()), expected)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_inverse_maps_round_trip(prediction_type):
    prediction = obj.prediction_target(prediction_type, X0, EPS, ABAR, T3)
    x0_hat = obj.x0_from_prediction(prediction_type, prediction, X_T, ABAR, T3)
    eps_hat = obj.epsilon_from_prediction(prediction_type, prediction, X_T, ABAR, T3)
    close(eps_hat, EPS, atol=1e-5)
    if prediction_type == "epsilon":  # at ᾱ = 0, x0 is not recoverable from ε̂: clamped, finite
        close(x0_hat[:2], X0[:2], atol=1e-5)
        assert torch.isfinite(x0_hat).all()
    else:
        close(x0_hat, X0, atol=1e-5)


def test_snr_closed_form_and_matches_diffusers():
    betas = torch.tensor([0.36, 0.4375])  # ᾱ = 0.64, 0.36
    close(obj.alphas_cumprod_from_betas(betas), [0.64, 0.36])
    close(obj.snr(obj.alphas_cumprod_from_betas(betas), torch.tensor([0, 1])), [16 / 9, 0.5625])

    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    t = torch.tensor([0, 1, 10, 250, 500, 998, 999])
    abar = obj.alphas_cumprod_from_betas(sd_betas())
    ours = obj.snr(abar, t)
    assert ours.dtype == torch.float32
    close(ours, compute_snr(scheduler, t), atol=0.0, rtol=1e-4)  # Diffusers rounds 1 − ᾱ in float32
    float64_scheduler = type("Float64Scheduler", (), {"alphas_cumprod": abar})
    close(ours, compute_snr(float64_scheduler, t), atol=0.0, rtol=1e-6)


def test_rescale_zero_terminal_snr_matches_diffusers():
    betas = sd_betas()
    rescaled = obj.rescale_zero_terminal_snr(betas)
    assert rescaled.dtype == betas.dtype
    close(rescaled, diffusers_rescale(betas.clone()), atol=1e-5)  # Diffusers computes in float32
    close(obj.rescale_zero_terminal_snr(betas.double()), diffusers_rescale(betas.double()), atol=1e-12)
    abar = obj.alphas_cumprod_from_betas(rescaled)
    assert abar[-1].item() == 0.0
    close(abar[0], obj.alphas_cumprod_from_betas(betas)[0])
    assert obj.snr(abar, torch.tensor([999])).item() == 0.0


# --- Flow closed forms ----------------------------------------------------------------------------------


def test_flow_interpolate_and_target():
    sigmas = torch.tensor([0.0, 0.25, 1.0])
    close(obj.flow_interpolate(X0, EPS, sigmas), [[1.0, 2.0], [2.75, -0.5], [-3.0, 0.25]])
    close(obj.flow_target(X0, EPS), EPS - X0)


def test_shift_sigmas_closed_form_and_matches_diffusers_scheduler():
    close(obj.shift_sigmas(torch.tensor([0.0, 0.5, 1.0]), 3.0), [0.0, 0.75, 1.0])
    close(obj.shift_sigmas(torch.tensor([0.3]), 1.0), [0.3])
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    unshifted = torch.linspace(1, 1000, 1000).flip(0) / 1000
    close(obj.shift_sigmas(unshifted, 3.0), scheduler.sigmas)


def test_dynamic_time_shift_is_a_static_shift_of_exp_mu_or_mu():
    """The scheduler's exponential time shift at μ is shift_sigmas with shift e^μ; its linear one, shift μ."""
    assert obj.dynamic_shift_mu(256) == pytest.approx(0.5)
    assert obj.dynamic_shift_mu(4096) == pytest.approx(1.15)
    assert obj.dynamic_shift_mu(2176) == pytest.approx(0.825)
    sigmas = torch.linspace(0.001, 1.0, 1000)
    exponential = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    linear = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="linear")
    for mu in (obj.dynamic_shift_mu(1024), obj.dynamic_shift_mu(4096), -0.3):
        close(obj.shift_sigmas(sigmas, math.exp(mu)), exponential.time_shift(mu, 1.0, sigmas))
        if mu > 0:
            close(obj.shift_sigmas(sigmas, mu), linear.time_shift(mu, 1.0, sigmas))


# --- Loss weights ---------------------------------------------------------------------------------------

EXPECTED_WEIGHTS = {  # SNR = 0.5, 5, 20; γ = 5
    ("uniform", "epsilon"): [1, 1, 1],
    ("uniform", "v_prediction"): [1, 1, 1],
    ("uniform", "sample"): [1, 1, 1],
    ("snr", "epsilon"): [1, 1, 1],
    ("snr", "v_prediction"): [1 / 3, 5 / 6, 20 / 21],
    ("snr", "sample"): [0.5, 5, 20],
    ("min_snr", "epsilon"): [1, 1, 0.25],
    ("min_snr", "v_prediction"): [1 / 3, 5 / 6, 5 / 21],
    ("min_snr", "sample"): [0.5, 5, 5],
    ("edm", "epsilon"): [3, 1.2, 1.05],
    ("edm", "v_prediction"): [1, 1, 1],
    ("edm", "sample"): [1.5, 6, 21],
}


@pytest.mark.parametrize("scheme,prediction_type", sorted(EXPECTED_WEIGHTS))
def test_loss_weights_closed_form(scheme, prediction_type):
    weights = obj.loss_weights(scheme, SNRS, prediction_type, snr_gamma=5.0)
    close(weights, EXPECTED_WEIGHTS[scheme, prediction_type])


@pytest.mark.parametrize("prediction_type,factor", [("epsilon", SNRS), ("v_prediction", SNRS + 1), ("sample", 1.0)])
def test_min_snr_equals_diffusers_closed_form_and_edm_sigma_data(prediction_type, factor):
    gamma = 5.0
    min_snr = torch.stack([SNRS, gamma * torch.ones_like(SNRS)], dim=1).min(dim=1)[0]
    close(obj.loss_weights("min_snr", SNRS, prediction_type, snr_gamma=gamma), min_snr / factor)
    close(obj.loss_weights("edm", SNRS, prediction_type, sigma_data=1.0), (SNRS + 1) / factor)
    close(obj.loss_weights("edm", SNRS, prediction_type, sigma_data=0.5), (SNRS + 4) / factor, atol=1e-5)


@pytest.mark.parametrize("scheme", ["uniform", "snr", "min_snr", "edm"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_loss_weights_finite_at_zero_terminal_snr(scheme, prediction_type):
    weights = obj.loss_weights(scheme, torch.tensor([0.0, 1e-12, 1.0]), prediction_type)
    assert torch.isfinite(weights).all() and (weights >= 0).all()
    if prediction_type == "epsilon" and scheme in ("snr", "min_snr"):
        close(weights, [1.0, 1.0, 1.0])  # limit of min(SNR, γ)/SNR as SNR → 0


def test_flow_loss_weights_match_diffusers():
    sigmas = torch.linspace(0.001, 1.0, 200)
    for scheme in ("none", "uniform", "sigma_sqrt", "cosmap"):
        ours = obj.flow_loss_weights(scheme, sigmas)
        close(ours, compute_loss_weighting_for_sd3(scheme, sigmas), atol=0.0, rtol=1e-6)
    close(obj.flow_loss_weights("cosmap", torch.tensor([0.0, 0.5, 1.0])), [2 / math.pi, 4 / math.pi, 2 / math.pi])
    assert torch.isfinite(obj.flow_loss_weights("sigma_sqrt", torch.tensor([0.0]))).all()


# --- Losses and Huber schedules -------------------------------------------------------------------------


def test_per_sample_loss_closed_forms():
    prediction = torch.tensor([[0.0, 0.5, 3.0, -3.0]])
    target = torch.zeros_like(prediction)
    close(obj.per_sample_loss(prediction, target, "l2", 1.0), [(0.25 + 9 + 9) / 4])
    close(obj.per_sample_loss(prediction, target, "l1", 1.0), [6.5 / 4])
    # pseudo-Huber 2c(√(r²+c²) − c): 3-4-5 triangles give exact values
    close(obj.per_sample_loss(torch.tensor([[0.75]]), torch.zeros(1, 1), "huber", 1.0), [0.5])
    close(obj.per_sample_loss(torch.tensor([[3.0]]), torch.zeros(1, 1), "huber", 4.0), [8.0])
    # smooth_l1 as Diffusers' scheduled-Huber scripts define it, 2(√(r²+c²) − c): the same triangles
    close(obj.per_sample_loss(torch.tensor([[0.75]]), torch.zeros(1, 1), "smooth_l1", 1.0), [0.5])
    close(obj.per_sample_loss(torch.tensor([[3.0]]), torch.zeros(1, 1), "smooth_l1", 4.0), [2.0])
    diffusers_smooth_l1 = 2 * (torch.sqrt(prediction**2 + 0.7**2) - 0.7)  # train_text_to_image_lora's conditional_loss
    close(obj.per_sample_loss(prediction, target, "smooth_l1", 0.7), [diffusers_smooth_l1.mean()])
    close(obj.per_sample_loss(prediction, target, "smooth_l1", 0.7), obj.per_sample_loss(prediction, target, "huber", 0.7) / 0.7)


@pytest.mark.parametrize("loss_type, small_limit, large_limit", [("huber", 1e-6, 2 * 0.01 * 1e3), ("smooth_l1", 1e-6, 2 * 1e3)])
def test_huber_asymptotes(loss_type, small_limit, large_limit):
    small = obj.per_sample_loss(torch.tensor([[1e-3]]), torch.zeros(1, 1), loss_type, 1.0)
    close(small, [small_limit], atol=0.0, rtol=1e-3)  # huber → r², smooth_l1 → r²/c for |r| ≪ c (c = 1 here)
    large = obj.per_sample_loss(torch.tensor([[1e3]]), torch.zeros(1, 1), loss_type, 0.01)
    close(large, [large_limit], atol=0.0, rtol=1e-3)  # huber → 2c|r|, smooth_l1 → 2|r| for |r| ≫ c


def test_per_sample_loss_per_sample_huber_c_float32_and_reduction():
    prediction = torch.tensor([[[0.75, 0.75]], [[3.0, -3.0]]], dtype=torch.bfloat16)
    loss = obj.per_sample_loss(prediction, torch.zeros(2, 1, 2), "huber", torch.tensor([1.0, 4.0]))
    assert loss.dtype == torch.float32 and loss.shape == (2,)
    close(loss, [0.5, 8.0])
    close(obj.weighted_mean(torch.tensor([1.0, 3.0]), torch.tensor([0.5, 2.0])), 3.25)


def test_scheduled_huber_c():
    t_fraction, edm_sigma = torch.tensor([0.0, 0.5, 1.0]), torch.tensor([0.0, 1.0, 3.0])
    close(obj.scheduled_huber_c("constant", 0.1, t_fraction, edm_sigma), [0.1, 0.1, 0.1])
    close(obj.scheduled_huber_c("exponential", 0.1, t_fraction, edm_sigma), [1.0, 0.1**0.5, 0.1])
    close(obj.scheduled_huber_c("snr", 0.1, t_fraction, edm_sigma), [1.0, 0.325, 0.15625])
    # Diffusers' scheduled-Huber example: exp(−αt) with α = −ln(c)/T; σ = √((1−ᾱ)/ᾱ)
    abar, t = obj.alphas_cumprod_from_betas(sd_betas()), torch.tensor([0, 500, 999])
    alpha = -math.log(0.1) / 1000
    close(obj.scheduled_huber_c("exponential", 0.1, t / 1000, edm_sigma), torch.exp(-alpha * t))
    sigma = obj.edm_sigma_from_snr(obj.snr(abar, t))
    close(sigma, ((1 - abar[t]) / abar[t]) ** 0.5, atol=0.0, rtol=1e-5)
    close(obj.edm_sigma_from_flow(torch.tensor([0.0, 0.5, 0.75])), [0.0, 1.0, 3.0])
    assert torch.isfinite(obj.edm_sigma_from_flow(torch.tensor([1.0]))).all()
    assert torch.isfinite(obj.edm_sigma_from_snr(torch.tensor([0.0]))).all()


# --- Noise ----------------------------------------------------------------------------------------------


def test_offset_noise():
    noise = torch.randn(64, 16, 32, 32, generator=torch.Generator().manual_seed(0))
    assert obj.offset_noise(noise, 0.0, torch.Generator()) is noise
    shift = obj.offset_noise(noise, 0.1, torch.Generator().manual_seed(1)) - noise
    close(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6)  # constant over pixels of a channel
    assert shift[:, :, 0, 0].std().item() == pytest.approx(0.1, rel=0.1)
    assert shift[:, :, 0, 0].mean().abs().item() < 0.01


def test_perturbed_noise():
    noise = torch.randn(8, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    assert obj.perturbed_noise(noise, 0.0, torch.Generator()) is noise
    delta = obj.perturbed_noise(noise, 0.1, torch.Generator().manual_seed(1)) - noise
    assert delta.std().item() == pytest.approx(0.1, rel=0.05)


# --- Timestep samplers ----------------------------------------------------------------------------------

N_DRAWS = 20_000


def draw(scheme, seed, **kwargs):
    return obj.sample_density(scheme, N_DRAWS, torch.Generator().manual_seed(seed), **kwargs)


def test_logit_normal_moments():
    u = draw("logit_normal", 0, logit_mean=0.3, logit_std=0.8)
    logit = torch.logit(u.double())
    assert logit.mean().item() == pytest.approx(0.3, abs=0.02)
    assert logit.std().item() == pytest.approx(0.8, abs=0.02)


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode", "cosmap"])
def test_draws_within_unit_interval_and_timesteps_in_range(scheme):
    u = draw(scheme, 3, logit_std=3.0)
    assert u.dtype == torch.float32 and u.shape == (N_DRAWS,)
    assert (u >= 0).all() and (u <= 1).all()
    t = obj.discrete_timesteps(u, 1000)
    assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999
    assert obj.discrete_timesteps(torch.tensor([0.0, 0.4999, 1.0]), 1000).tolist() == [0, 499, 999]


def test_mode_histogram_matches_density():
    """Bins whose edges are the images f(r_k) of a uniform grid r_k must each hold 1/20 of the mass."""
    scale = 1.29
    r = torch.linspace(0, 1, 21, dtype=torch.float64)
    edges = (1 - r - scale * (torch.cos(math.pi * r / 2) ** 2 - 1 + r)).flip(0)
    counts = torch.histogram(draw("mode", 4, mode_scale=scale).double(), bins=edges).hist
    close(counts / N_DRAWS, torch.full((20,), 0.05, dtype=torch.float64), atol=0.006)


def test_cosmap_matches_its_density():
    """CDF of the density 2/(π(1−2t+2t²)) is (2/π)·arctan(t/(1−t))."""
    u = draw("cosmap", 5).double().numpy()
    statistic = kstest(u, lambda t: 2 / math.pi * torch.atan(torch.as_tensor(t / (1 - t))).numpy()).statistic
    assert statistic < 0.02


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode"])
def test_samplers_match_diffusers(scheme):
    kwargs = dict(logit_mean=0.2, logit_std=1.1, mode_scale=1.29)
    ours = draw(scheme, 6, **kwargs)
    theirs = compute_density_for_timestep_sampling(
        scheme, N_DRAWS, generator=torch.Generator().manual_seed(7), **kwargs
    )
    assert ks_2samp(ours.numpy(), theirs.numpy()).statistic < 0.02
    same_seed = compute_density_for_timestep_sampling(
        scheme, N_DRAWS, generator=torch.Generator().manual_seed(6), **kwargs
    )
    close(ours, same_seed)


# --- Objectives -----------------------------------------------------------------------------------------


def vp_objective(**kwargs):
    return obj.DiffusionObjective(sd_betas(), **kwargs)


FEATURES = dict(noise_offset=0.1, input_perturbation=0.1, timestep_sampling="logit_normal", loss_type="huber")


@pytest.mark.parametrize(
    "objective",
    [
        vp_objective(prediction_type="v_prediction", loss_weighting="min_snr", zero_terminal_snr=True, **FEATURES),
        obj.FlowMatchingObjective(shift=3.0, loss_weighting="cosmap", **FEATURES),
    ],
    ids=["vp", "flow"],
)
def test_noised_batch_independent_of_batch_grouping(objective):
    x0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    whole = objective.noise(x0, gens(10, 11, 12, 13))
    halves = [objective.noise(x0[:2], gens(10, 11)), objective.noise(x0[2:], gens(12, 13))]
    for field in ("model_input", "timesteps", "target", "weights", "huber_c"):
        torch.testing.assert_close(
            getattr(whole, field), torch.cat([getattr(h, field) for h in halves]), rtol=0, atol=0
        )
    assert whole.weights.shape == whole.huber_c.shape == whole.timesteps.shape == (4,)


def test_vp_noise_is_consistent_with_pure_functions():
    objective = vp_objective(prediction_type="epsilon", loss_weighting="min_snr", timestep_sampling="mode")
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64).bfloat16()
    batch = objective.noise(x0, gens(1, 2, 3))
    t = obj.discrete_timesteps(torch.cat([obj.sample_density("mode", 1, g) for g in gens(1, 2, 3)]), 1000)
    assert batch.timesteps.dtype == torch.float32 and batch.timesteps.tolist() == t.float().tolist()
    assert batch.model_input.dtype == torch.bfloat16 and batch.target.dtype == torch.float32
    expected_input = obj.add_noise(x0.float(), batch.target, objective.alphas_cumprod, t).bfloat16()
    torch.testing.assert_close(batch.model_input, expected_input)
    close(batch.weights, obj.loss_weights("min_snr", obj.snr(objective.alphas_cumprod, t), "epsilon"))
    edm_sigma = obj.edm_sigma_from_snr(obj.snr(objective.alphas_cumprod, t))
    close(batch.huber_c, obj.scheduled_huber_c("snr", 0.1, t / 1000, edm_sigma))


def test_zero_terminal_snr_objective():
    objective = vp_objective(zero_terminal_snr=True, prediction_type="v_prediction")
    assert objective.alphas_cumprod[-1].item() == 0.0 and objective.num_train_timesteps == 1000


def test_flow_noise_interpolates_with_shifted_sigmas():
    objective = obj.FlowMatchingObjective(
        num_train_timesteps=1000, shift=3.0, timestep_sampling="uniform", loss_weighting="sigma_sqrt"
    )
    x0 = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    batch = objective.noise(x0, gens(1, 2, 3))
    u = torch.cat([obj.sample_density("uniform", 1, g) for g in gens(1, 2, 3)])
    sigmas = obj.shift_sigmas(u, 3.0)
    close(batch.timesteps, sigmas * 1000, atol=1e-4)
    noise = batch.target + x0
    sigma = sigmas.view(-1, 1, 1, 1)
    close(batch.model_input, (1 - sigma) * x0 + sigma * noise, atol=1e-5)
    close(batch.weights, sigmas**-2, atol=0.0, rtol=1e-5)


@pytest.mark.parametrize(
    "objective", [vp_objective(loss_weighting="snr", prediction_type="sample"), obj.FlowMatchingObjective()]
)
def test_loss_and_loss_per_sample(objective):
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    batch = objective.noise(x0, gens(1, 2, 3))
    assert objective.loss(batch.target, batch).item() == 0.0
    prediction = batch.target + 0.5
    per_sample = objective.loss_per_sample(prediction, batch)
    close(per_sample, torch.full((3,), 0.25))
    close(objective.loss(prediction, batch), (0.25 * batch.weights).mean())


# --- Validation -----------------------------------------------------------------------------------------

BAD_VP = [
    ("prediction_type", "x0"),
    ("loss_weighting", "cosmap"),
    ("timestep_sampling", "beta"),
    ("loss_type", "mse"),
    ("huber_schedule", "linear"),
    ("huber_c", 0.0),
    ("noise_offset", -0.1),
    ("input_perturbation", float("nan")),
    ("logit_std", 0.0),
    ("sigma_data", -1.0),
]
BAD_FLOW = [("loss_weighting", "min_snr"), ("shift", 0.0), ("num_train_timesteps", 0), ("timestep_sampling", "x")]


@pytest.mark.parametrize("argument,value", BAD_VP)
def test_vp_validation_names_argument(argument, value):
    with pytest.raises(ConfigError, match=argument):
        vp_objective(**{argument: value})


def test_min_snr_requires_positive_gamma():
    with pytest.raises(ConfigError, match="snr_gamma"):
        vp_objective(loss_weighting="min_snr", snr_gamma=0.0)
    vp_objective(loss_weighting="uniform", snr_gamma=0.0)  # gamma unused: accepted


@pytest.mark.parametrize("argument,value", BAD_FLOW)
def test_flow_validation_names_argument(argument, value):
    with pytest.raises(ValueError, match=argument):
        obj.FlowMatchingObjective(**{argument: value})


def test_validation_of_betas_generators_and_pure_function_names():
    with pytest.raises(ValueError, match="betas"):
        obj.DiffusionObjective(torch.tensor([0.1, 1.5]))
    with pytest.raises(ValueError, match="generators"):
        vp_objective().noise(torch.zeros(2, 4, 8, 8), gens(1))
    with pytest.raises(ValueError, match="prediction_type='x0'"):
        obj.prediction_target("x0", X0, EPS, ABAR, T3)
    with pytest.raises(ValueError, match="timestep_sampling='beta'"):
        obj.sample_density("beta", 4, None)
    with pytest.raises(ValueError, match="loss_weighting='min_snr'"):
        obj.flow_loss_weights("min_snr", torch.ones(2))
    with pytest.raises(ValueError, match="loss_type='mse'"):
        obj.per_sample_loss(X0, X0, "mse", 1.0)
