"""The page: a header that says whether requests can run, then the panels and tabs, composed.

Each panel or tab is one function in its own module that builds its components and wires its own
events (``ui/playground.py``, ``ui/tabs_scenarios.py``, ``ui/tabs_inspector.py``, ``ui/tabs_planner.py``,
``ui/tabs_api.py``); this module only composes them and gates their run
buttons. No model work and no validation here: the handlers call ``ui.service`` and ``ui.schemas``.

Why no lock/unlock chains: Gradio 6 runs a ``.then()`` only after a step that succeeded, so an
error between a "disable the buttons" step and an "enable them" step left the page with dead
buttons until a reload. The run buttons are instead enabled or disabled by one thing only, the
server's state (loading, failed, compiling the decode step, ready), polled by the header's timer;
a button cannot start its own event twice (``trigger_mode="once"``), and a session's history is
one object that concurrent events update in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import gradio as gr

from ui import backend_view, playground, tabs_api, tabs_inspector, tabs_planner, tabs_scenarios
from ui.page_context import QUICK, PageContext

TITLE = "KV cache & prefix cache, measured"
DESCRIPTION = "What KV caching and prefix caching save in LLM inference: every request shows where its time went and what came from the cache."
HEAD = (  # Gradio's template sets og:title from the title; these name the app for link previews too
    f'<meta name="description" content="{DESCRIPTION}">'
    # Gradio scopes css_paths under its container, so the page's outer boxes are sized here: on a
    # phone they may shrink to the screen (else the widest content sets the page's width).
    "<style>@media (max-width: 640px) { body, gradio-app, .gradio-container, .gradio-container > .main, .gradio-container .wrap, .gradio-container .contain"
    " { min-width: 0 !important; max-width: 100vw !important; } }</style>"
    f'<meta property="og:site_name" content="{TITLE}">'
    f'<meta property="og:description" content="{DESCRIPTION}">'
    f'<meta name="twitter:title" content="{TITLE}">'
)
SHARED_PUBLIC_WARNING = (
    "This public server shares one prefix cache among all visitors (--allow-shared-public): the time to "
    "the first token and the count of reused tokens tell anyone whether someone else sent the same "
    "prefix. Do not type anything private here."
)


def build_page(ctx: PageContext) -> gr.Blocks:
    """The whole page. Every UI event is private: scripts use the named API endpoints (``ui/tabs_api.py``)."""
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=ctx.uploads.delete_cache()) as demo:  # uploads and plan files go after a while
        header = build_header(ctx)
        play = playground.build_playground(ctx)
        with gr.Tabs(elem_id="kv-tabs"):
            scenario_button = tabs_scenarios.build_scenarios_tab(ctx)
            tabs_inspector.build_inspector_tab(ctx, demo, play)
            tabs_planner.build_plan_tab(ctx)
            tabs_api.build_api_tab(ctx)
        wire_header(ctx, demo, header, play, [*play.run_buttons, scenario_button])
        tabs_api.register_client_api(ctx)
    return demo


@dataclass
class Header:
    status: gr.Markdown
    backend_note: gr.Markdown
    timer: gr.Timer


def build_header(ctx: PageContext) -> Header:
    """The title and the model's status line (with a remote backend's note, and the shared-cache warning where it applies)."""
    gr.Markdown(
        f"# {TITLE}\n"
        "Every request shows where its time went. The **KV cache** keeps each token's keys and values so "
        "decoding does not recompute the whole sequence; the **prefix cache** keeps them *across requests*, "
        "so a prompt that starts like an earlier one skips that part of the prefill.",
        elem_id="kv-intro",
    )
    status = gr.Markdown("Loading the model…", elem_id="kv-model-status")
    backend_note = gr.Markdown(elem_id="kv-backend")  # ui/backend_view.py: a remote's URL, model, kind, limits
    if not ctx.service.settings.is_local and not ctx.service.settings.per_session:
        gr.Markdown(f"**Warning:** {SHARED_PUBLIC_WARNING}", elem_id="kv-shared-warning")
    return Header(status, backend_note, gr.Timer(1.0))


def wire_header(ctx: PageContext, demo: gr.Blocks, header: Header, play: playground.Playground, run_buttons: Sequence[gr.Button]) -> None:
    """Poll the server's state while it loads or compiles; enable the run buttons only when requests can run, else say why."""
    service = ctx.service

    def on_show_status() -> tuple:
        status = service.status()
        reason = run_blocker(status)
        info = service.backend_info()  # a remote's kind is known once it has been reached
        return (
            status_markdown(status),
            gr.Timer(active=bool(reason) and not status["error"]),
            backend_view.backend_markdown(info),
            backend_view.timing_note(info),
            gr.Markdown(f"⏳ {reason}" if reason else "", visible=bool(reason)),
            *[gr.Button(interactive=not reason) for _ in run_buttons],
            *backend_view.toggle_updates(info),
        )

    outputs = [header.status, header.timer, header.backend_note, play.timing_note, play.run_reason, *run_buttons, *play.toggles]
    header.timer.tick(on_show_status, outputs=outputs, **QUICK)
    demo.load(on_show_status, outputs=outputs, **QUICK)


def run_blocker(status: dict[str, Any]) -> str:
    """Why requests cannot run now (shown beside the disabled run buttons), or "" when they can.

    ``status`` is ``EngineService.status()``; its ``decode`` is the engine's ``decode_compile``
    block: while its state is ``compiling`` requests wait for the compile, so the page waits too.
    """
    if status["error"]:
        return f"The model could not be loaded, so nothing can run: {status['error']}"
    if not status["ready"]:
        return "Loading the model: Generate turns on when it is ready."
    decode = status.get("decode") or {}
    if decode.get("state") != "compiling":
        return ""
    elapsed, expected = decode.get("elapsed_s"), decode.get("expected_s")
    left = f"~{max(expected - elapsed, 1):.0f} s left" if isinstance(elapsed, (int, float)) and isinstance(expected, (int, float)) else "about a minute"
    return f"Compiling the decode step: {left}; requests wait for it so every answer is computed by one step."


def status_markdown(s: dict[str, Any]) -> str:
    """The header's status line from ``EngineService.status()``."""
    mode = {
        "shared": "cache mode: **shared** (everyone's prefixes are reusable: fastest, but a timing side channel)",
        "per-session": "cache mode: **per-session** (your requests only reuse your own prefixes)",
    }[s["cache_mode"]]
    if s["ready"] and s["backend"]["kind"] != "local":
        return f"**Model:** {s['model']} · **backend:** remote {s['backend']['kind']} at {s['backend']['url']} · {mode}"
    if s["ready"]:
        weights = f" · {s['weights']} · **decode:** {s['decode']['description']}" if s.get("weights") else ""
        return f"**Model:** {s['model']} · {s['parameters'] / 1e6:,.0f}M parameters · **device:** {s['device']} ({s['dtype']}){weights} · **KV:** {s['kv_dtype']} · context {s['context_length']:,} tokens · {mode}"
    if s["error"]:
        return f"**The model could not be loaded:** {s['error']}"
    lines = "\n".join(f"- {line}" for line in s["progress"]) or "- starting…"
    return f"**Loading the model…** ({mode})\n\n{lines}"
