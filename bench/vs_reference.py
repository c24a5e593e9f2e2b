"""Our trainer against Diffusers' `train_text_to_image_lora.py` on the same job, in one run, alternating.

Builds an SD 1.5-sized pipeline (random weights, built in code) and a 16-image folder once, then runs the
reference script and our trainer with identical settings (256 px, batch 1, LoRA rank 4 = alpha, lr 1e-4
constant, centre crop, 3 epochs, AdamW defaults, clipping at 1, TensorBoard logging, no validation images),
alternating reference/ours `--repeats` times per precision. Each run is a fresh process timed from start
to exit; `bench/step_clock.py` records every optimizer step of both in the same way. Prints per-step time
(median, first two steps excluded), whole-process wall time and peak RSS, and the ratios.

    .venv/bin/python bench/vs_reference.py --reference PATH/TO/train_text_to_image_lora.py \\
        [--precisions no bf16] [--repeats 2] [--epochs 3] [--torch-compile none blocks] 2>/dev/null

On machines where torchvision does not load, pass the copy that sits beside `run_with_shim.py` (its
torchvision stand-in); the script is run through that shim whenever it is present.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from sd15_step import sd15_sized_pipeline  # noqa: E402

from plugin.tiny import write_sample_dataset  # noqa: E402

CLOCK = ROOT / "bench" / "step_clock.py"
RESOLUTION, RANK, LEARNING_RATE, IMAGES, SEED = 256, 4, 1e-4, 16, 0


def reference_command(script: Path, model: Path, data: Path, out: Path, precision: str, epochs: int) -> list[str]:
    shim = script.parent / "run_with_shim.py"
    runner = [str(shim), str(script)] if shim.is_file() else [str(script)]
    return runner + [
        "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--output_dir", str(out),
        "--image_column", "image", "--caption_column", "text", "--resolution", str(RESOLUTION), "--center_crop",
        "--train_batch_size", "1", "--rank", str(RANK), "--learning_rate", str(LEARNING_RATE),
        "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--num_train_epochs", str(epochs),
        "--mixed_precision", precision, "--seed", str(SEED), "--checkpointing_steps", "1000000",
        "--dataloader_num_workers", "0", "--max_grad_norm", "1",
    ]  # fmt: skip


def our_command(model: Path, data: Path, out: Path, precision: str, epochs: int, compile_mode: str = "none") -> list[str]:
    config = out.with_suffix(".json")
    config.write_text(json.dumps({
        "model_name": str(model), "dataset_name": str(data), "output_dir": str(out), "adaptor_name": "bench",
        "resolution": RESOLUTION, "center_crop": True, "train_batch_size": 1, "lora_r": RANK, "lora_alpha": RANK,
        "learning_rate": LEARNING_RATE, "lr_scheduler": "constant", "lr_warmup_steps": 0,
        "num_train_epochs": epochs, "mixed_precision": precision, "seed": SEED, "max_grad_norm": 1.0,
        "eval_prompt": "", "log_to_tensorboard": True, "torch_compile": compile_mode,
    }))  # fmt: skip
    return [str(ROOT / "plugin" / "main.py"), "--config", str(config)]


def timed_run(command: list[str], result: Path) -> dict:
    started = time.perf_counter()
    subprocess.run([sys.executable, str(CLOCK), str(result), *command], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, env={**os.environ, "WANDB_MODE": "offline"})  # fmt: skip
    wall = time.perf_counter() - started
    clock = json.loads(result.read_text())
    ends = clock["step_ends"]
    steps = [b - a for a, b in zip(ends, ends[1:])][1:]  # step 1 has no start mark; step 2 pays warm-up
    return {"step": statistics.median(steps), "wall": wall, "rss": clock["peak_rss_gib"], "steps": len(ends)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, type=Path, help="path to train_text_to_image_lora.py")
    parser.add_argument("--precisions", nargs="+", default=["no", "bf16"], choices=["no", "bf16"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--torch-compile", nargs="+", default=["none"], choices=["none", "blocks", "full"],
                        help="our trainer's torch_compile (inductor), one or several: each runs in the alternation; compile time is in "
                             "the whole-process time, not in s/step")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        root = Path(workdir)
        model, data = root / "sd15-sized", root / "data"
        sd15_sized_pipeline().save_pretrained(model)
        write_sample_dataset(data, n=IMAGES, size=RESOLUTION)
        results: dict[tuple[str, str], list[dict]] = {}
        names = ["reference"] + [f"ours-{mode}" if len(args.torch_compile) > 1 else "ours" for mode in args.torch_compile]
        for precision in args.precisions:
            for repeat in range(args.repeats):
                for name, mode in zip(names, [None, *args.torch_compile]):
                    out = root / f"{name}-{precision}-{repeat}"
                    command = (
                        reference_command(args.reference.resolve(), model, data, out, precision, args.epochs)
                        if mode is None else our_command(model, data, out, precision, args.epochs, mode)
                    )  # fmt: skip
                    run = timed_run(command, out.with_suffix(".clock.json"))
                    results.setdefault((precision, name), []).append(run)
                    print(f"{precision:>4} {name:<13} run {repeat + 1}: {run['steps']} steps, {run['step']:.2f} s/step, "
                          f"{run['wall']:.0f} s whole process, peak RSS {run['rss']:.2f} GiB", flush=True)  # fmt: skip
        print(f"\nSD 1.5-sized, {RESOLUTION} px, batch 1, rank {RANK}, {IMAGES} images x {args.epochs} epochs, ours with torch_compile "
              f"{', '.join(args.torch_compile)}; medians over {args.repeats} alternating runs")  # fmt: skip
        for precision in args.precisions:
            ref = {k: statistics.median(r[k] for r in results[(precision, "reference")]) for k in ("step", "wall", "rss")}
            for name in names[1:]:
                ours = {k: statistics.median(r[k] for r in results[(precision, name)]) for k in ("step", "wall", "rss")}
                print(f"{precision:>4} {name}: s/step reference {ref['step']:.2f}, ours {ours['step']:.2f} -> {ref['step'] / ours['step']:.2f}x steps/s; "
                      f"whole process {ref['wall']:.0f} s vs {ours['wall']:.0f} s -> {ref['wall'] / ours['wall']:.2f}x; "
                      f"peak RSS {ref['rss']:.2f} vs {ours['rss']:.2f} GiB ({ours['rss'] / ref['rss']:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
