"""Saves a Diffusers pipeline as an original-layout single-file checkpoint: the one `.safetensors` file A1111,
ComfyUI and model sites distribute, and that Diffusers' `from_single_file` converts from. `lora merge` writes a
merged model this way; the tests make such files from the tiny pipelines, since no real one fits in a test.

Every mapping here is the inverse of Diffusers' forward conversion in `diffusers.loaders.single_file_utils`
(`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_open_clip_checkpoint`,
`convert_sd3_transformer_checkpoint_to_diffusers`, `convert_flux_transformer_checkpoint_to_diffusers`), reusing
its tables where it has them; tests/test_original_layout.py proves each layout round-trips bit for bit.

Layouts (the denoiser's keys sit under `prefix`):
  StableDiffusionPipeline    UNet, VAE under `first_stage_model.`, text encoder under
                             `cond_stage_model.transformer.` (SD 1.x) or, with `open_clip=True`, in OpenCLIP's
                             layout under `cond_stage_model.model.` (SD 2.x files).
  StableDiffusionXLPipeline  UNet, VAE, `conditioner.embedders.0.transformer.` (CLIP-L) and
                             `conditioner.embedders.1.model.` (OpenCLIP bigG layout, with its text_projection).
  StableDiffusion3Pipeline   MMDiT (joint_blocks.N.x_block/context_block), VAE, and the text encoders in
                             transformers' layout under `text_encoders.{clip_l,clip_g,t5xxl}.transformer.`.
  FluxPipeline               the transformer in BFL's layout (double_blocks, single_blocks, img_in, ...) only.
  ChromaPipeline             the transformer in BFL's layout without the per-block modulations, plus
                             `distilled_guidance_layer` (the approximator), as Chroma1 files have it.
  Flux2(Klein)Pipeline       the transformer in BFL's Flux.2 layout (shared stream modulations, fused linear1).
  QwenImagePipeline          the transformer under its Diffusers names (Qwen-Image's files and ComfyUI use them).
  ZImagePipeline             the transformer in Z-Image's own layout (fused attention.qkv, attention.out,
                             q_norm/k_norm, x_embedder and final_layer), as its single files and ComfyUI have it.

Loading such a file back with Diffusers 0.42 has three limits a tiny model can hit and a real one does not:
  * `create_diffusers_clip_model_from_ldm` picks which encoder's keys a CLIP component reads by the width of its
    position embedding; the tiny SD3's CLIP-L and CLIP-G are both 32 wide, so its `text_encoder_2` would read
    CLIP-L's keys: the test loads it from that encoder's keys alone (the tiny SDXL's are 32 and 48 wide).
  * it sets SD3's CLIP-L `text_projection` to the identity (SD3 uses CLIP-L's pooled output unprojected), so the
    tiny random projection written here does not come back.
  * `convert_flux_transformer_checkpoint_to_diffusers` (and Chroma's) splits single blocks' linear1 at Flux.1's width
    (inner_dim = 3072): a tiny Flux file loads through the trainer's conversion, which cuts at the file's width.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, LDM_UNET_KEY, swap_scale_shift
from safetensors.torch import save_file

_Sources = dict[str, tuple[str, ...]]  # original key: the Diffusers keys it holds, concatenated (fused projections)

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}  # fmt: skip
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_QKV = re.compile(r"(.+\.self_attn)\.[qkv]_proj\.(weight|bias)")  # a CLIP projection OpenCLIP fuses into in_proj

_MMDIT = {  # SD3 original module: Diffusers module(s)
    "pos_embed": "pos_embed.pos_embed",
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "context_embedder": "context_embedder",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
_MMDIT_JOINT_BLOCK = {  # the last layer's context block has no proj or mlp (context_pre_only)
    "x_block.adaLN_modulation.1": "norm1.linear",
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "x_block.attn.ln_q": "attn.norm_q",
    "x_block.attn.ln_k": "attn.norm_k",
    "x_block.attn.proj": "attn.to_out.0",
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),  # SD3.5's dual attention layers
    "x_block.attn2.ln_q": "attn2.norm_q",
    "x_block.attn2.ln_k": "attn2.norm_k",
    "x_block.attn2.proj": "attn2.to_out.0",
    "x_block.mlp.fc1": "ff.net.0.proj",
    "x_block.mlp.fc2": "ff.net.2",
    "context_block.adaLN_modulation.1": "norm1_context.linear",
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "context_block.attn.ln_q": "attn.norm_added_q",
    "context_block.attn.ln_k": "attn.norm_added_k",
    "context_block.attn.proj": "attn.to_add_out",
    "context_block.mlp.fc1": "ff_context.net.0.proj",
    "context_block.mlp.fc2": "ff_context.net.2",
}

_FLUX = {  # BFL module: Diffusers module(s); BFL's RMSNorms call their weight "scale"
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",  # guidance-distilled (dev) models only
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
_FLUX_DOUBLE_BLOCK = {
    "img_mod.lin": "norm1.linear",
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "img_attn.proj": "attn.to_out.0",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mod.lin": "norm1_context.linear",
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
    "txt_attn.proj": "attn.to_add_out",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
_FLUX_SINGLE_BLOCK = {
    "modulation.lin": "norm.linear",
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
    "linear2": "proj_out",
}
_CHROMA = {**{k: v for k, v in _FLUX.items() if k in ("img_in", "txt_in", "final_layer.linear")},
           "distilled_guidance_layer.in_proj": "distilled_guidance_layer.in_proj",
           "distilled_guidance_layer.out_proj": "distilled_guidance_layer.out_proj"}  # fmt: skip
_CHROMA_APPROXIMATOR_LAYER = {"in_layer": "linear_1", "out_layer": "linear_2"}
_CHROMA_DOUBLE_BLOCK = {k: v for k, v in _FLUX_DOUBLE_BLOCK.items() if not k.endswith("_mod.lin")}  # no modulation: the approximator's
_CHROMA_SINGLE_BLOCK = {k: v for k, v in _FLUX_SINGLE_BLOCK.items() if k != "modulation.lin"}


def lora_modules(whole: dict, double: dict, single: dict) -> dict[str, tuple[str, ...]]:
    """A BFL layout's modules a LoRA adapts (its linear layers; the norms' scales left out), "{i}" standing for the
    block number, each with the Diffusers modules it holds, fused in that order (plugin/lora_layouts.py)."""
    parts = lambda value: (value,) if isinstance(value, str) else value  # noqa: E731
    modules = {original: parts(value) for original, value in whole.items()}
    for block, diffusers_block, table in (("double_blocks", "transformer_blocks", double), ("single_blocks", "single_transformer_blocks", single)):
        modules |= {f"{block}.{{i}}.{original}": tuple(f"{diffusers_block}.{{i}}.{p}" for p in parts(value)) for original, value in table.items()}
    return {original: value for original, value in modules.items() if not original.endswith(".scale")}


FLUX_LORA_MODULES = lora_modules(_FLUX, _FLUX_DOUBLE_BLOCK, _FLUX_SINGLE_BLOCK)


def _gather(state_dict: dict[str, torch.Tensor], sources: _Sources, what: str) -> dict[str, torch.Tensor]:
    """The original tensors. Each is a fresh contiguous copy (safetensors refuses shared storage, as T5's tied
    embeddings have), and every Diffusers tensor must be used exactly once: nothing dropped, nothing doubled."""
    used = [key for parts in sources.values() for key in parts]
    if sorted(used) != sorted(state_dict):
        unmapped = sorted(set(state_dict) - set(used))
        stray = sorted({key for key in used if key not in state_dict or used.count(key) > 1})
        raise ValueError(f"{what}: no original name for {unmapped}; unknown or used twice: {stray}")
    return {key: torch.cat([state_dict[part] for part in parts]) for key, parts in sources.items()}


def _renamed(state_dict, whole: dict[str, str], blocks: dict[str, tuple[str, dict[str, str]]]) -> _Sources:
    """LDM-style renames: a key is either in `whole` (Diffusers key: original key) or starts with a prefix of
    `blocks` (Diffusers prefix: original prefix and its renamed submodules)."""
    sources = {}
    for key in state_dict:
        if key in whole:
            sources[whole[key]] = (key,)
            continue
        prefix = next((p for p in blocks if key.startswith(p)), None)
        if prefix is not None:  # a key with no prefix is left out, which _gather names
            original, submodules = blocks[prefix]
            module, _, param = key[len(prefix):].rpartition(".")
            sources[f"{original}{submodules.get(module, module)}.{param}"] = (key,)
    return sources


def _modules(state_dict, table: dict[str, str | tuple[str, ...]], original_prefix="", diffusers_prefix="") -> _Sources:
    """Module-level maps: each original module's weight and bias from the Diffusers module(s) of `table`; an
    entry naming a tensor maps that tensor. Modules a model lacks (guidance_in of schnell, qk-norms) are skipped."""
    sources = {}
    for original, parts in table.items():
        parts = [diffusers_prefix + part for part in ((parts,) if isinstance(parts, str) else parts)]
        if parts[0] in state_dict:
            sources[original_prefix + original] = tuple(parts)
        for param in ("weight", "bias"):
            if f"{parts[0]}.{param}" in state_dict:
                sources[f"{original_prefix}{original}.{param}"] = tuple(f"{part}.{param}" for part in parts)
    return sources


def _has(state_dict, prefix: str) -> bool:
    return any(key.startswith(prefix) for key in state_dict)


def _unet(unet) -> dict[str, torch.Tensor]:
    """input_blocks count every resnet/attention pair and downsampler; an up block's upsampler follows its
    last resnet at slot 1, or at slot 2 behind an attention."""
    state_dict, config = unet.state_dict(), unet.config
    whole = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"] | DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]
    blocks = {"mid_block.resnets.0.": ("middle_block.0.", _UNET_RESNET),
              "mid_block.attentions.0.": ("middle_block.1.", {}),
              "mid_block.resnets.1.": ("middle_block.2.", _UNET_RESNET)}  # fmt: skip
    slot = 1
    for b in range(len(config.down_block_types)):
        for j in range(config.layers_per_block):
            blocks[f"down_blocks.{b}.resnets.{j}."] = (f"input_blocks.{slot}.0.", _UNET_RESNET)
            blocks[f"down_blocks.{b}.attentions.{j}."] = (f"input_blocks.{slot}.1.", {})
            slot += 1
        if _has(state_dict, f"down_blocks.{b}.downsamplers."):
            blocks[f"down_blocks.{b}.downsamplers.0."] = (f"input_blocks.{slot}.0.", {"conv": "op"})
            slot += 1
    slot = 0
    for b in range(len(config.up_block_types)):
        for j in range(config.layers_per_block + 1):
            blocks[f"up_blocks.{b}.resnets.{j}."] = (f"output_blocks.{slot}.0.", _UNET_RESNET)
            blocks[f"up_blocks.{b}.attentions.{j}."] = (f"output_blocks.{slot}.1.", {})
            slot += 1
        upsampler_slot = 2 if _has(state_dict, f"up_blocks.{b}.attentions.") else 1
        blocks[f"up_blocks.{b}.upsamplers.0."] = (f"output_blocks.{slot - 1}.{upsampler_slot}.", {})
    return _gather(state_dict, _renamed(state_dict, whole, blocks), "unet")


def _vae(vae) -> dict[str, torch.Tensor]:
    """The decoder's up blocks count the other way; the mid-block attention's projections are 1x1 convs."""
    state_dict, ups = vae.state_dict(), len(vae.config.up_block_types)
    blocks = {}
    for part in ("encoder", "decoder"):
        blocks[f"{part}.mid_block.attentions.0."] = (f"{part}.mid.attn_1.", _VAE_ATTENTION)
        for j in range(2):
            blocks[f"{part}.mid_block.resnets.{j}."] = (f"{part}.mid.block_{j + 1}.", _VAE_RESNET)
    for b in range(len(vae.config.down_block_types)):
        for j in range(vae.config.layers_per_block):
            blocks[f"encoder.down_blocks.{b}.resnets.{j}."] = (f"encoder.down.{b}.block.{j}.", _VAE_RESNET)
        blocks[f"encoder.down_blocks.{b}.downsamplers.0."] = (f"encoder.down.{b}.downsample.", {})
    for b in range(ups):
        for j in range(vae.config.layers_per_block + 1):
            blocks[f"decoder.up_blocks.{b}.resnets.{j}."] = (f"decoder.up.{ups - 1 - b}.block.{j}.", _VAE_RESNET)
        blocks[f"decoder.up_blocks.{b}.upsamplers.0."] = (f"decoder.up.{ups - 1 - b}.upsample.", {})
    tensors = _gather(state_dict, _renamed(state_dict, DIFFUSERS_TO_LDM_MAPPING["vae"], blocks), "vae")
    return {k: v[..., None, None] if ".mid.attn_1." in k and v.ndim == 2 else v for k, v in tensors.items()}


def _clip(text_encoder) -> dict[str, torch.Tensor]:
    """transformers' own layout, with the `text_model.` that transformers >= 5.6 dropped from CLIPTextModel
    (Diffusers strips it again: `has_text_model_wrapper` in create_diffusers_clip_model_from_ldm)."""
    state_dict = text_encoder.state_dict()
    prefix = "" if hasattr(text_encoder, "text_model") else "text_model."
    return _gather(state_dict, {prefix + key: (key,) for key in state_dict}, type(text_encoder).__name__)


def _open_clip_name(name: str) -> str:
    """A CLIP name (within `text_model.encoder`) in OpenCLIP's words, by Diffusers' own table of name parts."""
    for diffusers_part, open_clip_part in DIFFUSERS_TO_LDM_MAPPING["openclip"]["transformer"].items():
        name = name.replace(diffusers_part, open_clip_part)
    return name


def _open_clip(text_encoder) -> dict[str, torch.Tensor]:
    """OpenCLIP's layout: resblocks with q/k/v fused into in_proj, and text_projection stored transposed."""
    state_dict = _clip(text_encoder)
    whole = DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"]
    sources = {}
    for key in state_dict:
        fused = _QKV.fullmatch(key)
        if key in whole:
            sources[whole[key]] = (key,)
        elif fused:
            attention, param = fused.groups()
            parts = tuple(f"{attention}.{x}_proj.{param}" for x in "qkv")
            sources[f"transformer.{_open_clip_name(attention)}.in_proj_{param}"] = parts
        else:
            sources["transformer." + _open_clip_name(key)] = (key,)
    tensors = _gather(state_dict, sources, "OpenCLIP " + type(text_encoder).__name__)
    if "text_projection" in tensors:
        tensors["text_projection"] = tensors["text_projection"].T.contiguous()
    return tensors


def _t5(text_encoder) -> dict[str, torch.Tensor]:
    """transformers' layout. Both tied embeddings (`shared`, `encoder.embed_tokens`) are written, as SD3's files
    have them: Diffusers' T5 loader leaves a tensor without its own key on the meta device, tied or not."""
    state_dict = text_encoder.state_dict()
    return _gather(state_dict, {key: (key,) for key in state_dict}, "T5")


def _swapped(tensors: dict[str, torch.Tensor], modules: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The original adaLN of `modules` orders its output (shift, scale), Diffusers' (scale, shift); swapping the
    halves is its own inverse, so Diffusers' `swap_scale_shift` undoes itself."""
    return {k: swap_scale_shift(v, dim=0) if k.rpartition(".")[0] in modules else v for k, v in tensors.items()}


def _mmdit(transformer) -> dict[str, torch.Tensor]:
    """SD3's MMDiT. The last layer's context block only feeds the attention, so its adaLN is the 2-way
    (shift, scale) kind, which Diffusers stores swapped like the final layer's."""
    state_dict, layers = transformer.state_dict(), transformer.config.num_layers
    sources = _modules(state_dict, _MMDIT)
    for i in range(layers):
        sources |= _modules(state_dict, _MMDIT_JOINT_BLOCK, f"joint_blocks.{i}.", f"transformer_blocks.{i}.")
    swapped = ("final_layer.adaLN_modulation.1", f"joint_blocks.{layers - 1}.context_block.adaLN_modulation.1")
    return _swapped(_gather(state_dict, sources, "SD3 transformer"), swapped)


def _bfl_sources(transformer, whole: dict, double: dict, single: dict) -> _Sources:
    """BFL's layouts (Flux, Chroma, Flux.2): the top-level modules, then `double_blocks.N` and `single_blocks.N`."""
    state_dict, config = transformer.state_dict(), transformer.config
    sources = _modules(state_dict, whole)
    for i in range(config.num_layers):
        sources |= _modules(state_dict, double, f"double_blocks.{i}.", f"transformer_blocks.{i}.")
    for i in range(config.num_single_layers):
        sources |= _modules(state_dict, single, f"single_blocks.{i}.", f"single_transformer_blocks.{i}.")
    return sources


def _flux(transformer) -> dict[str, torch.Tensor]:
    """BFL's Flux: double blocks fuse each stream's q/k/v; a single block's linear1 is q, k, v and the MLP input."""
    sources = _bfl_sources(transformer, _FLUX, _FLUX_DOUBLE_BLOCK, _FLUX_SINGLE_BLOCK)
    return _swapped(_gather(transformer.state_dict(), sources, "Flux transformer"), ("final_layer.adaLN_modulation.1",))


def _chroma(transformer) -> dict[str, torch.Tensor]:
    """Chroma1's layout: Flux's blocks without their modulations, and the approximator's layers and RMSNorms."""
    sources = _bfl_sources(transformer, _CHROMA, _CHROMA_DOUBLE_BLOCK, _CHROMA_SINGLE_BLOCK)
    for i in range(transformer.config.approximator_layers):
        layer = f"distilled_guidance_layer.layers.{i}."
        sources |= _modules(transformer.state_dict(), _CHROMA_APPROXIMATOR_LAYER, layer, layer)
        sources[f"distilled_guidance_layer.norms.{i}.scale"] = (f"distilled_guidance_layer.norms.{i}.weight",)
    return _gather(transformer.state_dict(), sources, "Chroma transformer")


_FLUX2 = {"img_in": "x_embedder", "txt_in": "context_embedder", "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
          "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2", "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
          "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2", "final_layer.linear": "proj_out",
          "final_layer.adaLN_modulation.1": "norm_out.linear",
          **{f"{stream}.lin": f"{stream}.linear" for stream in ("double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation")}}  # fmt: skip
_FLUX2_DOUBLE_BLOCK = {**{k: v for k, v in _FLUX_DOUBLE_BLOCK.items() if "_mod." not in k and "_mlp." not in k},
                       "img_mlp.0": "ff.linear_in", "img_mlp.2": "ff.linear_out", "txt_mlp.0": "ff_context.linear_in", "txt_mlp.2": "ff_context.linear_out"}  # fmt: skip
_FLUX2_SINGLE_BLOCK = {"linear1": "attn.to_qkv_mlp_proj", "linear2": "attn.to_out", "norm.query_norm.scale": "attn.norm_q.weight",
                       "norm.key_norm.scale": "attn.norm_k.weight"}  # fmt: skip


FLUX2_LORA_MODULES = lora_modules(_FLUX2, _FLUX2_DOUBLE_BLOCK, _FLUX2_SINGLE_BLOCK)


def _flux2(transformer) -> dict[str, torch.Tensor]:
    """BFL's Flux.2: modulations shared by all blocks of a stream, fused q/k/v in the double blocks, one fused
    input projection per single block."""
    sources = _bfl_sources(transformer, _FLUX2, _FLUX2_DOUBLE_BLOCK, _FLUX2_SINGLE_BLOCK)
    return _swapped(_gather(transformer.state_dict(), sources, "Flux.2 transformer"), ("final_layer.adaLN_modulation.1",))


_Z_IMAGE_RENAMES = (("all_final_layer.2-1.", "final_layer."), ("all_x_embedder.2-1.", "x_embedder."), (".attention.to_out.0.", ".attention.out."),
                    (".attention.norm_k.", ".attention.k_norm."), (".attention.norm_q.", ".attention.q_norm."))  # fmt: skip


def _z_image(transformer) -> dict[str, torch.Tensor]:
    """Z-Image's layout: renamed modules, each attention's q, k and v fused into one qkv."""
    state_dict = transformer.state_dict()
    sources = {}
    for key in state_dict:
        original = key
        for diffusers_name, original_name in _Z_IMAGE_RENAMES:
            original = original.replace(diffusers_name, original_name)
        if ".attention.to_q." in key:
            sources[original.replace(".to_q.", ".qkv.")] = tuple(key.replace(".to_q.", f".to_{p}.") for p in "qkv")
        elif ".attention.to_k." not in key and ".attention.to_v." not in key:
            sources[original] = (key,)
    return _gather(state_dict, sources, "Z-Image transformer")


_DENOISER = None  # stands for the `prefix` argument
_LAYOUTS = {  # pipeline class: {component: (prefix of its keys in the file, converter)}, in the file's order
    "StableDiffusionPipeline": {"unet": (_DENOISER, _unet), "vae": ("first_stage_model.", _vae),
                                "text_encoder": ("cond_stage_model.transformer.", _clip)},
    "StableDiffusionXLPipeline": {"unet": (_DENOISER, _unet), "vae": ("first_stage_model.", _vae),
                                  "text_encoder": ("conditioner.embedders.0.transformer.", _clip),
                                  "text_encoder_2": ("conditioner.embedders.1.model.", _open_clip)},
    "StableDiffusion3Pipeline": {"transformer": (_DENOISER, _mmdit), "vae": ("first_stage_model.", _vae),
                                 "text_encoder": ("text_encoders.clip_l.transformer.", _clip),
                                 "text_encoder_2": ("text_encoders.clip_g.transformer.", _clip),
                                 "text_encoder_3": ("text_encoders.t5xxl.transformer.", _t5)},
    "FluxPipeline": {"transformer": (_DENOISER, _flux)},
    "ChromaPipeline": {"transformer": (_DENOISER, _chroma)},
    "ZImagePipeline": {"transformer": (_DENOISER, _z_image)},
    "Flux2KleinPipeline": {"transformer": (_DENOISER, _flux2)},
    "Flux2Pipeline": {"transformer": (_DENOISER, _flux2)},
    "QwenImagePipeline": {"transformer": (_DENOISER, lambda transformer: dict(transformer.state_dict()))},
}  # fmt: skip
_SD2_TEXT_ENCODER = ("cond_stage_model.model.", _open_clip)


def _layout(pipe: DiffusionPipeline, open_clip: bool) -> dict:
    kind = type(pipe).__name__
    if kind not in _LAYOUTS:
        raise ValueError(f"no original single-file layout for a {kind}; known: {', '.join(_LAYOUTS)}")
    if open_clip and kind != "StableDiffusionPipeline":
        raise ValueError(f"open_clip is the layout of SD 2.x text encoders, not of a {kind}")
    return _LAYOUTS[kind] | ({"text_encoder": _SD2_TEXT_ENCODER} if open_clip else {})


def original_state_dict(pipe: DiffusionPipeline, components: Iterable[str] | None = None, prefix: str = LDM_UNET_KEY,
                        open_clip: bool = False) -> dict[str, torch.Tensor]:
    """`pipe`'s weights under their original-layout names, as `save_single_file` writes them."""
    layout = _layout(pipe, open_clip)
    components = tuple(layout) if components is None else tuple(components)
    unknown = [name for name in components if name not in layout]
    if unknown:
        raise ValueError(f"a {type(pipe).__name__} file holds no {', '.join(unknown)}; it holds {', '.join(layout)}")
    tensors = {}
    for name in components:
        key_prefix, convert = layout[name]
        key_prefix = prefix if key_prefix is _DENOISER else key_prefix
        tensors |= {key_prefix + key: value for key, value in convert(getattr(pipe, name)).items()}
    return tensors


def save_single_file(pipe: DiffusionPipeline | str | Path, path, components: Iterable[str] | None = None,
                     prefix: str = LDM_UNET_KEY, open_clip: bool = False) -> Path:
    """Writes `pipe` (a pipeline, or its Diffusers folder) to `path` as one original-layout safetensors file.

    components: the pipeline components to write (default: all the layout holds, see the module doc), e.g.
        ("transformer", "vae") or ("transformer",) for SD3 files without text encoders.
    prefix: of the denoiser's keys: "model.diffusion_model." as LDM files and ComfyUI saves have them, or ""
        for bare keys as in BFL's flux1-dev.safetensors (Diffusers reads bare keys for SD3 and Flux only).
    open_clip: write a StableDiffusionPipeline's text encoder as SD 2.x files do (OpenCLIP's layout under
        `cond_stage_model.model.`); a Diffusers pipeline does not record whether its CLIP came from OpenCLIP.
    """
    if not isinstance(pipe, DiffusionPipeline):
        pipe = DiffusionPipeline.from_pretrained(pipe)
    path = Path(path)
    save_file(original_state_dict(pipe, components, prefix, open_clip), str(path))
    return path
