"""LoRA files in the layouts other tools read, converted through one form: each module's factors and alpha under
its Diffusers name, `<component>.<module path>` (`lora_tools.LoraModule`; ΔW = alpha / rank · up @ down).

- diffusers: `<component>.<module>.lora_A/.lora_B.weight`, alphas in the PEFT config of the header; what
  `save_lora_weights` writes and `load_lora_weights` reads.
- kohya: `<prefix>_<module path with . as _>` with `.lora_down/.lora_up.weight` and `.alpha` (kohya's
  sd-scripts, A1111/Forge, ComfyUI). SD and SDXL name Diffusers' modules under `lora_unet`/`lora_te…`; a family
  with an original (BFL) layout, Flux, names its original modules (`family.original_lora_modules`), several
  Diffusers modules fused into one (q, k and v; a single block's q, k, v and MLP input).
- comfyui: Diffusers' module names, which ComfyUI maps to its own, under the denoiser's component name or, for
  Z-Image and Qwen-Image, `diffusion_model.` (`family.comfyui_prefix`: musubi-tuner's and ai-toolkit's files,
  which Diffusers' converters read); with `.alpha` where Diffusers' loader for the family reads it
  (`family.comfyui_alpha`: Chroma, Z-Image, Qwen-Image), else the scale folded into lora_B (SD3, Flux's DoRA).
- bfl: the original module names under `diffusion_model.`, `.lora_A/.lora_B.weight` and `.alpha`: the generic
  form ComfyUI reads.

Fused modules are written as Diffusers' loader splits them back exactly (its "sparse" case): the parts' downs
stacked, their ups block-diagonal, each part at the largest rank (zero-padded; an absent part all zeros). A
fused module trained as one (other trainers') splits into parts that share its whole down: exact, not smaller.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import torch

# Diffusers module names that hold an underscore, for reading kohya's names back (`dotted`).
DIFFUSERS_WORDS = frozenset({
    "add_embedding", "conv_in", "conv_out", "conv_shortcut", "conv_norm_out", "down_blocks", "k_proj", "linear_1", "linear_2",
    "mid_block", "out_proj", "proj_in", "proj_out", "q_proj", "self_attn", "text_model", "text_projection", "time_emb_proj",
    "time_embedding", "to_k", "to_out", "to_q", "to_v", "transformer_blocks", "up_blocks", "v_proj", "final_layer_norm",
})  # fmt: skip
KOHYA_SUFFIXES = ("lora_down.weight", "lora_up.weight")
DIFFUSERS_SUFFIXES = ("lora_A.weight", "lora_B.weight")
BFL_PREFIX = "diffusion_model."


@dataclass
class LoraModule:
    down: torch.Tensor  # (rank, inputs…)
    up: torch.Tensor  # (outputs, rank, 1…)
    alpha: float
    magnitude: torch.Tensor | None = None  # DoRA's, per output feature

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def update_norm(self) -> float:
        """‖ΔW‖_F from the rank × rank Gram matrices, without forming ΔW: ‖up·down‖² = tr((upᵀup)(down·downᵀ))."""
        up, down = self.up.reshape(self.up.shape[0], -1).double(), self.down.reshape(self.rank, -1).double()
        return float((self.alpha / self.rank) * torch.trace((up.T @ up) @ (down @ down.T)).clamp_min(0).sqrt())

    def delta(self) -> torch.Tensor:
        """ΔW as a matrix (outputs, inputs·kernel): what the module adds to its layer's weight."""
        return (self.alpha / self.rank) * self.up.reshape(self.up.shape[0], -1).double() @ self.down.reshape(self.rank, -1).double()



def comfyui_name(family, name: str) -> str:
    """A module's name in ComfyUI's layout: its Diffusers name, the denoiser's under `family.comfyui_prefix`."""
    component, _, path = name.partition(".")
    return f"{family.comfyui_prefix}.{path}" if family.comfyui_prefix and component == family.denoiser_name else name


def layouts_of(family) -> tuple[str, ...]:
    """The layouts a family's tools read: SD/SDXL's name Diffusers' modules (ComfyUI reads kohya's names);
    the other families' the Diffusers keys, and Flux's its original modules too."""
    if family.kohya_prefixes and not family.original_lora_modules:
        return ("diffusers", "kohya")
    return ("diffusers", "comfyui", *(("kohya", "bfl") if family.original_lora_modules else ()))


def dotted(name: str) -> str:
    """A module path written with `_` for `.` (kohya's names) read back: `_` joins the parts of Diffusers' own
    multi-word names (to_q, down_blocks, ...) and separates everything else."""
    parts, words = name.split("_"), []
    while parts:
        width = next((n for n in (3, 2) if "_".join(parts[:n]) in DIFFUSERS_WORDS), 1)
        words.append("_".join(parts[:width]))
        parts = parts[width:]
    return ".".join(words)


def kohya_name(family, component: str, module: str) -> str:
    """A module's kohya name: the component's prefix, then its path with `.` as `_`; CLIP text encoders under
    `text_model.`, which transformers 5 no longer has in its module tree (its state dict does) but every
    kohya-format tool expects."""
    if component.startswith("text_encoder") and not module.startswith("text_model."):
        module = f"text_model.{module}"
    return f"{family.kohya_prefixes[component]}_{module.replace('.', '_')}"


# ---------------------------------------------------------------------------------------------------------
# The original (BFL) modules of a family: templates with {i} for the block number


@lru_cache(maxsize=None)
def _template_pattern(template: str, separator: str) -> re.Pattern:
    return re.compile(re.escape(template.replace(".", separator)).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


def original_modules(family, names: set[str]) -> dict[str, tuple[str, ...]]:
    """{original module: its Diffusers modules (component-qualified)} for every original module one of `names`
    belongs to (Diffusers names under the denoiser)."""
    found = {}
    for template, parts in family.original_lora_modules.items():
        for name in names:
            for part in parts:
                match = _template_pattern(f"{family.denoiser_name}.{part}", ".").match(name)
                if match:
                    number = {"i": match["i"]} if "i" in match.groupdict() else {}
                    found[template.format(**number)] = tuple(f"{family.denoiser_name}.{p.format(**number)}" for p in parts)
    return found


def original_name_of(family, written: str, separator: str) -> tuple[str, tuple[str, ...], tuple[int, ...], bool] | None:
    """(original module, its Diffusers modules, their widths, halves swapped) of a module name as a file writes
    it (with `separator` between the parts), or None when it is none of the family's original modules."""
    for template, parts in family.original_lora_modules.items():
        match = _template_pattern(template, separator).match(written)
        if match:
            number = {"i": match["i"]} if "i" in match.groupdict() else {}
            widths = family.fused_lora_widths.get(template, (1,) * len(parts))
            return (template.format(**number), tuple(f"{family.denoiser_name}.{p.format(**number)}" for p in parts), widths,
                    template in family.swapped_lora_modules)  # fmt: skip
    return None


def swapped_halves(up: torch.Tensor) -> torch.Tensor:
    """lora_B with the two halves of its outputs exchanged: Diffusers orders the final modulation (scale, shift),
    the original (shift, scale)."""
    half = up.shape[0] // 2
    return torch.cat([up[half:], up[:half]])


def fused(parts: list, widths: tuple[int, ...]):
    """One LoRA for modules sharing an input whose outputs are stacked (see the module docstring)."""
    present = [part for part in parts if part is not None]
    rank, unit = max(p.rank for p in present), next(p.up.shape[0] // w for p, w in zip(parts, widths) if p is not None)
    scales = {p.alpha / p.rank for p in present}
    common = next(iter(scales)) if len(scales) == 1 else None
    like_down, like_up = present[0].down, present[0].up
    down = torch.zeros(rank * len(parts), *like_down.shape[1:], dtype=like_down.dtype)
    up = torch.zeros(unit * sum(widths), rank * len(parts), *like_up.shape[2:], dtype=like_up.dtype)
    row = 0
    for k, (part, width) in enumerate(zip(parts, widths)):
        if part is not None:
            down[k * rank : k * rank + part.rank] = part.down
            up[row : row + width * unit, k * rank : k * rank + part.rank] = part.up * (1.0 if common is not None else part.alpha / part.rank)
        row += width * unit
    return LoraModule(down, up, (common if common is not None else 1.0) * rank * len(parts))


def split(module, widths: tuple[int, ...]) -> list:
    """The parts of a fused module (`fused`'s inverse): block-diagonal ups give each part its own down and rank
    (trailing zero ranks dropped; an all-zero part None); any other gives each part the whole down."""
    unit = module.up.shape[0] // sum(widths)
    bounds = [sum(widths[:k]) * unit for k in range(len(widths) + 1)]
    scale, count = module.alpha / module.rank, len(widths)
    rank = module.rank // count if module.rank % count == 0 else 0
    diagonal = rank and all(not module.up[bounds[j] : bounds[j + 1], k * rank : (k + 1) * rank].any()
                            for j in range(count) for k in range(count) if j != k)  # fmt: skip
    if not diagonal:
        return [LoraModule(module.down, module.up[bounds[k] : bounds[k + 1]], scale * module.rank) for k in range(count)]
    parts = []
    for k in range(count):
        down, up = module.down[k * rank : (k + 1) * rank], module.up[bounds[k] : bounds[k + 1], k * rank : (k + 1) * rank]
        used = [r for r in range(rank) if down[r].any() and up[:, r].any()]
        kept = used[-1] + 1 if used else 0
        parts.append(LoraModule(down[:kept].contiguous(), up[:, :kept].contiguous(), scale * kept) if kept else None)
    return parts


# ---------------------------------------------------------------------------------------------------------
# Reading into Diffusers names, writing out of them


def canonical(family, layout: str, modules: dict) -> dict:
    """A file's modules (as `lora_tools.read_adapter` names them) under their Diffusers names."""
    if layout in ("diffusers", "comfyui") or (layout == "bfl" and not family.original_lora_modules):  # bfl: diffusion_model.-prefixed
        return {(f"{family.denoiser_name}.{name.removeprefix(BFL_PREFIX)}" if name.startswith(BFL_PREFIX) else name): module
                for name, module in modules.items()}  # fmt: skip
    separator, prefix = ("_", "lora_unet_") if layout == "kohya" else (".", BFL_PREFIX)
    result = {}
    for written, module in modules.items():
        if family.original_lora_modules and written.startswith(prefix):
            original = original_name_of(family, written.removeprefix(prefix), separator)
            if original is None:
                raise ValueError(f"{written}: not one of the original {family.title} modules a LoRA of this layout names")
            _, names, widths, swap = original
            if swap:
                module = type(module)(module.down, swapped_halves(module.up), module.alpha)
            for name, part in zip(names, split(module, widths)):
                if part is not None:
                    result[name] = part
            continue
        component = next((c for c, p in sorted((family.kohya_prefixes or {}).items(), key=lambda kv: -len(kv[1]))
                          if written.startswith(p + "_")), None)  # fmt: skip
        if component is None:
            raise ValueError(f"{written}: not a module name of a {family.title} LoRA in the {layout} layout")
        module_path = dotted(written[len(family.kohya_prefixes[component]) + 1 :])
        result[f"{component}.{module_path.removeprefix('text_model.') if component.startswith('text_encoder') else module_path}"] = module
    return result


def written(family, layout: str, modules: dict) -> dict[str, torch.Tensor]:
    """The tensors of `layout` for modules under their Diffusers names (kohya, comfyui, bfl; diffusers is
    written by the family's pipeline, `lora_tools.write_diffusers`)."""
    tensors = {}
    fused_layout = layout == "bfl" or (layout == "kohya" and bool(family.original_lora_modules))
    if fused_layout and any(module.magnitude is not None for module in modules.values()):
        raise ValueError(f"a DoRA adapter has no {layout} layout for {family.title}: its magnitudes are per Diffusers module; "
                         "convert it to diffusers or comfyui")  # fmt: skip
    if layout == "comfyui":
        for name, module in modules.items():
            key = comfyui_name(family, name)
            if family.comfyui_alpha:
                tensors |= {f"{key}.lora_A.weight": module.down, f"{key}.lora_B.weight": module.up, f"{key}.alpha": torch.tensor(float(module.alpha))}
            else:
                tensors |= {f"{key}.lora_A.weight": module.down, f"{key}.lora_B.weight": module.up * (module.alpha / module.rank)}
            tensors |= _magnitude(key, module)
        return {key: value.contiguous() for key, value in tensors.items()}
    down_suffix, up_suffix = KOHYA_SUFFIXES if layout == "kohya" else DIFFUSERS_SUFFIXES
    remaining = dict(modules)
    for original, names in original_modules(family, set(modules)).items():
        template = next(t for t in family.original_lora_modules if _template_pattern(t, ".").match(original))
        parts = [remaining.pop(name, None) for name in names]
        module = fused(parts, family.fused_lora_widths.get(template, (1,) * len(names))) if len(names) > 1 else parts[0]
        if template in family.swapped_lora_modules:
            module = type(module)(module.down, swapped_halves(module.up), module.alpha)
        key = f"lora_unet_{original.replace('.', '_')}" if layout == "kohya" else BFL_PREFIX + original
        tensors |= {f"{key}.{down_suffix}": module.down, f"{key}.{up_suffix}": module.up, f"{key}.alpha": torch.tensor(module.alpha)}
    for name, module in remaining.items():
        component, _, path = name.partition(".")
        if component not in (family.kohya_prefixes or {}) or (fused_layout and component == family.denoiser_name):
            raise ValueError(f"{name}: the {layout} layout of a {family.title} LoRA has no name for this module")
        key = kohya_name(family, component, path)
        tensors |= {f"{key}.{down_suffix}": module.down, f"{key}.{up_suffix}": module.up, f"{key}.alpha": torch.tensor(module.alpha)}
        tensors |= _magnitude(key, module)
    return {key: value.contiguous() for key, value in tensors.items()}


def _magnitude(key: str, module) -> dict[str, torch.Tensor]:
    """DoRA's magnitude per output feature as ComfyUI and kohya name it (`<key>.dora_scale`, shaped like lora_B's rows)."""
    if module.magnitude is None:
        return {}
    return {f"{key}.dora_scale": module.magnitude.reshape(module.magnitude.shape[0], *[1] * (module.down.dim() - 1))}
