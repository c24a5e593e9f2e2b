"""Entry point. Headless: `python plugin/main.py --config run.json`; Transformer Lab: `--input_file FILE` (the
plugin-era launcher) or `--job` (a task of today's app: parameters from the job named by _TFL_JOB_ID);
`--demo [--demo-family sd|sdxl|sd3|flux|chroma|zimage|qwen_image|flux2|flux_kontext|qwen_image_edit|qwen_image_edit_plus]` (or
`--demo-family F` alone) trains on a tiny built-in model and sample data (an edit model on sample pairs);
`--save-tiny-model DIR [--family F]` saves such a model, to rehearse a real run on your own images;
`--posthoc-ema RUN_DIR --sigma-rel 0.07 [0.12 ...] [--at-step N]` writes post-hoc EMA adapters of a finished run;
with `--sweep` it scores σ_rel by the run's validation loss, plots the curve and saves the best; `--presets` lists the
presets. `lora inspect`,
`lora resize`, `lora extract` and `lora merge` work on LoRA files after training (plugin/lora_tools.py).

The parameter file is read and validated before PyTorch and Diffusers are imported, so a mistake in it is
reported in a fraction of a second rather than after several seconds of imports.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `plugin` importable as a package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read at import: optional-backend notices are noise

INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for a program ended by Ctrl-C
INTERRUPTED = "interrupted: the checkpoints, adapters and eval images saved before this point are intact"

try:  # Ctrl-C during these imports comes before main() can catch it: the same line and exit status
    from plugin.config import LAUNCHER_KEYS, Config, manifest_parameters, parse_parameters, read_parameter_file, unknown_keys
    from plugin.errors import ONE_LINE_ERRORS, ConfigError, TrainingStopped
    from plugin.host_memory import keep_freed_memory
    from plugin.launcher import JOB_ID_VARIABLE, launcher_parameters, workspace_of
    from plugin.reporting import JobRecord, TransformerLabJob
    from plugin.run_lock import run_folder_lock
    from plugin.stopping import STOPPED_EXIT_CODE, StartupInterrupts
except KeyboardInterrupt:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # more presses while exiting would print tracebacks
    print(INTERRUPTED, file=sys.stderr)
    sys.exit(INTERRUPTED_EXIT_CODE)

DEFAULT_FAMILY = "sd"  # of the demo and of --save-tiny-model
DEMO_OUTPUT = "output"  # the demo's folder, under the current one: its tiny model, sample images and run
FINAL_LOSS_STEPS = 20  # the job's score: the mean loss of the last this many optimizer steps


def tiny_family(family: str, option: str) -> str:
    from plugin.tiny import EDIT_FAMILIES, FAMILIES

    if family not in FAMILIES + EDIT_FAMILIES:
        raise ConfigError(f"{option}: {family!r} is not one of {', '.join(FAMILIES + EDIT_FAMILIES)}")
    return family


def save_tiny_model(folder: Path, family: str) -> None:
    """A tiny random-weight pipeline in the Diffusers folder layout, for rehearsing a run: it loads, trains and
    renders like a real model of its family, in seconds on a CPU (its images are noise)."""
    tiny_family(family, "--family")
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ConfigError(f"--save-tiny-model: {str(folder)!r} already exists and is not an empty folder; name a new one")
    from plugin.tiny import save_tiny_pipeline

    save_tiny_pipeline(family, folder)
    print(f"saved a tiny {family} pipeline (random weights) in {folder}; "
          f"train on it with \"model_name\": \"{folder}\" in a parameter file and --config")  # fmt: skip


def demo_parameters(family: str, output: Path) -> dict:
    """A complete run on a tiny random-weight pipeline and the built-in sample images, all kept in `output`
    (the model too, so that the model card's loading code works); an edit model's on sample pairs (each target its
    control mirrored), its evaluation editing one of the controls."""
    from plugin.tiny import EDIT_FAMILIES, SAMPLE_RESOLUTION, save_tiny_pipeline, write_pair_dataset, write_sample_dataset

    tiny_family(family, "--demo-family")
    pairs = write_pair_dataset(output / "sample-pairs") if family in EDIT_FAMILIES else None
    edits = {"control_dir": str(pairs / "controls"), "eval_control_image": str(pairs / "controls" / "0000.png"), "trigger_word": "",
             "eval_prompt": "mirror the picture"} if pairs else {}  # fmt: skip
    return {
        "model_name": str(save_tiny_pipeline(family, output / f"tiny-{family}")),
        "dataset_name": str(pairs or write_sample_dataset(output / "sample-data")),
        "output_dir": str(output),
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
        **edits,
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a LoRA adapter for a Diffusers pipeline.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", help="JSON parameter file: a flat object, or parameters under 'config'")
    source.add_argument("--input_file", help="the JSON file Transformer Lab writes when it launches the plugin")
    source.add_argument("--job", action="store_true", help=f"a Transformer Lab task: parameters from the job in ${JOB_ID_VARIABLE}")
    source.add_argument("--demo", action="store_true", help="train on a tiny built-in model and sample data")
    source.add_argument("--posthoc-ema", metavar="RUN_DIR", help="reconstruct post-hoc EMA adapters from a run's snapshots")
    source.add_argument("--save-tiny-model", metavar="DIR", help="save a tiny random-weight pipeline (--family, default sd) to "
                        "rehearse a real run on your own images in seconds: model_name DIR in the parameter file")
    parser.add_argument("--sigma-rel", type=float, nargs="+", metavar="S", help="with --posthoc-ema: the EMA lengths (σ_rel) wanted")
    parser.add_argument("--sweep", action="store_true", help="with --posthoc-ema: choose σ_rel by validation loss "
                        "(over --sigma-rel, or a range the snapshots cover), plot the curve, save the best")
    parser.add_argument("--at-step", type=int, metavar="N", help="with --posthoc-ema: as of step N (default: the last snapshot)")
    parser.add_argument("--demo-family", help="model family of the demo: sd (the default), sdxl, sd3, flux, chroma, zimage, qwen_image, "
                        "flux2, or an edit model (on sample pairs): flux_kontext, qwen_image_edit, qwen_image_edit_plus; alone, it means --demo")
    parser.add_argument("--family", help="with --save-tiny-model: a family as for --demo-family")
    parser.add_argument("--presets", action="store_true", help="list the presets (preset: a family's settings for a GPU size) and exit")
    parser.add_argument("--experiment_name", help="the Transformer Lab experiment of the job (its launcher sets it)")
    args, extra = parser.parse_known_args(argv)
    if args.demo_family and not args.demo:
        if args.config or args.input_file or args.job or args.posthoc_ema or args.save_tiny_model:
            parser.error("--demo-family: only with --demo (or alone)")
        args.demo = True
    if args.family and not args.save_tiny_model:
        parser.error("--family: only with --save-tiny-model")
    if not (args.config or args.input_file or args.job or args.demo or args.posthoc_ema or args.save_tiny_model or args.presets):
        parser.error("one of --config, --input_file, --job, --demo, --posthoc-ema, --save-tiny-model or --presets is required")
    if extra:  # Transformer Lab's harness adds --plugin_dir; nothing here needs it
        print(f"ignoring arguments: {' '.join(extra)}", file=sys.stderr)
    return args


def lora_command(argv: list[str]) -> int:
    """`plugin/main.py lora inspect FILE [--json]`, `lora convert FILE --to LAYOUT --out FILE`, `lora resize FILE
    (--rank R | --energy E) --out FILE`, `lora extract BASE TUNED --rank R --out FILE`, `lora merge BASE FILE [FILE
    ...] [--weights W ...] --out DIR` (into a model) and `lora merge FILE FILE [...] [--svd-rank R] --out FILE` (one LoRA)."""
    parser = argparse.ArgumentParser(prog="plugin/main.py lora", description="Inspect, convert, resize, extract and merge LoRA files.")
    verbs = parser.add_subparsers(dest="verb", required=True)
    inspect = verbs.add_parser("inspect", help="layout, target model, adapter type, ranks, alphas, modules, metadata, update norms")
    inspect.add_argument("file", type=Path)
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    convert = verbs.add_parser("convert", help="the file in another layout, every module's weight update kept")
    convert.add_argument("file", type=Path)
    convert.add_argument("--to", required=True, choices=("diffusers", "kohya", "comfyui", "bfl"))
    convert.add_argument("--family", help="the model family, when the module names do not tell (sd, sdxl, flux, ...)")
    convert.add_argument("--out", type=Path, required=True, help="the new file (never an existing one)")
    resize = verbs.add_parser("resize", help="SVD re-factorisation of every module, the effective weight kept")
    resize.add_argument("file", type=Path)
    resize.add_argument("--rank", type=int, help="the new rank (modules of lower rank keep theirs)")
    resize.add_argument("--energy", type=float, help="per module, the smallest rank keeping this share of Σσ² (e.g. 0.95)")
    resize.add_argument("--ratio", type=float, help="per module, the singular values at least the largest / RATIO (kohya's sv_ratio)")
    resize.add_argument("--out", type=Path, required=True, help="the new file (never an existing one)")
    extract = verbs.add_parser("extract", help="the LoRA closest to the difference of two models of one family")
    extract.add_argument("base")
    extract.add_argument("tuned")
    extract.add_argument("--rank", type=int, required=True)
    extract.add_argument("--min-difference", type=float, default=1e-6, help="layers differing by no more than this are left out")
    extract.add_argument("--out", type=Path, required=True, help="the new LoRA file (Diffusers layout)")
    merge = verbs.add_parser("merge", help="LoRA files folded into their base model (a Diffusers folder out), or into one LoRA file")
    merge.add_argument("inputs", nargs="+", help="BASE FILE [FILE ...] into the model, or FILE FILE [...] into one LoRA")
    merge.add_argument("--weights", type=float, nargs="+", help="one per LoRA file (default 1)")
    merge.add_argument("--svd-rank", type=int, help="LoRA into LoRA: re-factor each merged module to this rank (else exact, ranks added)")
    merge.add_argument("--out", type=Path, required=True, help="the new model folder, model file (.safetensors: the original single-file "
                       "layout) or LoRA file (never an existing one)")
    for verb in (inspect, convert):
        verb.add_argument("--allow-pickle", action="store_true", help="read a .ckpt/.pt/.bin file (only one you trust)")
    for verb in (convert, resize, merge):
        verb.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="of what is written (default: the input's; merged models: the base's)")
    args = parser.parse_args(argv)
    quiet_libraries()
    from plugin import lora_tools

    if args.verb == "inspect":
        facts = lora_tools.inspect_adapter(args.file, args.allow_pickle)
        print(json.dumps(facts, indent=2) if args.json else "\n".join(f"{key:>22}  {value}" for key, value in facts.items()))
        return 0
    if args.verb == "convert":
        done = lora_tools.convert_adapter(args.file, args.to, args.out, args.family, args.allow_pickle, args.dtype)
        print(f"wrote {args.out}: {done['modules']} {done['model']} modules, {done['from']} layout to {done['to']}")
    elif args.verb == "resize":
        report = lora_tools.resize_adapter(args.file, args.out, args.rank, args.energy, args.ratio, args.dtype)
        for name, (old, new, kept) in report.items():
            print(f"{name}: rank {old} -> {new}, {100 * kept:.2f} % of the update's energy kept")
        print(f"wrote {args.out}: {len(report)} modules")
    elif args.verb == "extract":
        kept = lora_tools.extract_adapter(args.base, args.tuned, args.rank, args.out, args.min_difference)
        print(f"wrote {args.out}: {len(kept)} layers, {100 * min(kept.values()):.2f} to {100 * max(kept.values()):.2f} % of each difference's energy kept")
    else:
        into_lora = all(lora_tools.is_lora_file(Path(i)) for i in args.inputs)
        files = [Path(i) for i in (args.inputs if into_lora else args.inputs[1:])]
        weights = args.weights or [1.0] * len(files)
        if len(weights) != len(files) or not files:
            raise ConfigError(f"--weights: {len(weights)} given for {len(files)} LoRA files; give one per file")
        if into_lora:
            ranks = lora_tools.merge_adapters(list(zip(files, weights)), args.out, args.svd_rank, args.dtype)
            print(f"wrote {args.out}: {len(ranks)} modules, ranks {min(ranks.values())} to {max(ranks.values())}")
        else:
            if args.svd_rank:
                raise ConfigError("--svd-rank: merges LoRA files into one LoRA; into a model every update is folded whole")
            print(f"wrote {lora_tools.merge_into_base(args.inputs[0], list(zip(files, weights)), args.out, args.dtype)}")
    return 0


def launched_job(args: argparse.Namespace) -> tuple[dict | None, JobRecord]:
    """A launcher's raw parameters (None for --config and --demo) and the job record the run reports to: the
    job Transformer Lab launched it as (its id in the input file, or in the environment for --job), or none."""
    if args.job:
        if not os.environ.get(JOB_ID_VARIABLE):
            raise ConfigError(f"--job: {JOB_ID_VARIABLE} is not set; --job is for runs launched by Transformer Lab")
        job = TransformerLabJob.attach(os.environ[JOB_ID_VARIABLE])
        if not job.in_app:
            raise ConfigError("--job: the transformerlab SDK is needed to read the job's parameters (bash setup.sh --with-transformerlab)")
        raw = launcher_parameters(job.parameters(), workspace_of(None))
        if raw.get("output_dir", "") in ("", manifest_parameters()["output_dir"].default):  # not chosen: the job's folder
            raw["output_dir"] = str(job.directory())
        return raw, job
    if args.input_file:
        raw = read_parameter_file(args.input_file)
        workspace = workspace_of(Path(args.input_file))
        job_id = raw.get("job_id")
        job = TransformerLabJob.attach(str(job_id), args.experiment_name, workspace) if job_id not in (None, "") else JobRecord()
        return launcher_parameters(raw, workspace), job
    return None, JobRecord()


def read_config(args: argparse.Namespace, raw: dict | None) -> tuple[Config, str | None]:
    """The validated parameters and, from a launcher, the adapter folder it asks for. Imports nothing heavy
    (the demo excepted: it builds its model first)."""
    if raw is None:
        return parse_parameters(read_parameter_file(args.config)), None
    extra = unknown_keys(raw) - LAUNCHER_KEYS
    if extra:  # launchers add keys of their own across versions; only parameter values are validated here
        print(f"ignoring keys that are not parameters: {', '.join(sorted(extra))}", file=sys.stderr)
    return parse_parameters(raw, ignore=LAUNCHER_KEYS | extra), raw.get("adaptor_output_dir") or None


def run(args: argparse.Namespace, raw: dict | None, job: JobRecord, startup: StartupInterrupts) -> int:
    """What the arguments ask for. Whatever needs only the arguments or the parameter file is checked before
    `import_training_stack` spends its seconds."""
    if args.posthoc_ema and not (args.sigma_rel or args.sweep):
        raise ConfigError("--posthoc-ema: give the EMA lengths wanted with --sigma-rel, e.g. --sigma-rel 0.07 0.12, "
                          "or --sweep to choose by validation loss")
    if args.posthoc_ema:
        import_training_stack(startup)
        from plugin.posthoc import reconstruct
        from plugin.sweep import sweep

        with run_folder_lock(Path(args.posthoc_ema), "--posthoc-ema --sweep" if args.sweep else "--posthoc-ema", create=False):
            (sweep if args.sweep else reconstruct)(Path(args.posthoc_ema), args.sigma_rel, args.at_step)
        return 0
    if args.presets:
        from plugin.presets import preset_listing

        print(preset_listing())
        return 0
    if args.save_tiny_model:
        import_training_stack(startup)
        save_tiny_model(Path(args.save_tiny_model), args.family or DEFAULT_FAMILY)
        return 0
    if args.demo:
        import_training_stack(startup)  # before the demo builds its model with Diffusers
        cfg, adaptor_output_dir = parse_parameters(demo_parameters(args.demo_family or DEFAULT_FAMILY, Path(DEMO_OUTPUT).resolve())), None
    else:
        cfg, adaptor_output_dir = read_config(args, raw)
        import_training_stack(startup)
    from plugin.trainer import RunPaths, train

    paths = RunPaths.for_config(cfg, adaptor_output_dir)
    with run_folder_lock(paths.run_dir, "resuming" if cfg.resume_from_checkpoint else "training"):
        result = train(cfg, paths, job=job)
    last = result.losses[-FINAL_LOSS_STEPS:]
    job.finished(result.adapter_path, cfg.adaptor_name, {"loss": sum(last) / len(last)} if last else {})
    return 0


def import_training_stack(startup: StartupInterrupts) -> None:
    """PyTorch, Diffusers and the trainer (seconds), quietly, with Ctrl-C deferred to their end: raised inside
    PyTorch's import (its C++ calling back into Python) a KeyboardInterrupt aborts the process instead of
    unwinding, and a library's import guard may swallow it."""
    with startup.deferred():
        quiet_libraries()
        import plugin.posthoc  # noqa: F401
        import plugin.sweep  # noqa: F401
        import plugin.trainer  # noqa: F401


def quiet_libraries() -> None:
    """Library chatter (loading bars, optional-backend notices) would bury the trainer's own output."""
    from plugin.quantization import import_quantization_libraries

    import_quantization_libraries()  # first: Diffusers imports torchao, which warns about its CUDA extensions
    import datasets
    import diffusers
    import transformers

    datasets.disable_progress_bars()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv=None) -> int:
    """Run, and report every expected way of ending in one line without a traceback, to the terminal and to
    the launcher's job: bad input (2), a diverged run or failed evaluation (1), an output that could not be
    written (74), a requested stop (75; 0 under Transformer Lab,
    which records any other exit code as a crash), Ctrl-C at any moment, imports included (130). Anything
    unexpected is recorded as the job's failure and then raised."""
    job = JobRecord()
    with StartupInterrupts() as startup:
        try:
            argv = sys.argv[1:] if argv is None else list(argv)
            if argv[:1] == ["lora"]:
                return lora_command(argv[1:])
            args = parse_args(argv)
            keep_freed_memory()
            raw, job = launched_job(args)
            return run(args, raw, job, startup)
        except ONE_LINE_ERRORS as error:
            job.failed(str(error))
            print(f"error: {error}", file=sys.stderr)
            return error.exit_code
        except TrainingStopped as error:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the run is over: a press left over must not raise here
            job.stopped(str(error))
            print(str(error), file=sys.stderr)
            return 0 if job.in_app else STOPPED_EXIT_CODE
        except KeyboardInterrupt:
            return interrupted(job)
        except Exception as error:
            if caused_by_interrupt(error):
                return interrupted(job)
            job.failed(f"{type(error).__name__}: {error}")
            raise


def interrupted(job: JobRecord) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # more presses while exiting would print tracebacks
    job.stopped(INTERRUPTED)
    print(INTERRUPTED, file=sys.stderr)
    return INTERRUPTED_EXIT_CODE


def caused_by_interrupt(error: BaseException | None) -> bool:
    """Python wraps a KeyboardInterrupt raised inside some hooks in another error (a class's __set_name__,
    run while a module is imported, turns it into a RuntimeError): Ctrl-C all the same."""
    while error is not None:
        if isinstance(error, KeyboardInterrupt):
            return True
        error = error.__cause__ or error.__context__
    return False


if __name__ == "__main__":
    sys.exit(main())
