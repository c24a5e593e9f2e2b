"""One batch's denoising loss, shared by the training step, the validation loss and the held-out checks: the
per-example noise keys and the encode → noise → predict → compare sequence."""

from __future__ import annotations

import random
from contextlib import nullcontext

import torch


def sample_generators(seed: int, epoch, indices) -> list[torch.Generator]:
    """One generator per example for noise and timesteps, keyed by (seed, epoch, example): the draws do not
    depend on batch size, accumulation, data-loader workers or process count, so those settings change
    nothing else. `epoch` may be any key (the validation set uses its own)."""
    return [
        torch.Generator().manual_seed(random.Random(f"{seed}:{epoch}:{int(i)}:noise").getrandbits(63))
        for i in indices
    ]


def denoising_loss(
    family, objective, conditioning, batch: dict, generators: list[torch.Generator], autocast=nullcontext
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the loss to minimise, the objective's loss to report) on one batch: encode (or look up), noise,
    predict, compare; each example's loss weighed by its dataset's weight and its mask (masked loss). The two are one tensor unless the weighting is learned (`objective.training_loss`).

    Only the denoiser runs under autocast: the VAE and text encoders keep the precision they were loaded in
    (an fp32 VAE, T5's fp32 layers), which autocast would otherwise override with fp16 and overflow.
    """
    latents, text, masks = conditioning(batch)
    noised = objective.noise(latents, generators).reweighted(batch.get("loss_weights"), masks)
    with autocast():
        prediction = family.predict(noised.model_input, noised.timesteps, text, batch)
    return objective.training_loss(prediction, noised)
