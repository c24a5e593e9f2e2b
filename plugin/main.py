"""Entry point. Headless: `python plugin/main.py --config run.json`; Transformer Lab: `--input_file FILE`;
`--demo [--demo-family sd|sdxl|sd3|flux]` trains on a tiny built-in model and sample data.

The parameter file is read and validated before PyTorch and Diffusers are imported, so a mistake in it is
reported in a fraction of a second rather than after several seconds of imports.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `plugin` importable as a package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read at import: optional-backend notices are noise

from plugin.config import LAUNCHER_KEYS, Config, parse_parameters, read_parameter_file, unknown_keys  # noqa: E402
from plugin.errors import ConfigError, TrainingDiverged, TrainingStopped  # noqa: E402
from plugin.host_memory import keep_freed_memory  # noqa: E402
from plugin.launcher import launcher_parameters  # noqa: E402
from plugin.stopping import STOPPED_EXIT_CODE  # noqa: E402

INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for a program ended by Ctrl-C


def demo_parameters(family: str, workdir: Path) -> dict:
    """A complete run on a tiny random-weight pipeline and the built-in sample images: seconds on a CPU."""
    from plugin.tiny import FAMILIES, SAMPLE_RESOLUTION, save_tiny_pipeline, write_sample_dataset

    if family not in FAMILIES:
        raise ConfigError(f"--demo-family: {family!r} is not one of {', '.join(FAMILIES)}")
    return {
        "model_name": str(save_tiny_pipeline(family, workdir / f"tiny-{family}")),
        "dataset_name": str(write_sample_dataset(workdir / "sample-data")),
        "output_dir": "output",
        "adaptor_name": f"demo-{family}",
        "overwrite_output": True,  # the demo's folder is scratch: each demo replaces the last
        "trigger_word": "shapes",
        "resolution": SAMPLE_RESOLUTION,
        "random_flip": True,
        "num_train_epochs": 8,
        "train_batch_size": 2,
        "learning_rate": 1e-3,
        "lr_warmup_steps": 0,
        "lora_r": 4,
        "lora_alpha": 8,
        "eval_prompt": "a red circle on a blue background\na green square on a yellow background",
        "eval_steps": 4,
        "eval_num_inference_steps": 10,
        "eval_guidance_scale": 3.0,
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a LoRA adapter for a Diffusers pipeline.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="JSON parameter file: a flat object, or parameters under 'config'")
    source.add_argument("--input_file", help="the JSON file Transformer Lab writes when it launches the plugin")
    source.add_argument("--demo", action="store_true", help="train on a tiny built-in model and sample data")
    parser.add_argument("--demo-family", default="sd", help="model family of the demo: sd, sdxl, sd3 or flux")
    args, extra = parser.parse_known_args(argv)
    if extra:  # Transformer Lab's harness adds --plugin_dir and --experiment_name; nothing here needs them
        print(f"ignoring arguments: {' '.join(extra)}", file=sys.stderr)
    return args


def read_config(args: argparse.Namespace) -> tuple[Config, str | None]:
    """The validated parameters and, from a Transformer Lab input file, the adapter folder it asks for.
    Imports nothing heavy (the demo excepted: it builds its model first)."""
    if args.config:
        return parse_parameters(read_parameter_file(args.config)), None
    raw = launcher_parameters(read_parameter_file(args.input_file), Path(args.input_file))
    extra = unknown_keys(raw) - LAUNCHER_KEYS
    if extra:  # launchers add keys of their own across versions; only parameter values are validated here
        print(f"ignoring keys that are not parameters: {', '.join(sorted(extra))}", file=sys.stderr)
    return parse_parameters(raw, ignore=LAUNCHER_KEYS | extra), raw.get("adaptor_output_dir") or None


def run(args: argparse.Namespace) -> int:
    if args.demo:
        with tempfile.TemporaryDirectory(prefix="lora-demo-") as workdir:
            cfg = parse_parameters(demo_parameters(args.demo_family, Path(workdir)))
            train_run(cfg, None)
        return 0
    cfg, adaptor_output_dir = read_config(args)
    train_run(cfg, adaptor_output_dir)
    return 0


def train_run(cfg: Config, adaptor_output_dir: str | None) -> None:
    """Import the training stack (seconds) and run."""
    quiet_libraries()
    from plugin.trainer import RunPaths, train

    train(cfg, RunPaths.for_config(cfg, adaptor_output_dir))


def quiet_libraries() -> None:
    """Library chatter (loading bars, optional-backend notices) would bury the trainer's own output."""
    import datasets
    import diffusers
    import transformers

    datasets.disable_progress_bars()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv=None) -> int:
    """Run, and report every expected way of ending in one line without a traceback: bad input (2), a
    diverged run (1), a requested stop (75), Ctrl-C at any moment, imports included (130)."""
    try:
        args = parse_args(argv)
        keep_freed_memory()
        return run(args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except TrainingStopped as error:
        print(str(error), file=sys.stderr)
        return STOPPED_EXIT_CODE
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # more presses while exiting would print tracebacks
        print("interrupted: the checkpoints, adapters and eval images saved before this point are intact", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
