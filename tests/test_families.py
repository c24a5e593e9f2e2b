"""Issue acceptance for the model families: every family trains end to end from a parameter file, its adapter
reloads in a plain Diffusers pipeline and reproduces the trainer's eval image, training lowers a held-out
loss, and the family-specific parts (SDXL crop conditioning, Flux packing, text-encoder LoRA, targets,
detection, per-family defaults) behave as Diffusers expects. The training loop itself never names a family."""

from __future__ import annotations

import ast
import io
import json
import re
import tokenize
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image
from safetensors import safe_open

from conftest import base_parameters, heldout_losses, load_fresh, render, write_parameter_file
from plugin import trainer as trainer_module
from plugin.config import load_manifest, parse_parameters
from plugin.cache import Conditioning
from plugin.data import collate_examples
from plugin.data.mixing import load_sources
from plugin.errors import ConfigError
from plugin.export import WEIGHTS_NAME
from plugin.families import FAMILIES, detect_family, load_model, open_model
from plugin.families.flux import latent_image_ids, pack_latents, unpack_latents
from plugin.families.sdxl import sdxl_time_ids
from plugin.main import main
from plugin.tiny import FAMILIES as FAMILY_NAMES, SAMPLE_RESOLUTION
from plugin.denoising import denoising_loss, sample_generators
from plugin.trainer import RunPaths, build_examples, train

PLUGIN = Path(__file__).resolve().parent.parent / "plugin"


def saved_keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def load_family(model: Path):
    """The family object exactly as the trainer builds it (fp32, frozen, eval mode)."""
    return load_model(str(model), torch.float32)


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


# --- 1. end to end from a parameter file, adapter reloads in plain Diffusers -------------------------------


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_trains_from_parameter_file_and_adapter_reproduces_eval_image(family, tiny_models, sample_data, tmp_path):
    parameters = base_parameters(
        tiny_models[family], sample_data, tmp_path / "out", max_train_steps=12, learning_rate=3e-3, seed=7, eval_steps=1
    )
    assert parameters["lora_alpha"] != parameters["lora_r"]  # the adapter metadata (alpha/r scale) matters
    assert main(["--config", str(write_parameter_file(tmp_path / "run.json", parameters))]) == 0

    run_dir = tmp_path / "out" / parameters["adaptor_name"]
    adapter = run_dir / WEIGHTS_NAME
    assert adapter.is_file()
    # 8 images, batch 2 -> 4 steps per epoch; 12 steps -> 3 epochs, each evaluated (eval_steps 1).
    last_epoch = 3
    for epoch in range(1, last_epoch + 1):
        assert (run_dir / "eval_images" / f"epoch_{epoch:04d}.png").is_file()
        assert (run_dir / "eval_images" / f"epoch_{epoch:04d}_0.png").is_file()
    assert not (run_dir / "eval_images" / f"epoch_{last_epoch + 1:04d}.png").exists()
    trained_eval = png(run_dir / "eval_images" / f"epoch_{last_epoch:04d}_0.png")
    assert trained_eval.shape == (SAMPLE_RESOLUTION, SAMPLE_RESOLUTION, 3)
    assert np.array_equal(png(run_dir / "eval_images" / f"epoch_{last_epoch:04d}.png"), trained_eval)  # 1-prompt grid

    # Render as the trainer's evaluation does, but from a pipeline loaded the way a user would.
    pipe = load_fresh(tiny_models[family])
    view = open_model(str(tiny_models[family]))
    view.configure(parse_parameters(parameters))
    kwargs = view.eval_call_kwargs()
    assert kwargs["height"] == kwargs["width"] == SAMPLE_RESOLUTION
    prompt = parameters["eval_prompt"].splitlines()[0]
    seed = parse_parameters(parameters).eval_seed + 0

    base = render(pipe, prompt, seed, **kwargs)
    pipe.load_lora_weights(str(run_dir))
    with_lora = render(pipe, prompt, seed, **kwargs)

    assert np.abs(with_lora - trained_eval).max() <= 1, "reloaded adapter does not reproduce the trainer's eval image"
    change = np.abs(with_lora - base).mean()
    assert change > 1.0, f"the trained LoRA barely changes the image (mean abs diff {change:.3f})"  # none: 0


# --- 2. training lowers a held-out denoising loss ----------------------------------------------------------


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_training_lowers_heldout_denoising_loss(family, run_training, tiny_models, heldout_data):
    cfg, result, paths = run_training(
        family, max_train_steps=40, learning_rate=2e-3, lora_r=8, lora_alpha=8, eval_prompt="", seed=3
    )
    assert result.steps == 40 and Path(result.adapter_path).is_file()
    before = heldout_losses(tiny_models[family], cfg, heldout_data)
    assert heldout_losses(tiny_models[family], cfg, heldout_data) == before  # fixed noise and timesteps
    after = heldout_losses(tiny_models[family], cfg, heldout_data, paths.adapter_dir)
    assert after.objective < 0.95 * before.objective, f"{family}: held-out loss {before.objective:.4f} -> {after.objective:.4f}"
    assert after.plain_mse < 0.95 * before.plain_mse, f"{family}: held-out plain MSE {before.plain_mse:.4f} -> {after.plain_mse:.4f}"


# --- 3. SDXL micro-conditioning uses the crop really taken ------------------------------------------------


def test_sdxl_time_ids_order_matches_diffusers(tiny_models):
    ids = sdxl_time_ids(torch.tensor([[64, 96], [80, 40]]), torch.tensor([[0, 8], [5, 0]]), (32, 48))
    assert ids.tolist() == [[64, 96, 0, 8, 32, 48], [80, 40, 5, 0, 32, 48]]
    pipe = load_fresh(tiny_models["sdxl"])
    reference = pipe._get_add_time_ids(
        (64, 96), (0, 8), (32, 48), dtype=torch.float32, text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim
    )
    assert torch.equal(ids[:1].float(), reference)


def write_non_square_dataset(folder: Path) -> Path:
    """(width, height) originals that resize to non-square images, so random crops have room to move."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, size in enumerate([(96, 64), (64, 96), (80, 40), (40, 80)]):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": "a red square on a blue background"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def test_sdxl_unet_gets_the_real_crop_coordinates(tiny_models, tmp_path, monkeypatch):
    data = write_non_square_dataset(tmp_path / "data")
    cfg = parse_parameters(
        base_parameters(
            tiny_models["sdxl"], data, tmp_path / "out", center_crop=False, train_batch_size=2,
            max_train_steps=2, eval_prompt="", seed=11, aspect_ratio_buckets=False, cache_latents=False,
        )
    )
    seen = []  # (indices, time_ids) per UNet call during training
    original = trainer_module.denoising_loss

    def spy(family, objective, conditioning, batch, generators, *rest):
        def hook(module, args, kwargs):
            seen.append((batch["indices"].tolist(), kwargs["added_cond_kwargs"]["time_ids"].detach().clone()))

        handle = family.denoiser.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            return original(family, objective, conditioning, batch, generators, *rest)
        finally:
            handle.remove()

    monkeypatch.setattr(trainer_module, "denoising_loss", spy)
    train(cfg, RunPaths.for_config(cfg), log=lambda *_: None)
    assert len(seen) == 2  # one UNet call per training step (batch 2, 4 images, 2 steps = one epoch)

    examples = build_examples(cfg, load_sources(cfg))
    examples.set_epoch(0)
    crops = []
    for indices, time_ids in seen:
        assert time_ids.shape == (len(indices), 6)
        for row, index in zip(time_ids.tolist(), indices):
            example = examples[index]
            expected = [*example["original_size"], *example["crop_top_left"], cfg.resolution, cfg.resolution]
            assert row == [float(v) for v in expected], f"example {index}"
            crops.append(example["crop_top_left"])
    assert sorted(i for indices, _ in seen for i in indices) == [0, 1, 2, 3]
    assert any(c != (0, 0) for c in crops), "random crops on non-square images should not all be at (0, 0)"


# --- 4. Flux packing and positional ids match FluxPipeline -------------------------------------------------


def test_flux_packing_and_ids_match_diffusers(tiny_models):
    batch, channels, height, width = 2, 4, 6, 10  # latent sides; non-square catches row/column mix-ups
    latents = torch.randn(batch, channels, height, width, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(latents)
    assert packed.shape == (batch, (height // 2) * (width // 2), channels * 4)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, batch, channels, height, width))
    assert torch.equal(unpack_latents(packed, height, width), latents)

    pipe = load_fresh(tiny_models["flux"])
    scale = pipe.vae_scale_factor
    assert torch.equal(unpack_latents(packed, height, width), FluxPipeline._unpack_latents(packed, height * scale, width * scale, scale))

    ids = latent_image_ids(height, width, "cpu", torch.float32)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, "cpu", torch.float32))
    _, pipeline_ids = pipe.prepare_latents(
        batch, channels, height * scale, width * scale, torch.float32, "cpu", torch.Generator().manual_seed(0)
    )
    assert torch.equal(ids, pipeline_ids)
    assert ids[1].tolist() == [0, 0, 1] and ids[width // 2].tolist() == [0, 1, 0]  # (0, row, column)


# --- 5. text-encoder LoRA ----------------------------------------------------------------------------------


def prompt_embeddings(pipe, family: str, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        if family == "sd":
            return pipe.encode_prompt(prompt, "cpu", 1, False)[0].flatten()
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return torch.cat([embeds.flatten(), pooled.flatten()])


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_text_encoder_lora_is_saved_and_reloads(family, run_training, tiny_models, monkeypatch):
    prompt = "a green triangle on a white background"
    trained = []  # the in-memory encoder output each time the trainer saves the adapter
    original = trainer_module.save_adapter_atomic

    def spy(family_object, modules, folder, *rest):
        trained.append(prompt_embeddings(family_object.pipe, family, prompt))
        return original(family_object, modules, folder, *rest)

    monkeypatch.setattr(trainer_module, "save_adapter_atomic", spy)
    _, result, paths = run_training(family, train_text_encoder=True, max_train_steps=12, learning_rate=3e-3, eval_prompt="")
    assert trained

    keys = saved_keys(result.adapter_path)
    prefixes = {key.split(".")[0] for key in keys}
    expected = {"unet", "text_encoder"} | ({"text_encoder_2"} if family == "sdxl" else set())
    assert prefixes == expected
    for encoder in expected - {"unet"}:
        assert any(k.startswith(f"{encoder}.") and "lora_A" in k for k in keys)
        assert any(k.startswith(f"{encoder}.") and "lora_B" in k for k in keys)

    pipe = load_fresh(tiny_models[family])
    base = prompt_embeddings(pipe, family, prompt)
    pipe.load_lora_weights(str(paths.adapter_dir))
    reloaded = prompt_embeddings(pipe, family, prompt)
    assert (reloaded - base).abs().mean() > 1e-3, "text-encoder LoRA does not change the prompt embedding"
    torch.testing.assert_close(reloaded, trained[-1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["sd3", "flux", "chroma"])
def test_text_encoder_lora_is_refused_for_flow_families(family, run_training):
    with pytest.raises(ConfigError, match="train_text_encoder"):
        run_training(family, train_text_encoder=True)


# --- 6. LoRA target modules --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_unknown_target_module_is_a_config_error(family, run_training):
    with pytest.raises(ConfigError, match="not_a_module"):
        run_training(family, lora_target_modules="to_q,not_a_module")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_custom_target_modules_are_the_only_ones_trained(family, run_training):
    _, result, _ = run_training(family, lora_target_modules=" to_q , to_v ", max_train_steps=2, eval_prompt="")
    keys = saved_keys(result.adapter_path)
    targets = {re.sub(r"\.lora_[AB]\.weight$", "", key).rsplit(".", 1)[-1] for key in keys}
    assert targets == {"to_q", "to_v"}
    assert all(re.search(r"\.lora_[AB]\.weight$", key) for key in keys)


# --- 7. detection ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_detects_each_tiny_model(family, tiny_models):
    assert detect_family(str(tiny_models[family])).name == family


def write_model_index(folder: Path, class_name: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name, "_diffusers_version": "0.42.1"}))
    return folder


# Pipeline class name prefixes and their family, the longer prefix of a pair first.
CLASS_PREFIXES = (("StableDiffusionXL", "sdxl"), ("StableDiffusion3", "sd3"), ("StableDiffusion", "sd"), ("Flux2", "flux2"), ("FluxKontext", "flux_kontext"),
                  ("Flux", "flux"), ("Chroma", "chroma"), ("ZImage", "zimage"), ("QwenImageEditPlus", "qwen_image_edit_plus"),
                  ("QwenImageEdit", "qwen_image_edit"), ("QwenImage", "qwen_image"))  # fmt: skip


def expected_family(class_name: str) -> str:
    return next(family for prefix, family in CLASS_PREFIXES if class_name.startswith(prefix))


@pytest.mark.parametrize("class_name", load_manifest()["model_architectures"])
def test_every_manifest_architecture_maps_to_its_family(class_name, tmp_path):
    folder = write_model_index(tmp_path / "model", class_name)
    assert detect_family(str(folder)).name == expected_family(class_name)


def test_img2img_and_inpaint_variants_cover_all_families():
    """Every img2img and inpaint pipeline Diffusers has for a family (Flux.2 klein takes images in its own) maps to it."""
    import diffusers

    architectures = set(load_manifest()["model_architectures"])
    for family in FAMILIES:
        assert set(family.pipeline_class_names) <= architectures
        stem = family.pipeline_class.__name__.removesuffix("Pipeline")
        variants = {f"{stem}{kind}Pipeline" for kind in ("Img2Img", "Inpaint") if hasattr(diffusers, f"{stem}{kind}Pipeline")}
        assert variants <= set(family.pipeline_class_names), family.name
        assert variants or family.control_images, family.name  # every text-to-image family has them


def test_unsupported_pipeline_is_a_config_error_listing_supported(tmp_path):
    folder = write_model_index(tmp_path / "kandinsky", "KandinskyPipeline")
    with pytest.raises(ConfigError) as error:
        detect_family(str(folder))
    message = str(error.value)
    assert "KandinskyPipeline" in message
    for name in ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline"):
        assert name in message


def test_missing_folder_and_folder_without_model_index_are_config_errors(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ConfigError, match=re.escape(str(missing))):
        detect_family(str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="model_index.json"):
        detect_family(str(empty))


# --- 8. per-family defaults and objective compatibility ----------------------------------------------------


def configured(model: Path, data: Path, tmp_path: Path, **overrides):
    family = load_family(model)
    return family, *family.configure(parse_parameters(base_parameters(model, data, tmp_path / "out", **overrides)))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_resolution_zero_is_the_models_native_size(family, tiny_models, sample_data, tmp_path):
    obj, cfg, filled = configured(tiny_models[family], sample_data, tmp_path, resolution=0)
    pipe = obj.pipe
    if family in ("sd", "sdxl"):
        native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    elif hasattr(pipe, "default_sample_size"):  # SD3, Flux and Chroma pipelines default to default_sample_size latents
        native = pipe.default_sample_size * pipe.vae_scale_factor
    else:  # Z-Image's pipeline defaults to 1024 px, whatever its VAE
        native = 1024
    assert cfg.resolution == filled["resolution"] == native
    assert native == {"flux": 256, "flux2": 256, "chroma": 256, "qwen_image": 256, "zimage": 1024}.get(family, SAMPLE_RESOLUTION)  # 128 latents, or 1024 px
    assert obj.eval_call_kwargs()["height"] == native


@pytest.mark.parametrize("family", ["sd3", "flux", "chroma"])
def test_flow_family_defaults_and_rejections(family, tiny_models, sample_data, tmp_path):
    _, cfg, filled = configured(tiny_models[family], sample_data, tmp_path)
    assert (cfg.timestep_sampling, cfg.loss_weighting) == ("logit_normal", "uniform")
    assert filled["timestep_sampling"] == "logit_normal" and filled["loss_weighting"] == "uniform"
    for weighting in ("min_snr", "snr", "edm"):
        with pytest.raises(ConfigError, match="loss_weighting"):
            configured(tiny_models[family], sample_data, tmp_path, loss_weighting=weighting, snr_gamma=5)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_ddpm_family_defaults_and_rejections(family, tiny_models, sample_data, tmp_path):
    _, cfg, _ = configured(tiny_models[family], sample_data, tmp_path, snr_gamma=5)
    assert (cfg.timestep_sampling, cfg.loss_weighting, cfg.prediction_type) == ("uniform", "min_snr", "epsilon")
    _, cfg, _ = configured(tiny_models[family], sample_data, tmp_path)
    assert cfg.loss_weighting == "uniform"
    for weighting in ("cosmap", "sigma_sqrt"):
        with pytest.raises(ConfigError, match="loss_weighting"):
            configured(tiny_models[family], sample_data, tmp_path, loss_weighting=weighting)


# --- 8b. models that differ from the stock configs ----------------------------------------------------------


def saved_variant(family: str, folder: Path, edit) -> Path:
    """A tiny pipeline changed by edit(pipe) (which may return a replacement pipe), saved to folder."""
    from plugin.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(family)
    pipe = edit(pipe) or pipe
    pipe.save_pretrained(folder)
    return folder


def test_sampler_without_x0_mode_is_replaced_for_evaluation(run_training, sample_data, tmp_path):
    """SD 1.5 ships PNDM, which cannot sample an x0-prediction model: evaluation switches to DDIM (with the
    model's betas), the adapter is saved, and the eval images render."""
    from diffusers import DDIMScheduler, PNDMScheduler

    def pndm(pipe):
        pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)

    model = saved_variant("sd", tmp_path / "pndm", pndm)
    family, cfg, _ = configured(model, sample_data, tmp_path, prediction_type="sample")
    scheduler = family.eval_pipeline().scheduler
    assert isinstance(scheduler, DDIMScheduler) and scheduler.config.prediction_type == "sample"
    family.configure(cfg.replace(prediction_type="epsilon"))
    assert isinstance(family.eval_pipeline().scheduler, PNDMScheduler), "the model's own sampler when it fits"
    params = base_parameters(model, sample_data, tmp_path / "out", prediction_type="sample", max_train_steps=2)
    result = train(parse_parameters(params), RunPaths.for_config(parse_parameters(params)), log=lambda *_: None)
    assert result.adapter_path.is_file() and result.eval_images[-1].is_file()


def test_zero_terminal_snr_model_trains_with_its_own_schedule(sample_data, tmp_path):
    """A v-prediction model whose scheduler config already rescales to zero terminal SNR: the objective
    gets the model's plain betas and rescales them itself (rather than failing on a final beta of 1)."""
    def zero_snr(pipe):
        pipe.scheduler.register_to_config(prediction_type="v_prediction", rescale_betas_zero_snr=True)

    model = saved_variant("sd", tmp_path / "zsnr", zero_snr)
    family, cfg, filled = configured(model, sample_data, tmp_path)
    assert filled["rescale_betas_zero_snr"] is True and cfg.prediction_type == "v_prediction"
    objective = family.make_objective()
    assert objective.alphas_cumprod[-1] < 1e-6 and objective.alphas_cumprod[0] > 0.99


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_inpainting_checkpoints_are_refused_by_name(family, sample_data, tmp_path):
    from diffusers import UNet2DConditionModel

    def nine_channels(pipe):
        pipe.unet = UNet2DConditionModel.from_config({**pipe.unet.config, "in_channels": 9})

    model = saved_variant(family, tmp_path / "inpaint", nine_channels)
    with pytest.raises(ConfigError, match=r"model_name: .* takes 9 input channels, not the 4"):
        configured(model, sample_data, tmp_path)


def test_sdxl_refiner_is_refused_by_name(sample_data, tmp_path):
    model = saved_variant("sdxl", tmp_path / "refiner", lambda pipe: pipe.register_modules(text_encoder=None, tokenizer=None))
    with pytest.raises(ConfigError, match="no first text encoder"):
        configured(model, sample_data, tmp_path)


@pytest.mark.parametrize("family", ["sd3", "flux", "chroma"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_training_noise_levels_are_the_samplers(family, dynamic, sample_data, tmp_path):
    """Training's shifted sigmas equal the ones the pipeline's scheduler samples at this resolution, with a
    static shift and with dynamic (resolution-dependent) shifting, computed as the pipeline computes μ."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    from plugin.objectives import shift_sigmas

    def dynamic_shifting(pipe):
        pipe.scheduler.register_to_config(use_dynamic_shifting=dynamic)

    model = saved_variant(family, tmp_path / "shift", dynamic_shifting)
    obj, cfg, _ = configured(model, sample_data, tmp_path, resolution=64)
    scheduler = obj.pipe.scheduler
    steps = 20
    tokens = (cfg.resolution // obj.vae_scale_factor // 2) ** 2
    c = scheduler.config
    mu = calculate_shift(tokens, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                         c.get("base_shift", 0.5), c.get("max_shift", 1.15))
    unshifted = torch.linspace(1.0, 1.0 / steps, steps)
    scheduler.set_timesteps(sigmas=unshifted.numpy(), mu=mu if dynamic else None)
    torch.testing.assert_close(shift_sigmas(unshifted, obj.training_shift()), scheduler.sigmas[:-1].float(), rtol=1e-5, atol=1e-6)


def test_only_the_denoiser_runs_under_autocast(tiny_models, sample_data, tmp_path):
    """The VAE and text encoder keep their own precision inside a mixed-precision step (autocast would run
    an fp32 VAE and T5's fp32 layers in half precision, which overflows); the denoiser is autocast."""
    family, cfg, _ = configured(tiny_models["sd"], sample_data, tmp_path, cache_latents=False)
    pipe = family.pipe
    dtypes = {}
    probes = {"vae": pipe.vae.encoder.conv_in, "text": pipe.text_encoder.encoder.layers[0].mlp.fc1,
              "denoiser": pipe.unet.conv_in}
    def record(name):
        def hook(module, args, output):
            dtypes.setdefault(name, output.dtype)
        return hook

    for name, module in probes.items():
        module.register_forward_hook(record(name))
    examples = build_examples(cfg, load_sources(cfg.replace(dataset_name=str(sample_data))))
    batch = collate_examples([examples[0], examples[1]])
    denoising_loss(family, family.make_objective(), Conditioning(family), batch, sample_generators(0, 0, batch["indices"]),
                   lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert dtypes == {"vae": torch.float32, "text": torch.float32, "denoiser": torch.bfloat16}


def test_fp16_load_keeps_the_vae_fp32_and_it_decodes_half_latents(tiny_models):
    family = load_model(str(tiny_models["sd"]), torch.float16)
    assert family.pipe.vae.dtype == torch.float32 and family.pipe.unet.dtype == torch.float16
    image = family.pipe.vae.decode(torch.randn(1, 4, 16, 16, dtype=torch.float16)).sample
    assert image.dtype == torch.float32 and torch.isfinite(image).all()


def test_eval_pipeline_keeps_the_pipelines_own_settings(sample_data, tmp_path):
    model = saved_variant("sdxl", tmp_path / "nozeros", lambda pipe: pipe.register_to_config(force_zeros_for_empty_prompt=False))
    family, _, _ = configured(model, sample_data, tmp_path)
    assert family.eval_pipeline().config.force_zeros_for_empty_prompt is False


# --- 9. the training loop never branches on the family -----------------------------------------------------

LOOP_FILES = ("trainer.py", "evaluation.py", "export.py", "objectives.py", "denoising.py", *(f"data/{name.name}" for name in sorted((PLUGIN / "data").glob("*.py"))))
FAMILY_WORDS = ("sdxl", "sd3", "flux", "stablediffusion", "unet", "transformer")  # substrings, so "transformers" too


def code_words(path: Path) -> list[tuple[int, str]]:
    """(line, word) for every identifier and every word inside a non-docstring string literal; comments and
    docstrings (prose such as "Transformer Lab") are left out."""
    source = path.read_text(encoding="utf-8")
    docstring_lines = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                docstring_lines.update(range(first.lineno, first.end_lineno + 1))
    words = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.NAME:
            words.append((token.start[0], token.string))
        elif token.type == tokenize.STRING and token.start[0] not in docstring_lines:
            words += [(token.start[0], w) for w in re.findall(r"[A-Za-z0-9_]+", token.string)]
    return words


def family_word_hits(path: Path, words=FAMILY_WORDS, exact=("sd", "sdxl", "sd3", "flux")) -> list[str]:
    hits = []
    for line, word in code_words(path):
        lowered = word.lower()
        if any(w in lowered for w in words) or any(part in exact for part in re.split(r"_+", lowered)):
            hits.append(f"{path.name}:{line}: {word}")
    return hits


def test_code_words_sees_identifiers_and_strings_but_not_docstrings(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        '"""About SDXL and Transformer Lab."""\n'
        "# flux in a comment\n"
        "def f(family):\n"
        '    """The unet."""\n'
        '    if family.name == "sd3":\n'
        "        return load_unet_model()\n"
        "    import transformers\n"
        '    return family.name == "sd" or sdxl_time_ids\n'
    )
    hits = family_word_hits(sample)
    assert [h.split(": ")[1] for h in hits] == ["sd3", "load_unet_model", "transformers", "sd", "sdxl_time_ids"]


@pytest.mark.parametrize("name", LOOP_FILES)
def test_training_loop_files_never_name_a_family(name):
    assert family_word_hits(PLUGIN / name) == []


def test_family_names_only_in_families_tiny_and_main():
    allowed = {PLUGIN / "tiny.py", PLUGIN / "main.py"}
    checked = [p for p in PLUGIN.rglob("*.py") if "families" not in p.parts and p not in allowed]
    assert {p.relative_to(PLUGIN).as_posix() for p in checked} >= set(LOOP_FILES) | {"config.py"}
    hits = [h for p in checked for h in family_word_hits(p, words=("sdxl", "sd3", "flux"))]
    assert hits == []
