"""Training data: load captioned image datasets, check them, and turn rows into augmented, seeded tensors.

Everything random about an example comes from `example_rng(seed, epoch, index)`, so a run is reproducible
whatever the batch size, number of data-loader workers or the order in which the sampler visits rows.

`sources` loads and checks one dataset, `captions` rewrites captions as trained, `transforms` plans and
applies what happens to an image's pixels, `masks` finds masked loss's masks, `controls` an edit model's control
images, `examples` turns rows into training examples and batches, and `mixing` makes several datasets one run
(repeats, regularisation images).
"""

from .captions import CaptionOptions, caption_for, caption_variants
from .examples import TrainingExamples, collate_examples, example_rng
from .sources import ImageHeaders, image_digests, load_image_dataset, read_image_headers
from .transforms import AugmentOptions, ImagePlan, apply_plan, plan_transform, transform_image, upright_image

__all__ = [
    "AugmentOptions", "CaptionOptions", "ImageHeaders", "ImagePlan", "TrainingExamples", "apply_plan", "caption_for",
    "caption_variants", "collate_examples", "example_rng", "image_digests", "load_image_dataset", "plan_transform",
    "read_image_headers", "transform_image", "upright_image",
]
