"""After training: look inside a LoRA file, convert it to another layout, re-factor it to a smaller rank, extract
one from two models, merge LoRAs into their base or into one LoRA (`plugin/main.py lora
inspect|convert|resize|extract|merge`).

A file is read in the layout it was written in (plugin/lora_layouts.py): Diffusers/PEFT
(`<component>.<module>.lora_A/lora_B.weight`, the LoRA config in the `lora_adapter_metadata` header), ComfyUI's
(the same keys, no config: alpha = rank), BFL's (`diffusion_model.<original module>`) or kohya's (`lora_unet_…`/
`lora_te…` with `.lora_down`/`.lora_up` and an `.alpha` per module). Every LoRA module stands for the weight
update ΔW = (alpha / rank) · up @ down. LoKr and LoHa files are inspected (`lycoris_modules`).
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import ConfigError
from .export import atomic_path
from .lora_layouts import BFL_PREFIX, DIFFUSERS_SUFFIXES, KOHYA_SUFFIXES, LoraModule, canonical, layouts_of, written

METADATA_KEY = "lora_adapter_metadata"
LAYOUT_SUFFIXES = (("diffusers", tuple(f".{s}" for s in DIFFUSERS_SUFFIXES)), ("kohya", tuple(f".{s}" for s in KOHYA_SUFFIXES)))
@dataclass
class AdapterFile:
    path: Path
    layout: str  # "diffusers" or "kohya"
    modules: dict[str, LoraModule]  # module name as the file writes it (no suffix)
    metadata: dict[str, str]
    dtype: torch.dtype
    dora: bool  # DoRA magnitudes beside the factors (Diffusers' lora_magnitude_vector, kohya's dora_scale)


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def read_tensors(path: Path, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A file's tensors and header: safetensors, or with `allow_pickle` a pickled state dict (read with
    weights_only, PyTorch's restricted unpickler; refused otherwise, as a pickle can run code when loaded)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file (expected a LoRA .safetensors file)")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ConfigError(f"{path}: a pickle file, which can run code when loaded; convert it to safetensors, or pass "
                              "--allow-pickle if you trust where it came from")  # fmt: skip
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ConfigError(f"{path}: not a readable PyTorch file ({str(error).splitlines()[0]})") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ConfigError(f"{path}: holds no state dict of tensors")
        return state, {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, f.metadata() or {}
    except Exception as error:
        raise ConfigError(f"{path}: not a readable safetensors file ({str(error).splitlines()[0]})") from None


def is_lora_file(path: Path) -> bool:
    """A safetensors file whose keys are a LoRA's (its header alone is read): how `lora merge` tells LoRA files
    from a base model, a folder or a single-file checkpoint."""
    if not (path.is_file() and path.suffix == ".safetensors"):
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return any(key.endswith(suffix) for key in f.keys() for _, suffixes in LAYOUT_SUFFIXES for suffix in suffixes)
    except Exception:  # not safetensors after all: read_adapter names the problem
        return True


def is_lycoris(tensors) -> bool:
    return any(".lokr_" in key or ".hada_" in key for key in tensors)


def read_adapter(path: Path, allow_pickle: bool = False) -> AdapterFile:
    """A LoRA file's modules, in the file's own names and layout; another adapter type (LoKr, LoHa) or a file
    that is not a LoRA is named with what was found."""
    path = Path(path)
    tensors, metadata = read_tensors(path, allow_pickle)
    if is_lycoris(tensors):
        raise ConfigError(f"{path}: a LyCORIS (LoKr/LoHa) file; inspect reads it, and convert, resize and merge read LoRA and DoRA files")
    for layout, (down_suffix, up_suffix) in LAYOUT_SUFFIXES:
        names = sorted(key[: -len(down_suffix)] for key in tensors if key.endswith(down_suffix))
        if names:
            if layout == "diffusers" and all(name.startswith(BFL_PREFIX) for name in names):  # BFL's names, or Z-Image's comfyui
                family = family_of_names(names, metadata)
                layout = "bfl" if family is None or family.original_lora_modules else "comfyui"
            elif layout == "diffusers" and METADATA_KEY not in metadata:
                layout = "comfyui"  # Diffusers' keys with `.alpha`, or the scale folded in: alpha = rank, as Diffusers reads it
            alphas = _diffusers_alphas(metadata, names) if layout == "diffusers" else {}
            modules = {}
            for name in names:
                down, up = tensors[name + down_suffix], tensors[name + up_suffix]
                alpha = tensors[f"{name}.alpha"].item() if f"{name}.alpha" in tensors else alphas.get(name, float(down.shape[0]))
                magnitude = tensors.get(f"{name}.lora_magnitude_vector", tensors.get(f"{name}.dora_scale"))
                modules[name] = LoraModule(down, up, float(alpha), None if magnitude is None else magnitude.reshape(-1))
            dora = any(module.magnitude is not None for module in modules.values())
            return AdapterFile(path, layout, modules, metadata, next(iter(tensors.values())).dtype, dora)
    raise ConfigError(f"{path}: no LoRA modules (expected keys ending in .{DIFFUSERS_SUFFIXES[0]} or .{KOHYA_SUFFIXES[0]})")


def _diffusers_alphas(metadata: dict[str, str], names: list[str]) -> dict[str, float]:
    """Each module's alpha from the PEFT configs Diffusers writes in the header (`<component>.lora_alpha` and its
    `alpha_pattern`); without them Diffusers loads with alpha = rank, and so does this."""
    config = json.loads(metadata.get(METADATA_KEY) or "{}")
    alphas = {}
    for name in names:
        component, _, module = name.partition(".")
        if f"{component}.lora_alpha" in config:
            pattern = config.get(f"{component}.alpha_pattern") or {}
            alphas[name] = float(pattern.get(module, config[f"{component}.lora_alpha"]))
    return alphas


def family_of_names(names, metadata: dict[str, str] | None = None):
    """The family kohya's `ss_base_model_version` in the header names (Flux.1's and Flux.2's kohya names are
    alike), else the one whose `lora_key_pattern` the module names match, the most specific (latest added)
    first; None when none does."""
    from .families import FAMILIES

    bases = [family for family in FAMILIES if family.controls_optional or not family.control_images]  # an edit-only model's LoRA is its base's (Kontext's is Flux's)
    version = (metadata or {}).get("ss_base_model_version", "")
    named = next((family for family in bases if version == family.kohya_base_model_version), None)
    if named:
        return named
    joined = "\n".join(names)
    return next((family for family in reversed(bases) if re.search(family.lora_key_pattern, joined)), None)


def family_hint(names, metadata: dict[str, str] | None = None) -> str:
    family = family_of_names(names, metadata)
    return family.title if family else "unknown"


def inspect_adapter(path: Path, allow_pickle: bool = False) -> dict:
    """What a file holds: layout, target model, adapter type, ranks and alphas, modules per kind, text-encoder
    parts, metadata, dtype and the size of each module's weight update (Frobenius norm of ΔW)."""
    tensors, metadata = read_tensors(path, allow_pickle)
    if is_lycoris(tensors):
        layout, modules = lycoris_modules(tensors, metadata)
        kinds = {module.kind for module in modules.values()}
        dtype = next(iter(tensors.values())).dtype
    else:
        adapter = read_adapter(path, allow_pickle)
        layout, modules, dtype = adapter.layout, adapter.modules, adapter.dtype
        kinds = {"DoRA" if adapter.dora else "LoRA"}
    names = list(modules)
    norms = sorted(m.update_norm() for m in modules.values())
    kind = lambda name: re.sub(r"^.*[._]\d+[._](?=[a-zA-Z])", "", name)  # noqa: E731  (the name within its block: attn.to_q, ...)
    return {
        "file": str(path),
        "layout": layout,
        "model": family_hint(names, metadata),
        "adapter": ", ".join(sorted(kinds)),
        "modules": len(names),
        "ranks": dict(Counter(m.rank for m in modules.values())),
        "alphas": dict(Counter(m.alpha for m in modules.values())),
        "module_kinds": dict(Counter(kind(n) for n in names)),
        "text_encoder_modules": sum(1 for n in names if n.startswith(("text_encoder", "lora_te"))),
        "dtype": str(dtype).removeprefix("torch."),
        "update_norm": {"min": norms[0], "median": statistics.median(norms), "max": norms[-1]},
        "metadata": {k: v for k, v in metadata.items() if k.startswith("ss_") and k != "ss_tag_frequency"},
    }


@dataclass
class LycorisModule:
    """A LoKr (ΔW = scale · w1 ⊗ w2, either factor whole or a low-rank product) or LoHa (ΔW = scale · (w1_a w1_b) ⊙
    (w2_a w2_b)) module, as inspect reports it; rank "full" for a LoKr of whole factors."""

    kind: str
    tensors: dict[str, torch.Tensor]
    rank: int | str
    alpha: float
    scale: float

    def factor(self, name: str) -> torch.Tensor:
        if name in self.tensors:
            return self.tensors[name].double()
        return self.tensors[f"{name}_a"].double().flatten(1) @ self.tensors[f"{name}_b"].double().flatten(1)

    def update_norm(self) -> float:
        """‖ΔW‖_F: for LoKr ‖w1‖·‖w2‖ (the Kronecker product's norm is the product of its factors'); for LoHa formed."""
        if self.kind == "LoKr":
            return float(self.scale * self.factor("lokr_w1").norm() * self.factor("lokr_w2").norm())
        return float(self.scale * (self.factor("hada_w1") * self.factor("hada_w2")).norm())


LYCORIS_NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "hada_w1_a", "hada_w1_b",
                 "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha")  # fmt: skip


def lycoris_modules(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, dict[str, LycorisModule]]:
    """(layout, modules) of a LoKr/LoHa file: PEFT's names with the configs in the header (this trainer's Diffusers
    layout: scale alpha / r) or LyCORIS's with an `.alpha` per module (kohya layout: scale alpha / rank for a
    decomposed factor, 1 for whole ones)."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        module, name = next(((key[: -len(n) - 1], n) for n in LYCORIS_NAMES if key.endswith("." + n)), (None, None))
        if module is not None:
            grouped.setdefault(module, {})[name] = value
    configs = json.loads(metadata.get("lycoris_configs") or "{}")
    modules = {}
    for name, parts in grouped.items():
        kind = "LoKr" if any(n.startswith("lokr") for n in parts) else "LoHa"
        low_rank = next((parts[n] for n in ("lokr_w2_a", "lokr_w1_a", "hada_w1_b") if n in parts), None)
        rank = (low_rank.shape[0] if kind == "LoHa" else low_rank.shape[1]) if low_rank is not None else "full"
        if "alpha" in parts:
            alpha = float(parts.pop("alpha"))
            scale = alpha / rank if rank != "full" else 1.0
        else:
            component, _, module = name.partition(".")
            config = configs.get(component, {})
            alpha = float((config.get("alpha_pattern") or {}).get(module, config.get("alpha", rank if rank != "full" else 1)))
            r = float((config.get("rank_pattern") or {}).get(module, config.get("r", rank if rank != "full" else 1)))
            scale = alpha / r
        modules[name] = LycorisModule(kind, parts, rank, alpha, scale)
    return ("diffusers" if configs else "kohya"), modules


def factorised(delta: torch.Tensor, rank: int | None, energy: float | None, ratio: float | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """up (outputs, k) and down (k, inputs) with up @ down the closest matrix to `delta` of rank k = `rank`, or the
    smallest k keeping `energy` of Σσ², or the k singular values within `ratio` of the largest (σᵢ ≥ σ₁ / ratio);
    the singular values split evenly between the factors; and the share of Σσ² kept."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    share = torch.cumsum(s**2, 0) / (s**2).sum().clamp_min(1e-30)
    if rank:
        keep = rank
    elif energy is not None:
        keep = int(torch.searchsorted(share, torch.tensor(energy, dtype=share.dtype))) + 1
    else:
        keep = max(1, int((s >= s[0] / ratio).sum()))
    keep = min(keep, len(s))
    root = s[:keep].sqrt()
    return u[:, :keep] * root, root[:, None] * vh[:keep], float(share[keep - 1])


def truncated(module: LoraModule, rank: int | None, energy: float | None, ratio: float | None = None) -> tuple[LoraModule, float]:
    """The module re-factored by `factorised`, as a LoRA of alpha = its rank (scale 1: the factors carry ΔW)."""
    up, down, kept = factorised(module.delta(), rank, energy, ratio)
    keep, dtype = down.shape[0], module.down.dtype
    up, down = up.reshape(module.up.shape[0], keep, *module.up.shape[2:]), down.reshape(keep, *module.down.shape[1:])
    return LoraModule(down.to(dtype).contiguous(), up.to(dtype).contiguous(), float(keep)), kept


def resize_adapter(path: Path, out: Path, rank: int | None = None, energy: float | None = None, ratio: float | None = None,
                   dtype: str | None = None) -> dict[str, tuple[int, int, float]]:  # fmt: skip
    """Re-factor every module by SVD to `rank`, to the rank that keeps `energy` of its ΔW, or to the singular values
    within `ratio` of the largest (kohya's resize_lora "fixed rank", "cumulative energy" and "sv_ratio"); writes
    `out` in the input's layout (in `dtype`, default the input's). Returns module -> (old rank, new rank, share of
    Σσ² kept)."""
    given = [value for value in (rank, energy, ratio) if value is not None]
    if len(given) != 1 or (rank is not None and rank < 1) or (energy is not None and not 0 < energy <= 1) or (ratio is not None and ratio < 1):
        raise ConfigError("lora resize: give one of --rank R (R ≥ 1), --energy E (0 < E ≤ 1) or --ratio Q (Q ≥ 1)")
    adapter = read_adapter(path)
    if adapter.dora:
        raise ConfigError(f"{adapter.path}: a DoRA file; its magnitudes are fitted to its full-rank update, so a resized DoRA is not the same adapter")
    out = _new_file(out, adapter.path)
    resized, report = {}, {}
    for name, module in adapter.modules.items():
        resized[name], kept = truncated(module, rank, energy, ratio)
        resized[name] = cast(resized[name], dtype)
        report[name] = (module.rank, resized[name].rank, kept)
    with atomic_path(out) as tmp:
        save_file(_tensors(adapter.layout, resized), str(tmp), metadata=_metadata(adapter, resized))
    return report


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cast(module: LoraModule, dtype: str | None) -> LoraModule:
    """The module's tensors in `dtype` (fp32, fp16, bf16); as they are for None."""
    if dtype is None:
        return module
    to = lambda t: None if t is None else t.to(DTYPES[dtype]).contiguous()  # noqa: E731
    return LoraModule(to(module.down), to(module.up), module.alpha, to(module.magnitude))


def _tensors(layout: str, modules: dict[str, LoraModule]) -> dict[str, torch.Tensor]:
    """Modules under the names a file wrote them with, in its layout's suffixes; `.alpha` where it has one."""
    down_suffix, up_suffix = dict(LAYOUT_SUFFIXES)["kohya" if layout == "kohya" else "diffusers"]
    tensors = {}
    for name, module in modules.items():
        tensors[name + down_suffix], tensors[name + up_suffix] = module.down, module.up
        if layout in ("kohya", "bfl"):
            tensors[f"{name}.alpha"] = torch.tensor(module.alpha, dtype=module.down.dtype)
    return tensors


def _metadata(adapter: AdapterFile, modules: dict[str, LoraModule]) -> dict[str, str]:
    """The input's header with the new shape: kohya's network dim/alpha (the largest rank; alpha per module is in
    the file), or Diffusers' PEFT config per component with a rank and alpha pattern for the modules that differ."""
    metadata = dict(adapter.metadata)
    top = max(m.rank for m in modules.values())
    if adapter.layout != "diffusers":
        return {**metadata, "ss_network_dim": str(top), "ss_network_alpha": str(top)}
    config = json.loads(metadata.get(METADATA_KEY) or "{}")
    for component in {name.partition(".")[0] for name in modules}:
        ranks = {name.partition(".")[2]: m.rank for name, m in modules.items() if name.startswith(component + ".")}
        pattern = {module: r for module, r in ranks.items() if r != top}
        config |= {f"{component}.r": top, f"{component}.lora_alpha": top, f"{component}.rank_pattern": pattern, f"{component}.alpha_pattern": pattern}
    return {**metadata, METADATA_KEY: json.dumps(config, indent=2)}


def save_diffusers(family, modules: dict[str, LoraModule], out: Path) -> Path:
    """Modules under their Diffusers names written as the family's pipeline saves a LoRA, `load_lora_weights`
    ready: per component a PEFT config in the header (the largest rank and its alpha, patterns for the modules
    that differ), DoRA's magnitudes included; atomically, through a sibling folder."""
    from peft import LoraConfig

    from .export import save_layers_atomic

    layers, configs = {}, {}
    for component in sorted({name.partition(".")[0] for name in modules}):
        own = {name.partition(".")[2]: m for name, m in modules.items() if name.startswith(component + ".")}
        top = max(m.rank for m in own.values())
        alpha = next(m.alpha for m in own.values() if m.rank == top)
        layers[component] = {key: value for module, m in own.items() for key, value in
                             ((f"{module}.lora_A.weight", m.down), (f"{module}.lora_B.weight", m.up), (f"{module}.lora_magnitude_vector", m.magnitude))
                             if value is not None}  # fmt: skip
        configs[component] = LoraConfig(r=top, lora_alpha=alpha, target_modules=sorted(own), use_dora=any(m.magnitude is not None for m in own.values()),
                                        rank_pattern={n: m.rank for n, m in own.items() if m.rank != top},
                                        alpha_pattern={n: m.alpha for n, m in own.items() if m.alpha != alpha}).to_dict()  # fmt: skip
    staging = out.parent / f".{out.name}.writing"
    try:
        save_layers_atomic(family, layers, configs, staging).replace(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _new_file(out: Path, *inputs: Path) -> Path:
    """`out`, refused when it exists (an input included): the LoRA tools never overwrite a file."""
    out = Path(out)
    if out.exists() or any(Path(i).resolve() == out.resolve() for i in inputs):
        raise ConfigError(f"--out: {out} exists; the LoRA tools write a new file and never overwrite one")
    return out


def extract_adapter(base: str, tuned: str, rank: int, out: Path, min_difference: float = 1e-6) -> dict[str, float]:
    """The LoRA of `rank` closest to the difference of two models of one family (kohya's extract_lora_from_models):
    per linear layer of the denoiser whose weights differ by more than `min_difference` (largest absolute
    difference), the truncated SVD of W_tuned − W_base, saved in the Diffusers layout with alpha = rank (scale 1).
    Returns layer -> the share of the difference's energy the rank keeps."""
    from .families import load_model

    out = _new_file(out)
    if rank < 1:
        raise ConfigError("lora extract: --rank must be ≥ 1")
    models = load_model(base, torch.float32), load_model(tuned, torch.float32)
    architecture = lambda model: {k: v for k, v in model.description.denoiser_config.items() if not k.startswith("_")}  # noqa: E731
    if type(models[0]) is not type(models[1]) or architecture(models[0]) != architecture(models[1]):
        raise ConfigError(f"lora extract: {base!r} and {tuned!r} are not two models of one architecture")
    family, tuned_layers = models[0], dict(models[1].denoiser.named_modules())
    modules, kept = {}, {}
    for name, layer in family.denoiser.named_modules():
        if not isinstance(layer, torch.nn.Linear):
            continue
        difference = tuned_layers[name].weight.double() - layer.weight.double()
        if difference.abs().max() <= min_difference:
            continue
        up, down, kept[name] = factorised(difference, rank, None)
        modules[f"{family.denoiser_name}.{name}"] = LoraModule(down.float().contiguous(), up.float().contiguous(), float(down.shape[0]))
    if not modules:
        raise ConfigError(f"lora extract: no linear layer of {tuned!r} differs from {base!r} by more than {min_difference}")
    save_diffusers(family, modules, out)
    return kept


def convert_adapter(path: Path, layout: str, out: Path, family_name: str | None = None, allow_pickle: bool = False,
                    dtype: str | None = None) -> dict:  # fmt: skip
    """The LoRA file in another layout (plugin/lora_layouts.py), every module's ΔW kept: alpha carried where the
    layout has it (`.alpha`, the Diffusers header), folded into lora_B where it has not (SD3's, Flux's comfyui). The model comes
    from the module names (or `family_name`). Returns what was done."""
    from .families import family_by_name

    tensors, metadata = read_tensors(path, allow_pickle)
    if is_lycoris(tensors):
        return _convert_lycoris(Path(path), tensors, metadata, layout, _new_file(out, path), family_name)
    adapter = read_adapter(path, allow_pickle)
    out = _new_file(out, adapter.path)
    family = family_by_name(family_name) if family_name else family_of_names(adapter.modules, adapter.metadata)
    if family is None:
        raise ConfigError(f"{adapter.path}: its module names match no model family; name one with --family")
    if layout not in layouts_of(family):
        raise ConfigError(f"--to: {family.title} LoRAs have the layouts {', '.join(layouts_of(family))}; not {layout!r}")
    try:
        modules = {name: cast(module, dtype) for name, module in canonical(family, adapter.layout, adapter.modules).items()}
        tensors = None if layout == "diffusers" else written(family, layout, modules)
    except ValueError as error:
        raise ConfigError(f"{adapter.path}: {error}") from None
    if tensors is None:
        save_diffusers(family, modules, out)
    else:
        with atomic_path(out) as tmp:
            kept = {k: v for k, v in adapter.metadata.items() if k.startswith("ss_") or k == "format"}
            save_file(tensors, str(tmp), metadata={"ss_base_model_version": family.kohya_base_model_version, **kept})
    return {"model": family.title, "from": adapter.layout, "to": layout, "modules": len(modules)}


def _convert_lycoris(path: Path, tensors: dict, metadata: dict, layout: str, out: Path, family_name: str | None) -> dict:
    """A LoKr/LoHa file of this trainer's (PEFT's names, the configs in the header) in its family's community layout:
    the file the run writes beside it (plugin/kohya.py). The other way is refused: PEFT rebuilds a LoKr's factor
    shapes from its config, which the factorisation of a file written elsewhere need not match."""
    from .adapters import LYCORIS_METADATA
    from .families import family_by_name
    from .kohya import community_layout, community_state

    configs = json.loads(metadata.get(LYCORIS_METADATA) or "null")
    if configs is None:
        raise ConfigError(f"{path}: a LoKr/LoHa file in LyCORIS's names; convert reads LoKr and LoHa from this trainer's Diffusers-layout "
                          "file only (PEFT rebuilds their factors from its config, which another file's need not match)")  # fmt: skip
    family = family_by_name(family_name) if family_name else family_of_names(tensors, metadata)
    kind = next(iter(configs.values()))["peft_type"].lower()
    target = community_layout(family, kind)
    if layout != target:
        raise ConfigError(f"--to: a {kind} adapter of {family.title} converts to the {target} layout only (not {layout!r})")
    layers = {component: {key[len(component) + 1 :]: value for key, value in tensors.items() if key.startswith(component + ".")}
              for component in configs}  # fmt: skip
    with atomic_path(out) as tmp:
        save_file(community_state(family, layers, configs), str(tmp), metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    return {"model": family.title, "from": "diffusers", "to": layout, "modules": len({k.rsplit(".", 1)[0] for k in tensors})}


def merge_adapters(files: list[tuple[Path, float]], out: Path, svd_rank: int | None = None, dtype: str | None = None) -> dict[str, int]:
    """One LoRA holding the weighted sum of several, in the first one's layout and names: per module the factors
    stacked (ranks add up; each lora_up times its file's weight and alpha / rank; alpha = the new rank), so ΔW =
    Σ wᵢ ΔWᵢ exactly; with `svd_rank`, each sum re-factored to that rank by SVD (kohya's svd_merge_lora).
    Returns module -> its new rank."""
    adapters = [read_adapter(path) for path, _ in files]
    out = _new_file(out, *(adapter.path for adapter in adapters))
    if len({a.layout for a in adapters}) > 1 or any(a.dora for a in adapters):
        raise ConfigError("lora merge: the files must share one layout (convert them first) and be LoRA, not DoRA: "
                          + ", ".join(f"{a.path.name} is {'DoRA, ' if a.dora else ''}{a.layout}" for a in adapters))  # fmt: skip
    if svd_rank is not None and svd_rank < 1:
        raise ConfigError("--svd-rank: must be ≥ 1")
    merged = {}
    for name in dict.fromkeys(n for adapter in adapters for n in adapter.modules):
        parts = [(adapter.modules[name], weight) for adapter, (_, weight) in zip(adapters, files) if name in adapter.modules]
        if len({(m.up.shape[0], *m.down.shape[1:]) for m, _ in parts}) > 1:
            raise ConfigError(f"lora merge: {name} has other shapes in other files; are they LoRAs of one model?")
        down = torch.cat([m.down.float() for m, _ in parts])
        up = torch.cat([m.up.float() * (weight * m.alpha / m.rank) for m, weight in parts], dim=1)
        module = LoraModule(down, up, float(down.shape[0]))
        module = truncated(module, svd_rank, None)[0] if svd_rank else module
        merged[name] = cast(module, dtype or next(k for k, v in DTYPES.items() if v == adapters[0].dtype))
    with atomic_path(out) as tmp:
        save_file(_tensors(adapters[0].layout, merged), str(tmp), metadata=_metadata(adapters[0], merged))
    return {name: module.rank for name, module in merged.items()}


def check_fits(family, adapter: AdapterFile) -> None:
    """Every module of the LoRA names a layer of the loaded model of its shape; otherwise the file is for another
    model, which is said with the layers that do not fit and the model the names suggest."""
    try:
        modules = canonical(type(family), adapter.layout, adapter.modules)
    except ValueError:
        modules = {}
    misfits = []
    for name, module in modules.items():
        component, _, path = name.partition(".")
        try:
            weight = getattr(family.pipe, component).get_submodule(path).weight
        except AttributeError:
            misfits.append(name)
            continue
        if (weight.shape[0], *weight.shape[1:]) != (module.up.shape[0], *module.down.shape[1:]):
            misfits.append(name)
    if misfits or not modules:
        raise ConfigError(f"{adapter.path}: a LoRA of {family_hint(adapter.modules, adapter.metadata)}, not of this {family.title} model: "
                          + (", ".join(misfits[:3]) + (" ..." if len(misfits) > 3 else "") + " do not fit its layers" if misfits else
                             "its module names are none of this model's"))  # fmt: skip


def stored_dtype(model_name: str, denoiser_name: str) -> str:
    """The precision a model's denoiser weights are stored in (a local folder or single file), fp32 if unknown."""
    path = Path(model_name).expanduser()
    files = [path] if path.is_file() else sorted((path / denoiser_name).glob("*.safetensors")) if path.is_dir() else []
    names = {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                stored = f.get_slice(key).get_dtype()
                if stored in names:
                    return names[stored]
    return "fp32"


def merge_into_base(base: str, files: list[tuple[Path, float]], out: Path, dtype: str | None = None) -> Path:
    """The base model with LoRA files folded into its weights (each at its weight, in fp32), saved in `dtype`
    (default: the precision the base is stored in) as a Diffusers pipeline folder, or, for an `out` ending in
    .safetensors, as one original-layout single file (what A1111 and ComfyUI load): no adapter needed."""
    from .families import load_model
    from .families.original_layout import original_state_dict

    out = _new_file(out)
    family = load_model(base, torch.float32)
    pipe = family.pipe
    names = [f"merged_{k}" for k in range(len(files))]
    for name, (path, _) in zip(names, files):
        check_fits(family, read_adapter(path))
        pipe.load_lora_weights(str(Path(path).parent), weight_name=Path(path).name, adapter_name=name)
    pipe.set_adapters(names, adapter_weights=[weight for _, weight in files])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()
    pipe.to(DTYPES[dtype or stored_dtype(base, family.denoiser_name)])
    if out.suffix == ".safetensors":
        with atomic_path(out) as tmp:
            save_file({key: value.contiguous() for key, value in original_state_dict(pipe).items()}, str(tmp))
        return out
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.merging-"))
    try:
        pipe.save_pretrained(staging)
        staging.replace(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
