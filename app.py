"""The web app: a Gradio page and a REST API, on one port, showing what KV and prefix caching save.

Builds the page (playground, charts, token highlights, scenarios, cache inspector) and the routes
(REST under /generate and /cache/*, gradio_client endpoints /generate, /cache_stats, /clear_cache),
and calls the engine through ``ui.service``. Everything else lives in ``ui/``: settings, the served
engine and its isolation rules, request bodies, figures and scenarios. Nothing imports this file.

    python app.py [--host 127.0.0.1] [--port 7860] [--model ID] [--cache-budget-mb 512] [--cache-mode shared|per-session]
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import gradio as gr
import uvicorn
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from engine import GenerationResult
from ui import charts
from ui.scenarios import load_examples, load_scenarios, run_scenario
from ui.schemas import MAX_BODY_BYTES, MAX_NEW_TOKENS, BadRequest, GenerateBody, parse_body
from ui.service import Busy, EngineService, NotReady
from ui.settings import parse_settings

ASSETS = Path(__file__).resolve().parent / "assets"
SESSION_HEADER = "X-Session-Id"
MAX_SESSION_ID = 200


def build_demo(service: EngineService) -> gr.Blocks:
    """The page. Every UI event is private: scripts use the named API endpoints at the end."""
    scenarios = load_scenarios()
    private = dict(api_visibility="private")
    quick = dict(api_visibility="private", queue=False)  # no model work: never waits behind a generation

    with gr.Blocks(title="KV cache & prefix cache, measured", analytics_enabled=False) as demo:
        history = gr.State(charts.SessionHistory())

        gr.Markdown(
            "# KV cache & prefix cache, measured\n"
            "Every request shows where its time went. The **KV cache** keeps each token's keys and values so "
            "decoding does not recompute the whole sequence; the **prefix cache** keeps them *across requests*, "
            "so a prompt that starts like an earlier one skips that part of the prefill.",
            elem_id="kv-intro",
        )
        status = gr.Markdown("Loading the model…", elem_id="kv-model-status")

        with gr.Row(equal_height=False):
            with gr.Column(scale=5):
                system_prompt = gr.Textbox(label="System prompt", lines=3, placeholder="Optional. A long one shared by several requests is what the prefix cache saves.")
                prompt = gr.Textbox(label="Prompt", lines=2, placeholder="Ask something…", elem_id="kv-prompt")
                with gr.Row():
                    use_cache = gr.Checkbox(value=True, label="KV cache", info="reuse keys/values while decoding")
                    use_prefix_cache = gr.Checkbox(value=True, label="Prefix cache", info="reuse KV across requests")
                with gr.Row():
                    max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS, value=48, step=1, label="Max new tokens")
                    temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature", info="0 is greedy")
                generate_button = gr.Button("Generate", variant="primary", elem_id="kv-generate")
                gr.Examples(load_examples(), inputs=[system_prompt, prompt], label="Examples")
            with gr.Column(scale=4):
                output = gr.Textbox(label="Output", lines=6, interactive=False, elem_id="kv-output")
                figures = gr.HTML(charts.empty_figures_html(), elem_id="kv-figures")
                tokens = gr.HighlightedText(
                    label="Prompt tokens: cached (green) vs computed (orange)",
                    color_map=charts.TOKEN_COLORS,
                    show_legend=True,
                    combine_adjacent=False,
                    elem_id="kv-tokens",
                )

        with gr.Row(equal_height=True):
            latency_plot = gr.Plot(charts.latency_figure([]), show_label=False, elem_id="kv-latency-plot")
            hits_plot = gr.Plot(charts.hit_history_figure([]), show_label=False, elem_id="kv-hits-plot")
        reset_button = gr.Button("Reset chart history", size="sm", variant="secondary")

        with gr.Tabs():
            with gr.Tab("Scenarios"):
                gr.Markdown(
                    "One click runs a scenario twice, with the prefix cache **off** and then **on** (KV cache on in both), "
                    "and charts the difference. Each run starts from a cold cache of its own, dropped afterwards."
                )
                with gr.Row():
                    scenario_name = gr.Dropdown(list(scenarios), value=next(iter(scenarios)), label="Scenario", scale=3)
                    scenario_button = gr.Button("Run off vs on", variant="primary", scale=1)
                scenario_about = gr.Markdown(next(iter(scenarios.values())).description)
                scenario_progress = gr.Markdown()
                scenario_plot = gr.Plot(charts.scenario_figure([], [], "Prefix cache off vs on"), show_label=False)
            with gr.Tab("Cache inspector"):
                cache_stats = gr.Markdown()
                cache_table = gr.DataFrame(
                    label="Cached entries (radix-tree nodes), newest first",
                    interactive=False,
                    wrap=True,
                    max_height=420,
                    column_widths=["7%", "8%", "8%", "7%", "10%", "7%", "7%", "46%"],
                )
                with gr.Row():
                    refresh_button = gr.Button("Refresh", size="sm")
                    clear_button = gr.Button("Clear cache", size="sm", variant="stop")
            with gr.Tab("API"):
                gr.Markdown(_api_help(service))

        # ---- handlers: thin; the work is in ui/ and the engine

        def on_show_status() -> tuple[str, gr.Timer]:
            return _status_markdown(service), gr.Timer(active=not (service.ready or service.load_error))

        def on_generate(system: str, text: str, kv: bool, prefix: bool, max_tokens: float, temp: float, state: charts.SessionHistory, request: gr.Request):
            namespace = service.namespace_for(_gradio_session(request))
            with _ui_errors():  # the engine validates: its ValueError message is what the page shows
                stream = service.stream(namespace, **_ui_request(text, system, max_tokens, kv, prefix, temp))
            skip = [gr.skip()] * 5
            produced, result = "", None
            with _ui_errors():
                for item in stream:
                    if isinstance(item, GenerationResult):
                        result = item
                    else:
                        produced += item
                        yield produced, *skip
            state.add(result)
            yield (
                result.text,
                charts.figures_html(result),
                charts.token_highlights(result, service.engine.decode),
                charts.latency_figure(state.records),
                charts.hit_history_figure(state.records),
                state,
            )

        def on_inspect(state: charts.SessionHistory, request: gr.Request) -> tuple[str, Any]:
            if not service.ready:
                return "The model is still loading.", None
            namespace = service.namespace_for(_gradio_session(request))
            rows = service.entries(namespace, state.sequences)
            return charts.stats_markdown(service.stats(namespace)), charts.inspector_frame(rows)

        def on_clear(state: charts.SessionHistory, request: gr.Request) -> tuple[str, Any]:
            with _ui_errors():
                outcome = service.clear(service.namespace_for(_gradio_session(request)))
            gr.Info(outcome["message"])
            return on_inspect(state, request)

        def on_reset_charts(state: charts.SessionHistory):
            state.reset_charts()
            return charts.latency_figure([]), charts.hit_history_figure([]), charts.empty_figures_html(), None, state

        def on_run_selected_scenario(name: str, state: charts.SessionHistory, request: gr.Request):
            scenario = scenarios[name]
            off: list[charts.RequestRecord] = []
            on: list[charts.RequestRecord] = []
            total = 2 * len(scenario.prompts)
            with _ui_errors():
                for step in run_scenario(service, scenario, service.namespace_for(_gradio_session(request))):
                    record = state.add(step.result, label=f"{name}, prefix cache {step.phase}", own_sequence=False)
                    (off if step.phase == "off" else on).append(record)
                    done = len(off) + len(on)
                    yield (
                        f"Ran {done} of {total} requests (prefix cache {step.phase}, question {step.index + 1})…\n\n{charts.scenario_summary(off, on)}",
                        charts.scenario_figure(off, on, f"{name}: TTFT, prefix cache off vs on"),
                        charts.latency_figure(state.records),
                        charts.hit_history_figure(state.records),
                        state,
                    )

        # ---- events

        timer = gr.Timer(1.0)
        timer.tick(on_show_status, outputs=[status, timer], **quick)
        demo.load(on_show_status, outputs=[status, timer], **quick)
        demo.load(on_inspect, inputs=history, outputs=[cache_stats, cache_table], **quick)
        use_cache.change(lambda kv, prefix: prefix and kv, inputs=[use_cache, use_prefix_cache], outputs=use_prefix_cache, **quick)
        gen_inputs = [system_prompt, prompt, use_cache, use_prefix_cache, max_new_tokens, temperature, history]
        gen_outputs = [output, figures, tokens, latency_plot, hits_plot, history]
        # One run at a time per page: two events of a session each get their own copy of the
        # history state, and the one finishing last would drop the other's records.
        run_buttons = [generate_button, scenario_button, reset_button]
        lock = dict(fn=lambda: [gr.Button(interactive=False)] * len(run_buttons), outputs=run_buttons, **quick)
        unlock = dict(fn=lambda: [gr.Button(interactive=True)] * len(run_buttons), outputs=run_buttons, **quick)
        generate_button.click(**lock).then(
            on_generate, inputs=gen_inputs, outputs=gen_outputs, show_progress_on=output, **private
        ).then(**unlock).then(on_inspect, inputs=history, outputs=[cache_stats, cache_table], **quick)
        refresh_button.click(on_inspect, inputs=history, outputs=[cache_stats, cache_table], **quick)
        clear_button.click(on_clear, inputs=history, outputs=[cache_stats, cache_table], **quick)
        reset_button.click(on_reset_charts, inputs=history, outputs=[latency_plot, hits_plot, figures, tokens, history], **quick)
        scenario_name.change(lambda name: scenarios[name].description, inputs=scenario_name, outputs=scenario_about, **quick)
        scenario_button.click(**lock).then(
            on_run_selected_scenario,
            inputs=[scenario_name, history],
            outputs=[scenario_progress, scenario_plot, latency_plot, hits_plot, history],
            show_progress_on=scenario_progress,
            **private,
        ).then(**unlock).then(on_inspect, inputs=history, outputs=[cache_stats, cache_table], **quick)

        # ---- the gradio_client API: /generate, /cache_stats, /clear_cache

        def api_generate(
            prompt: str,
            system_prompt: str | None = None,
            max_new_tokens: int = 64,
            use_cache: bool = True,
            use_prefix_cache: bool = True,
            temperature: float = 0.0,
            top_p: float = 1.0,
            seed: int | None = None,
            request: gr.Request = None,
        ) -> dict:
            """Generate a reply; returns the engine's response (text, token_ids, cache_status, timings, ...)."""
            raw = dict(prompt=prompt, system_prompt=system_prompt, max_new_tokens=max_new_tokens, use_cache=use_cache, use_prefix_cache=use_prefix_cache, temperature=temperature, top_p=top_p, seed=seed)
            with _ui_errors():
                body = parse_body(raw)
                return service.generate(service.namespace_for(_gradio_session(request)), **body.engine_kwargs()).to_dict()

        def api_cache_stats(request: gr.Request = None) -> dict:
            """Prefix-cache statistics for this client's scope (its own namespace in per-session mode)."""
            with _ui_errors():
                return service.stats(service.namespace_for(_gradio_session(request)))

        def api_clear_cache(request: gr.Request = None) -> dict:
            """Clear this client's namespace (or the whole cache, for a local shared-mode app)."""
            with _ui_errors():
                return service.clear(service.namespace_for(_gradio_session(request)))

        gr.api(api_generate, api_name="generate")
        gr.api(api_cache_stats, api_name="cache_stats", concurrency_limit=None)
        gr.api(api_clear_cache, api_name="clear_cache", concurrency_limit=None)
    return demo


def build_rest(service: EngineService) -> FastAPI:
    """REST routes; defined before Gradio is mounted at "/" so they take precedence."""
    api = FastAPI(title="kv-cache-inference", description="KV cache and prefix cache, measured.", docs_url="/docs", redoc_url=None)

    @api.post(
        "/generate",
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": GenerateBody.model_json_schema()}}}},
    )
    async def rest_generate(request: Request) -> JSONResponse:
        """Generate a reply. Body: GenerateBody. 422 for an invalid body, 400 when the engine refuses the input."""
        raw = await _read_capped(request, MAX_BODY_BYTES)
        if raw is None:
            return _error(413, f"the request body is over the limit of {MAX_BODY_BYTES // 1024} KiB; send a shorter prompt")
        try:
            body = parse_body(raw)
        except BadRequest as exc:
            return _error(422, str(exc))
        namespace = service.namespace_for(_rest_session(request))
        try:
            result = await run_in_threadpool(service.generate, namespace, **body.engine_kwargs())
        except (NotReady, Busy) as exc:
            return _error(503, str(exc))
        except ValueError as exc:
            return _error(400, str(exc))
        return JSONResponse(result.to_dict())

    @api.get("/cache/stats")
    def rest_cache_stats(request: Request) -> JSONResponse:
        """Prefix-cache statistics for this client's scope."""
        try:
            return JSONResponse(service.stats(service.namespace_for(_rest_session(request))))
        except NotReady as exc:
            return _error(503, str(exc))

    @api.post("/cache/clear")
    def rest_cache_clear(request: Request) -> JSONResponse:
        """Clear this client's namespace (or everything, for a local shared-mode app); 403 where not allowed."""
        try:
            outcome = service.clear(service.namespace_for(_rest_session(request)))
        except NotReady as exc:
            return _error(503, str(exc))
        return JSONResponse(outcome, status_code=403 if outcome["cleared"] == "nothing" else 200)

    @api.get("/health")
    def health() -> dict:
        """Whether the model is loaded, the loading progress, and the cache mode."""
        return service.status()

    return api


def main() -> None:
    settings = parse_settings()
    service = EngineService(settings)
    service.start_loading()
    app = gr.mount_gradio_app(
        build_rest(service),
        build_demo(service).queue(default_concurrency_limit=settings.concurrency, max_size=settings.max_queue),
        path="/",
        theme=gr.themes.Soft(primary_hue="emerald", secondary_hue="slate"),
        css_paths=[ASSETS / "style.css"],
        ssr_mode=False,
        server_name=settings.host,
        server_port=settings.port,
    )
    print(f"Serving on http://{settings.host}:{settings.port} (prefix cache: {settings.cache_mode})", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", timeout_graceful_shutdown=3)


# ---------------------------------------------------------------------- helpers


@contextmanager
def _ui_errors() -> Iterator[None]:
    """Turn the caller's bad input (and a busy or loading server) into a gr.Error with the message."""
    try:
        yield
    except (ValueError, NotReady, Busy) as exc:
        raise gr.Error(str(exc)) from None


def _ui_request(prompt: str, system_prompt: str, max_new_tokens: float, use_cache: bool, use_prefix_cache: bool, temperature: float) -> dict:
    return dict(
        prompt=prompt or "",  # None (a cleared box) is empty: the engine says so
        system_prompt=system_prompt or None,
        max_new_tokens=int(max_new_tokens),
        use_cache=bool(use_cache),
        use_prefix_cache=bool(use_prefix_cache),
        temperature=float(temperature),
    )


async def _read_capped(request: Request, limit: int) -> bytes | None:
    """The body, or None when it is (or declares itself) longer than ``limit`` bytes; never reads past it."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _rest_session(request: Request) -> str:
    """A REST client's session: its X-Session-Id header, else its address."""
    given = request.headers.get(SESSION_HEADER, "").strip()
    if given:
        return "header:" + given[:MAX_SESSION_ID]
    return "address:" + (request.client.host if request.client else "unknown")


def _gradio_session(request: gr.Request | None) -> str:
    return "gradio:" + (request.session_hash if request is not None and request.session_hash else "anonymous")


def _error(status_code: int, message: str) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status_code)


def _status_markdown(service: EngineService) -> str:
    s = service.status()
    mode = {
        "shared": "cache mode: **shared** (everyone's prefixes are reusable: fastest, but a timing side channel)",
        "per-session": "cache mode: **per-session** (your requests only reuse your own prefixes)",
    }[s["cache_mode"]]
    if s["ready"]:
        return f"**Model:** {s['model']} · {s['parameters'] / 1e6:,.0f}M parameters · **device:** {s['device']} ({s['dtype']}) · context {s['context_length']:,} tokens · {mode}"
    if s["error"]:
        return f"**Error:** {s['error']}"
    lines = "\n".join(f"- {line}" for line in s["progress"]) or "- starting…"
    return f"**Loading the model…** ({mode})\n\n{lines}"


def _api_help(service: EngineService) -> str:
    return (
        "**REST** (same port): `POST /generate` with JSON "
        '`{"prompt": "...", "system_prompt": null, "max_new_tokens": 32, "use_cache": true, "use_prefix_cache": true, "temperature": 0}` '
        "(optional `top_p`, `seed`) returns the engine's response; `GET /cache/stats`; `POST /cache/clear`; `GET /health`; schema at `/docs`. "
        f"Send an `{SESSION_HEADER}` header to name your session (else your address is used).\n\n"
        "**gradio_client**: `Client(url).predict(prompt, api_name=\"/generate\")`, `/cache_stats`, `/clear_cache`.\n\n"
        f"Cache mode: **{service.settings.cache_mode}**. In per-session mode each session gets its own namespace: identical "
        "prompts from two sessions never hit each other, and stats, the inspector and clearing only ever see your own."
    )


if __name__ == "__main__":
    main()
