"""After training: look inside a LoRA file, re-factor it to a smaller rank, extract one from two models, merge
LoRAs into their base (`plugin/main.py lora inspect|resize|extract|merge`).

A file is read in the layout it was written in: Diffusers/PEFT (`<component>.<module>.lora_A/lora_B.weight`, the
LoRA config in the `lora_adapter_metadata` header) or kohya (`lora_unet_…`/`lora_te…` with `.lora_down`/`.lora_up`
and an `.alpha` per module). Every LoRA module stands for the weight update ΔW = (alpha / rank) · up @ down.
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

DIFFUSERS_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight")
METADATA_KEY = "lora_adapter_metadata"
@dataclass
class LoraModule:
    down: torch.Tensor  # (rank, inputs…)
    up: torch.Tensor  # (outputs, rank, 1…)
    alpha: float

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


@dataclass
class AdapterFile:
    path: Path
    layout: str  # "diffusers" or "kohya"
    modules: dict[str, LoraModule]  # module name as the file writes it (no suffix)
    metadata: dict[str, str]
    dtype: torch.dtype
    dora: bool  # DoRA magnitudes beside the factors (Diffusers' lora_magnitude_vector, kohya's dora_scale)


def read_adapter(path: Path) -> AdapterFile:
    """A LoRA file's modules, in the file's own names and layout; another adapter type (LoKr, LoHa) or a file
    that is not a LoRA is named with what was found."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file (expected a LoRA .safetensors file)")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors, metadata = {key: f.get_tensor(key) for key in f.keys()}, f.metadata() or {}
    except Exception as error:
        raise ConfigError(f"{path}: not a readable safetensors file ({str(error).splitlines()[0]})") from None
    if any(".lokr_" in key or ".hada_" in key for key in tensors):
        raise ConfigError(f"{path}: a LyCORIS (LoKr/LoHa) file; inspect and resize read LoRA and DoRA files")
    for layout, (down_suffix, up_suffix) in (("diffusers", DIFFUSERS_SUFFIXES), ("kohya", KOHYA_SUFFIXES)):
        names = sorted(key[: -len(down_suffix)] for key in tensors if key.endswith(down_suffix))
        if names:
            alphas = _diffusers_alphas(metadata, names) if layout == "diffusers" else {}
            modules = {}
            for name in names:
                down, up = tensors[name + down_suffix], tensors[name + up_suffix]
                alpha = tensors[f"{name}.alpha"].item() if f"{name}.alpha" in tensors else alphas.get(name, float(down.shape[0]))
                modules[name] = LoraModule(down, up, float(alpha))
            dora = any("lora_magnitude_vector" in key or key.endswith(".dora_scale") for key in tensors)
            return AdapterFile(path, layout, modules, metadata, next(iter(tensors.values())).dtype, dora)
    raise ConfigError(f"{path}: no LoRA modules (expected keys ending in {DIFFUSERS_SUFFIXES[0]} or {KOHYA_SUFFIXES[0]})")


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


def family_hint(names) -> str:
    """The family whose `lora_key_pattern` the module names match, the most specific (latest added) first."""
    from .families import FAMILIES

    joined = "\n".join(names)
    return next((family.title for family in reversed(FAMILIES) if re.search(family.lora_key_pattern, joined)), "unknown")


def inspect_adapter(path: Path) -> dict:
    """What a file holds: layout, target model, ranks and alphas, modules per kind, text-encoder parts, metadata,
    dtype and the size of each module's weight update (Frobenius norm of ΔW)."""
    adapter = read_adapter(path)
    names = list(adapter.modules)
    norms = sorted(m.update_norm() for m in adapter.modules.values())
    kind = lambda name: re.sub(r"^.*[._]\d+[._](?=[a-zA-Z])", "", name)  # noqa: E731  (the name within its block: attn.to_q, ...)
    return {
        "file": str(adapter.path),
        "layout": adapter.layout,
        "model": family_hint(names),
        "adapter": "DoRA" if adapter.dora else "LoRA",
        "modules": len(names),
        "ranks": dict(Counter(m.rank for m in adapter.modules.values())),
        "alphas": dict(Counter(m.alpha for m in adapter.modules.values())),
        "module_kinds": dict(Counter(kind(n) for n in names)),
        "text_encoder_modules": sum(1 for n in names if n.startswith(("text_encoder", "lora_te"))),
        "dtype": str(adapter.dtype).removeprefix("torch."),
        "update_norm": {"min": norms[0], "median": statistics.median(norms), "max": norms[-1]},
        "metadata": {k: v for k, v in adapter.metadata.items() if k.startswith("ss_") and k != "ss_tag_frequency"},
    }


def factorised(delta: torch.Tensor, rank: int | None, energy: float | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """up (outputs, k) and down (k, inputs) with up @ down the closest matrix to `delta` of rank k = `rank` (or the
    smallest k keeping `energy` of Σσ²), the singular values split evenly between them; and the share kept."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    share = torch.cumsum(s**2, 0) / (s**2).sum().clamp_min(1e-30)
    keep = min(rank, len(s)) if rank else int(torch.searchsorted(share, torch.tensor(energy, dtype=share.dtype))) + 1
    keep = min(keep, len(s))
    root = s[:keep].sqrt()
    return u[:, :keep] * root, root[:, None] * vh[:keep], float(share[keep - 1])


def truncated(module: LoraModule, rank: int | None, energy: float | None) -> tuple[LoraModule, float]:
    """The module re-factored by `factorised`, as a LoRA of alpha = its rank (scale 1: the factors carry ΔW)."""
    up, down, kept = factorised(module.delta(), rank, energy)
    keep, dtype = down.shape[0], module.down.dtype
    up, down = up.reshape(module.up.shape[0], keep, *module.up.shape[2:]), down.reshape(keep, *module.down.shape[1:])
    return LoraModule(down.to(dtype).contiguous(), up.to(dtype).contiguous(), float(keep)), kept


def resize_adapter(path: Path, out: Path, rank: int | None = None, energy: float | None = None) -> dict[str, tuple[int, int, float]]:
    """Re-factor every module by SVD to `rank` or to the rank that keeps `energy` of its ΔW (kohya's resize_lora
    "fixed rank" and "cumulative energy"); writes `out` in the input's layout. Returns module -> (old rank, new
    rank, share of Σσ² kept)."""
    if (rank is None) == (energy is None) or (rank is not None and rank < 1) or (energy is not None and not 0 < energy <= 1):
        raise ConfigError("lora resize: give --rank R (R ≥ 1) or --energy E (0 < E ≤ 1)")
    adapter = read_adapter(path)
    if adapter.dora:
        raise ConfigError(f"{adapter.path}: a DoRA file; its magnitudes are fitted to its full-rank update, so a resized DoRA is not the same adapter")
    out = Path(out)
    if out.resolve() == adapter.path.resolve() or out.exists():
        raise ConfigError(f"--out: {out} exists; resize writes a new file and never overwrites one")
    resized, report = {}, {}
    for name, module in adapter.modules.items():
        resized[name], kept = truncated(module, rank, energy)
        report[name] = (module.rank, resized[name].rank, kept)
    with atomic_path(out) as tmp:
        save_file(_tensors(adapter.layout, resized), str(tmp), metadata=_metadata(adapter, resized))
    return report


def _tensors(layout: str, modules: dict[str, LoraModule]) -> dict[str, torch.Tensor]:
    down_suffix, up_suffix = DIFFUSERS_SUFFIXES if layout == "diffusers" else KOHYA_SUFFIXES
    tensors = {}
    for name, module in modules.items():
        tensors[name + down_suffix], tensors[name + up_suffix] = module.down, module.up
        if layout == "kohya":
            tensors[f"{name}.alpha"] = torch.tensor(module.alpha, dtype=module.down.dtype)
    return tensors


def _metadata(adapter: AdapterFile, modules: dict[str, LoraModule]) -> dict[str, str]:
    """The input's header with the new shape: kohya's network dim/alpha (the largest rank; alpha per module is in
    the file), or Diffusers' PEFT config per component with a rank and alpha pattern for the modules that differ."""
    metadata = dict(adapter.metadata)
    top = max(m.rank for m in modules.values())
    if adapter.layout == "kohya":
        return {**metadata, "ss_network_dim": str(top), "ss_network_alpha": str(top)}
    config = json.loads(metadata.get(METADATA_KEY) or "{}")
    for component in {name.partition(".")[0] for name in modules}:
        ranks = {name.partition(".")[2]: m.rank for name, m in modules.items() if name.startswith(component + ".")}
        pattern = {module: r for module, r in ranks.items() if r != top}
        config |= {f"{component}.r": top, f"{component}.lora_alpha": top, f"{component}.rank_pattern": pattern, f"{component}.alpha_pattern": pattern}
    return {**metadata, METADATA_KEY: json.dumps(config, indent=2)}


def extract_adapter(base: str, tuned: str, rank: int, out: Path, min_difference: float = 1e-6) -> dict[str, float]:
    """The LoRA of `rank` closest to the difference of two models of one family (kohya's extract_lora_from_models):
    per linear layer of the denoiser whose weights differ by more than `min_difference` (largest absolute
    difference), the truncated SVD of W_tuned − W_base, saved in the Diffusers layout with alpha = rank (scale 1).
    Returns layer -> the share of the difference's energy the rank keeps."""
    from peft import LoraConfig

    from .export import save_layers_atomic
    from .families import load_model

    out = Path(out)
    if rank < 1 or out.exists():
        raise ConfigError(f"lora extract: --rank must be ≥ 1 and --out a new file ({out} exists)" if out.exists() else "lora extract: --rank must be ≥ 1")
    models = load_model(base, torch.float32), load_model(tuned, torch.float32)
    architecture = lambda model: {k: v for k, v in model.description.denoiser_config.items() if not k.startswith("_")}  # noqa: E731
    if type(models[0]) is not type(models[1]) or architecture(models[0]) != architecture(models[1]):
        raise ConfigError(f"lora extract: {base!r} and {tuned!r} are not two models of one architecture")
    tuned_layers = dict(models[1].denoiser.named_modules())
    layers, kept = {}, {}
    for name, layer in models[0].denoiser.named_modules():
        if not isinstance(layer, torch.nn.Linear):
            continue
        difference = tuned_layers[name].weight.double() - layer.weight.double()
        if difference.abs().max() <= min_difference:
            continue
        up, down, kept[name] = factorised(difference, rank, None)
        layers[f"{name}.lora_A.weight"], layers[f"{name}.lora_B.weight"] = down.float().contiguous(), up.float().contiguous()
    if not layers:
        raise ConfigError(f"lora extract: no linear layer of {tuned!r} differs from {base!r} by more than {min_difference}")
    smaller = {name: layers[f"{name}.lora_A.weight"].shape[0] for name in kept if layers[f"{name}.lora_A.weight"].shape[0] < rank}
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(kept), rank_pattern=smaller, alpha_pattern=smaller).to_dict()
    family = models[0]
    staging = out.parent / f".{out.name}.extracting"
    try:
        written = save_layers_atomic(family, {family.denoiser_name: layers}, {family.denoiser_name: config}, staging)
        written.replace(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return kept


def merge_into_base(base: str, files: list[tuple[Path, float]], out: Path) -> Path:
    """The base model with LoRA files folded into its weights (each at its weight), saved as a Diffusers pipeline
    folder in the base's precision: loads like any model, no adapter needed."""
    from .families import load_model

    out = Path(out)
    if out.exists():
        raise ConfigError(f"--out: {out} exists; merge writes a new folder and never overwrites one")
    family = load_model(base, torch.float32)
    pipe = family.pipe
    names = [f"merged_{k}" for k in range(len(files))]
    for name, (path, _) in zip(names, files):
        read_adapter(path)  # a clear error for a file that is not a LoRA
        pipe.load_lora_weights(str(Path(path).parent), weight_name=Path(path).name, adapter_name=name)
    pipe.set_adapters(names, adapter_weights=[weight for _, weight in files])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.merging-"))
    try:
        pipe.save_pretrained(staging)
        staging.replace(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
