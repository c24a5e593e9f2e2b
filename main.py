"""Transformer Lab's plugin harness runs `sys.path.append(plugin_dir); import main; main.main()` and ignores
the return value: this is that `main`. The trainer itself is plugin/main.py; a non-zero exit status is raised
as SystemExit so the process ends with it (the job's own status is written by the run's reporting sink)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness appends the folder: ours must come first

from plugin.main import main as run  # noqa: E402


def main(argv=None) -> None:
    code = run(argv)
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
