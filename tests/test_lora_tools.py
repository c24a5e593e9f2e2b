"""`plugin/main.py lora inspect|resize`: what a LoRA file holds, read from either layout the trainer writes, and
its SVD re-factorisation, checked against the truncated SVD of each module's weight update."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import load_fresh, render
from plugin.export import WEIGHTS_NAME
from plugin.lora_tools import extract_adapter, inspect_adapter, read_adapter, resize_adapter
from plugin.main import main

R, ALPHA = 8, 16.0


@pytest.fixture(scope="module")
def sd_run(tiny_models, sample_data, tmp_path_factory):
    """A trained SD adapter of rank 8, alpha 16: its Diffusers file and its kohya file."""
    from conftest import base_parameters
    from plugin.config import parse_parameters
    from plugin.trainer import RunPaths, train

    cfg = parse_parameters(base_parameters(tiny_models["sd"], sample_data, tmp_path_factory.mktemp("lora-tools"), lora_r=R, lora_alpha=ALPHA,
                                           max_train_steps=4, eval_prompt=""))  # fmt: skip
    paths = RunPaths.for_config(cfg)
    train(cfg, paths, log=lambda *_: None)
    return paths.adapter_dir / WEIGHTS_NAME, paths.adapter_dir / "test-adapter_kohya.safetensors"


def test_inspect_reads_both_layouts_alike(sd_run):
    diffusers_file, kohya_file = sd_run
    ours, kohya = inspect_adapter(diffusers_file), inspect_adapter(kohya_file)
    assert (ours["layout"], kohya["layout"]) == ("diffusers", "kohya")
    assert ours["model"] == kohya["model"] == "Stable Diffusion 1.x/2.x" and ours["adapter"] == "LoRA"
    assert ours["modules"] == kohya["modules"] > 0 and ours["ranks"] == {R: ours["modules"]} and kohya["alphas"] == {ALPHA: kohya["modules"]}
    assert ours["alphas"] == {ALPHA: ours["modules"]}, "the alpha of the Diffusers file comes from its PEFT metadata"
    for statistic in ("min", "median", "max"):  # the same weight updates, whichever layout carries them
        assert ours["update_norm"][statistic] == pytest.approx(kohya["update_norm"][statistic], rel=1e-5)
    assert kohya["metadata"]["ss_network_dim"] == str(R) and set(ours["module_kinds"]) >= {"attn1.to_q", "attn2.to_k", "attn1.to_v", "attn2.to_out.0"}


@pytest.mark.parametrize("layout", [0, 1], ids=["diffusers", "kohya"])
def test_resize_to_a_rank_keeps_the_truncated_svd_of_each_update(layout, sd_run, tmp_path):
    source = sd_run[layout]
    report = resize_adapter(source, tmp_path / "r3.safetensors", rank=3)
    before, after = read_adapter(source), read_adapter(tmp_path / "r3.safetensors")
    assert after.layout == before.layout and after.modules.keys() == before.modules.keys()
    for name, module in before.modules.items():
        u, s, vh = torch.linalg.svd(module.delta(), full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vh[:3]  # Eckart–Young: the closest rank-3 matrix
        assert after.modules[name].rank == 3 and after.modules[name].alpha == 3.0
        torch.testing.assert_close(after.modules[name].delta(), best, rtol=1e-4, atol=1e-6)
        assert report[name][:2] == (R, 3) and report[name][2] == pytest.approx(float((s[:3] ** 2).sum() / (s**2).sum()), rel=1e-6)


def test_resize_by_energy_picks_the_smallest_rank_that_keeps_it(sd_run, tmp_path):
    report = resize_adapter(sd_run[0], tmp_path / "e.safetensors", energy=0.9)
    for name, module in read_adapter(sd_run[0]).modules.items():
        s = torch.linalg.svdvals(module.delta())
        share = torch.cumsum(s**2, 0) / (s**2).sum()
        _, rank, kept = report[name]
        assert kept >= 0.9 and (rank == 1 or share[rank - 2] < 0.9), (name, rank, share)


def test_a_resized_adapter_loads_in_diffusers_and_full_rank_renders_the_same_image(sd_run, tiny_models, tmp_path):
    kwargs = dict(num_inference_steps=2, height=32, width=32)
    images = {}
    for label, weight_name in (("original", WEIGHTS_NAME), ("full", "full.safetensors"), ("energy", "energy.safetensors"), ("base", None)):
        if weight_name == "full.safetensors":
            resize_adapter(sd_run[0], tmp_path / weight_name, rank=R)
        elif weight_name == "energy.safetensors":
            resize_adapter(sd_run[0], tmp_path / weight_name, energy=0.8)  # ranks differ by module: a rank and alpha pattern
        pipe = load_fresh(tiny_models["sd"])
        if weight_name:
            pipe.load_lora_weights(str(sd_run[0].parent if weight_name == WEIGHTS_NAME else tmp_path), weight_name=weight_name)
        images[label] = render(pipe, "a red circle", 0, **kwargs)
        if label == "energy":  # Diffusers applied each module's own rank and alpha: its update is the file's
            wanted = read_adapter(tmp_path / weight_name).modules
            layers = {n: m for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and m.lora_A}
            assert len(layers) == len(wanted)
            for name, layer in layers.items():
                adapter = next(iter(layer.lora_A))
                applied = layer.scaling[adapter] * layer.lora_B[adapter].weight.double() @ layer.lora_A[adapter].weight.double()
                torch.testing.assert_close(applied, wanted[f"unet.{name}"].delta())
    assert np.abs(images["full"] - images["original"]).max() <= 1, "the same update, refactored"
    assert np.abs(images["energy"] - images["original"]).mean() < np.abs(images["base"] - images["original"]).mean()
    ranks = {t.shape[0] for k, t in load_file(str(tmp_path / "energy.safetensors")).items() if k.endswith("lora_A.weight")}
    assert len(ranks) > 1, "the energy criterion chose different ranks"


def test_the_command_prints_json_and_never_overwrites(sd_run, tmp_path, capsys):
    assert main(["lora", "inspect", str(sd_run[1]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layout"] == "kohya"
    assert main(["lora", "resize", str(sd_run[0]), "--rank", "2", "--out", str(sd_run[0])]) == 2
    assert "exists; the LoRA tools write a new file and never overwrite one" in capsys.readouterr().err
    assert main(["lora", "resize", str(sd_run[0]), "--rank", "2", "--energy", "0.9", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "give one of --rank R (R ≥ 1), --energy E" in capsys.readouterr().err
    assert main(["lora", "inspect", str(tmp_path / "missing.safetensors")]) == 2
    assert main(["lora", "resize", str(sd_run[1]), "--rank", "2", "--out", str(tmp_path / "k.safetensors")]) == 0
    assert "rank 8 -> 2" in capsys.readouterr().out and not (tmp_path / "x.safetensors").exists()


def test_extract_recovers_a_known_low_rank_difference_and_renders_the_tuned_model(tiny_models, tmp_path):
    """A 'fine-tune' made by adding a rank-2 update to every to_q layer: extraction at rank 2 gives back exactly that
    update, nothing for the unchanged layers, and the base with the extracted LoRA renders as the tuned model."""
    from diffusers import DiffusionPipeline

    tuned = DiffusionPipeline.from_pretrained(str(tiny_models["sd"]))
    generator, updates = torch.Generator().manual_seed(5), {}
    with torch.no_grad():
        for name, layer in tuned.unet.named_modules():
            if name.endswith("to_q"):
                updates[f"unet.{name}"] = 0.2 * torch.randn(layer.weight.shape[0], 2, generator=generator) @ torch.randn(2, layer.weight.shape[1], generator=generator)
                layer.weight += updates[f"unet.{name}"]
    tuned.save_pretrained(tmp_path / "tuned")
    kept = extract_adapter(str(tiny_models["sd"]), str(tmp_path / "tuned"), 2, tmp_path / "extracted.safetensors")
    assert set(kept) == {name.removeprefix("unet.") for name in updates} and min(kept.values()) == pytest.approx(1.0)
    extracted = read_adapter(tmp_path / "extracted.safetensors").modules
    assert extracted.keys() == updates.keys()
    for name, update in updates.items():
        torch.testing.assert_close(extracted[name].delta(), update.double(), atol=2e-6, rtol=1e-5)
    pipe = load_fresh(tiny_models["sd"])
    pipe.load_lora_weights(str(tmp_path), weight_name="extracted.safetensors")
    kwargs = dict(num_inference_steps=2, height=32, width=32)
    assert np.abs(render(pipe, "a red circle", 0, **kwargs) - render(load_fresh(tmp_path / "tuned"), "a red circle", 0, **kwargs)).max() <= 1


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_merge_folds_the_adapter_into_a_model_that_renders_as_base_plus_adapter(weight, sd_run, tiny_models, tmp_path):
    kwargs = dict(num_inference_steps=2, height=32, width=32)
    assert main(["lora", "merge", str(tiny_models["sd"]), str(sd_run[1]), "--weights", str(weight), "--out", str(tmp_path / "merged")]) == 0
    merged = load_fresh(tmp_path / "merged")
    assert not any("lora" in name for name, _ in merged.unet.named_modules()), "a plain model: the update is in its weights"
    reference = load_fresh(tiny_models["sd"])
    reference.load_lora_weights(str(sd_run[0].parent), adapter_name="a")
    reference.set_adapters(["a"], adapter_weights=[weight])
    assert np.abs(render(merged, "a red circle", 0, **kwargs) - render(reference, "a red circle", 0, **kwargs)).max() <= 1
    assert main(["lora", "merge", str(tiny_models["sd"]), str(sd_run[0]), "--out", str(tmp_path / "merged")]) == 2


# --- LoRA into LoRA, LyCORIS, bad input ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def second_sd_run(tiny_models, sample_data, tmp_path_factory):
    """Another SD adapter, of rank 4 and alpha 2, on more modules (the feed-forward too)."""
    from conftest import base_parameters
    from plugin.config import parse_parameters
    from plugin.trainer import RunPaths, train

    cfg = parse_parameters(base_parameters(tiny_models["sd"], sample_data, tmp_path_factory.mktemp("second"), lora_r=4, lora_alpha=2,
                                           max_train_steps=4, eval_prompt="", seed=7, lora_target_modules="to_q,to_k,to_v,to_out.0,proj_in"))  # fmt: skip
    paths = RunPaths.for_config(cfg)
    train(cfg, paths, log=lambda *_: None)
    return paths.adapter_dir / WEIGHTS_NAME, paths.adapter_dir / "test-adapter_kohya.safetensors"


@pytest.mark.parametrize("layout", [0, 1], ids=["diffusers", "kohya"])
def test_merged_loras_stack_their_ranks_exactly_and_svd_keeps_the_closest_rank(layout, sd_run, second_sd_run, tmp_path):
    first, second = read_adapter(sd_run[layout]), read_adapter(second_sd_run[layout])
    assert main(["lora", "merge", str(sd_run[layout]), str(second_sd_run[layout]), "--weights", "0.7", "-0.4", "--out", str(tmp_path / "m.safetensors")]) == 0
    merged = read_adapter(tmp_path / "m.safetensors")
    assert merged.layout == first.layout and merged.modules.keys() == first.modules.keys() | second.modules.keys()
    for name, module in merged.modules.items():
        expected = sum(weight * adapter.modules[name].delta() for adapter, weight in ((first, 0.7), (second, -0.4)) if name in adapter.modules)
        assert module.rank == sum(adapter.modules[name].rank for adapter in (first, second) if name in adapter.modules)
        torch.testing.assert_close(module.delta(), expected, rtol=1e-5, atol=1e-7)
    assert main(["lora", "merge", str(sd_run[layout]), str(second_sd_run[layout]), "--svd-rank", "3", "--out", str(tmp_path / "s.safetensors")]) == 0
    for name, module in read_adapter(tmp_path / "s.safetensors").modules.items():
        total = sum(adapter.modules[name].delta() for adapter in (first, second) if name in adapter.modules)
        singular = torch.linalg.svdvals(total)
        assert module.rank == min(3, len(singular))  # Eckart–Young: the error is the norm of the dropped singular values
        assert float((module.delta() - total).norm()) == pytest.approx(float(singular[3:].norm()), rel=1e-4, abs=1e-9)


def test_a_merged_lora_renders_as_both_adapters_at_their_weights(sd_run, second_sd_run, tiny_models, tmp_path):
    kwargs = dict(num_inference_steps=2, height=32, width=32)
    assert main(["lora", "merge", str(sd_run[0]), str(second_sd_run[0]), "--weights", "0.8", "0.6", "--out", str(tmp_path / "m.safetensors")]) == 0
    merged = load_fresh(tiny_models["sd"])
    merged.load_lora_weights(str(tmp_path / "m.safetensors"))
    both = load_fresh(tiny_models["sd"])
    both.load_lora_weights(str(sd_run[0]), adapter_name="a")
    both.load_lora_weights(str(second_sd_run[0]), adapter_name="b")
    both.set_adapters(["a", "b"], adapter_weights=[0.8, 0.6])
    assert np.abs(render(merged, "a red circle", 0, **kwargs) - render(both, "a red circle", 0, **kwargs)).max() <= 1


@pytest.mark.parametrize("lora_type, extra", [("lokr", {"lokr_decompose_both": True}), ("lokr", {}), ("loha", {})],
                         ids=["lokr-decomposed", "lokr-whole", "loha"])  # fmt: skip
def test_inspect_reads_lycoris_files_in_both_layouts_alike(lora_type, extra, run_training):
    _, _, paths = run_training("sd", lora_type=lora_type, lora_r=4, lora_alpha=6, max_train_steps=2, eval_prompt="", **extra)
    ours, kohya = inspect_adapter(paths.adapter_dir / WEIGHTS_NAME), inspect_adapter(paths.adapter_dir / "test-adapter_kohya.safetensors")
    assert (ours["layout"], kohya["layout"]) == ("diffusers", "kohya") and ours["adapter"] == kohya["adapter"] == {"lokr": "LoKr", "loha": "LoHa"}[lora_type]
    assert ours["modules"] == kohya["modules"] > 0 and ours["ranks"] == kohya["ranks"]
    assert set(ours["ranks"]) == {4} if lora_type == "loha" else set(ours["ranks"]) <= {4, "full"}  # LoKr: "full" for whole factors
    for statistic in ("min", "median", "max"):  # the same updates: PEFT's scale alpha / r, LyCORIS's .alpha or folded factor
        assert ours["update_norm"][statistic] == pytest.approx(kohya["update_norm"][statistic], rel=1e-5)


def test_files_the_tools_cannot_use_are_named(sd_run, run_training, tiny_models, tmp_path):
    from safetensors.torch import save_file

    from plugin.errors import ConfigError
    from plugin.lora_tools import merge_into_base

    save_file({"conv_in.weight": torch.zeros(4, 4)}, str(tmp_path / "model.safetensors"))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(sd_run[0].read_bytes()[:1000])
    torch.save(load_file(str(sd_run[1])), tmp_path / "lora.pt")
    cases = [
        (lambda: inspect_adapter(tmp_path / "model.safetensors"), r"no LoRA modules \(expected keys ending in .lora_A.weight"),
        (lambda: inspect_adapter(truncated), "not a readable safetensors file"),
        (lambda: inspect_adapter(tmp_path / "lora.pt"), "a pickle file, which can run code when loaded; .* --allow-pickle"),
    ]
    for call, message in cases:
        with pytest.raises(ConfigError, match=message):
            call()
    assert inspect_adapter(tmp_path / "lora.pt", allow_pickle=True)["modules"] == inspect_adapter(sd_run[1])["modules"]
    flux_file = run_training("flux", max_train_steps=1, eval_prompt="")[2].adapter_dir / WEIGHTS_NAME
    with pytest.raises(ConfigError, match=r"a LoRA of Flux, not of this Stable Diffusion 1.x/2.x model"):
        merge_into_base(str(tiny_models["sd"]), [(flux_file, 1.0)], tmp_path / "merged")


def test_resize_by_ratio_keeps_the_singular_values_within_it(sd_run, tmp_path):
    report = resize_adapter(sd_run[0], tmp_path / "q.safetensors", ratio=4.0, dtype="fp16")
    resized = read_adapter(tmp_path / "q.safetensors")
    assert resized.dtype == torch.float16
    for name, module in read_adapter(sd_run[0]).modules.items():
        singular = torch.linalg.svdvals(module.delta())
        assert report[name][1] == resized.modules[name].rank == int((singular >= singular[0] / 4.0).sum())


def test_a_merged_model_is_written_as_one_original_layout_file_in_the_chosen_precision(sd_run, tiny_models, tmp_path):
    from plugin.families.original_layout import original_state_dict

    assert main(["lora", "merge", str(tiny_models["sd"]), str(sd_run[0]), "--out", str(tmp_path / "folder")]) == 0
    assert main(["lora", "merge", str(tiny_models["sd"]), str(sd_run[0]), "--dtype", "fp16", "--out", str(tmp_path / "merged.safetensors")]) == 0
    single, folder = load_file(str(tmp_path / "merged.safetensors")), original_state_dict(load_fresh(tmp_path / "folder"))
    assert single.keys() == folder.keys() and "model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight" in single
    assert all(value.dtype == torch.float16 and torch.equal(value, folder[key].half()) for key, value in single.items() if value.is_floating_point())
    assert load_fresh(tmp_path / "folder").unet.dtype == torch.float32, "by default the precision the base is stored in"


@pytest.mark.parametrize("family, layout", [("sd", "kohya"), ("flux", "comfyui")])
def test_a_lokr_file_converts_to_the_community_file_the_run_writes(family, layout, run_training, tmp_path):
    from plugin.errors import ConfigError
    from plugin.lora_tools import convert_adapter

    _, _, paths = run_training(family, lora_type="lokr", lora_r=4, lora_alpha=6, max_train_steps=2, eval_prompt="")
    convert_adapter(paths.adapter_dir / WEIGHTS_NAME, layout, tmp_path / "converted.safetensors")
    ours, community = load_file(str(tmp_path / "converted.safetensors")), load_file(str(paths.adapter_dir / f"test-adapter_{layout}.safetensors"))
    assert ours.keys() == community.keys() and all(torch.equal(ours[k], community[k]) for k in ours)
    with pytest.raises(ConfigError, match="convert reads LoKr and LoHa from this trainer's Diffusers-layout file only"):
        convert_adapter(tmp_path / "converted.safetensors", "diffusers", tmp_path / "back.safetensors", family_name=family)
    other = "diffusers" if layout == "kohya" else "kohya"
    with pytest.raises(ConfigError, match=f"converts to the {layout} layout only"):
        convert_adapter(paths.adapter_dir / WEIGHTS_NAME, other, tmp_path / "other.safetensors")
