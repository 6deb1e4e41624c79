"""What every HTTP request passes before any route sees it: one ASGI middleware around the whole app.

In order, for each request:

1. **Host** (a loopback server only): ``localhost``, ``127.0.0.1`` or ``[::1]`` with any port, else
   421. A page on another site that re-points its own name at 127.0.0.1 (DNS rebinding) is refused.
2. **Methods** on the REST routes: anything else gets 405 with ``Allow`` (Gradio is mounted at "/",
   so without this an unknown method would fall through to it).
3. **Origin** on state-changing methods: a request whose ``Origin`` names another site is refused
   (403). Browsers always send Origin on cross-site POSTs; curl and scripts send none and pass.
4. **Content-Type**: a POST with a body must be ``application/json`` (415), so a cross-site "simple"
   request (text/plain, forms) never reaches a route.
5. **Body size**: any body over ``MAX_BODY_BYTES`` gets 413, REST and ``/gradio_api/*`` alike, before
   it is parsed, with or without Content-Length. Two paths carry a workload trace and get the
   planner's larger cap, ``PLAN_MAX_BODY_BYTES``: ``POST /plan`` and the page's file upload. The
   bodies held at once fit the :class:`BodyBudget` (503 with Retry-After beyond), so many slow
   uploads together cannot hold the memory.
6. **Disk**: Gradio writes every upload to its cache folder, and a deep link's page state too. An
   upload must fit the :class:`UploadBudget` (429 over one address's share, 503 over everyone's,
   both with Retry-After); the app has no deep links, so ``/gradio_api/deep_link`` is 404. Gradio
   also kept, for ever, an entry per ``upload_id`` an upload named and per id anyone asked
   ``/gradio_api/upload_progress`` about; the guard drops ``upload_id`` from uploads and answers
   that route 404 (the page's upload works without its progress bar).
7. **No CORS**: no ``Access-Control-Allow-*`` header leaves the app; cross-origin callers get nothing.
8. **Page sessions**: loading the page without a valid session cookie sets a fresh one (``ui.sessions``).

Knows nothing about the engine; the routes still validate what they receive.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from typing import Awaitable, Callable
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ui.limits import BODY_MEMORY_BYTES, BODY_MEMORY_PER_ADDRESS_BYTES, MAX_BODY_BYTES, PLAN_MAX_BODY_BYTES, RETRY_AFTER, UPLOAD_ADDRESS_SHARE, UPLOAD_MIN_CHARGE_BYTES
from ui.sessions import COOKIE_NAME, SessionIssuer

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
PAGE_PATH = "/"
UPLOAD_PATH = "/gradio_api/upload"  # multipart by design: the planner tab's trace file comes this way (a trailing slash too)
PLAN_PATHS = ("/plan", UPLOAD_PATH)  # bodies up to PLAN_MAX_BODY_BYTES: a workload trace
OPENAI_PREFIX = "/v1/"  # refusals there use OpenAI's error body (ui/openai_api.py)
DEEP_LINK_PATH = "/gradio_api/deep_link"  # GET writes the session's page state to disk, once per distinct state
UPLOAD_PROGRESS_PATH = "/gradio_api/upload_progress"  # GET kept an entry per upload_id asked about, never freed


class Guard:
    """The middleware. ``routes`` gives the REST routes (read at the first request, when all exist).

    Example:
        >>> app.add_middleware(Guard, check_host=True, issuer=SessionIssuer(False), routes=lambda: api.routes, uploads=UploadBudget(2**29, 900))
    """

    def __init__(self, app: ASGIApp, check_host: bool, issuer: SessionIssuer, routes: Callable[[], list], uploads: UploadBudget, bodies: BodyBudget | None = None) -> None:
        self.app = app
        self.check_host = check_host
        self.issuer = issuer
        self.uploads = uploads
        self.bodies = bodies or BodyBudget()
        self._routes = routes
        self._methods: dict[str, set[str]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        path = scope["path"].rstrip("/") or PAGE_PATH  # "/gradio_api/upload/" is the upload route too (Gradio redirects it)
        refusal = self._refusal(scope["method"], scope["path"], path, headers)
        if refusal is not None:
            await _respond(send, *refusal, path=scope["path"])
            return
        if scope["method"] not in STATE_CHANGING:
            new_cookie = self.issuer.new_cookie() if scope["method"] == "GET" and scope["path"] == PAGE_PATH and self.issuer.cookie_id(_cookie(headers)) is None else None
            await self.app(scope, receive, _filtered(send, new_cookie))
            return
        address, held = self.issuer.request_address(Request(scope)), 0

        def hold(size: int) -> None:
            nonlocal held
            if not self.bodies.take(address, size):
                raise _Refused(503, "the server is reading too many request bodies at once; try again in a few seconds", RETRY_AFTER)
            held += size

        try:
            cap = PLAN_MAX_BODY_BYTES if path in PLAN_PATHS else MAX_BODY_BYTES
            body = await _read_capped(receive, headers, cap, hold)
            if path == UPLOAD_PATH:
                refused = self.uploads.admit(address, len(body))
                if refused is not None:
                    raise _Refused(*refused)
                scope = {**scope, "query_string": b""}  # no upload_id: Gradio would track its progress for ever
        except _Refused as refusal:
            await _respond(send, *refusal.args, path=scope["path"])
        else:
            await self.app(scope, _replay(body, receive), _filtered(send, None))  # the body stays held until the request ends
        finally:
            self.bodies.give_back(address, held)

    def _refusal(self, method: str, raw_path: str, path: str, headers: Headers) -> tuple[int, str, dict[str, str]] | None:
        """(status, message, extra headers) for a request refused before any route, else None (``path``: without a trailing slash)."""
        host = headers.get("host", "")
        if self.check_host and _hostname(host) not in LOOPBACK_NAMES:
            return 421, f"this server answers only to localhost, 127.0.0.1 or [::1], not {host[:100]!r}", {}
        if path == DEEP_LINK_PATH:
            return 404, "this app makes no deep links", {}
        if path == UPLOAD_PROGRESS_PATH:
            return 404, "this app does not track upload progress", {}
        allowed = self._rest_methods().get(raw_path)
        if allowed is not None and method not in allowed:
            return 405, f"{raw_path} allows {', '.join(sorted(allowed))}, not {method[:20]}", {"Allow": ", ".join(sorted(allowed))}
        if method not in STATE_CHANGING:
            return None
        origin = headers.get("origin")
        if origin is not None and urlsplit(origin).netloc.lower() != host.lower():
            return 403, "cross-site requests are refused: this server takes state-changing requests only from its own page or from scripts", {}
        if _has_body(headers) and path != UPLOAD_PATH:
            content_type = headers.get("content-type", "").split(";")[0].strip().lower()
            if content_type != "application/json":
                return 415, f"send the body as application/json, not {content_type[:60] or 'no content type'!r}", {}
        return None

    def _rest_methods(self) -> dict[str, set[str]]:
        if self._methods is None:
            methods: dict[str, set[str]] = {}
            for route in self._routes():
                if isinstance(route, Route) and route.methods and "{" not in route.path:
                    methods.setdefault(route.path, set()).update(route.methods | ({"HEAD"} if "GET" in route.methods else set()))
            self._methods = methods
        return self._methods


class UploadBudget:
    """The bytes trace uploads may put on disk: ``total`` from everyone, ``per_address`` from one address.

    Gradio writes each ``/gradio_api/upload`` into its cache folder, and the app's sweep
    (``gr.Blocks(delete_cache=budget.delete_cache())``) deletes it ``kept_s`` after it was written,
    looking every ``sweep_s``. So what was admitted over the last ``window_s`` (kept, one sweep, and
    a few seconds for the write) bounds what uploads hold on disk at any moment. Without it, a script
    posting 2 MiB uploads in a loop would fill the disk. Runs in the event loop only.

    Example:
        >>> budget = UploadBudget(512 * 2**20, kept_s=900)
        >>> budget.admit("address:10.0.0.1", 2 * 2**20) is None
        True
    """

    def __init__(self, total: int, kept_s: float, per_address: int | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total
        self.per_address = per_address or max(int(total * UPLOAD_ADDRESS_SHARE), PLAN_MAX_BODY_BYTES)
        self.kept_s = max(1, math.ceil(kept_s))
        self.sweep_s = max(1, self.kept_s // 3)
        self.window_s = self.kept_s + self.sweep_s + 5
        self._clock = clock
        self._admitted: deque[tuple[float, str, int]] = deque()  # (when, address, bytes charged), oldest first
        self._by_address: dict[str, deque[tuple[float, int]]] = {}  # the same, per address
        self._bytes: dict[str, int] = {}  # per address, what its deque sums to
        self._sum = 0

    def delete_cache(self) -> tuple[int, int]:
        """Gradio's ``delete_cache``: (how often to sweep, how old a file must be to go), in seconds."""
        return self.sweep_s, self.kept_s

    def admit(self, address: str, size: int) -> tuple[int, str, dict[str, str]] | None:
        """Count an upload of ``size`` bytes from ``address``; or (status, reason, headers) refusing it, counting nothing."""
        now = self._clock()
        while self._admitted and self._admitted[0][0] <= now - self.window_s:
            self._forget(*self._admitted.popleft())
        charge = max(size, UPLOAD_MIN_CHARGE_BYTES)
        window = f"{self.window_s // 60} minutes" if self.window_s >= 120 else f"{self.window_s} s"
        if self._bytes.get(address, 0) + charge > self.per_address:
            wait = self._wait(now, self._by_address[address][0][0] if address in self._by_address else now)
            return 429, f"this address has uploaded {self.per_address / 2**20:.1f} MiB of traces in {window}, its share; try again in {wait} s", {"Retry-After": str(wait)}
        if self._sum + charge > self.total:
            wait = self._wait(now, self._admitted[0][0] if self._admitted else now)
            return 503, f"the server keeps {self.total / 2**20:.0f} MiB of uploaded traces at most, and holds that now; try again in {wait} s", {"Retry-After": str(wait)}
        self._admitted.append((now, address, charge))
        self._by_address.setdefault(address, deque()).append((now, charge))
        self._bytes[address] = self._bytes.get(address, 0) + charge
        self._sum += charge
        return None

    def _forget(self, when: float, address: str, charge: int) -> None:
        """Drop the oldest upload, which is also its address's oldest."""
        self._sum -= charge
        self._by_address[address].popleft()
        _count_down(self._bytes, address, charge)
        if not self._by_address[address]:
            del self._by_address[address]

    def _wait(self, now: float, oldest: float) -> int:
        """Whole seconds until an upload admitted at ``oldest`` is forgotten."""
        return max(1, math.ceil(oldest + self.window_s - now))


class BodyBudget:
    """Request bodies held in memory at once: ``total`` bytes for everyone, ``per_address`` for one address.

    The guard reads a whole body before a route sees it (to cap its size), and the body stays in
    memory until its request ends. Without a bound, 200 connections that each declared a 2 MiB
    upload and sent it slowly held 400 MiB, and thousands would exhaust the memory. A body holds its
    declared length (or, without one, each chunk as it comes) until its request ends; past either
    limit the request is refused before more is read. Runs in the event loop only.
    """

    def __init__(self, total: int = BODY_MEMORY_BYTES, per_address: int = BODY_MEMORY_PER_ADDRESS_BYTES) -> None:
        self.total, self.per_address = total, per_address
        self.held = 0
        self._by_address: dict[str, int] = {}

    def take(self, address: str, size: int) -> bool:
        """Hold ``size`` more bytes for ``address``; False, holding nothing, past a limit."""
        if self.held + size > self.total or self._by_address.get(address, 0) + size > self.per_address:
            return False
        self.held += size
        self._by_address[address] = self._by_address.get(address, 0) + size
        return True

    def give_back(self, address: str, size: int) -> None:
        if size:
            self.held -= size
            _count_down(self._by_address, address, size)


# ---------------------------------------------------------------------- helpers


def _count_down(counts: dict[str, int], key: str, amount: int) -> None:
    """``counts[key] -= amount``, dropping the key at zero: an address that holds nothing takes no memory."""
    left = counts[key] - amount
    if left:
        counts[key] = left
    else:
        del counts[key]


def _hostname(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):
        return host.split("]")[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _cookie(headers: Headers) -> str | None:
    for part in headers.get("cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE_NAME:
            return value
    return None


def _has_body(headers: Headers) -> bool:
    return headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in headers


async def _read_capped(receive: Receive, headers: Headers, cap: int, hold: Callable[[int], None]) -> bytes:
    """The whole body, never reading past ``cap`` bytes; ``hold`` reserves its memory first (the declared
    length, or each chunk of a body without one). Raises ``_Refused``: 413 over ``cap``, or ``hold``'s."""
    too_large = _Refused(413, f"the request body is over the limit of {cap // 1024} KiB; send a shorter {'trace' if cap != MAX_BODY_BYTES else 'prompt'}", {})
    declared = headers.get("content-length", "")
    if declared.isdigit():
        if int(declared) > cap:
            raise too_large
        hold(int(declared))
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break  # the client went away; the route will see the disconnect
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > cap:
            raise too_large
        if not declared.isdigit():
            hold(len(chunk))
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


class _Refused(Exception):
    """A request refused by the guard once it has started reading: (status, message, extra headers)."""


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the body already read, then the client's later messages (disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


def _filtered(send: Send, new_cookie: str | None) -> Callable[[Message], Awaitable[None]]:
    """Drop every CORS header from responses; add the page session's cookie where one was issued."""

    async def filtered(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [(k, v) for k, v in message.get("headers", []) if not k.lower().startswith(b"access-control-")]
            if new_cookie is not None:
                headers.append((b"set-cookie", new_cookie.encode("latin-1")))
            message = {**message, "headers": headers}
        await send(message)

    return filtered


async def _respond(send: Send, status: int, detail: str, extra: dict[str, str] | None = None, path: str = "") -> None:
    """A refusal: ``{"detail"}``, or OpenAI's error body on the OpenAI-compatible routes (``/v1/``)."""
    if path.startswith(OPENAI_PREFIX):
        body = json.dumps({"error": {"message": detail, "type": "invalid_request_error", "param": None, "code": str(status)}}).encode()
    else:
        body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
