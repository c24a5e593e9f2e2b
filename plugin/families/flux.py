"""Flux: CLIP-L (pooled) and T5 text encoders, a transformer over 2x2-packed latent patches with positional
image/text ids, a distilled guidance embedding on dev models, and flow matching with a resolution-dependent
shift."""

from __future__ import annotations

import torch
from diffusers import FluxPipeline

from .base import FlowFamily
from .original_layout import FLUX_LORA_MODULES


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): each 2x2 latent patch becomes one token, as FluxPipeline does."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of pack_latents for a latent of the given height and width."""
    b, _, channels = tokens.shape
    patches = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels // 4, height, width)


def latent_image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """(H/2 * W/2, 3) positional ids of the packed tokens: (0, row, column)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def text_ids(length: int, device, dtype) -> torch.Tensor:
    """(length, 3) positional ids of the text tokens: all zero, as FluxPipeline.encode_prompt makes them.
    Built here rather than carried with the embeddings, so every entry of a text encoding is per caption
    (what the text cache stores)."""
    return torch.zeros(length, 3, device=device, dtype=dtype)


class Flux(FlowFamily):
    name = "flux"
    title = "Flux"
    pipeline_class = FluxPipeline
    pipeline_class_names = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline")
    denoiser_name = "transformer"
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    hub_tag = "flux"
    eval_negative_prompts = False  # FluxPipeline ignores one unless true_cfg_scale is set: distilled guidance
    lora_key_pattern = r"single_transformer_blocks|single_blocks|double_blocks"
    kohya_base_model_version = "flux1"
    single_file_markers = ("double_blocks.0.img_attn.qkv.weight",)
    single_file_components = {}  # Flux files hold the transformer; the rest comes from text_encoder_source
    diffusers_flux_width = 3072  # the inner width Diffusers' conversion of BFL files assumes (Flux.1's)
    kohya_prefixes = {"transformer": "lora_unet", "text_encoder": "lora_te1"}  # the transformer by its original names
    original_lora_modules = FLUX_LORA_MODULES
    fused_lora_widths = {"single_blocks.{i}.linear1": (1, 1, 1, 4)}  # the MLP is 4 times as wide
    swapped_lora_modules = ("final_layer.adaLN_modulation.1",)

    @classmethod
    def single_file_to_diffusers(cls, checkpoint: dict, config, convert) -> dict:
        """Diffusers' conversion cuts each single block's fused q/k/v/MLP projection at Flux.1's width; a file of
        another width (a distilled or test model) is cut at its own, with meta stand-ins for the conversion."""
        checkpoint = {k.removeprefix("model.diffusion_model."): v for k, v in checkpoint.items()}
        width = checkpoint["img_in.weight"].shape[0]
        if width == cls.diffusers_flux_width:
            return convert(checkpoint=checkpoint, config=config)
        pieces = {}
        for key in [k for k in checkpoint if k.startswith("single_blocks.") and ".linear1." in k]:
            fused = checkpoint[key]
            block, kind = key.split(".")[1], key.rsplit(".", 1)[1]
            sizes = (width, width, width, fused.shape[0] - 3 * width)
            names = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
            pieces.update({f"single_transformer_blocks.{block}.{name}.{kind}": piece for name, piece in zip(names, fused.split(sizes))})
            stand_in = 7 * cls.diffusers_flux_width  # q, k, v and the 4x-wide MLP input, as Diffusers splits them
            checkpoint[key] = torch.empty((stand_in, *fused.shape[1:]), dtype=fused.dtype, device="meta")
        return {**convert(checkpoint=checkpoint, config=config), **pieces}

    @property
    def denoiser_input_channels(self) -> int:
        return 4 * self.latent_channels  # 2x2 patches packed into channels

    def native_resolution(self) -> int:
        """FluxPipeline's default_sample_size (128 latents; Flux transformers have no sample_size)."""
        return 128 * self.vae_scale_factor

    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            embeds, pooled, _ = self.pipe.encode_prompt(captions, None, device=self.text_device)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def predict(self, noisy_latents, timesteps, text, batch) -> torch.Tensor:
        transformer = self.pipe.transformer
        batch_size, _, height, width = noisy_latents.shape
        tokens, ids = self.image_tokens(noisy_latents.to(transformer.dtype), text)
        out = transformer(
            hidden_states=tokens,
            timestep=timesteps / 1000,  # the transformer scales by 1000 itself
            encoder_hidden_states=text["encoder_hidden_states"],
            txt_ids=text_ids(text["encoder_hidden_states"].shape[1], transformer.device, transformer.dtype),
            img_ids=ids,
            **self.text_conditioning(text, batch_size, tokens.shape[1]),
            return_dict=False,
        )[0]
        return unpack_latents(out[:, : (height // 2) * (width // 2)], height, width)  # the noisy latents' tokens come first

    def image_tokens(self, latents: torch.Tensor, text: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed tokens the transformer denoises and their position ids (an edit model appends its controls')."""
        _, _, height, width = latents.shape
        return pack_latents(latents), latent_image_ids(height, width, latents.device, latents.dtype)

    def text_conditioning(self, text: dict, batch_size: int, image_tokens: int) -> dict:
        """The transformer inputs besides the T5 tokens: the pooled CLIP embedding, and on dev models the
        distilled guidance (the value training fixes, `guidance_scale`)."""
        transformer = self.pipe.transformer
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((batch_size,), self.cfg.guidance_scale, device=transformer.device)
        return {"guidance": guidance, "pooled_projections": text["pooled_projections"]}
