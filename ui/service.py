"""The served backend: loaded in the background, shared by every door through one bounded, fair worker pool.

The backend (``backends``: our engine, or a remote serving engine) is picked once at start-up;
nothing here depends on which. The engine is thread-safe, but the machine has few cores: every generation, whichever door it came
in by (the Gradio queue, gradio_client or plain REST), becomes a :class:`Job` run by one of
``concurrency`` worker threads. Waiting jobs are served fairly across addresses, then across the
sessions of each (not one FIFO), a client may have ``max_inflight_per_session`` jobs queued or running, all
the sessions of one address ``max_inflight_per_address`` (public servers: ids are free to mint), and
at most ``concurrency + max_queue`` exist at once; beyond that :class:`Busy` (503 with Retry-After).
The engine's clock starts when the work starts; the wait for a worker is reported as ``queue_ms``
and counted in ``wall_ttft_ms`` (what the caller waited). Cancelling a job (a
client that disconnected, or abandoned the stream) stops it within one decode step.

This module also owns cache isolation: which prefix-cache namespace a session uses (a ``cache_salt``
is hashed with the session, so it never reaches another session's), and what of the cache a
session may see or clear. It never shows the text of another session's prompts.
Sessions themselves come from ``ui.sessions``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import queue
import threading
import time
import uuid
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, Sequence

import anyio

from backends import Backend, BackendInfo, BackendUnavailable, CannotClear, make_backend
from backends.local import LocalBackend
from cache import DEFAULT_NAMESPACE
from engine import Engine, EngineConfig, GenerationResult, final_result
from engine.snapshot import Snapshots
from engine.warm import unpin, warm
from ui.limits import MAX_PIN_TTL_S
from ui.schemas import WarmBody, parse_body
from ui.sessions import Session
from ui.settings import AppSettings

log = logging.getLogger(__name__)

Loader = Callable[..., Engine]


class NotReady(RuntimeError):
    """The model is still loading (or failed to load): REST answers 503."""


class NotAllowed(PermissionError):
    """Something this caller may not do here (pin anonymously, pin a public shared cache): REST answers 403."""


class Busy(RuntimeError):
    """Too many requests, from this client or from everyone: REST answers 503 with Retry-After (``ui.limits.RETRY_AFTER``)."""


class Job:
    """One generation: queued, then run by a worker. Iterate it for text deltas and the result.

    Leaving the iteration early (or calling :meth:`cancel`) stops the work within one decode step.
    """

    def __init__(self, session: Session, namespace: str, kwargs: dict[str, Any], on_cancel: Callable[["Job"], None], on_end: Callable[["Job"], None]) -> None:
        self.session = session  # what the in-flight limits count (its client and its address)
        self.cost = 2 if kwargs.get("verify") else 1  # a verified request runs twice: it counts twice against the limits
        self.namespace = namespace
        self.kwargs = kwargs
        self.cancelled = threading.Event()
        self.queued_at = time.monotonic()  # the wait for a worker is part of what the caller waited (queue_ms)
        self._items: queue.SimpleQueue = queue.SimpleQueue()
        self._on_cancel = on_cancel
        self._on_end = on_end

    @property
    def client(self) -> str:
        """What the round robin serves in turn: the session's client."""
        return self.session.client

    def cancel(self) -> None:
        """Stop the job: one still waiting leaves the queue now, a running one at its next token."""
        if not self.cancelled.is_set():
            self.cancelled.set()
            self._on_cancel(self)

    def __iter__(self) -> Iterator[str | GenerationResult]:
        try:
            while (item := _unpack(self._items.get())) is not _DONE:
                yield item
        finally:
            self.cancel()  # no-op after a normal end

    def result(self) -> GenerationResult:
        return final_result(iter(self))

    async def aresult(self) -> GenerationResult:
        """:meth:`result` for async handlers: cancelling the awaiting task cancels the job."""
        try:
            return await anyio.to_thread.run_sync(self.result, abandon_on_cancel=True)
        finally:
            self.cancel()

    async def aresult_unless(self, disconnected: Callable[[], Awaitable[bool]], poll_s: float = 0.2) -> GenerationResult | None:
        """:meth:`aresult`, or None (the job cancelled) as soon as ``disconnected()`` says the client left."""
        task = asyncio.ensure_future(self.aresult())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=poll_s)
                if done:
                    return task.result()
                if await disconnected():
                    self.cancel()
                    return None
        finally:
            task.cancel()

    async def aiter(self) -> AsyncIterator[str | GenerationResult]:
        """Iterate from async code; closing or cancelling the iteration cancels the job."""
        try:
            while (item := _unpack(await anyio.to_thread.run_sync(self._items.get, abandon_on_cancel=True))) is not _DONE:
                yield item
        finally:
            self.cancel()

    # ------------------------------------------------------------------ the worker's side

    def run(self, backend: Backend) -> None:
        try:
            if self.cancelled.is_set():
                return
            queue_ms = (time.monotonic() - self.queued_at) * 1000
            stream = backend.stream(self.namespace, **self.kwargs)
            try:
                for item in stream:
                    if self.cancelled.is_set():
                        return
                    if isinstance(item, GenerationResult):  # the engine's clock starts with the work: add the wait before it
                        item.timings["queue_ms"] = queue_ms
                        item.timings["wall_ttft_ms"] = item.timings.get("wall_ttft_ms", 0.0) + queue_ms
                    self._items.put(("item", item))
            finally:
                stream.close()  # runs the backend's own cleanup: the matched cache path is unlocked, a remote request closed
        except BackendUnavailable as exc:  # a remote that stopped answering: 503, like a model still loading
            self._items.put(("error", NotReady(str(exc))))
        except Exception as exc:  # handed to the consumer, which re-raises it in its own thread
            self._items.put(("error", exc))
        finally:
            self._items.put(("done", None))
            self._on_end(self)


class FairQueue:
    """Jobs waiting for a worker, served fairly across addresses, then across the sessions of each address.

    The next job is the oldest one of the session served least recently, within the address served
    least recently: an address that sends forty requests from eight sessions (ids are free to mint)
    waits behind itself, and a newcomer from another address goes next, whatever the others queued.
    A map from address to a map from client to a deque; a pick scans the addresses and clients that
    have jobs waiting, at most ``concurrency + max_queue`` of them.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._waiting: dict[str, dict[str, deque[Job]]] = {}  # address -> client -> its jobs, oldest first
        self._served: dict[str, int] = {}  # address or client -> the pick that last served it (absent: never, or long ago)
        self._picks = 0

    def put(self, job: Job) -> None:
        with self._cond:
            self._waiting.setdefault(job.session.address, {}).setdefault(job.client, deque()).append(job)
            self._cond.notify()

    def get(self) -> Job:
        with self._cond:
            while not self._waiting:
                self._cond.wait()
            address = min(self._waiting, key=lambda a: self._served.get(a, -1))
            clients = self._waiting[address]
            client = min(clients, key=lambda c: self._served.get(c, -1))
            job = clients[client].popleft()
            self._picks += 1
            self._served[address] = self._served[client] = self._picks
            self._drop_empty(address, client)
            return job

    def remove(self, job: Job) -> bool:
        """Take a waiting job out; False when a worker already has it."""
        with self._cond:
            jobs = self._waiting.get(job.session.address, {}).get(job.client)
            if jobs is None or job not in jobs:
                return False
            jobs.remove(job)
            self._drop_empty(job.session.address, job.client)
            return True

    def _drop_empty(self, address: str, client: str) -> None:
        """Forget an emptied client and address; keep the service record only of those still waiting (bounded)."""
        clients = self._waiting[address]
        if not clients[client]:
            del clients[client]
        if not clients:
            del self._waiting[address]
        if len(self._served) > 4096:
            waiting = set(self._waiting) | {c for cs in self._waiting.values() for c in cs}
            self._served = {k: v for k, v in self._served.items() if k in waiting or v > self._picks - 256}


class EngineService:
    """The app's one backend and the rules around it.

    Example:
        >>> service = EngineService(AppSettings()); service.start_loading()
        >>> service.wait_ready(timeout=60)
        >>> service.generate(session, prompt="Hi", max_new_tokens=8).text   # session: from ui.sessions
    """

    def __init__(self, settings: AppSettings, loader: Loader = Engine.from_pretrained, backend: Backend | None = None) -> None:
        self.settings = settings
        self.backend: Backend = backend or make_backend(settings, lambda: LocalBackend(settings.model, self._engine_settings(), loader))
        self._ready = False
        self._loaded = threading.Event()
        self.load_error: str | None = None
        self.progress_lines: list[str] = []
        self._waiting = FairQueue()
        self._lock = threading.Lock()
        self._inflight: dict[str, int] = {}  # client or address -> jobs queued or running; one at 0 is forgotten
        self._total = 0  # jobs queued or running, all clients together
        self._ephemeral: set[str] = set()  # namespaces of anonymous calls, dropped when their job ends
        self.snapshots: Snapshots | None = None  # with --cache-dir: the prefix cache on disk
        for i in range(settings.concurrency):
            threading.Thread(target=self._work, name=f"generate-{i}", daemon=True).start()

    # ------------------------------------------------------------------ loading

    def start_loading(self) -> None:
        """Load the model in a background thread; ``progress_lines`` fills as it goes."""
        threading.Thread(target=self._load, name="load-model", daemon=True).start()

    def _load(self) -> None:
        def progress(line: object) -> None:
            self.progress_lines.append(str(line))
            log.info("%s", line)

        try:
            self.backend.load(progress)
            if self.settings.cache_dir:
                self._open_snapshots(self.settings.cache_dir, progress)  # restored and checked before any request can use it
            self._ready = True
            if self.settings.warm_file:
                self._warm_from_file(self.settings.warm_file, progress)
        except Exception as exc:  # shown on the page and by /health; the server keeps running
            self.load_error = f"the model could not be loaded: {exc}" if self.backend.info().kind == "local" else f"the backend is not usable: {exc}"
            progress(self.load_error)
        finally:
            self._loaded.set()

    def _open_snapshots(self, directory: str, progress: Callable[[object], None]) -> None:
        """``--cache-dir``: restore the snapshot there (or start cold, saying why), then save every N minutes."""
        engine = getattr(self.backend, "engine", None)
        if engine is None:
            progress(f"--cache-dir {directory}: not used (a remote {self.backend.info().kind} server keeps its own cache)")
            return
        try:
            # Its own log lines (a refusal is a warning); here only the page's loading lines.
            self.snapshots = Snapshots(engine, directory, self._persisted, self.settings.cache_save_interval_min * 60, lambda line: self.progress_lines.append(line))
        except Exception as exc:  # an odd tokenizer or an unwritable path: serve without snapshots
            progress(f"--cache-dir {directory}: not used ({exc})")
            return
        self.snapshots.restore()
        self.snapshots.start_periodic()

    def _persisted(self, namespace: str) -> bool:
        """Which namespaces a snapshot keeps: the shared one; sessions' only with --persist-session-caches (never scratch or anonymous ones)."""
        if "/scenario-" in namespace or namespace in self._ephemeral:
            return False
        return namespace == DEFAULT_NAMESPACE or self.settings.persist_session_caches

    def save_cache(self) -> dict[str, Any]:
        """``POST /cache/save``: write the snapshot now. Only where the server is local (only its owner can call it).

        On a public server a visitor must not make the disk work (nor learn the cache's size from the
        reply): it saves every N minutes and at shutdown on its own.

        Raises:
            NotAllowed: on a public server. ValueError: no ``--cache-dir``. NotReady: still loading. OSError: the write failed.
        """
        self._backend_ready()
        if not self.settings.is_local:
            raise NotAllowed("the prefix cache is saved by the server itself (every few minutes and at shutdown); visitors of a public server cannot trigger a save")
        if self.snapshots is None:
            raise ValueError("this app has no --cache-dir (KVCI_CACHE_DIR), so there is nowhere to save the prefix cache")
        return self.snapshots.save()

    def stop(self) -> None:
        """A clean shutdown: save the prefix cache, if there is a cache dir."""
        if self.snapshots is not None:
            self.snapshots.stop()

    def _warm_from_file(self, path: str, progress: Callable[[object], None]) -> None:
        """``--warm-file``: prefill and pin each entry in the shared namespace; a bad file or entry is a warning
        on stderr (and a /health progress line), not a failed start: the app serves, colder."""

        def refused(line: str) -> None:
            progress(line)
            log.warning("%s", line)  # progress logs at INFO, which the app does not print

        try:
            entries = json.loads(Path(path).read_text(encoding="utf-8"))
            if not isinstance(entries, list):
                raise ValueError("the file must hold a JSON list")
        except (OSError, ValueError) as exc:
            refused(f"--warm-file {path}: not used ({exc})")
            return
        engine = getattr(self.backend, "engine", None)
        for i, entry in enumerate(entries):
            raw = {"system_prompt": entry} if isinstance(entry, str) else entry
            try:
                body = parse_body({**raw, "pin": True} if isinstance(raw, dict) else raw, WarmBody)
                done = warm(engine, body.message_dicts(), DEFAULT_NAMESPACE, pin=True, ttl_s=body.ttl_s)
                progress(f"Pinned warm-file entry {i}: {done['tokens']} tokens, {done['pinned_bytes']:,} bytes.")
            except (ValueError, AttributeError) as exc:
                refused(f"--warm-file {path}: entry {i} not pinned: {exc}")

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._loaded.wait(timeout) and self._ready

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def engine(self) -> Engine:
        """The local engine (the planner's tokenizer, tests); NotReady while loading or for a remote backend."""
        self._backend_ready()
        engine = getattr(self.backend, "engine", None)
        if engine is None:
            raise NotReady(f"this app measures a remote {self.backend.info().kind} server, which has no local engine")
        return engine

    def backend_info(self) -> BackendInfo:
        return self.backend.info()

    def status(self) -> dict[str, Any]:
        """What /health and the page header show."""
        info = self.backend.status() if self._ready else {}
        return {
            "ready": self.ready,
            "error": self.load_error,
            "progress": list(self.progress_lines[-6:]),
            "cache_mode": self.settings.cache_mode,
            "model": info.get("model"),
            "device": info.get("device"),
            "dtype": info.get("dtype"),
            "kv_dtype": info.get("kv_dtype"),
            "weights": info.get("weights_detail"),
            "decode": info.get("decode_compile"),
            "parameters": info.get("parameters"),
            "context_length": info.get("context_length"),
            "max_prompt_tokens": self.settings.prompt_token_limit or info.get("context_length"),
            "inflight": self.inflight,
            "backend": self.backend.info().to_dict(),
        }

    @property
    def inflight(self) -> int:
        """Generations queued or running, all clients together."""
        with self._lock:
            return self._total

    def _engine_settings(self) -> dict[str, Any]:
        """The app's engine settings, each passed only where this engine version has the field."""
        settings = {"cache_budget_mb": self.settings.cache_budget_mb, "max_prompt_tokens": self.settings.prompt_token_limit, "kv_dtype": self.settings.kv_dtype, "weights": self.settings.weights}
        if self.settings.per_session:
            settings["namespace_quota"] = self.settings.session_cache_share
        known = {f.name for f in dataclasses.fields(EngineConfig)}
        return {name: value for name, value in settings.items() if name in known and value is not None}

    # ------------------------------------------------------------------ sessions and namespaces

    def namespace_for(self, session: Session, cache_salt: str | None = None) -> str:
        """The prefix-cache namespace of a session: one shared namespace, or one per session.

        A ``cache_salt`` (vLLM's request field) selects a sub-namespace of the session's own,
        ``<session's namespace>/salt-<hash>``, hashed from the session's key and the salt: the same
        salt from another session is another namespace. The cache charges a namespace ``"owner/sub"``
        to its owner (the part before the first "/"): its quota and pin share, and clearing the
        owner clears its subs, so salts cannot take a session past its share (issue 21, finding 3).
        """
        own = f"session-{session.key[-32:]}" if self.settings.per_session else DEFAULT_NAMESPACE
        if cache_salt:
            return f"{own}/salt-" + hashlib.sha256(f"{session.key}\0{cache_salt}".encode()).hexdigest()[:32]
        return own

    @staticmethod
    def scratch_namespace(namespace: str) -> str:
        """A cold namespace for one scenario run (dropped afterwards), under the session's own."""
        return f"{namespace}/scenario-{uuid.uuid4().hex[:8]}"

    # ------------------------------------------------------------------ generation

    def stream(self, session: Session, namespace: str | None = None, cache_salt: str | None = None, **kwargs: Any) -> Job:
        """Queue a request (``Engine.stream`` arguments and ``stop``) in ``session``'s namespace
        (or ``namespace``; or the session's salted one for ``cache_salt``).

        Returns a :class:`Job`: iterate it (or ``aiter``) for text deltas, then the result.

        Raises:
            ValueError: bad input (raised here, before anything is queued, except a prompt too
                long for the context window, which surfaces on the first item).
            NotReady, Busy: the model is not loaded, or this client or the server has too many
                requests queued or running.
        """
        self._backend_ready()
        namespace = namespace or self.namespace_for(session, cache_salt)
        self.backend.check(namespace, **kwargs)  # validate now, so the caller gets a ValueError at once
        job = Job(session, namespace, kwargs, on_cancel=self._cancelled, on_end=self._ended)
        with self._lock:
            self._admit(session, job.cost)
            if session.anonymous and namespace != DEFAULT_NAMESPACE:  # nobody can name it again
                self._ephemeral.add(namespace)
        self._waiting.put(job)
        return job

    def warm(self, session: Session, messages: list[dict[str, str]], pin: bool = False, ttl_s: float | None = None) -> dict[str, Any]:
        """Prefill ``messages`` into the session's namespace (``engine/warm.py``), and pin the entry if asked.

        A warm is a request's work: it takes one of the session's in-flight places while it runs (on
        the caller's thread). Pinning is refused to an anonymous caller (its namespace dies with its
        call) and, on a public server, in the shared namespace (a visitor would hold everyone's
        budget); per-session, a pin lives at most ``MAX_PIN_TTL_S`` without a hit, within the
        session's own pin budget.

        Raises:
            NotAllowed: a pin this caller may not make. ValueError: bad input or a pin over budget.
            NotReady, Busy: as :meth:`stream`.
        """
        engine = self._pinning_engine(session, checked=pin)
        if pin and self.settings.per_session:
            ttl_s = min(ttl_s or MAX_PIN_TTL_S, MAX_PIN_TTL_S)
        with self._admitted(session):
            return warm(engine, messages, self.namespace_for(session), pin=pin, ttl_s=ttl_s)

    def unpin(self, session: Session, messages: list[dict[str, str]]) -> dict[str, Any]:
        """Drop the pin that warming ``messages`` made in the session's own namespace (``engine/warm.unpin``).

        The same rules as pinning: an anonymous caller has no pins, and a visitor of a public server
        cannot unpin the shared namespace. Another session's pin is out of reach: only the caller's
        own namespace is looked at, so that case reads as "nothing pinned".

        Returns:
            ``tokens``, ``unpinned`` (False: no such pin here) and a ``message`` saying which.

        Raises:
            NotAllowed, ValueError, NotReady, Busy: as :meth:`warm`.
        """
        engine = self._pinning_engine(session, checked=True)
        with self._admitted(session):
            done = unpin(engine, messages, self.namespace_for(session))
        what = f"{done['tokens']} tokens"
        message = f"Unpinned {what}: cached still, evictable again." if done["unpinned"] else f"Nothing to unpin: these {what} are not pinned in your cache."
        return {**done, "message": message}

    def _pinning_engine(self, session: Session, checked: bool) -> Engine:
        """The local engine for a warm or an unpin, after the pin rules when ``checked``; NotAllowed says which rule."""
        self._backend_ready()
        engine = getattr(self.backend, "engine", None)
        if engine is None:
            raise ValueError(f"warming and pinning need the local engine; this app measures a remote {self.backend.info().kind} server")
        if checked and session.anonymous:
            raise NotAllowed("an anonymous caller cannot pin or unpin: get a session id from POST /session and send it as Authorization: Bearer <id>")
        if checked and not self.settings.per_session and not self.settings.may_clear_everything:
            raise NotAllowed("the shared cache of a public server cannot be pinned or unpinned by a visitor")
        return engine

    @contextmanager
    def _admitted(self, session: Session) -> Iterator[None]:
        """One of the session's in-flight places, held on the caller's thread for a warm or an unpin."""
        with self._lock:
            self._admit(session, 1)
        try:
            yield
        finally:
            with self._lock:
                self._leave(session, 1)

    def _admit(self, session: Session, cost: int) -> None:
        """Take ``cost`` in-flight places for ``session``, or raise Busy. Caller holds ``_lock``.

        Three limits: the server's queue, the session's own (an anonymous caller's is its
        address's), and its address's over all its sessions, since a fresh id costs one POST.
        """
        counted = " (verify counts as two)" if cost > 1 else ""
        if self._total + cost > self.settings.concurrency + self.settings.max_queue:
            raise Busy(f"the server is busy ({self.settings.max_queue} requests waiting); try again in a few seconds")
        limit = self.settings.anonymous_inflight_limit if session.anonymous else self.settings.max_inflight_per_session
        if self._inflight.get(session.client, 0) + cost > limit:
            raise Busy(f"this session may have {limit} requests queued or running{counted}; wait for one to finish")
        limit = self.settings.address_inflight_limit
        if self._inflight.get(session.address, 0) + cost > limit:
            raise Busy(f"your address may have {limit} requests queued or running over all its sessions{counted}; wait for one to finish")
        for key in (session.client, session.address):
            self._inflight[key] = self._inflight.get(key, 0) + cost
        self._total += cost

    def _leave(self, session: Session, cost: int) -> None:
        """Give back ``cost`` in-flight places; a client or address at 0 is forgotten. Caller holds ``_lock``."""
        for key in (session.client, session.address):
            left = self._inflight.get(key, 0) - cost
            if left > 0:
                self._inflight[key] = left
            else:
                self._inflight.pop(key, None)
        self._total -= cost

    def generate(self, session: Session, namespace: str | None = None, **kwargs: Any) -> GenerationResult:
        """Run one request to completion on the pool."""
        return self.stream(session, namespace, **kwargs).result()

    def _work(self) -> None:
        while True:
            job = self._waiting.get()
            job.run(self.backend)

    def _cancelled(self, job: Job) -> None:
        if self._waiting.remove(job):  # never reached a worker: its slot is free now
            self._ended(job)

    def _ended(self, job: Job) -> None:
        with self._lock:
            self._leave(job.session, job.cost)
            ephemeral = job.namespace in self._ephemeral
            self._ephemeral.discard(job.namespace)
        if ephemeral:
            self.drop_namespace(job.namespace)  # an anonymous call's namespace lives for that call only

    # ------------------------------------------------------------------ what a session may see and do

    def stats(self, session: Session) -> dict[str, Any]:
        """Prefix-cache stats as a session may see them: its own namespace, or the shared one."""
        self._backend_ready()
        stats = self.backend.stats(self.namespace_for(session))
        if self.snapshots is not None:  # sizes of the saved cache only to whoever sees the whole cache
            stats["snapshot"] = self.snapshots.status(detailed=not self.settings.per_session)
        return {**stats, "cache_mode": self.settings.cache_mode, "scope": "session" if self.settings.per_session else "shared"}

    def clear(self, session: Session) -> dict[str, Any]:
        """Clear what this session may clear: everything (local, shared mode), else its own namespace.

        A shared cache on a public server is never cleared by a visitor: that would let anyone wipe
        everyone's prefixes (and learn from the next request's timing that it was wiped).
        """
        self._backend_ready()
        try:
            if self.settings.may_clear_everything:
                return {"cleared": "all", "message": self.backend.clear(None)}
            if self.settings.per_session:
                return {"cleared": "session", "message": self.backend.clear(self.namespace_for(session))}
        except CannotClear as exc:
            return {"cleared": "nothing", "message": str(exc)}
        return {"cleared": "nothing", "message": "the shared cache of a public server cannot be cleared by a visitor"}

    def drop_namespace(self, namespace: str) -> None:
        """Forget a scratch namespace (a scenario run's), entries and counters."""
        if self._ready:
            self.backend.drop(namespace)

    def entries(self, session: Session, own_sequences: Sequence[Sequence[int]] = ()) -> list[dict[str, Any]]:
        """The cache inspector's rows for a session, with a text preview only of the session's own tokens.

        In per-session mode the namespace holds only the session's own requests. In shared mode
        an entry's text is shown only when its whole path from the root is a prefix of a sequence
        this session sent or received itself; others' entries show sizes and counts, never text.
        Rows come depth first; ``id`` and ``parent`` give the tree's shape (the inspector's tree view).
        """
        self._backend_ready()
        own_all = self.settings.per_session
        rows, stack = [], []  # stack: (end position, path tokens, row id) of the ancestors of the current node
        for entry in self.backend.entries(self.namespace_for(session)):
            while stack and stack[-1][0] != entry.start:
                stack.pop()
            path = (stack[-1][1] if stack else ()) + entry.token_ids
            parent = stack[-1][2] if stack else None
            stack.append((entry.start + len(entry.token_ids), path, len(rows)))
            own = own_all or any(_is_prefix(path, seq) for seq in own_sequences)
            rows.append(
                {
                    "id": len(rows),  # depth-first index; the tree view draws from "id" and "parent"
                    "parent": parent,  # the parent node's id, None under the root
                    "start": entry.start,
                    "tokens": len(entry.token_ids),
                    "bytes": entry.nbytes,
                    "hits": entry.hits,
                    "last_used": entry.last_used,
                    "logits": entry.has_logits,
                    "locked": entry.locked,
                    "pinned": getattr(entry, "pinned", False),
                    "preview": _preview(self.backend.decode(entry.token_ids)) if own else "(another session's tokens)",
                }
            )
        return rows

    def _backend_ready(self) -> None:
        if not self._ready:
            raise NotReady(self.not_ready_reason())

    def not_ready_reason(self) -> str:
        """Why requests are refused before the model is ready: the load's error, or that it is still loading."""
        return self.load_error or "the model is still loading; try again in a few seconds"


# ---------------------------------------------------------------------- helpers


_DONE = object()


def _unpack(message: tuple[str, Any]) -> Any:
    """A worker's message as the consumer sees it: the item, ``_DONE``, or the worker's error raised here."""
    kind, value = message
    if kind == "error":
        raise value
    return _DONE if kind == "done" else value


def _is_prefix(prefix: Sequence[int], sequence: Sequence[int]) -> bool:
    return len(prefix) <= len(sequence) and tuple(sequence[: len(prefix)]) == tuple(prefix)


def _preview(text: str, limit: int = 90) -> str:
    """The start and the end of a node's text: the end is where prompts sharing the start differ."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    half = (limit - 3) // 2
    return f"{text[:half]} … {text[-half:]}"
