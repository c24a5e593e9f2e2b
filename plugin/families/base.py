"""The one interface every model family implements, so the training loop never asks which family it runs.

A family wraps a loaded Diffusers pipeline and knows how that architecture is conditioned: how prompts
become embeddings, images become latents, a noisy latent becomes a prediction, which modules take LoRA,
which objective (DDPM or flow matching) it trains with, and which pipeline class saves its adapters.
"""

from __future__ import annotations

import inspect
import json
import math
import warnings
from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Any, ClassVar, Mapping

import torch
from diffusers import DDPMScheduler, DDIMScheduler, DiffusionPipeline, PipelineQuantizationConfig
from peft import LoraConfig
from safetensors import SafetensorError

from ..adapters import adapter_config, peft_type
from ..data.controls import Pairing
from ..errors import ConfigError
from ..objectives import DiffusionObjective, FlowMatchingObjective, dynamic_shift_mu
from ..quantization import keep_quantized_for_backward, own_weights, quiet_quantizers
from ..settings import parse_eval_prompts
from .description import ModelDescription, without_diffusers_deprecations
from .single_file import load_single_file

TEXT_ENCODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


class ModelFamily(ABC):
    """A pipeline (described first, loaded later) plus everything architecture-specific about training it.

    Everything up to and including `configure` reads only the description, so every setting is checked
    before `load` reads the weights."""

    name: ClassVar[str]  # short id: sd, sdxl, sd3, flux, chroma, zimage, qwen_image, flux2
    title: ClassVar[str]
    pipeline_class: ClassVar[type[DiffusionPipeline]]
    pipeline_class_names: ClassVar[tuple[str, ...]]  # model_index.json _class_name values that map here
    denoiser_name: ClassVar[str]  # "unet" or "transformer"
    default_lora_targets: ClassVar[tuple[str, ...]]
    eval_negative_prompts: ClassVar[bool] = True  # the pipeline takes a negative prompt (kohya's --n)
    lora_text_encoders: ClassVar[tuple[str, ...]] = ()  # pipeline components that may take a text-encoder LoRA
    control_images: ClassVar[int] = 0  # an edit model's control images per target at most (plugin/data/controls.py); 0: none
    controls_optional: ClassVar[bool] = False  # it trains text to image too, on pairs only where the datasets give controls
    control_resolution: ClassVar[int] = 0  # its pipelines' controls are about this squared in pixels (control_resolution); 0: the image's size
    control_multiple: ClassVar[int] = 16  # the sides of controls at their own resolution are multiples of this
    renders_edits_only: ClassVar[bool] = False  # its pipeline needs a control image to render (eval_control_image)
    text_reads_controls: ClassVar[bool] = False  # its text encoder reads the prompt with the control images (`encode_text`)
    hub_tag: ClassVar[str]  # the family's Hugging Face tag, for the model card
    # The community layout of the adapter (plugin/kohya.py): kohya's key prefix per component, or None for
    # ComfyUI's layout of Diffusers keys with the scale folded in; kohya's ss_base_model_version.
    kohya_prefixes: ClassVar[dict[str, str] | None] = None
    # ComfyUI's layout (families without a kohya one): the key prefix of the denoiser's modules (its Diffusers
    # component name, or `diffusion_model` where the peers' files and Diffusers' converter use that), and whether
    # LoRA modules carry `.alpha` (scale x rank) or the scale folded into lora_B (where Diffusers refuses `.alpha`).
    comfyui_prefix: ClassVar[str | None] = None
    comfyui_alpha: ClassVar[bool] = False
    kohya_base_model_version: ClassVar[str]
    # A family with an original (BFL) layout (plugin/lora_layouts.py): each original module ("{i}" the block) with
    # the Diffusers modules of the denoiser it holds, fused in that order; their widths in units of the first's
    # where they differ; and the modules whose two output halves Diffusers orders the other way.
    original_lora_modules: ClassVar[dict[str, tuple[str, ...]]] = {}
    fused_lora_widths: ClassVar[dict[str, tuple[int, ...]]] = {}
    swapped_lora_modules: ClassVar[tuple[str, ...]] = ()
    lora_key_pattern: ClassVar[str]  # a regex that LoRA module names of this family match (lora inspect)
    # Single-file checkpoints (plugin/families/single_file.py): key names (bare or under a prefix) that all
    # appear in this family's files, and the key prefix under which each other component sits in the file.
    single_file_markers: ClassVar[tuple[str, ...]]
    single_file_components: ClassVar[dict[str, str]]

    def __init__(self, description: ModelDescription):
        self.description = description
        self.pipe: DiffusionPipeline | None = None  # set by load()
        self.cfg = None  # the resolved run config, set by configure()
        self.parked: list[torch.nn.Module] = []  # encoders kept off the accelerator while caches stand in
        self.unparked_now = False  # inside an `unparked` block
        self.quantized: list[str] = []  # components loaded quantised (plugin/quantization.py)

    # ----- loading and preparation -------------------------------------------------------------------
    def load(self, dtype: torch.dtype, quantization: Mapping[str, Any] | None = None) -> None:
        """The pipeline's weights, frozen and in eval mode (the described tokenizers are reused); the components
        in `quantization` (see plugin/quantization.py) quantised as they load."""
        source, quantization = self.description.source, dict(quantization or {})
        self.quantized = list(quantization)
        try:
            with quiet_quantizers(), without_diffusers_deprecations():
                if self.description.single_file is not None:
                    pipe = load_single_file(self, dtype, quantization)
                else:
                    quantized = {"quantization_config": PipelineQuantizationConfig(quant_mapping=quantization)} if quantization else {}
                    pipe = self.pipeline_class.from_pretrained(source, dtype=dtype, **self.description.loading_tokenizers, **quantized)
            pipe.register_modules(**{name: self.description.tokenizers[name] for name in self.description.stand_ins})
        except (OSError, ValueError, SafetensorError) as error:
            raise ConfigError(f"model_name: cannot load the weights of {source!r}: {str(error).splitlines()[0]}") from None
        for name in self.quantized:
            keep_quantized_for_backward(getattr(pipe, name))
        if dtype == torch.float16:
            _keep_in_fp32(pipe.vae)
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.requires_grad_(False).eval()
        self.pipe = pipe

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_name)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.description.vae_config["block_out_channels"]) - 1)

    @property
    def resolution_multiple(self) -> int:
        """Image sides must be multiples of this (VAE downsampling times the denoiser's patch size)."""
        return self.vae_scale_factor

    @property
    def eval_size_multiple(self) -> int:
        """Evaluation images' sides must be multiples of this: the pipeline's own rule (its `check_inputs`)."""
        return self.resolution_multiple

    @abstractmethod
    def native_resolution(self) -> int:
        """The resolution the model was trained at, used when the user leaves resolution at 0."""

    def to(self, device: torch.device, text_encoders: bool = True) -> None:
        """Move the pipeline to `device`; with `text_encoders` False its text encoders stay parked on the CPU
        (offload_text_encoders), where prompts are encoded and from where the embeddings are moved."""
        for name, component in self.pipe.components.items():
            if isinstance(component, torch.nn.Module) and (text_encoders or not name.startswith("text_encoder")):
                component.to(device)
                if name in self.quantized and device.type == "cpu":
                    own_weights(component)
        if not text_encoders:
            self.park_encoders(images=False, text=True)

    @property
    def text_device(self) -> torch.device:
        """Where the text encoders are, and so where prompts are encoded (the CPU while they are parked)."""
        encoder = next(m for n, m in self.pipe.components.items() if n.startswith("text_encoder") and isinstance(m, torch.nn.Module))
        return next(encoder.parameters()).device

    def park_encoders(self, images: bool, text: bool) -> None:
        """Move the VAE (`images`) and the text encoders (`text`) to the CPU, where caches replace them (or
        offload_text_encoders keeps them), so their accelerator memory goes to training; `unparked` brings them
        back for evaluation images. Parked modules stay parked."""
        names = (["vae"] if images else []) + ([n for n in self.pipe.components if n.startswith("text_encoder")] if text else [])
        parking = [m for m in (getattr(self.pipe, n, None) for n in names) if isinstance(m, torch.nn.Module)]
        self.parked += [m for m in parking if all(m is not p for p in self.parked)]
        for module in self.parked:
            module.to("cpu")

    @contextmanager
    def unparked(self):
        """Within the block the parked encoders sit on the denoiser's device (a no-op on a CPU run). A block
        inside another moves nothing, so callers that each need the encoders can nest without a round trip."""
        outermost = not self.unparked_now
        if outermost:
            for module in self.parked:
                module.to(self.denoiser.device)
            self.unparked_now = True
        try:
            yield
        finally:
            if outermost:
                for module in self.parked:
                    module.to("cpu")
                self.unparked_now = False

    def attach_lora(self) -> dict[str, torch.nn.Module]:
        """Put LoRA adapters on the denoiser (and text encoders when asked); returns the modules that train.

        The target names were checked against the model's module names by `configure`.
        """
        cfg = self.cfg
        targets = lora_targets(cfg, self.default_lora_targets)
        modules = {self.denoiser_name: self.denoiser}
        if cfg.train_text_encoder:
            modules.update({name: getattr(self.pipe, name) for name in self.lora_text_encoders})
        for name, module in modules.items():
            if name == self.denoiser_name:
                module.add_adapter(adapter_config(cfg, targets))
            else:  # text encoders take LoRA only (check_adapter_type)
                module.add_adapter(LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                              init_lora_weights="gaussian", target_modules=list(TEXT_ENCODER_LORA_TARGETS)))  # fmt: skip
        for module in modules.values():
            for parameter in module.parameters():
                if parameter.requires_grad:
                    parameter.data = parameter.data.float()  # LoRA weights and their optimizer state stay fp32
        return modules

    def enable_gradient_checkpointing(self, modules: dict[str, torch.nn.Module]) -> None:
        for name, module in modules.items():
            if name == self.denoiser_name:
                module.enable_gradient_checkpointing()
            else:
                module.gradient_checkpointing_enable()

    def enable_xformers(self) -> bool:
        """xFormers attention where it is installed; otherwise PyTorch SDPA (the default) with one warning."""
        try:
            import xformers  # noqa: F401

            self.denoiser.enable_xformers_memory_efficient_attention()
            return True
        except Exception as error:  # ImportError, or xFormers present but unusable (no CUDA)
            warnings.warn(f"xFormers is not usable here ({error}); using PyTorch scaled-dot-product attention instead")
            return False

    # ----- per-family configuration ------------------------------------------------------------------
    def configure(self, cfg):
        """Fill the parameters left at 'auto'/0 with this family's defaults; reject combinations it cannot train.

        Returns the resolved config (also kept for the training step) and what was filled in, for printing.
        """
        filled: dict[str, Any] = {}
        if cfg.resolution == 0:
            filled["resolution"] = self.native_resolution()
        resolution = filled.get("resolution", cfg.resolution)
        if resolution % self.resolution_multiple:
            raise ConfigError(
                f"resolution: {resolution} must be a multiple of {self.resolution_multiple} for {self.title} models"
            )
        for number, prompt in enumerate(parse_eval_prompts(cfg.eval_prompt), start=1):
            self._check_eval_prompt(number, prompt, cfg, resolution)
        self._check_trainable_model()
        if cfg.lora_target_modules.strip():  # named by the user: each must exist
            _check_targets_exist(self.description, lora_targets(cfg, self.default_lora_targets), f"this {self.title} {self.denoiser_name}")
        else:
            filled["lora_target_modules"] = ",".join(self._present_default_targets())
        self._check_pairs(cfg)
        if cfg.train_text_encoder and not self.lora_text_encoders:
            raise ConfigError(f"train_text_encoder: not supported for {self.title}; it is for SD 1.x/2.x and SDXL")
        filled.update(self._resolve_objective(cfg))
        self.cfg = cfg.replace(**filled)
        return self.cfg, filled

    def _check_pairs(self, cfg) -> None:
        """A model without controls refuses their settings. A model that needs them refuses class images (rendered
        images have no controls); one whose pipelines give controls a fixed size warns where training gives another."""
        if not self.control_images:
            given = ["control_dir"] * bool(cfg.control_dir.strip()) + ["control_resolution"] * bool(cfg.control_resolution) + [
                f"datasets[{i}].{key}" for i, entry in enumerate(cfg.datasets) for key in ("control_dir", "control_column") if key in entry]  # fmt: skip
            if given:
                raise ConfigError(f"{given[0]}: {self.title} models take no control images; edit models (Flux Kontext, Qwen-Image-Edit) train on pairs")
        rendered = [i for i, entry in enumerate(cfg.datasets) if entry.get("num_class_images")]
        if self.control_images and not self.controls_optional and rendered:
            raise ConfigError(f"datasets[{rendered[0]}].num_class_images: {self.title} models train on pairs, and rendered class images have no "
                              "controls; give regularisation pairs as a dataset with its controls")  # fmt: skip
        if self.control_resolution and cfg.control_resolution not in (0, self.control_resolution):
            warnings.warn(f"control_resolution: {cfg.control_resolution}: {self.title}'s pipelines give controls about {self.control_resolution}x"
                          f"{self.control_resolution} pixels whatever the image's size; trained at {cfg.control_resolution}, the LoRA learns "
                          "controls of another size than it will edit", stacklevel=3)  # fmt: skip

    def _check_eval_prompt(self, number: int, prompt, cfg, resolution: int) -> None:
        """A prompt renders at its own size (its --w/--h, else eval_width/eval_height, else resolution), which
        must follow the pipeline's own size rule; a negative prompt needs a pipeline that takes one."""
        for side, field in (("width", "eval_width"), ("height", "eval_height")):
            size = prompt.settings.get(side) or getattr(cfg, field) or resolution
            if size % self.eval_size_multiple:
                name = (f"eval_prompt: prompt {number}'s --{side[0]}" if side in prompt.settings else field if getattr(cfg, field)
                        else f"resolution ({field} 0: the evaluation images take it)")  # fmt: skip
                raise ConfigError(f"{name}: {size} is not a multiple of {self.eval_size_multiple}, the sizes "
                                  f"{self.pipeline_class.__name__} renders")
        if "negative_prompt" in prompt.settings and not self.eval_negative_prompts:
            raise ConfigError(f"eval_prompt: prompt {number}'s --n: {self.title} renders without a negative prompt "
                              "(its guidance is distilled into the model); leave --n out")

    def _present_default_targets(self) -> list[str]:
        """The family's default targets that this model has; one it lacks (a variant without that layer) is
        skipped with a warning naming it, and a model with none of them is an error."""
        present = [t for t in self.default_lora_targets if _target_matches(self.description, t)]
        missing = [t for t in self.default_lora_targets if t not in present]
        if not present:
            _check_targets_exist(self.description, missing[:1], f"this {self.title} {self.denoiser_name}")
        if missing:
            warnings.warn(f"lora_target_modules: this {self.title} {self.denoiser_name} has no layer named "
                          f"{', '.join(missing)}; LoRA goes on {', '.join(present)}", stacklevel=3)  # fmt: skip
        return present

    @property
    def latent_channels(self) -> int:
        """The VAE's latent channels (`z_dim` in the Wan-style VAE of Qwen-Image)."""
        vae = self.description.vae_config
        return vae["latent_channels"] if "latent_channels" in vae else vae["z_dim"]

    def latent_shape(self, batch_size: int, height: int, width: int) -> tuple[int, ...]:
        """The shape `encode_images` gives a batch of images of this size."""
        return batch_size, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor

    @property
    def denoiser_input_channels(self) -> int:
        """Channels a text-to-image denoiser of this family takes: the VAE's latent channels."""
        return self.latent_channels

    def _check_trainable_model(self) -> None:
        """Inpainting checkpoints (latents + mask + masked image) load but cannot train text-to-image."""
        channels = self.description.denoiser_config["in_channels"]
        if channels != self.denoiser_input_channels:
            raise ConfigError(
                f"model_name: this {self.title} {self.denoiser_name} takes {channels} input channels, not the "
                f"{self.denoiser_input_channels} of a text-to-image model (an inpainting checkpoint?); "
                "use the text-to-image base model"
            )

    @abstractmethod
    def _resolve_objective(self, cfg) -> dict[str, Any]:
        """Objective parameters this family fills in or rejects."""

    @abstractmethod
    def make_objective(self):
        """The objective (noising, target, weighting, loss) this family trains with."""

    def _objective_kwargs(self) -> dict[str, Any]:
        """The objective parameters every family passes through unchanged."""
        cfg = self.cfg
        return {
            "timestep_sampling": cfg.timestep_sampling,
            "logit_mean": cfg.logit_normal_loc,
            "logit_std": cfg.logit_normal_scale,
            "mode_scale": cfg.mode_scale,
            "loss_weighting": cfg.loss_weighting,
            "noise_offset": cfg.noise_offset,
            "input_perturbation": cfg.input_perturbation,
            "loss_type": cfg.loss_type,
            "huber_c": cfg.huber_c,
            "huber_schedule": cfg.huber_schedule,
        }

    def caption_token_limits(self) -> dict[str, int]:
        """How many tokens of a caption each tokenizer passes on (the rest is cut): CLIP's model_max_length;
        for the others (T5, Qwen, Mistral) the pipeline's max_sequence_length, at the default its encode_prompt
        uses (what training calls)."""
        limit = inspect.signature(self.pipeline_class.encode_prompt).parameters.get("max_sequence_length")
        return {
            name: limit.default if limit is not None and not type(tokenizer).__name__.startswith("CLIP") else tokenizer.model_max_length
            for name, tokenizer in self.description.tokenizers.items()
        }

    def check_caption_lengths(self, captions: set[str], trigger_word: str) -> None:
        """Warn once about captions longer than a text encoder reads, with how many and by how much; a trigger
        word that fills a limit alone is an error, since nothing of any caption would be read after it."""
        cut = []
        for name, limit in self.caption_token_limits().items():
            tokenizer = self.description.tokenizers[name]
            label = f"{name} ({type(tokenizer).__name__}, {limit} tokens)"
            if trigger_word.strip() and len(tokenizer(f"{trigger_word.strip()},").input_ids) >= limit:
                raise ConfigError(f"trigger_word: {trigger_word.strip()!r} alone fills the {limit}-token limit of {label}; shorten it")
            lengths = [len(ids) for ids in tokenizer(sorted(captions)).input_ids] if captions else []
            excess = [length - limit for length in lengths if length > limit]
            if excess:
                cut.append(f"{len(excess)} of {len(lengths)} captions exceed {label} and lose up to {max(excess)} tokens "
                           f"(mean {sum(excess) / len(excess):.0f})")  # fmt: skip
        if cut:
            warnings.warn("captions longer than a text encoder reads are cut at its limit: " + "; ".join(cut), stacklevel=2)

    # ----- the training step -------------------------------------------------------------------------
    @abstractmethod
    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Text conditioning for a batch of captions (with gradients only if a text encoder trains). An entry named
        `text_mask` (plugin/cache.py), 1 for a caption's tokens as a prefix, lets the text cache keep each caption's
        tensors cut to its length; `predict` must then accept the batch padded to its longest caption."""

    def encode_text(self, captions: list[str], control_pixels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """`encode_prompts`, given the controls' pixels (B, references, 3, h, w) where the batch has them: a family
        whose text encoder reads them (`text_reads_controls`) encodes each prompt with its controls."""
        return self.encode_prompts(captions)

    def pairing(self) -> Pairing:
        """What this model takes of pairs (plugin/data/controls.py), its control resolution as configured."""
        side = self.cfg.control_resolution or self.control_resolution
        return Pairing(self.control_images, self.controls_optional, side * side, self.control_multiple)

    def planning_text(self, batch_size: int) -> dict[str, torch.Tensor]:
        """`encode_prompts`' output for captions of the most tokens, as the memory planner's step takes it
        (plugin/memory_plan.py: the pipeline built on the meta device). Here the text encoders' own code on meta
        tensors, which CLIP and T5 run (they read no values). Families whose encoders read their attention masks'
        values give the shapes from the denoiser's config instead (`longest_text`)."""
        return self.encode_prompts([""] * batch_size)

    def longest_text(self, batch_size: int, width: int, tokens: int | None = None) -> torch.Tensor:
        """Embeddings of shape (B, `tokens` (default: the most caption tokens), `width`) in the denoiser's dtype, on
        its device."""
        tokens = tokens or max(self.caption_token_limits().values())
        return torch.zeros(batch_size, tokens, width, dtype=self.denoiser.dtype, device=self.denoiser.device)

    @staticmethod
    def all_tokens(embeds: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A mask keeping every token of `embeds`; on the CPU when they are meta tensors, for the indexing by
        mask values that `predict` does."""
        return torch.ones(embeds.shape[:2], dtype=dtype, device="cpu" if embeds.is_meta else embeds.device)

    @property
    def trains_text_encoder(self) -> bool:
        return bool(self.cfg is not None and self.cfg.train_text_encoder)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] to the shifted and scaled latents the denoiser works in (fp32).

        The posterior mean is used rather than a sample: the VAE's posterior std is tiny, and a deterministic
        latent is what makes latent caching possible. Returned in the standard (contiguous) memory layout.
        """
        vae = self.pipe.vae
        with torch.no_grad():
            latents = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist.mode()
        shift = vae.config.get("shift_factor") or 0.0  # SD3/Flux VAEs shift as well as scale
        # oneDNN's convolutions may hand back channels-last tensors; the standard layout makes a fresh latent
        # and a cached one take the same kernels in the denoiser, so cached and uncached runs agree.
        return ((latents.float() - shift) * vae.config.scaling_factor).contiguous()

    @abstractmethod
    def predict(self, noisy_latents, timesteps, text: dict, batch: dict) -> torch.Tensor:
        """The denoiser's output for noisy latents, in the same layout as the latents."""

    # ----- evaluation and export ---------------------------------------------------------------------
    def eval_pipeline(self) -> DiffusionPipeline:
        """An inference pipeline sharing the loaded (LoRA-carrying) modules and the pipeline's own settings:
        nothing reloaded from disk. Built with the constructor, not `from_pipe`, which casts every module it
        shares to float32: a bf16 base became fp32 for the rest of the run at its first evaluation, and a
        quantised one cannot be cast at all."""
        components, config = self.pipe.components, self.pipe.config
        arguments = {name: components[name] if name in components else config[name]
                     for name in inspect.signature(self.pipeline_class.__init__).parameters if name in components or name in config}  # fmt: skip
        pipe = self.pipeline_class(**arguments)
        pipe.set_progress_bar_config(**getattr(self.pipe, "_progress_bar_config", {}))
        return pipe

    def eval_call_kwargs(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "num_inference_steps": cfg.eval_num_inference_steps,
            "guidance_scale": cfg.eval_guidance_scale,
            "height": cfg.eval_height or cfg.resolution,
            "width": cfg.eval_width or cfg.resolution,
        }

    def control_size(self, width: int, height: int) -> tuple[int, int]:
        """The size an evaluation's control image is given to the pipeline at, as training sees it: the image's,
        or at the control resolution in the image's aspect ratio."""
        return self.pairing().control_target((height, width))[::-1]

    @classmethod
    def pipeline_arguments(cls, settings: dict[str, Any]) -> dict[str, Any]:
        """One evaluation image's settings (eval_* and the prompt's own flags) as this pipeline's call takes them."""
        return settings

    @classmethod
    def single_file_to_diffusers(cls, checkpoint: dict, config, convert) -> dict:
        """A single file's denoiser tensors under Diffusers' names: `convert` is the key mapping Diffusers'
        `from_single_file` uses for the denoiser class. Works on meta tensors too (the check before loading)."""
        return convert(checkpoint=checkpoint, config=config)

    def loading_code(self, dtype: str) -> dict[str, list[str]]:
        """How the base model loads in plain Diffusers, for the model card: the classes to import and the lines
        that set `pipe` in `dtype` (such as "torch.bfloat16"); a single file takes its configs, and the
        components it lacks, from where the run did."""
        pipeline, source = self.pipeline_class.__name__, self.description.single_file
        if source is None:
            return {"loading_classes": [pipeline], "loading": [f"pipe = {pipeline}.from_pretrained({self.description.source!r}, torch_dtype={dtype})"]}
        if source.components_from is None:
            return {"loading_classes": [pipeline],
                    "loading": [f"pipe = {pipeline}.from_single_file({str(source.path)!r}, config={source.config!r}, torch_dtype={dtype})"]}
        denoiser = self.description.components[self.denoiser_name]
        return {"loading_classes": [denoiser, pipeline], "loading": [
            f"{self.denoiser_name} = {denoiser}.from_single_file({str(source.path)!r}, config={source.config!r}, "
            f"subfolder={self.denoiser_name!r}, torch_dtype={dtype})",
            f"pipe = {pipeline}.from_pretrained({source.components_from!r}, {self.denoiser_name}={self.denoiser_name}, torch_dtype={dtype})"]}

    @classmethod
    def kohya_model_version(cls, config: dict) -> dict[str, str]:
        """kohya's ss_base_model_version and ss_v2 for a run of this family (its resolved config)."""
        return {"ss_base_model_version": cls.kohya_base_model_version, "ss_v2": "False"}

    @classmethod
    def kohya_metadata(cls, config: dict, configs: dict[str, dict]) -> dict[str, str]:
        """kohya's `ss_*` entries for the community file (strings, as safetensors metadata must be): base
        model, network dim and alpha, resolution, training settings, trigger word."""
        denoiser = configs[cls.denoiser_name]
        trigger = config.get("trigger_word") or ""
        algorithm = peft_type(denoiser).lower()
        network_args = {"use_rslora": bool(denoiser.get("use_rslora"))} if algorithm == "lora" else {"algo": algorithm}
        if denoiser.get("use_dora"):
            network_args["dora_wd"] = True
        return {
            "ss_network_module": "networks.lora" if algorithm == "lora" else "lycoris.kohya",
            "ss_network_dim": str(denoiser["r"]),
            "ss_network_alpha": f"{denoiser.get('lora_alpha', denoiser.get('alpha')):g}",
            "ss_network_args": json.dumps(network_args),
            **cls.kohya_model_version(config),
            "ss_sd_model_name": str(config["model_name"]),
            "ss_output_name": str(config["adaptor_name"]),
            "ss_resolution": f"({config['resolution']}, {config['resolution']})",
            "ss_learning_rate": f"{config['learning_rate']:g}",
            "ss_mixed_precision": str(config["mixed_precision"]),
            "ss_seed": str(config["seed"]),
            "ss_training_comment": f"trigger word: {trigger}" if trigger else "",
            "ss_tag_frequency": json.dumps({"trigger": {trigger: 1}} if trigger else {}),
        }

    @classmethod
    def save_lora(cls, folder, layers: dict[str, dict], metadata: dict[str, dict]) -> None:
        """Write adapters with the pipeline class's own save_lora_weights, so load_lora_weights reads them.

        The LoRA config is passed as adapter metadata: without it Diffusers assumes alpha = r on load.
        """
        kwargs = {}
        for component, state_dict in layers.items():
            kwargs[f"{component}_lora_layers"] = state_dict
            kwargs[f"{component}_lora_adapter_metadata"] = metadata[component]
        cls.pipeline_class.save_lora_weights(folder, safe_serialization=True, **kwargs)


class DDPMFamily(ModelFamily):
    """Families trained with the discrete DDPM (variance-preserving) process: SD 1.x/2.x and SDXL."""

    def native_resolution(self) -> int:
        return self.description.denoiser_config["sample_size"] * self.vae_scale_factor

    @property
    def eval_size_multiple(self) -> int:
        return math.lcm(8, self.resolution_multiple)  # the SD and SDXL pipelines refuse other sizes, whatever their VAE

    def _check_trainable_model(self) -> None:
        """EDM-formulated models (Playground v2.5: an EDM scheduler and a VAE with latents_mean/latents_std)
        have the DDPM families' layout but not their noise process or latent scaling; trained on Diffusers'
        default linear betas and un-normalised latents they would learn the wrong thing, so they are refused."""
        super()._check_trainable_model()
        scheduler = self.description.components.get("scheduler") or ""
        if scheduler.startswith("EDM") or self.description.vae_config.get("latents_mean") is not None:
            raise ConfigError(
                f"model_name: {self.description.source!r} is an EDM-formulated {self.title} model ({scheduler} scheduler"
                + (", VAE latents_mean/latents_std" if self.description.vae_config.get("latents_mean") is not None else "")
                + "), such as Playground v2.5; training it with the EDM formulation is not built yet, and the DDPM "
                "training used here would be wrong for it. Use a DDPM-trained model"
            )

    def _resolve_objective(self, cfg) -> dict[str, Any]:
        filled: dict[str, Any] = {}
        scheduler_config = self.description.scheduler_config
        if cfg.prediction_type == "auto":
            filled["prediction_type"] = scheduler_config.get("prediction_type", "epsilon")
        if scheduler_config.get("rescale_betas_zero_snr", False) and not cfg.rescale_betas_zero_snr:
            filled["rescale_betas_zero_snr"] = True  # the model was trained with a zero-terminal-SNR schedule
        if cfg.timestep_sampling == "auto":
            filled["timestep_sampling"] = "uniform"
        if cfg.loss_weighting == "auto":
            filled["loss_weighting"] = "min_snr" if cfg.snr_gamma > 0 else "uniform"
        weighting = filled.get("loss_weighting", cfg.loss_weighting)
        if weighting in ("sigma_sqrt", "cosmap"):
            raise ConfigError(f"loss_weighting: {weighting!r} is for flow-matching models (SD3, Flux); {self.title} takes uniform, snr, min_snr, edm or learned")
        if weighting == "min_snr" and cfg.snr_gamma <= 0:
            raise ConfigError("snr_gamma: min_snr weighting needs snr_gamma > 0 (5 is the paper's value)")
        return filled

    def training_betas(self) -> torch.Tensor:
        """The model's own beta schedule, read from its scheduler config, before any zero-SNR rescaling (the
        objective applies that itself when rescale_betas_zero_snr is on)."""
        return DDPMScheduler.from_config(self.description.scheduler_config, rescale_betas_zero_snr=False).betas

    def make_objective(self) -> DiffusionObjective:
        cfg = self.cfg
        return DiffusionObjective(
            betas=self.training_betas(),
            zero_terminal_snr=cfg.rescale_betas_zero_snr,
            prediction_type=cfg.prediction_type,
            snr_gamma=cfg.snr_gamma,
            sigma_data=cfg.edm_sigma_data,
            **self._objective_kwargs(),
        )

    def eval_pipeline(self) -> DiffusionPipeline:
        """Sampling uses the prediction type trained. The model's own sampler is kept when it was made for
        that prediction type; otherwise DDIM, which takes all three (PNDM, SD 1.5's, has no x0 mode). Zero
        terminal SNR samples with DDIM on trailing timesteps, as Lin et al. prescribe."""
        pipe = super().eval_pipeline()
        own = pipe.scheduler.config
        config = dict(own, prediction_type=self.cfg.prediction_type)
        if self.cfg.rescale_betas_zero_snr:
            pipe.scheduler = DDIMScheduler.from_config(config, rescale_betas_zero_snr=True, timestep_spacing="trailing")
        elif own.get("prediction_type", "epsilon") != self.cfg.prediction_type:
            pipe.scheduler = DDIMScheduler.from_config(config)
        return pipe

    def eval_call_kwargs(self) -> dict[str, Any]:
        kwargs = super().eval_call_kwargs()
        if self.cfg.rescale_betas_zero_snr:
            kwargs["guidance_rescale"] = 0.7  # the paper's fix for over-exposure with zero terminal SNR
        return kwargs


class FlowFamily(ModelFamily):
    """Families trained with rectified-flow matching: SD3 and Flux. prediction_type does not apply."""

    @property
    def resolution_multiple(self) -> int:
        return self.vae_scale_factor * 2  # the transformer works on 2x2 latent patches

    def _resolve_objective(self, cfg) -> dict[str, Any]:
        filled: dict[str, Any] = {}
        if cfg.timestep_sampling == "auto":
            filled["timestep_sampling"] = "logit_normal"  # the SD3 paper's best-performing schedule
        if cfg.loss_weighting == "auto":
            filled["loss_weighting"] = "uniform"
        weighting = filled.get("loss_weighting", cfg.loss_weighting)
        if weighting not in ("uniform", "sigma_sqrt", "cosmap", "learned"):
            raise ConfigError(f"loss_weighting: {weighting!r} is for DDPM models (SD 1.x/2.x, SDXL); {self.title} takes uniform, sigma_sqrt, cosmap or learned")
        if cfg.rescale_betas_zero_snr:
            raise ConfigError(f"rescale_betas_zero_snr: {self.title} trains with flow matching, which reaches pure noise already")
        return filled

    def training_shift(self) -> float:
        """The sigma shift the scheduler applies when sampling at this resolution, so training sees the same
        noise levels: its static shift, or with dynamic shifting μ from the patch-token count, applied as
        exp(μ) (exponential time shift) or μ (linear), which is the shift of σ' = sσ / (1 + (s − 1)σ)."""
        config = self.description.scheduler_config
        if not config.get("use_dynamic_shifting", False):
            return float(config.shift)
        mu = self.sampling_mu((self.cfg.resolution // self.resolution_multiple) ** 2)
        return mu if config.get("time_shift_type", "exponential") == "linear" else math.exp(mu)

    def sampling_mu(self, tokens: int) -> float:
        """μ of the pipeline's dynamic shift for an image of `tokens` patch tokens: linear in the token count
        between the scheduler config's base and max shifts (Flux's `calculate_shift`, which most pipelines use)."""
        config = self.description.scheduler_config
        return dynamic_shift_mu(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                config.get("base_shift", 0.5), config.get("max_shift", 1.15))  # fmt: skip

    def make_objective(self) -> FlowMatchingObjective:
        return FlowMatchingObjective(
            num_train_timesteps=self.description.scheduler_config["num_train_timesteps"],
            shift=self.training_shift(),
            **self._objective_kwargs(),
        )


def _keep_in_fp32(vae: torch.nn.Module) -> None:
    """fp16 VAEs overflow (SDXL's notably) and the VAE is small, so it stays fp32 while the rest runs in
    fp16. Pipelines hand it latents in the prompt embeddings' dtype, so its decode casts them first."""
    vae.to(torch.float32)
    decode = vae.decode

    def decode_fp32(latents, *args, **kwargs):
        return decode(latents.to(torch.float32), *args, **kwargs)

    vae.decode = decode_fp32


def lora_targets(cfg, defaults: tuple[str, ...]) -> list[str]:
    """lora_target_modules as a list; empty means the family's usual attention projections."""
    return [t.strip() for t in cfg.lora_target_modules.split(",") if t.strip()] or list(defaults)


def _target_matches(model: ModelDescription, target: str) -> bool:
    """Whether PEFT would wrap a layer for `target`: the whole name or its last dotted parts."""
    return any(name == target or name.endswith("." + target) for name in model.denoiser_module_names)


def _check_targets_exist(model: ModelDescription, targets: list[str], where: str) -> None:
    """Every target names a layer LoRA can wrap (as PEFT matches them: the whole name or its last dotted parts),
    so a typo, or a norm or block that PEFT would refuse after loading, is an error listing the names that exist."""
    for target in targets:
        if not _target_matches(model, target):
            raise ConfigError(
                f"lora_target_modules: no linear or convolution layer named {target!r} in {where}; its layer names are: "
                + ", ".join(model.denoiser_layer_names)
            )
