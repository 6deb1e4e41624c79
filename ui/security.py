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
9. **Files by path** (``/gradio_api/*`` bodies): Gradio copies, then opens, any ``FileData`` it finds
   in any input, whatever its ``path``. A body naming a file is refused (403) unless that exact path
   is one Gradio's upload route answered to this same session (:class:`Owners`, recorded from the
   upload's response), so no client-given path, URL or traversal is ever opened.
10. **Streams bound to their session**: a Gradio ``session_hash`` (in a body, the query or the path)
   belongs to the server session (cookie, bearer id, or for anonymous callers their address) that
   first used it, and an ``event_id`` to the one whose join made it; a stranger holding either gets
   403 from ``queue/data``, ``queue/join``, ``cancel``, ``heartbeat``, ``call/*/<event>`` and
   ``stream/*``. New session hashes and event calls are rate limited per address
   (:class:`RateLimit`): each new hash costs Gradio a page state.

Every refusal is one log line, truncated; an odd header, cookie or Origin is a 4xx, never a 500.
Knows nothing about the engine; the routes still validate what they receive.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import time
from collections import OrderedDict, deque
from typing import Any, Awaitable, Callable, Iterator, TextIO
from urllib.parse import parse_qs, urlsplit

import h11
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from ui.limits import (
    BODY_MEMORY_BYTES,
    BODY_MEMORY_PER_ADDRESS_BYTES,
    BODY_MIN_BYTES_PER_S,
    BODY_READ_GRACE_S,
    EVENT_CALL_BURST,
    EVENT_CALLS_PER_S,
    HEADER_READ_TIMEOUT_S,
    MAX_BODY_BYTES,
    MAX_BOUND_KEYS,
    MAX_FILES_PER_UPLOAD,
    NEW_PAGE_SESSION_BURST,
    NEW_PAGE_SESSIONS_PER_S,
    PLAN_MAX_BODY_BYTES,
    RETRY_AFTER,
    SESSION_STATE_TTL_S,
    UPLOAD_ADDRESS_SHARE,
    UPLOAD_FILE_CHARGE_BYTES,
    UPLOAD_MIN_CHARGE_BYTES,
)
from ui.sessions import COOKIE_NAME, BadSession, SessionIssuer

log = logging.getLogger(__name__)

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
PAGE_PATH = "/"
UPLOAD_PATH = "/gradio_api/upload"  # multipart by design: the planner tab's trace file comes this way (a trailing slash too)
PLAN_PATHS = ("/plan", UPLOAD_PATH)  # bodies up to PLAN_MAX_BODY_BYTES: a workload trace
OPENAI_PREFIX = "/v1/"  # refusals there use OpenAI's error body (ui/openai_api.py)
DEEP_LINK_PATH = "/gradio_api/deep_link"  # GET writes the session's page state to disk, once per distinct state
UPLOAD_PROGRESS_PATH = "/gradio_api/upload_progress"  # GET kept an entry per upload_id asked about, never freed
GRADIO_PREFIX = "/gradio_api/"
FILE_PREFIX = "/gradio_api/file="  # Gradio serves files by path here (its own allowed-path rules)
EVENT_PATHS = ("/gradio_api/queue/join", "/gradio_api/run/", "/gradio_api/api/", "/gradio_api/call/", "/gradio_api/component_server")  # rate limited per address
DIRECT_EVENT_PATHS = ("/gradio_api/run/", "/gradio_api/api/")  # Gradio answers a gr.Error there with a 500
JOIN_PATHS = ("/gradio_api/queue/join", "/gradio_api/call/")  # answer {"event_id"}: bound to the caller
LOG_CHARS = 200  # a refusal's log line quotes at most this much of the request


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
        self.files = Owners(ttl_s=uploads.window_s)  # upload path -> the sessions Gradio's upload route answered it to
        self.page_sessions = Owners(ttl_s=SESSION_STATE_TTL_S)  # Gradio session_hash -> the server session that first used it
        self.events = Owners(ttl_s=SESSION_STATE_TTL_S)  # Gradio event_id -> the server session whose join made it
        self.new_hashes = RateLimit(NEW_PAGE_SESSIONS_PER_S, NEW_PAGE_SESSION_BURST)
        self.event_calls = RateLimit(EVENT_CALLS_PER_S, EVENT_CALL_BURST)
        self._routes = routes
        self._methods: dict[str, set[str]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        path = scope["path"].rstrip("/") or PAGE_PATH  # "/gradio_api/upload/" is the upload route too (Gradio redirects it)
        request = Request(scope)
        owner, address = self._owner(request), self.issuer.request_address(request)
        try:
            self._check_head(scope["method"], scope["path"], path, headers)
            if scope["method"] not in STATE_CHANGING:
                session_hash = self._check_stream(path, scope.get("query_string", b""), owner, address) if path.startswith(GRADIO_PREFIX) else None
                new_cookie = self.issuer.new_cookie() if scope["method"] == "GET" and scope["path"] == PAGE_PATH and self.issuer.cookie_id(_cookie(headers)) is None else None
                if session_hash is None:
                    await self.app(scope, receive, _filtered(send, new_cookie))
                    return
        except _Refused as refusal:
            await _refuse(send, scope, refusal)
            return
        if scope["method"] not in STATE_CHANGING:  # a queue/data stream: its reader leaving ends its session's running events
            watched, pump = _watched(receive, lambda: _cancel_gradio_tasks(session_hash))
            try:
                await self.app(scope, watched, _filtered(send, None))
            finally:
                pump.cancel()
            return
        held = 0

        def hold(size: int) -> None:
            nonlocal held
            if not self.bodies.take(address, size):
                raise _Refused(503, "the server is reading too many request bodies at once; try again in a few seconds", RETRY_AFTER)
            held += size

        try:
            cap = PLAN_MAX_BODY_BYTES if path in PLAN_PATHS else MAX_BODY_BYTES
            body = await _read_capped(receive, headers, cap, hold)
            answered: Callable[[int, bytes], None] | None = None
            if path == UPLOAD_PATH:
                refused = self.uploads.admit(address, len(body), _multipart_files(body, headers.get("content-type", "")))
                if refused is not None:
                    raise _Refused(*refused)
                scope = {**scope, "query_string": b""}  # no upload_id: Gradio would track its progress for ever
                answered = self._uploaded(owner) if owner is not None and not owner.startswith("anonymous") else None
            elif path.startswith(GRADIO_PREFIX):
                self._check_gradio_body(path, body, owner, address)
                answered = self._joined(owner) if path.startswith(JOIN_PATHS) and owner is not None else None
        except _Refused as refusal:
            await _refuse(send, scope, refusal)
        else:
            sink = _filtered(send, None) if answered is None else _answer_read(_filtered(send, None), answered)
            sink = _client_errors(sink) if path.startswith(DIRECT_EVENT_PATHS) else sink
            await self.app(scope, _replay(body, receive), sink)  # the body stays held until the request ends
        finally:
            self.bodies.give_back(address, held)

    # ------------------------------------------------------------------ the checks, in order

    def _check_head(self, method: str, raw_path: str, path: str, headers: Headers) -> None:
        """Refuse (raise ``_Refused``) a request by its method, path and headers alone (``path``: without a trailing slash)."""
        host = headers.get("host", "")
        if self.check_host and _hostname(host) not in LOOPBACK_NAMES:
            raise _Refused(421, f"this server answers only to localhost, 127.0.0.1 or [::1], not {host[:100]!r}", {})
        if path == DEEP_LINK_PATH:
            raise _Refused(404, "this app makes no deep links", {})
        if path == UPLOAD_PROGRESS_PATH:
            raise _Refused(404, "this app does not track upload progress", {})
        allowed = self._rest_methods().get(raw_path)
        if allowed is not None and method not in allowed:
            raise _Refused(405, f"{raw_path[:100]} allows {', '.join(sorted(allowed))}, not {method[:20]}", {"Allow": ", ".join(sorted(allowed))})
        if method not in STATE_CHANGING:
            return
        origin = headers.get("origin")
        if origin is not None and _netloc(origin) != host.lower():
            raise _Refused(403, "cross-site requests are refused: this server takes state-changing requests only from its own page or from scripts", {})
        if _has_body(headers) and path != UPLOAD_PATH:
            content_type = headers.get("content-type", "").split(";")[0].strip().lower()
            if content_type != "application/json":
                raise _Refused(415, f"send the body as application/json, not {content_type[:60] or 'no content type'!r}", {})

    def _check_stream(self, path: str, query_string: bytes, owner: str | None, address: str) -> str | None:
        """A GET under /gradio_api naming a session hash or an event id: only the session that owns it may read it.
        Returns the session hash of a ``queue/data`` stream, else None."""
        if path.startswith(FILE_PREFIX):  # an upload is served back only to the session that uploaded it
            served = path[len(FILE_PREFIX):]
            if self.files.owner(served) is not None and not self.files.owned_by(served, owner):
                raise _Refused(403, "this file was uploaded by another session", {})
            return None
        query = parse_qs(query_string.decode("latin-1"))
        parts = path.split("/")  # ["", "gradio_api", route, ...]
        route = parts[2] if len(parts) > 2 else ""
        if route == "queue" and path.endswith("/queue/data"):
            session_hash = (query.get("session_hash") or [""])[0]
            if self.page_sessions.owner(session_hash) is None:
                raise _Refused(404, "no event was queued for this session hash; join the queue first", {})
            if not self.page_sessions.owned_by(session_hash, owner):
                raise _Refused(403, _STRANGER, {})
            return session_hash
        elif route == "heartbeat" and len(parts) > 3:
            self._claim(parts[3], owner, address)
        elif route == "stream" and len(parts) > 3 and not self.page_sessions.owned_by(parts[3], owner):
            raise _Refused(403, _STRANGER, {})
        elif route == "call" and len(parts) > 4 and self.events.owner(parts[-1]) not in (None, owner):
            raise _Refused(403, _STRANGER, {})
        return None

    def _check_gradio_body(self, path: str, body: bytes, owner: str | None, address: str) -> None:
        """A POST under /gradio_api: its files must be this session's uploads, its session hash and event id its own."""
        if path.startswith(EVENT_PATHS) and not self.event_calls.take(address):
            raise _Refused(429, f"this address is calling events faster than {EVENT_CALLS_PER_S:g} a second; slow down", RETRY_AFTER)
        parts = path.split("/")
        if len(parts) > 3 and parts[2] == "stream" and not self.events.owned_by(parts[3], owner):  # /gradio_api/stream/<event_id>[/close]
            raise _Refused(403, _STRANGER, {})
        try:
            data = json.loads(body) if body else None
        except ValueError:
            return  # Gradio answers 422; nothing was opened
        for value in _file_paths(data):
            if not isinstance(value, str) or owner is None or owner.startswith("anonymous") or not self.files.owned_by(value, owner):
                raise _Refused(403, "a file must be one this session uploaded through /gradio_api/upload (load the page, then upload it); no other path, URL or file is opened", {})
        if isinstance(data, dict):
            if isinstance(data.get("session_hash"), str):
                self._claim(data["session_hash"], owner, address)
            if isinstance(data.get("event_id"), str) and self.events.owner(data["event_id"]) not in (None, owner):
                raise _Refused(403, _STRANGER, {})

    def _claim(self, session_hash: str, owner: str | None, address: str) -> None:
        """Bind a session hash to ``owner`` at its first use (rate limited per address); 403 for another's."""
        known = self.page_sessions.owner(session_hash)
        if known is None:
            if owner is None:
                raise _Refused(400, "the session id sent is malformed; see POST /session", {})
            if not self.new_hashes.take(address):
                raise _Refused(429, f"this address is opening page sessions faster than {NEW_PAGE_SESSIONS_PER_S:g} a second; reuse one", RETRY_AFTER)
            self.page_sessions.add(session_hash, owner)
        elif known != owner:
            raise _Refused(403, _STRANGER, {})
        else:
            self.page_sessions.touch(session_hash)

    def _owner(self, request: Request) -> str | None:
        """Who a request is, for the bindings: its session's client (``session:<key>``, or ``anonymous@<address>``); None for a malformed id."""
        try:
            return self.issuer.resolve_request(request).client
        except BadSession:
            return None

    def _uploaded(self, owner: str) -> Callable[[int, bytes], None]:
        def record(status: int, body: bytes) -> None:
            paths = _json_or_none(body) if status == 200 else None
            for path in paths if isinstance(paths, list) else []:
                if isinstance(path, str):
                    self.files.add(path, owner)
        return record

    def _joined(self, owner: str) -> Callable[[int, bytes], None]:
        def record(status: int, body: bytes) -> None:
            answer = _json_or_none(body) if status == 200 else None
            if isinstance(answer, dict) and isinstance(answer.get("event_id"), str):
                self.events.add(answer["event_id"], owner)
        return record

    def _rest_methods(self) -> dict[str, set[str]]:
        if self._methods is None:
            methods: dict[str, set[str]] = {}
            for route in self._routes():
                if isinstance(route, Route) and route.methods and "{" not in route.path:
                    methods.setdefault(route.path, set()).update(route.methods | ({"HEAD"} if "GET" in route.methods else set()))
            self._methods = methods
        return self._methods


_STRANGER = "this Gradio session or event belongs to another session of this server; load the page to get your own"


class Owners:
    """Keys (a Gradio session hash, an event id, an upload's path) bound to the sessions that own them.

    Bounded: a key unused for ``ttl_s`` is forgotten, and past ``max_keys`` the least recently used
    goes (its page state is long gone from Gradio's own bounded holder by then). Event loop only.

    Example:
        >>> owners = Owners(ttl_s=60); owners.add("hash", "session:a")
        >>> owners.owned_by("hash", "session:a"), owners.owned_by("hash", "session:b")
        (True, False)
    """

    def __init__(self, ttl_s: float, max_keys: int = MAX_BOUND_KEYS, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s, self.max_keys, self._clock = ttl_s, max_keys, clock
        self._keys: OrderedDict[str, tuple[float, frozenset[str]]] = OrderedDict()  # key -> (last use, owners), least recent first

    def add(self, key: str, owner: str) -> None:
        self._expire()
        owners = self._keys.pop(key, (0.0, frozenset()))[1]
        self._keys[key] = (self._clock(), owners | {owner})
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)

    def owner(self, key: str) -> str | None:
        """The first owner of ``key`` (a session hash or an event has one), None when nobody owns it."""
        self._expire()
        entry = self._keys.get(key)
        return None if entry is None else min(entry[1])

    def owned_by(self, key: str, owner: str | None) -> bool:
        self._expire()
        entry = self._keys.get(key)
        return owner is not None and entry is not None and owner in entry[1]

    def touch(self, key: str) -> None:
        if key in self._keys:
            self._keys[key] = (self._clock(), self._keys[key][1])
            self._keys.move_to_end(key)

    def __len__(self) -> int:
        return len(self._keys)

    def _expire(self) -> None:
        horizon = self._clock() - self.ttl_s
        while self._keys and next(iter(self._keys.values()))[0] <= horizon:
            self._keys.popitem(last=False)


class RateLimit:
    """A token bucket per address: ``burst`` at once, then ``per_s`` a second. Bounded: a full bucket is forgotten.

    Example:
        >>> limit = RateLimit(per_s=1, burst=2); [limit.take("address:a") for _ in range(3)]
        [True, True, False]
    """

    def __init__(self, per_s: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_s, self.burst, self._clock = per_s, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, when counted)

    def take(self, address: str) -> bool:
        now = self._clock()
        if len(self._buckets) > 10_000:  # forget the addresses whose buckets have refilled
            self._buckets = {a: (t, w) for a, (t, w) in self._buckets.items() if t + (now - w) * self.per_s < self.burst}
        tokens, when = self._buckets.get(address, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - when) * self.per_s)
        if tokens < 1:
            self._buckets[address] = (tokens, now)
            return False
        self._buckets[address] = (tokens - 1, now)
        return True


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

    def admit(self, address: str, size: int, files: int = 0) -> tuple[int, str, dict[str, str]] | None:
        """Count an upload of ``size`` bytes in ``files`` files from ``address``; or (status, reason, headers) refusing it, counting nothing.

        Each file costs Gradio a folder and a file (two inodes, a block each at least), so each is
        charged ``UPLOAD_FILE_CHARGE_BYTES`` beside its bytes: 1,000 one-byte files took 7.9 MiB of disk.
        """
        if files > MAX_FILES_PER_UPLOAD:
            return 413, f"at most {MAX_FILES_PER_UPLOAD} files per upload, not {files}", {}
        now = self._clock()
        while self._admitted and self._admitted[0][0] <= now - self.window_s:
            self._forget(*self._admitted.popleft())
        charge = max(size + files * UPLOAD_FILE_CHARGE_BYTES, UPLOAD_MIN_CHARGE_BYTES)
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


def _watched(receive: Receive, on_leave: Callable[[], None]) -> tuple[Receive, asyncio.Task]:
    """A receive fed by a task that reads the client's messages at once, and calls ``on_leave`` the moment it
    disconnects (Gradio's stream notices a disconnect only when it next looks, up to 10 s later)."""
    inbox: asyncio.Queue[Message] = asyncio.Queue()

    async def pump() -> None:
        while True:
            message = await receive()
            inbox.put_nowait(message)
            if message["type"] == "http.disconnect":
                on_leave()
                return

    return inbox.get, asyncio.ensure_future(pump())


def _cancel_gradio_tasks(session_hash: str) -> None:
    """Cancel the running Gradio events of a session hash whose stream reader left.

    Gradio stops a page's generator events then, but not a coroutine event (gradio_client's
    ``/generate``): it ran to its end, holding its slot 10 s. Gradio names each event's task
    ``<session_hash>_<fn_index><gradio-sep><event_id>`` (what its own /cancel matches); cancelling
    the task cancels the awaiting handler, and with it the generation.
    """
    prefix = f"{session_hash}_"
    for task in asyncio.all_tasks():
        name = task.get_name()
        if "<gradio-sep>" in name and name.startswith(prefix):
            task.cancel()


def _netloc(url: str) -> str | None:
    """The host and port an Origin names, lowercased; None for one that does not parse (``http://[``)."""
    try:
        return urlsplit(url).netloc.lower()
    except ValueError:
        return None


def _file_paths(data: Any) -> Iterator[Any]:
    """The ``path`` of every file reference in a JSON body: any object with a ``path`` key, at any depth."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "path" in item:
                yield item["path"]
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _multipart_files(body: bytes, content_type: str) -> int:
    """How many file parts (a ``filename=`` in their headers) a multipart body holds; 0 for any other body."""
    boundary = next((p.strip()[9:].strip('"') for p in content_type.split(";") if p.strip().lower().startswith("boundary=")), "")
    if not boundary:
        return 0
    parts = body.split(b"--" + boundary.encode("latin-1", "replace"))
    return sum(1 for part in parts[1:] if b"filename=" in part.split(b"\r\n\r\n", 1)[0].lower())


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


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
    # A slow client may not hold a connection (and its memory) for ever: the whole body within a grace plus a floor rate.
    expected = int(declared) if declared.isdigit() else cap
    deadline = time.monotonic() + BODY_READ_GRACE_S + expected / BODY_MIN_BYTES_PER_S
    chunks, size = [], 0
    while True:
        try:
            message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise _Refused(408, f"the request body came too slowly (under {BODY_MIN_BYTES_PER_S // 1024} KiB/s after {BODY_READ_GRACE_S:g} s); send it at once", {}) from None
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
    """Drop every CORS header from responses, and any ``Cookie`` a response echoes (Gradio's ranged file
    responses copied the request's); add the page session's cookie where one was issued."""

    async def filtered(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [(k, v) for k, v in message.get("headers", []) if not k.lower().startswith(b"access-control-") and k.lower() != b"cookie"]
            if new_cookie is not None:
                headers.append((b"set-cookie", new_cookie.encode("latin-1")))
            message = {**message, "headers": headers}
        await send(message)

    return filtered


def _answer_read(send: Send, answered: Callable[[int, bytes], None], limit: int = 1 << 16) -> Callable[[Message], Awaitable[None]]:
    """Pass a response through, and hand ``answered`` its status and (small) body once it is complete."""
    status, chunks, size = 0, [], 0

    async def reading(message: Message) -> None:
        nonlocal status, size
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body" and size <= limit:
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if not message.get("more_body", False) and size <= limit:
                answered(status, b"".join(chunks))
        await send(message)

    return reading


def _client_errors(send: Send) -> Callable[[Message], Awaitable[None]]:
    """Gradio answers a handler's ``gr.Error`` (bad input: a refusal, not a fault) on a direct event call with
    a 500 echoing the whole message; make it a 400 with the message truncated. Other 500s pass as they are."""
    start: Message | None = None

    async def rewriting(message: Message) -> None:
        nonlocal start
        if message["type"] == "http.response.start" and message["status"] == 500:
            start = message  # held until the body says what it is
            return
        if start is not None and message["type"] == "http.response.body":
            held, start = start, None
            answer = _json_or_none(message.get("body", b"")) if not message.get("more_body") else None
            if isinstance(answer, dict) and isinstance(answer.get("error"), str):
                body = json.dumps({**answer, "error": answer["error"][: 4 * LOG_CHARS]}).encode()
                headers = [(k, str(len(body)).encode() if k.lower() == b"content-length" else v) for k, v in held.get("headers", [])]
                await send({**held, "status": 400, "headers": headers})
                await send({**message, "body": body})
                return
            await send(held)
        await send(message)

    return rewriting


class HeadersInTime(H11Protocol):
    """uvicorn's h11 protocol with a deadline on request headers: ``uvicorn.run(app, http=HeadersInTime)``.

    uvicorn times out an idle keep-alive connection, but not one that sends a header line every few
    seconds: such a client held a connection past 60 s. Here a request's headers must be complete
    within ``HEADER_READ_TIMEOUT_S`` of the connection opening (or of the previous response's end),
    else the connection is closed. Bodies have their own deadline in the guard (408).
    """

    _header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE and self._header_deadline is not None:  # the headers are in
            self._header_deadline.cancel()
            self._header_deadline = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
        self._header_deadline = self.loop.call_later(HEADER_READ_TIMEOUT_S, self._headers_late)

    def _headers_late(self) -> None:
        self._header_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.warning("refused: request headers not complete within %g s; connection closed", HEADER_READ_TIMEOUT_S)
            self.transport.close()


class LineCappedStream(io.TextIOBase):
    """A text stream (stderr) that cuts every line at ``max_chars``: a library that prints a client's whole
    value (Gradio's traceback of a 200 KB radio choice) writes one bounded line, not 200 KB."""

    def __init__(self, stream: TextIO, max_chars: int = 4 * LOG_CHARS) -> None:
        self.stream, self.max_chars, self._column = stream, max_chars, 0

    def write(self, text: str) -> int:
        out = []
        for i, line in enumerate(text.split("\n")):
            if i:
                out.append("\n")
                self._column = 0
            room = self.max_chars - self._column
            out.append(line[:max(room, 0)] + ("…" if len(line) > room >= 0 else ""))
            self._column += len(line) if len(line) <= room else len(line) + 1
        self.stream.write("".join(out))
        return len(text)

    @property
    def encoding(self) -> str:  # type: ignore[override]  # what progress bars and loggers ask of stderr
        return getattr(self.stream, "encoding", None) or "utf-8"

    def flush(self) -> None:
        self.stream.flush()

    def fileno(self) -> int:
        return self.stream.fileno()

    def isatty(self) -> bool:
        return self.stream.isatty()


async def _refuse(send: Send, scope: Scope, refusal: _Refused) -> None:
    """Answer a refusal, and log it: one line, the request's path and the reason both truncated."""
    status, detail, extra = refusal.args
    log.warning("refused %s %s %s: %s", status, scope["method"][:10], scope["path"][:LOG_CHARS].encode("unicode_escape").decode(), detail[:LOG_CHARS])
    await _respond(send, status, detail, extra, path=scope["path"])


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
