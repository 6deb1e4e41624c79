"""The model's one thread: every request's prefill chunks and decode steps run here, the decode steps batched.

A request's flow (``Engine._generate_tokens``) is a generator that computes on this thread and
yields where it needs the scheduler:

- an ``int``: a new token, passed on to the request's consumer (:class:`Ticket`);
- :class:`Decode`: one decode step. The scheduler runs the waiting steps of every running request
  of the same decoder as one batched call (``FastDecoder.decode_batch``: one read of the weights
  for all of them) and sends each flow back its :class:`Step`;
- :data:`PAUSE`: a prefill chunk is done. At most one chunk of prefill runs between two decode
  steps, so a long prompt arriving stalls the running streams by one chunk, not by its whole prefill;
- :class:`Until`: wait for an event (the background compile) without holding the thread.

A flow submitted with ``background=True`` (storing a finished reply, ``engine/history.py``) runs only
when no request needs the thread: nobody waits for it, and it never delays a step.

New requests join between steps and finished or cancelled ones leave: continuous batching, as
vLLM's and SGLang's schedulers do it, on one thread. That the rows of a batch are each the bits of
the request alone is the decode step's business (``engine.decode_attention``,
``FastDecoder.check_rows_invariant``), not the scheduler's.

Why one thread for all model work, not one per request: on a 2-core host, torch's OpenMP runtime
(libgomp) keeps a team of threads per thread that ever ran a parallel op, and once it manages more
threads than there are cores it stops spinning between parallel regions and sleeps instead. One
idle team alive in another thread cut the compiled int4 step from 86-103 to 51-66 tok/s (measured in
``benchmark/README.md``, "Continuous batching and the served path"), and that was where the served path lost half the
engine's speed. So the consumer threads only wait, detokenize and send; everything that runs the
model, samples or copies KV runs here, and so does :meth:`Scheduler.call` work (loading, warming).

Knows nothing about HTTP, tokenizers or the prefix cache.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Generator, Iterator

import torch

log = logging.getLogger("kvci.scheduler")


@dataclass
class Decode:
    """A flow's request for one decode step of ``token`` at ``model_cache``'s next position, on ``decoder``, in batches of at most ``max_batch``."""

    decoder: Any
    token: int
    model_cache: Any
    max_batch: int


@dataclass
class Step:
    """What a flow gets back for its :class:`Decode`: the logits after its token (float32 ``[vocab]``) and how many requests the step ran."""

    logits: torch.Tensor
    batch_size: int


@dataclass
class Until:
    """Park the flow until ``event`` is set."""

    event: threading.Event


PAUSE = object()  # a prefill chunk is done: let the running requests decode a step
Flow = Generator[Any, Any, Any]


class Ticket:
    """A submitted flow, as its consumer sees it: iterate for its tokens; its return value is :attr:`value` after.

    Leaving the iteration early (or :meth:`cancel`) stops the flow before its next step; its
    ``finally`` blocks run on the scheduler's thread.
    """

    def __init__(self, flow: Flow, background: bool = False) -> None:
        self.flow = flow
        self.background = background
        self.value: Any = None
        self.cancelled = threading.Event()
        self._items: queue.SimpleQueue = queue.SimpleQueue()

    def cancel(self) -> None:
        self.cancelled.set()

    def __iter__(self) -> Iterator[int]:
        try:
            while True:
                kind, item = self._items.get()
                if kind == "token":
                    yield item
                elif kind == "error":
                    raise item
                else:
                    return
        finally:
            self.cancel()  # no-op after the end

    def wait(self) -> Any:
        """Drain the flow; its return value."""
        for _ in self:
            pass
        return self.value


class Scheduler:
    """The thread that runs every flow of the process. Use :func:`scheduler` for the process's one instance.

    Example:
        >>> ticket = scheduler().submit(engine._generate_tokens(run))
        >>> tokens = list(ticket)
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._inbox: deque[Ticket | "_Call"] = deque()
        self._ready: deque[tuple[Ticket, Any]] = deque()  # flows to advance, with the value to send them
        self._prefilling: deque[Ticket] = deque()  # flows paused between prefill chunks
        self._decoding: list[tuple[Ticket, Decode]] = []  # flows waiting for a decode step
        self._parked: list[tuple[Ticket, Until]] = []
        self._background: deque[Ticket] = deque()  # flows that run when nothing else needs the thread
        self.chunks_per_step = 1  # prefill chunks between two decode steps; 0: prefills run to their end (benchmark/batch_bench.py compares)
        self._live = 0  # flows started and not yet ended
        self.busy_s = {"decode": 0.0, "flows": 0.0, "background": 0.0}  # the thread's time in batched steps, in flows (prefill chunks, sampling, inserts), in idle-time work
        self.steps = 0  # batched decode steps run, for the page and the tests
        self.batch_histogram: dict[int, int] = {}  # batch size -> steps run at it
        self._thread = threading.Thread(target=self._loop, name="kvci-engine", daemon=True)
        self._thread.start()

    @property
    def on_thread(self) -> bool:
        """Whether the caller is the scheduler's own thread (where a flow or a call runs)."""
        return threading.current_thread() is self._thread

    def submit(self, flow: Flow, background: bool = False) -> Ticket:
        """Start running ``flow`` (it joins the running requests before the next step).

        ``background``: run it only while no other flow needs the thread, a prefill chunk at a time
        (work nobody waits for); it does not count in :meth:`running`.
        """
        ticket = Ticket(flow, background)
        with self._cond:
            self._inbox.append(ticket)
            self._cond.notify()
        return ticket

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` on the scheduler's thread, between two steps, and return what it returns (or raise what it raised).

        For model work outside a request (loading, warming, a snapshot's check). On the scheduler's
        thread itself it simply calls ``fn``.
        """
        if self.on_thread:
            return fn(*args, **kwargs)
        return self._inbox_call(fn, *args, **kwargs).result()

    def _inbox_call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> "_Call":
        call = _Call(fn, args, kwargs)
        with self._cond:
            self._inbox.append(call)
            self._cond.notify()
        return call

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Keep the thread between two steps while the block runs: flows submitted meanwhile all join at the next step.

        For tests and benchmarks that need a batch of known requests (``tests/test_exact.py``).
        """
        entered, leave = threading.Event(), threading.Event()
        self._inbox_call(lambda: (entered.set(), leave.wait()))
        entered.wait()
        try:
            yield
        finally:
            leave.set()

    def idle(self) -> bool:
        """No flow but background ones needs the thread."""
        return not (self._inbox or self._ready or self._prefilling or self._decoding)

    def pending(self) -> int:
        """Flows submitted and not yet started."""
        with self._cond:
            return sum(isinstance(item, Ticket) for item in self._inbox)

    def running(self) -> int:
        """Flows started and not yet ended."""
        return self._live

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            for item in self._take_new():
                if isinstance(item, _Call):
                    item.run()
                elif item.background:
                    self._background.append(item)
                else:  # its start, up to its first pause, counts as a prefill chunk
                    self._live += 1
                    self._prefilling.append(item)
            self._unpark()
            while self._ready:  # every flow with a value (a step's logits, or its start) runs to its next yield
                ticket, value = self._ready.popleft()
                self._advance(ticket, value)
            self._prefill()
            self._decode_step()
            if self._background and self.idle():
                self._advance(self._background.popleft(), None)  # up to its next pause

    def _prefill(self) -> None:
        """Prefill chunks before the next decode step: ``chunks_per_step`` while requests decode (a stream's
        stall is that many chunks), else one chunk of every prefilling request in turn."""
        if not self._decoding:
            for _ in range(len(self._prefilling)):
                self._advance(self._prefilling.popleft(), None)
            return
        done = 0
        while self._prefilling and (not self.chunks_per_step or done < self.chunks_per_step):
            self._advance(self._prefilling.popleft(), None)
            done += 1

    def _take_new(self) -> list[Any]:
        """New flows and calls; sleeps while there is nothing to do at all."""
        with self._cond:
            self._unpark()
            while not (self._inbox or self._ready or self._prefilling or self._decoding or self._background):
                if self._parked:
                    self._cond.wait(timeout=0.05)
                    self._unpark()
                    if self._prefilling or self._background:
                        break
                else:
                    self._cond.wait()
            new = list(self._inbox)
            self._inbox.clear()
            return new

    def _unpark(self) -> None:
        still = []
        for ticket, until in self._parked:
            if until.event.is_set() or ticket.cancelled.is_set():
                if ticket.background:
                    self._background.appendleft(ticket)
                else:  # up to its next yield counts as a prefill chunk, as a start does: many woken at once take turns between steps
                    self._prefilling.append(ticket)
            else:
                still.append((ticket, until))
        self._parked = still

    def _advance(self, ticket: Ticket, value: Any) -> None:
        """Run ``ticket``'s flow until it needs the scheduler (a step, a pause, an event) or ends."""
        t0 = time.perf_counter()
        try:
            self._run_flow(ticket, value)
        finally:
            self.busy_s["background" if ticket.background else "flows"] += time.perf_counter() - t0

    def _run_flow(self, ticket: Ticket, value: Any) -> None:
        try:
            while True:
                if ticket.cancelled.is_set():
                    ticket.flow.close()  # its finally blocks (releasing what it holds) run here
                    self._end(ticket, ("done", None))
                    return
                item = ticket.flow.send(value)
                value = None
                if isinstance(item, int):
                    ticket._items.put(("token", item))
                elif isinstance(item, Decode):
                    self._decoding.append((ticket, item))
                    return
                elif item is PAUSE:
                    if ticket.background:
                        self._background.appendleft(ticket)  # the next idle moment goes on with it
                    else:
                        self._prefilling.append(ticket)
                    return
                elif isinstance(item, Until):
                    self._parked.append((ticket, item))
                    return
                else:
                    raise AssertionError(f"a flow yielded {item!r}")
        except StopIteration as stop:
            ticket.value = stop.value
            self._end(ticket, ("done", None))
        except BaseException as exc:  # the request's error, raised in its consumer; the thread goes on
            self._end(ticket, ("error", exc))

    def _end(self, ticket: Ticket, message: tuple[str, Any]) -> None:
        if not ticket.background:
            self._live -= 1
        ticket._items.put(message)

    def _decode_step(self) -> None:
        """One batched step per decoder for the flows waiting on one (at most its ``max_batch``; the rest wait a step, oldest first)."""
        if not self._decoding:
            return
        waiting, self._decoding = self._decoding, []
        by_decoder: dict[int, list[tuple[Ticket, Decode]]] = {}
        for ticket, decode in waiting:
            if ticket.cancelled.is_set():
                self._ready.append((ticket, None))  # closed at its next advance
                continue
            by_decoder.setdefault(id(decode.decoder), []).append((ticket, decode))
        for group in by_decoder.values():
            limit = max(group[0][1].max_batch, 1)
            batch, later = group[:limit], group[limit:]
            self._decoding.extend(later)
            decoder = batch[0][1].decoder
            t0 = time.perf_counter()
            try:
                logits = decoder.decode_batch([d.token for _, d in batch], [d.model_cache for _, d in batch])
            except BaseException as exc:  # a failed step fails the requests in it, not the thread
                for ticket, _ in batch:
                    ticket.flow.close()
                    self._end(ticket, ("error", exc))
                continue
            self.steps += 1
            self.busy_s["decode"] += time.perf_counter() - t0
            self.batch_histogram[len(batch)] = self.batch_histogram.get(len(batch), 0) + 1
            for row, (ticket, _) in enumerate(batch):
                self._ready.append((ticket, Step(logits[row], len(batch))))


class _Call:
    """A function to run on the scheduler's thread, and its outcome."""

    def __init__(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self._done = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None

    def run(self) -> None:
        try:
            self._value = self.fn(*self.args, **self.kwargs)
        except BaseException as exc:
            self._error = exc
        finally:
            self._done.set()

    def result(self) -> Any:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


_instance: Scheduler | None = None
_instance_lock = threading.Lock()


def scheduler() -> Scheduler:
    """The process's one scheduler, started on first use."""
    global _instance
    with _instance_lock:
        if _instance is None:
            _instance = Scheduler()
        return _instance
