"""Flux.1 Kontext: an instruction-editing Flux. The control image's latents are packed as the target's are and
appended to the tokens the transformer denoises, their position ids marked by a first coordinate of 1
(FluxKontextPipeline.prepare_latents); the transformer's output for them is dropped. Guidance-distilled, as
Flux.1 [dev] is, and trained as it is; its LoRA files are Flux.1's."""

from __future__ import annotations

import torch
from diffusers import FluxKontextPipeline

from ..cache import CONTROLS
from .flux import Flux, latent_image_ids, pack_latents


class FluxKontext(Flux):
    name = "flux_kontext"
    title = "Flux Kontext"
    pipeline_class = FluxKontextPipeline
    pipeline_class_names = ("FluxKontextPipeline", "FluxKontextInpaintPipeline")
    control_images = 1

    @classmethod
    def pipeline_arguments(cls, settings: dict) -> dict:
        """FluxKontextPipeline renders at `max_area` (1024² unless given), scaling whatever height and width ask
        to it: the area asked for is given, so an image is the size asked for, as in every other pipeline. A
        control stays the size it is given (the image's, as in training), not its nearest preferred resolution."""
        settings = dict(settings)
        if "height" in settings and "width" in settings:
            settings.setdefault("max_area", settings["height"] * settings["width"])
        if "image" in settings:
            settings.setdefault("_auto_resize", False)
        return settings

    def image_tokens(self, latents: torch.Tensor, text: dict) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, ids = super().image_tokens(latents, text)
        control = text[CONTROLS][:, 0].to(latents.dtype)  # (B, C, h, w): the one reference, at its target's bucket or its own resolution
        _, _, height, width = control.shape
        control_ids = latent_image_ids(height, width, latents.device, latents.dtype)
        control_ids[:, 0] = 1
        return torch.cat([tokens, pack_latents(control)], dim=1), torch.cat([ids, control_ids])
