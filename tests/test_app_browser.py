"""The page in a real browser: Playwright drives Debian's Chromium as a visitor would, at 1400 px and at 390 px.

Every wait is on the page's own state (a badge, a changed text, an enabled button), never on elapsed
time, so a loaded machine makes a test slower, not red. Every test fails on a console error.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
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
DESKTOP = {"width": 1400, "height": 1500}
PHONE = {"width": 390, "height": 844}
SCREENSHOTS = Path(__file__).resolve().parent.parent / "test-output"
WAIT_MS = 180_000  # a ceiling for a stuck page, not a pace: every wait ends when the page shows its state
SYSTEM = (  # over two of the prefill's 32-token chunks, so an edit after them is a partial hit
    "You are a patient librarian at a small public library in a seaside town. You know the catalogue well, "
    "you speak plainly, and you suggest one book when it helps. Answer in two sentences."
)
TABS = ("Scenarios", "Inspector", "Planner", "API")


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
def browser(chromium):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _checked_page(browser, viewport: dict):
    """A fresh page that records console errors and uncaught exceptions; the test fails on any."""
    context = browser.new_context(viewport=viewport)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("console", lambda message: errors.append(f"console: {message.text}") if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(f"page error: {error}"))
    yield page
    context.close()
    assert not errors, errors


@pytest.fixture
def page(browser):
    yield from _checked_page(browser, DESKTOP)


@pytest.fixture
def phone(browser):
    yield from _checked_page(browser, PHONE)


# ---------------------------------------------------------------------- steps a visitor takes


def open_page(page, url: str, max_new_tokens: int = 16) -> None:
    """Open the page, wait until Generate is enabled (the model is ready), and ask for short answers (a loaded machine stays quick)."""
    page.goto(url)
    page.locator("#kv-generate:not([disabled])").wait_for()
    tokens = page.locator("#kv-max-new-tokens input[type=number]")
    tokens.fill(str(max_new_tokens))
    tokens.press("Enter")


def generate(page, prompt: str, system: str = "", button: str = "#kv-generate") -> str:
    """Type, press, and wait for this request's figures (they change only when a request ends); the status badge's words."""
    page.locator("#kv-system textarea").fill(system)
    page.locator("#kv-prompt textarea").fill(prompt)
    figures = page.locator("#kv-figures")
    before = figures.inner_text()
    page.locator(button).click()
    page.wait_for_function("([el, before]) => el.querySelector('.kv-badge') && el.innerText !== before", arg=[figures.element_handle(), before])
    return page.locator("#kv-figures .kv-badge").inner_text()


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()
    page.locator(f"[role=tab][aria-selected=true]:has-text('{name}')").wait_for()


def no_sideways_scroll(page) -> int:
    return page.evaluate("document.documentElement.scrollWidth")


# ---------------------------------------------------------------------- the playground


def test_generate_draws_figures_charts_and_the_verdict(page, app_server):
    """A miss, then the same prompt again: the hit's verdict names its ratio to the miss; the charts draw both panels."""
    open_page(page, app_server.url)
    assert page.title() == "KV cache & prefix cache, measured"
    generate(page, "What is a KV cache? Answer in one sentence, please.", SYSTEM)
    assert page.locator("#kv-output textarea").input_value().strip()
    assert page.locator("#kv-figures .kv-card").count() == 5
    page.locator("#kv-tokens").get_by_text("computed").first.wait_for()
    assert generate(page, "What is a KV cache? Answer in one sentence, please.", SYSTEM) == "hit"
    verdict = page.locator("#kv-verdict").inner_text()
    assert re.search(r"This request reused (\d+) of \1 prompt tokens: first token [\d,.]+× sooner than #\d+", verdict), verdict
    for plot, title in (("#kv-latency-plot", "Time to first token"), ("#kv-hits-plot", "Running hit rate")):
        page.locator(plot).get_by_text(title).first.wait_for()
    page.locator("#kv-latency-plot").get_by_text("below #").first.wait_for()  # the ratio annotation on the hit
    page.locator("#kv-batch-plot").get_by_text("Requests in each decode step of #2").first.wait_for()  # the hit's decode steps, drawn
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "app.png"), full_page=True)


def test_an_error_leaves_every_button_working(page, app_server):
    """An empty prompt shows the validation message; Generate, Verify and Reset still work afterwards (no dead buttons)."""
    open_page(page, app_server.url)
    page.locator("#kv-prompt textarea").fill("")
    page.locator("#kv-generate").click()
    page.get_by_text("prompt: String should have at least 1 character").first.wait_for()
    page.locator("#kv-verify").click()  # a second error, from the other button
    page.get_by_text("prompt: String should have at least 1 character").nth(1).wait_for()
    assert generate(page, "Name one prime number. The number only, please.", button="#kv-verify") in ("miss", "hit", "partial")
    page.locator("#kv-explanation").get_by_text("verified identical").first.wait_for()
    page.locator("#kv-reset").click()
    page.locator("#kv-figures").get_by_text("Generate to see").wait_for()
    assert generate(page, "Name one more prime number. The number only.") in ("miss", "hit", "partial")


def test_the_inspector_open_on_an_empty_cache_does_not_freeze_the_page(page, app_server):
    """The freeze: inspector open, cache cleared, then Generate. The tree goes from empty to drawn, and the page keeps updating:
    a second Generate answers, and an example still fills the prompt."""
    open_page(page, app_server.url)
    open_tab(page, "Inspector")
    page.locator("#kv-clear").click()
    page.locator("#kv-tree-plot").get_by_text("The cache is empty").first.wait_for()
    generate(page, "Name a colour of the sky. One word, please.")
    page.locator("#kv-tree-plot g.iciclelayer g.slice").nth(1).wait_for()  # a node beside the root: the tree was redrawn
    generate(page, "Name a colour of grass. One word, please.")
    page.locator("#kv-tree-plot").get_by_text("colour: hits").first.wait_for()
    page.locator("#kv-tree-colour").get_by_label("recency").check()
    page.locator("#kv-tree-plot").get_by_text("time since last use").first.wait_for()  # redrawn by the server
    page.locator("#kv-clear").click()
    page.locator("#kv-tree-plot").get_by_text("The cache is empty").first.wait_for()  # and back to empty
    page.get_by_text("Write a haiku about caching.").first.click()  # an example fills the prompt
    page.wait_for_function("() => document.querySelector('#kv-prompt textarea').value.includes('haiku')")
    open_tab(page, "Scenarios")  # a tree drawn while its tab was hidden rendered at half width: opening the tab redraws it
    generate(page, "Name a colour of snow. One word, please.")
    open_tab(page, "Inspector")
    page.locator("#kv-tree-plot g.iciclelayer g.slice").nth(1).wait_for()
    page.wait_for_function("""() => { const plot = document.querySelector('#kv-tree-plot .js-plotly-plot');
        const svg = plot && plot.querySelector('.main-svg'); return svg && svg.getBoundingClientRect().width > 0.9 * plot.getBoundingClientRect().width; }""")


def test_kv_cache_off_has_its_own_badge_and_turning_it_back_on_hits_again(page, app_server):
    """KV off: the prefix box unticks and locks, the badge says "no KV cache" and the verdict its cost per token.
    KV on again: the prefix box is ticked again, so the same prompt hits."""
    open_page(page, app_server.url)
    prompt = "Say the word 'lighthouse' and nothing else."
    generate(page, prompt, SYSTEM)
    page.locator("#kv-use-cache input").uncheck()
    prefix = page.locator("#kv-use-prefix input")
    page.wait_for_function("el => !el.checked && el.disabled", arg=prefix.element_handle())
    assert generate(page, prompt, SYSTEM) == "no KV cache"
    assert "No KV cache: every one of the" in page.locator("#kv-verdict").inner_text()
    page.locator("#kv-use-cache input").check()
    page.wait_for_function("el => el.checked && !el.disabled", arg=prefix.element_handle())
    assert generate(page, prompt, SYSTEM) == "hit"


def test_repetition_controls_are_visible_with_the_page_defaults(page, app_server):
    """The page shows its repetition penalty (the measured default) and n-gram ban, changeable; the status line names the KV dtype."""
    open_page(page, app_server.url)
    assert "KV: float32" in page.locator("#kv-model-status").inner_text().replace("*", "")
    penalty = page.locator("#kv-repetition-penalty input[type=number]")
    ngram = page.locator("#kv-no-repeat-ngram input[type=number]")
    assert float(penalty.input_value()) == PAGE_REPETITION_PENALTY and int(ngram.input_value()) == PAGE_NO_REPEAT_NGRAM_SIZE
    assert page.locator("#kv-repetition-penalty").get_by_text("1 is off").count() >= 1
    penalty.fill("1.5")
    penalty.press("Enter")
    generate(page, "Name two colours. Two words, please.")
    assert page.locator("#kv-output textarea").input_value().strip()


# ---------------------------------------------------------------------- the tabs


def test_planner_replays_a_sample_trace_and_marks_the_knee(page, app_server):
    """No file at hand: a bundled sample replays, the chart is in the trace's unit with the knee starred, the peak in MiB/GiB."""
    open_page(page, app_server.url)
    open_tab(page, "Planner")
    page.locator("#kv-plan-source input").click()
    page.get_by_role("option", name="mooncake synthetic").click()
    page.locator("#kv-plan-run").click()
    page.locator("#kv-plan-summary").get_by_text("bytes of KV per token").first.wait_for()
    page.locator("#kv-plan-chart").get_by_text("knee:").first.wait_for()
    assert "log scale" in page.locator("#kv-plan-chart").inner_text()
    assert re.search(r"\d (KiB|MiB|GiB)", page.locator("#kv-plan-table").inner_text())
    page.locator("#kv-plan-csv a").first.wait_for()


def test_planner_uploads_a_trace_and_replays_it(page, app_server):
    """An upload goes through /gradio_api/upload (no progress polling: no 404 in the console), takes over from the sample, replays, and offers the CSV; Replay with
    "my upload" and no file is a hint, not an error on every panel."""
    open_page(page, app_server.url)
    open_tab(page, "Planner")
    page.locator("#kv-plan-source input").click()
    page.get_by_role("option", name="my upload").click()
    page.locator("#kv-plan-run").click()
    page.get_by_text("Upload a JSONL trace first").first.wait_for()
    assert page.locator("#kv-plan-tab .error").count() == 0
    trace = Path(__file__).resolve().parent.parent / "assets" / "traces" / "shared_system_prompt.jsonl"
    with page.expect_file_chooser() as chooser:
        page.locator("#kv-plan-trace").click()
    chooser.value.set_files(str(trace))
    page.locator("#kv-plan-uploaded").get_by_text("Uploaded:").wait_for()  # the page says what arrived
    assert page.locator("#kv-plan-source input").input_value() == "my upload"
    page.locator("#kv-plan-run").click()
    page.locator("#kv-plan-summary").get_by_text("SmolLM2-135M").first.wait_for()
    sync_api = pytest.importorskip("playwright.sync_api")
    sync_api.expect(page.locator("#kv-plan-csv a").first).to_have_attribute("href", re.compile(r"plan\.csv$"))


def test_api_docs_name_every_parameter_and_the_page_names_the_app(app_server):
    """Gradio's API page reads its parameters and answers from the endpoints' docstrings; the HTML names the app."""
    info = httpx.get(app_server.url + "/gradio_api/info", timeout=30).json()["named_endpoints"]
    generate_info = info["/generate"]
    names = [p["parameter_name"] for p in generate_info["parameters"]]
    assert names[:3] == ["prompt", "system_prompt", "max_new_tokens"]
    assert all(p["label"] == p["parameter_name"] and p["python_type"]["description"] for p in generate_info["parameters"]), generate_info["parameters"]
    assert "cache_status" in generate_info["returns"][0]["python_type"]["description"]
    assert all(p["python_type"]["description"] for endpoint in info.values() for p in endpoint["parameters"]), "an endpoint parameter without words"
    html = httpx.get(app_server.url + "/", timeout=30).text
    assert 'og:title" content="KV cache &amp; prefix cache, measured"' in html or 'og:title" content="KV cache & prefix cache, measured"' in html


# ---------------------------------------------------------------------- a phone


def test_phone_one_column_no_sideways_scroll_and_every_tab_in_reach(phone, app_server):
    """At 390×844: nothing wider than the screen on any tab, every tab shown in the strip, the Output right under Generate."""
    open_page(phone, app_server.url)
    assert no_sideways_scroll(phone) <= PHONE["width"]
    generate(phone, "What is a KV cache? One sentence.")
    button, output = phone.locator("#kv-generate").bounding_box(), phone.locator("#kv-output").bounding_box()
    assert 0 <= output["y"] - (button["y"] + button["height"]) < 250, (button, output)  # under it, not a screen away
    latency, hits = phone.locator("#kv-latency-plot").bounding_box(), phone.locator("#kv-hits-plot").bounding_box()
    assert hits["y"] >= latency["y"] + latency["height"] - 1  # the charts are stacked
    phone.locator("#kv-batch-plot .js-plotly-plot").wait_for()
    batch = phone.locator("#kv-batch-plot").bounding_box()
    assert latency["y"] + latency["height"] - 1 <= batch["y"] < hits["y"]  # the batch sizes right under the decode panel
    assert [t.inner_text().strip() for t in phone.get_by_role("tab").all()] == list(TABS)
    for name in TABS:
        open_tab(phone, name)
        assert no_sideways_scroll(phone) <= PHONE["width"], name


# ---------------------------------------------------------------------- while the model loads and the decode step compiles


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def gated_app(tiny_engine, monkeypatch):
    """The page served in this process over the tiny engine, whose load waits for ``loaded`` and whose decode
    step reports "compiling" (with elapsed and expected seconds) until the test says it compiled."""
    import gradio as gr
    import uvicorn
    from fastapi import FastAPI

    from ui.page import HEAD, build_page
    from ui.page_context import PageContext
    from ui.planner import Planner
    from ui.security import UploadBudget
    from ui.service import EngineService
    from ui.sessions import SessionIssuer
    from ui.settings import AppSettings

    loaded = threading.Event()
    compile_state = {"state": "compiling", "description": "compiling", "compile_seconds": None, "reason": None, "elapsed_s": 20.0, "expected_s": 62.0}
    monkeypatch.setattr(tiny_engine.compiler, "status", lambda: dict(compile_state))
    service = EngineService(AppSettings(), loader=lambda *args, **kwargs: loaded.wait(WAIT_MS / 1000) and tiny_engine)
    service.start_loading()
    demo = build_page(PageContext(service, SessionIssuer(secure_cookie=False), Planner(lambda: service.engine.chat), UploadBudget(2**24, 60)))
    app = gr.mount_gradio_app(FastAPI(), demo.queue(default_concurrency_limit=None), path="/", css_paths=[Path("assets/style.css").resolve()], head=HEAD, ssr_mode=False)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="gated-app", daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the in-process app did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", loaded, compile_state
    loaded.set()
    server.should_exit = True
    thread.join(15)


def test_generate_waits_for_the_model_and_the_compile_with_the_reason_shown(page, gated_app):
    """Loading: Generate disabled, the reason beside it. Compiling: still disabled, with the time left. Ready: enabled, and it answers."""
    url, loaded, compile_state = gated_app
    page.goto(url)
    reason = page.locator("#kv-run-reason")
    reason.get_by_text("Loading the model").wait_for()
    for button in ("#kv-generate", "#kv-verify", "#kv-pin", "#kv-scenario-run"):
        assert page.locator(button).is_disabled(), button
    loaded.set()
    reason.get_by_text("Compiling the decode step: ~42 s left; requests wait for it").wait_for()
    assert page.locator("#kv-generate").is_disabled()
    compile_state.update(state="compiled", description="compiled in 62 s", compile_seconds=62.0)
    page.locator("#kv-generate:not([disabled])").wait_for()
    assert not reason.is_visible() or not reason.inner_text().strip()
    assert generate(page, "Hello there.") in ("miss", "hit", "partial", "skipped")


def test_a_model_that_cannot_load_is_named_and_generate_stays_off(page, tmp_path):
    """No usable model (bundled one missing, hub unreachable, or a broken folder): the page says so and nothing can be pressed in vain."""
    from tests.conftest import launch_app, stop_app

    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    server = launch_app(tmp_path, "--model", str(broken), expect_load_error=True)
    try:
        page.goto(server.url)
        page.locator("#kv-model-status").get_by_text("The model could not be loaded").wait_for()
        page.locator("#kv-run-reason").get_by_text("nothing can run").wait_for()
        assert page.locator("#kv-generate").is_disabled() and page.locator("#kv-verify").is_disabled()
    finally:
        stop_app(server)
