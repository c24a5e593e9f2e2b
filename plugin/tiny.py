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
import random
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image, ImageDraw
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from .errors import ConfigError

FAMILIES = ("sd", "sdxl", "sd3", "flux")
VARIANTS = ("sd2-v", "sd35-medium", "flux-schnell")  # model variants a family must train as their own kind
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


def _build_flux(schnell: bool = False) -> FluxPipeline:
    """Flux packs 2x2 latent patches into tokens, so the transformer sees 4x the VAE's latent channels. Flux
    schnell (`schnell`) has no guidance embedding and a fixed sigma shift of 1."""
    tokenizer, tokenizer_2 = offline_clip_tokenizer(), _t5_tokenizer()
    text_encoder = _clip_text_encoder(tokenizer, with_projection=False)
    text_encoder_2 = _t5_encoder(tokenizer_2)
    latent_channels = 4
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=text_encoder_2.config.d_model,
        pooled_projection_dim=text_encoder.config.hidden_size,
        guidance_embeds=not schnell,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0 if schnell else 3.0,
        use_dynamic_shifting=not schnell,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=_vae(latent_channels, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def build_tiny_pipeline(family: str, seed: int = 0) -> DiffusionPipeline:
    """A tiny random pipeline of `family` (or of a model variant in VARIANTS); the same seed gives the same
    weights, the caller's RNG is untouched."""
    builders = {"sd": _build_sd, "sdxl": _build_sdxl, "sd3": _build_sd3, "flux": _build_flux,
                "sd2-v": lambda: _build_sd("v_prediction"), "sd35-medium": lambda: _build_sd3((0,), "rms_norm"),
                "flux-schnell": lambda: _build_flux(schnell=True)}  # fmt: skip
    if family not in builders:
        raise ConfigError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES + VARIANTS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = builders[family]()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(family: str, folder, seed: int = 0) -> Path:
    """Saves a tiny pipeline in the Diffusers folder layout, so it loads like any local model."""
    folder = Path(folder)
    build_tiny_pipeline(family, seed).save_pretrained(folder)
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
