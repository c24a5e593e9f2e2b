"""The manifest is the single source of truth: config fields, defaults and validation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from plugin.config import ALIASES, LAUNCHER_KEYS, load_manifest, parameter_specs, parse_parameters, read_parameter_file, unknown_keys
from plugin.errors import ConfigError

PLUGIN = Path(__file__).resolve().parent.parent / "plugin"
MANIFEST = load_manifest()
PARAMETERS = parameter_specs(MANIFEST)  # the form's and the launcher's
REQUIRED = {"adaptor_name": "a", "model_name": "base-model", "dataset_name": "images"}  # what every run must name


def test_manifest_is_a_transformer_lab_trainer_plugin():
    for key in ("name", "uniqueId", "description", "plugin-format", "type", "version", "model_architectures",
                "supported_hardware_architectures", "files", "setup-script", "parameters", "parameters_ui"):
        assert key in MANIFEST, key
    assert MANIFEST["type"] == "trainer" and MANIFEST["plugin-format"] == "python"
    for cls in ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline"):
        assert cls in MANIFEST["model_architectures"]
    root = PLUGIN.parent
    assert all((root / f).is_file() for f in MANIFEST["files"])
    assert PARAMETERS["adaptor_name"]["required"] is True
    assert MANIFEST["train_type"] == "LoRA" and MANIFEST["training_template_format"] == "none"  # what the app runs


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_every_parameter_is_complete_and_its_default_is_valid(name):
    spec = PARAMETERS[name]
    assert spec["title"] and spec["type"] in {"string", "integer", "number", "boolean"}
    assert MANIFEST["parameters_ui"][name]["ui:help"].strip()
    if "enum" in spec:
        assert spec["default"] in spec["enum"]
    if "minimum" in spec and "maximum" in spec:
        assert spec["minimum"] <= spec["maximum"]
    if not spec.get("required") and name not in REQUIRED:
        parsed_default = [] if spec.get("contentMediaType") == "application/json" else spec["default"]  # "" is an empty JSON list
        assert parse_parameters(REQUIRED).as_dict()[name] == parsed_default


def test_ui_hints_cover_exactly_the_parameters():
    assert set(MANIFEST["parameters_ui"]) == set(PARAMETERS)


def _code_outside_config() -> str:
    return "\n".join(p.read_text() for p in PLUGIN.rglob("*.py") if p.name not in {"config.py", "docs.py"})


def test_every_manifest_parameter_is_read_by_the_code():
    code = _code_outside_config()
    unused = [name for name in PARAMETERS if not re.search(rf"\bcfg\.{name}\b", code)]
    assert unused == [], f"parameters nothing reads: {unused}"


def test_the_code_reads_no_config_field_the_manifest_lacks():
    code = _code_outside_config()
    methods = {"as_dict", "replace"}
    read = set(re.findall(r"\bcfg\.([a-z_][a-z0-9_]*)", code)) - methods
    assert read - set(PARAMETERS) == set()
    with pytest.raises(AttributeError, match="not a parameter"):
        parse_parameters(REQUIRED).no_such_field


def test_strings_from_a_form_are_coerced_by_manifest_type():
    cfg = parse_parameters(
        {**REQUIRED, "learning_rate": "1e-4", "use_ema": "true", "lora_r": "4", "noise_offset": "0.05",
         "center_crop": "False", "max_train_steps": 10.0}
    )
    assert cfg.learning_rate == 1e-4 and cfg.use_ema is True and cfg.lora_r == 4
    assert cfg.noise_offset == 0.05 and cfg.center_crop is False and cfg.max_train_steps == 10
    assert isinstance(cfg.lora_r, int) and isinstance(cfg.noise_offset, float)


@pytest.mark.parametrize(
    "raw, culprit",
    [
        ({**REQUIRED, "lora_rank": 4}, "lora_rank"),  # unknown key, with a suggestion
        ({**REQUIRED, "lora_r": "four"}, "lora_r"),  # wrong type
        ({**REQUIRED, "lora_r": 2.5}, "lora_r"),  # not an integer
        ({**REQUIRED, "use_ema": "maybe"}, "use_ema"),
        ({**REQUIRED, "caption_dropout_rate": 1.5}, "caption_dropout_rate"),  # out of range
        ({**REQUIRED, "learning_rate": -1}, "learning_rate"),
        ({**REQUIRED, "lr_scheduler": "exponential"}, "lr_scheduler"),  # bad enum
        ({**REQUIRED, "learning_rate": "nan"}, "learning_rate"),
        ({**REQUIRED, "seed": True}, "seed"),
        ({}, "adaptor_name"),  # missing required
        ({**REQUIRED, "adaptor_name": ""}, "adaptor_name"),
        ({**REQUIRED, "adaptor_name": "../escape"}, "adaptor_name"),
        ({**REQUIRED, "adaptor_name": "/abs/path"}, "adaptor_name"),
        ({**REQUIRED, "adaptor_name": "a/b"}, "adaptor_name"),
        ({**REQUIRED, "adaptor_name": ".."}, "adaptor_name"),
    ],
)
def test_bad_values_name_the_field(raw, culprit):
    with pytest.raises(ConfigError, match=re.escape(culprit)):
        parse_parameters(raw)


def test_unknown_key_error_suggests_the_close_name():
    with pytest.raises(ConfigError, match="did you mean lora_r"):
        parse_parameters({**REQUIRED, "lora_rr": 4})


def test_enum_error_lists_allowed_values():
    with pytest.raises(ConfigError, match="'cosine_with_restarts'"):
        parse_parameters({**REQUIRED, "lr_scheduler": "nope"})


def test_comment_keys_are_ignored_and_aliases_map():
    cfg = parse_parameters({**REQUIRED, "_comment": "anything", "min_snr_gamma": 5})
    assert cfg.snr_gamma == 5.0
    assert set(ALIASES.values()) <= set(PARAMETERS)


@pytest.mark.parametrize("order", [("snr_gamma", "min_snr_gamma"), ("min_snr_gamma", "snr_gamma")])
def test_alias_beats_a_canonical_key_left_at_its_default(order):
    """Pitfall 5: a launcher sends snr_gamma at its default 0 beside the older min_snr_gamma; min-SNR must
    still apply, in either key order. Two different settings are reported, not silently resolved."""
    values = {"snr_gamma": 0, "min_snr_gamma": 5}
    raw = {**REQUIRED, **{key: values[key] for key in order}}
    assert parse_parameters(raw).snr_gamma == 5.0
    assert parse_parameters({**REQUIRED, "min_snr_gamma": 0, "snr_gamma": 3}).snr_gamma == 3.0
    assert parse_parameters({**REQUIRED, "min_snr_gamma": 3, "snr_gamma": 3}).snr_gamma == 3.0
    with pytest.raises(ConfigError, match="snr_gamma = 3.0 and its alias min_snr_gamma = 5.0 disagree"):
        parse_parameters({**REQUIRED, "min_snr_gamma": 5, "snr_gamma": 3})


def test_unknown_keys_are_those_no_parameter_or_alias_explains():
    raw = {"adaptor_name": "a", "min_snr_gamma": 5, "_note": 1, "train_final_model": True, "job_id": 3}
    assert unknown_keys(raw) == {"train_final_model", "job_id"}


def test_launcher_keys_are_accepted_only_when_ignored():
    raw = {**REQUIRED, "job_id": 7, "adaptor_output_dir": "/x", "model_architecture": "FluxPipeline"}
    with pytest.raises(ConfigError, match="job_id|adaptor_output_dir|model_architecture"):
        parse_parameters(raw)
    assert parse_parameters(raw, ignore=LAUNCHER_KEYS).adaptor_name == "a"


def test_config_is_read_only_and_replace_revalidates():
    cfg = parse_parameters(REQUIRED)
    with pytest.raises(AttributeError):
        cfg.lora_r = 3
    assert cfg.replace(lora_r=16).lora_r == 16
    with pytest.raises(ConfigError, match="lora_r"):
        cfg.replace(lora_r=0)


def test_parameter_files_flat_or_under_config(tmp_path):
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"adaptor_name": "a", "lora_r": 4}))
    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps({"experiment": {"name": "x"}, "config": {"adaptor_name": "a", "lora_r": 4}}))
    assert read_parameter_file(flat) == read_parameter_file(nested) == {"adaptor_name": "a", "lora_r": 4}


@pytest.mark.parametrize("content, message", [(None, "does not exist"), ("{not json", "not valid JSON"), ("[1]", "JSON object")])
def test_bad_parameter_files_are_named(tmp_path, content, message):
    path = tmp_path / "run.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message) as error:
        read_parameter_file(path)
    assert "run.json" in str(error.value)


@pytest.mark.parametrize("value", [float("nan"), 3, 1.5, True, None, ["a"]])
def test_a_string_parameter_takes_text_only(value):
    """`"trigger_word": NaN` used to train every caption with "nan" in front."""
    with pytest.raises(ConfigError, match=r"trigger_word: .* is not text; expected a string"):
        parse_parameters({**REQUIRED, "trigger_word": value})
