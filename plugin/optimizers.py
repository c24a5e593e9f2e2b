"""The optimizer of the trainable parameters: AdamW, bitsandbytes' 8-bit AdamW, Prodigy or Adafactor.

8-bit AdamW keeps both moments block-quantised (a quarter of AdamW's state); Prodigy estimates its own step
size, so `learning_rate` is a multiplier on it (1.0 by its authors' convention); Adafactor keeps factored
second moments and no first moment, with the learning rate fixed (relative_step off) so the LR schedule
applies as it does to the others. Every optimizer's state is part of a checkpoint (plugin/checkpoints.py).
"""

from __future__ import annotations

import importlib.util
import warnings

import torch

from .errors import ConfigError

PRODIGY_SCHEDULES = ("constant", "constant_with_warmup", "cosine")  # what Prodigy's authors pair it with


def check_optimizer(cfg) -> None:
    """Errors (missing library, no CUDA, an incompatible combination) and warnings, before any weights load."""
    if cfg.optimizer == "adamw_8bit":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("optimizer: 'adamw_8bit' needs bitsandbytes (pip install bitsandbytes) and a CUDA GPU")
        if not torch.cuda.is_available():
            raise ConfigError("optimizer: 'adamw_8bit' needs a CUDA GPU (bitsandbytes' 8-bit kernels); use adamw, prodigy or adafactor here")
    if cfg.optimizer != "prodigy":
        return
    if cfg.learning_rate < 0.1:
        warnings.warn(f"learning_rate: {cfg.learning_rate:g} with prodigy, which estimates the step size itself and takes "
                      "learning_rate as a multiplier on it: 1.0 is its convention", stacklevel=2)  # fmt: skip
    if cfg.lr_scheduler not in PRODIGY_SCHEDULES:
        warnings.warn(f"lr_scheduler: {cfg.lr_scheduler!r} with prodigy, whose step-size estimate grows over the run; its "
                      f"authors use {', '.join(PRODIGY_SCHEDULES)}", stacklevel=2)  # fmt: skip
    if cfg.lr_warmup_steps and not cfg.prodigy_safeguard_warmup:
        warnings.warn("prodigy_safeguard_warmup: off with lr_warmup_steps; Prodigy's authors turn it on with a warmup, "
                      "so the estimate does not overshoot while the rate is low", stacklevel=2)  # fmt: skip


def build_optimizer(cfg, groups: list[dict]) -> torch.optim.Optimizer:
    """The optimizer of `groups` (torch param groups, each may set its own lr and weight_decay)."""
    betas, decay = (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_weight_decay
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=betas, weight_decay=decay, eps=cfg.adam_epsilon)
    if cfg.optimizer == "adamw_8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(groups, lr=cfg.learning_rate, betas=betas, weight_decay=decay, eps=cfg.adam_epsilon)
    if cfg.optimizer == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(groups, lr=cfg.learning_rate, betas=betas, weight_decay=decay, eps=cfg.adam_epsilon, d_coef=cfg.prodigy_d_coef,
                       safeguard_warmup=cfg.prodigy_safeguard_warmup, use_bias_correction=cfg.prodigy_use_bias_correction)  # fmt: skip
    from transformers.optimization import Adafactor

    return Adafactor(groups, lr=cfg.learning_rate, weight_decay=decay, relative_step=False, scale_parameter=False, warmup_init=False)
