"""The README's screenshots: the miss explainer after an edited system prompt, and the cache's tree view.

Not a test (pytest does not collect it): it starts the app with the bundled model in per-session
mode (so the explainer may decode the cached side), drives Debian's Chromium through Playwright as
the browser test does, and writes compressed PNGs to docs/. The tree view's 🔒 and 📌 need an emoji
font (Debian: fonts-noto-color-emoji). Run from the repository root:

    .venv/bin/python -m tests.screenshots [--out docs]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from PIL import Image
from playwright.sync_api import Locator, Page, sync_playwright

from tests.conftest import REPO_ROOT, launch_app, stop_app
from tests.test_app_browser import CHROMIUM, CHROMIUM_ARGS

SYSTEM = (  # the edit comes after min_cached_tokens (20) tokens: a partial hit, not a miss
    "You are a patient librarian at a small public library in a seaside town. You know the catalogue well, "
    "you speak plainly, and you suggest one book when it helps. Answer in two sentences."
)
EDITED = SYSTEM.replace("two sentences", "one sentence")
QUESTIONS = ("Which book should I read about the sea?", "Which book should I read about mountains?")
MAX_PNG_BYTES = 200 * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs")
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as logs:
        server = launch_app(Path(logs), "--cache-mode", "per-session")
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = browser.new_context(viewport={"width": 1400, "height": 1500}, device_scale_factor=1).new_page()
                page.set_default_timeout(180_000)
                page.goto(server.url)
                page.get_by_text("Model:").first.wait_for()
                explainer(page, out / "explainer.png")
                tree_view(page, out / "tree-view.png")
                browser.close()
        finally:
            stop_app(server)


def explainer(page: Page, path: Path) -> None:
    """A request, then the same question under a system prompt edited in its middle: a partial hit, explained."""
    generate(page, SYSTEM, QUESTIONS[0])
    generate(page, EDITED, QUESTIONS[0])
    page.locator("#kv-explanation").get_by_text("diverged").first.wait_for()
    save(page, path, page.locator("#kv-figures"), page.locator("#kv-explanation"))


def tree_view(page: Page, path: Path) -> None:
    """Pin the edited system prompt, ask a second question under it, and draw the tree coloured by recency."""
    page.locator("#kv-pin").click()
    page.get_by_text("pinned (").first.wait_for()
    generate(page, EDITED, QUESTIONS[1])
    page.get_by_role("tab", name="Cache inspector").click()
    page.locator("#kv-tree-colour").get_by_label("recency").check()
    page.locator("#kv-tree-plot").get_by_text("time since last use").first.wait_for()
    page.locator("#kv-tree-plot g.slice").nth(1).hover()  # a node's hover text: its tokens, hits and last use
    page.wait_for_timeout(500)  # the hover label fades in
    save(page, path, page.locator("#kv-tree-colour"), page.locator("#kv-tree-plot"))


def generate(page: Page, system: str, question: str) -> None:
    page.get_by_label("System prompt").fill(system)
    page.locator("#kv-prompt textarea").fill(question)
    before = page.locator("#kv-figures").inner_text()
    page.locator("#kv-generate").click()
    page.wait_for_function("([el, before]) => el.innerText !== before && el.querySelector('.kv-badge')", arg=[page.locator("#kv-figures").element_handle(), before])
    page.locator("#kv-generate:not([disabled])").wait_for()  # the run is over: buttons unlocked


def save(page: Page, path: Path, first: Locator, last: Locator) -> None:
    """Screenshot the page from ``first``'s top to ``last``'s bottom, as a 256-colour PNG under MAX_PNG_BYTES."""
    top, bottom = first.bounding_box(), last.bounding_box()
    left = min(top["x"], bottom["x"])
    clip = dict(x=left, y=top["y"], width=max(top["x"] + top["width"], bottom["x"] + bottom["width"]) - left, height=bottom["y"] + bottom["height"] - top["y"])
    page.screenshot(path=str(path), clip=clip)
    Image.open(path).convert("RGB").quantize(colors=256).save(path, optimize=True)
    size = path.stat().st_size
    print(f"{path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path}: {size / 1024:.0f} KiB")
    assert size <= MAX_PNG_BYTES, f"{path} is {size:,} bytes, over {MAX_PNG_BYTES:,}"


if __name__ == "__main__":
    main()
