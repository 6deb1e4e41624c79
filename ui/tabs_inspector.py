"""The "Inspector" tab (the cache inspector): the cache's stats, the requests running now, the cache's entries as a table and as a radix-tree icicle, Refresh and Clear.

It also answers the playground's Pin and Unpin buttons, whose outcome is what the inspector shows.

Builds its components and wires its own events; it also refreshes after the playground's events
that change the cache (``Playground.cache_changed``) and whenever the tab is opened (a plot drawn
while its tab was hidden has no width to measure, and would render at half width).
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from engine.snapshot import status_line as snapshot_line
from ui import backend_view, charts
from ui.page_context import PRIVATE, QUICK, PageContext, ui_errors
from ui.playground import Playground
from ui.schemas import UnpinBody, WarmBody, parse_body


def build_inspector_tab(ctx: PageContext, demo: gr.Blocks, play: Playground) -> None:
    """The tab; call inside ``gr.Tabs()``."""
    with gr.Tab("Inspector", elem_id="kv-inspector-tab") as tab:
        cache_stats = gr.Markdown(elem_id="kv-cache-stats")
        with gr.Row():
            refresh_button = gr.Button("Refresh", size="sm", elem_id="kv-refresh")
            clear_button = gr.Button("Clear cache", size="sm", variant="stop", elem_id="kv-clear")
        running_note = gr.Markdown(elem_id="kv-running-note")
        running_table = gr.DataFrame(
            value=charts.running_frame([]),
            label="Running now, in tokens: the same letter, the same cached prefix",
            interactive=False,
            max_height=300,
            elem_id="kv-running-table",
        )
        tree_colour = gr.Radio(list(charts.TREE_COLOURS), value="hits", label="Tree colour", info="hits, or time since last use", elem_id="kv-tree-colour")
        cache_tree = gr.Plot(charts.tree_figure([]), show_label=False, elem_id="kv-tree-plot")
        cache_table = gr.DataFrame(
            label="Cached entries (radix-tree nodes), newest first",
            interactive=False,
            wrap=True,
            max_height=420,
            elem_id="kv-cache-table",
        )
    inspect = _inspector(ctx)

    def on_clear(state: charts.SessionHistory, colour: Any, request: gr.Request) -> tuple:
        _check_colour(colour)  # before any work
        with ui_errors():
            outcome = ctx.service.clear(ctx.session_of(request))
        gr.Info(outcome["message"])
        return inspect(state, colour, request)

    inputs, outputs = [play.history, tree_colour], [cache_stats, cache_table, cache_tree]
    on_pin, on_unpin = _pins(ctx, inspect)
    play.pin_button.click(on_pin, inputs=[play.system_prompt, *inputs], outputs=outputs, trigger_mode="once", **PRIVATE)
    play.unpin_button.click(on_unpin, inputs=[play.system_prompt, *inputs], outputs=outputs, trigger_mode="once", **PRIVATE)
    refreshes = (demo.load, refresh_button.click, tab.select, *(event.then for event in play.cache_changed))
    for trigger in (*refreshes, tree_colour.change):
        trigger(inspect, inputs=inputs, outputs=outputs, **QUICK)
    clear_button.click(on_clear, inputs=inputs, outputs=outputs, **QUICK)
    on_running = _running(ctx)
    for trigger in refreshes:  # an event of its own on the same refreshes: the inspector's answer keeps its three parts
        trigger(on_running, outputs=[running_note, running_table], **QUICK)


def _inspector(ctx: PageContext):
    service = ctx.service

    def on_inspect(state: charts.SessionHistory, colour: Any, request: gr.Request) -> tuple[str, Any, Any]:
        _check_colour(colour)
        if not service.ready:
            reason = service.not_ready_reason()
            return reason[:1].upper() + reason[1:] + ".", charts.inspector_frame([]), charts.tree_figure([], colour)
        session = ctx.session_of(request)
        rows = service.entries(session, state.owned_by(session.key).sequences)
        stats = service.stats(session)
        markdown = charts.stats_markdown(stats) if stats.get("budget_bytes") is not None else backend_view.remote_stats_markdown(stats)
        markdown += f"\n\n{snapshot_line(stats['snapshot'])}" if stats.get("snapshot") else ""
        return markdown, charts.inspector_frame(rows), charts.tree_figure(rows, colour)

    return on_inspect


def _running(ctx: PageContext):
    """The "Running now" table: what the session's inspector may see running (``EngineService.running``), grouped by cached prefix."""
    service = ctx.service

    def on_running(request: gr.Request) -> tuple[str, Any]:
        if not service.ready:
            return "", charts.running_frame([])
        rows = service.running(ctx.session_of(request))
        return charts.running_summary(rows, service.backend_info().reason_unavailable("running")), charts.running_frame(rows)

    return on_running


def _pins(ctx: PageContext, inspect):
    """Pin and Unpin the playground's system prompt in this session's namespace; a message says what happened, the inspector shows it."""
    service = ctx.service

    def on_pin(system: Any, state: charts.SessionHistory, colour: Any, request: gr.Request) -> tuple:
        _check_colour(colour)  # before any work
        session = ctx.session_of(request)
        with ui_errors():
            body = parse_body({"system_prompt": None if system in (None, "") else system, "pin": True}, WarmBody)
            done = service.warm(session, body.message_dicts(), pin=True, ttl_s=body.ttl_s)
        gr.Info(_warm_message(done))
        return inspect(state, colour, request)

    def on_unpin(system: Any, state: charts.SessionHistory, colour: Any, request: gr.Request) -> tuple:
        _check_colour(colour)  # before any work
        session = ctx.session_of(request)
        with ui_errors():
            body = parse_body({"system_prompt": None if system in (None, "") else system}, UnpinBody)
            done = service.unpin(session, body.message_dicts())
        (gr.Info if done["unpinned"] else gr.Warning)(done["message"])
        return inspect(state, colour, request)

    return on_pin, on_unpin


def _warm_message(done: dict[str, Any]) -> str:
    pinned = f", pinned ({done['pinned_bytes'] / 2**10:,.0f} KiB" + (f", {done['expires_in_s']:,.0f} s without a hit)" if done.get("expires_in_s") else ")") if done["pinned"] else ""
    return f"Warmed {done['tokens']} tokens ({done['prefilled']} prefilled, {done['reused']} already cached){pinned}."


def _check_colour(colour: Any) -> None:
    """The tree view's colour control, as any caller of an inspector event may send it."""
    if colour not in charts.TREE_COLOURS:
        raise gr.Error(f"tree colour: pick one of {', '.join(charts.TREE_COLOURS)}")
