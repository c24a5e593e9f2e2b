"""What each flow-matching family feeds its denoiser at a training step is what its Diffusers pipeline feeds it:
the same prompt, latents and timestep give bit-identical tensors on CPU (hidden states, text states and masks,
position ids, timestep, guidance), captured at the transformer's call on both sides."""

from __future__ import annotations

import pytest
import torch

from conftest import base_parameters, load_fresh
from plugin.config import parse_parameters
from plugin.families import load_model
from plugin.families.flux import pack_latents

PROMPTS = ("a red circle on a blue background", "a cat")  # of different lengths: padding and masks matter (a tuple: ZImagePipeline rewrites a list it is given)
LATENT_SIDE = 8  # 16 px over a 2x VAE: 4x4 packed tokens


class Captured(Exception):
    """Stops the call once the denoiser's inputs are recorded."""


def denoiser_inputs(module: torch.nn.Module, call) -> dict:
    """The tensor and list arguments (tensors, lists of them, Qwen-Image's img_shapes; positional ones as
    "arg<i>") of the first call of `module` within `call()`."""
    seen = {}

    def hook(_, args, kwargs):
        seen.update({f"arg{i}": value for i, value in enumerate(args)}, **kwargs)
        raise Captured

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        call()
    except Captured:
        pass
    finally:
        handle.remove()
    return {name: value for name, value in seen.items() if isinstance(value, (torch.Tensor, list))}


def assert_identical(ours, theirs, name: str) -> None:
    if isinstance(theirs, list) and not all(isinstance(x, torch.Tensor) for x in theirs):
        assert ours == theirs, name
        return
    ours, theirs = (list(v) if isinstance(v, list) else [v] for v in (ours, theirs))
    assert len(ours) == len(theirs), name
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name


# Per family: the pipeline's layout of (B, C, H, W) latents, and its call arguments that switch off
# classifier-free guidance (or, for distilled guidance, pass the value training uses).
PIPELINE_CALLS = {
    "sd3": (lambda latents: latents, lambda cfg: {"guidance_scale": 1.0}),
    "flux": (pack_latents, lambda cfg: {"guidance_scale": cfg.guidance_scale}),
    "flux-schnell": (pack_latents, lambda cfg: {"guidance_scale": cfg.guidance_scale}),
    "chroma": (pack_latents, lambda cfg: {"guidance_scale": 1.0}),
    "zimage": (lambda latents: latents, lambda cfg: {"guidance_scale": 0.0}),  # CFG whenever the scale is above 0
    "qwen_image": (pack_latents, lambda cfg: {"true_cfg_scale": 1.0}),
    "flux2": (lambda latents: latents, lambda cfg: {"guidance_scale": 1.0}),  # the pipeline packs patchified latents itself
    "flux2-dev": (lambda latents: latents, lambda cfg: {"guidance_scale": cfg.guidance_scale}),
}


@pytest.mark.parametrize("family_name", PIPELINE_CALLS)
def test_the_denoisers_inputs_at_a_step_are_the_pipelines(family_name, tiny_models, sample_data, tmp_path):
    model = tiny_models[family_name]
    cfg = parse_parameters(base_parameters(model, sample_data, tmp_path, guidance_scale=3.5, resolution=16))
    family = load_model(str(model), torch.float32)
    cfg, _ = family.configure(cfg)
    side = LATENT_SIDE * family.vae_scale_factor
    layout = family.encode_images(torch.zeros(1, 3, side, side)).shape[1:]  # the family's latent layout (Flux.2: patchified)
    latents = torch.randn(len(PROMPTS), *layout, generator=torch.Generator().manual_seed(0))

    to_pipeline_layout, call_arguments = PIPELINE_CALLS[family_name]
    pipe = load_fresh(model)
    theirs = denoiser_inputs(pipe.transformer, lambda: pipe(prompt=list(PROMPTS), latents=to_pipeline_layout(latents), height=side, width=side,
                                                            num_inference_steps=2, output_type="latent", **call_arguments(cfg)))  # fmt: skip
    timestep = pipe.scheduler.timesteps[:1].expand(len(PROMPTS))  # the sampler's t, which each pipeline hands its denoiser in its own form
    text = family.encode_prompts(PROMPTS)
    ours = denoiser_inputs(family.denoiser, lambda: family.predict(latents, timestep, text, batch={}))

    assert sorted(ours) == sorted(theirs)
    for name, value in theirs.items():
        assert_identical(ours[name], value, name)
