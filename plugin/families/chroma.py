"""Chroma: Flux's layout with T5 as its only text encoder, read under an attention mask, a pruned modulation
(an approximator network in place of Flux's per-block timestep and guidance projections) and real
classifier-free guidance with a negative prompt instead of a distilled guidance input."""

from __future__ import annotations

import torch
from diffusers import ChromaPipeline

from .flux import Flux


class Chroma(Flux):
    name = "chroma"
    title = "Chroma"
    pipeline_class = ChromaPipeline
    pipeline_class_names = ("ChromaPipeline", "ChromaImg2ImgPipeline", "ChromaInpaintPipeline")
    hub_tag = "chroma"
    eval_negative_prompts = True  # ChromaPipeline guides with a negative prompt (empty by default)
    lora_key_pattern = r"distilled_guidance_layer"  # otherwise its LoRAs read as Flux's
    kohya_base_model_version = "chroma"
    kohya_prefixes = None  # its community file is ComfyUI's Diffusers-keyed one, with alphas (Flux's loader reads them)
    comfyui_alpha = True
    original_lora_modules = {}
    # Chroma files have Flux's block names plus the approximator, so the more specific Chroma wins.
    single_file_markers = ("double_blocks.0.img_attn.qkv.weight", "distilled_guidance_layer.in_proj.weight")

    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """T5 under the tokenizer's mask; the transformer's mask keeps the text tokens and the first padding
        token (ChromaPipeline's `_get_t5_prompt_embeds`), in the embeddings' dtype as the pipeline makes it."""
        with torch.no_grad():
            embeds, _, mask, *_ = self.pipe.encode_prompt(captions, None, device=self.text_device, do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds, "text_attention_mask": mask}

    def planning_text(self, batch_size: int) -> dict[str, torch.Tensor]:
        embeds = self.longest_text(batch_size, self.denoiser.config.joint_attention_dim)
        return {"encoder_hidden_states": embeds, "text_attention_mask": torch.ones(embeds.shape[:2], dtype=embeds.dtype, device=embeds.device)}

    def text_conditioning(self, text: dict, batch_size: int, image_tokens: int) -> dict:
        """The attention mask over text then image tokens, every image token kept (`_prepare_attention_mask`)."""
        mask = text["text_attention_mask"]
        image = torch.ones(batch_size, image_tokens, device=mask.device, dtype=torch.bool)
        return {"attention_mask": torch.cat([mask, image], dim=1)}
