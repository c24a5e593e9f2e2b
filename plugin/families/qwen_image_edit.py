"""Qwen-Image-Edit and Edit Plus: Qwen-Image conditioned on control images twice over. Their latents, packed as
the target's, follow the target's tokens, each image placed by its own entry of `img_shapes`; and Qwen2.5-VL reads
the prompt with the controls in the edit template (its 64 leading tokens dropped), so the text encoding depends
on the controls (`text_reads_controls`: each prompt is encoded with its own). Edit takes one control, which its
VAE and its VL both see at about 1024² pixels; Plus takes several (three in its releases), each seen by the VAE
at about 1024² and by the VL at about 384² pixels, in a template that numbers them ("Picture 1: ...")."""

from __future__ import annotations

import math

import torch
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE
from PIL import Image

from ..cache import CONTROLS, stacked, without_padding
from ..data.controls import Pairing
from .flux import pack_latents
from .qwen_image import QwenImage


class QwenImageEdit(QwenImage):
    name = "qwen_image_edit"
    title = "Qwen-Image-Edit"
    pipeline_class = QwenImageEditPipeline
    pipeline_class_names = ("QwenImageEditPipeline", "QwenImageEditInpaintPipeline")
    control_images = 1
    control_resolution = 1024  # the pipelines resize a control to about 1024² pixels whatever the image's size
    control_multiple = 32  # as their calculate_dimensions rounds
    text_reads_controls = True
    renders_edits_only = True
    text_image_area = 0  # the VL reads a control at this many pixels (the Plus pipeline's); 0: at the VAE's size

    def encode_text(self, captions: list[str], control_pixels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Each prompt read with its controls (pixels in [-1, 1], as 8-bit images, which the pipeline's are), one
        at a time as the Plus pipeline must, padded to the batch's longest as `encode_prompts` pads."""
        if control_pixels is None:
            raise ValueError(f"{self.title} reads each prompt with its control images; none were given")
        encodings = []
        with torch.no_grad():
            for caption, controls in zip(captions, control_pixels):
                encoded = self.text_encoding(*self.pipe.encode_prompt([caption], image=self.text_images(controls), device=self.text_device))
                encodings.append(without_padding({name: t[0] for name, t in encoded.items()}))
        return stacked(encodings)

    def text_images(self, controls: torch.Tensor) -> Image.Image | list[Image.Image]:
        """What the pipeline hands its processor: the control (Edit), or each at the VL's own area (Plus)."""
        images = [Image.fromarray(((control.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()) for control in controls]
        if not self.text_image_area:
            return images[0]
        sizes = [Pairing(area=self.text_image_area, multiple=self.control_multiple).control_target(image.size[::-1]) for image in images]
        return [self.pipe.image_processor.resize(image, height, width) for image, (height, width) in zip(images, sizes)]

    def image_tokens(self, latents: torch.Tensor, text: dict) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
        tokens, shapes = super().image_tokens(latents, text)
        controls = text[CONTROLS].to(latents.dtype).unbind(dim=1)  # each (B, C, h, w), at the control resolution
        return torch.cat([tokens, *map(pack_latents, controls)], dim=1), shapes + [(1, c.shape[2] // 2, c.shape[3] // 2) for c in controls]

    def caption_token_limits(self) -> dict[str, int]:
        """None: the edit pipelines read a whole prompt (their max_sequence_length is not applied)."""
        return {}

    def planning_tokens(self) -> int:
        """Qwen-Image's longest prompt (512 tokens) and the VL's tokens of as many controls as the model takes, each
        of as many merged patches as its processor gives an image of that area."""
        images = self.description.tokenizers["processor"].image_processor
        pixels = min(self.text_image_area or self.pairing().area, images.size["longest_edge"])
        return self.max_sequence_length + self.control_images * round(math.sqrt(pixels) / (images.patch_size * images.merge_size)) ** 2


class QwenImageEditPlus(QwenImageEdit):
    name = "qwen_image_edit_plus"
    title = "Qwen-Image-Edit Plus"
    pipeline_class = QwenImageEditPlusPipeline
    pipeline_class_names = ("QwenImageEditPlusPipeline",)
    control_images = 3  # as many as its releases read
    text_image_area = CONDITION_IMAGE_SIZE
