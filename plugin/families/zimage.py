"""Z-Image (base and Turbo): a single-stream DiT over 2x2 latent patches, conditioned on the second-to-last
hidden states of Qwen3 reading the chat-templated prompt, its padding dropped. The transformer takes its
inputs as per-image lists, counts time as 1 − σ and predicts x0 − noise, the negative of the flow velocity.

Turbo is the distilled variant (8 steps, no guidance: evaluate it with eval_guidance_scale 0 or 1); its LoRAs
train like the base's, and, as with any distilled model, long runs erode the distillation."""

from __future__ import annotations

import torch
from diffusers import ZImagePipeline

from .base import FlowFamily


class ZImage(FlowFamily):
    name = "zimage"
    title = "Z-Image"
    pipeline_class = ZImagePipeline
    pipeline_class_names = ("ZImagePipeline", "ZImageImg2ImgPipeline", "ZImageInpaintPipeline")
    denoiser_name = "transformer"
    # Attention and the SwiGLU MLP of every block (the refiners' too), as ai-toolkit and musubi-tuner target.
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3")
    hub_tag = "z-image"
    lora_key_pattern = r"noise_refiner|context_refiner|feed_forward[._]w[123]"
    kohya_base_model_version = "zimage"
    comfyui_prefix, comfyui_alpha = "diffusion_model", True  # as musubi-tuner and ai-toolkit write, ComfyUI and Diffusers read
    single_file_markers = ("layers.0.adaLN_modulation.0.weight", "cap_embedder.1.weight")
    single_file_components = {}  # Z-Image files hold the transformer; the rest comes from text_encoder_source

    def native_resolution(self) -> int:
        return 1024  # ZImagePipeline's default height and width, whatever the VAE

    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """The pipeline's encoding (template, layer −2, padding dropped: one tensor per caption), as a batch padded
        to its longest caption with a mask (`predict` drops the padding again; the text cache keeps none)."""
        with torch.no_grad():
            embeds, _ = self.pipe.encode_prompt(list(captions), device=self.text_device, do_classifier_free_guidance=False)
        padded = torch.nn.utils.rnn.pad_sequence(embeds, batch_first=True)
        mask = torch.arange(padded.shape[1], device=padded.device)[None] < torch.tensor([len(e) for e in embeds], device=padded.device)[:, None]
        return {"encoder_hidden_states": padded, "text_mask": mask}

    def planning_text(self, batch_size: int) -> dict[str, torch.Tensor]:
        embeds = self.longest_text(batch_size, self.denoiser.config.cap_feat_dim)
        return {"encoder_hidden_states": embeds, "text_mask": self.all_tokens(embeds, torch.bool)}

    def predict(self, noisy_latents, timesteps, text, batch) -> torch.Tensor:
        transformer = self.pipe.transformer
        images = list(noisy_latents.to(transformer.dtype).unsqueeze(2).unbind(dim=0))  # (C, frames=1, H, W) each
        captions = [states[mask] for states, mask in zip(text["encoder_hidden_states"], text["text_mask"])]
        out = transformer(images, (1000 - timesteps) / 1000, captions, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)
