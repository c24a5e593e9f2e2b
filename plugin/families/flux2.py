"""Flux.2 ([dev] and klein): a Flux-style transformer over 2x2-patchified VAE latents normalised by the VAE's
batch-norm statistics, with 4-axis position ids (time, row, column, layer) for image and text tokens. The prompt,
padded to 512 tokens and used unmasked, is read by Mistral 3 with BFL's system prompt (hidden layers 10, 20 and
30, stacked) on [dev], which also takes a distilled guidance input, and by Qwen3 in its chat template (layers
9, 18 and 27) on klein. Klein's distilled releases (is_distilled) sample in a few steps without guidance; its
base ones with guidance against an empty prompt. [dev]'s prompt path needs only the processor's tokenizer: its
image processor loads without torchvision (transformers' PIL one)."""

from __future__ import annotations

import inspect

import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline

from ..cache import CONTROLS
from .base import FlowFamily
from .original_layout import FLUX2_LORA_MODULES


class Flux2(FlowFamily):
    name = "flux2"
    title = "Flux.2"
    pipeline_class = Flux2KleinPipeline  # per model: see __init__
    pipeline_class_names = ("Flux2Pipeline", "Flux2KleinPipeline", "Flux2KleinInpaintPipeline")
    denoiser_name = "transformer"
    # Both streams' attention and MLPs, and the single blocks' fused input projection.
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                            "linear_in", "linear_out", "to_qkv_mlp_proj")  # fmt: skip
    hub_tag = "flux2"
    eval_negative_prompts = False  # the pipelines guide against an empty prompt, or by distilled guidance
    lora_key_pattern = r"single_stream_modulation|to_qkv_mlp_proj"
    kohya_base_model_version = "flux2"
    # Its community file is kohya's, by BFL's module names (q/k/v fused), which ComfyUI and Diffusers read.
    kohya_prefixes = {"transformer": "lora_unet"}
    original_lora_modules = FLUX2_LORA_MODULES
    swapped_lora_modules = ("final_layer.adaLN_modulation.1",)
    # Flux.2 files share Flux.1's double-block names; the shared single-stream modulation is its own.
    single_file_markers = ("double_blocks.0.img_attn.qkv.weight", "single_stream_modulation.lin.weight")
    single_file_components = {}  # Flux.2 files hold the transformer; the rest comes from text_encoder_source
    control_images = 10  # reference images, as many as BFL's Flux.2 reads
    controls_optional = True  # text to image without them; on pairs where the datasets give references

    def __init__(self, description):
        super().__init__(description)
        if (description.components.get("text_encoder") or "").startswith("Mistral3"):
            self.pipeline_class = Flux2Pipeline  # [dev]; both pipelines save and load adapters alike (Flux2LoraLoaderMixin)

    @property
    def denoiser_input_channels(self) -> int:
        return 4 * self.latent_channels  # 2x2 patches in channels

    def latent_shape(self, batch_size: int, height: int, width: int) -> tuple[int, ...]:
        return batch_size, 4 * self.latent_channels, height // (2 * self.vae_scale_factor), width // (2 * self.vae_scale_factor)

    def control_size(self, width: int, height: int) -> tuple[int, int]:
        """As training sees it, enlarged where a side is under the 64 px the pipelines require of a reference."""
        width, height = super().control_size(width, height)
        scale = max(1, -(-64 // min(width, height)))
        return width * scale, height * scale

    def native_resolution(self) -> int:
        return 128 * self.vae_scale_factor  # the pipelines' default_sample_size, in latents

    def sampling_mu(self, tokens: int) -> float:
        """The pipelines' empirical μ, which also depends on the step count: at their default step count."""
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        steps = inspect.signature(self.pipeline_class.__call__).parameters["num_inference_steps"].default
        return compute_empirical_mu(image_seq_len=tokens, num_steps=steps)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The posterior mean, patchified 2x2 and normalised by the VAE's batch-norm statistics, as the
        pipelines encode reference images: the space the transformer denoises in."""
        vae = self.pipe.vae
        with torch.no_grad():
            latents = self.pipeline_class._patchify_latents(vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist.mode())
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.device, latents.dtype)
        return ((latents - mean) / std).float().contiguous()

    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            embeds, _ = self.pipe.encode_prompt(list(captions), device=self.text_device)
        return {"encoder_hidden_states": embeds}

    def planning_text(self, batch_size: int) -> dict[str, torch.Tensor]:
        return {"encoder_hidden_states": self.longest_text(batch_size, self.denoiser.config.joint_attention_dim)}

    def predict(self, noisy_latents, timesteps, text, batch) -> torch.Tensor:
        transformer, pipeline = self.pipe.transformer, self.pipeline_class
        batch_size, channels, height, width = noisy_latents.shape
        guidance = None
        if transformer.config.guidance_embeds:  # [dev]: the value training fixes, as for Flux.1-dev
            guidance = torch.full((batch_size,), self.cfg.guidance_scale, device=transformer.device)
        states = text["encoder_hidden_states"]
        tokens = pipeline._pack_latents(noisy_latents.to(transformer.dtype))
        ids = pipeline._prepare_latent_ids(noisy_latents).to(noisy_latents.device)
        if CONTROLS in text:  # reference images: their tokens follow, at time coordinates 10, 20, ... (prepare_image_latents)
            references = list(text[CONTROLS].to(transformer.dtype).unbind(dim=1))
            tokens = torch.cat([tokens, *map(pipeline._pack_latents, references)], dim=1)
            reference_ids = pipeline._prepare_image_ids([reference[:1] for reference in references]).to(ids.device)
            ids = torch.cat([ids, reference_ids.expand(batch_size, -1, -1)], dim=1)
        out = transformer(
            hidden_states=tokens,
            timestep=timesteps / 1000,
            guidance=guidance,
            encoder_hidden_states=states,
            txt_ids=pipeline._prepare_text_ids(states).to(states.device),
            img_ids=ids,
            return_dict=False,
        )[0]
        return out[:, : height * width].permute(0, 2, 1).reshape(batch_size, channels, height, width)

