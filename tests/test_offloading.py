"""offload_blocks: the last N blocks of the frozen denoiser live in their stored (host) copies and come to the
accelerator only while they compute, forward and backward. On this machine the accelerator is the CPU too, so
the mechanism is checked by instrument: each block's compute copy is a real copy made from the stored one, how
often each comes and goes is counted per step, at most the block computing and the one prefetched are held at
any moment, and a step computes with what the stored copy holds (a stored copy changed between steps is seen by
the next step, as by a model that was never offloaded). Whole runs give the unoffloaded run's adapter bit for bit."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file

from conftest import base_parameters
from plugin.compilation import repeated_blocks
from plugin.config import parse_parameters
from plugin.errors import ConfigError
from plugin.families import load_model
from plugin.offloading import BlockOffloader, check_offloading
from plugin.tiny import FAMILIES
from plugin.trainer import RunPaths, train


def lora_unet(tiny_models, checkpointing: bool):
    """The tiny SD UNet with a LoRA on its attention, in train mode (dropout off), seeded."""
    torch.manual_seed(0)
    unet = load_model(str(tiny_models["sd"]), torch.float32).denoiser
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    if checkpointing:
        unet.enable_gradient_checkpointing()
    return unet.train()


def step(unet, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward and backward on fixed inputs: the output and the LoRA gradients."""
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, unet.config.in_channels, 8, 8, generator=generator)
    text = torch.randn(2, 5, unet.config.cross_attention_dim, generator=generator)
    for p in unet.parameters():
        p.grad = None
    out = unet(sample, torch.tensor([10, 500]), encoder_hidden_states=text).sample
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_offloaded_blocks_come_in_only_to_compute_and_compute_with_the_stored_copy(checkpointing, tiny_models):
    reference, unet = lora_unet(tiny_models, checkpointing), lora_unet(tiny_models, checkpointing)
    blocks = repeated_blocks(unet)
    offloaded = blocks[-3:]
    offloader = BlockOffloader(offloaded, torch.device("cpu"), [True] * 3, checkpointing=checkpointing)
    stored = {id(p): copy for pairs in offloader.stored for p, copy in pairs}
    frozen = lambda block: [p for p in block.parameters() if not p.requires_grad]  # noqa: E731
    holding = lambda block: any(p.data_ptr() != stored[id(p)].data_ptr() for p in frozen(block))  # noqa: E731
    seen = []  # per offloaded block's forward, recompute or backward: whether it held a compute copy, and how many blocks did

    def observe(module, *_):
        seen.append((holding(module), sum(map(holding, offloaded))))

    def observe_backward(module, args, output):  # the output's gradient hook, after the offloader's own
        if output.requires_grad:
            output.register_hook(lambda grad: observe(module))

    for block in offloaded:  # registered after the offloader's hooks: they see the block as it computes
        block.register_forward_pre_hook(observe)
        block.register_forward_hook(observe_backward)
    assert not any(map(holding, offloaded)), "between steps only the stored copies"

    for number in range(3):
        out, grads = step(unet, number)
        expected_out, expected_grads = step(reference, number)
        assert torch.equal(out, expected_out) and all(torch.equal(grads[n], expected_grads[n]) for n in grads)
        assert offloader.counts.onloads == offloader.counts.offloads == [2 * (number + 1)] * 3, "in for forward and for backward, each step"
        assert not any(map(holding, offloaded)) and not offloader.ready
    assert seen and all(own for own, _ in seen), "each block computed with a compute copy"
    assert len(seen) == 3 * 3 * (3 if checkpointing else 2) and max(count for _, count in seen) == 2 == offloader.peak_resident, "the block computing and the one prefetched"

    # The stored copy is what a step computes with: change it between steps (and the reference's weight alike).
    parameter, copy = offloader.stored[1][0]
    with torch.no_grad():
        copy.add_(0.5)
        dict(reference.named_parameters())[next(n for n, p in unet.named_parameters() if p is parameter)].add_(0.5)
    out, grads = step(unet, 7)
    expected_out, expected_grads = step(reference, 7)
    assert torch.equal(out, expected_out) and all(torch.equal(grads[n], expected_grads[n]) for n in grads)
    assert not torch.equal(out, step(lora_unet(tiny_models, checkpointing), 7)[0]), "the change was seen"


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_after_the_forward_no_compute_copy_is_held_until_backward(checkpointing, tiny_models):
    """What offloading saves: between a block's forward and its backward nothing keeps its compute copy alive (autograd
    would, through F.linear's saved weight.t(), unless the weights are saved by reference), and backward still gets
    the reference model's gradients."""
    from torch.multiprocessing.reductions import StorageWeakRef

    reference, unet = lora_unet(tiny_models, checkpointing), lora_unet(tiny_models, checkpointing)
    offloaded = repeated_blocks(unet)[-3:]
    BlockOffloader(offloaded, torch.device("cpu"), [True] * 3, checkpointing=checkpointing)
    copies = []
    for block in offloaded:
        block.register_forward_pre_hook(lambda module, args: copies.extend(StorageWeakRef(p.data.untyped_storage()) for p in module.parameters()
                                                                            if not p.requires_grad))  # fmt: skip
    sample, text = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.randn(2, 5, unet.config.cross_attention_dim)
    out = unet(sample, torch.tensor([10, 500]), encoder_hidden_states=text).sample
    assert copies and all(copy.expired() for copy in copies), "every compute copy freed after the forward"
    out.square().mean().backward()
    expected = reference(sample, torch.tensor([10, 500]), encoder_hidden_states=text).sample
    expected.square().mean().backward()
    assert torch.equal(out, expected)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(unet.parameters(), reference.parameters()) if p.requires_grad)


def test_no_grad_forwards_bring_each_block_in_once(tiny_models):
    unet = lora_unet(tiny_models, False).eval()
    offloader = BlockOffloader(repeated_blocks(unet)[-2:], torch.device("cpu"), [True] * 2)
    with torch.no_grad():
        unet(torch.randn(1, 4, 8, 8), torch.tensor([3]), encoder_hidden_states=torch.randn(1, 5, unet.config.cross_attention_dim))
    assert offloader.counts.onloads == offloader.counts.offloads == [1, 1] and not offloader.ready


def trained(tiny_models, sample_data, out, family: str, **overrides):
    cfg = parse_parameters(base_parameters(tiny_models[family], sample_data, out, eval_prompt="", **{"max_train_steps": 3, **overrides}))
    logged = []
    result = train(cfg, RunPaths.for_config(cfg), log=logged.append)
    return load_file(str(result.adapter_path)), result.losses, logged


RUNS = {family: (family, {"gradient_checkpointing": number % 2 == 1}) for number, family in enumerate(FAMILIES)}
RUNS["flux-int8-base"] = ("flux", {"base_quantization": "int8"})
RUNS["sd-dora"] = ("sd", {"lora_type": "dora"})


@pytest.mark.parametrize("family, settings", list(RUNS.values()), ids=list(RUNS))
def test_an_offloaded_run_trains_the_same_adapter(family, settings, tiny_models, sample_data, tmp_path):
    """Every family, gradient checkpointing on for every other one, and a quantised base; all blocks but the
    first offloaded."""
    blocks = len(repeated_blocks(load_model(str(tiny_models[family]), torch.float32).denoiser))
    plain, plain_losses, _ = trained(tiny_models, sample_data, tmp_path / "plain", family, **settings)
    adapter, losses, logged = trained(tiny_models, sample_data, tmp_path / "offloaded", family, offload_blocks=max(blocks - 1, 1), **settings)
    assert losses == plain_losses and adapter.keys() == plain.keys() and all(torch.equal(adapter[k], plain[k]) for k in plain)
    assert any(line.startswith(f"the denoiser's last {max(blocks - 1, 1)} blocks offloaded") for line in logged)


def test_an_offloaded_run_renders_the_evaluation_images_of_a_plain_one(tiny_models, sample_data, tmp_path):
    """Evaluation images (the pipeline's no-grad denoising steps) and the validation loss through offloaded blocks:
    the same as the plain run's."""
    import numpy as np

    from conftest import final_eval_image

    results = []
    for name, extra in (("plain", {}), ("offloaded", {"offload_blocks": 2})):
        cfg = parse_parameters(base_parameters(tiny_models["flux"], sample_data, tmp_path / name, max_train_steps=2, validation_split=0.25,
                                               **extra))  # fmt: skip
        results.append(train(cfg, RunPaths.for_config(cfg), log=lambda *_: None))
    plain, offloaded = results
    assert np.array_equal(final_eval_image(plain), final_eval_image(offloaded)) and plain.losses == offloaded.losses
    history = [json.loads(line) for line in (tmp_path / "offloaded" / "test-adapter" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert any("validation/loss" in entry for entry in history)


@pytest.mark.parametrize("first, then", [(2, 2), (0, 1)], ids=["offloaded-throughout", "offloading-turned-on-to-resume"])
def test_an_offloaded_run_resumes_to_the_unbroken_adapter(first, then, tiny_models, sample_data, tmp_path):
    settings = {"gradient_checkpointing": True, "max_train_steps": 6, "checkpointing_steps": 3}
    unbroken, _, _ = trained(tiny_models, sample_data, tmp_path, "flux", offload_blocks=first, **settings)
    shutil.rmtree(tmp_path / "test-adapter" / "checkpoints" / "step_6")
    resumed, losses, _ = trained(tiny_models, sample_data, tmp_path, "flux", resume_from_checkpoint="latest", offload_blocks=then, **settings)
    assert len(losses) == 3 and all(torch.equal(resumed[k], unbroken[k]) for k in unbroken)


def test_what_offloading_cannot_do_is_refused_before_loading(tiny_models, sample_data, tmp_path, monkeypatch):
    from plugin.families.base import ModelFamily

    blocks = len(repeated_blocks(load_model(str(tiny_models["flux"]), torch.float32).denoiser))
    monkeypatch.setattr(ModelFamily, "load", lambda *_: pytest.fail("weights loaded before the check"))
    cases = [({"offload_blocks": blocks + 1}, f"offload_blocks: {blocks + 1} is more than the {blocks} blocks this denoiser has"),
             ({"offload_blocks": 1, "torch_compile": "blocks"}, "offload_blocks: a compiled block"),
             ({"offload_blocks": 1, "shard_base_model": True}, "offload_blocks: a sharded base"),
             ({"base_storage_dtype": "fp8_e4m3", "base_quantization": "int8"}, "base_storage_dtype: the base is already stored quantised"),
             ({"base_storage_dtype": "fp8_e4m3", "torch_compile": "blocks"}, "base_storage_dtype: a compiled block")]  # fmt: skip
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            cfg = parse_parameters(base_parameters(tiny_models["flux"], sample_data, tmp_path, **overrides))
            train(cfg, RunPaths.for_config(cfg), log=lambda *_: None)
    with pytest.raises(ConfigError, match="offload_blocks: bitsandbytes' nf4"):  # nf4 needs CUDA: checked alone
        check_offloading(parse_parameters(base_parameters(tiny_models["sd"], sample_data, tmp_path, offload_blocks=1, base_quantization="nf4")))


def rounded_through_fp8(blocks) -> None:
    with torch.no_grad():
        for block in blocks:
            for p in block.parameters():
                if not p.requires_grad:
                    p.copy_(p.to(torch.float8_e4m3fn).to(p.dtype))


def test_fp8_storage_keeps_blocks_in_fp8_and_computes_with_their_rounded_values(tiny_models):
    reference, unet = lora_unet(tiny_models, False), lora_unet(tiny_models, False)
    rounded_through_fp8(repeated_blocks(reference))
    blocks = repeated_blocks(unet)
    offloader = BlockOffloader(blocks, torch.device("cpu"), [False] * (len(blocks) - 1) + [True], torch.float8_e4m3fn)
    frozen = [p for block in blocks for p in block.parameters() if not p.requires_grad]
    for number in range(2):
        assert frozen and all(p.dtype == torch.float8_e4m3fn for p in frozen), "stored in fp8 between steps"
        out, grads = step(unet, number)
        expected_out, expected_grads = step(reference, number)
        assert torch.equal(out, expected_out) and all(torch.equal(grads[n], expected_grads[n]) for n in grads)
    assert offloader.counts.onloads == [4] * len(blocks)
    assert offloader.summary().startswith(f"the denoiser's last 1 blocks offloaded, 0.00 GiB of frozen weights in host memory; {len(blocks)} blocks' weights stored in float8_e4m3fn")


def test_an_fp8_stored_run_trains_the_adapter_of_its_rounded_base(tiny_models, sample_data, tmp_path):
    """The run with every block stored in fp8 equals an ordinary run on a copy of the model whose block weights
    were rounded through fp8 (and two of them offloaded as well)."""
    pipe = load_model(str(tiny_models["flux"]), torch.float32).pipe
    rounded_through_fp8(repeated_blocks(pipe.transformer))
    pipe.save_pretrained(tmp_path / "rounded")
    models = {**tiny_models, "rounded": tmp_path / "rounded"}
    stored, stored_losses, logged = trained(tiny_models, sample_data, tmp_path / "fp8", "flux", base_storage_dtype="fp8_e4m3", offload_blocks=2)
    plain, plain_losses, _ = trained(models, sample_data, tmp_path / "plain", "rounded")
    assert stored_losses == plain_losses and all(torch.equal(stored[k], plain[k]) for k in plain)
    assert any("blocks' weights stored in float8_e4m3fn" in line for line in logged)
    card = (tmp_path / "fp8" / "test-adapter" / "README.md").read_text()
    assert "| base in memory | blocks stored in fp8_e4m3 (trained on the base as rounded to it); last 2 blocks offloaded to host memory |" in card
