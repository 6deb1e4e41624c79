"""Admission and fairness: which generation runs next, and whether a new one may wait at all.

Every generation, whichever door it came in by (the Gradio queue, gradio_client or plain REST),
becomes a :class:`Job` run by one of ``concurrency`` worker threads. Waiting jobs are served fairly
across addresses, then across the sessions of each (not one FIFO), a client may have
``max_inflight_per_session`` jobs queued or running, all the sessions of one address
``max_inflight_per_address`` (public servers: ids are free to mint), and at most
``concurrency + max_queue`` exist at once; beyond that :class:`Busy` (503 with Retry-After).
The engine's clock starts when the work starts; the wait for a worker is reported as ``queue_ms``
and counted in ``wall_ttft_ms`` (what the caller waited). Cancelling a job (a client that
disconnected, or abandoned the stream) stops it within one decode step.

It leaves to others which namespace a job runs in and what ends with it (``ui.isolation``), and
loading the backend the workers run on (``ui.lifecycle``); ``ui.service`` puts the three together.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator

import anyio

from backends import Backend, BackendUnavailable
from engine import GenerationResult, final_result
from ui.lifecycle import NotReady
from ui.sessions import Session
from ui.settings import AppSettings


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
        self._wake: Callable[[], None] | None = None  # set by aiter(): tells its event loop an item is in
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
        """Iterate from async code; closing or cancelling the iteration cancels the job.

        The worker wakes the event loop itself (``call_soon_threadsafe``) when it puts an item: no
        thread of the pool blocks on the queue per token, one hand-off fewer per token.
        """
        loop, ready = asyncio.get_running_loop(), asyncio.Event()

        def wake() -> None:
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:  # the loop closed: nobody reads any more
                pass

        self._wake = wake
        try:
            while True:
                try:
                    packed = self._items.get_nowait()
                except queue.Empty:
                    ready.clear()
                    if self._items.empty():  # an item put before the clear is seen here, one after it sets ready
                        await ready.wait()
                    continue
                if (item := _unpack(packed)) is _DONE:
                    return
                yield item
        finally:
            self._wake = None
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
                    self._put(("item", item))
            finally:
                stream.close()  # runs the backend's own cleanup: the matched cache path is unlocked, a remote request closed
        except BackendUnavailable as exc:  # a remote that stopped answering: 503, like a model still loading
            self._put(("error", NotReady(str(exc))))
        except Exception as exc:  # handed to the consumer, which re-raises it in its own thread
            self._put(("error", exc))
        finally:
            self._put(("done", None))
            self._on_end(self)

    def _put(self, packed: tuple[str, Any]) -> None:
        self._items.put(packed)
        wake = self._wake
        if wake is not None:
            wake()


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


class Admission:
    """The three in-flight limits, the fair queue behind them, and the worker threads that drain it.

    Example:
        >>> admission = Admission(AppSettings(), backend)
        >>> admission.admit(session, job.cost); admission.put(job)   # Busy when a limit is reached
    """

    def __init__(self, settings: AppSettings, backend: Backend) -> None:
        self.settings = settings
        self._waiting = FairQueue()
        self._lock = threading.Lock()
        self._inflight: dict[str, int] = {}  # client or address -> jobs queued or running; one at 0 is forgotten
        self._total = 0  # jobs queued or running, all clients together
        for i in range(settings.concurrency):
            threading.Thread(target=self._work, args=(backend,), name=f"generate-{i}", daemon=True).start()

    def admit(self, session: Session, cost: int) -> None:
        """Take ``cost`` in-flight places for ``session``, or raise Busy.

        Three limits: the server's queue, the session's own (an anonymous caller's is its
        address's), and its address's over all its sessions, since a fresh id costs one POST.
        """
        counted = " (verify counts as two)" if cost > 1 else ""
        with self._lock:
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

    def leave(self, session: Session, cost: int) -> None:
        """Give back ``cost`` in-flight places; a client or address at 0 is forgotten."""
        with self._lock:
            for key in (session.client, session.address):
                left = self._inflight.get(key, 0) - cost
                if left > 0:
                    self._inflight[key] = left
                else:
                    self._inflight.pop(key, None)
            self._total -= cost

    @contextmanager
    def admitted(self, session: Session) -> Iterator[None]:
        """One of the session's in-flight places, held on the caller's thread for a warm or an unpin."""
        self.admit(session, 1)
        try:
            yield
        finally:
            self.leave(session, 1)

    def put(self, job: Job) -> None:
        """Queue an admitted job for the next free worker."""
        self._waiting.put(job)

    def withdraw(self, job: Job) -> bool:
        """Take a waiting job out of the queue; False when a worker already has it."""
        return self._waiting.remove(job)

    @property
    def inflight(self) -> int:
        """Generations queued or running, all clients together."""
        with self._lock:
            return self._total

    # ------------------------------------------------------------------ helpers

    def _work(self, backend: Backend) -> None:
        while True:
            job = self._waiting.get()
            job.run(backend)


# ---------------------------------------------------------------------- helpers


_DONE = object()


def _unpack(message: tuple[str, Any]) -> Any:
    """A worker's message as the consumer sees it: the item, ``_DONE``, or the worker's error raised here."""
    kind, value = message
    if kind == "error":
        raise value
    return _DONE if kind == "done" else value
