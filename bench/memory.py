"""Peak memory and seconds per step of the real trainer with a quantised frozen base, against the unquantised
base, on full-size architectures with random weights (built in code: no hub).

CPU: an SD 1.5-sized pipeline at 256 px and a slice of Flux-dev at full width (3 double and 6 single blocks,
1.9B parameters; one-layer text encoders) at 128 px, batch 1, rank 4, bf16 weights, caches on; the peak RSS
while training (and the whole run's, loading included). Target: int8 <= 0.55x the bf16 run for the Flux
slice; SD 1.5's UNet is mostly convolutions, which stay unquantised, so its row has none. Flux-dev at
its full depth (19 double and 38 single blocks) and a third of its width (8 heads, 1.3B), fp32, with
gradient checkpointing as in examples/flux_dev_sharded.json, trains in two processes (gloo), whole and with
shard_base_model: the peak is the larger process's, the target sharded <= 0.75x whole. Full depth because
a sharded process also holds the few blocks it has gathered (its next one is gathered while it computes),
which must be a small part of the model, as they are in Flux-dev (57 blocks).
CUDA (with --gpu): also a Flux-dev-sized transformer (the real config, 12B parameters) with real-size
T5-XXL and CLIP-L, and an SDXL-sized pipeline, at 1024 px, batch 1, rank 16, gradient checkpointing, caches
on; peak torch.cuda.max_memory_allocated. Targets: Flux int8 <= 16 GiB, nf4 <= 10 GiB, bf16 <= 30 GiB;
SDXL int8 <= 8 GiB. Building and saving the Flux-sized model writes about 35 GB to the temporary folder.

Every case runs in its own process (a peak belongs to one run), the cases alternate over --repeats rounds
(this machine is noisy) and the table shows medians and the ratio to the unquantised run:

    .venv/bin/python bench/memory.py [--repeats 2] [--steps 4] [--gpu] [--models flux-slice ...] 2>/dev/null
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from sd15_step import sd15_sized_pipeline  # noqa: E402

from plugin.config import parse_parameters  # noqa: E402
from plugin.main import quiet_libraries  # noqa: E402
from plugin.tiny import offline_clip_tokenizer, write_sample_dataset  # noqa: E402
from plugin.trainer import RunPaths, train  # noqa: E402

# Two processes sharding the narrow Flux's 5.3 GB fp32 transformer each drop half of it, about 30 % of what each holds.
# fp32: bf16 is 5x (linear) to 100x (convolution) slower than fp32 on CPUs without AVX-512, too slow for two processes here
SHARDED_TARGET = 0.75
# model -> (resolution, LoRA rank, settings of every case, cases as (label, settings, target)); a target is
# ("x", ratio to the model's first case) or ("GiB", peak), or None
# SD 1.5's UNet is 69 % convolutions, which no weight-only quantiser here handles: int8 reaches its linear 31 %
# only, so it has no target; a Flux transformer is linear layers, and its slice carries the 0.55x.
CPU_CASES = {
    "sd15": (256, 4, {"mixed_precision": "bf16"}, [("bf16", {}, None), ("int8", {"base_quantization": "int8"}, None)]),
    "flux-slice": (128, 4, {"mixed_precision": "bf16"}, [("bf16", {}, None), ("int8", {"base_quantization": "int8"}, ("x", 0.55))]),
    "flux-narrow-fp32": (128, 4, {"mixed_precision": "no", "gradient_checkpointing": True}, [("2 processes", {"processes": 2}, None),
                        ("2 processes, sharded", {"processes": 2, "shard_base_model": True}, ("x", SHARDED_TARGET))]),
}  # fmt: skip
GPU_CASES = {
    "flux-dev": (1024, 16, {"mixed_precision": "bf16", "gradient_checkpointing": True},
                 [("bf16", {}, ("GiB", 30)), ("int8", {"base_quantization": "int8", "quantize_text_encoders": True}, ("GiB", 16)),
                  ("nf4", {"base_quantization": "nf4", "quantize_text_encoders": True}, ("GiB", 10))]),
    "sdxl": (1024, 16, {"mixed_precision": "bf16", "gradient_checkpointing": True},
             [("bf16", {}, None), ("int8", {"base_quantization": "int8"}, ("GiB", 8))]),
}  # fmt: skip


def flux_dev_sized_pipeline(double_blocks: int = 19, single_blocks: int = 38, text_layers: tuple[int, int] = (12, 24), heads: int = 24):
    """FluxTransformer2DModel's defaults are Flux.1-dev's config (plus the guidance embedding dev has);
    T5-XXL and CLIP-L at their real sizes; the tokenizers' vocabularies are small, so their embedding tables are.
    Fewer blocks, heads (of 128 channels) and text-encoder layers give a slice of it, for the CPU."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from plugin.tiny import _t5_tokenizer

    clip_tokenizer, t5_tokenizer = offline_clip_tokenizer(), _t5_tokenizer()
    return FluxPipeline(
        transformer=FluxTransformer2DModel(num_layers=double_blocks, num_single_layers=single_blocks, num_attention_heads=heads,
                                           guidance_embeds=True),
        text_encoder=CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tokenizer), hidden_size=768, intermediate_size=3072,
                                                  num_hidden_layers=text_layers[0], num_attention_heads=12, max_position_embeddings=77)),
        text_encoder_2=T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=4096, d_ff=10240, d_kv=64, num_layers=text_layers[1],
                                               num_heads=64, feed_forward_proj="gated-gelu")),
        tokenizer=clip_tokenizer, tokenizer_2=t5_tokenizer,
        vae=AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                          block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                          scaling_factor=0.3611, shift_factor=0.1159),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
    )  # fmt: skip


def sdxl_sized_pipeline():
    """SDXL base's UNet config, CLIP-L and OpenCLIP bigG text encoders at their real sizes."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = offline_clip_tokenizer(), offline_clip_tokenizer()
    clip = dict(vocab_size=len(tokenizer), max_position_embeddings=77)
    return StableDiffusionXLPipeline(
        unet=UNet2DConditionModel(sample_size=128, block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                  attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                                  addition_embed_type="text_time", addition_time_embed_dim=256,
                                  projection_class_embeddings_input_dim=2816),
        text_encoder=CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, **clip)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                                  num_attention_heads=20, projection_dim=1280, hidden_act="gelu", **clip)),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        vae=AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                          block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, scaling_factor=0.13025),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1),
    )  # fmt: skip


BUILDERS = {"sd15": sd15_sized_pipeline, "flux-dev": flux_dev_sized_pipeline, "sdxl": sdxl_sized_pipeline,
            "flux-slice": lambda: flux_dev_sized_pipeline(double_blocks=3, single_blocks=6, text_layers=(1, 1)),
            "flux-narrow-fp32": lambda: flux_dev_sized_pipeline(text_layers=(1, 1), heads=8)}  # fmt: skip


class TrainingRss(threading.Thread):
    """The process's peak resident memory once training has begun (the run's metrics file exists), sampled
    every 10 ms. The whole run's peak (VmHWM) is reported beside it: loading maps each weight file and reads
    every page of it, and while the full-precision weights are being quantised both copies are resident."""

    def __init__(self, metrics: Path):
        super().__init__(daemon=True)
        self.metrics, self.peak, self.running = metrics, 0, True

    def run(self) -> None:
        while self.running:
            if self.metrics.exists():
                self.peak = max(self.peak, _status_kib("VmRSS"))
            time.sleep(0.01)

    def stop(self) -> float:
        self.running = False
        self.join()
        return self.peak / 2**20


def _status_kib(field: str) -> int:
    return int(Path("/proc/self/status").read_text().split(f"{field}:")[1].split()[0])


def one_run(model: Path, data: Path, out: Path, resolution: int, rank: int, settings: dict, steps: int) -> dict:
    """Train in this process (into the fresh folder `out`): peak memory in GiB (the GPU's, or the process's
    while training and over the whole run) and the median seconds per step after the first."""
    quiet_libraries()
    sampler = TrainingRss(out / "bench" / "logs" / "metrics.jsonl")
    sampler.start()
    cfg = parse_parameters({
        "model_name": str(model), "dataset_name": str(data), "output_dir": str(out), "adaptor_name": "bench",
        "resolution": resolution, "train_batch_size": 1, "max_train_steps": steps,
        "lora_r": rank, "lora_alpha": rank, "eval_prompt": "", "log_to_tensorboard": False, **settings,
    })  # fmt: skip
    result = train(cfg, RunPaths.for_config(cfg), log=lambda *_: None)
    timed = result.step_seconds[1:] or result.step_seconds  # the first step pays for lazy initialisation
    training = sampler.stop()
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else training
    return {"peak_gib": peak, "run_peak_rss_gib": _status_kib("VmHWM") / 2**20, "seconds_per_step": statistics.median(timed)}


def launcher(processes: int) -> list[str]:
    """The command that runs a script in `processes` processes: Python itself, or accelerate launch (gloo)."""
    if processes == 1:
        return [sys.executable]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29561"]  # fmt: skip


def measure(name: str, spec: tuple, root: Path, repeats: int, steps: int) -> list[str]:
    """Build and save the model once, run its cases alternately in fresh processes, and format the rows."""
    resolution, rank, common, cases = spec
    started = time.perf_counter()
    model = root / name
    BUILDERS[name]().to(torch.bfloat16).save_pretrained(model)
    data = write_sample_dataset(root / f"data-{resolution}", n=4, size=resolution)
    print(f"{name}: built and saved in {time.perf_counter() - started:.0f} s", flush=True)
    figures = {label: [] for label, _, _ in cases}
    for round_ in range(repeats):
        for label, settings, _ in cases:
            # one disk cache for every case: bf16 convolutions are 100-500x slower than fp32 on CPUs without AVX-512,
            # so encoding the latents in each case would take minutes; training-phase memory starts after it
            settings = {**common, "cache_dir": str(root / f"cache-{name}"), **settings}
            processes = settings.pop("processes", 1)
            job = json.dumps([str(model), str(data), str(root / f"out-{name}-{label}-{round_}"), resolution, rank, settings, steps])
            done = subprocess.run(launcher(processes) + [__file__, "--one", job], capture_output=True, text=True,
                                  env={**os.environ, "ACCELERATE_USE_CPU": "1"} if processes > 1 else None)  # fmt: skip
            if done.returncode:
                raise RuntimeError(f"{name} {label} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
            each = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]  # a line per process
            figures[label].append({key: max(f[key] for f in each) for key in each[0]})
    rows, baseline = [], statistics.median(f["peak_gib"] for f in figures[cases[0][0]])
    for label, _, target in cases:
        peak = statistics.median(f["peak_gib"] for f in figures[label])
        seconds = statistics.median(f["seconds_per_step"] for f in figures[label])
        verdict = ""
        if target is not None:
            unit, bound = target
            verdict = f"target <= {bound:g}{unit}: {'met' if (peak / baseline if unit == 'x' else peak) <= bound else 'MISSED'}"
        whole = statistics.median(f["run_peak_rss_gib"] for f in figures[label])
        rows.append(f"| {name} {resolution}px | {label} | {peak:.2f} | {peak / baseline:.2f} | {whole:.2f} | {seconds:.2f} | {verdict} |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--gpu", action="store_true", help="also the Flux-dev- and SDXL-sized cases (CUDA)")
    parser.add_argument("--models", nargs="+", choices=list(BUILDERS), help="only these models' cases")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a single case, in a child process
    args = parser.parse_args()
    if args.one:
        model, data, out, resolution, rank, settings, steps = json.loads(args.one)
        print(json.dumps(one_run(Path(model), Path(data), Path(out), resolution, rank, settings, steps)))
        return 0
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs CUDA")
    specs = {name: spec for name, spec in {**CPU_CASES, **(GPU_CASES if args.gpu else {})}.items() if name in (args.models or BUILDERS)}
    where = "GPU allocated" if torch.cuda.is_available() else "RSS while training"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {device}; torch {torch.__version__}; {args.repeats} alternating rounds of {args.steps} steps")
    rows = [f"| model | base | peak {where}, GiB | x the first row | whole run's peak RSS, GiB | s/step | |", "|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as workdir:
        for name, spec in specs.items():
            rows += measure(name, spec, Path(workdir), args.repeats, args.steps)
    print("\n".join(rows))
    return 1 if any("MISSED" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
