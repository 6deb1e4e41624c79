"""The web app: a Gradio page and a REST API, on one port, showing what KV and prefix caching save.

Builds the page (playground, charts, token highlights, scenarios, cache inspector) and the routes
(REST under /session, /generate and /cache/*, gradio_client endpoints /generate, /cache_stats,
/clear_cache, /warm_cache, /unpin_cache), and calls the engine through ``ui.service``. Everything else lives in ``ui/``:
settings, sessions, the request guard, the served engine and its isolation rules, request bodies
and limits, figures and scenarios. Nothing imports this file.

Every handler, page event or API, takes its session from ``ui.sessions`` (never from Gradio's
session_hash) and its request through ``ui.schemas.parse_body``: private events are hidden, not protected.

    python app.py [--host 127.0.0.1] [--port 7860] [--model ID] [--cache-budget-mb 512] [--cache-mode shared|per-session]
"""

from __future__ import annotations

import asyncio
import sys
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import gradio as gr
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from engine import GenerationResult
from engine.snapshot import status_line as snapshot_line
from engine.sampling import NO_REPEAT_NGRAM_MAX, REPETITION_PENALTY_MAX, REPETITION_PENALTY_MIN
from ui import backend_view, charts
from ui.components import RawSlider, RawTextbox
from ui.limits import MAX_NEW_TOKENS, PAGE_MAX_NEW_TOKENS, PAGE_NO_REPEAT_NGRAM_SIZE, PAGE_REPETITION_PENALTY, RETRY_AFTER, SESSION_STATE_TTL_S
from ui.openai_api import add_openai_routes
from ui.planner import PlanBody, Planner, build_plan_tab, plan_api
from ui.scenarios import load_examples, load_scenarios, run_scenario
from ui.schemas import BadRequest, GenerateBody, SaveBody, UnpinBody, WarmBody, parse_body
from ui.security import Guard, HeadersInTime, LineCappedStream, UploadBudget
from ui.service import Busy, EngineService, NotAllowed, NotReady
from ui.sessions import ID_RULE, SESSION_HEADER, Session, SessionIssuer
from ui.settings import parse_settings

ASSETS = Path(__file__).resolve().parent / "assets"
SHARED_PUBLIC_WARNING = (
    "This public server shares one prefix cache among all visitors (--allow-shared-public): the time to "
    "the first token and the count of reused tokens tell anyone whether someone else sent the same "
    "prefix. Do not type anything private here."
)


def build_demo(service: EngineService, issuer: SessionIssuer, planner: Planner, uploads: UploadBudget) -> gr.Blocks:
    """The page. Every UI event is private: scripts use the named API endpoints at the end."""
    scenarios = load_scenarios()
    private = dict(api_visibility="private")
    quick = dict(api_visibility="private", queue=False)  # no model work: never waits behind a generation

    def session_of(request: gr.Request | None) -> Session:
        with _ui_errors():
            return _session(issuer, request)

    def check_colour(colour: Any) -> None:
        """The tree view's colour control, as any caller of an inspector event may send it."""
        if colour not in charts.TREE_COLOURS:
            raise gr.Error(f"tree colour: pick one of {', '.join(charts.TREE_COLOURS)}")

    with gr.Blocks(title="KV cache & prefix cache, measured", analytics_enabled=False, delete_cache=uploads.delete_cache()) as demo:  # uploads and plan files go after a while
        # Keyed by Gradio's session_hash, which a client can copy: handlers bind it to the server's session.
        history = gr.State(charts.SessionHistory(), time_to_live=SESSION_STATE_TTL_S)

        gr.Markdown(
            "# KV cache & prefix cache, measured\n"
            "Every request shows where its time went. The **KV cache** keeps each token's keys and values so "
            "decoding does not recompute the whole sequence; the **prefix cache** keeps them *across requests*, "
            "so a prompt that starts like an earlier one skips that part of the prefill.",
            elem_id="kv-intro",
        )
        status = gr.Markdown("Loading the model…", elem_id="kv-model-status")
        backend_note = gr.Markdown(elem_id="kv-backend")  # ui/backend_view.py: a remote's URL, model, kind, limits
        if not service.settings.is_local and not service.settings.per_session:
            gr.Markdown(f"**Warning:** {SHARED_PUBLIC_WARNING}", elem_id="kv-shared-warning")

        with gr.Row(equal_height=False):
            with gr.Column(scale=5):
                system_prompt = RawTextbox(label="System prompt", lines=3, placeholder="Optional. A long one shared by several requests is what the prefix cache saves.")
                prompt = RawTextbox(label="Prompt", lines=2, placeholder="Ask something…", elem_id="kv-prompt")
                with gr.Row():
                    use_cache = gr.Checkbox(value=True, label="KV cache", info="reuse keys/values while decoding")
                    use_prefix_cache = gr.Checkbox(value=True, label="Prefix cache", info="reuse KV across requests")
                with gr.Row():
                    max_new_tokens = RawSlider(1, MAX_NEW_TOKENS, value=PAGE_MAX_NEW_TOKENS, step=1, label="Max new tokens")
                    temperature = RawSlider(0.0, 2.0, value=0.0, step=0.05, label="Temperature", info="0 is greedy")
                with gr.Row():  # repetition control: the page's default is measured by benchmark/repetition_bench.py
                    repetition_penalty = RawSlider(
                        REPETITION_PENALTY_MIN, REPETITION_PENALTY_MAX, value=PAGE_REPETITION_PENALTY, step=0.05, label="Repetition penalty",
                        info="1 is off; above 1 discounts tokens the reply already used", elem_id="kv-repetition-penalty",
                    )
                    no_repeat_ngram_size = RawSlider(
                        0, NO_REPEAT_NGRAM_MAX, value=PAGE_NO_REPEAT_NGRAM_SIZE, step=1, label="No repeat n-gram size",
                        info="0 is off; n: never the same n tokens twice", elem_id="kv-no-repeat-ngram",
                    )
                generate_button = gr.Button("Generate", variant="primary", elem_id="kv-generate")
                verify_button = gr.Button("Verify: generate, then rerun with no cache and compare", size="sm", elem_id="kv-verify")
                with gr.Row():
                    pin_button = gr.Button("Pin this system prompt", size="sm", elem_id="kv-pin")
                    unpin_button = gr.Button("Unpin", size="sm", variant="secondary", elem_id="kv-unpin")
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
                explanation = gr.HTML("", elem_id="kv-explanation")

        with gr.Row(equal_height=True):
            timing_note = gr.Markdown(elem_id="kv-timing-note")
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
                    scenario_verify = gr.Checkbox(False, label="Verify every request", info="each also runs with no cache and is compared", scale=1)
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
                    column_widths=["6%", "7%", "7%", "6%", "9%", "6%", "6%", "6%", "47%"],
                )
                with gr.Row():
                    refresh_button = gr.Button("Refresh", size="sm")
                    clear_button = gr.Button("Clear cache", size="sm", variant="stop")
                tree_colour = gr.Radio(list(charts.TREE_COLOURS), value="hits", label="Tree colour", info="hits, or time since last use", elem_id="kv-tree-colour")
                cache_tree = gr.Plot(charts.tree_figure([]), show_label=False, elem_id="kv-tree-plot")
            build_plan_tab(planner, issuer.request_address)
            with gr.Tab("API"):
                gr.Markdown(_api_help(service))

        # ---- handlers: thin; the work is in ui/ and the engine

        def on_show_status() -> tuple:
            info = service.backend_info()  # a remote's kind is known once it has been reached
            return (
                _status_markdown(service), gr.Timer(active=not (service.ready or service.load_error) or _compiling(service)),
                backend_view.backend_markdown(info), backend_view.timing_note(info), *backend_view.toggle_updates(info),
            )

        async def on_generate(system: Any, text: Any, kv: Any, prefix: Any, max_tokens: Any, temp: Any, penalty: Any, ngram: Any, state: charts.SessionHistory, request: gr.Request):
            async for outputs in page_generate(system, text, kv, prefix, max_tokens, temp, penalty, ngram, state, request, verify=False):
                yield outputs

        async def on_verify(system: Any, text: Any, kv: Any, prefix: Any, max_tokens: Any, temp: Any, penalty: Any, ngram: Any, state: charts.SessionHistory, request: gr.Request):
            async for outputs in page_generate(system, text, kv, prefix, max_tokens, temp, penalty, ngram, state, request, verify=True):
                yield outputs

        async def page_generate(system: Any, text: Any, kv: Any, prefix: Any, max_tokens: Any, temp: Any, penalty: Any, ngram: Any, state: charts.SessionHistory, request: gr.Request, verify: bool):
            session = session_of(request)
            state = state.owned_by(session.key)
            with _ui_errors():
                body = parse_body({**_page_fields(text, system, max_tokens, kv, prefix, temp, penalty, ngram), "verify": verify})
                job = service.stream(session, **body.engine_kwargs())
            skip = [gr.skip()] * 6
            produced, result = "", None
            with _ui_errors():
                async for item in job.aiter():  # a page that goes away closes this: the job stops
                    if isinstance(item, GenerationResult):
                        result = item
                    else:
                        produced += item
                        yield produced, *skip
            state.add(result)
            yield (
                result.text,
                charts.figures_html(result),
                charts.token_highlights(result, service.backend.decode),
                charts.explanation_html(result),
                charts.latency_figure(state.records),
                charts.hit_history_figure(state.records),
                state,
            )

        def on_inspect(state: charts.SessionHistory, colour: Any, request: gr.Request) -> tuple[str, Any, Any]:
            if not service.ready:
                reason = service.not_ready_reason()
                return reason[:1].upper() + reason[1:] + ".", None, None
            session = session_of(request)
            check_colour(colour)
            rows = service.entries(session, state.owned_by(session.key).sequences)
            stats = service.stats(session)
            markdown = charts.stats_markdown(stats) if stats.get("budget_bytes") is not None else backend_view.remote_stats_markdown(stats)
            markdown += f"\n\n{snapshot_line(stats['snapshot'])}" if stats.get("snapshot") else ""
            return markdown, charts.inspector_frame(rows), charts.tree_figure(rows, colour)

        def on_pin(system: Any, state: charts.SessionHistory, colour: Any, request: gr.Request) -> tuple[str, Any, Any]:
            check_colour(colour)  # before any work
            session = session_of(request)
            with _ui_errors():
                body = parse_body({"system_prompt": None if system in (None, "") else system, "pin": True}, WarmBody)
                done = service.warm(session, body.message_dicts(), pin=True, ttl_s=body.ttl_s)
            gr.Info(_warm_message(done))
            return on_inspect(state, colour, request)

        def on_unpin(system: Any, state: charts.SessionHistory, colour: Any, request: gr.Request) -> tuple[str, Any, Any]:
            check_colour(colour)  # before any work
            session = session_of(request)
            with _ui_errors():
                body = parse_body({"system_prompt": None if system in (None, "") else system}, UnpinBody)
                done = service.unpin(session, body.message_dicts())
            (gr.Info if done["unpinned"] else gr.Warning)(done["message"])
            return on_inspect(state, colour, request)

        def on_clear(state: charts.SessionHistory, colour: Any, request: gr.Request) -> tuple[str, Any, Any]:
            check_colour(colour)  # before any work
            with _ui_errors():
                outcome = service.clear(session_of(request))
            gr.Info(outcome["message"])
            return on_inspect(state, colour, request)

        def on_reset_charts(state: charts.SessionHistory, request: gr.Request):
            state = state.owned_by(session_of(request).key)
            state.reset_charts()
            return charts.latency_figure([]), charts.hit_history_figure([]), charts.empty_figures_html(), None, state

        async def on_run_selected_scenario(name: Any, verify: Any, state: charts.SessionHistory, request: gr.Request):
            session = session_of(request)
            state = state.owned_by(session.key)
            if not isinstance(name, str) or name not in scenarios:
                raise gr.Error(f"unknown scenario; pick one of: {', '.join(scenarios)}")
            scenario = scenarios[name]
            off: list[charts.RequestRecord] = []
            on: list[charts.RequestRecord] = []
            total = 2 * len(scenario.prompts)
            with _ui_errors():
                verify = parse_body({"prompt": name, "verify": verify}).verify  # the one validation: a real bool
                checks: list[bool] = []
                async for step in run_scenario(service, scenario, session, verify=verify):
                    record = state.add(step.result, label=f"{name}, prefix cache {step.phase}", own_sequence=False)
                    (off if step.phase == "off" else on).append(record)
                    done = len(off) + len(on)
                    checks += [step.result.verification["identical"]] if step.result.verification else []
                    verified = f"\n\nVerified against no cache: **{sum(checks)} of {len(checks)} identical**." if checks else ""
                    yield (
                        f"Ran {done} of {total} requests (prefix cache {step.phase}, question {step.index + 1})…\n\n{charts.scenario_summary(off, on)}{verified}",
                        charts.scenario_figure(off, on, f"{name}: TTFT, prefix cache off vs on"),
                        charts.latency_figure(state.records),
                        charts.hit_history_figure(state.records),
                        state,
                    )

        # ---- events

        timer = gr.Timer(1.0)
        status_outputs = [status, timer, backend_note, timing_note, use_cache, use_prefix_cache]
        timer.tick(on_show_status, outputs=status_outputs, **quick)
        demo.load(on_show_status, outputs=status_outputs, **quick)
        inspect_inputs, inspect_outputs = [history, tree_colour], [cache_stats, cache_table, cache_tree]  # every inspector refresh goes through on_inspect
        demo.load(on_inspect, inputs=inspect_inputs, outputs=inspect_outputs, **quick)
        use_cache.change(lambda kv, prefix: prefix is True and kv is True, inputs=[use_cache, use_prefix_cache], outputs=use_prefix_cache, **quick)
        gen_inputs = [system_prompt, prompt, use_cache, use_prefix_cache, max_new_tokens, temperature, repetition_penalty, no_repeat_ngram_size, history]
        gen_outputs = [output, figures, tokens, explanation, latency_plot, hits_plot, history]
        # One run at a time per page: two events of a session each get their own copy of the
        # history state, and the one finishing last would drop the other's records.
        run_buttons = [generate_button, verify_button, scenario_button, reset_button]
        lock = dict(fn=lambda: [gr.Button(interactive=False)] * len(run_buttons), outputs=run_buttons, **quick)
        unlock = dict(fn=lambda: [gr.Button(interactive=True)] * len(run_buttons), outputs=run_buttons, **quick)
        generate_button.click(**lock).then(
            on_generate, inputs=gen_inputs, outputs=gen_outputs, show_progress_on=output, **private
        ).then(**unlock).then(on_inspect, inputs=inspect_inputs, outputs=inspect_outputs, **quick)
        verify_button.click(**lock).then(
            on_verify, inputs=gen_inputs, outputs=gen_outputs, show_progress_on=output, **private
        ).then(**unlock).then(on_inspect, inputs=inspect_inputs, outputs=inspect_outputs, **quick)
        refresh_button.click(on_inspect, inputs=inspect_inputs, outputs=inspect_outputs, **quick)
        clear_button.click(on_clear, inputs=inspect_inputs, outputs=inspect_outputs, **quick)
        tree_colour.change(on_inspect, inputs=inspect_inputs, outputs=inspect_outputs, **quick)
        pin_button.click(on_pin, inputs=[system_prompt, *inspect_inputs], outputs=inspect_outputs, **private)
        unpin_button.click(on_unpin, inputs=[system_prompt, *inspect_inputs], outputs=inspect_outputs, **private)
        reset_button.click(on_reset_charts, inputs=history, outputs=[latency_plot, hits_plot, figures, tokens, history], **quick)
        scenario_name.change(lambda name: scenarios[name].description if name in scenarios else "", inputs=scenario_name, outputs=scenario_about, **quick)
        scenario_button.click(**lock).then(
            on_run_selected_scenario,
            inputs=[scenario_name, scenario_verify, history],
            outputs=[scenario_progress, scenario_plot, latency_plot, hits_plot, history],
            show_progress_on=scenario_progress,
            **private,
        ).then(**unlock).then(on_inspect, inputs=inspect_inputs, outputs=inspect_outputs, **quick)

        # ---- the gradio_client API: /generate, /cache_stats, /clear_cache, /warm_cache, /unpin_cache

        async def api_generate(
            prompt: str,
            system_prompt: str | None = None,
            max_new_tokens: int = 64,
            use_cache: bool = True,
            use_prefix_cache: bool = True,
            temperature: float = 0.0,
            top_p: float = 1.0,
            seed: int | None = None,
            verify: bool = False,
            repetition_penalty: float = 1.0,
            no_repeat_ngram_size: int = 0,
            frequency_penalty: float = 0.0,
            presence_penalty: float = 0.0,
            request: gr.Request = None,
        ) -> dict:
            """Generate a reply; returns the engine's response (text, token_ids, cache_status, timings, ...)."""
            raw = dict(
                prompt=prompt, system_prompt=system_prompt, max_new_tokens=max_new_tokens, use_cache=use_cache, use_prefix_cache=use_prefix_cache,
                temperature=temperature, top_p=top_p, seed=seed, verify=verify, repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
            )
            session = session_of(request)
            with _ui_errors():
                job = service.stream(session, **parse_body(raw).engine_kwargs())
                return (await job.aresult()).to_dict()  # the client's job.cancel() cancels this task, and the job

        def api_cache_stats(request: gr.Request = None) -> dict:
            """Prefix-cache statistics for this client's scope (its own namespace in per-session mode)."""
            with _ui_errors():
                return service.stats(session_of(request))

        def api_clear_cache(request: gr.Request = None) -> dict:
            """Clear this client's namespace (or the whole cache, for a local shared-mode app)."""
            with _ui_errors():
                return service.clear(session_of(request))

        gr.api(api_generate, api_name="generate")
        def api_warm_cache(system_prompt: str | None = None, messages: list | None = None, pin: bool = False, ttl_s: float | None = None, request: gr.Request = None) -> dict:
            """Prefill a system prompt or a list of messages into this client's namespace; pin it (within the pin budget) if asked."""
            session = session_of(request)
            with _ui_errors():
                body = parse_body(dict(system_prompt=system_prompt, messages=messages, pin=pin, ttl_s=ttl_s), WarmBody)
                return service.warm(session, body.message_dicts(), pin=body.pin, ttl_s=body.ttl_s)

        def api_unpin_cache(system_prompt: str | None = None, messages: list | None = None, request: gr.Request = None) -> dict:
            """Drop the pin of a system prompt or messages in this client's own namespace; ``unpinned`` false when there was none."""
            session = session_of(request)
            with _ui_errors():
                body = parse_body(dict(system_prompt=system_prompt, messages=messages), UnpinBody)
                return service.unpin(session, body.message_dicts())

        gr.api(api_warm_cache, api_name="warm_cache")
        gr.api(api_unpin_cache, api_name="unpin_cache")
        gr.api(api_cache_stats, api_name="cache_stats", concurrency_limit=None)
        gr.api(api_clear_cache, api_name="clear_cache", concurrency_limit=None)
        gr.api(plan_api(planner, issuer.request_address), api_name="plan", concurrency_limit=1)  # ui/planner.py: a workload replay, no model work
    return demo


def build_rest(service: EngineService, issuer: SessionIssuer, planner: Planner, uploads: UploadBudget) -> FastAPI:
    """REST routes, behind the Guard middleware; defined before Gradio is mounted at "/" so they take precedence."""
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(service.stop)  # SIGTERM / SIGINT: uvicorn's clean shutdown saves the prefix cache

    api = FastAPI(title="kv-cache-inference", description="KV cache and prefix cache, measured.", docs_url="/docs", redoc_url=None, lifespan=lifespan)

    @api.post("/session")
    def rest_new_session() -> JSONResponse:
        """A new session id: send it as `Authorization: Bearer <id>` (or `X-Session-Id`) to keep a namespace."""
        session_id = issuer.new_id()
        return JSONResponse({"session_id": session_id, "authorization": f"Bearer {session_id}", "rule": ID_RULE})

    @api.post(
        "/generate",
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": GenerateBody.model_json_schema()}}}},
    )
    async def rest_generate(request: Request) -> JSONResponse:
        """Generate a reply. Body: GenerateBody. 422 for an invalid body, 400 when the engine refuses the input."""
        try:
            body = parse_body(await request.body())  # the Guard has capped its size (413)
        except BadRequest as exc:
            return _error(422, str(exc))
        try:
            job = service.stream(_session(issuer, request), **body.engine_kwargs())
            result = await job.aresult_unless(request.is_disconnected)  # None: the client left, the job is cancelled
        except (NotReady, Busy) as exc:
            return _error(503, str(exc), RETRY_AFTER)
        except ValueError as exc:
            return _error(400, str(exc))
        if result is None:
            return _error(499, "the client closed the request")  # nobody reads this: the work stopped
        return JSONResponse(result.to_dict())

    @api.get("/cache/stats")
    def rest_cache_stats(request: Request) -> JSONResponse:
        """Prefix-cache statistics for this client's scope."""
        return _answer(lambda: service.stats(_session(issuer, request)))

    @api.post("/cache/clear")
    def rest_cache_clear(request: Request) -> JSONResponse:
        """Clear this client's namespace (or everything, for a local shared-mode app); 403 where not allowed."""
        return _answer(lambda: service.clear(_session(issuer, request)), status=lambda done: 403 if done.get("cleared") == "nothing" else 200)

    @api.post("/cache/warm", openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": WarmBody.model_json_schema()}}}})
    def rest_cache_warm(request: Request, raw: bytes = Depends(_body_bytes)) -> JSONResponse:
        """Prefill a system prompt or messages into this client's namespace, maybe pinned. Body: WarmBody. 422 bad body, 403 a pin not allowed, 400 refused."""
        return _body_call(raw, WarmBody, lambda body: service.warm(_session(issuer, request), body.message_dicts(), pin=body.pin, ttl_s=body.ttl_s))

    @api.post("/cache/unpin", openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": UnpinBody.model_json_schema()}}}})
    def rest_cache_unpin(request: Request, raw: bytes = Depends(_body_bytes)) -> JSONResponse:
        """Drop the pin of a system prompt or messages in this client's own namespace. Body: UnpinBody. 404 no such pin, 403 not allowed."""
        return _body_call(raw, UnpinBody, lambda body: service.unpin(_session(issuer, request), body.message_dicts()), status=lambda done: 404 if done["unpinned"] is False else 200)

    @api.post("/cache/save")
    def rest_cache_save(raw: bytes = Depends(_body_bytes)) -> JSONResponse:
        """Save the prefix cache to --cache-dir now (local servers only: 403 on a public one). No body, or `{}`."""
        return _body_call(raw or b"{}", SaveBody, lambda body: service.save_cache())

    @api.post("/plan", openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": PlanBody.model_json_schema()}}}})
    async def rest_plan(request: Request) -> JSONResponse:
        """Replay a workload trace across budgets and policies (ui/planner.py). Body: PlanBody, the trace up to 2 MiB."""
        caller = issuer.request_address(request)
        return await asyncio.to_thread(_body_call, await request.body(), PlanBody, lambda body: planner.run(body, caller=caller).to_dict())

    @api.get("/health")
    def health() -> dict:
        """Whether the model is loaded, the loading progress, the cache mode and the requests in flight."""
        return service.status()

    add_openai_routes(api, service, issuer)  # /v1/chat/completions, /v1/completions, /v1/models: ui/openai_api.py
    api.add_middleware(Guard, check_host=service.settings.is_local, issuer=issuer, routes=lambda: api.routes, uploads=uploads)
    return api


def main() -> None:
    sys.stderr = LineCappedStream(sys.stderr)  # no library prints a client's whole value into the log
    settings = parse_settings()
    if not settings.is_local and not settings.per_session:
        print(f"WARNING: {SHARED_PUBLIC_WARNING}", flush=True)
    service = EngineService(settings)
    service.start_loading()
    issuer = SessionIssuer(secure_cookie=settings.on_space, trust_proxy=settings.trust_proxy, proxy_hops=settings.proxy_hops)
    planner = Planner(lambda: service.engine.chat)  # one plan at a time, whichever door
    uploads = UploadBudget(int(settings.upload_budget_mb * 2**20), settings.upload_kept_min * 60)  # trace uploads on disk
    # Gradio's queue lets every event through (no concurrency limit): admission, per-session limits
    # and round-robin fairness are the service's, the same for page, gradio_client and REST.
    demo = build_demo(service, issuer, planner, uploads).queue(default_concurrency_limit=None, max_size=settings.max_queue)
    demo.has_launched = True  # mounted, never launched: without it Gradio skips its own checks of input files (ui/security.py checks first)
    app = gr.mount_gradio_app(
        build_rest(service, issuer, planner, uploads),
        demo,
        path="/",
        theme=gr.themes.Soft(primary_hue="emerald", secondary_hue="slate"),
        css_paths=[ASSETS / "style.css"],
        ssr_mode=False,
        server_name=settings.host,
        server_port=settings.port,
    )
    print(f"Serving on http://{settings.host}:{settings.port} (prefix cache: {settings.cache_mode})", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", timeout_graceful_shutdown=3, http=HeadersInTime)  # a deadline on request headers


# ---------------------------------------------------------------------- helpers


@contextmanager
def _ui_errors() -> Iterator[None]:
    """Turn the caller's bad input (and a busy or loading server) into a gr.Error with the message."""
    try:
        yield
    except (ValueError, NotReady, Busy) as exc:
        raise gr.Error(str(exc)) from None


def _page_fields(prompt: Any, system_prompt: Any, max_new_tokens: Any, use_cache: Any, use_prefix_cache: Any, temperature: Any, repetition_penalty: Any, no_repeat_ngram_size: Any) -> dict:
    """A page event's inputs as a request body for ``parse_body``: values as sent, but for the page's own forms.

    The page sends None for a cleared box and may send a whole slider value as a float (48.0); both
    are mapped, nothing else is: a list, a number or NUL as the prompt, or "false" as a flag, fail.
    """
    return dict(
        prompt="" if prompt is None else prompt,
        system_prompt=None if system_prompt in (None, "") else system_prompt,
        max_new_tokens=_slider_int(max_new_tokens),
        use_cache=use_cache,
        use_prefix_cache=use_prefix_cache,
        temperature=temperature,
        repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=_slider_int(no_repeat_ngram_size),
    )


def _slider_int(value: Any) -> Any:
    """A whole slider value sent as a float (48.0) as the int it is; anything else as sent, for the validation to judge."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _session(issuer: SessionIssuer, request: Request | gr.Request | None) -> Session:
    """The caller's session from its headers and cookies (never from Gradio's session_hash)."""
    return issuer.resolve_request(request)


async def _body_bytes(request: Request) -> bytes:
    """The raw body (the Guard has capped its size), read in async code so a sync route can run in a thread."""
    return await request.body()


def _warm_message(done: dict[str, Any]) -> str:
    pinned = f", pinned ({done['pinned_bytes'] / 2**10:,.0f} KiB" + (f", {done['expires_in_s']:,.0f} s without a hit)" if done.get("expires_in_s") else ")") if done["pinned"] else ""
    return f"Warmed {done['tokens']} tokens ({done['prefilled']} prefilled, {done['reused']} already cached){pinned}."


def _body_call(raw: bytes, schema: type, call: Callable[[Any], dict[str, Any]], status: Callable[[dict[str, Any]], int] = lambda done: 200) -> JSONResponse:
    """A route with a JSON body: 422 for a body that fails ``schema``, else ``_answer`` of the call with the parsed body."""
    try:
        body = parse_body(raw, schema)
    except BadRequest as exc:
        return _error(422, str(exc))
    return _answer(lambda: call(body), status)


def _answer(call: Callable[[], dict[str, Any]], status: Callable[[dict[str, Any]], int] = lambda done: 200) -> JSONResponse:
    """A cache route's answer, one mapping of the service's refusals for them all.

    403 not allowed; 503 with Retry-After while loading or busy; 400 refused (a malformed session id
    too); 500 a snapshot that could not be written. Otherwise the outcome, with ``status(outcome)``.
    """
    try:
        outcome = call()
    except NotAllowed as exc:  # before OSError: NotAllowed is a PermissionError
        return _error(403, str(exc))
    except (NotReady, Busy) as exc:
        return _error(503, str(exc), RETRY_AFTER)
    except ValueError as exc:
        return _error(400, str(exc))
    except OSError as exc:  # only /cache/save writes files
        return _error(500, f"the snapshot could not be written: {exc}")
    return JSONResponse(outcome, status_code=status(outcome))


def _error(status_code: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status_code, headers=headers)


def _status_markdown(service: EngineService) -> str:
    s = service.status()
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
        return f"**Error:** {s['error']}"
    lines = "\n".join(f"- {line}" for line in s["progress"]) or "- starting…"
    return f"**Loading the model…** ({mode})\n\n{lines}"


def _compiling(service: EngineService) -> bool:
    """The decode step is still compiling: the status line keeps refreshing until it is done."""
    return (service.status().get("decode") or {}).get("state") == "compiling"


def _api_help(service: EngineService) -> str:
    return (
        "**REST** (same port): `POST /generate` with JSON "
        '`{"prompt": "...", "system_prompt": null, "max_new_tokens": 32, "use_cache": true, "use_prefix_cache": true, "temperature": 0}` '
        "(optional `top_p`, `seed`, `repetition_penalty`, `no_repeat_ngram_size`, `frequency_penalty`, `presence_penalty`) returns the engine's response; `GET /cache/stats`; `POST /cache/clear`; "
        '`POST /cache/warm` with `{"system_prompt": "...", "pin": true, "ttl_s": 600}` (or `"messages": [...]`) prefills and pins; `POST /cache/save` writes the cache to `--cache-dir` (local servers); '
        "`POST /cache/unpin` with the same `system_prompt` or `messages` drops the pin; "
        "`GET /health`; schema at `/docs`. "
        "To keep a session (and its cache) across calls, get an id from `POST /session` and send it as "
        f"`Authorization: Bearer <id>` or `{SESSION_HEADER}: <id>` (or choose one: {ID_RULE.split(' (')[0]}). "
        "Without one, each call is a session of its own.\n\n"
        "**gradio_client**: `Client(url, headers={\"Authorization\": \"Bearer <id>\"}).predict(prompt, api_name=\"/generate\")`, `/cache_stats`, `/clear_cache`, `/warm_cache`, `/unpin_cache`.\n\n"
        f"Cache mode: **{service.settings.cache_mode}**. In per-session mode each session gets its own namespace: identical "
        "prompts from two sessions never hit each other, and stats, the inspector and clearing only ever see your own."
    )


if __name__ == "__main__":
    main()
