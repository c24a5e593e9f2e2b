"""Every value a parameter file can get wrong without a model or data is refused in the parameter phase:
by `parse_parameters`, in a process where importing PyTorch or any library of the training stack fails.
The cases are built from the manifest, so a new field is walked too; a new text field must be classified
here (its bad value, or free text) and a new combination rule must bring its case, or this test fails."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from plugin.config import load_manifest, parameter_specs, parse_parameters
from plugin.errors import ConfigError
from plugin.settings import RULES

REPO = Path(__file__).resolve().parent.parent
MANIFEST = load_manifest()
SPECS = parameter_specs(MANIFEST)
REQUIRED = {"adaptor_name": "a", "model_name": "base-model", "dataset_name": "images"}

# Text fields holding a small language the parameter phase parses, with a value it must refuse.
TEXT_BAD = {"adaptor_name": "../escape", "model_name": "", "dataset_name": "", "export_formats": "diffusers,onnx",
            "alpha_background": "not-a-colour", "posthoc_ema_sigma_rels": "0.05,0.5", "eval_prompt": "a cat --x 3",
            "caption_separator": "", "datasets": '[{"path": '}  # fmt: skip
# Text fields any string suits here: names, prompts, paths (checked when opened) and layer names (checked
# against the model's layers, before its weights load).
FREE_TEXT = {"trigger_word", "caption_prefix", "caption_suffix", "image_column", "caption_column", "cache_dir", "output_dir", "model_config",
             "text_encoder_source", "resume_from_checkpoint", "validation_dataset", "lora_target_modules", "mask_column", "mask_dir",
             "control_column", "control_dir", "eval_control_image"}  # fmt: skip
# One case per rule of plugin/settings.py: (the values, the field the problem names).
COMBINATIONS = [
    ({"export_formats": "kohya,,zip"}, "export_formats"),
    ({"posthoc_ema_sigma_rels": "wide"}, "posthoc_ema_sigma_rels"),
    ({"eval_prompt": "a dog\na cat --w wide"}, "eval_prompt"),
    ({"caption_separator": ""}, "caption_separator"),
    ({"alpha_background": "#12"}, "alpha_background"),
    ({"validation_split": 0.25, "validation_dataset": "held-out"}, "validation_split"),
    ({"datasets": [{"path": "dogs", "repeat": 3}]}, "datasets"),
    ({"prior_loss_weight": 0.5}, "prior_loss_weight"),
    ({"train_text_encoder": True, "lora_type": "lokr"}, "lora_type"),
    ({"quantize_text_encoders": True}, "quantize_text_encoders"),
    ({"shard_base_model": True, "base_quantization": "int8"}, "shard_base_model"),
    ({"offload_text_encoders": True, "train_text_encoder": True}, "offload_text_encoders"),
    ({"lr_scheduler": "polynomial", "learning_rate": 1e-8}, "learning_rate"),
    ({"optimizer": "prodigy", "loss_weighting": "learned", "learning_rate": 1.0}, "optimizer"),
]
REFUSED_DEPENDENTS = [name for name, rule in MANIFEST["parameter_dependencies"].items() if rule.get("refuse")]


def bad_values(name: str, spec: dict) -> list:
    """The values of a field its own rules refuse: wrong type, outside the choices, range or step, empty."""
    if spec["type"] == "string" and "enum" not in spec:
        return [7] + ([TEXT_BAD[name]] if name in TEXT_BAD else [])
    values = {"integer": ["seven", 1.5], "number": ["fast"], "boolean": ["maybe"], "string": [7, "no-such-choice"]}[spec["type"]]
    if "minimum" in spec:
        values.append(spec["minimum"] - (1 if spec["type"] == "integer" else 0.5))
    if "maximum" in spec:
        values.append(spec["maximum"] + 1)
    if "multipleOf" in spec:
        values.append(spec["multipleOf"] / 2)
    return values


def cases() -> list[tuple[str, dict, str]]:
    """(case id, parameters, the field the refusal must name)."""
    walked = [(f"{name}={value!r}", {**REQUIRED, name: value}, name) for name, spec in SPECS.items() for value in bad_values(name, spec)]
    combined = [(f"rule:{field}", {**REQUIRED, **values}, field) for values, field in COMBINATIONS]
    dependent = [(f"{name} without its switch", {**REQUIRED, name: other_value(name)}, name) for name in REFUSED_DEPENDENTS]
    return walked + combined + dependent


def other_value(name: str):
    spec = SPECS[name]
    return next(v for v in spec.get("enum", [True, False]) if v != spec["default"])


REFUSE_WITHOUT_THE_STACK = """
import json, sys
class TrainingStackForbidden:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "diffusers", "transformers", "peft", "accelerate", "datasets", "safetensors"}:
            raise ImportError(f"{name} imported in the parameter phase")
sys.meta_path.insert(0, TrainingStackForbidden())
from plugin.config import parse_parameters
from plugin.errors import ConfigError
messages = {}
for case, parameters, field in json.load(sys.stdin):
    try:
        parse_parameters(parameters)
        messages[case] = None
    except ConfigError as error:
        messages[case] = str(error)
print(json.dumps(messages))
"""


def test_every_fields_bad_value_is_refused_before_the_training_stack_is_imported():
    text_fields = {name for name, spec in SPECS.items() if spec["type"] == "string" and "enum" not in spec}
    assert text_fields == set(TEXT_BAD) | FREE_TEXT and not set(TEXT_BAD) & FREE_TEXT, "classify each text field above"
    assert len(COMBINATIONS) == len(RULES), "each rule of plugin/settings.py has its case above"
    assert "ema_type" in REFUSED_DEPENDENTS
    walked = cases()
    done = subprocess.run([sys.executable, "-c", REFUSE_WITHOUT_THE_STACK], input=json.dumps(walked), cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    messages = json.loads(done.stdout)
    accepted = [case for case, _, _ in walked if messages[case] is None]
    assert not accepted, f"accepted in the parameter phase: {accepted}"
    unnamed = [(case, messages[case]) for case, _, field in walked if not re.match(rf"{field}\b", messages[case])]
    assert not unnamed, f"refused without naming the field first: {unnamed}"
    assert len(walked) > 3 * len(SPECS) // 2, len(walked)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as error:
        parse_parameters({"adaptor_name": "a/b", "lora_r": 0, "lora_dropout": 0.005, "export_formats": "zip", "lr_schedule": "cosine"})
    lines = str(error.value).splitlines()
    assert lines[0] == "7 problems in the parameters:"
    assert [line.split(":")[0].split()[0].strip("'") for line in lines[1:]] == [
        "lora_r", "lora_dropout", "unknown", "model_name", "adaptor_name", "export_formats", "dataset_name"]  # fmt: skip
    assert "not a multiple of 0.01 (the form's step)" in lines[2] and "did you mean lr_scheduler" in lines[3]


def test_a_setting_whose_switch_is_off_is_refused_or_said():
    with pytest.raises(ConfigError, match=r"^ema_type: 'posthoc' acts only when use_ema is True \(use_ema is False\)$"):
        parse_parameters({**REQUIRED, "ema_type": "posthoc"})
    with pytest.warns(UserWarning, match=r"huber_c: 0.3 acts only when loss_type is 'huber' or 'smooth_l1' \(loss_type is 'l2'\); ignored"):
        parse_parameters({**REQUIRED, "huber_c": 0.3})
    with pytest.warns(UserWarning) as said:
        parse_parameters({**REQUIRED, "color_jitter_hue": 0.2, "rotation_degrees": 10})
    assert [str(w.message).split(":")[0] for w in said] == ["color_jitter_hue", "rotation_degrees"]
    quiet = [{**REQUIRED, "huber_c": 0.3, "loss_type": "huber"}, {**REQUIRED, "huber_c": 0.1}, {**REQUIRED, "use_ema": True, "ema_type": "posthoc"}]
    for parameters in quiet:  # the switch on, or the field at its default: nothing to say
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            parse_parameters(parameters).replace(lora_r=4)
    for name, rule in MANIFEST["parameter_dependencies"].items():
        assert name in SPECS and all(switch in SPECS for switch in rule["when"]), name

