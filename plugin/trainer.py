"""The training loop: read top to bottom, it is the whole run. Everything model-specific is a method of the
family object and everything objective-specific a method of the objective, so nothing here branches on
the architecture."""

from __future__ import annotations

import math
from contextlib import nullcontext
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, set_seed
from diffusers.optimization import get_scheduler
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .buckets import BucketBatchSampler, BucketLayout
from .cache import build_conditioning, resolve_caching
from .card import write_model_card
from .checkpoints import (
    INPUT_CONFIG, RESOLVED_CONFIG, Position, TrainingState, check_resumable, checkpoint_root, claim_run_folder,
    check_run_folder, load_checkpoint, resolve_resume, try_save_checkpoint,
)  # fmt: skip
from .class_images import make_class_images
from .compilation import check_compilation
from .denoising import denoising_loss, sample_generators
from .disk import WRITE_ERRORS, save_failure, warn_if_short_of_space
from .distributed import any_process, average_gradients, rng_states
from .data import TrainingExamples, collate_examples
from .data.mixing import Source, dataset_table, example_sources, format_dataset_table, load_sources, slot_rows
from .ema import PowerFunctionEMA, moving_average
from .errors import ConfigError, TrainingDiverged, TrainingStopped
from .evaluation import rendered_evaluation, save_evaluation, with_eval_controls
from .export import WEIGHTS_NAME, save_adapter_atomic, write_json_atomic
from .families import open_model
from .kohya import community_file_name
from .memory_plan import peak_report, plan_memory
from .optimizers import build_optimizer, check_optimizer
from .offloading import check_block_count, check_offloading
from .placement import place_model
from .posthoc import discard_snapshots_after, write_snapshot
from .presets import check_preset_family, with_preset_source
from .quantization import check_quantization
from .reporting import METRICS_FILE, SETUP_PERCENT, JobRecord, Reporter
from .run_lock import launch_main_process
from .settings import parse_eval_prompts, parse_export_formats
from .sharding import check_sharding
from .stopping import StopRequest
from .validation import ValidationHistory, ValidationSet, training_and_validation_data

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# cuDNN's fused attention backward returns NaN gradients for some sequence lengths on Hopper GPUs
# (pytorch/pytorch#196678; seen here training Flux at 512 text + 64 image tokens). Training steps, forward and
# backward (where gradient checkpointing recomputes), use the flash, memory-efficient and math kernels instead.
TRAINING_ATTENTION = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


@dataclass(frozen=True)
class RunPaths:
    """run_dir holds eval images, logs and the resolved config; adapter_dir receives the adapter."""

    run_dir: Path
    adapter_dir: Path

    @classmethod
    def for_config(cls, cfg, adaptor_output_dir: str | None = None) -> "RunPaths":
        run_dir = Path(cfg.output_dir).expanduser() / cfg.adaptor_name
        return cls(run_dir, Path(adaptor_output_dir).expanduser() if adaptor_output_dir else run_dir)


@dataclass
class RunResult:
    adapter_path: Path
    eval_images: list[Path] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # per optimizer step, mean over its micro-batches
    step_seconds: list[float] = field(default_factory=list)  # wall time of each optimizer step, eval excluded
    steps: int = 0
    cache_counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # (encoded, reused) per cache


def check_settings(cfg) -> None:
    """What the parameter phase (plugin/settings.py) cannot check without PyTorch or the environment: the
    hardware and libraries a setting needs, and the launch; caught before any weights load."""
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("mixed_precision: 'fp16' needs a CUDA GPU (loss scaling); use 'bf16' or 'no' on this machine")
    try:
        check_quantization(cfg)
        check_optimizer(cfg)
        check_sharding(cfg)
        check_compilation(cfg)
        check_offloading(cfg)
    except ConfigError as error:
        raise ConfigError(with_preset_source(str(error), cfg.as_dict())) from None


def new_accelerator(cfg) -> Accelerator:
    """Accelerate keeps its settings in a process-wide singleton; a run starts from a clean one so that a
    second run in the same process (a test, a sweep) may use another precision."""
    AcceleratorState._reset_state(reset_partial_state=True)
    # split_batches: the LR schedule steps once per optimizer step, not once per process (we shard the data).
    return Accelerator(mixed_precision=cfg.mixed_precision, dataloader_config=DataLoaderConfiguration(split_batches=True))


def build_examples(cfg, sources: list[Source], layout: BucketLayout | None = None) -> TrainingExamples:
    """Examples of every dataset at their buckets, each training image visited `repeats` times an epoch and the
    regularisation images balanced to them; with the latent cache on they carry plans, not pixels."""
    return TrainingExamples(example_sources(sources), cfg.seed, layout=layout, load_pixels=not cfg.cache_latents, slot_rows=slot_rows(sources))


def bucket_layout(family, sources: list[Source], log=print) -> BucketLayout:
    """Each image's bucket (each dataset at its resolution), printed as a table. What the images need done to
    them is said once each: those smaller than their bucket are upscaled, those with transparency composited
    over alpha_background."""
    layout = BucketLayout.joined([BucketLayout.assign(source.headers.sizes, source.spec.cfg.resolution, family.resolution_multiple,
                                                      source.spec.cfg.aspect_ratio_buckets) for source in sources])  # fmt: skip
    labels = [label for source in sources for label in source.headers.labels]
    log(layout.table())
    sizes = layout.sizes
    small = sorted(layout.undersized(), key=layout.upscale, reverse=True)  # the most blurred first
    if small:
        names = [f"{labels[i]} ({sizes[i][1]}x{sizes[i][0]}, upscaled {layout.upscale(i):.3g}x)" for i in small[:10]]
        warnings.warn(
            f"{len(small)} of {len(sizes)} images are smaller than their bucket and are upscaled, which blurs them: "
            + ", ".join(names) + (" ..." if len(small) > 10 else ""),
            stacklevel=2,
        )
    transparent = sum(len(source.headers.transparent) for source in sources)
    if transparent:
        log(f"{transparent} of {len(sizes)} images have transparency; composited over {sources[0].spec.cfg.alpha_background!r} "
            "(alpha_background)")  # fmt: skip
    return layout


def training_data(cfg, family, accelerator, weight_dtype, log=print) -> tuple[TrainingExamples, BucketLayout, list[Source] | None, list[dict]]:
    """The run's datasets loaded and checked (missing class images rendered first), their buckets and examples,
    the held-out images (None without a validation set) and the datasets table; the captions checked against the
    text encoders' limits."""
    render_class_images = partial(make_class_images, cfg, accelerator=accelerator, dtype=weight_dtype, log=log)
    pairing = family.pairing()  # an edit model's control images: how many, whether it needs them, at what size
    sources, held_out = training_and_validation_data(cfg, load_sources(cfg, render_class_images, pairing), pairing)
    layout = bucket_layout(family, sources, log)
    examples = build_examples(cfg, sources, layout)
    table = dataset_table(sources, examples.slot_rows)
    log(format_dataset_table(table))
    family.check_caption_lengths(examples.caption_texts(), cfg.trigger_word)
    return examples, layout, held_out, table


def accumulation_groups(loader, size: int):
    """Micro-batches grouped per optimizer step; the last group of an epoch may be shorter."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def train(cfg, paths: RunPaths, log=print, job: JobRecord | None = None) -> RunResult:
    """One whole run: validate cheaply, load, train, evaluate, save. Returns where things went. `job` is the
    launcher's record of the run (Transformer Lab's), kept by the main process."""
    # Everything that can be wrong with the input is checked before any weights are read.
    check_settings(cfg)
    if launch_main_process():
        check_run_folder(paths.run_dir, cfg)
    resume_from = resolve_resume(cfg.resume_from_checkpoint, paths.run_dir)
    if resume_from is not None:
        check_resumable(resume_from, cfg, log)
    input_config = cfg.as_dict()
    family = open_model(cfg.model_name, cfg.model_config, cfg.text_encoder_source, cfg.allow_pickle_checkpoints)  # configs, no weights yet
    check_preset_family(cfg.preset, family)
    cfg, filled = family.configure(resolve_caching(cfg, log, family.text_reads_controls))
    check_block_count(cfg, family.description)
    prompts = with_eval_controls(parse_eval_prompts(cfg.eval_prompt), cfg.eval_control_image, family)  # an edit model's controls read now
    accelerator = new_accelerator(cfg)
    processes, is_main = accelerator.num_processes, accelerator.is_main_process
    log = log if is_main else (lambda *_: None)  # one process speaks and writes files; all of them train
    weight_dtype = WEIGHT_DTYPES[cfg.mixed_precision]
    cfg, memory = plan_memory(cfg, family, accelerator, weight_dtype, log)  # memory_plan: settings chosen for the budget (None: not asked)
    resolved_config = {**cfg.as_dict(), "model_family": family.name}
    job = job if job is not None and is_main else JobRecord()
    log(f"{family.title} model; defaults applied: " + (", ".join(f"{k}={v}" for k, v in filled.items()) or "none"))
    examples, layout, held_out_sources, datasets_used = training_data(cfg, family, accelerator, weight_dtype, log)
    if is_main:  # last of the checks, as overwrite_output deletes the old run's checkpoints
        claim_run_folder(paths.run_dir, cfg, log)
    accelerator.wait_for_everyone()
    job.setup(1)

    set_seed(cfg.seed)
    placed = place_model(cfg, family, accelerator, weight_dtype, log)  # loaded, LoRA on, sharded or offloaded, moved, compiled
    modules = placed.modules
    job.setup(2)
    lora_parameters = {
        f"{component}.{name}": p for component, module in modules.items() for name, p in module.named_parameters() if p.requires_grad
    }
    objective = family.make_objective()
    weighting_parameters = objective.learned_parameters(accelerator.device)  # learned loss weighting's u(σ), or none
    named_parameters = {**lora_parameters, **weighting_parameters}
    parameters = list(named_parameters.values())
    trainable = sum(p.numel() for p in parameters)
    if is_main:
        warn_if_short_of_space(paths.run_dir, cfg, trainable)
    held_out = ValidationSet.build(cfg, family, held_out_sources) if held_out_sources is not None else None
    with accelerator.main_process_first():  # a disk cache is filled once, then read by the other processes
        conditioning = build_conditioning(cfg, family, examples, log)
    job.setup(SETUP_PERCENT)
    sampler = BucketBatchSampler(layout.bucket_ids(examples.slot_rows), cfg.train_batch_size, cfg.seed, processes, accelerator.process_index,
                                 lockstep=cfg.shard_base_model)  # fmt: skip
    # The loader's own generator: each epoch's iterator draws a worker base seed from it, which from the global
    # RNG would shift LoRA dropout's draws and make a resumed run differ from an unbroken one.
    loader = DataLoader(examples, batch_sampler=sampler, collate_fn=collate_examples, num_workers=cfg.dataloader_num_workers,
                        generator=torch.Generator().manual_seed(cfg.seed))  # fmt: skip
    steps_per_epoch = math.ceil(len(loader) / cfg.gradient_accumulation_steps)
    max_steps = cfg.max_train_steps or cfg.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_steps / steps_per_epoch)

    groups = [{"params": list(lora_parameters.values())}]
    if weighting_parameters:  # a calibration, not a model: its own learning rate and no weight decay
        groups.append({"params": list(weighting_parameters.values()), "lr": cfg.loss_weighting_learning_rate, "weight_decay": 0.0})
    optimizer = build_optimizer(cfg, groups)
    lr_schedule = get_scheduler(
        cfg.lr_scheduler,
        optimizer,
        num_warmup_steps=cfg.lr_warmup_steps,
        num_training_steps=max_steps,
        num_cycles=cfg.lr_num_cycles,
        power=cfg.lr_power,
    )
    optimizer, lr_schedule = accelerator.prepare(optimizer, lr_schedule)
    ema = moving_average(cfg, parameters)
    snapshot_every = cfg.posthoc_ema_snapshot_steps if isinstance(ema, PowerFunctionEMA) and is_main else 0
    state = TrainingState(named_parameters, optimizer, lr_schedule, ema, accelerator.scaler, processes, accelerator.process_index)
    position = load_checkpoint(resume_from, state) if resume_from is not None else Position(0, 0, 0)
    if resume_from is not None:
        log(f"resumed from {resume_from} at step {position.step} (epoch {position.epoch + 1}, {position.batches_done} batches in)")
        if is_main:
            discard_snapshots_after(paths.run_dir, position.step)
    validation = ValidationHistory(paths.run_dir, held_out, position.step if resume_from is not None else None, record=is_main)

    if is_main:
        write_json_atomic(paths.run_dir / RESOLVED_CONFIG, resolved_config)
    sinks = cfg if is_main else cfg.replace(log_to_tensorboard=False, log_to_wandb=False)
    reporter = Reporter(sinks, paths.run_dir / "logs", job, max_steps, history=paths.run_dir / METRICS_FILE if is_main else None,
                        resumed_step=position.step if resume_from is not None else None)  # fmt: skip
    exports = {"diffusers": WEIGHTS_NAME}  # the files the model card names
    if "kohya" in parse_export_formats(cfg.export_formats):
        exports["kohya"] = community_file_name(family, cfg.adaptor_name, cfg.lora_type)
    card_facts = {"images": examples.row_count, "datasets": datasets_used, "processes": processes, "family_title": family.title, "hub_tag": family.hub_tag,
                  "steps_per_epoch": steps_per_epoch, "renders_edits_only": family.renders_edits_only, **family.loading_code(str(weight_dtype))}  # fmt: skip
    log(
        f"{examples.row_count} images, {len(examples)} examples per epoch, {steps_per_epoch} optimizer steps per epoch, {max_steps} steps over {num_epochs} "
        f"epochs; {trainable:,} trainable parameters on {accelerator.device}"
        + (f"; {placed.compiled} modules compiled ({cfg.torch_compile}, {cfg.torch_compile_backend}): the first step of each bucket shape compiles"
           if placed.compiled else "")
    )

    def checkpoint(epoch: int, batches_done: int) -> None:
        """Written by the main process (the weights are the same on all; each one's RNG is gathered)."""
        rng = rng_states(processes)
        if is_main:
            configs = {RESOLVED_CONFIG: resolved_config, INPUT_CONFIG: input_config}
            try_save_checkpoint(checkpoint_root(paths.run_dir), Position(step, epoch, batches_done), state, rng, configs,
                                cfg.checkpoints_total_limit, log)  # fmt: skip
        accelerator.wait_for_everyone()

    def validate() -> None:
        """The validation loss of the weights as they are now (modules in eval mode), reported by the main process."""
        loss = validation.measure(step, family, objective, accelerator.autocast)
        if loss is not None:
            reporter.metrics(step, {"validation/loss": loss})
            log(f"step {step}: validation loss {loss:.5f} ({held_out.size} held-out images)")

    def save_adapters() -> None:
        """The adapter from the weights that count (EMA when on), the raw weights beside it. Main process.
        A failed write (a full disk) ends the run in one line naming what is kept."""
        try:
            if ema is not None:
                save_adapter_atomic(family, modules, paths.adapter_dir / "raw", resolved_config)
            with ema.swapped_in() if ema is not None else nullcontext():
                save_adapter_atomic(family, modules, paths.adapter_dir, resolved_config)
        except WRITE_ERRORS as error:
            raise save_failure(error, paths.adapter_dir, cfg, trainable, resolve_resume("latest", paths.run_dir)) from None

    def save_and_render(epoch: int, render: bool = True) -> None:
        """The adapter, then the validation loss and eval images of the same weights; saving first means a
        failure while rendering cannot cost the trained weights. Every process evaluates (a sharded base needs
        them all for each forward; unsharded, the others would only wait), the main one writes."""
        for module in modules.values():
            module.eval()
        if is_main:
            save_adapters()
        with ema.swapped_in() if ema is not None else nullcontext(), family.unparked():  # encoders come over once for both
            validate()
            images = rendered_evaluation(family, prompts, cfg.eval_seed, step, paths.adapter_dir) if prompts and render else []
        if is_main:
            if images:
                result.eval_images.append(save_evaluation(images, paths.run_dir / "eval_images", epoch, [p.settings.get("image") for p in prompts]))
                reporter.images(step, "eval", images, result.eval_images[-1])
            write_model_card(paths.adapter_dir, paths.run_dir, resolved_config, [p.text for p in prompts], {**card_facts, "steps": step}, exports)
        for module in modules.values():
            module.train()
        accelerator.wait_for_everyone()

    def accumulate_gradients(group: list[tuple[dict | None, float]], epoch: int) -> float:
        """Backward over one optimizer step's micro-batches, each scaled by 1/len(group) so accumulation
        keeps the learning rate (and by this process's share of the global batch), then the gradients are
        averaged over the processes; returns the step's mean loss. A non-finite loss stops the run here,
        before the optimizer can write it into the weights."""
        step_loss = 0.0
        with sdpa_kernel(list(TRAINING_ATTENTION)):
            for batch, share in group:
                if batch is None:  # this process's slice of a small global batch is empty
                    continue
                generators = sample_generators(cfg.seed, epoch, batch["indices"])
                loss, reported = denoising_loss(family, objective, conditioning, batch, generators, accelerator.autocast)
                accelerator.backward(loss * share / len(group))
                step_loss += reported.item() * share / len(group)
        step_loss = average_gradients(parameters, step_loss, processes)
        if not math.isfinite(step_loss):
            raise TrainingDiverged(
                f"the loss became {step_loss} at step {step}; the adapter saved before it is kept. "
                "Lower learning_rate, or use bf16 instead of fp16"
            )
        return step_loss

    def update(group: list[tuple[dict | None, float]], epoch: int) -> None:
        """Optimizer step number `step`: gradients, clipping, the update, the LR schedule, EMA, metrics."""
        step_started = time.perf_counter()
        step_loss = accumulate_gradients(group, epoch)
        grad_norm = accelerator.clip_grad_norm_(lora_parameters.values(), cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(step)
        if snapshot_every and (step % snapshot_every == 0 or step == max_steps):
            write_snapshot(paths.run_dir, step, ema, modules)
        result.losses.append(step_loss)
        result.step_seconds.append(time.perf_counter() - step_started)
        metrics = {"train/loss": step_loss, "train/lr": lr_schedule.get_last_lr()[0]}
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        reporter.metrics(step, metrics)
        if memory is not None and len(result.losses) == 1:  # the first step of this run: its peak beside the plan
            log(peak_report(memory, accelerator.device))
        progress.update(1)
        progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{metrics['train/lr']:.2e}")

    result = RunResult(adapter_path=paths.adapter_dir / WEIGHTS_NAME)
    step, epoch = position.step, position.epoch
    progress = tqdm(total=max_steps, initial=step, desc="training", disable=not accelerator.is_local_main_process)
    if resume_from is None:
        for module in modules.values():
            module.eval()
        validate()  # the base model's, the curve's first point
    for module in modules.values():
        module.train()
    with StopRequest(log, poll=job.stop_requested) as stop:
        try:
            for epoch in range(position.epoch, num_epochs):
                if step >= max_steps:
                    break
                skip = position.batches_done if epoch == position.epoch else 0
                examples.set_epoch(epoch)
                sampler.set_epoch(epoch, skip)
                batches_done = skip
                for group in accumulation_groups(zip(loader, sampler.shares()), cfg.gradient_accumulation_steps):
                    step += 1
                    update(group, epoch)
                    batches_done += len(group)
                    stopping = any_process(stop.requested, processes, accelerator.device)
                    if stopping or (cfg.checkpointing_steps and step % cfg.checkpointing_steps == 0):
                        checkpoint(epoch, batches_done)
                    if stopping:
                        save_and_render(epoch + 1, render=False)
                        raise TrainingStopped(f"stopped by {stop.reason or 'another process'} at step {step}; checkpoint and adapter written. "
                                              "Resume with resume_from_checkpoint: latest")  # fmt: skip
                    if step >= max_steps:
                        break
                if (epoch + 1) % cfg.eval_steps == 0 and step < max_steps:
                    save_and_render(epoch + 1)
            save_and_render(epoch + 1)
        finally:  # logs flushed and the W&B run closed on errors and Ctrl-C too
            progress.close()
            reporter.close()
    accelerator.end_training()  # the process group goes before the interpreter: gloo's threads can abort a finished run's exit
    result.steps = step
    result.cache_counts = conditioning.counts()
    log(f"trained {step} steps in {sum(result.step_seconds):.1f}s (evaluation excluded); adapter: {result.adapter_path}")
    if result.eval_images:
        log(f"eval images: {result.eval_images[-1].parent}")
    return result
