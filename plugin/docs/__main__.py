"""`python -m plugin.docs [--screenshots]`: regenerate the generated documentation (see __init__)."""

import argparse

from . import DOCS_DIR, regenerate

parser = argparse.ArgumentParser(prog="python -m plugin.docs", description=__doc__)
parser.add_argument("--screenshots", action="store_true", help="also render the demo's grid and model card into images/")
args = parser.parse_args()
regenerate()
if args.screenshots:
    from .screenshots import render_screenshots

    for path in render_screenshots(DOCS_DIR / "images"):
        print(f"wrote {path}")
