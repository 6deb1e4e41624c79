"""The page in a real browser: Playwright drives Debian's Chromium through one generation."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ui.limits import PAGE_NO_REPEAT_NGRAM_SIZE, PAGE_REPETITION_PENALTY

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(__file__).resolve().parent.parent / "test-output"


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's Chromium, installed with apt when missing and we are root (never `playwright install`)."""
    if not Path(CHROMIUM).exists():
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            pytest.skip(f"{CHROMIUM} is missing and cannot be installed here (needs root and apt-get)")
        subprocess.run(["apt-get", "install", "-y", "chromium"], check=False, capture_output=True, timeout=600)
        if not Path(CHROMIUM).exists():
            pytest.skip("apt-get install chromium failed (no package registry reachable?)")
    return CHROMIUM


@pytest.fixture(scope="module")
def page(chromium, app_server):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1500})
        page = context.new_page()
        page.set_default_timeout(90_000)
        yield page
        browser.close()


def test_empty_prompt_shows_the_engine_message_and_the_page_keeps_working(page, app_server):
    """Bad input in the UI is a gr.Error carrying the validation message (the same as REST's)."""
    page.goto(app_server.url)
    page.get_by_text("Model:").first.wait_for()
    page.locator("#kv-generate").click()
    page.get_by_text("prompt: String should have at least 1 character").first.wait_for()


def test_generate_in_the_browser_streams_text_and_draws_both_charts(page, app_server):
    """A person types a prompt and presses Generate: text, figures, token highlights and both charts appear."""
    page.goto(app_server.url)
    page.get_by_text("Model:").first.wait_for()  # the header says which model and device
    page.locator("#kv-prompt textarea").fill("What is a KV cache? Answer in one sentence, please.")
    page.locator("#kv-generate").click()

    output = page.locator("#kv-output textarea")
    page.wait_for_function("el => el.value.trim().length > 0", arg=output.element_handle())
    page.locator("#kv-figures .kv-badge").wait_for()  # the figures appear when the request is done
    assert page.locator("#kv-figures .kv-card").count() == 5
    assert page.locator("#kv-figures").inner_text().count("ms") >= 3
    page.locator("#kv-tokens").get_by_text("computed").first.wait_for()

    for plot in ("#kv-latency-plot", "#kv-hits-plot"):
        page.locator(f"{plot} .js-plotly-plot").wait_for()
        assert page.locator(f"{plot} .js-plotly-plot .main-svg").count() >= 1, f"{plot} has no plotly drawing"
    page.locator("#kv-latency-plot").get_by_text("TTFT").first.wait_for()

    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "app.png"), full_page=True)
    assert output.input_value().strip()


def test_verify_button_shows_verified_identical_and_the_explanation(page, app_server):
    """Verify generates, reruns with no cache and says so under the token highlights, with the miss explanation."""
    page.goto(app_server.url)
    page.get_by_text("Model:").first.wait_for()
    page.locator("#kv-prompt textarea").fill("Name one prime number. Answer with the number only, please.")
    page.locator("#kv-verify").click()
    page.locator("#kv-explanation").get_by_text("verified identical").first.wait_for()
    assert "Why:" in page.locator("#kv-explanation").inner_text()


def test_cache_inspector_draws_the_radix_tree(page, app_server):
    """After one generation the Cache inspector tab draws the radix tree as a plotly icicle; its colour switches to recency."""
    page.goto(app_server.url)
    page.get_by_text("Model:").first.wait_for()
    page.locator("#kv-prompt textarea").fill("Name a colour of the sky. One word, please.")
    page.locator("#kv-generate").click()
    page.locator("#kv-figures .kv-badge").wait_for()  # done: the inspector refresh follows
    page.get_by_role("tab", name="Cache inspector").click()
    page.locator("#kv-tree-plot .js-plotly-plot").wait_for()
    page.locator("#kv-tree-plot .js-plotly-plot g.iciclelayer").wait_for()  # an icicle, not the empty placeholder
    assert page.locator("#kv-tree-plot .js-plotly-plot .main-svg").count() >= 1
    page.locator("#kv-tree-plot").get_by_text("colour: hits").first.wait_for()
    page.locator("#kv-tree-colour").get_by_label("recency").check()
    page.locator("#kv-tree-plot").get_by_text("time since last use").first.wait_for()  # redrawn by the server


def test_repetition_controls_are_visible_with_the_page_defaults(page, app_server):
    """The page shows its repetition penalty (the measured default) and n-gram ban, changeable; the status line names the KV dtype."""
    page.goto(app_server.url)
    page.get_by_text("KV:").first.wait_for()
    assert "KV: float32" in page.locator("#kv-model-status").inner_text().replace("*", "")
    penalty = page.locator("#kv-repetition-penalty input[type=number]")
    ngram = page.locator("#kv-no-repeat-ngram input[type=number]")
    assert float(penalty.input_value()) == PAGE_REPETITION_PENALTY and int(ngram.input_value()) == PAGE_NO_REPEAT_NGRAM_SIZE
    assert page.locator("#kv-repetition-penalty").get_by_text("1 is off").count() >= 1
    penalty.fill("1.5")
    penalty.press("Enter")
    page.locator("#kv-prompt textarea").fill("Name two colours. Two words, please.")
    page.locator("#kv-generate").click()
    page.locator("#kv-figures .kv-badge").wait_for()
    assert page.locator("#kv-output textarea").input_value().strip()


def test_plan_tab_uploads_a_trace_and_replays_it(page, app_server):
    """The planner tab in the browser: the file goes through /gradio_api/upload (the guard's budget, no
    upload-progress tracking), Replay draws the summary, and the CSV is offered for download."""
    page.goto(app_server.url)
    page.get_by_text("Model:").first.wait_for()
    page.get_by_role("tab", name="Plan your workload").click()
    trace = Path(__file__).resolve().parent.parent / "assets" / "traces" / "mooncake_synthetic.jsonl"
    page.locator("#kv-plan-trace input[type=file]").set_input_files(str(trace))
    page.get_by_text("mooncake_synthetic.jsonl").first.wait_for()  # uploaded: the file is listed
    page.get_by_role("button", name="Replay").click()
    page.get_by_text("bytes of KV per token").first.wait_for()
    assert "SmolLM2-135M" in page.get_by_text("bytes of KV per token").first.inner_text()
    sync_api = pytest.importorskip("playwright.sync_api")
    sync_api.expect(page.locator("#kv-plan-csv a").first).to_have_attribute("href", re.compile(r"plan\.csv$"), timeout=30_000)  # the download
