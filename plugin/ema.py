"""Moving averages of the trainable (LoRA) weights: the classic EMA, and post-hoc EMA's power-function
profiles (`phema.py` holds their math).

An average is what evaluation renders and what the adapter file holds when averaging is on; `swapped_in`
exchanges it with the live weights for the duration of a block, so no second copy of the model is needed.
Both kinds hand their state to checkpoints the same way (`state_tensors`, `summary` and their loaders).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .phema import power_function_beta
from .settings import parse_sigma_rels


@contextmanager
def swapped_in(parameters: list[torch.nn.Parameter], values: list[torch.Tensor]):
    """Within the block the parameters hold `values`; the live weights come back after."""
    live = [p.detach().clone() for p in parameters]
    with torch.no_grad():
        for parameter, value in zip(parameters, values):
            parameter.copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            for parameter, saved in zip(parameters, live):
                parameter.copy_(saved)


class EMA:
    def __init__(self, parameters: list[torch.nn.Parameter], decay: float, update_every: int = 1):
        self.parameters = list(parameters)
        self.shadow = [p.detach().clone().float() for p in self.parameters]
        self.decay = decay
        self.update_every = update_every
        self.num_updates = 0

    def current_decay(self) -> float:
        """Warm-up as in Diffusers' EMAModel: 0 at the first update (the average starts as a copy of the
        weights after step 1), then min(decay, (1+n)/(10+n)), so short runs still move off the start."""
        n = self.num_updates
        return 0.0 if n == 0 else min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, optimizer_step: int) -> None:
        """Called after every optimizer step (counted from 1); averages every `update_every` steps."""
        if optimizer_step % self.update_every:
            return
        weight = 1.0 - self.current_decay()
        for shadow, parameter in zip(self.shadow, self.parameters):
            shadow.lerp_(parameter.detach().float(), weight)
        self.num_updates += 1

    def swapped_in(self):
        return swapped_in(self.parameters, self.shadow)

    def state_tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        return {n: s.detach().cpu().contiguous() for n, s in zip(names, self.shadow)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], names: list[str]) -> None:
        self.shadow = [tensors[n].float() for n in names]

    def summary(self) -> dict:
        return {"num_updates": self.num_updates}

    def load_summary(self, summary: dict) -> None:
        self.num_updates = summary["num_updates"]


def moving_average(cfg, parameters: list[torch.nn.Parameter]) -> "EMA | PowerFunctionEMA | None":
    """The average the config asks for (use_ema, ema_type), or None."""
    if not cfg.use_ema:
        return None
    if cfg.ema_type == "posthoc":
        return PowerFunctionEMA(parameters, parse_sigma_rels(cfg.posthoc_ema_sigma_rels))
    return EMA(parameters, cfg.ema_decay, cfg.ema_update_every)


class PowerFunctionEMA:
    """Post-hoc EMA's tracking (Karras et al. 2024): one average per σ_rel, each updated after optimizer step t
    with β_t = (1 − 1/t)^(γ+1), which keeps it the power-function profile of that width. `snapshot` views are
    stored during the run; any other σ_rel is reconstructed from them afterwards. The first σ_rel's average is
    the run's own adapter, as the classic EMA's is."""

    def __init__(self, parameters: list[torch.nn.Parameter], sigma_rels: tuple[float, ...]):
        self.parameters = list(parameters)
        self.sigma_rels = tuple(sigma_rels)
        self.averages = [[p.detach().clone().float() for p in self.parameters] for _ in self.sigma_rels]

    @torch.no_grad()
    def update(self, optimizer_step: int) -> None:
        for sigma_rel, average in zip(self.sigma_rels, self.averages):
            weight = 1.0 - float(power_function_beta(sigma_rel, optimizer_step))
            for value, parameter in zip(average, self.parameters):
                value.lerp_(parameter.detach().float(), weight)

    def swapped_in(self, profile: int = 0):
        return swapped_in(self.parameters, self.averages[profile])

    def state_tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        return {f"{sigma_rel!r}/{n}": value.detach().cpu().contiguous()
                for sigma_rel, average in zip(self.sigma_rels, self.averages) for n, value in zip(names, average)}  # fmt: skip

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], names: list[str]) -> None:
        self.averages = [[tensors[f"{sigma_rel!r}/{n}"].float() for n in names] for sigma_rel in self.sigma_rels]

    def summary(self) -> dict:
        return {"sigma_rels": list(self.sigma_rels)}

    def load_summary(self, summary: dict) -> None:
        """Nothing to restore (β depends on the step alone); the profiles must be the ones tracked."""
