"""The diffusion training objective: noising, targets, timestep densities, loss weights and losses.

Pure functions (tensors in, tensors out) modelled on Diffusers' ``training_utils.py`` (compute_snr,
compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3) and k-diffusion, plus two small
classes that compose them for the training loop: ``DiffusionObjective`` (VP/DDPM: SD 1.x/2.x, SDXL) and
``FlowMatchingObjective`` (rectified flow: SD3, Flux).

Notation: ᾱ_t = alphas_cumprod[t], SNR_t = ᾱ_t/(1−ᾱ_t), x_t = √ᾱ·x0 + √(1−ᾱ)·ε (VP) or
x_σ = (1−σ)·x0 + σ·ε (flow). Coefficients are computed in float64, applied in float32, so half-precision
inputs give float32 outputs. With zero terminal SNR (ᾱ_T = 0) or σ ∈ {0, 1}, every quantity that would be
divided by zero (SNR, ᾱ, 1−ᾱ, σ², 1−σ) is first clamped to ``_FLOOR``, so every output stays finite.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .errors import ConfigError

_FLOOR = 1e-8
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "mode", "cosmap")
LOSS_WEIGHTINGS = ("uniform", "snr", "min_snr", "edm", "learned")
FLOW_LOSS_WEIGHTINGS = ("uniform", "none", "sigma_sqrt", "cosmap", "learned")
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")


def _unknown(argument: str, value, allowed: Sequence[str]) -> ConfigError:
    return ConfigError(f"{argument}={value!r} is not supported; expected one of {', '.join(allowed)}")


def _broadcast(per_sample: Tensor, like: Tensor) -> Tensor:
    """Reshape a (B,) tensor to (B, 1, ..., 1) so it broadcasts over ``like``'s non-batch dims."""
    return per_sample.reshape(-1, *([1] * (like.ndim - 1)))


def _alpha_sigma(alphas_cumprod: Tensor, timesteps: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """(√ᾱ_t, √(1−ᾱ_t)) gathered at integer ``timesteps`` (floats are truncated), float32 on ``like``'s device."""
    abar = alphas_cumprod[timesteps.to(alphas_cumprod.device).long()].double()
    alpha, sigma = (_broadcast(c.to(like.device, torch.float32), like) for c in (abar.sqrt(), (1.0 - abar).sqrt()))
    return alpha, sigma


def _generator_device(generator: torch.Generator | None) -> torch.device | str:
    return generator.device if generator is not None else "cpu"


def _randn_like(shape: Sequence[int], generator: torch.Generator | None, like: Tensor) -> Tensor:
    """N(0,1) of ``shape`` drawn on the generator's device, then moved to ``like``'s device and dtype."""
    draw = torch.randn(tuple(shape), generator=generator, device=_generator_device(generator))
    return draw.to(like.device, like.dtype)


# --- VP (DDPM) noise schedule -------------------------------------------------------------------------


def alphas_cumprod_from_betas(betas: Tensor) -> Tensor:
    """ᾱ_t = ∏_{s≤t} (1 − β_s), in float64 so SNR near t = 0 and t = T keeps its precision."""
    return torch.cumprod(1.0 - betas.double(), dim=0)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Betas rescaled to zero terminal SNR (Lin et al. 2023, Algorithm 1; Diffusers' function of that name).

    √ᾱ is shifted so √ᾱ_T = 0 and scaled so √ᾱ_0 is unchanged: √ᾱ' = (√ᾱ − √ᾱ_T)·√ᾱ_0/(√ᾱ_0 − √ᾱ_T).
    Then β'_T = 1 exactly, so ᾱ'_T = 0 exactly. Computed in float64, returned in ``betas.dtype``.
    """
    sqrt_abar = alphas_cumprod_from_betas(betas).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return (1.0 - alphas).to(betas.dtype)


def snr(alphas_cumprod: Tensor, timesteps: Tensor) -> Tensor:
    """SNR_t = ᾱ_t/(1−ᾱ_t): float64 inside, float32 out on ``timesteps``' device; 1−ᾱ floored so ᾱ = 1 stays finite."""
    abar = alphas_cumprod[timesteps.to(alphas_cumprod.device).long()].double()
    return (abar / (1.0 - abar).clamp_min(_FLOOR)).to(timesteps.device, torch.float32)


def add_noise(x0: Tensor, noise: Tensor, alphas_cumprod: Tensor, timesteps: Tensor) -> Tensor:
    """Forward VP process x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε, broadcast over the non-batch dims."""
    alpha, sigma = _alpha_sigma(alphas_cumprod, timesteps, x0)
    return alpha * x0 + sigma * noise


def offset_noise(noise: Tensor, offset: float, generator: torch.Generator | None) -> Tensor:
    """ε + offset·N(0,1) of shape (B, C, 1, ..., 1): one shift per sample and channel, constant over pixels.

    Lets the model learn to change an image's mean brightness (Guttenberg 2023). Expects channels in
    dim 1 (unpacked latents). ``offset == 0`` returns ``noise`` itself and draws nothing.
    """
    if offset == 0:
        return noise
    return noise + offset * _randn_like(noise.shape[:2] + (1,) * (noise.ndim - 2), generator, noise)


def perturbed_noise(noise: Tensor, gamma: float, generator: torch.Generator | None) -> Tensor:
    """ε + γ·N(0,1), same shape: input perturbation (Ning et al. 2023) against exposure bias.

    Only the model input uses it; the target keeps the unperturbed ε. ``gamma == 0`` returns ``noise``
    itself and draws nothing.
    """
    if gamma == 0:
        return noise
    return noise + gamma * _randn_like(noise.shape, generator, noise)


def prediction_target(
    prediction_type: str, x0: Tensor, noise: Tensor, alphas_cumprod: Tensor, timesteps: Tensor
) -> Tensor:
    """Regression target: "epsilon" → ε; "v_prediction" → v = √ᾱ·ε − √(1−ᾱ)·x0; "sample" → x0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        alpha, sigma = _alpha_sigma(alphas_cumprod, timesteps, x0)
        return alpha * noise - sigma * x0
    if prediction_type == "sample":
        return x0
    raise _unknown("prediction_type", prediction_type, PREDICTION_TYPES)


def x0_from_prediction(
    prediction_type: str, prediction: Tensor, x_t: Tensor, alphas_cumprod: Tensor, timesteps: Tensor
) -> Tensor:
    """x̂0 from a prediction: ε → (x_t − √(1−ᾱ)·ε̂)/√ᾱ; v → √ᾱ·x_t − √(1−ᾱ)·v̂; sample → x̂0.

    √ᾱ is floored at √_FLOOR (1e-4): at ᾱ = 0 (zero terminal SNR) x0 is not recoverable from ε̂, and the
    result is large but finite.
    """
    alpha, sigma = _alpha_sigma(alphas_cumprod, timesteps, x_t)
    if prediction_type == "epsilon":
        return (x_t - sigma * prediction) / alpha.clamp_min(_FLOOR**0.5)
    if prediction_type == "v_prediction":
        return alpha * x_t - sigma * prediction
    if prediction_type == "sample":
        return prediction
    raise _unknown("prediction_type", prediction_type, PREDICTION_TYPES)


def epsilon_from_prediction(
    prediction_type: str, prediction: Tensor, x_t: Tensor, alphas_cumprod: Tensor, timesteps: Tensor
) -> Tensor:
    """ε̂ from a prediction: ε → ε̂; v → √(1−ᾱ)·x_t + √ᾱ·v̂; sample → (x_t − √ᾱ·x̂0)/√(1−ᾱ).

    √(1−ᾱ) is floored at √_FLOOR (1e-4): at ᾱ → 1 ε is not recoverable from x̂0, and the result is
    large but finite.
    """
    alpha, sigma = _alpha_sigma(alphas_cumprod, timesteps, x_t)
    if prediction_type == "epsilon":
        return prediction
    if prediction_type == "v_prediction":
        return sigma * x_t + alpha * prediction
    if prediction_type == "sample":
        return (x_t - alpha * prediction) / sigma.clamp_min(_FLOOR**0.5)
    raise _unknown("prediction_type", prediction_type, PREDICTION_TYPES)


# --- Flow matching (rectified flow) ---------------------------------------------------------------------


def flow_interpolate(x0: Tensor, noise: Tensor, sigmas: Tensor) -> Tensor:
    """x_σ = (1−σ)·x0 + σ·ε, with σ of shape (B,) broadcast over the non-batch dims."""
    sigma = _broadcast(sigmas.to(x0.device, torch.float32), x0)
    return (1.0 - sigma) * x0 + sigma * noise


def flow_target(x0: Tensor, noise: Tensor) -> Tensor:
    """Velocity target dx_σ/dσ = ε − x0."""
    return noise - x0


def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """SD3 static timestep shift σ' = s·σ/(1 + (s−1)·σ); s > 1 moves training toward noisier σ."""
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def dynamic_shift_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Resolution-dependent shift μ (Flux; SD3 with dynamic shifting), linear in the number of image tokens:
    base_shift at base_seq_len, max_shift at max_seq_len. The scheduler applies it as shift e^μ."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


# --- Timestep densities ---------------------------------------------------------------------------------


def sample_density(
    scheme: str,
    n: int,
    generator: torch.Generator | None,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> Tensor:
    """n draws u ∈ [0, 1] (float32, on the generator's device) from the SD3 paper's timestep densities.

    "uniform": u ~ U(0,1). "logit_normal": u = sigmoid(N(logit_mean, logit_std)). "mode":
    u = 1 − r − s·(cos²(πr/2) − 1 + r), r ~ U(0,1). "cosmap": u = 1 − 1/(tan(πr/2) + 1), whose density is
    2/(π(1 − 2u + 2u²)). The first three draw exactly as Diffusers' compute_density_for_timestep_sampling;
    results are clamped to [0, 1] against rounding (a no-op for −1 ≤ s ≤ 2/(π−2), where "mode" is monotone).
    """
    device = _generator_device(generator)
    if scheme == "logit_normal":
        u = torch.sigmoid(torch.normal(logit_mean, logit_std, size=(n,), generator=generator, device=device))
    elif scheme in ("uniform", "mode", "cosmap"):
        u = torch.rand((n,), generator=generator, device=device)
    else:
        raise _unknown("timestep_sampling", scheme, TIMESTEP_SAMPLINGS)
    if scheme == "mode":
        u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    elif scheme == "cosmap":
        u = (1.0 - 1.0 / (torch.tan(math.pi / 2 * u.double()) + 1.0)).float()
    return u.clamp(0.0, 1.0)


def discrete_timesteps(u: Tensor, num_train_timesteps: int) -> Tensor:
    """Integer timesteps t = ⌊u·T⌋ clamped to [0, T−1] (u = 1 maps to T−1)."""
    return (u * num_train_timesteps).floor().long().clamp(0, num_train_timesteps - 1)


# --- Loss weights ---------------------------------------------------------------------------------------


def _x0_loss_factor(prediction_type: str, snr_: Tensor) -> Tensor:
    """c with ‖pred − target‖² = c·‖x̂0 − x0‖²: ε → SNR, v → SNR + 1, sample → 1."""
    if prediction_type == "epsilon":
        return snr_
    if prediction_type == "v_prediction":
        return snr_ + 1.0
    if prediction_type == "sample":
        return torch.ones_like(snr_)
    raise _unknown("prediction_type", prediction_type, PREDICTION_TYPES)


def loss_weights(
    scheme: str, snr: Tensor, prediction_type: str, snr_gamma: float = 5.0, sigma_data: float = 1.0
) -> Tensor:
    """Per-sample weight (B,) on the prediction-space MSE of a VP model.

    Each scheme is a weight w on the x0-space MSE, converted to the chosen prediction's loss by dividing
    by the factor c of ``_x0_loss_factor`` (ε: SNR, v: SNR+1, x0: 1):
      "uniform": 1 on the chosen prediction's own loss (the one scheme NOT converted: no reweighting).
      "snr":     w = SNR (Hang et al. 2023)        → ε: 1, v: SNR/(SNR+1), x0: SNR.
      "min_snr": w = min(SNR, γ) (Hang et al. 2023) → ε: min(SNR,γ)/SNR, v: min(SNR,γ)/(SNR+1), x0: min(SNR,γ).
      "edm":     Karras et al. 2022 λ(σ) = (σ² + σ_d²)/(σ·σ_d)² on the denoiser loss with σ² = 1/SNR,
                 i.e. w = SNR + 1/σ_d². With σ_d = 1 (unit-variance scaled latents) this is SNR + 1, so the
                 weighted loss equals the v-prediction MSE whatever the prediction type.
      "learned": the "edm" λ, which EDM2 divides by its learned e^{u(σ)} (see ``LearnedLossWeighting``).
    SNR is floored at 1e-8 first, so at SNR = 0 (zero terminal SNR) ε-prediction gets the SNR→0 limit
    1 for "snr" and "min_snr", and a large but finite 1 + 1e8/σ_d² for "edm".
    """
    snr_ = snr.float().clamp_min(_FLOOR)
    if scheme == "uniform":
        return torch.ones_like(snr_)
    if scheme == "snr":
        x0_weight = snr_
    elif scheme == "min_snr":
        x0_weight = snr_.clamp_max(snr_gamma)
    elif scheme in ("edm", "learned"):
        x0_weight = snr_ + 1.0 / sigma_data**2
    else:
        raise _unknown("loss_weighting", scheme, LOSS_WEIGHTINGS)
    return x0_weight / _x0_loss_factor(prediction_type, snr_)


def flow_loss_weights(scheme: str, sigmas: Tensor) -> Tensor:
    """Per-sample weight (B,) on the flow-matching MSE, as Diffusers' compute_loss_weighting_for_sd3.

    "uniform"/"none": 1; "sigma_sqrt": σ⁻² (σ² floored at 1e-8 so σ = 0 stays finite);
    "cosmap": 2/(π(1 − 2σ + 2σ²)); "learned": 1, which EDM2's learned e^{u(σ)} then divides.
    """
    sigmas = sigmas.float()
    if scheme in ("uniform", "none", "learned"):
        return torch.ones_like(sigmas)
    if scheme == "sigma_sqrt":
        return 1.0 / (sigmas**2).clamp_min(_FLOOR)
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * sigmas + 2.0 * sigmas**2))
    raise _unknown("loss_weighting", scheme, FLOW_LOSS_WEIGHTINGS)


# --- Losses ---------------------------------------------------------------------------------------------


def edm_sigma_from_snr(snr: Tensor) -> Tensor:
    """EDM noise level of a VP timestep, σ = √((1−ᾱ)/ᾱ) = 1/√SNR (SNR floored at 1e-8, so σ ≤ 1e4)."""
    return snr.float().clamp_min(_FLOOR).rsqrt()


def edm_sigma_from_flow(sigmas: Tensor) -> Tensor:
    """EDM noise level of a flow σ: x_σ/(1−σ) = x0 + σ/(1−σ)·ε, so σ_edm = σ/(1−σ) (1−σ floored at 1e-8)."""
    sigmas = sigmas.float()
    return sigmas / (1.0 - sigmas).clamp_min(_FLOOR)


def scheduled_huber_c(schedule: str, huber_c: float, t_fraction: Tensor, edm_sigma: Tensor) -> Tensor:
    """Per-sample Huber parameter (B,) (Khrapov et al. 2024; Diffusers' scheduled-Huber LoRA example).

    "constant": c. "exponential": c^(t/T) = exp(ln c · t_fraction), i.e. exp(−αt) with α = −ln(c)/T: 1 at
    t = 0, c at t = T. "snr": (1 − c)/(1 + σ)² + c with σ the EDM noise level: 1 at σ = 0, → c as σ → ∞.
    Small c makes the loss L1-like (robust to corrupted data) where the timestep is noisy.
    """
    t_fraction = t_fraction.float()
    if schedule == "constant":
        return torch.full_like(t_fraction, huber_c)
    if schedule == "exponential":
        return torch.exp(math.log(huber_c) * t_fraction)
    if schedule == "snr":
        return (1.0 - huber_c) / (1.0 + edm_sigma.float()) ** 2 + huber_c
    raise _unknown("huber_schedule", schedule, HUBER_SCHEDULES)


def per_sample_loss(prediction: Tensor, target: Tensor, loss_type: str, huber_c: float | Tensor = 0.1,
                    element_weights: Tensor | None = None) -> Tensor:
    """Elementwise loss of r = prediction − target, in float32, averaged over the non-batch dims → (B,).

    "l2": r². "l1": |r|.
    "huber" (pseudo-Huber, Diffusers' scheduled-Huber example): 2c(√(r² + c²) − c), smooth everywhere; ≈ r² for
    |r| ≪ c and ≈ 2c|r| for |r| ≫ c. Evaluated as 2c·r²/(√(r² + c²) + c) to avoid cancellation at small r.
    "smooth_l1" (as Diffusers' scheduled-Huber scripts define it): 2(√(r² + c²) − c), the pseudo-Huber loss ÷ c:
    ≈ r²/c for |r| ≪ c and ≈ 2|r| for |r| ≫ c, so small c makes it L1-like without shrinking the large
    residuals' gradients. Evaluated as 2r²/(√(r² + c²) + c). ``huber_c`` is a float or a (B,) tensor.
    ``element_weights`` (masked loss; broadcastable to the residual) make it Σ w·loss / Σ w per sample: the mean
    over the pixels that count, so a mask changes which pixels are learned, not the loss's scale (and the
    learning rate's meaning); a sample whose weights are all zero contributes 0.
    """
    residual = prediction.float() - target.float()
    c = torch.as_tensor(huber_c, dtype=torch.float32, device=residual.device)
    if c.ndim:
        c = _broadcast(c, residual)
    if loss_type == "l2":
        loss = residual**2
    elif loss_type == "l1":
        loss = residual.abs()
    elif loss_type == "huber":
        loss = 2 * c * residual**2 / (torch.sqrt(residual**2 + c**2) + c)
    elif loss_type == "smooth_l1":
        loss = 2 * residual**2 / (torch.sqrt(residual**2 + c**2) + c)
    else:
        raise _unknown("loss_type", loss_type, LOSS_TYPES)
    if element_weights is None:
        return loss.flatten(1).mean(dim=1)
    weights = element_weights.to(loss.device, torch.float32).expand_as(loss)
    return (loss * weights).flatten(1).sum(dim=1) / weights.flatten(1).sum(dim=1).clamp_min(torch.finfo(torch.float32).tiny)


def element_weights(mask: Tensor, like: Tensor) -> Tensor:
    """A (B, 1, H, W) pixel mask as weights on the elements of `like` (B, C, h, w): area-averaged to its h x w
    grid (each latent cell weighs the share of its pixels that count; exact when h and w divide H and W, as
    buckets make them), broadcast over the channels."""
    return torch.nn.functional.adaptive_avg_pool2d(mask.float(), like.shape[-2:])


def weighted_mean(per_sample: Tensor, weights: Tensor) -> Tensor:
    """mean_b(loss_b · w_b): the weights rescale samples without being renormalised (as Diffusers does)."""
    return (per_sample * weights.to(per_sample.device, per_sample.dtype)).mean()


# --- Learned loss weighting (EDM2) -------------------------------------------------------------------------


def noise_conditioning(sigma: Tensor) -> Tensor:
    """EDM's c_noise(σ) = ln(σ)/4 (σ floored at 1e-8): the noise level as the network sees it."""
    return sigma.float().clamp_min(_FLOOR).log() / 4


def fourier_features(x: Tensor, frequencies: Tensor, phases: Tensor) -> Tensor:
    """EDM2's MPFourier: √2·cos(2π(f·x + φ)) per channel, (B,) → (B, C); unit mean square for random φ."""
    return math.sqrt(2) * torch.cos(2 * math.pi * (x[:, None] * frequencies + phases))


def uncertainty_weighted_loss(weighted_losses: Tensor, log_variance: Tensor) -> Tensor:
    """EDM2's loss (Karras et al. 2024, eq. 21 with the λ-weighted loss): mean_b(λL_b / e^{u_b} + u_b).

    Its minimum over u at a noise level is where the derivative −λL·e^{−u} + 1 averages to zero, i.e.
    u*(σ) = log E[λL | σ]: each noise level's loss is then divided by its own expected value."""
    return (weighted_losses * torch.exp(-log_variance) + log_variance).mean()


class LearnedLossWeighting(torch.nn.Module):
    """u(σ), the learned log-variance of the loss at noise level σ (EDM2's `logvar_fourier` → `logvar_linear`):
    Fourier features of c_noise(σ), fixed random frequencies and phases, then one linear layer. It starts at
    u = 0 (zero weights), where the training loss is the plain λ-weighted loss, and trains with the LoRA
    weights; it shapes the gradients only, so it is saved in checkpoints and never in the adapter."""

    def __init__(self, channels: int = 128, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("frequencies", torch.randn(channels, generator=generator))
        self.register_buffer("phases", torch.rand(channels, generator=generator))
        self.linear = torch.nn.Linear(channels, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, sigma: Tensor) -> Tensor:
        """u (B,) at EDM noise levels σ (B,)."""
        features = fourier_features(noise_conditioning(sigma).to(self.frequencies.device), self.frequencies, self.phases)
        return self.linear(features).squeeze(-1)


# --- Composition for the training loop ------------------------------------------------------------------


@dataclass
class NoisedBatch:
    """One noised batch: feed ``model_input`` and ``timesteps`` to the model, compare with ``target``.

    ``timesteps`` is float (B,) in the scheduler's training units: VP → integer t in [0, T−1]; flow → σ·T.
    ``target`` is float32; ``model_input`` has x0's dtype; ``weights``, ``huber_c`` and ``noise_level`` (the
    EDM σ of each sample, which learned loss weighting conditions on) are float32 (B,).
    """

    model_input: Tensor
    timesteps: Tensor
    target: Tensor
    weights: Tensor
    huber_c: Tensor
    noise_level: Tensor
    element_weights: Tensor | None = None  # masked loss: (B, 1, h, w) on the target's grid

    def reweighted(self, sample_weights: Tensor | None, masks: Tensor | None) -> "NoisedBatch":
        """The batch with its per-sample weights scaled (prior_loss_weight on regularisation images) and its
        element weights set from pixel or latent-grid masks (`element_weights`)."""
        weights = self.weights if sample_weights is None else self.weights * sample_weights.to(self.weights.device, self.weights.dtype)
        elements = None if masks is None else element_weights(masks, self.target)
        return replace(self, weights=weights, element_weights=elements)


def _check_choice(argument: str, value, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise _unknown(argument, value, allowed)


def _check_positive(argument: str, value: float, allow_zero: bool = False) -> None:
    if not (value >= 0 if allow_zero else value > 0) or not math.isfinite(value):
        raise ConfigError(f"{argument}={value!r} must be a finite number {'>= 0' if allow_zero else '> 0'}")


class _Objective:
    """Shared by both objectives: per-sample draws and the loss."""

    def __init__(
        self,
        *,
        timestep_sampling: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        noise_offset: float = 0.0,
        input_perturbation: float = 0.0,
        loss_type: str = "l2",
        huber_c: float = 0.1,
        huber_schedule: str = "snr",
        loss_weighting: str = "uniform",
    ):
        _check_choice("timestep_sampling", timestep_sampling, TIMESTEP_SAMPLINGS)
        _check_positive("logit_std", logit_std)
        _check_positive("noise_offset", noise_offset, allow_zero=True)
        _check_positive("input_perturbation", input_perturbation, allow_zero=True)
        _check_choice("loss_type", loss_type, LOSS_TYPES)
        _check_positive("huber_c", huber_c)
        _check_choice("huber_schedule", huber_schedule, HUBER_SCHEDULES)
        self.timestep_sampling = timestep_sampling
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.mode_scale = mode_scale
        self.noise_offset = noise_offset
        self.input_perturbation = input_perturbation
        self.loss_type = loss_type
        self.huber_c = huber_c
        self.huber_schedule = huber_schedule
        self.loss_weighting = loss_weighting
        self.learned_weighting = LearnedLossWeighting() if loss_weighting == "learned" else None

    def learned_parameters(self, device) -> dict[str, torch.nn.Parameter]:
        """The trainable parameters of learned loss weighting (none for a fixed weighting), on `device`."""
        if self.learned_weighting is None:
            return {}
        self.learned_weighting.to(device)
        return {f"loss_weighting.{name}": p for name, p in self.learned_weighting.named_parameters()}

    def _draw(self, x0: Tensor, generators: Sequence[torch.Generator]) -> tuple[Tensor, Tensor, Tensor]:
        """Per sample b, from generators[b] only, in this order: u (timestep density), ε (x0[b]'s shape),
        the offset-noise shift (only if noise_offset > 0), the input perturbation (only if > 0).

        Returns u (B,) on CPU, the target noise ε and the model-input noise (perturbed ε), both float32 on
        x0's device. Batch composition therefore never changes a sample's draws.
        """
        if len(generators) != x0.shape[0]:
            raise ValueError(f"generators: need one per sample ({x0.shape[0]}), got {len(generators)}")
        us, noises, inputs = [], [], []
        for generator in generators:
            us.append(
                sample_density(
                    self.timestep_sampling, 1, generator, self.logit_mean, self.logit_std, self.mode_scale
                ).cpu()
            )
            noise = torch.randn((1, *x0.shape[1:]), generator=generator, device=generator.device)
            noise = offset_noise(noise, self.noise_offset, generator)
            noises.append(noise)
            inputs.append(perturbed_noise(noise, self.input_perturbation, generator))
        noise, input_noise = (torch.cat(parts).to(x0.device, torch.float32) for parts in (noises, inputs))
        return torch.cat(us), noise, input_noise

    def loss_per_sample(self, prediction: Tensor, noised: NoisedBatch) -> Tensor:
        """Unweighted float32 loss per sample (B,), for logging and evaluation."""
        return per_sample_loss(prediction, noised.target, self.loss_type, noised.huber_c, noised.element_weights)

    def loss(self, prediction: Tensor, noised: NoisedBatch) -> Tensor:
        """The objective's scalar loss: mean_b(w_b · loss_b). What is logged and validated."""
        return weighted_mean(self.loss_per_sample(prediction, noised), noised.weights)

    def training_loss(self, prediction: Tensor, noised: NoisedBatch) -> tuple[Tensor, Tensor]:
        """(the loss to minimise, the objective's loss to report): the same tensor, except with learned
        weighting, whose minimised loss is ``uncertainty_weighted_loss`` and not comparable across runs."""
        loss = self.loss(prediction, noised)
        if self.learned_weighting is None:
            return loss, loss
        weighted = self.loss_per_sample(prediction, noised) * noised.weights
        return uncertainty_weighted_loss(weighted, self.learned_weighting(noised.noise_level)), loss


class DiffusionObjective(_Objective):
    """VP/DDPM objective (SD 1.x/2.x, SDXL): discrete timesteps, ε/v/x0 targets, SNR-based weights."""

    def __init__(
        self,
        betas: Tensor,
        *,
        zero_terminal_snr: bool = False,
        prediction_type: str = "epsilon",
        loss_weighting: str = "uniform",
        snr_gamma: float = 5.0,
        sigma_data: float = 1.0,
        **shared,
    ):
        """``shared``: the sampling, noise and loss options of ``_Objective``."""
        _check_choice("loss_weighting", loss_weighting, LOSS_WEIGHTINGS)
        super().__init__(loss_weighting=loss_weighting, **shared)
        betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
        if betas.ndim != 1 or betas.numel() < 2 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ConfigError("betas must be a 1-D tensor of at least 2 values, each in (0, 1)")
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        if loss_weighting == "min_snr":
            _check_positive("snr_gamma", snr_gamma)
        _check_positive("sigma_data", sigma_data)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.alphas_cumprod = alphas_cumprod_from_betas(betas)
        self.num_train_timesteps = betas.numel()
        self.prediction_type = prediction_type
        self.snr_gamma = snr_gamma
        self.sigma_data = sigma_data

    def noise(self, x0: Tensor, generators: Sequence[torch.Generator]) -> NoisedBatch:
        """Noise x0 (B, C, ...) at t = ⌊u·T⌋ with one generator per sample (draw order: see ``_draw``)."""
        u, noise, input_noise = self._draw(x0, generators)
        t = discrete_timesteps(u, self.num_train_timesteps)
        snr_t = snr(self.alphas_cumprod, t)
        x0f = x0.float()
        weights = loss_weights(self.loss_weighting, snr_t, self.prediction_type, self.snr_gamma, self.sigma_data)
        edm_sigma = edm_sigma_from_snr(snr_t)
        huber = scheduled_huber_c(self.huber_schedule, self.huber_c, t / self.num_train_timesteps, edm_sigma)
        return NoisedBatch(
            model_input=add_noise(x0f, input_noise, self.alphas_cumprod, t).to(x0.dtype),
            timesteps=t.to(x0.device, torch.float32),
            target=prediction_target(self.prediction_type, x0f, noise, self.alphas_cumprod, t),
            weights=weights.to(x0.device),
            huber_c=huber.to(x0.device),
            noise_level=edm_sigma.to(x0.device),
        )


class FlowMatchingObjective(_Objective):
    """Rectified-flow objective (SD3, Flux): σ = shift_sigmas(u, shift), x_σ = (1−σ)x0 + σε, target ε − x0."""

    def __init__(
        self,
        *,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        loss_weighting: str = "none",
        timestep_sampling: str = "logit_normal",
        **shared,
    ):
        """``shared``: the other sampling, noise and loss options of ``_Objective``."""
        _check_choice("loss_weighting", loss_weighting, FLOW_LOSS_WEIGHTINGS)
        super().__init__(timestep_sampling=timestep_sampling, loss_weighting=loss_weighting, **shared)
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ConfigError(f"num_train_timesteps={num_train_timesteps!r} must be a positive integer")
        _check_positive("shift", shift)
        self.num_train_timesteps = num_train_timesteps
        self.shift = shift

    def noise(self, x0: Tensor, generators: Sequence[torch.Generator]) -> NoisedBatch:
        """Noise x0 (B, C, ...) at σ = shift_sigmas(u, shift) with one generator per sample (see ``_draw``)."""
        u, noise, input_noise = self._draw(x0, generators)
        sigmas = shift_sigmas(u, self.shift)
        x0f = x0.float()
        edm_sigma = edm_sigma_from_flow(sigmas)
        huber = scheduled_huber_c(self.huber_schedule, self.huber_c, sigmas, edm_sigma)
        return NoisedBatch(
            model_input=flow_interpolate(x0f, input_noise, sigmas).to(x0.dtype),
            timesteps=(sigmas * self.num_train_timesteps).to(x0.device, torch.float32),
            target=flow_target(x0f, noise),
            weights=flow_loss_weights(self.loss_weighting, sigmas).to(x0.device),
            huber_c=huber.to(x0.device),
            noise_level=edm_sigma.to(x0.device),
        )
