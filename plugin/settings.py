"""Checks of the parameters as a set: what the manifest's per-field rules (type, range, step) cannot say.

Combinations of fields, the small languages some text fields hold (export formats, σ_rel lists, colours)
and the fields that act only under a switch need no model, no data and no PyTorch: they run in the
parameter-file phase, before the heavy imports, and `parse_parameters` reports every problem at once.
Each rule is one function of the coerced values that returns its problem, or None.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from PIL import ImageColor

from .errors import ConfigError

EXPORT_FORMATS = ("diffusers", "kohya")
SIGMA_REL_RANGE = (0.0, 0.2886)  # σ_rel of τ^γ with γ > 0 (at γ = 0, the uniform average, it is 1/√12)
POLYNOMIAL_END_LR = 1e-7  # diffusers.optimization's polynomial schedule decays to this learning rate


def parse_export_formats(text: str) -> tuple[str, ...]:
    """"diffusers,kohya" → ("diffusers", "kohya"); anything else is a ConfigError naming export_formats."""
    formats = tuple(dict.fromkeys(part.strip() for part in text.replace(",", " ").split()))
    if not formats or any(f not in EXPORT_FORMATS for f in formats):
        raise ConfigError(f"export_formats: {text!r}; expected a comma-separated list of {', '.join(EXPORT_FORMATS)} "
                          "such as 'diffusers,kohya'")  # fmt: skip
    return formats


def parse_sigma_rels(text: str, field: str = "posthoc_ema_sigma_rels") -> tuple[float, ...]:
    """"0.05,0.10" → (0.05, 0.1); anything else is a ConfigError naming `field` and the range."""
    try:
        values = tuple(float(part) for part in text.replace(",", " ").split())
    except ValueError:
        raise ConfigError(f"{field}: {text!r} is not a list of numbers such as '0.05,0.10'") from None
    low, high = SIGMA_REL_RANGE
    if not values or any(not low < v < high for v in values) or len(set(values)) != len(values):
        raise ConfigError(f"{field}: {text!r}; expected distinct relative widths between {low} and {high}, such as '0.05,0.10'")
    return values


def background_rgb(colour: str) -> tuple[int, int, int]:
    """alpha_background as RGB: a CSS colour name or #rrggbb (PIL's ImageColor); alpha in it is ignored."""
    try:
        return ImageColor.getrgb(colour)[:3]
    except ValueError:
        raise ConfigError(f"alpha_background: {colour!r} is not a colour; expected a name such as white, black or gray, or #rrggbb") from None


# kohya's sample-prompt flags: the pipeline argument each sets, and its type
SAMPLE_FLAGS = {"w": ("width", int), "h": ("height", int), "s": ("num_inference_steps", int), "l": ("guidance_scale", float),
                "d": ("seed", int), "n": ("negative_prompt", str)}  # fmt: skip
KIND_NAMES = {int: "a whole number", float: "a number", str: "text"}


@dataclass(frozen=True)
class EvalPrompt:
    """One evaluation prompt and its own settings (kohya's `--w 768 --h 512 --s 28 --l 4.5 --d 42 --n ...`), in
    the pipeline's argument names; what it leaves out comes from the eval_* parameters."""

    text: str
    settings: dict = field(default_factory=dict)


def parse_eval_prompts(text: str) -> list[EvalPrompt]:
    """One prompt per non-empty line of eval_prompt, each with the sample flags after it."""
    prompts = []
    for number, line in enumerate((line for line in text.splitlines() if line.strip()), start=1):
        prompt, *flags = re.split(r"\s--(?=\S)", " " + line.strip())
        settings = {}
        for flag in flags:
            name, _, value = flag.partition(" ")
            if name not in SAMPLE_FLAGS:
                raise ConfigError(f"eval_prompt: prompt {number} has the flag --{name}; the flags are "
                                  + ", ".join(f"--{f} ({argument})" for f, (argument, _) in SAMPLE_FLAGS.items()))  # fmt: skip
            argument, kind = SAMPLE_FLAGS[name]
            try:
                settings[argument] = kind(value.strip())
            except ValueError:
                raise ConfigError(f"eval_prompt: prompt {number}: --{name} {value.strip()!r} is not {KIND_NAMES[kind]} ({argument})") from None
            if kind is not str and settings[argument] <= 0 and argument != "seed":
                raise ConfigError(f"eval_prompt: prompt {number}: --{name} {value.strip()} must be positive ({argument})")
        prompts.append(EvalPrompt(prompt.strip(), settings))
    return prompts


def check_range(field: str, value: float, low: float, high: float) -> None:
    """Fail naming `field` unless low <= value <= high."""
    if not isinstance(value, (int, float)) or not low <= value <= high:
        raise ConfigError(f"{field}: got {value!r}; expected a number from {low} to {high}")


def _parsed(parse: Callable[[], Any]) -> str | None:
    try:
        parse()
    except ConfigError as error:
        return str(error)
    return None


def export_formats_rule(v: Mapping) -> str | None:
    return _parsed(lambda: parse_export_formats(v["export_formats"]))


def sigma_rels_rule(v: Mapping) -> str | None:
    return _parsed(lambda: parse_sigma_rels(v["posthoc_ema_sigma_rels"]))


def eval_prompt_rule(v: Mapping) -> str | None:
    return _parsed(lambda: parse_eval_prompts(v["eval_prompt"]))


def caption_separator_rule(v: Mapping) -> str | None:
    if not v["caption_separator"]:
        return "caption_separator: empty; expected the text between a caption's tags, such as ','"
    return None


def alpha_background_rule(v: Mapping) -> str | None:
    return _parsed(lambda: background_rgb(v["alpha_background"]))


def validation_rule(v: Mapping) -> str | None:
    if v["validation_split"] > 0 and v["validation_dataset"]:
        return (f"validation_split: {v['validation_split']:g} and validation_dataset {v['validation_dataset']!r} are both set; "
                "hold out a split or name a dataset, not both")  # fmt: skip
    return None


# The run's settings a `datasets` entry may set for itself, and the keys an entry may hold.
DATASET_SETTINGS = ("image_column", "caption_column", "trigger_word", "caption_dropout_rate", "shuffle_caption", "keep_tokens",
                    "caption_separator", "caption_prefix", "caption_suffix", "resolution", "aspect_ratio_buckets",
                    "mask_column", "mask_dir", "control_column", "control_dir")  # fmt: skip
DATASET_ENTRY_KEYS = ("path", "repeats", "is_regularization", "class_prompt", "num_class_images", *DATASET_SETTINGS)


def dataset_entry_problem(field: str, entry) -> str | None:
    """What is wrong with one `datasets` entry's shape (its settings' values are checked as the run's are)."""
    if not isinstance(entry, dict):
        return f"{field}: got {entry!r}; expected an object such as {{\"path\": \"data/dog\", \"repeats\": 10}}"
    for key in entry:
        if key not in DATASET_ENTRY_KEYS:
            close = difflib.get_close_matches(key, DATASET_ENTRY_KEYS, n=3)
            return f"{field}: unknown key {key!r}" + (f"; did you mean {', '.join(close)}?" if close else f"; expected some of {', '.join(DATASET_ENTRY_KEYS)}")
    path, repeats, regularization = entry.get("path"), entry.get("repeats", 1), entry.get("is_regularization", False)
    if not isinstance(path, str) or not path.strip():
        return f"{field}.path: got {path!r}; expected a folder of captioned images or a hub dataset id"
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        return f"{field}.repeats: got {repeats!r}; expected a whole number of at least 1 (visits of each image per epoch)"
    if not isinstance(regularization, bool):
        return f"{field}.is_regularization: got {regularization!r}; expected true or false"
    return class_images_problem(field, entry)


def class_images_problem(field: str, entry: dict) -> str | None:
    """class_prompt and num_class_images: the base model renders missing class images of a regularisation dataset."""
    prompt, count = entry.get("class_prompt", ""), entry.get("num_class_images", 0)
    if not isinstance(prompt, str):
        return f"{field}.class_prompt: got {prompt!r}; expected the prompt that renders the class images, such as 'a photo of a dog'"
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        return f"{field}.num_class_images: got {count!r}; expected a whole number of images, 0 or more"
    if (prompt.strip() or count) and entry.get("is_regularization") is not True:
        return f"{field}: class_prompt and num_class_images make regularisation images; set is_regularization: true"
    if count and not prompt.strip():
        return f"{field}.num_class_images: {count} class images need a class_prompt to render them"
    return None


def datasets_rule(v: Mapping) -> str | None:
    if not isinstance(v["datasets"], list):
        return f"datasets: got {v['datasets']!r}; expected a list of objects, each with a path"
    if not v["dataset_name"] and not v["datasets"]:
        return "dataset_name: no dataset given; name a folder of captioned images or a hub dataset, or list several in datasets"
    problems = (dataset_entry_problem(f"datasets[{number}]", entry) for number, entry in enumerate(v["datasets"]))
    problem = next((p for p in problems if p), None)
    if problem is None and not v["dataset_name"] and all(entry.get("is_regularization") for entry in v["datasets"]):
        return "datasets: every dataset is marked is_regularization; expected at least one dataset of training images"
    return problem


def prior_loss_weight_rule(v: Mapping) -> str | None:
    entries = v["datasets"] if isinstance(v["datasets"], list) else []
    if v["prior_loss_weight"] != 1.0 and not any(isinstance(e, dict) and e.get("is_regularization") is True for e in entries):
        return (f"prior_loss_weight: {v['prior_loss_weight']:g} weighs the loss of regularisation images, and no dataset is marked "
                "is_regularization; add one to datasets, or leave prior_loss_weight at 1")  # fmt: skip
    return None


def text_encoder_adapter_rule(v: Mapping) -> str | None:
    """Text-encoder adapters are LoRA only: Diffusers loads a text encoder's DoRA magnitudes under the wrong
    names (they stay at their initial values), and LoKr/LoHa not at all."""
    if v["train_text_encoder"] and v["lora_type"] != "lora":
        return f"lora_type: {v['lora_type']!r} trains the denoiser only; with train_text_encoder use 'lora'"
    return None


def quantized_text_encoders_rule(v: Mapping) -> str | None:
    if v["quantize_text_encoders"] and v["base_quantization"] == "none":
        return "quantize_text_encoders: set base_quantization (int8, fp8 or nf4) to say how"
    return None


def sharded_quantized_rule(v: Mapping) -> str | None:
    if v["shard_base_model"] and v["base_quantization"] != "none":
        return (f"shard_base_model: a quantised base (base_quantization {v['base_quantization']!r}) cannot be sharded "
                "(its weights are not plain tensors FSDP can split); use one or the other")  # fmt: skip
    return None


def offloaded_trained_text_encoders_rule(v: Mapping) -> str | None:
    if v["offload_text_encoders"] and v["train_text_encoder"]:
        return "offload_text_encoders: the text encoders train (train_text_encoder), so they stay on the accelerator"
    return None


def polynomial_rule(v: Mapping) -> str | None:
    if v["lr_scheduler"] == "polynomial" and v["learning_rate"] <= POLYNOMIAL_END_LR:
        return (f"learning_rate: {v['learning_rate']:g} is not above {POLYNOMIAL_END_LR:g}, where the polynomial schedule "
                "decays to; raise it or pick another lr_scheduler")  # fmt: skip
    return None


def prodigy_learned_rule(v: Mapping) -> str | None:
    if v["optimizer"] == "prodigy" and v["loss_weighting"] == "learned":
        return ("optimizer: prodigy takes one learning rate for every parameter, and loss_weighting 'learned' "
                "trains with its own (loss_weighting_learning_rate); pick another optimizer or loss_weighting")  # fmt: skip
    return None


RULES = (export_formats_rule, sigma_rels_rule, eval_prompt_rule, caption_separator_rule, alpha_background_rule, validation_rule, datasets_rule, prior_loss_weight_rule, text_encoder_adapter_rule,
         quantized_text_encoders_rule, sharded_quantized_rule, offloaded_trained_text_encoders_rule, polynomial_rule,
         prodigy_learned_rule)  # fmt: skip


def combination_problems(values: Mapping[str, Any]) -> list[str]:
    """The rules' problems; a rule about a field whose own value was refused (absent here) is skipped."""
    problems = []
    for rule in RULES:
        try:
            problem = rule(values)
        except KeyError:
            continue
        if problem is not None:
            problems.append(problem)
    return problems


def switch_is_on(values: Mapping[str, Any], switch: Mapping[str, Any]) -> bool:
    """A dependency's condition: each named field holds the value given (or one of the values listed)."""
    return all(values[name] in (wanted if isinstance(wanted, list) else [wanted]) for name, wanted in switch.items())


def dependency_problems(values: Mapping[str, Any], given: set[str], dependencies: Mapping, defaults: Mapping) -> tuple[list[str], list[str]]:
    """(errors, warnings) for fields the parameter file set away from their default while the switch they act
    under (the manifest's `parameter_dependencies`) is off. An error where the intent is unambiguous (the
    manifest says "refuse": setting ema_type to posthoc asks for EMA), a warning otherwise."""
    errors, warnings = [], []
    for name, rule in dependencies.items():
        if name not in given or name not in values or any(k not in values for k in rule["when"]):
            continue  # not set, or refused on its own
        if values[name] == defaults[name] or switch_is_on(values, rule["when"]):
            continue
        condition = " and ".join(f"{k} is {' or '.join(map(repr, w)) if isinstance(w, list) else repr(w)}" for k, w in rule["when"].items())
        now = ", ".join(f"{k} is {values[k]!r}" for k in rule["when"])
        message = f"{name}: {values[name]!r} acts only when {condition} ({now})"
        (errors if rule.get("refuse") else warnings).append(message + ("" if rule.get("refuse") else "; ignored"))
    return errors, warnings
