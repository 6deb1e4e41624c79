"""The scheduler (engine/scheduler.py) with scripted flows and a fake decoder: batching, joining and leaving, chunked prefill, errors, cancellation."""

from __future__ import annotations

import threading
import time
from typing import Iterator

import pytest
import torch

from engine.scheduler import PAUSE, Decode, Scheduler, Until


class FakeDecoder:
    """Logits row b = 10 * token_b + position of the call; records the batch of every call.

    ``step_s``: each call sleeps that long, as a real step takes milliseconds (a flow submitted after a
    running one's first token then finds it still running).
    """

    def __init__(self, fail_on: int | None = None, step_s: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.fail_on = fail_on
        self.step_s = step_s

    def decode_batch(self, tokens: list[int], caches: list) -> torch.Tensor:
        time.sleep(self.step_s)
        self.batches.append(list(tokens))
        if self.fail_on in tokens:
            raise RuntimeError("injected step failure")
        return torch.tensor([[10.0 * t] for t in tokens])


def decoding(decoder, first: int, steps: int, max_batch: int = 8, chunks: int = 0, log: list | None = None):
    """A flow like a request's: ``chunks`` prefill chunks (pausing between them), then ``steps`` decode steps, yielding each token."""
    for c in range(chunks):
        if log is not None:
            log.append(("chunk", first, c))
        if c < chunks - 1:
            yield PAUSE
    token = first
    for _ in range(steps):
        step = yield Decode(decoder, token, None, max_batch)
        token = int(step.logits[0]) // 10 + 1
        if log is not None:
            log.append(("step", first, step.batch_size))
        yield token
    return "finished"


def decoding_now(scheduler: Scheduler, flow) -> Iterator[int]:
    """Submit ``flow`` and wait for its first token: a request that is decoding. Its remaining tokens."""
    tokens = iter(scheduler.submit(flow))
    next(tokens)
    return tokens


def run_held(scheduler: Scheduler, flows: list) -> list:
    """Submit ``flows`` while the scheduler is held, so that they start at the same step; their tickets."""
    with scheduler.hold():
        tickets = [scheduler.submit(flow) for flow in flows]
    return tickets


def test_running_flows_share_one_decode_call_per_step_and_get_their_own_rows():
    """Four flows decoding at once: one call per step with all four tokens, each flow gets its own row back."""
    decoder, scheduler = FakeDecoder(), Scheduler()
    tickets = run_held(scheduler, [decoding(decoder, first, 3) for first in (100, 200, 300, 400)])
    assert [list(t) for t in tickets] == [[first + 1, first + 2, first + 3] for first in (100, 200, 300, 400)]
    assert [t.value for t in tickets] == ["finished"] * 4
    assert [len(batch) for batch in decoder.batches] == [4, 4, 4]


def test_max_batch_splits_the_waiting_steps_oldest_first():
    """Beyond max_batch, the rest wait for the next step: no step is larger than the limit, and nobody starves."""
    decoder, scheduler = FakeDecoder(), Scheduler()
    tickets = run_held(scheduler, [decoding(decoder, first, 2, max_batch=3) for first in range(100, 600, 100)])
    assert all(len(list(t)) == 2 for t in tickets)
    assert max(len(b) for b in decoder.batches) == 3 and sum(len(b) for b in decoder.batches) == 10


def test_a_flow_joins_between_steps_and_leaves_when_done():
    """A short flow leaves the batch when it ends; a later one joins a running batch at the next step."""
    decoder, scheduler = FakeDecoder(step_s=0.002), Scheduler()
    log: list = []
    tokens = decoding_now(scheduler, decoding(decoder, 100, 40, log=log))
    short = scheduler.submit(decoding(decoder, 900, 3, log=log))
    assert list(short) == [901, 902, 903]
    rest = list(tokens)
    assert len(rest) == 39
    sizes = [size for kind, first, size in log if kind == "step" and first == 100]
    assert 2 in sizes and sizes[-1] == 1, sizes  # it decoded beside the short flow, then alone again


def test_one_prefill_chunk_runs_between_two_decode_steps():
    """A long prompt arriving while another request decodes: its chunks alternate with the running request's steps."""
    decoder, scheduler = FakeDecoder(step_s=0.002), Scheduler()
    log: list = []
    tokens = decoding_now(scheduler, decoding(decoder, 100, 30, log=log))
    long_prompt = scheduler.submit(decoding(decoder, 500, 1, chunks=6, log=log))
    list(long_prompt)
    list(tokens)
    order = [entry for entry in log if entry[1] == 500 or entry[0] == "step"]
    first_chunk = order.index(("chunk", 500, 0))
    window = order[first_chunk : first_chunk + 11]
    assert [kind for kind, *_ in window] == ["chunk", "step"] * 5 + ["chunk"], window


def test_a_failing_flow_and_a_failing_step_fail_only_their_requests():
    """A flow that raises gets its error in its consumer; a step that raises fails the requests in it; the scheduler goes on."""
    scheduler = Scheduler()

    def broken():
        yield 1
        raise ValueError("bad request")

    ticket = scheduler.submit(broken())
    with pytest.raises(ValueError, match="bad request"):
        list(ticket)
    failing = FakeDecoder(fail_on=7)
    with pytest.raises(RuntimeError, match="injected step failure"):
        list(scheduler.submit(decoding(failing, 7, 2)))
    assert list(scheduler.submit(decoding(FakeDecoder(), 100, 2))) == [101, 102]
    assert scheduler.call(lambda: threading.current_thread().name) == "kvci-engine"
    with pytest.raises(KeyError):
        scheduler.call(lambda: {}["missing"])


def test_a_cancelled_flow_leaves_at_the_next_step_and_its_cleanup_runs_on_the_scheduler():
    """Closing the consumer's iteration cancels the flow: it is closed before its next step, its finally block runs on the model's thread."""
    decoder, scheduler = FakeDecoder(), Scheduler()
    cleaned: list[str] = []

    def flow():
        try:
            yield from decoding(decoder, 100, 1000)
        finally:
            cleaned.append(threading.current_thread().name)

    tokens = decoding_now(scheduler, flow())
    tokens.close()
    deadline = time.monotonic() + 30
    while scheduler.running():
        assert time.monotonic() < deadline, "the cancelled flow is still running"
        time.sleep(0.01)
    assert cleaned == ["kvci-engine"] and len(decoder.batches) < 1000


def test_a_flow_waiting_for_an_event_does_not_hold_the_others():
    """Until(event) parks a flow (the compile): others decode meanwhile, and it resumes once the event is set."""
    decoder, scheduler, event = FakeDecoder(), Scheduler(), threading.Event()

    def waiting():
        yield Until(event)
        yield from decoding(decoder, 500, 1)

    parked = scheduler.submit(waiting())
    assert list(scheduler.submit(decoding(decoder, 100, 3))) == [101, 102, 103]
    event.set()
    assert list(parked) == [501]


def background(log: list, name: str, chunks: int):
    """Idle-time work like storing a reply: ``chunks`` prefill chunks, pausing between them."""
    for c in range(chunks):
        log.append(("background", name, c))
        if c < chunks - 1:
            yield PAUSE


def test_background_flows_run_only_when_no_request_needs_the_thread():
    """Work submitted with background=True waits while a request decodes, then runs; a request arriving meanwhile goes first at the next pause."""
    decoder, scheduler = FakeDecoder(step_s=0.002), Scheduler()
    log: list = []
    tokens = decoding_now(scheduler, decoding(decoder, 100, 20, log=log))
    done = scheduler.submit(background(log, "a", 3), background=True)
    assert scheduler.running() == 1  # background work is not a running request
    list(tokens)
    done.wait()
    kinds = [entry[0] for entry in log]
    assert kinds.index("background") > max(i for i, kind in enumerate(kinds) if kind == "step"), log  # after the last step
    # Arriving while background work is under way: the request's steps do not wait for the rest of it.
    log.clear()
    started = threading.Event()

    def long_background():
        for c in range(50):
            log.append(("background", "b", c))
            started.set()
            time.sleep(0.002)
            yield PAUSE

    later = scheduler.submit(long_background(), background=True)
    started.wait()
    request = scheduler.submit(decoding(decoder, 300, 5, log=log))
    assert list(request) == [301, 302, 303, 304, 305]
    later.wait()
    steps = [i for i, entry in enumerate(log) if entry[0] == "step"]
    assert 0 < steps[0] and steps[-1] < len(log) - 1, log  # it arrived during the background work, which finished after it
    assert [entry for entry in log[steps[0] : steps[-1]] if entry[0] == "background"] == [], log  # none of it between two of the request's steps


def test_flows_woken_together_take_turns_between_decode_steps():
    """Several flows parked on one event (requests waiting for a shared prompt's prefill) wake at once:
    each one's run up to its next pause counts as a prefill chunk, so a running stream gets a step between two of them."""
    decoder, scheduler, event = FakeDecoder(step_s=0.002), Scheduler(), threading.Event()
    log: list = []

    def waiter(name: int):
        yield Until(event)
        log.append(("chunk", name, 0))  # its first chunk, right after waking
        yield PAUSE
        log.append(("chunk", name, 1))

    tokens = decoding_now(scheduler, decoding(decoder, 100, 60, log=log))
    waiters = [scheduler.submit(waiter(n)) for n in range(4)]
    while sum(1 for kind, *_ in log if kind == "step") < 3:  # parked, and the stream decoding
        time.sleep(0.001)
    event.set()
    for ticket in waiters:
        ticket.wait()
    list(tokens)
    chunks = [i for i, entry in enumerate(log) if entry[0] == "chunk"]
    assert len(chunks) == 8
    assert all(any(entry[0] == "step" for entry in log[a:b]) for a, b in zip(chunks, chunks[1:])), log  # a step between any two chunks
