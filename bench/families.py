"""Training speed of every family on its tiny pipeline, across precision and memory options.

On a CUDA machine this is also the check of the GPU paths: bf16 and fp16 (loss scaling) autocast,
gradient checkpointing and xFormers, each run end to end (train, render eval images, save, reload the
adapter into a fresh fp32 pipeline). Prints one row per run; a case fails when it crashes, its loss does not
fall or its adapter does not reload and change the image, and any failure makes the exit status 1.
GPU memory is torch.cuda.max_memory_allocated (tensors only; nvidia-smi also counts the caching allocator's
reserve and the CUDA context):

    .venv/bin/python bench/families.py [--steps 30] [--families sd,sdxl,sd3,flux] 2>/dev/null
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from plugin.config import parse_parameters  # noqa: E402
from plugin.families import load_model  # noqa: E402
from plugin.main import quiet_libraries  # noqa: E402
from plugin.tiny import FAMILIES, SAMPLE_RESOLUTION, save_tiny_pipeline, write_sample_dataset  # noqa: E402
from plugin.trainer import RunPaths, train  # noqa: E402


def variants(cuda: bool) -> list[dict]:
    """Option sets worth timing here: fp16, xFormers, nf4 and 8-bit AdamW only exist on CUDA."""
    runs = [{"mixed_precision": "no"}, {"mixed_precision": "bf16"}, {"mixed_precision": "bf16", "gradient_checkpointing": True},
            {"mixed_precision": "bf16", "base_quantization": "int8", "gradient_checkpointing": True}]
    if cuda:
        runs += [{"mixed_precision": "fp16"}, {"mixed_precision": "bf16", "enable_xformers_memory_efficient_attention": True},
                 {"mixed_precision": "bf16", "base_quantization": "nf4", "quantize_text_encoders": True, "optimizer": "adamw_8bit"},
                 {"mixed_precision": "bf16", "base_quantization": "fp8", "offload_text_encoders": True, "cache_text_embeddings": False}]
    return runs


def adapter_reloads(model: Path, adapter_dir: Path, prompt: str) -> bool:
    """The saved adapter loads into a fresh fp32 pipeline and changes its image."""
    family = load_model(str(model), torch.float32)
    pipe = family.pipe
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 2, "height": SAMPLE_RESOLUTION, "width": SAMPLE_RESOLUTION, "output_type": "pt"}
    base = pipe(prompt=prompt, generator=torch.Generator("cpu").manual_seed(0), **kwargs).images
    pipe.load_lora_weights(str(adapter_dir))
    tuned = pipe(prompt=prompt, generator=torch.Generator("cpu").manual_seed(0), **kwargs).images
    return bool(torch.isfinite(tuned).all() and not torch.equal(base, tuned))


def run_case(model: Path, data: Path, root: Path, family: str, options: dict, steps: int, cuda: bool) -> tuple[str, bool]:
    """Train one case end to end; its row, and whether it passed (the loss fell and the adapter reloads)."""
    prompt = "a red circle on a blue background"
    cfg = parse_parameters({
        "model_name": str(model), "dataset_name": str(data), "output_dir": str(root / "out"),
        "adaptor_name": f"{family}-run", "overwrite_output": True, "resolution": SAMPLE_RESOLUTION, "train_batch_size": 2,
        "max_train_steps": steps, "learning_rate": 1e-3, "lr_warmup_steps": 0,
        "eval_prompt": prompt, "eval_num_inference_steps": 4, "log_to_tensorboard": False, **options,
    })  # fmt: skip
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(cfg, RunPaths.for_config(cfg), log=lambda *_: None)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
    step_ms = 1000 * statistics.median(result.step_seconds[3:] or result.step_seconds)
    first, last = statistics.mean(result.losses[:5]), statistics.mean(result.losses[-5:])
    reload = adapter_reloads(model, result.adapter_path.parent, prompt)
    row = f"{step_ms:8.1f} {first:9.4f} → {last:8.4f} {peak:9.1f} {'ok' if reload else 'FAILED'}"
    notes = [f"       note: {w.message}" for w in caught if "xFormers" in str(w.message)]
    if last >= first:
        notes.append("       FAILED: the loss did not fall")
    return "\n".join([row, *notes]), reload and last < first


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--families", default=",".join(FAMILIES))
    args = parser.parse_args()
    quiet_libraries()
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"device: {device}; torch {torch.__version__}; {args.steps} steps, batch 2, {SAMPLE_RESOLUTION} px")
    print(f"{'family':6} {'options':44} {'ms/step':>8} {'loss first5→last5':>20} {'alloc MiB':>9} reload")
    failed = []
    with tempfile.TemporaryDirectory() as workdir:
        root = Path(workdir)
        data = write_sample_dataset(root / "data")
        for family in args.families.split(","):
            model = save_tiny_pipeline(family, root / family)
            for options in variants(cuda):
                label = ", ".join(f"{k}={v}" for k, v in options.items()).replace("enable_xformers_memory_efficient_attention", "xformers")
                try:
                    row, passed = run_case(model, data, root, family, options, args.steps, cuda)
                except Exception as error:  # a crash is a failed case, reported like the others
                    row, passed = f"FAILED: {type(error).__name__}: {error}", False
                print(f"{family:6} {label:44} {row}", flush=True)
                if not passed:
                    failed.append(f"{family} ({label})")
    if failed:
        print(f"{len(failed)} failed: {'; '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
