"""Tiny, randomly initialised pipelines of every supported family and a built-in sample dataset.

Everything is built offline from config in code, so the tests and the demo run in seconds on a CPU
without the model hub. The pipelines are real Diffusers pipelines of the right classes (only the sizes
are tiny), so the trainer's code paths are the ones a full-size model would take.

Sizes (32 px images; every VAE downsamples 2x, so latents are 16x16):
  sd    UNet (32, 64) 1 layer/block, cross-attention 32; one CLIP text encoder (hidden 32, 2 layers).
  sdxl  UNet (32, 64) with "text_time" added conditions, cross-attention 64 = 32 + 32 from two CLIPs.
  sd3   SD3 transformer, patch 2, 2 joint layers, inner dim 32, images up to 128 px; two projected
        CLIPs + T5 (d_model 64).
  flux  Flux transformer (guidance-distilled, "dev"-like), 1 double + 1 single block, inner dim 32;
        CLIP (pooled 32) + T5 (d_model 64); VAE latents have 4 channels, packed 2x2 into 16.
  chroma  Chroma transformer as flux's, its approximator 1 layer of 32; T5 (d_model 64) alone.
  qwen_image  Qwen-Image MMDiT, 1 layer of width 32 over 2x2-packed latents; Qwen2.5-VL (text hidden 32,
          2 layers, a 1-layer vision tower); its one-frame video VAE (4 latent channels, 2x).
  flux2  Flux.2 klein (base, not distilled): 1 double + 1 single block of width 32; Qwen3 (hidden 16, 28
          layers: the pipeline stacks layers 9, 18 and 27); a 4-channel Flux.2 VAE (2x) with its batch norm.
  zimage  Z-Image DiT, 1 layer and 1 refiner layer each, width 32; Qwen3 (hidden 32, 2 layers) with a chat
          template; the flux VAE.
  flux_kontext  flux's components, its VAE's scale and shift set to its latents' statistics on sample images.
  qwen_image_edit(_plus)  Qwen-Image's transformer; Qwen2.5-VL with image tokens, read through a Qwen2VLProcessor
          (at most 16 merged patches an image); a VAE that downsamples 8x, as the real one, since the pipelines give
          controls about 1024² pixels, its latents' mean and std set from sample images. (An edit model's VAE is
          normalised as a trained one is: a random one's latents barely differ from image to image, so that a control
          would tell too little to learn.)

Notes for the trainer:
  * LoRA with alpha != r only reloads with the right scale when the adapter metadata is saved:
    pass `unet_lora_adapter_metadata=` / `transformer_lora_adapter_metadata=` (the LoraConfig as a
    dict, see `diffusers.training_utils._collate_lora_metadata`) to `save_lora_weights`.
  * PEFT's "gaussian" init leaves lora_B at zero, so a freshly added adapter changes nothing.
  * SD3 and Flux default to `max_sequence_length` 256 and 512 T5 tokens; the T5 here has relative
    positions, so the defaults work; passing 77 is 2-3x faster.
  * SDXL: if `invisible-watermark` is installed, pass `add_watermarker=False` when reloading, or the
    reloaded pipeline watermarks its images and no longer matches the built one.
  * Frozen parts are in eval mode with dropout 0; the denoiser is also in eval mode (call `.train()`).
  * Flux's default height/width is 128 x the VAE factor = 256 px here: always pass height= and width=
    (SD/SDXL/SD3 default to 32 px from the denoiser's sample_size).
  * `load_lora_weights` logs "No LoRA keys associated to CLIPTextModel..." for denoiser-only LoRAs;
    that is harmless.
  * A saved and reloaded pipeline has bit-identical weights, but its images may differ by ~1e-6:
    the loaded tensors sit at different memory alignments, which changes CPU BLAS summation order.
"""

import json
import math
import random
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    ChromaPipeline,
    ChromaTransformer2DModel,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxKontextPipeline,
    FluxPipeline,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
    FluxTransformer2DModel,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from PIL import Image, ImageDraw
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralVisionConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3Model,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from .errors import ConfigError
from .families.description import without_diffusers_deprecations, without_video

FAMILIES = ("sd", "sdxl", "sd3", "flux", "chroma", "zimage", "qwen_image", "flux2")
VARIANTS = ("sd2-v", "sd35-medium", "flux-schnell", "flux2-dev")  # model variants a family must train as their own kind
EDIT_FAMILIES = ("flux_kontext", "qwen_image_edit", "qwen_image_edit_plus")  # edit models: they train on pairs (write_pair_dataset)
SAMPLE_RESOLUTION = 32
_MAX_TOKENS = 77

_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
_SHAPES = ("circle", "square", "triangle")
_WORDS = (
    *_COLOURS,
    *_SHAPES,
    "a", "an", "on", "of", "the", "and", "in", "with", "background", "photo", "picture", "image",
    "painting", "drawing", "style", "small", "large", "big", "dog", "cat", "sks", "person", "man",
    "woman", "house", "tree", "sky", "car",
)  # fmt: skip


def _bytes_to_unicode() -> list[str]:
    """GPT-2's printable stand-in for every byte, as CLIP's byte-level BPE expects."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """All bytes (so no prompt hits <unk>) plus merges for the common words; <|endoftext|> gets the top id."""
    chars = _bytes_to_unicode()
    tokens = [*chars, *(c + "</w>" for c in chars)]
    merges = []
    for word in _WORDS:
        symbols = [*word[:-1], word[-1] + "</w>"]
        merged = symbols[0]
        for symbol in symbols[1:]:
            merge = (merged, symbol)
            merged += symbol
            if merge not in merges:
                merges.append(merge)
                tokens.append(merged)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def offline_clip_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP BPE tokenizer written from a small vocabulary: no download, 77-token prompts."""
    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(vocab, merges, model_max_length=_MAX_TOKENS)


def _t5_tokenizer() -> T5TokenizerFast:
    """A Unigram vocab: whole common words beat their letters; other text falls back to characters."""
    letters = [chr(c) for c in (*range(ord("a"), ord("z") + 1), *range(ord("A"), ord("Z") + 1))]
    pieces = [
        ("<pad>", 0.0),
        ("</s>", 0.0),
        ("<unk>", 0.0),
        ("▁", -2.0),
        *((f"▁{word}", -3.0) for word in _WORDS),
        *((c, -5.0) for c in [*letters, *"0123456789.,!?'-"]),
    ]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=_MAX_TOKENS)


# Qwen's chat format (Qwen3's template without its tool and thinking branches, which prompts never reach).
_QWEN_CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
                       "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and enable_thinking is false %}"
                       "<think>\n\n</think>\n\n{% endif %}{% endif %}")  # fmt: skip


# Mistral 3's chat format for content lists (system prompt, then the user's text and [IMG] placeholders).
_MISTRAL_CHAT_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ message['content'][0]['text'] }}"
                          "[/SYSTEM_PROMPT]{% else %}[INST]{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
                          "{% else %}[IMG]{% endif %}{% endfor %}[/INST]{% endif %}{% endfor %}")  # fmt: skip


# Qwen2.5-VL's special tokens: the chat markers, and those that place an image in a prompt.
QWEN_VL_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def qwen_tokenizer(specials: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), chat_template: str = _QWEN_CHAT_TEMPLATE) -> Qwen2Tokenizer:
    """Qwen's byte-level BPE (GPT-2 bytes, "Ġ" for a leading space) over the common words, its chat markers as
    special tokens (the first is the padding token), padding on the right as Qwen's tokenizers pad."""
    tokens, merges = list(_bytes_to_unicode()), []
    for word in (*_WORDS, *("Ġ" + w for w in _WORDS)):
        merged = word[0]
        for symbol in word[1:]:
            if (merged, symbol) not in merges:
                merges.append((merged, symbol))
            merged += symbol
            if merged not in tokens:
                tokens.append(merged)
    tokenizer = Qwen2Tokenizer(vocab={t: i for i, t in enumerate(tokens + list(specials))}, merges=merges, chat_template=chat_template,
                               model_max_length=512, unk_token=specials[0], eos_token=specials[0], pad_token=specials[0])  # fmt: skip
    tokenizer.add_special_tokens({"additional_special_tokens": list(specials[1:])})
    return tokenizer


def _mistral_tokenizer() -> Qwen2Tokenizer:
    """The text side of Flux.2 [dev]'s PixtralProcessor: a byte-level BPE with Mistral's control tokens and chat
    format. (The processor itself needs torchvision; see `save_tiny_pipeline` for how the folder names it.)"""
    specials = ("</s>", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]")
    return qwen_tokenizer(specials, _MISTRAL_CHAT_TEMPLATE)


def _mistral3_encoder(tokenizer: Qwen2Tokenizer) -> Mistral3ForConditionalGeneration:
    """Mistral 3 with a 31-layer text model (Flux.2 [dev] stacks its hidden layers 10, 20 and 30) and a one-layer vision tower."""
    text = MistralConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=31, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=4, max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    vision = PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=8, image_size=64, patch_size=16)
    config = Mistral3Config(text_config=text, vision_config=vision, image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2)
    return Mistral3ForConditionalGeneration(config).eval()


def _qwen3_config(tokenizer: Qwen2Tokenizer, hidden_size: int = 32, layers: int = 2) -> Qwen3Config:
    return Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))  # fmt: skip


def _clip_text_encoder(tokenizer: CLIPTokenizer, with_projection: bool, hidden_size: int = 32) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=_MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_class(config).eval()


def _t5_encoder(tokenizer: T5TokenizerFast) -> T5EncoderModel:
    """d_model 64 = two 32-wide CLIPs side by side, which SD3 pads up to the T5 width."""
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return T5EncoderModel(config).eval()


def _vae(latent_channels: int, scaling_factor: float, shift_factor: float | None = None) -> AutoencoderKL:
    """Two blocks: a 2x downsampling keeps 32 px valid for every family's divisibility check.

    SD3/Flux VAEs have a shift factor and no quant convs, like the real ones.
    """
    flow = shift_factor is not None
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=SAMPLE_RESOLUTION,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        force_upcast=False,
        use_quant_conv=not flow,
        use_post_quant_conv=not flow,
    ).eval()


def _unet(cross_attention_dim: int, **extra) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=SAMPLE_RESOLUTION // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        norm_num_groups=8,
        cross_attention_dim=cross_attention_dim,
        **extra,
    ).eval()


def _sd_scheduler(prediction_type: str = "epsilon") -> EulerDiscreteScheduler:
    """SD's training betas (epsilon prediction, or v for SD 2.x-768); Euler samples sensibly in a couple of steps."""
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        timestep_spacing="leading",
        steps_offset=1,
    )


def _build_sd(prediction_type: str = "epsilon") -> StableDiffusionPipeline:
    tokenizer = offline_clip_tokenizer()
    return StableDiffusionPipeline(
        vae=_vae(4, scaling_factor=0.18215),
        text_encoder=_clip_text_encoder(tokenizer, with_projection=False),
        tokenizer=tokenizer,
        unet=_unet(cross_attention_dim=32),
        scheduler=_sd_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl() -> StableDiffusionXLPipeline:
    """Added-condition input = 6 size/crop numbers x addition_time_embed_dim + text_encoder_2's projection."""
    tokenizer, tokenizer_2 = offline_clip_tokenizer(), offline_clip_tokenizer()
    text_encoder = _clip_text_encoder(tokenizer, with_projection=False)
    # Wider than the first, as OpenCLIP bigG is than CLIP-L: single-file loading tells them apart by width.
    text_encoder_2 = _clip_text_encoder(tokenizer_2, with_projection=True, hidden_size=48)
    time_embed_dim = 8
    unet = _unet(
        cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + text_encoder_2.config.projection_dim,
        use_linear_projection=True,
    )
    return StableDiffusionXLPipeline(
        vae=_vae(4, scaling_factor=0.13025),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_sd_scheduler(),
        add_watermarker=False,
    )


def _build_sd3(dual_attention_layers: tuple[int, ...] = (), qk_norm: str | None = None) -> StableDiffusion3Pipeline:
    """SD3 Medium's layout; SD3.5 Medium adds a second image self-attention in its first layers and qk-norm."""
    tokenizer, tokenizer_2, tokenizer_3 = offline_clip_tokenizer(), offline_clip_tokenizer(), _t5_tokenizer()
    text_encoder = _clip_text_encoder(tokenizer, with_projection=True)
    text_encoder_2 = _clip_text_encoder(tokenizer_2, with_projection=True)
    text_encoder_3 = _t5_encoder(tokenizer_3)
    transformer = SD3Transformer2DModel(
        sample_size=SAMPLE_RESOLUTION // 2,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=text_encoder_3.config.d_model,
        caption_projection_dim=32,
        pooled_projection_dim=text_encoder.config.projection_dim + text_encoder_2.config.projection_dim,
        pos_embed_max_size=32,  # positional table for images up to 128 px
        dual_attention_layers=dual_attention_layers,
        qk_norm=qk_norm,
    ).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_vae(4, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


# Flux-derived transformers: one double and one single block of width 32 over 2x2-packed 4-channel latents.
_FLUX_BLOCKS = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                    axes_dims_rope=(4, 6, 6))  # fmt: skip


def _flux_vae() -> AutoencoderKL:
    return _vae(4, scaling_factor=0.3611, shift_factor=0.1159)


def _flow_scheduler(dynamic: bool = True) -> FlowMatchEulerDiscreteScheduler:
    """Flux's sampler settings (shift 3, or resolution-dependent between 0.5 and 1.15); schnell's fixed shift 1."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0 if dynamic else 1.0, use_dynamic_shifting=dynamic,
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)  # fmt: skip


def _build_flux(schnell: bool = False) -> FluxPipeline:
    """Flux packs 2x2 latent patches into tokens, so the transformer sees 4x the VAE's latent channels. Flux
    schnell (`schnell`) has no guidance embedding and a fixed sigma shift of 1."""
    tokenizer, tokenizer_2 = offline_clip_tokenizer(), _t5_tokenizer()
    text_encoder = _clip_text_encoder(tokenizer, with_projection=False)
    text_encoder_2 = _t5_encoder(tokenizer_2)
    transformer = FluxTransformer2DModel(**_FLUX_BLOCKS, joint_attention_dim=text_encoder_2.config.d_model,
                                         pooled_projection_dim=text_encoder.config.hidden_size, guidance_embeds=not schnell)  # fmt: skip
    return FluxPipeline(scheduler=_flow_scheduler(dynamic=not schnell), vae=_flux_vae(), text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer.eval())  # fmt: skip


def _build_chroma() -> ChromaPipeline:
    """Flux's packing and ids; T5 only, read under a mask; the modulation comes from a small approximator."""
    tokenizer = _t5_tokenizer()
    text_encoder = _t5_encoder(tokenizer)
    transformer = ChromaTransformer2DModel(**_FLUX_BLOCKS, joint_attention_dim=text_encoder.config.d_model, approximator_num_channels=16,
                                           approximator_hidden_dim=32, approximator_layers=1)  # fmt: skip
    return ChromaPipeline(scheduler=_flow_scheduler(), vae=_flux_vae(), text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer.eval())


def _build_zimage() -> ZImagePipeline:
    """Z-Image reads Qwen3's hidden states; its text axis of positions must cover the 512-token prompts."""
    tokenizer = qwen_tokenizer()
    text_encoder = Qwen3Model(_qwen3_config(tokenizer)).eval()
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=1, n_refiner_layers=1,
                                           n_heads=2, n_kv_heads=2, cap_feat_dim=text_encoder.config.hidden_size, axes_dims=[4, 6, 6],
                                           axes_lens=[1024, 64, 64])  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)  # Z-Image's static shift
    return ZImagePipeline(scheduler=scheduler, vae=_flux_vae(), text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer.eval())


def _qwen25_vl_encoder(tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL with multimodal RoPE over the text; the vision tower is there (the edit pipelines use it)."""
    specials = dict(bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=2048, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, **specials)  # fmt: skip
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, fullatt_block_indexes=[0])
    vocabulary = tokenizer.get_vocab()  # a text-to-image model's has no image tokens: its prompts hold none
    token = lambda name: vocabulary.get(name, vocabulary["<|im_start|>"])  # noqa: E731
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=token("<|image_pad|>"), video_token_id=token("<|video_pad|>"),
                              vision_start_token_id=token("<|vision_start|>"), **specials)  # fmt: skip
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _build_qwen_image() -> QwenImagePipeline:
    """Qwen-Image's VAE is a causal video VAE read one frame at a time; its latents are normalised per channel."""
    tokenizer = qwen_tokenizer()
    text_encoder = _qwen25_vl_encoder(tokenizer)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
                                              joint_attention_dim=text_encoder.config.text_config.hidden_size, axes_dims_rope=(4, 6, 6))  # fmt: skip
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 1.2, 2.0])  # fmt: skip
    # Qwen-Image's sampler: μ = log 3 at every size (base and max shift equal), applied as an exponential time shift.
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=math.log(3),
                                                max_shift=math.log(3), base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                                                time_shift_type="exponential")  # fmt: skip
    return QwenImagePipeline(scheduler=scheduler, vae=vae.eval(), text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer.eval())


def _build_qwen_image_edit(plus: bool = False) -> QwenImageEditPipeline | QwenImageEditPlusPipeline:
    """Qwen-Image-Edit (Plus: several references): Qwen-Image whose Qwen2.5-VL also sees the controls, through a
    Qwen2VLProcessor (without the video side, which needs torchvision) that reads at most 16 merged patches an
    image. The pipelines resize a control to about 1024² pixels whatever the output's size, so this VAE
    downsamples 8x, as the real one does, and a control is 4096 tokens rather than 65536."""
    tokenizer = qwen_tokenizer(QWEN_VL_SPECIALS)
    text_encoder = _qwen25_vl_encoder(tokenizer)
    images = Qwen2VLImageProcessorPil(size={"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 16})
    processor = without_video(Qwen2VLProcessor)(image_processor=images, tokenizer=tokenizer)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
                                              joint_attention_dim=text_encoder.config.text_config.hidden_size, axes_dims_rope=(4, 6, 6))  # fmt: skip
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, False, False]).eval()
    mean, std = _latent_statistics(lambda pixels: vae.encode(pixels.unsqueeze(2)).latent_dist.mode()[:, :, 0])
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    pipeline = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    return pipeline(scheduler=_build_qwen_image().scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, processor=processor,
                    transformer=transformer.eval())  # fmt: skip


def _build_flux_kontext() -> FluxKontextPipeline:
    """Flux's components, its VAE's latents normalised as an edit model's must be (see `_latent_statistics`)."""
    components = _build_flux().components
    vae = components["vae"]
    mean, std = _latent_statistics(lambda pixels: vae.encode(pixels).latent_dist.mode())
    vae.register_to_config(shift_factor=mean.mean().item(), scaling_factor=1.0 / std.mean().item())
    return FluxKontextPipeline(**components)


def _latent_statistics(encode) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of `encode`'s latents of 32 sample images. A trained VAE's config normalises its
    latents to about unit variance; a random one's vary from image to image by a few hundredths of the noise, so
    that nothing an image holds (an edit model's control) would be worth learning. The edit models' VAEs are
    normalised by these, as a trained VAE is by its own."""
    rng = random.Random(0)
    pixels = torch.stack([torch.from_numpy(np.asarray(_sample(rng, 64)[0], dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1) for _ in range(32)])
    with torch.no_grad():
        latents = encode(pixels)
    return latents.mean(dim=(0, 2, 3)), latents.std(dim=(0, 2, 3))


def _build_flux2(dev: bool = False) -> Flux2KleinPipeline | Flux2Pipeline:
    """Flux.2 klein (or [dev], `dev`: Mistral 3 reads the prompt, and guidance is a distilled input): the transformer
    denoises 2x2-patchified latents (4 channels -> 16), normalised by the VAE's batch norm over those 16 channels,
    whose statistics are set here as a trained VAE would have them."""
    tokenizer = _mistral_tokenizer() if dev else qwen_tokenizer()
    text_encoder = _mistral3_encoder(tokenizer) if dev else Qwen3ForCausalLM(_qwen3_config(tokenizer, hidden_size=16, layers=28)).eval()
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                          joint_attention_dim=3 * 16, timestep_guidance_channels=256, axes_dims_rope=(4, 4, 4, 4),
                                          guidance_embeds=dev)  # fmt: skip
    vae = AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32),
                             layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=SAMPLE_RESOLUTION)  # fmt: skip
    with torch.no_grad():  # a trained model's time embedding is large enough to open the blocks' gates; a random one is not
        for linear in (transformer.time_guidance_embed.timestep_embedder.linear_1, transformer.time_guidance_embed.timestep_embedder.linear_2):
            linear.weight.mul_(4.0)
    vae.bn.running_mean.uniform_(-0.3, 0.3)
    vae.bn.running_var.uniform_(0.5, 2.0)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential")
    pipeline = Flux2Pipeline if dev else Flux2KleinPipeline
    return pipeline(scheduler=scheduler, vae=vae.eval(), text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer.eval())


def build_tiny_pipeline(family: str, seed: int = 0) -> DiffusionPipeline:
    """A tiny random pipeline of `family` (or of a model variant in VARIANTS); the same seed gives the same
    weights, the caller's RNG is untouched."""
    builders = {"sd": _build_sd, "sdxl": _build_sdxl, "sd3": _build_sd3, "flux": _build_flux, "chroma": _build_chroma,
                "zimage": _build_zimage,
                "qwen_image": _build_qwen_image,
                "flux2": _build_flux2,
                "flux2-dev": lambda: _build_flux2(dev=True),
                "sd2-v": lambda: _build_sd("v_prediction"), "sd35-medium": lambda: _build_sd3((0,), "rms_norm"),
                "flux-schnell": lambda: _build_flux(schnell=True),
                "flux_kontext": _build_flux_kontext,
                "qwen_image_edit": _build_qwen_image_edit, "qwen_image_edit_plus": lambda: _build_qwen_image_edit(plus=True)}  # fmt: skip
    if family not in builders:
        raise ConfigError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES + VARIANTS + EDIT_FAMILIES)}")
    with torch.random.fork_rng(devices=[]), without_diffusers_deprecations():
        torch.manual_seed(seed)
        pipe = builders[family]()
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Components a real model's folder names by a class the tiny one cannot build here: Flux.2 [dev]'s tokenizer folder
# holds Mistral 3's PixtralProcessor, which needs torchvision; the tiny folder holds its tokenizer under that name.
_FOLDER_CLASSES = {"flux2-dev": {"tokenizer": ["transformers", "PixtralProcessor"]}}


def save_tiny_pipeline(family: str, folder, seed: int = 0) -> Path:
    """Saves a tiny pipeline in the Diffusers folder layout, so it loads like any local model."""
    folder = Path(folder)
    build_tiny_pipeline(family, seed).save_pretrained(folder)
    if family in _FOLDER_CLASSES:
        index = json.loads((folder / "model_index.json").read_text())
        (folder / "model_index.json").write_text(json.dumps({**index, **_FOLDER_CLASSES[family]}, indent=2))
    return folder


def _sample(rng: random.Random, size: int) -> tuple[Image.Image, str]:
    """One shape of one colour on a different-coloured background, and its caption."""
    shape = rng.choice(_SHAPES)
    colour, background = rng.sample(list(_COLOURS), 2)
    image = Image.new("RGB", (size, size), _COLOURS[background])
    half = rng.randint(size // 5, size // 3)
    cx, cy = (rng.randint(half, size - half) for _ in range(2))
    box = (cx - half, cy - half, cx + half, cy + half)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=_COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=_COLOURS[colour])
    else:
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=_COLOURS[colour])
    return image, f"a {colour} {shape} on a {background} background"


def write_sample_dataset(folder, n: int = 8, size: int = 64, seed: int = 0) -> Path:
    """Writes an "imagefolder" dataset (PNGs + metadata.jsonl with file_name/text) of captioned shapes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        image, caption = _sample(rng, size)
        file_name = f"{i:04d}.png"
        image.save(folder / file_name)
        rows.append(json.dumps({"file_name": file_name, "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def write_pair_dataset(folder, n: int = 8, size: int = 64, seed: int = 0, control_dir: bool = True) -> Path:
    """An edit dataset whose targets can only be learnt from their controls: each target is its control (a captioned
    shape) mirrored left to right, under one instruction. With `control_dir` the controls are files of the
    targets' names in `folder`/controls (kohya's layout; the targets are a metadata.jsonl imagefolder); else the
    metadata's `control_image` column names them."""
    folder = Path(folder)
    (folder / "controls").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        control, _ = _sample(rng, size)
        file_name = f"{i:04d}.png"
        control.save(folder / "controls" / file_name)
        control.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / file_name)
        rows.append({"file_name": file_name, "text": "mirror the picture", **({} if control_dir else {"control_image": f"controls/{file_name}"})})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder
