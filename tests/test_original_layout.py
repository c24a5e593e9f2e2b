"""tests/original_layout.py writes original-layout single files that Diffusers' `from_single_file` reads back
into the very same weights: every parameter and buffer bit for bit, no tensor of the file left unread."""

import logging

import pytest
import torch
from diffusers import (
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
from safetensors.torch import load_file

from plugin.families.original_layout import original_state_dict, save_single_file
from plugin.families import open_model
from plugin.tiny import build_tiny_pipeline

LDM = "model.diffusion_model."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (the tiny pipeline, its saved Diffusers folder), each built once."""
    root, built = tmp_path_factory.mktemp("tiny"), {}

    def get(name):
        if name not in built:
            built[name] = (build_tiny_pipeline(name), root / name)
            built[name][0].save_pretrained(built[name][1])
        return built[name]

    return get


@pytest.fixture
def diffusers_warnings():
    """What Diffusers warns while loading, e.g. "Some weights of the model checkpoint were not used" (its
    logger does not propagate, so caplog misses it)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("diffusers").addHandler(handler)
    yield records
    logging.getLogger("diffusers").removeHandler(handler)


def assert_same_weights(loaded, original, substituted=None):
    """Every parameter and buffer loaded (none left on the meta device) and bit-identical, except tensors that
    Diffusers sets itself (`substituted`: name -> the value it sets)."""
    expected = original.state_dict() | (substituted or {})
    actual = loaded.state_dict()
    assert actual.keys() == expected.keys()
    assert [k for k in expected if actual[k].is_meta or not torch.equal(actual[k], expected[k])] == []


def assert_holds_only(path, *models):
    """The file has exactly the models' elements, so no tensor in it went unread: Diffusers' text encoder
    loaders skip unknown keys without a word."""
    file_elements = sum(t.numel() for t in load_file(path).values())
    assert file_elements == sum(t.numel() for m in models for t in m.state_dict().values())


def clip_from_own_keys(checkpoint, prefix, pipe, name, folder):
    """One CLIP loaded by Diffusers from its own keys alone. create_diffusers_clip_model_from_ldm picks the
    encoder whose position embedding is as wide as the component's; the tiny SD3's CLIPs are both 32 wide, so
    with the whole file text_encoder_2 would read CLIP-L's keys (real CLIP-L/bigG: 768/1280; the tiny SDXL's
    are 32/48 for this reason)."""
    own = {k: v for k, v in checkpoint.items() if k.startswith(prefix)}
    return create_diffusers_clip_model_from_ldm(type(getattr(pipe, name)), own, config=str(folder), subfolder=name)


@pytest.mark.parametrize("name, open_clip, text_encoder_key", [
    ("sd", False, "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"),
    ("sd2-v", True, "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"),
], ids=["sd1-clip", "sd2-open-clip"])  # fmt: skip
def test_sd_checkpoint_round_trips(name, open_clip, text_encoder_key, tiny, tmp_path, diffusers_warnings):
    pipe, folder = tiny(name)
    path = str(save_single_file(folder, tmp_path / "model.safetensors", open_clip=open_clip))
    keys = load_file(path).keys()
    assert {LDM + "input_blocks.3.1.transformer_blocks.0.attn1.to_q.weight", LDM + "output_blocks.1.2.conv.weight",
            "first_stage_model.decoder.mid.attn_1.q.weight", text_encoder_key} <= keys  # fmt: skip
    loaded = StableDiffusionPipeline.from_single_file(path, config=str(folder))
    for component in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(loaded, component), getattr(pipe, component))
    assert_holds_only(path, pipe.unet, pipe.vae, pipe.text_encoder)
    assert loaded.scheduler.config.prediction_type == pipe.scheduler.config.prediction_type
    assert diffusers_warnings == []


def test_sdxl_checkpoint_round_trips(tiny, tmp_path, diffusers_warnings):
    pipe, folder = tiny("sdxl")
    path = str(save_single_file(pipe, tmp_path / "model.safetensors"))
    checkpoint = load_file(path)
    assert {"conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
            "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
            "conditioner.embedders.1.model.text_projection",
            LDM + "label_emb.0.0.weight"} <= checkpoint.keys()  # fmt: skip
    loaded = StableDiffusionXLPipeline.from_single_file(path, config=str(folder))
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert_same_weights(getattr(loaded, component), getattr(pipe, component))
    assert_holds_only(path, pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
    assert diffusers_warnings == []


@pytest.mark.parametrize("name", ["sd3", "sd35-medium"])
@pytest.mark.parametrize("components, prefix", [
    (None, LDM),  # with its text encoders
    (("transformer", "vae"), LDM),
    (("transformer",), ""),  # bare keys, as a transformer-only file
], ids=["with-text-encoders", "transformer-vae", "bare-transformer"])  # fmt: skip
def test_sd3_checkpoint_round_trips(name, components, prefix, tiny, tmp_path, diffusers_warnings):
    pipe, folder = tiny(name)
    path = str(save_single_file(pipe, tmp_path / "model.safetensors", components, prefix))
    checkpoint = load_file(path)
    assert prefix + "joint_blocks.0.x_block.attn.qkv.weight" in checkpoint
    assert (prefix + "joint_blocks.0.x_block.attn2.qkv.weight" in checkpoint) == (name == "sd35-medium")
    written = components or ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
    lacking = {n: type(getattr(pipe, n)).from_pretrained(folder, subfolder=n)
               for n in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3") if n not in written}  # fmt: skip
    if "text_encoder_2" in written:
        clip_g = clip_from_own_keys(checkpoint, "text_encoders.clip_g.", pipe, "text_encoder_2", folder)
        lacking["text_encoder_2"] = clip_g
    loaded = StableDiffusion3Pipeline.from_single_file(path, config=str(folder), **lacking)
    for component in ("transformer", "vae", "text_encoder_2", "text_encoder_3"):
        assert_same_weights(getattr(loaded, component), getattr(pipe, component))
    # SD3 uses CLIP-L's pooled output unprojected: Diffusers loads its projection as the identity.
    identity = {"text_projection.weight": torch.eye(32)} if "text_encoder" in written else {}
    assert_same_weights(loaded.text_encoder, pipe.text_encoder, identity)
    assert_holds_only(path, *(getattr(pipe, n) for n in written))
    assert diffusers_warnings == []


@pytest.mark.parametrize("name", ["flux", "flux-schnell"])
@pytest.mark.parametrize("prefix", ["", LDM], ids=["bare", "prefixed"])  # as flux1-dev.safetensors / ComfyUI saves
def test_flux_transformer_round_trips(name, prefix, tiny, tmp_path, diffusers_warnings):
    """Read by the trainer's loader: Diffusers' own conversion of BFL files cuts at Flux.1's width (3072,
    hard-coded in convert_flux_transformer_checkpoint_to_diffusers), ours at the file's."""
    pipe, folder = tiny(name)
    path = str(save_single_file(pipe, tmp_path / "model.safetensors", prefix=prefix))
    keys = load_file(path).keys()
    assert {prefix + k for k in ("double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_attn.norm.key_norm.scale",
                                 "single_blocks.0.linear1.weight", "single_blocks.0.norm.query_norm.scale",
                                 "final_layer.adaLN_modulation.1.weight")} <= keys  # fmt: skip
    assert (prefix + "guidance_in.in_layer.weight" in keys) == (name == "flux")
    family = open_model(path, text_encoder_source=str(folder))
    family.load(torch.float32)
    assert_same_weights(family.pipe.transformer, pipe.transformer)
    assert_holds_only(path, pipe.transformer)
    # Diffusers warns at any .to(dtype) of a model with fp32 modules, even none ("kept in float32: []").
    assert [r for r in diffusers_warnings if "kept in float32: []" not in r.getMessage()] == []


def test_chroma_transformer_round_trips(tiny, tmp_path, diffusers_warnings):
    """Chroma1's files: Flux's block names (so the more specific Chroma markers decide), no modulations, the
    approximator under distilled_guidance_layer; read through the trainer's loader, cut at the file's width."""
    pipe, folder = tiny("chroma")
    path = str(save_single_file(pipe, tmp_path / "chroma.safetensors", prefix=LDM))
    keys = load_file(path).keys()
    assert {LDM + k for k in ("double_blocks.0.img_attn.qkv.weight", "distilled_guidance_layer.layers.0.in_layer.weight",
                              "distilled_guidance_layer.norms.0.scale", "single_blocks.0.linear1.weight")} <= keys  # fmt: skip
    assert not any(".img_mod." in k or "adaLN" in k for k in keys)
    family = open_model(path, text_encoder_source=str(folder))
    assert family.name == "chroma"
    family.load(torch.float32)
    assert_same_weights(family.pipe.transformer, pipe.transformer)
    assert_holds_only(path, pipe.transformer)
    assert [r for r in diffusers_warnings if "kept in float32: []" not in r.getMessage()] == []


def test_fused_and_reordered_tensors_follow_the_original_conventions(tiny):
    """Checked without Diffusers: fused q/k/v (with Flux's MLP input), adaLN halves in (shift, scale) order,
    the VAE's attention as 1x1 convs."""
    flux, sd = tiny("flux")[0], tiny("sd")[0]
    tensors = original_state_dict(flux, prefix="")
    block = flux.transformer.single_transformer_blocks[0]
    fused = torch.cat([block.attn.to_q.weight, block.attn.to_k.weight, block.attn.to_v.weight, block.proj_mlp.weight])
    assert torch.equal(tensors["single_blocks.0.linear1.weight"], fused)
    scale, shift = flux.transformer.norm_out.linear.weight.chunk(2)
    assert torch.equal(tensors["final_layer.adaLN_modulation.1.weight"], torch.cat([shift, scale]))
    vae_q = original_state_dict(sd, ["vae"])["first_stage_model.encoder.mid.attn_1.q.weight"]
    assert vae_q.shape[2:] == (1, 1)
    assert torch.equal(vae_q[:, :, 0, 0], sd.vae.encoder.mid_block.attentions[0].to_q.weight)


def test_a_component_the_layout_lacks_is_refused(tiny, tmp_path):
    with pytest.raises(ValueError, match="FluxPipeline file holds no vae"):
        save_single_file(tiny("flux")[0], tmp_path / "flux.safetensors", ["transformer", "vae"])
    with pytest.raises(ValueError, match="open_clip is the layout of SD 2.x text encoders"):
        save_single_file(tiny("sdxl")[0], tmp_path / "xl.safetensors", open_clip=True)
