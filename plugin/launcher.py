"""What a Transformer Lab input file means on this machine.

The app's launcher (plugin era) writes `<workspace>/temp/plugin_input_<job>.json` holding the form's values
and keys of its own: the foundation model the user picked (`model_name`, with a local copy in `model_path` or
`foundation_model_file_path` for some models), a dataset id of the app's registry (files under
`<workspace>/datasets/<id>`), `adaptor_output_dir` (where the app's inference loads the adapter) and
`output_dir` (the folder its TensorBoard reads). These turn into parameters here; nothing heavy is imported.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

MODEL_PATH_KEYS = ("model_path", "foundation_model_file_path")  # local copies, in the order they are preferred
JOB_ID_VARIABLE = "_TFL_JOB_ID"  # today's app names the job a task runs as in the environment


def workspace_of(input_file: Path | None) -> Path | None:
    """The app's workspace: TFL_WORKSPACE_DIR, or the folder above the input file's `temp/`."""
    if os.environ.get("TFL_WORKSPACE_DIR"):
        return Path(os.environ["TFL_WORKSPACE_DIR"])
    if input_file is None:
        return None
    input_file = Path(input_file).resolve()
    return input_file.parent.parent if input_file.parent.name == "temp" else None


def launcher_parameters(raw: Mapping[str, Any], workspace: Path | None) -> dict[str, Any]:
    """The input file's values with the launcher's names resolved: a local model copy beats a hub id, and a
    registry dataset id becomes its folder (a path or hub id that is not registered is left as it is)."""
    resolved = dict(raw)
    for key in MODEL_PATH_KEYS:
        if raw.get(key) and Path(str(raw[key])).is_dir():
            resolved["model_name"] = str(raw[key])
            break
    dataset = str(raw.get("dataset_name") or "")
    if dataset and workspace is not None and not Path(dataset).expanduser().exists():
        registered = workspace / "datasets" / dataset
        if registered.is_dir():
            resolved["dataset_name"] = str(registered)
    return resolved
