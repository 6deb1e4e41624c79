"""The README's screenshots: the page on a desktop and on a phone after a miss, a hit and a partial hit;
the miss explainer after an edited system prompt; the cache's tree view.

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

import httpx
from PIL import Image
from playwright.sync_api import Locator, Page, sync_playwright

from tests.conftest import REPO_ROOT, launch_app, stop_app
from tests.test_app_browser import CHROMIUM, CHROMIUM_ARGS, DESKTOP, PHONE, generate as press_generate

SYSTEM = (  # the edit comes after min_cached_tokens (20) tokens: a partial hit, not a miss
    "You are a patient librarian at a small public library in a seaside town. You know the catalogue well, "
    "you speak plainly, and you suggest one book when it helps. Answer in two sentences."
)
EDITED = SYSTEM.replace("two sentences", "one sentence")
QUESTIONS = ("Which book should I read about the sea?", "Which book should I read about mountains?")
MAX_PNG_BYTES = 300 * 1024
# A miss, the same question again (an exact hit), then another question under the same system prompt (a partial hit).
STEPS = (("miss", SYSTEM, QUESTIONS[0]), ("hit", SYSTEM, QUESTIONS[0]), ("partial", SYSTEM, QUESTIONS[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs")
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as logs:
        server = launch_app(Path(logs), "--cache-mode", "per-session")
        try:
            # One request in a session of its own first: the charted miss is then a warm one, not the process's first call.
            httpx.post(server.url + "/generate", json={"prompt": "Say hello.", "max_new_tokens": 4}, timeout=600).raise_for_status()
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                desktop, phone = (open_page(browser, server.url, viewport) for viewport in (DESKTOP, PHONE))
                for name, system, question in STEPS:
                    desktop_and_phone(desktop, phone, name, system, question, out)
                explainer(desktop, out / "explainer.png")
                tree_view(desktop, out / "tree-view.png")
                browser.close()
        finally:
            stop_app(server)


def open_page(browser, url: str, viewport: dict) -> Page:
    """A page in its own context (its own session), ready to generate."""
    page = browser.new_context(viewport=viewport, device_scale_factor=1).new_page()
    page.set_default_timeout(180_000)
    page.goto(url)
    page.locator("#kv-generate:not([disabled])").wait_for()
    return page


def desktop_and_phone(desktop: Page, phone: Page, name: str, system: str, question: str, out: Path) -> None:
    """The same request on both pages (each its own session): the desktop from the prompt to the verdict,
    the phone as its screen shows the answer (prompt, Generate, Output, figures) and then the charts."""
    for page in (desktop, phone):
        badge = press_generate(page, question, system)
        assert badge == name, f"expected a {name}, the page says {badge}"
    save(desktop, out / f"page-{name}.png", desktop.locator("#kv-main"), desktop.locator("#kv-verdict"))
    save(phone, out / f"phone-{name}.png", phone.locator("#kv-prompt"), phone.locator("#kv-figures"))
    if name == "partial":
        save(phone, out / "phone-charts.png", phone.locator("#kv-latency-plot"), phone.locator("#kv-verdict"))


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
    page.get_by_role("tab", name="Inspector").click()
    page.locator("#kv-tree-colour").get_by_label("recency").check()
    page.locator("#kv-tree-plot").get_by_text("time since last use").first.wait_for()
    page.locator("#kv-tree-plot g.slice").nth(1).hover()  # a node's hover text: its tokens, hits and last use
    page.wait_for_timeout(500)  # the hover label fades in
    save(page, path, page.locator("#kv-tree-colour"), page.locator("#kv-tree-plot"))


def generate(page: Page, system: str, question: str) -> None:
    press_generate(page, question, system)


def save(page: Page, path: Path, first: Locator, last: Locator) -> None:
    """Screenshot the page from ``first``'s top to ``last``'s bottom, as a 256-colour PNG under MAX_PNG_BYTES."""
    first.scroll_into_view_if_needed()
    x, y = page.evaluate("[window.scrollX, window.scrollY]")  # bounding boxes are in the viewport; a full-page clip is in the page
    top, bottom = first.bounding_box(), last.bounding_box()
    left = min(top["x"], bottom["x"])
    right = max(top["x"] + top["width"], bottom["x"] + bottom["width"])
    clip = dict(x=left + x, y=top["y"] + y, width=right - left, height=bottom["y"] + bottom["height"] - top["y"])
    page.screenshot(path=str(path), clip=clip, full_page=True)
    Image.open(path).convert("RGB").quantize(colors=256).save(path, optimize=True)
    size = path.stat().st_size
    print(f"{path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path}: {size / 1024:.0f} KiB")
    assert size <= MAX_PNG_BYTES, f"{path} is {size:,} bytes, over {MAX_PNG_BYTES:,}"


if __name__ == "__main__":
    main()
