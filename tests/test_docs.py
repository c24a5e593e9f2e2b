"""What a user reads: the README's first screen, the pages it links to, and the generated parts of both."""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

from plugin.config import load_manifest
from plugin.docs import BEGIN, DOCS_DIR, END, PARAMETERS_PATH, parameter_table
from plugin.docs.screenshots import card_html, without_bottom_margin

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = sorted(DOCS_DIR.glob("*.md"))
# Words of how the project was built, which a user cannot act on.
HISTORY_WORDS = re.compile(r"\b(round \d|rounds?\b|issues?\b|sessions?\b|mutations?\b|until now|used to|was lent|"
                           r"this work\b|this project\b|yet\b)", re.I)  # fmt: skip
LINK = re.compile(r"\]\(([^)#\s]+)(?:#([^)\s]*))?\)|<img src=\"([^\"]+)\"")


def test_the_readmes_first_screen_holds_both_commands_and_the_readme_is_one_screen_of_links():
    lines = README.read_text(encoding="utf-8").splitlines()
    first_screen = "\n".join(lines[:60])
    assert "bash setup.sh && .venv/bin/python plugin/main.py --demo" in first_screen
    assert "bash setup.sh && .venv/bin/python -m pytest -q -n auto" in first_screen
    assert len(lines) <= 80, "the rest belongs in plugin/docs/"
    assert {page.name for page in PAGES} <= set(re.findall(r"plugin/docs/([\w-]+\.md)", "\n".join(lines))), "every page is linked"


def test_no_page_speaks_of_the_projects_history():
    for path in [README, *PAGES]:
        found = HISTORY_WORDS.findall(path.read_text(encoding="utf-8"))
        assert not found, f"{path.name}: {found}"


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", markdown, re.M)
    return {re.sub(r"[^\w\- ]", "", h.replace("`", "")).strip().lower().replace(" ", "-") for h in headings}


def test_every_link_in_the_readme_and_the_pages_reaches_a_file_and_its_heading():
    checked = 0
    for path in [README, *PAGES]:
        for target, anchor, image in LINK.findall(path.read_text(encoding="utf-8")):
            target = target or image
            if target.startswith("http"):
                continue
            linked = (path.parent / target).resolve()
            assert linked.exists(), f"{path.name} links to {target}, which does not exist"
            if anchor:
                assert anchor in anchors(linked.read_text(encoding="utf-8")), f"{path.name}: no heading #{anchor} in {target}"
            checked += 1
    assert checked > 20


def test_the_parameter_list_is_generated_from_the_manifest():
    table = PARAMETERS_PATH.read_text(encoding="utf-8").split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert table == parameter_table(load_manifest()), "run `python -m plugin.docs` to regenerate the parameter list"


def test_the_readmes_pictures_are_the_grid_and_a_rendered_card():
    with Image.open(DOCS_DIR / "images" / "eval-grid.png") as grid, Image.open(DOCS_DIR / "images" / "model-card.png") as card:
        assert grid.width > 200 and card.width == 960 and card.height > 1000


def test_the_cards_html_shows_its_header_small_and_renders_its_tables_and_images():
    card = "---\nlibrary_name: diffusers\ntags:\n- lora\n---\n# name\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n![grid](eval_grid.png)\n"
    html = card_html(card)
    assert "<div class='front-matter'>library_name: diffusers\ntags:\n- lora</div>" in html
    assert "<h1>name</h1>" in html and "<td>1</td>" in html and '<img src="eval_grid.png" alt="grid"' in html
    page = Image.new("RGB", (50, 400), "white")
    page.paste((0, 0, 0), (5, 5, 20, 100))
    assert without_bottom_margin(page).size == (50, 124)
