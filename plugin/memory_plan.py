"""The accelerator memory a run will need, worked out before any weight loads, and the cheapest settings that fit
a budget (`memory_plan: auto`, `memory_budget_gb`).

Weights are counted, not guessed: every component is built from its config on the meta device (no memory behind
it) and its parameters are summed at the bytes they will be stored in: the run's dtype, float8 for blocks in fp8
storage, a quantised format's bytes for linear weights, fp32 where a model keeps layers in fp32 (T5's `wo`).
The training step's own memory (activations, their gradients, the LoRA gradients) is measured rather than
modelled: one step of the run's own code (the family's `predict` on the denoiser built on the meta device, LoRA
attached, gradient checkpointing as planned) runs on meta tensors while `LiveBytes` adds up the tensors alive
after every operation. No formula is kept per architecture, so a family is planned as soon as it trains.

Attention is the one substitution: on meta tensors PyTorch picks its math kernel, which holds the L x L scores
that no accelerator's fused kernel (flash, memory-efficient) allocates, and a function mode cannot swap it (the
recompute of gradient checkpointing runs outside function modes). For the step, meta attention is a stand-in
with the fused kernels' memory: the output, and the log-sum-exp it saves for backward.

What is not counted: the allocator's fragmentation and kernel workspaces, and the evaluation's activations (the
table's evaluation total is the weights that are on the accelerator while images render). After the first step
a CUDA run logs its measured peak beside the plan.
"""

from __future__ import annotations

import inspect
import os
import resource
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .cache import with_controls
from .compilation import repeated_blocks
from .data.controls import control_folders
from .errors import ConfigError
from .families.description import component_class, is_module_class, reads_text, without_diffusers_deprecations

GB = 1e9
# Bytes of optimizer state per trainable parameter: AdamW's two fp32 moments, 8-bit AdamW's two 8-bit ones,
# Prodigy's moments plus its s and p0 copies; Adafactor's factored second moment is counted by shape.
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw_8bit": 2, "prodigy": 16}
# Bytes per linear weight of a quantised base: one per weight for int8 and fp8 (plus a scale per output
# channel), half a byte for nf4 plus an fp32 absmax per 64 weights.
QUANTISED_WEIGHT_BYTES = {"int8": 1.0, "fp8": 1.0, "nf4": 0.5 + 4 / 64}
PREFETCH_WINDOW = 2  # compute copies alive at once with stored blocks: the computing block and the next one
PLANNED = ("offload_text_encoders", "gradient_checkpointing", "base_storage_dtype", "offload_blocks")  # what auto chooses, cheapest first


class LiveBytes(TorchDispatchMode):
    """The bytes of tensor storage alive, and their peak, over the operations run inside it (on any device,
    meta included). Storage existing before it opens (weights, inputs) is not counted."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {StorageWeakRef(t.untyped_storage()).cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and StorageWeakRef(tensor.untyped_storage()).cdata not in inputs:  # not a view or in place
                self._count(tensor.untyped_storage())
        return out

    def _count(self, storage) -> None:
        ref = StorageWeakRef(storage)
        known = self.live.get(ref.cdata)
        if known is not None and not known[0].expired():
            return  # a view, or an op writing in place
        if known is not None:
            self.now -= self.live.pop(ref.cdata)[1]
        self.live[ref.cdata] = (ref, storage.nbytes())
        self.now += storage.nbytes()
        if self.now > self.peak:  # freed storage is subtracted only when it could matter: here
            for key in [key for key, (old, _) in self.live.items() if old.expired()]:
                self.now -= self.live.pop(key)[1]
            self.peak = max(self.peak, self.now)


class _FusedAttentionMemory(torch.autograd.Function):
    """Attention's shapes with a fused kernel's memory: saves q, k, v, the mask, the output and a float32
    log-sum-exp."""

    @staticmethod
    def forward(ctx, query, key, value, mask):
        out = query.new_empty(*query.shape[:-1], value.shape[-1])
        ctx.save_for_backward(query, key, value, mask, out, query.new_empty(query.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, *_ = ctx.saved_tensors
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), None


@contextmanager
def fused_attention_on_meta():
    """Within the block, scaled-dot-product attention on meta tensors is `_FusedAttentionMemory` (see the module
    docstring); on any other device it is PyTorch's own. The module attribute is restored on leaving."""
    sdpa = F.scaled_dot_product_attention

    def attention(*args, **kwargs):
        named = dict(zip(("query", "key", "value", "attn_mask"), args), **kwargs)
        if named["query"].device.type == "meta":
            return _FusedAttentionMemory.apply(named["query"], named["key"], named["value"], named.get("attn_mask"))
        return sdpa(*args, **kwargs)

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


def step_bytes(family, batch_size: int, resolution: int, text_cached: bool = False, references: int = 0) -> int:
    """Peak bytes of one training step (forward, loss, backward) of `family` as loaded and set up (its pipeline
    real, or from `meta_pipeline`), on square latents of `resolution` pixels and the longest captions, with
    `references` control images per target (an edit model's); with `text_cached` the captions' encoding is not
    part of the step."""
    denoiser = family.denoiser
    device = denoiser.device
    batch = {"original_sizes": torch.tensor([[resolution, resolution]] * batch_size), "crop_top_lefts": torch.zeros(batch_size, 2, dtype=torch.long),
             "loss_weights": torch.ones(batch_size)}  # fmt: skip
    shape = family.latent_shape(batch_size, resolution, resolution)
    cached = family.planning_text(batch_size) if text_cached else None  # a cache's entries exist before the step
    with fused_attention_on_meta(), LiveBytes() as live:
        text = cached if cached is not None else family.planning_text(batch_size)
        if references:  # an edit model's controls, at the target's size or their own resolution
            control_shape = family.latent_shape(batch_size, *family.pairing().control_target((resolution, resolution)))
            text = with_controls(text, torch.zeros(batch_size, references, *control_shape[1:], device=device))
        latents = torch.zeros(shape, device=device)
        timesteps = torch.full((batch_size,), 500.0, device=device)
        prediction = family.predict(latents, timesteps, text, batch)
        (prediction.float() - latents).square().mean().backward()
        del cached, text, latents, prediction
    for parameter in denoiser.parameters():
        parameter.grad = None
    return live.peak


def meta_pipeline(family, dtype: torch.dtype):
    """The family's pipeline with every module built from its config on the meta device, in `dtype` (kept in
    fp32 where the model keeps layers so), and the described tokenizers."""
    description = family.description
    components = {}
    for name, class_name in description.components.items():
        if class_name is None or reads_text(name):
            continue
        cls = component_class(description.libraries[name], class_name, name)
        if name == "scheduler":
            components[name] = cls.from_config(description.scheduler_config)
        elif is_module_class(cls):
            components[name] = meta_module(cls, config_source(description, name, family.denoiser_name), name, dtype)
    available = {**components, **description.tokenizers}
    wanted = [p for p in inspect.signature(family.pipeline_class.__init__).parameters.values() if p.default is inspect.Parameter.empty]
    pipe = family.pipeline_class(**{p.name: available.get(p.name) for p in wanted if p.name != "self"})
    for module in components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False).eval()
    return pipe


def config_source(description, component: str, denoiser_name: str) -> str:
    """Where a component's config is read: the model itself, or for a single-file checkpoint its config folder
    (and text_encoder_source for the components it supplies)."""
    single = description.single_file
    if single is None:
        return description.source
    return single.components_from if single.components_from and component != denoiser_name else single.config


def meta_module(cls: type, source: str, component: str, dtype: torch.dtype) -> torch.nn.Module:
    with init_empty_weights(include_buffers=True), without_diffusers_deprecations():  # buffers too: the step runs on meta
        if hasattr(cls, "config_class"):  # Transformers
            module = cls(cls.config_class.from_pretrained(source, subfolder=component))
        else:
            module = cls.from_config(cls.load_config(source, subfolder=component))
    keep = tuple(getattr(module, "_keep_in_fp32_modules", None) or ())
    for name, parameter in module.named_parameters():
        parameter.data = parameter.data.to(torch.float32 if any(k in name.split(".") for k in keep) else dtype)
    return module


def frozen_bytes(module: torch.nn.Module, quantised: str = "none") -> int:
    """Bytes of a module's frozen parameters as stored; with `quantised` its linear layers' weights are."""
    weights = {id(m.weight) for m in module.modules() if isinstance(m, torch.nn.Linear)} if quantised != "none" else set()
    total = 0
    for parameter in module.parameters():
        if parameter.requires_grad:
            continue
        if id(parameter) in weights:
            total += int(parameter.numel() * QUANTISED_WEIGHT_BYTES[quantised]) + parameter.shape[0] * 4
        else:
            total += parameter.numel() * parameter.element_size()
    return total


def optimizer_state_bytes(optimizer: str, parameters: list[torch.nn.Parameter]) -> int:
    if optimizer == "adafactor":  # factored second moments: a row and a column vector per matrix
        return sum(4 * (sum(p.shape) if p.dim() == 2 else p.numel()) for p in parameters)
    return OPTIMIZER_STATE_BYTES[optimizer] * sum(p.numel() for p in parameters)


@dataclass(frozen=True)
class Row:
    component: str
    where: str  # "accelerator" or "host"
    size: int  # bytes
    training: bool = True  # there while the model trains
    evaluation: bool = True  # there while evaluation images render


@dataclass(frozen=True)
class MemoryPlan:
    settings: dict  # the values of PLANNED this plan uses
    rows: tuple[Row, ...]

    def total(self, phase: str) -> int:
        return sum(row.size for row in self.rows if row.where == "accelerator" and getattr(row, phase))

    @property
    def peak(self) -> int:
        return max(self.total("training"), self.total("evaluation"))

    def table(self, budget: float) -> str:
        lines = [f"memory plan (estimated before loading; budget {size_text(budget)}): " + ", ".join(f"{k}={v}" for k, v in self.settings.items()),
                 f"  {'component':<44} {'where':<12} {'when':<11} {'size':>10}"]  # fmt: skip
        for row in self.rows:
            when = "always" if row.training and row.evaluation else "training" if row.training else "evaluation"
            lines.append(f"  {row.component:<44} {row.where:<12} {when:<11} {size_text(row.size):>10}")
        lines.append(f"  on the accelerator: {size_text(self.total('training'))} while training, {size_text(self.total('evaluation'))} while evaluating")
        return "\n".join(lines)


def size_text(size: float) -> str:
    return f"{size / GB:.2f} GB" if size >= 0.01 * GB else f"{size / 1e6:.2f} MB"


class Planner:
    """The meta-device model of one run, built once; `plan(settings)` estimates any choice of PLANNED values."""

    def __init__(self, family, cfg, dtype: torch.dtype):
        self.cfg, self.dtype = cfg, dtype
        self.family = type(family)(family.description)
        self.family.cfg = cfg
        self.family.pipe = meta_pipeline(self.family, dtype)
        modules = self.family.attach_lora()
        self.trainable = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
        self.modules = modules
        quantised = cfg.base_quantization
        self.blocks = repeated_blocks(self.family.denoiser)
        self.block_sizes = [frozen_bytes(b, quantised) for b in self.blocks]  # as computed with
        self.block_fp8_sizes = [sum(p.numel() for p in b.parameters() if not p.requires_grad) for b in self.blocks]
        self.outside_blocks = frozen_bytes(self.family.denoiser, quantised) - sum(self.block_sizes)
        self._steps: dict[bool, int] = {}
        # Control images per target: one per control_dir folder; else what a model that needs them takes (a
        # control column's count is known only once the data loads, after the plan).
        self.references = len(control_folders(cfg.control_dir)) or (0 if family.controls_optional else family.control_images)

    def step(self, checkpointing: bool) -> int:
        """The training step's peak; asked without checkpointing before with it (checkpointing only turns on)."""
        if checkpointing not in self._steps:
            if checkpointing:
                self.family.enable_gradient_checkpointing(self.modules)
            else:
                assert True not in self._steps, "a step without checkpointing is measured before checkpointing turns on"
            self._steps[checkpointing] = step_bytes(self.family, self.cfg.train_batch_size, self.cfg.resolution, self.cfg.cache_text_embeddings,
                                                    self.references)  # fmt: skip
        return self._steps[checkpointing]

    def plan(self, settings: dict) -> MemoryPlan:
        cfg, family = self.cfg, self.family
        stored_fp8 = settings["base_storage_dtype"] != "none"
        offloaded = settings["offload_blocks"]
        stored = self.block_fp8_sizes if stored_fp8 else self.block_sizes
        kept = len(self.blocks) - offloaded
        rows = [Row(f"{family.denoiser_name}: outside its blocks", "accelerator", self.outside_blocks),
                Row(f"{family.denoiser_name}: {kept} blocks" + (" in fp8" if stored_fp8 else ""), "accelerator", sum(stored[:kept]))]  # fmt: skip
        if offloaded:
            rows.append(Row(f"{family.denoiser_name}: last {offloaded} blocks" + (" in fp8" if stored_fp8 else ""), "host", sum(stored[kept:])))
        if offloaded or stored_fp8:
            rows.append(Row(f"compute copies of {PREFETCH_WINDOW} blocks", "accelerator", PREFETCH_WINDOW * max(self.block_sizes)))
        lora = sum(p.numel() * p.element_size() for p in self.trainable)
        rows.append(Row(f"LoRA weights and {cfg.optimizer} state", "accelerator", lora + optimizer_state_bytes(cfg.optimizer, self.trainable)))
        if cfg.use_ema:
            rows.append(Row("LoRA moving average", "accelerator", lora))
        rows.append(Row("training step (activations, gradients)", "accelerator", self.step(settings["gradient_checkpointing"]), evaluation=False))
        rows += self._encoder_rows(settings["offload_text_encoders"])
        return MemoryPlan(dict(settings), tuple(rows))

    def _encoder_rows(self, offload_text: bool) -> list[Row]:
        """The text encoders and VAE: on the accelerator for the whole run unless a cache stands in for them
        while training (they come back for evaluation) or offload_text_encoders keeps the text ones on the host."""
        cfg, rows = self.cfg, []
        for name, module in self.family.pipe.components.items():
            if not isinstance(module, torch.nn.Module) or module is self.family.denoiser:
                continue
            text = name.startswith("text_encoder")
            size = frozen_bytes(module, cfg.base_quantization if text and cfg.quantize_text_encoders and not cfg.train_text_encoder else "none")
            if text and offload_text:
                rows.append(Row(name, "host", size))
            else:
                cached = cfg.cache_text_embeddings if text else cfg.cache_latents
                rows.append(Row(name, "accelerator", size, training=not cached))
        return rows


def budget_bytes(cfg, accelerator) -> float:
    """memory_budget_gb, or the accelerator's free memory (the smallest over the processes), or on a CPU run the
    host's available memory."""
    if cfg.memory_budget_gb > 0:
        return cfg.memory_budget_gb * GB
    device = accelerator.device
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if accelerator.num_processes > 1:
        free = accelerator.gather(torch.tensor([float(free)], device=device)).min().item()
    return float(free)


def candidate_settings(cfg, block_count: int):
    """The choices `memory_plan: auto` tries, cheapest first: the run as set, then each saving added to the
    ones before it (what the settings set on stays on), the offloaded blocks one at a time. A saving the run's
    other settings rule out (see plugin/offloading.py) is skipped."""
    settings = {name: getattr(cfg, name) for name in PLANNED}
    yield dict(settings)
    for name, value in (("offload_text_encoders", True), ("gradient_checkpointing", True)):
        if not settings[name]:
            settings[name] = value
            yield dict(settings)
    storable = cfg.torch_compile == "none" and not cfg.shard_base_model
    if storable and cfg.base_quantization == "none" and settings["base_storage_dtype"] == "none":
        settings["base_storage_dtype"] = "fp8_e4m3"
        yield dict(settings)
    if storable and cfg.base_quantization != "nf4":
        for count in range(settings["offload_blocks"] + 1, block_count + 1):
            yield {**settings, "offload_blocks": count}


def plan_memory(cfg, family, accelerator, dtype: torch.dtype, log=print) -> tuple[object, MemoryPlan | None]:
    """The run's config with the memory plan applied, and the plan (None when no plan was asked for: memory_plan
    manual with no budget); see `choose`."""
    if cfg.memory_plan == "manual" and cfg.memory_budget_gb == 0:
        return cfg, None
    chosen = choose(Planner(family, cfg, dtype), budget_bytes(cfg, accelerator), log)
    family.cfg = cfg = cfg.replace(**chosen.settings)  # the family trains with the planned settings too
    return cfg, chosen


def choose(planner: Planner, budget: float, log=print) -> MemoryPlan:
    """memory_plan auto: the first of `candidate_settings` that fits the budget; manual: the settings as given,
    refused when over it. Refused either way with the smallest budget that would do. The plan is logged."""
    cfg = planner.cfg
    candidates = list(candidate_settings(cfg, len(planner.blocks))) if cfg.memory_plan == "auto" else [{n: getattr(cfg, n) for n in PLANNED}]
    plans = [planner.plan(settings) for settings in candidates]  # sums over sizes counted once: cheap
    chosen = next((plan for plan in plans if plan.peak <= budget), None)
    if chosen is None:
        smallest = min(plans, key=lambda plan: plan.peak)  # not always the last: two blocks' compute copies can outweigh a small model's stored blocks
        log(smallest.table(budget))
        what, fixes = ("the settings as given need", "set memory_plan to auto, ") if cfg.memory_plan == "manual" else ("the smallest plan needs", "")
        raise ConfigError(f"memory_budget_gb: {size_text(budget)} is too small for this run: {what} {size_text(smallest.peak)} "
                          f"(table above); {fixes}raise the budget, or lower resolution, train_batch_size or lora_r")  # fmt: skip
    log(chosen.table(budget))
    return chosen


def peak_report(plan: MemoryPlan, device: torch.device) -> str:
    """The measured peak beside the plan: the CUDA allocator's peak on a GPU, the process's peak resident memory
    on a CPU run (everything the process holds, host copies and libraries included)."""
    planned = f"plan: {size_text(plan.total('training'))} while training, {size_text(plan.total('evaluation'))} while evaluating"
    if device.type == "cuda":
        return f"memory: {size_text(torch.cuda.max_memory_allocated(device))} allocated at the peak so far ({planned})"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    return f"memory: the process's peak resident memory is {size_text(peak)}, host copies and libraries included ({planned})"
