"""Latent and text-embedding caches: cached runs train the same adapter as uncached ones, every ingredient of a
key forces recomputation, a disk cache is reused across runs, and bad caches are reported."""

from __future__ import annotations

import dataclasses
import json
import resource
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import base_parameters
from plugin.cache import DiskStore, LatentCache, TextCache, digest, module_identity, tokenizer_identity
from plugin.config import parse_parameters
from plugin.data import ImagePlan
from plugin.errors import ConfigError
from plugin.export import WEIGHTS_NAME
from plugin.tiny import FAMILIES, build_tiny_pipeline, offline_clip_tokenizer
from plugin.trainer import RunPaths, train



def run(model: Path, data: Path, out: Path, log=None, **overrides):
    cfg = parse_parameters(base_parameters(model, data, out, **{"max_train_steps": 6, "eval_prompt": "", **overrides}))
    paths = RunPaths.for_config(cfg)
    result = train(cfg, paths, log=log or (lambda *_: None))
    return result, load_file(str(paths.adapter_dir / WEIGHTS_NAME))


def assert_same_adapter(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol)


def unpadded(text: dict) -> dict:
    """A batch's text encodings padded only to its longest caption, whatever padding they came with."""
    from plugin.cache import stacked, without_padding

    return stacked([without_padding({name: t[k] for name, t in text.items()}) for k in range(len(next(iter(text.values()))))])


def changed(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_and_uncached_runs_train_the_same_adapter(family, tiny_models, sample_data, tmp_path, monkeypatch):
    """Flip on (both variants cached), caption dropout on (the empty caption cached), batch 2, the default
    learning rate. The latents a step sees are bit for bit the same; text embeddings may differ in the last
    bit, because a text encoder's matmuls round differently for another batch composition (1e-7 in SDXL's
    pooled projection), and Adam turns such noise into at most ~1e-6 in the adapter."""
    from plugin.cache import Conditioning

    seen: list[list] = []
    original = Conditioning.__call__

    def recording(self, batch):
        latents, text, masks = original(self, batch)
        seen[-1].append((latents.clone(), {k: v.clone() for k, v in text.items()}))
        return latents, text, masks

    monkeypatch.setattr(Conditioning, "__call__", recording)
    common = dict(random_flip=True, caption_dropout_rate=0.3, trigger_word="shapes", learning_rate=1e-4)
    seen.append([])
    cached, with_cache = run(tiny_models[family], sample_data, tmp_path / "a", **common)
    seen.append([])
    uncached, without = run(tiny_models[family], sample_data, tmp_path / "b", cache_latents=False,
                            cache_text_embeddings=False, **common)  # fmt: skip
    assert cached.cache_counts == {"latents": (16, 0), "text": (9, 0)}  # 8 images x 2 flips; 8 captions + ""
    assert uncached.cache_counts == {}
    assert len(seen[0]) == len(seen[1]) == 6
    for (latents_a, text_a), (latents_b, text_b) in zip(*seen):
        assert torch.equal(latents_a, latents_b) and latents_a.stride() == latents_b.stride()
        text_a, text_b = unpadded(text_a), unpadded(text_b)  # the cache keeps masked encodings cut to each caption
        for name in text_b:
            torch.testing.assert_close(text_a[name], text_b[name], rtol=0, atol=1e-6)
    assert_same_adapter(with_cache, without)
    assert any(v.abs().max() > 1e-4 for k, v in with_cache.items() if "lora_B" in k), "the adapter trained"


def test_bf16_run_caches_fp32_latents_and_bf16_text(tiny_models, sample_data, tmp_path):
    cache = tmp_path / "cache"
    run(tiny_models["sd"], sample_data, tmp_path / "out", mixed_precision="bf16", cache_dir=str(cache), max_train_steps=2)
    latents = [load_file(str(f)) for f in (cache / "latents").rglob("*.safetensors")]
    text = [load_file(str(f)) for f in (cache / "text").rglob("*.safetensors")]
    assert latents and all(entry["latents"].dtype == torch.float32 for entry in latents)
    assert text and all(entry["encoder_hidden_states"].dtype == torch.bfloat16 for entry in text)


# --------------------------------------------------------------------------------------------------------
# Keys


def test_every_ingredient_of_a_latent_key_changes_it():
    plan = ImagePlan(target=(32, 48), resized=(33, 48), crop_top_left=(0, 0), flip=False, interpolation="lanczos")
    cache = LatentCache(store=None, vae_identity="vae-a", image_ids=["image-a", "image-b"])
    base = cache.key(0, plan)
    variants = [
        cache.key(1, plan),  # other image content
        LatentCache(None, "vae-b", ["image-a"]).key(0, plan),  # other VAE
        cache.key(0, dataclasses.replace(plan, target=(48, 32))),  # other bucket
        cache.key(0, dataclasses.replace(plan, resized=(34, 49))),  # other resolution
        cache.key(0, dataclasses.replace(plan, crop_top_left=(1, 0))),  # other crop box
        cache.key(0, dataclasses.replace(plan, flip=True)),
        cache.key(0, dataclasses.replace(plan, interpolation="bicubic")),
        cache.key(0, dataclasses.replace(plan, rotation=1.0)),
        cache.key(0, dataclasses.replace(plan, jitter=(("hue", 0.1),))),
    ]
    assert len({base, *variants}) == len(variants) + 1
    assert cache.key(0, dataclasses.replace(plan)) == base


def test_every_ingredient_of_a_text_key_changes_it():
    base = TextCache(None, "encoders-a").key("shapes, a red circle")
    assert TextCache(None, "encoders-a").key("shapes, a red circle") == base
    assert TextCache(None, "encoders-a").key("a red circle") != base
    assert TextCache(None, "encoders-b").key("shapes, a red circle") != base


def test_model_identity_sees_weights_dtype_and_config():
    vae = build_tiny_pipeline("sd").vae
    base = module_identity(vae)
    assert module_identity(build_tiny_pipeline("sd").vae) == base, "the same weights give the same identity"
    with torch.no_grad():
        vae.decoder.conv_out.bias[0] += 1e-3
    assert module_identity(vae) != base
    assert module_identity(build_tiny_pipeline("sd").vae.to(torch.bfloat16)) != base
    other = build_tiny_pipeline("sd").vae
    other.register_to_config(scaling_factor=0.5)
    assert module_identity(other) != base


def test_tokenizer_identity_sees_the_vocabulary():
    tokenizer = offline_clip_tokenizer()
    base = tokenizer_identity(tokenizer)
    assert tokenizer_identity(offline_clip_tokenizer()) == base
    tokenizer.add_tokens(["<sks>"])
    assert tokenizer_identity(tokenizer) != base
    assert digest("a", 1) != digest("a", 2)


# --------------------------------------------------------------------------------------------------------
# The disk cache across runs


def copy_dataset(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def perturbed_model(source: Path, target: Path, component: str) -> Path:
    """A copy of a saved tiny pipeline with one weight of `component` nudged."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(source))
    module = getattr(pipe, component)
    with torch.no_grad():
        next(p for p in module.parameters() if p.ndim == 2).add_(1e-2)
    pipe.save_pretrained(target)
    return target


def test_disk_cache_is_reused_and_each_ingredient_forces_recomputation(tiny_models, sample_data, tmp_path):
    cache = str(tmp_path / "cache")
    model, data = tiny_models["sd"], copy_dataset(sample_data, tmp_path / "data")
    common = dict(cache_dir=cache, trigger_word="shapes", train_batch_size=2)
    first, first_adapter = run(model, data, tmp_path / "o1", **common)
    assert first.cache_counts == {"latents": (8, 0), "text": (8, 0)}
    again, again_adapter = run(model, data, tmp_path / "o2", **common)
    assert again.cache_counts == {"latents": (0, 8), "text": (0, 8)}
    assert_same_adapter(first_adapter, again_adapter, atol=1e-6)

    image = data / "0000.png"
    pixels = np.array(Image.open(image))
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(image)  # same file name, new content
    assert run(model, data, tmp_path / "o3", **common)[0].cache_counts == {"latents": (1, 7), "text": (0, 8)}

    cases = {
        "resolution": (dict(resolution=16), {"latents": (8, 0), "text": (0, 8)}),
        "interpolation": (dict(image_interpolation_mode="bicubic"), {"latents": (8, 0), "text": (0, 8)}),
        "flip": (dict(random_flip=True), {"latents": (8, 8), "text": (0, 8)}),  # the unflipped ones exist
        "trigger word": (dict(trigger_word="blobs"), {"latents": (0, 8), "text": (8, 0)}),
    }
    for name, (overrides, expected) in cases.items():
        result, _ = run(model, data, tmp_path / f"o-{name}", **{**common, **overrides})
        assert result.cache_counts == expected, name
    vae_changed = perturbed_model(model, tmp_path / "vae-changed", "vae")
    assert run(vae_changed, data, tmp_path / "o5", **common)[0].cache_counts == {"latents": (8, 0), "text": (0, 8)}
    text_changed = perturbed_model(model, tmp_path / "text-changed", "text_encoder")
    assert run(text_changed, data, tmp_path / "o6", **common)[0].cache_counts == {"latents": (0, 8), "text": (8, 0)}


def test_bucket_change_forces_recomputation(tiny_models, tmp_path):
    """A landscape image trains at a wide bucket with buckets on and at the square without: other latents."""
    from test_buckets import write_images

    data = write_images(tmp_path / "data", [(96, 48), (64, 64)])
    common = dict(cache_dir=str(tmp_path / "cache"), train_batch_size=1, max_train_steps=2)
    assert run(tiny_models["sd"], data, tmp_path / "o1", **common)[0].cache_counts["latents"] == (2, 0)
    off = run(tiny_models["sd"], data, tmp_path / "o2", aspect_ratio_buckets=False, **common)[0]
    assert off.cache_counts["latents"] == (1, 1)


def test_a_corrupt_cache_file_is_recomputed_with_a_warning_naming_it(tiny_models, sample_data, tmp_path):
    cache = tmp_path / "cache"
    _, first = run(tiny_models["sd"], sample_data, tmp_path / "o1", cache_dir=str(cache))
    victim = sorted((cache / "latents").rglob("*.safetensors"))[3]
    original = load_file(str(victim))["latents"].clone()  # a copy: the file is memory-mapped and cut below
    victim.write_bytes(victim.read_bytes()[:-100])  # truncated
    with pytest.warns(UserWarning, match=f"cache_dir: {victim}.*cannot be read.*recomputing"):
        result, second = run(tiny_models["sd"], sample_data, tmp_path / "o2", cache_dir=str(cache))
    assert result.cache_counts["latents"] == (1, 7)
    # Re-encoded alone, not in a batch of 2, the VAE rounds it about 1e-7 apart; 8 steps at lr 1e-3 carry that
    # to at most a few 1e-5 in the adapter (a wrong or missing latent moves it by orders of magnitude more).
    torch.testing.assert_close(load_file(str(victim))["latents"], original, rtol=0, atol=1e-5)
    assert_same_adapter(first, second, atol=1e-4)


def test_disk_store_writes_atomically(tmp_path):
    store = DiskStore(tmp_path)
    store.put("ab" * 32, {"latents": torch.ones(2)})
    assert store.path("ab" * 32) == tmp_path / "ab" / f"{'ab' * 32}.safetensors"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["ab", f"{'ab' * 32}.safetensors"], "no temp file left"
    assert torch.equal(store.get("ab" * 32)["latents"], torch.ones(2))
    assert store.get("cd" * 32) is None


def test_unwritable_cache_dir_is_an_error_before_any_model_loads(tiny_models, sample_data, tmp_path, monkeypatch):
    from plugin.families.base import ModelFamily

    monkeypatch.setattr(ModelFamily, "load", classmethod(lambda *a: pytest.fail("the model was loaded")))
    blocker = tmp_path / "file"
    blocker.write_text("in the way")
    for cache_dir in (blocker, blocker / "sub"):
        with pytest.raises(ConfigError, match="cache_dir: cannot write to"):
            run(tiny_models["sd"], sample_data, tmp_path / "out", cache_dir=str(cache_dir))


# --------------------------------------------------------------------------------------------------------
# When a cache cannot apply


@pytest.mark.parametrize("setting, reason", [
    (dict(center_crop=False), "random crop"),
    (dict(color_jitter=True), "color_jitter"),
    (dict(random_rotation=True), "random_rotation"),
])  # fmt: skip
def test_augmentations_that_change_pixels_turn_the_latent_cache_off_with_a_note(setting, reason, tiny_models,
                                                                                 sample_data, tmp_path):  # fmt: skip
    logged = []
    result, _ = run(tiny_models["sd"], sample_data, tmp_path / "out", log=logged.append, max_train_steps=2, **setting)
    assert result.cache_counts == {"text": (8, 0)}
    assert any(line.startswith("cache_latents: off") and reason in line for line in logged)
    saved = json.loads((tmp_path / "out" / "test-adapter" / "config.json").read_text())
    assert saved["cache_latents"] is False and saved["cache_text_embeddings"] is True


def test_text_encoder_training_turns_the_text_cache_off_with_a_note(tiny_models, sample_data, tmp_path):
    logged = []
    result, adapter = run(tiny_models["sd"], sample_data, tmp_path / "out", log=logged.append, max_train_steps=2,
                          train_text_encoder=True)  # fmt: skip
    assert result.cache_counts == {"latents": (8, 0)}
    assert any(line.startswith("cache_text_embeddings: off") for line in logged)
    assert any(k.startswith("text_encoder.") for k in adapter)


def test_encoders_are_parked_when_caches_replace_them(tiny_models, sample_data, tmp_path, monkeypatch):
    from plugin.families.base import ModelFamily

    parked = {}
    original = ModelFamily.park_encoders

    def spy(self, images, text):
        original(self, images, text)
        parked["modules"] = list(self.parked)
        parked["pipe"] = self.pipe

    monkeypatch.setattr(ModelFamily, "park_encoders", spy)
    run(tiny_models["sdxl"], sample_data, tmp_path / "out", max_train_steps=1)
    pipe = parked["pipe"]
    assert [id(m) for m in parked["modules"]] == [id(pipe.vae), id(pipe.text_encoder), id(pipe.text_encoder_2)]
    run(tiny_models["sdxl"], sample_data, tmp_path / "out2", max_train_steps=1, cache_text_embeddings=False)
    assert [id(m) for m in parked["modules"]] == [id(parked["pipe"].vae)]


# --------------------------------------------------------------------------------------------------------
# Eval size and the host allocator


def test_shuffled_captions_are_all_cached_or_the_text_cache_says_it_is_off(tiny_models, sample_data, tmp_path):
    logged = []
    few = parse_parameters(base_parameters(tiny_models["sd"], sample_data, tmp_path / "few", max_train_steps=2, eval_prompt="",
                                           shuffle_caption=True, caption_prefix="red, round,"))  # fmt: skip
    train(few, RunPaths.for_config(few), log=logged.append)
    captions = {json.loads(line)["text"] for line in (sample_data / "metadata.jsonl").read_text().splitlines()}
    assert f"text cache: {6 * len(captions)} encoded, 0 reused (in memory)" in logged, "every order of each caption's 3 tags"
    assert not any("GiB of host memory" in line for line in logged)
    many = few.replace(output_dir=str(tmp_path / "many"), caption_prefix="a, b, c, d, e, f, g,")  # 8 tags: 40320 orders
    logged.clear()
    train(many, RunPaths.for_config(many), log=logged.append)
    assert "text cache off: shuffle_caption makes more than 4096 different captions, so each batch's captions are encoded as it trains" in logged


def test_a_large_cache_in_memory_is_said_with_cache_dir_as_the_remedy(tiny_models, sample_data, tmp_path, monkeypatch):
    monkeypatch.setattr("plugin.cache.LARGE_MEMORY_CACHE", 1000)  # bytes: the tiny run's caches are larger
    logged = []
    cfg = parse_parameters(base_parameters(tiny_models["sd"], sample_data, tmp_path / "out", max_train_steps=1, eval_prompt=""))
    train(cfg, RunPaths.for_config(cfg), log=logged.append)
    for name in ("latents", "text"):
        assert any(line.startswith(f"{name} cache: 0.0 GiB of host memory; with cache_dir it stays on disk") for line in logged), logged


def test_eval_width_and_height(tiny_models, sample_data, tmp_path):
    cfg = parse_parameters(base_parameters(tiny_models["sd3"], sample_data, tmp_path / "out", max_train_steps=1,
                                           eval_width=48, eval_height=24))  # fmt: skip
    result = train(cfg, RunPaths.for_config(cfg), log=lambda *_: None)
    grid = result.eval_images[-1]
    assert Image.open(grid.with_name(f"{grid.stem}_0.png")).size == (48, 24)
    bad = parse_parameters(base_parameters(tiny_models["sd3"], sample_data, tmp_path / "bad", eval_width=30))
    with pytest.raises(ConfigError, match="eval_width: 30 is not a multiple of 4, the sizes StableDiffusion3Pipeline renders"):
        train(bad, RunPaths.for_config(bad), log=lambda *_: None)


def test_freed_memory_stays_in_the_process():
    """After keep_freed_memory, a freed 256 MiB buffer is reused by the next one without new page faults;
    glibc's default would munmap it and fault in every page again."""
    from plugin.host_memory import keep_freed_memory

    assert keep_freed_memory()
    size = 256 * 2**20
    buffer = np.ones(size, dtype=np.uint8)
    del buffer
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    np.ones(size, dtype=np.uint8)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < size // 4096 // 10, f"{faults} page faults for a buffer of {size // 4096} pages"
