"""Stable Diffusion 1.x/2.x: one CLIP text encoder, a UNet conditioned by cross-attention, DDPM training."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline

from .base import DDPMFamily


class StableDiffusion(DDPMFamily):
    name = "sd"
    title = "Stable Diffusion 1.x/2.x"
    pipeline_class = StableDiffusionPipeline
    pipeline_class_names = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")
    denoiser_name = "unet"
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    lora_text_encoders = ("text_encoder",)
    hub_tag = "stable-diffusion"
    kohya_prefixes = {"unet": "lora_unet", "text_encoder": "lora_te"}
    lora_key_pattern = r"down_blocks|up_blocks|lora_unet_|input_blocks"  # LoRA module names (plugin/lora_tools.py)
    kohya_base_model_version = "sd_v1"
    single_file_markers = ("input_blocks.0.0.weight",)
    single_file_components = {"vae": "first_stage_model.", "text_encoder": "cond_stage_model."}

    @classmethod
    def kohya_model_version(cls, config: dict) -> dict[str, str]:
        """v-prediction means an SD 2.x 768 model, which kohya calls sd_v2_v."""
        if config.get("prediction_type") == "v_prediction":
            return {"ss_base_model_version": "sd_v2_v", "ss_v2": "True"}
        return super().kohya_model_version(config)

    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        with torch.set_grad_enabled(self.trains_text_encoder):
            embeds, _ = self.pipe.encode_prompt(captions, self.text_device, 1, False)
        return {"encoder_hidden_states": embeds}

    def predict(self, noisy_latents, timesteps, text, batch) -> torch.Tensor:
        unet = self.pipe.unet
        return unet(noisy_latents.to(unet.dtype), timesteps, text["encoder_hidden_states"]).sample
