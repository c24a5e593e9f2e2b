"""The pictures the README shows of what a run gives back: the demo's evaluation grid as it is written, and
its model card as a browser renders it (the Hugging Face page renders the same Markdown)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageChops

REPO = Path(__file__).resolve().parents[2]
CARD_STYLE = """body { font: 15px/1.5 system-ui, sans-serif; max-width: 860px; margin: 24px auto; color: #1f2328; }
pre, code { background: #f6f8fa; border-radius: 4px; } pre { padding: 10px; overflow: hidden; }
table { border-collapse: collapse; } td, th { border: 1px solid #d0d7de; padding: 3px 8px; }
img { max-width: 100%; } .front-matter { color: #59636e; font-size: 12px; white-space: pre-wrap; }"""


def card_html(card: str) -> str:
    """The card's Markdown as HTML, its YAML header shown small above it as the Hub shows its metadata."""
    from markdown_it import MarkdownIt  # markdown-it-py comes with the Hub's and Transformers' dependencies

    front, body = "", card
    if card.startswith("---\n"):
        front, body = card[4:].split("\n---\n", 1)
    html = MarkdownIt("commonmark").enable("table").render(body)
    escaped = front.replace("&", "&amp;").replace("<", "&lt;")
    return f"<!doctype html><meta charset='utf-8'><style>{CARD_STYLE}</style><div class='front-matter'>{escaped}</div>{html}"


def without_bottom_margin(image: Image.Image) -> Image.Image:
    """A screenshot is as tall as the window: cut the blank rows below the page."""
    box = ImageChops.difference(image.convert("RGB"), Image.new("RGB", image.size, "white")).getbbox()
    return image.crop((0, 0, image.width, min(image.height, box[3] + 24))) if box else image


def render_screenshots(out_dir: Path, chromium: str = "chromium") -> list[Path]:
    """Run the demo's parameters in a scratch folder, with relative paths as a user's parameter file has them,
    copy its grid and screenshot its card with headless Chromium."""
    from plugin.main import DEFAULT_FAMILY, demo_parameters

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        parameters = demo_parameters(DEFAULT_FAMILY, Path(scratch) / "output")
        for key in ("model_name", "dataset_name", "output_dir"):
            parameters[key] = str(Path(parameters[key]).relative_to(scratch))
        (Path(scratch) / "run.json").write_text(json.dumps(parameters))
        subprocess.run([sys.executable, str(REPO / "plugin" / "main.py"), "--config", "run.json"], cwd=scratch, check=True)
        adapter = Path(scratch) / parameters["output_dir"] / parameters["adaptor_name"]
        shutil.copyfile(adapter / "eval_grid.png", out_dir / "eval-grid.png")
        page = adapter / "card.html"
        page.write_text(card_html((adapter / "README.md").read_text(encoding="utf-8")), encoding="utf-8")
        shot = Path(scratch) / "card.png"
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--window-size=960,4000", f"--screenshot={shot}", page.as_uri()],
                       check=True, capture_output=True)  # fmt: skip
        without_bottom_margin(Image.open(shot)).save(out_dir / "model-card.png", optimize=True)
    return [out_dir / "eval-grid.png", out_dir / "model-card.png"]
