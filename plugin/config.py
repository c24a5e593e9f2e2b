"""The run's parameters: one typed, validated object whose fields, defaults and bounds come from index.json.

The manifest is the single source of truth: adding a parameter there adds a field here. Values from a GUI
form arrive as strings ("1e-4", "true", "4") and are coerced by the manifest type; anything that does not
fit is a ConfigError naming the field, the value and what is allowed, raised before any model is loaded.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError
from .presets import NONE as NO_PRESET, preset_values, with_preset_source
from .settings import combination_problems, dependency_problems

MANIFEST_PATH = Path(__file__).resolve().parent.parent / "index.json"

# Older Transformer Lab parameter files spell some parameters differently.
ALIASES = {"min_snr_gamma": "snr_gamma", "huber_beta": "huber_c"}

# Keys the Transformer Lab launcher adds to "config" besides the manifest's parameters.
LAUNCHER_KEYS = frozenset(
    {
        "job_id", "template_name", "plugin_name", "model_architecture", "foundation_model_file_path",
        "model_path", "type", "run_sweeps", "sweep_config", "sweep_metric", "lower_is_better",
        "embedding_model", "embedding_model_architecture", "embedding_model_file_path",
        "chatml_formatted_column", "adaptor_output_dir", "experiment_name", "eval_dataset_name",
    }
)

_ADAPTOR_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", ""}


def load_manifest(path: Path = MANIFEST_PATH) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@dataclass(frozen=True)
class Parameter:
    """One manifest parameter and the rules its value must follow."""

    name: str
    type: str
    default: Any
    enum: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None
    multiple_of: float | None = None  # a slider's step in the form, which refuses values between steps
    required: bool = False
    json: bool = False  # a string holding JSON (contentMediaType application/json): the value is the parsed JSON

    @classmethod
    def from_manifest(cls, name: str, spec: Mapping) -> "Parameter":
        enum = spec.get("enum")
        return cls(
            name=name,
            type=spec["type"],
            default=spec["default"],
            enum=tuple(enum) if enum else None,
            minimum=spec.get("minimum"),
            maximum=spec.get("maximum"),
            multiple_of=spec.get("multipleOf"),
            required=bool(spec.get("required", False)),
            json=spec.get("contentMediaType") == "application/json",
        )

    def coerce(self, raw: Any) -> Any:
        """The value in the manifest's type, or a ConfigError saying what was expected."""
        value = self._typed(raw)
        if self.enum is not None and value not in self.enum:
            raise ConfigError(f"{self.name}: {raw!r} is not one of {', '.join(map(repr, self.enum))}")
        if self.minimum is not None and value < self.minimum:
            raise ConfigError(f"{self.name}: {raw!r} is below the minimum {self.minimum}")
        if self.maximum is not None and value > self.maximum:
            raise ConfigError(f"{self.name}: {raw!r} is above the maximum {self.maximum}")
        if self.multiple_of is not None and abs(value / self.multiple_of - round(value / self.multiple_of)) > 1e-9 * max(1.0, abs(value / self.multiple_of)):
            raise ConfigError(f"{self.name}: {raw!r} is not a multiple of {self.multiple_of:g} (the form's step)")
        if self.required and value == "":
            raise ConfigError(f"{self.name} is required and may not be empty")
        return value

    def _typed(self, raw: Any) -> Any:
        wrong = ConfigError(f"{self.name}: {raw!r} is not a valid {self.type}")
        if self.json:  # JSON text from a form, or the value itself from a parameter file; "" is an empty list
            if not isinstance(raw, str):
                return raw
            try:
                return json.loads(raw) if raw.strip() else []
            except json.JSONDecodeError as error:
                raise ConfigError(f"{self.name}: not valid JSON ({error}); expected a JSON list such as [{{\"path\": \"data/dog\"}}]") from None
        if self.type == "string":  # a number here (or NaN) is a mistake, never text to train with
            if isinstance(raw, str):
                return raw.strip()
            raise ConfigError(f"{self.name}: {raw!r} is not text; expected a string (in quotes in a JSON file)")
        if self.type == "boolean":
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
                return raw.strip().lower() in _TRUE
            if isinstance(raw, int) and raw in (0, 1):
                return bool(raw)
            raise wrong
        if isinstance(raw, bool):
            raise wrong
        if self.type == "integer":
            try:
                number = float(raw.strip()) if isinstance(raw, str) else raw
            except ValueError:
                raise wrong from None
            if not isinstance(number, (int, float)) or not math.isfinite(number) or number != int(number):
                raise wrong
            return int(number)
        if self.type == "number":
            try:
                number = float(raw.strip()) if isinstance(raw, str) else float(raw)
            except (TypeError, ValueError):
                raise wrong from None
            if not math.isfinite(number):
                raise wrong
            return number
        raise ConfigError(f"{self.name}: the manifest type {self.type!r} is not supported")


def parameter_specs(manifest: Mapping) -> dict[str, dict]:
    """Every parameter's JSON-schema spec: the form's (`parameters`) and those a launcher provides itself
    (`launcher_parameters`: the model, the dataset, the output folder). Transformer Lab renders only the
    first block, so its form never sends an empty value over the model or dataset the user picked in the app;
    a headless parameter file takes both."""
    return {**manifest["parameters"], **manifest.get("launcher_parameters", {})}


def manifest_parameters(manifest: Mapping | None = None) -> dict[str, Parameter]:
    manifest = load_manifest() if manifest is None else manifest
    return {name: Parameter.from_manifest(name, spec) for name, spec in parameter_specs(manifest).items()}


class Config:
    """Validated run parameters: one read-only attribute per manifest parameter, nothing else."""

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, Any]):
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"{name!r} is not a parameter in index.json") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Config is read-only; use replace()")

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def replace(self, **changes: Any) -> "Config":
        """A copy with some fields changed, validated like user input."""
        return parse_parameters({**self._values, **changes}, warn=False, apply_preset=False)

    def __repr__(self) -> str:
        return f"Config({self._values!r})"


def parse_parameters(raw: Mapping[str, Any], *, ignore: frozenset = frozenset(), manifest: Mapping | None = None,
                     warn: bool = True, apply_preset: bool = True) -> Config:
    """Coerce and validate user parameters against the manifest; missing ones take the manifest default.

    Keys starting with '_' are comments; keys in `ignore` (a launcher's own) are skipped; any other key the
    manifest lacks is an error listing near matches, so a typo never silently falls back to a default. Every
    problem is reported at once, in one ConfigError: each field's, then the combinations' (plugin/settings.py).
    With `warn`, a field set while the switch it acts under is off is said in a warning. With `apply_preset`, the
    `preset` named fills the fields left at their defaults (plugin/presets).
    """
    manifest = load_manifest() if manifest is None else manifest
    parameters = manifest_parameters(manifest)
    problems: list[str] = []
    values: dict[str, Any] = {}
    aliased: dict[str, tuple[str, Any]] = {}
    given = set()
    for key, value in raw.items():
        if key.startswith("_") or key in ignore:
            continue
        name = ALIASES.get(key, key)
        if name not in parameters:
            problems.append(f"unknown parameter {key!r}{_suggestion(key, parameters)}")
            continue
        given.add(name)
        try:
            coerced = parameters[name].coerce(value)
        except ConfigError as error:
            problems.append(str(error))
            continue
        if key != name:
            aliased[name] = (key, coerced)
        else:
            values[name] = coerced
    defaults = {name: parameter.coerce(parameter.default) for name, parameter in parameters.items() if not parameter.required}
    for name, (alias, value) in aliased.items():
        try:
            values[name] = _merge_alias(name, values.get(name), alias, value, defaults[name])
        except ConfigError as error:
            problems.append(str(error))
    for name, parameter in parameters.items():
        if name not in values and name not in given:
            if parameter.required:
                problems.append(f"{name} is required: set it in the parameter file or form")
            else:
                values[name] = defaults[name]
    if apply_preset and values.get("preset", NO_PRESET) != NO_PRESET:
        values |= {name: parameters[name].coerce(value) for name, value in preset_values(values["preset"], values, defaults).items()}
    if "adaptor_name" in values:
        problems += _adaptor_name_problems(values["adaptor_name"])
    problems += [with_preset_source(problem, values) for problem in combination_problems(values)]
    errors, notes = dependency_problems(values, given, manifest.get("parameter_dependencies", {}), defaults)
    problems += errors
    if problems:
        raise ConfigError(problems[0] if len(problems) == 1 else f"{len(problems)} problems in the parameters:\n  " + "\n  ".join(problems))
    for note in notes if warn else ():
        warnings.warn(note, stacklevel=2)
    return Config(values)


def unknown_keys(raw: Mapping[str, Any], manifest: Mapping | None = None) -> set[str]:
    """Keys of a parameter file that are neither parameters, aliases nor '_' comments."""
    parameters = manifest_parameters(manifest)
    return {key for key in raw if not key.startswith("_") and ALIASES.get(key, key) not in parameters}


def _merge_alias(name: str, canonical: Any, alias: str, value: Any, default: Any) -> Any:
    """A launcher sends every parameter, the canonical one at its default included, so an alias set to
    something else (min_snr_gamma: 5 beside snr_gamma: 0) is what the user meant; two different
    non-default values are a contradiction to report rather than resolve."""
    if canonical is None or canonical == default:
        return value
    if value in (default, canonical):
        return canonical
    raise ConfigError(f"{name} = {canonical!r} and its alias {alias} = {value!r} disagree: set only one")


def _adaptor_name_problems(name: str) -> list[str]:
    """The adapter name becomes a folder under output_dir: it may not climb out of it or nest."""
    if not _ADAPTOR_NAME.fullmatch(name) or name in {".", ".."}:
        return [f"adaptor_name: {name!r} is not allowed; use letters, digits, '.', '_' and '-' only "
                "(no path separators, no '..', no absolute paths)"]  # fmt: skip
    return []


def _suggestion(key: str, parameters: Mapping) -> str:
    close = difflib.get_close_matches(key, list(parameters), n=3)
    return f"; did you mean {', '.join(close)}?" if close else " (see index.json for the parameters)"


def read_parameter_file(path: str | Path) -> dict:
    """A flat JSON object, or one with the parameters under "config" (the Transformer Lab input file).

    Read strictly, since a silently misread file trains the wrong run: a key given twice is an error (JSON
    keeps the last one without a word), and a file in UTF-16 (what Windows PowerShell's `>` writes) is named
    as such rather than reported as a syntax error in its first byte."""
    path = Path(path)
    name = repr(str(path))
    if path.is_dir():
        raise ConfigError(f"parameter file {name} is a folder; expected a JSON file")
    if not path.is_file():
        raise ConfigError(f"parameter file {name} does not exist")
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or (len(data) > 1 and b"\x00" in data[:2]):
        raise ConfigError(f"parameter file {name} is UTF-16 text; save it as UTF-8 (e.g. PowerShell: Set-Content -Encoding utf8)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ConfigError(f"parameter file {name} is not UTF-8 text (byte {error.start}); save it as UTF-8") from None
    try:
        parsed = json.loads(text, object_pairs_hook=_object_without_duplicates)
    except json.JSONDecodeError as error:
        raise ConfigError(f"parameter file {name} is not valid JSON: {error}") from None
    except _DuplicateKey as error:
        raise ConfigError(f"parameter file {name}: {error.args[0]!r} is given more than once; keep one") from None
    if not isinstance(parsed, dict):
        raise ConfigError(f"parameter file {name} must hold a JSON object")
    if "config" in parsed:
        if not isinstance(parsed["config"], dict):
            raise ConfigError(f"parameter file {name}: 'config' must be a JSON object")
        return parsed["config"]
    return parsed


class _DuplicateKey(Exception):
    """A JSON object with a key twice (carries the key)."""


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    result = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result
