"""Metric sinks: TensorBoard and Weights & Biases (offline unless an API key is configured; never prompts)."""

from __future__ import annotations

import netrc
import os
from pathlib import Path

import numpy as np


def wandb_mode() -> str:
    """'online' only when a key is configured (env or ~/.netrc); otherwise 'offline', so W&B never prompts."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        return "online" if netrc.netrc().authenticators("api.wandb.ai") else "offline"
    except (FileNotFoundError, netrc.NetrcParseError):
        return "offline"


class Reporter:
    """Fans metrics and images out to the sinks the config enables."""

    def __init__(self, cfg, log_dir: Path):
        self.sinks = []
        if cfg.log_to_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.sinks.append(_TensorBoard(SummaryWriter(str(log_dir))))
        if cfg.log_to_wandb:
            import wandb

            run = wandb.init(
                project="diffusion-lora",
                name=cfg.adaptor_name,
                config=cfg.as_dict(),
                dir=str(log_dir),
                mode=wandb_mode(),
            )
            self.sinks.append(_WandB(run))

    def metrics(self, step: int, values: dict[str, float]) -> None:
        for sink in self.sinks:
            sink.metrics(step, values)

    def images(self, step: int, tag: str, images) -> None:
        for sink in self.sinks:
            sink.images(step, tag, images)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


class _TensorBoard:
    def __init__(self, writer):
        self.writer = writer

    def metrics(self, step, values):
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def images(self, step, tag, images):
        for k, image in enumerate(images):
            self.writer.add_image(f"{tag}/{k}", np.asarray(image), step, dataformats="HWC")

    def close(self):
        self.writer.close()


class _WandB:
    def __init__(self, run):
        self.run = run

    def metrics(self, step, values):
        self.run.log(values, step=step)

    def images(self, step, tag, images):
        import wandb

        self.run.log({tag: [wandb.Image(image) for image in images]}, step=step)

    def close(self):
        self.run.finish()
