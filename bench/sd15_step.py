"""Seconds per training step and peak memory for an SD 1.5-sized model, run through the real trainer.

The pipeline has SD 1.5's architecture (860M-parameter UNet, 84M VAE, 12-layer CLIP text encoder; the
tokenizer's vocabulary is small, so the text embedding table is too) with random weights, built in code
and saved to a temporary folder, so no hub access is needed. Compare with the figures in the project's
design notes (Diffusers' train_text_to_image_lora.py: about 5.6 s/step and 5.2 GiB at 256 px, batch 1,
rank 4, fp32 on the 2-core CPU machine; the frozen-base floor is about 3.2 s/step).

    .venv/bin/python bench/sd15_step.py [--steps 6] [--resolution 256] [--mixed-precision no|bf16|fp16]
        [--gradient-checkpointing] [--xformers] 2>/dev/null
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from plugin.config import parse_parameters  # noqa: E402
from plugin.main import quiet_libraries  # noqa: E402
from plugin.tiny import offline_clip_tokenizer, write_sample_dataset  # noqa: E402
from plugin.trainer import RunPaths, train  # noqa: E402


def sd15_sized_pipeline() -> StableDiffusionPipeline:
    """SD 1.5's published component configs (the Diffusers defaults are SD 1.5's UNet), random weights."""
    tokenizer = offline_clip_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )  # fmt: skip
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def peak_memory_gib() -> tuple[str, float]:
    if torch.cuda.is_available():
        return "GPU allocated", torch.cuda.max_memory_allocated() / 2**30
    return "process RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--xformers", action="store_true")
    args = parser.parse_args()
    quiet_libraries()
    with tempfile.TemporaryDirectory() as workdir:
        root = Path(workdir)
        started = time.perf_counter()
        model = root / "sd15-sized"
        sd15_sized_pipeline().save_pretrained(model)
        built = time.perf_counter() - started
        cfg = parse_parameters({
            "model_name": str(model), "dataset_name": str(write_sample_dataset(root / "data", size=args.resolution)),
            "output_dir": str(root / "out"), "adaptor_name": "bench", "resolution": args.resolution,
            "train_batch_size": args.batch_size, "max_train_steps": args.steps, "lora_r": 4, "lora_alpha": 4,
            "eval_prompt": "", "mixed_precision": args.mixed_precision, "log_to_tensorboard": False,
            "gradient_checkpointing": args.gradient_checkpointing,
            "enable_xformers_memory_efficient_attention": args.xformers,
        })  # fmt: skip
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        result = train(cfg, RunPaths.for_config(cfg), log=lambda *_: None)
        timed = result.step_seconds[1:] or result.step_seconds  # the first step pays for lazy initialisation
        where, peak = peak_memory_gib()
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
        print(f"device: {device}; torch {torch.__version__}; model built and saved in {built:.0f}s")
        print(
            f"SD 1.5-sized, {args.resolution} px, batch {args.batch_size}, rank 4, precision {args.mixed_precision}, "
            f"checkpointing {args.gradient_checkpointing}, xformers {args.xformers}"
        )
        print(
            f"s/step: median {statistics.median(timed):.3f}, min {min(timed):.3f} over {len(timed)} steps; "
            f"peak memory ({where}): {peak:.2f} GiB"
        )


if __name__ == "__main__":
    main()
