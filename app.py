"""The web app: a Gradio page and a REST API, on one port, showing what KV and prefix caching save.

Composes the page (``ui/page.py``: one module per panel or tab, each wiring its own events, and
the gradio_client endpoints in ``ui/tabs_api.py``) and the REST routes (under /session, /generate,
/cache/*, /plan, /v1), and calls the engine through ``ui.service``. Everything else lives in ``ui/``:
settings, sessions, the request guard, the served engine and its isolation rules, request bodies
and limits, figures and scenarios. Nothing imports this file.

Every handler, page event or API, takes its session from ``ui.sessions`` (never from Gradio's
session_hash) and its request through ``ui.schemas.parse_body``: private events are hidden, not protected.

    python app.py [--host 127.0.0.1] [--port 7860] [--model ID] [--cache-budget-mb 512] [--cache-mode shared|per-session]
"""

from __future__ import annotations

import asyncio
import signal
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Callable

import gradio as gr
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from ui.limits import RETRY_AFTER
from ui.openai_api import add_openai_routes
from ui.page import HEAD, SHARED_PUBLIC_WARNING, build_page
from ui.page_context import PageContext
from ui.planner import PlanBody, Planner
from ui.schemas import BadRequest, GenerateBody, SaveBody, UnpinBody, WarmBody, parse_body
from ui.security import Guard, HeadersInTime, LineCappedStream, UploadBudget
from ui.service import Busy, EngineService, NotAllowed, NotReady
from ui.sessions import ID_RULE, Session, SessionIssuer
from ui.settings import parse_settings

ASSETS = Path(__file__).resolve().parent / "assets"


def build_demo(service: EngineService, issuer: SessionIssuer, planner: Planner, uploads: UploadBudget) -> gr.Blocks:
    """The page, composed in ``ui/page.py`` from one module per panel or tab, each wiring its own events."""
    return build_page(PageContext(service, issuer, planner, uploads))


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
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # uvicorn re-raises SIGTERM after its clean shutdown: exit 0, running atexit cleanups (the plans folder)
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
        head=HEAD,
        ssr_mode=False,
        server_name=settings.host,
        server_port=settings.port,
    )
    print(f"Serving on http://{settings.host}:{settings.port} (prefix cache: {settings.cache_mode})", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", timeout_graceful_shutdown=3, http=HeadersInTime)  # a deadline on request headers


# ---------------------------------------------------------------------- helpers


def _session(issuer: SessionIssuer, request: Request | gr.Request | None) -> Session:
    """The caller's session from its headers and cookies (never from Gradio's session_hash)."""
    return issuer.resolve_request(request)


async def _body_bytes(request: Request) -> bytes:
    """The raw body (the Guard has capped its size), read in async code so a sync route can run in a thread."""
    return await request.body()


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


if __name__ == "__main__":
    main()
