"""Qwen-Image: an MMDiT over 2x2-packed latents of its own video-style VAE (one frame, latents normalised by a
per-channel mean and std), conditioned on the last hidden states of Qwen2.5-VL reading the prompt inside the
pipeline's description template, the template's 34 leading tokens dropped, under a mask."""

from __future__ import annotations

import torch
from diffusers import QwenImagePipeline

from .base import FlowFamily
from .flux import pack_latents, unpack_latents


class QwenImage(FlowFamily):
    name = "qwen_image"
    title = "Qwen-Image"
    pipeline_class = QwenImagePipeline
    pipeline_class_names = ("QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline")
    denoiser_name = "transformer"
    # Attention of both streams and both MLPs, as ai-toolkit and musubi-tuner target.
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                            "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")  # fmt: skip
    hub_tag = "qwen-image"
    eval_negative_prompts = True  # with eval_guidance_scale above 1 it guides with a negative prompt (true CFG)
    lora_key_pattern = r"img_mlp|txt_mlp"
    kohya_base_model_version = "qwen_image"
    comfyui_prefix, comfyui_alpha = "diffusion_model", True  # as musubi-tuner and ai-toolkit write, ComfyUI and Diffusers read
    single_file_markers = ("transformer_blocks.0.img_mod.1.weight", "txt_norm.weight")
    single_file_components = {}  # Qwen-Image files hold the transformer; the rest comes from text_encoder_source
    max_sequence_length = 512  # what QwenImagePipeline.__call__ passes to encode_prompt (the method allows 1024)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** len(self.description.vae_config["temperal_downsample"])

    @property
    def denoiser_input_channels(self) -> int:
        return 4 * self.latent_channels  # 2x2 patches packed into channels

    def native_resolution(self) -> int:
        return 128 * self.vae_scale_factor  # QwenImagePipeline's default_sample_size, in latents

    def caption_token_limits(self) -> dict[str, int]:
        return {"tokenizer": self.max_sequence_length}

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The posterior mean of the one-frame video, normalised as the pipelines encode an image (img2img, edit)."""
        vae = self.pipe.vae
        with torch.no_grad():
            latents = vae.encode(pixel_values.to(vae.device, vae.dtype).unsqueeze(2)).latent_dist.mode()[:, :, 0]
        mean = torch.tensor(vae.config.latents_mean, device=latents.device).view(1, -1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=latents.device).view(1, -1, 1, 1)
        return ((latents.float() - mean) / std).contiguous()

    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """The pipeline's encoding, padded as it pads (to the batch's longest caption), with its mask (all ones
        where the pipeline gives none), so the text cache keeps each caption without padding."""
        with torch.no_grad():
            return self.text_encoding(*self.pipe.encode_prompt(list(captions), device=self.text_device, max_sequence_length=self.max_sequence_length))

    @staticmethod
    def text_encoding(embeds: torch.Tensor, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """A pipeline's (embeddings, mask) as the conditioning entry: the mask all ones where the pipeline gives none."""
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device) if mask is None else mask
        return {"encoder_hidden_states": embeds, "text_mask": mask}

    def planning_text(self, batch_size: int) -> dict[str, torch.Tensor]:
        embeds = self.longest_text(batch_size, self.denoiser.config.joint_attention_dim, self.planning_tokens())
        return {"encoder_hidden_states": embeds, "text_mask": self.all_tokens(embeds, torch.long)}

    def planning_tokens(self) -> int:
        """The most tokens a prompt's encoding holds (the memory planner's step)."""
        return self.max_sequence_length

    @classmethod
    def pipeline_arguments(cls, settings: dict) -> dict:
        """QwenImagePipeline guides by true_cfg_scale with a negative prompt (its guidance_scale is for distilled
        models, and ignored with a warning here); without --n the negative prompt is the pipeline card's " "."""
        settings = dict(settings)
        if "guidance_scale" in settings:
            settings["true_cfg_scale"] = settings.pop("guidance_scale")
        settings.setdefault("negative_prompt", " ")
        return settings

    def predict(self, noisy_latents, timesteps, text, batch) -> torch.Tensor:
        transformer = self.pipe.transformer
        batch_size, _, height, width = noisy_latents.shape
        mask = text["text_mask"]  # padded to the batch's longest caption, fresh or from the cache
        tokens, shapes = self.image_tokens(noisy_latents.to(transformer.dtype), text)
        out = transformer(
            hidden_states=tokens,
            timestep=timesteps / 1000,
            guidance=None,  # Qwen-Image is not guidance-distilled
            encoder_hidden_states_mask=None if mask.all() else mask,  # the pipeline passes none when nothing is padded
            encoder_hidden_states=text["encoder_hidden_states"],
            img_shapes=[shapes] * batch_size,
            return_dict=False,
        )[0]
        return unpack_latents(out[:, : (height // 2) * (width // 2)], height, width)  # the noisy latents' tokens come first

    def image_tokens(self, latents: torch.Tensor, text: dict) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
        """The packed tokens the transformer denoises, and (frames, rows, columns) of each image they hold, for its
        `img_shapes` (an edit model appends its controls')."""
        _, _, height, width = latents.shape
        return pack_latents(latents), [(1, height // 2, width // 2)]
