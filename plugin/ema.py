"""Exponential moving average of the trainable (LoRA) weights.

The average is what evaluation renders and what the adapter file holds when EMA is on; `swapped_in`
exchanges it with the live weights for the duration of a block, so no second copy of the model is needed.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class EMA:
    def __init__(self, parameters: list[torch.nn.Parameter], decay: float, update_every: int = 1):
        self.parameters = list(parameters)
        self.shadow = [p.detach().clone().float() for p in self.parameters]
        self.decay = decay
        self.update_every = update_every
        self.num_updates = 0

    def current_decay(self) -> float:
        """Warm-up as in Diffusers' EMAModel: min(decay, (1+n)/(10+n)), so short runs still move off the start."""
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, optimizer_step: int) -> None:
        """Called after every optimizer step (counted from 1); averages every `update_every` steps."""
        if optimizer_step % self.update_every:
            return
        weight = 1.0 - self.current_decay()
        for shadow, parameter in zip(self.shadow, self.parameters):
            shadow.lerp_(parameter.detach().float(), weight)
        self.num_updates += 1

    @contextmanager
    def swapped_in(self):
        """Within the block the parameters hold the averaged weights; the live ones come back after."""
        live = [p.detach().clone() for p in self.parameters]
        with torch.no_grad():
            for parameter, shadow in zip(self.parameters, self.shadow):
                parameter.copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for parameter, saved in zip(self.parameters, live):
                    parameter.copy_(saved)

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "num_updates": self.num_updates}
