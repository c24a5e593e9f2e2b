"""Presets (`preset`): a named set of parameters for one model family on one size of GPU, each a small JSON file
in this folder (`family`, `description`, `parameters`). A preset fills the fields the user leaves at their
defaults; whatever the user sets wins. `plugin/main.py --presets` lists them; the manifest's `preset` enum is the
list of these files (a test keeps the two equal)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from ..errors import ConfigError

FOLDER = Path(__file__).resolve().parent
NONE = "none"


@cache
def presets() -> dict[str, dict[str, Any]]:
    """Every preset by name: {"family", "description", "parameters"}."""
    return {path.stem: json.loads(path.read_text(encoding="utf-8")) for path in sorted(FOLDER.glob("*.json"))}


def preset_values(name: str, values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The preset's parameters for the fields still at their defaults (the user's own values win)."""
    if name == NONE:
        return {}
    return {field: value for field, value in presets()[name]["parameters"].items() if values.get(field) == defaults.get(field)}


def check_preset_family(name: str, family) -> None:
    """A preset made for another family than the model's is refused (before any weights load)."""
    if name != NONE and presets()[name]["family"] != family.name:
        fitting = [other for other, preset in presets().items() if preset["family"] == family.name]
        raise ConfigError(f"preset: {name!r} is for another model family than this {family.title} model; "
                          + (f"presets for it: {', '.join(fitting)}" if fitting else "no preset is made for it"))  # fmt: skip


def with_preset_source(message: str, values) -> str:
    """A problem about a field the preset set (it names the field first, "field: ..."), with the preset named: the
    user did not type that value."""
    name = values.get("preset", NONE)
    field = message.partition(":")[0]
    if name == NONE or field not in presets()[name]["parameters"] or values.get(field) != presets()[name]["parameters"][field]:
        return message
    return f"{message} ({field} {json.dumps(values[field])} comes from preset {name!r})"


def preset_listing() -> str:
    """What `--presets` prints: each preset, its family, what it is for and what it sets."""
    lines = []
    for name, preset in presets().items():
        settings = ", ".join(f"{field}={json.dumps(value)}" for field, value in preset["parameters"].items())
        lines += [f"{name}  ({preset['family']})", f"    {preset['description']}", f"    sets: {settings}"]
    return "\n".join(lines)
