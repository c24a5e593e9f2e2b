"""What happens to an image's pixels: an `ImagePlan` (bucket, resize, rotation, flip, crop, jitter) is drawn
from the example's RNG before any pixel is read, then applied with PIL and numpy only (no torchvision)."""

import math
import random
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from ..errors import ConfigError
from ..settings import background_rgb, check_range

INTERPOLATIONS = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


@dataclass(frozen=True)
class AugmentOptions:
    """How `transform_image` resizes, crops and augments; checked on creation so bad values fail early."""

    resolution: int
    center_crop: bool
    random_flip: bool
    interpolation: str
    color_jitter: bool
    brightness: float
    contrast: float
    saturation: float
    hue: float
    random_rotation: bool
    rotation_degrees: float
    rotation_prob: float
    alpha_background: str = "white"

    def __post_init__(self):
        if not isinstance(self.resolution, int) or self.resolution < 1:
            raise ConfigError(f"resolution: got {self.resolution!r}; expected a positive number of pixels")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"image_interpolation_mode: got {self.interpolation!r}; expected one of {list(INTERPOLATIONS)}"
            )
        check_range("color_jitter_brightness", self.brightness, 0.0, math.inf)
        check_range("color_jitter_contrast", self.contrast, 0.0, math.inf)
        check_range("color_jitter_saturation", self.saturation, 0.0, math.inf)
        check_range("color_jitter_hue", self.hue, 0.0, 0.5)
        check_range("rotation_degrees", self.rotation_degrees, 0.0, 180.0)
        check_range("rotation_prob", self.rotation_prob, 0.0, 1.0)
        background_rgb(self.alpha_background)

    @property
    def background(self) -> tuple[int, int, int]:
        return background_rgb(self.alpha_background)


# ---------------------------------------------------------------------------------------------------------
# Image transform


@dataclass(frozen=True)
class ImagePlan:
    """Everything `apply_plan` does to one image, drawn before any pixel is read.

    A plan with its image fully determines the training pixels, so it is what the latent cache keys on.
    Sizes are (height, width); the crop is (top, left) in the resized, rotated and flipped image.
    """

    target: tuple[int, int]
    resized: tuple[int, int]
    crop_top_left: tuple[int, int]
    flip: bool
    interpolation: str
    rotation: float | None = None  # degrees, None when this example is not rotated
    jitter: tuple[tuple[str, float], ...] | None = None  # (adjustment, amount) in the order applied
    background: tuple[int, int, int] = (255, 255, 255)  # what transparent pixels are composited over


def plan_transform(
    original_size: tuple[int, int], target: tuple[int, int], options: AugmentOptions, rng: random.Random
) -> ImagePlan:
    """Draw one example's augmentations for an image of `original_size` trained at `target`.

    Draws from `rng`, in this order and only for enabled steps: rotation (chance, then angle), flip, crop
    (top, then left), color jitter (four amounts, then their order).
    """
    resized = _cover_size(original_size, target)
    rotation = None
    if options.random_rotation and rng.random() < options.rotation_prob:
        rotation = rng.uniform(-options.rotation_degrees, options.rotation_degrees)
    flip = options.random_flip and rng.random() < 0.5
    crop = _crop_origin(resized, target, options.center_crop, rng)
    jitter = _draw_jitter(options, rng) if options.color_jitter else None
    return ImagePlan(target, resized, crop, flip, options.interpolation, rotation, jitter, options.background)


def apply_plan(image: Image.Image, plan: ImagePlan) -> torch.Tensor:
    """The planned compositing over the background, resize (to cover the target), rotation, flip, crop and
    jitter: a (3, H, W) tensor in [-1, 1].

    `image` is already upright and 8-bit (`upright_image`), as every caller has it: the plan was drawn for
    the displayed size. Transparency is flattened first, so resizing never blends in the colour hidden
    under transparent pixels."""
    image = _placed(_flatten(image, plan.background), plan, INTERPOLATIONS[plan.interpolation])
    for adjustment, amount in plan.jitter or ():
        image = JITTER_ADJUSTMENTS[adjustment](image, amount)
    return _to_tensor(image)


def plan_at(plan: ImagePlan, target: tuple[int, int]) -> ImagePlan:
    """The plan for the same picture at `target` (an edit model's control at its own resolution): the resize and
    the crop scaled per axis, the crop kept inside."""
    scale = [new / old for new, old in zip(target, plan.target)]
    resized = tuple(max(side, round(length * k)) for side, length, k in zip(target, plan.resized, scale))
    crop = tuple(min(round(offset * k), length - side) for offset, k, length, side in zip(plan.crop_top_left, scale, resized, target))
    return replace(plan, target=tuple(target), resized=resized, crop_top_left=crop)


def apply_plan_to_mask(mask: Image.Image, plan: ImagePlan) -> torch.Tensor:
    """The plan's geometry (resize, rotation, flip, crop; no colour) applied to a greyscale mask of the image's
    displayed size: a (1, H, W) tensor in [0, 1] aligned with `apply_plan`'s pixels. Resized bilinearly, so
    an edge keeps its partial coverage."""
    mask = _placed(mask, plan, Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0).unsqueeze(0).contiguous()


def _placed(image: Image.Image, plan: ImagePlan, resample: Image.Resampling) -> Image.Image:
    """The plan's geometry: resize to cover the target, rotation, flip, crop."""
    image = image.resize(plan.resized[::-1], resample=resample)
    if plan.rotation is not None:
        image = _rotate(image, plan.rotation)
    if plan.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    (top, left), (height, width) = plan.crop_top_left, plan.target
    return image.crop((left, top, left + width, top + height))


def transform_image(
    image: Image.Image, options: AugmentOptions, rng: random.Random, target: tuple[int, int] | None = None
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Plan and apply in one call, at `target` (default: the square of side `options.resolution`).

    Returns the tensor, the original (height, width) and the crop's (top, left) in the resized (and flipped)
    image, which are the real values SDXL's add_time_ids need. EXIF orientation is applied first, so
    "original" means the image as it is displayed.
    """
    upright = upright_image(image)
    original_size = (upright.height, upright.width)
    plan = plan_transform(original_size, target or (options.resolution, options.resolution), options, rng)
    return apply_plan(upright, plan), original_size, plan.crop_top_left


def upright_image(image: Image.Image) -> Image.Image:
    """The image as displayed (EXIF orientation applied), in RGB, or RGBA when it has transparency (which
    `apply_plan` composites over the plan's background); high-bit-depth grey scaled to 8 bits."""
    image = _to_8_bit(ImageOps.exif_transpose(image))
    return image.convert("RGBA" if image.has_transparency_data else "RGB")


def _flatten(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """An RGBA image composited over an opaque background, as RGB; an RGB image unchanged."""
    if image.mode != "RGBA":
        return image
    return Image.alpha_composite(Image.new("RGBA", image.size, (*background, 255)), image).convert("RGB")


def _to_8_bit(image: Image.Image) -> Image.Image:
    """High-bit-depth grey (PIL modes I;16*, I and F) scaled to 8 bits: PIL's own conversion to RGB clips at 255,
    which turns most of a 16-bit image white. 16-bit modes span 65535; I holding values above 255 is taken as
    16-bit too; F in [0, 1] spans 1."""
    if not (image.mode.startswith("I;16") or image.mode in ("I", "F")):
        return image
    pixels = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16") or (image.mode == "I" and pixels.max() > 255):
        full_scale = 65535.0
    elif image.mode == "F" and pixels.max() <= 1.0:
        full_scale = 1.0
    else:
        full_scale = 255.0
    return Image.fromarray(np.clip(np.rint(pixels * (255.0 / full_scale)), 0, 255).astype(np.uint8), mode="L")


def _cover_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the image scaled, keeping its aspect ratio, to just cover `target`."""
    scale = max(target[0] / size[0], target[1] / size[1])
    return max(target[0], round(size[0] * scale)), max(target[1], round(size[1] * scale))


def _rotate(image: Image.Image, angle: float) -> Image.Image:
    """Rotate by `angle` degrees (bicubic, same size).

    The corners are filled by mirroring the image at its edges instead of black, so the model is not
    taught black wedges: the image is reflect-padded just enough to cover the rotated frame, rotated about
    its unchanged centre, and cut back to its size.
    """
    pad_x, pad_y = _rotation_padding(image.width, image.height, angle)
    pixels = np.asarray(image)
    padded = Image.fromarray(np.pad(pixels, ((pad_y, pad_y), (pad_x, pad_x)) + ((0, 0),) * (pixels.ndim - 2), mode="reflect"))
    rotated = padded.rotate(angle, resample=Image.Resampling.BICUBIC, expand=False)
    return rotated.crop((pad_x, pad_y, pad_x + image.width, pad_y + image.height))


def _rotation_padding(width: int, height: int, angle: float) -> tuple[int, int]:
    """Margins (x, y) so that a width x height frame rotated by `angle` stays inside the padded image.

    Two extra pixels cover the bicubic kernel's reach at the border.
    """
    cos, sin = abs(math.cos(math.radians(angle))), abs(math.sin(math.radians(angle)))
    pad_x = math.ceil((width * cos + height * sin - width) / 2) + 2
    pad_y = math.ceil((width * sin + height * cos - height) / 2) + 2
    return pad_x, pad_y


def _crop_origin(size: tuple[int, int], target: tuple[int, int], center: bool, rng: random.Random) -> tuple[int, int]:
    """(top, left) of a target-sized crop from an image of `size`: centred (rounded down), or uniform over all
    valid positions."""
    spare_y, spare_x = size[0] - target[0], size[1] - target[1]
    if center:
        return spare_y // 2, spare_x // 2
    top = rng.randint(0, spare_y)
    left = rng.randint(0, spare_x)
    return top, left


def _draw_jitter(options: AugmentOptions, rng: random.Random) -> tuple[tuple[str, float], ...]:
    """Brightness, contrast, saturation and hue amounts, in an rng-shuffled order like torchvision's.

    All four amounts are drawn first (a fixed number of draws), then the order is shuffled.
    """
    steps = [
        ("brightness", _jitter_factor(options.brightness, rng)),
        ("contrast", _jitter_factor(options.contrast, rng)),
        ("saturation", _jitter_factor(options.saturation, rng)),
        ("hue", rng.uniform(-options.hue, options.hue)),
    ]
    rng.shuffle(steps)
    return tuple(steps)


def _jitter_factor(strength: float, rng: random.Random) -> float:
    """An enhancement factor uniform in [max(0, 1 - strength), 1 + strength]."""
    return rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength)


def _enhance(enhancer: type, image: Image.Image, factor: float) -> Image.Image:
    """Apply one PIL.ImageEnhance enhancer (factor 1 leaves the image unchanged)."""
    return enhancer(image).enhance(factor)


def _shift_hue(image: Image.Image, shift: float) -> Image.Image:
    """Rotate the hue by `shift` of a full turn (PIL's HSV hue channel spans 0-255, so steps of 1/256)."""
    steps = round(shift * 256) % 256
    if steps == 0:
        return image  # the HSV round trip is lossy; skip it when there is nothing to shift
    hsv = np.array(image.convert("HSV"))
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + steps) % 256
    return Image.fromarray(hsv, mode="HSV").convert("RGB")


JITTER_ADJUSTMENTS = {
    "brightness": partial(_enhance, ImageEnhance.Brightness),
    "contrast": partial(_enhance, ImageEnhance.Contrast),
    "saturation": partial(_enhance, ImageEnhance.Color),
    "hue": _shift_hue,
}


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image to a contiguous (3, H, W) float32 tensor scaled to [-1, 1]."""
    pixels = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()

