"""SDXL: two CLIP text encoders (penultimate states concatenated, plus the second's pooled embedding) and
micro-conditioning on the original image size and the crop taken from it (`add_time_ids`)."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionXLPipeline

from ..errors import ConfigError
from .base import DDPMFamily


def sdxl_time_ids(original_sizes: torch.Tensor, crop_top_lefts: torch.Tensor, target_size: tuple[int, int]) -> torch.Tensor:
    """SDXL micro-conditioning, one row per sample: (orig_h, orig_w, crop_top, crop_left, target_h, target_w).

    original_sizes and crop_top_lefts are (B, 2) in (height, width) / (top, left) order; the crop is the one
    really taken, in the resized image's coordinates (what the SDXL paper conditions on).
    """
    target = torch.tensor(target_size, dtype=torch.long).expand(original_sizes.shape[0], 2)
    return torch.cat([original_sizes.long(), crop_top_lefts.long(), target], dim=1)


class StableDiffusionXL(DDPMFamily):
    name = "sdxl"
    title = "SDXL"
    pipeline_class = StableDiffusionXLPipeline
    pipeline_class_names = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")
    denoiser_name = "unet"
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    lora_text_encoders = ("text_encoder", "text_encoder_2")
    hub_tag = "stable-diffusion-xl"
    kohya_prefixes = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    lora_key_pattern = r"text_encoder_2|lora_te2_|transformer_blocks[._][1-9]"  # SD 1.x has one block per attention
    kohya_base_model_version = "sdxl_base_v1-0"
    single_file_markers = ("input_blocks.0.0.weight", "label_emb.0.0.weight")
    single_file_components = {"vae": "first_stage_model.", "text_encoder": "conditioner.embedders.0.", "text_encoder_2": "conditioner.embedders.1."}

    def _check_trainable_model(self) -> None:
        """The SDXL refiner has only the second text encoder and other micro-conditioning: not trainable here."""
        if self.description.components.get("text_encoder") is None:
            raise ConfigError("model_name: this SDXL model has no first text encoder (the refiner?); use the SDXL base model")
        super()._check_trainable_model()

    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        with torch.set_grad_enabled(self.trains_text_encoder):
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                captions, device=self.text_device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        return {"encoder_hidden_states": embeds, "text_embeds": pooled}

    def predict(self, noisy_latents, timesteps, text, batch) -> torch.Tensor:
        unet = self.pipe.unet
        height, width = (side * self.vae_scale_factor for side in noisy_latents.shape[-2:])
        time_ids = sdxl_time_ids(batch["original_sizes"], batch["crop_top_lefts"], (height, width))
        conditioning = {"text_embeds": text["text_embeds"], "time_ids": time_ids.to(unet.device, unet.dtype)}
        return unet(
            noisy_latents.to(unet.dtype),
            timesteps,
            encoder_hidden_states=text["encoder_hidden_states"],
            added_cond_kwargs=conditioning,
        ).sample
