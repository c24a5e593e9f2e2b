"""Stable Diffusion 3: CLIP-L, CLIP-G and T5 text encoders, an MMDiT transformer, rectified-flow training."""

from __future__ import annotations

import torch
from diffusers import StableDiffusion3Pipeline

from .base import FlowFamily


class StableDiffusion3(FlowFamily):
    name = "sd3"
    title = "Stable Diffusion 3"
    pipeline_class = StableDiffusion3Pipeline
    pipeline_class_names = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline")
    denoiser_name = "transformer"
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    hub_tag = "sd3"
    lora_key_pattern = r"joint_blocks|transformer_blocks[._]\d+[._]attn[._]add_q_proj"
    kohya_base_model_version = "sd3"
    single_file_markers = ("joint_blocks.0.x_block.attn.qkv.weight",)
    single_file_components = {"vae": "first_stage_model.", "text_encoder": "text_encoders.clip_l.", "text_encoder_2": "text_encoders.clip_g.",
                              "text_encoder_3": "text_encoders.t5xxl."}  # fmt: skip

    def native_resolution(self) -> int:
        """StableDiffusion3Pipeline's default_sample_size: the transformer's sample_size, in latents."""
        return self.description.denoiser_config["sample_size"] * self.vae_scale_factor

    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                captions, None, None, device=self.text_device, do_classifier_free_guidance=False
            )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def predict(self, noisy_latents, timesteps, text, batch) -> torch.Tensor:
        transformer = self.pipe.transformer
        return transformer(
            hidden_states=noisy_latents.to(transformer.dtype),
            timestep=timesteps,
            encoder_hidden_states=text["encoder_hidden_states"],
            pooled_projections=text["pooled_projections"],
            return_dict=False,
        )[0]
