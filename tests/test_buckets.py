"""Aspect-ratio buckets: the bucket grid, the nearest-bucket choice, the one-bucket-per-batch sampler, the crop
and SDXL time ids of a known image, and training every family on mixed shapes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import base_parameters
from plugin.buckets import BucketBatchSampler, BucketLayout, bucket_sizes, bucket_step, nearest_bucket
from plugin.config import parse_parameters
from plugin.families.sdxl import StableDiffusionXL
from plugin.trainer import RunPaths, train


@pytest.mark.parametrize("resolution, multiple", [(1024, 8), (1024, 16), (512, 8), (768, 16), (32, 2), (64, 4)])
def test_bucket_grid(resolution, multiple):
    buckets = bucket_sizes(resolution, multiple)
    step = bucket_step(resolution, multiple)
    assert step % multiple == 0
    assert (resolution, resolution) in buckets
    for height, width in buckets:
        assert height % step == 0 and width % step == 0
        assert height * width <= resolution * resolution
        assert height * width >= (resolution - step) ** 2 * 0.75, "every bucket keeps most of the pixel budget"
        assert 1 / 4 <= width / height <= 4
    ratios = [w / h for h, w in buckets]
    assert ratios == sorted(ratios) and len(set(ratios)) == len(ratios)
    assert min(ratios) <= 1 / 3 and max(ratios) >= 3, "the grid spans tall to wide shapes"


def test_sdxl_grid_has_the_familiar_buckets():
    """At 1024 px the 64-px grid gives the buckets SDXL users know (kohya sd-scripts' defaults)."""
    buckets = bucket_sizes(1024, 8)
    assert bucket_step(1024, 8) == 64
    for height, width in [(832, 1216), (1216, 832), (896, 1152), (768, 1344), (640, 1536), (512, 2048)]:
        assert (height, width) in buckets


def test_nearest_bucket_is_closest_in_log_aspect_ratio():
    buckets = bucket_sizes(1024, 8)
    for height, width in [(400, 600), (600, 400), (1000, 1000), (3000, 200), (720, 1280), (1080, 1920), (517, 389)]:
        chosen = nearest_bucket((height, width), buckets)
        distance = abs(math.log(chosen[1] / chosen[0]) - math.log(width / height))
        assert all(distance <= abs(math.log(w / h) - math.log(width / height)) + 1e-12 for h, w in buckets)
    assert nearest_bucket((1080, 1920), buckets) == (768, 1344)  # 16:9 -> 1.75, the closest ratio on the grid
    assert nearest_bucket((3000, 200), buckets) == (2048, 512)  # beyond 1:4 -> the tallest bucket


def test_layout_without_buckets_is_one_square():
    layout = BucketLayout.assign([(100, 300), (300, 100), (50, 50)], 64, 8, enabled=False)
    assert layout.targets == ((64, 64),) * 3
    assert layout.undersized() == [2]
    assert layout.bucket_ids() == [0, 0, 0]


def test_sampler_batches_come_from_one_bucket_and_cover_the_epoch():
    bucket_ids = [0, 1, 2, 0, 1, 0, 0, 2, 1, 0, 2]
    sampler = BucketBatchSampler(bucket_ids, batch_size=2, seed=5)
    seen_orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 2 + 2 + 3  # ceil(3/2) + ceil(3/2) + ceil(5/2)
        assert sorted(i for batch in batches for i in batch) == list(range(len(bucket_ids)))
        assert all(len({bucket_ids[i] for i in batch}) == 1 for batch in batches)
        assert all(1 <= len(batch) <= 2 for batch in batches)
        seen_orders.append(batches)
    assert seen_orders[0] != seen_orders[1], "each epoch has its own order"
    again = BucketBatchSampler(bucket_ids, batch_size=2, seed=5)
    again.set_epoch(1)
    assert list(again) == seen_orders[1], "the order is a pure function of (seed, epoch)"


def test_sampler_order_does_not_depend_on_batch_size_with_one_bucket():
    """Batch 4 sees the images that two accumulated batches of 2 see, in the same order."""
    for epoch in range(3):
        big, small = BucketBatchSampler([0] * 10, 4, seed=1), BucketBatchSampler([0] * 10, 2, seed=1)
        big.set_epoch(epoch)
        small.set_epoch(epoch)
        assert sum(big, []) == sum(small, [])


# --------------------------------------------------------------------------------------------------------
# A known image, and training on mixed shapes


def write_images(folder: Path, sizes: list[tuple[int, int]]) -> Path:
    """Random-pixel images of the given (width, height), captioned in metadata.jsonl."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, (width, height) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"a picture number {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def spy_on_conditioning(monkeypatch) -> list[tuple[list[int], tuple[int, ...]]]:
    """(indices, latent shape) of every training micro-batch."""
    from plugin.cache import Conditioning

    seen = []
    original = Conditioning.__call__

    def recording(self, batch):
        latents, text, masks = original(self, batch)
        seen.append((batch["indices"].tolist(), tuple(latents.shape)))
        return latents, text, masks

    monkeypatch.setattr(Conditioning, "__call__", recording)
    return seen


def test_a_five_to_one_image_in_sdxl_gets_its_bucket_crop_and_time_ids(tiny_models, tmp_path, monkeypatch):
    """500 x 100 (5:1) at resolution 64 on the tiny SDXL (VAE factor 2, grid step 4): beyond the 4:1 bound, so
    the widest bucket, 128 x 32; scaled by max(32/100, 128/500) = 0.32 to 160 x 32 and centre-cropped at
    left (160 - 128) / 2 = 16. SDXL is conditioned on (orig_h, orig_w, top, left, target_h, target_w)."""
    data = write_images(tmp_path / "data", [(500, 100), (64, 64)])
    cfg = parse_parameters(base_parameters(tiny_models["sdxl"], data, tmp_path / "out", resolution=64,
                                           train_batch_size=1, max_train_steps=2, eval_prompt=""))  # fmt: skip
    records = []
    original_predict = StableDiffusionXL.predict

    def spy(self, noisy_latents, timesteps, text, batch):
        captured = {}
        hook = self.denoiser.register_forward_pre_hook(
            lambda module, args, kwargs: captured.update(time_ids=kwargs["added_cond_kwargs"]["time_ids"].tolist()),
            with_kwargs=True,
        )
        try:
            return original_predict(self, noisy_latents, timesteps, text, batch)
        finally:
            hook.remove()
            records.append((batch["indices"].tolist(), batch["crop_top_lefts"].tolist(), tuple(noisy_latents.shape[-2:]),
                            captured["time_ids"]))  # fmt: skip

    monkeypatch.setattr(StableDiffusionXL, "predict", spy)
    logged = []
    train(cfg, RunPaths.for_config(cfg), log=logged.append)
    table = next(line for line in logged if line.startswith("buckets"))
    assert "128 x 32" in table and "64 x 64" in table
    (crops, latent_size, time_ids), = [record[1:] for record in records if record[0] == [0]]
    assert crops == [[0, 16]] and latent_size == (16, 64)
    assert time_ids == [[100.0, 500.0, 0.0, 16.0, 32.0, 128.0]]


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_every_family_trains_on_mixed_shapes_one_bucket_per_batch(family, tiny_models, tmp_path, monkeypatch):
    sizes = [(48, 96), (96, 48), (64, 64), (50, 100), (100, 50), (70, 70)]  # portrait, landscape, square twice
    data = write_images(tmp_path / "data", sizes)
    seen = spy_on_conditioning(monkeypatch)
    cfg = parse_parameters(base_parameters(tiny_models[family], data, tmp_path / "out", train_batch_size=2,
                                           max_train_steps=6, eval_prompt="", learning_rate=1e-3))  # fmt: skip
    result = train(cfg, RunPaths.for_config(cfg), log=lambda *_: None)
    assert result.steps == 6 and all(math.isfinite(loss) for loss in result.losses)
    shapes = {shape[-2:] for _, shape in seen}
    assert len(shapes) == 3, f"portrait, landscape and square buckets: {shapes}"
    by_shape = {}
    for indices, shape in seen:
        assert len(indices) == 2 == shape[0], "each batch of 2 from one bucket (two images per bucket)"
        for index in indices:
            assert by_shape.setdefault(index, shape[-2:]) == shape[-2:]
    tall, wide = by_shape[0], by_shape[1]
    assert tall[0] > tall[1] and wide[0] < wide[1] and by_shape[2][0] == by_shape[2][1]
    assert by_shape[3] == tall and by_shape[4] == wide and by_shape[5] == by_shape[2]


def test_small_images_are_upscaled_with_a_warning_naming_them_the_most_blurred_first(tiny_models, tmp_path):
    data = write_images(tmp_path / "data", [(16, 16), (64, 64), (1, 1)])  # a 1x1 pixel trains too, 32 times enlarged
    cfg = parse_parameters(base_parameters(tiny_models["sd"], data, tmp_path / "out", max_train_steps=1, eval_prompt=""))
    with pytest.warns(UserWarning, match=r"2 of 3 images are smaller than their bucket and are upscaled, which blurs them: "
                                         r"\S*2.png \(1x1, upscaled 32x\), \S*0.png \(16x16, upscaled 2x\)$"):  # fmt: skip
        train(cfg, RunPaths.for_config(cfg), log=lambda *_: None)


@pytest.mark.parametrize("cache_latents", [True, False])
def test_data_loader_workers_change_nothing(cache_latents, tiny_models, tmp_path):
    """Items are planned from (seed, epoch, index) alone, so worker processes give the same adapter."""
    from safetensors.torch import load_file

    data = write_images(tmp_path / "data", [(48, 96), (96, 48), (64, 64), (50, 100), (100, 50), (70, 70)])
    adapters = []
    for workers in (0, 2):
        cfg = parse_parameters(base_parameters(tiny_models["sdxl"], data, tmp_path / f"out{workers}", max_train_steps=4,
                                               eval_prompt="", random_flip=True, cache_latents=cache_latents,
                                               dataloader_num_workers=workers))  # fmt: skip
        paths = RunPaths.for_config(cfg)
        train(cfg, paths, log=lambda *_: None)
        adapters.append(load_file(str(paths.adapter_dir / "pytorch_lora_weights.safetensors")))
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
