"""Class images for prior preservation, rendered by the base model when a regularisation dataset asks for more
than its folder holds (`class_prompt` and `num_class_images` in its `datasets` entry), as Diffusers' DreamBooth
script renders them.

Each is rendered with the evaluation settings (eval_num_inference_steps, eval_guidance_scale) at the dataset's
resolution, image k seeded with the run's seed + k, and written into the dataset's folder as `class_<k>.png`
with its prompt in `class_<k>.txt` (kohya's caption files), each atomically: a later run, or this one resumed,
finds them there and renders only what is still missing. The main process renders; the others wait for it.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import ConfigError
from .evaluation import render_images
from .export import atomic_path, save_image_atomic
from .families import open_model
from .settings import EvalPrompt


def check_class_folder(spec) -> Path:
    """The folder class images go into: a folder of images with .txt captions (or none yet), never one whose
    metadata file would leave the new images out."""
    folder = Path(spec.path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{spec.field}: {spec.path!r} is a file; class images go into a folder")
    metadata = [p.name for p in folder.glob("metadata.*")] if folder.is_dir() else []
    if metadata:
        raise ConfigError(f"{spec.field}: {spec.path!r} has {metadata[0]}, which would leave the rendered class images out; "
                          "name a folder of images with .txt captions (or an empty one) for them")  # fmt: skip
    return folder


def make_class_images(cfg, specs, accelerator, dtype: torch.dtype, log=print) -> None:
    """Render what each of `specs` lacks of its num_class_images (see the module docstring)."""
    folders = [check_class_folder(spec) for spec in specs]
    with accelerator.main_process_first():
        wanted = [(spec, folder) for spec, folder in zip(specs, folders) if spec.missing_class_images]
        if not wanted or not accelerator.is_main_process:
            return
        family = open_model(cfg.model_name, cfg.model_config, cfg.text_encoder_source, cfg.allow_pickle_checkpoints)
        family.configure(cfg)
        family.load(dtype)
        family.to(accelerator.device)
        for spec, folder in wanted:
            side = spec.cfg.resolution // family.resolution_multiple * family.resolution_multiple
            first = spec.num_class_images - spec.missing_class_images
            log(f"{spec.field}: rendering {spec.missing_class_images} class images of {spec.class_prompt!r} into {str(folder)!r}")
            for k in tqdm(range(first, spec.num_class_images), desc="class images"):
                prompt = EvalPrompt(spec.class_prompt, {"width": side, "height": side, "seed": cfg.seed + k})
                (image,) = render_images(family, [prompt], cfg.seed)
                with atomic_path(folder / f"class_{k:05d}.txt") as tmp:
                    tmp.write_text(spec.class_prompt + "\n", encoding="utf-8")
                save_image_atomic(image, folder / f"class_{k:05d}.png")  # last: an image without its caption is never seen
        del family
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
