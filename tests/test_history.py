"""Step 8 after the reply (engine/history.py): a streamed reply is stored in idle time, by the turn that
continues it, or skipped under load or after a clear, and every path keeps the tokens of a fresh run."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

from engine import Engine, final_result
from engine.history import Backlog, Reply
from engine.scheduler import PAUSE, scheduler

SYSTEM = "You are a careful assistant. Answer briefly and precisely, in plain words. " * 3
N = 12  # a reply of several chunks (the tiny engine's chunk is 4 tokens)


@contextmanager
def busy():
    """Keep the model's thread from being idle (a flow pausing between 'chunks'), so that idle-time work waits."""
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            time.sleep(0.001)
            yield PAUSE

    ticket = scheduler().submit(spin())
    try:
        yield
    finally:
        stop.set()
        ticket.wait()


def stream(engine: Engine, prompt: str, **kwargs):
    return final_result(engine.stream(prompt, system_prompt=SYSTEM, max_new_tokens=N, **kwargs))


def fresh(engine: Engine, prompt: str, **kwargs) -> list[int]:
    return engine.generate(prompt, system_prompt=SYSTEM, max_new_tokens=N, use_cache=False, use_prefix_cache=False, **kwargs).token_ids


def settle(engine: Engine) -> dict:
    """Wait until the backlog is empty and nothing is being stored; its counters."""
    while True:
        info = scheduler().call(engine._history.info)
        if info["waiting"] == 0 and not engine._history.storing:
            return info
        time.sleep(0.01)


def test_a_streamed_reply_is_stored_when_the_thread_is_idle(tiny_engine):
    first = stream(tiny_engine, "What is machine learning?")
    assert first.timings["history_prefill_ms"] == 0  # the stream ended before its reply was stored
    assert settle(tiny_engine)["stored"] == 1
    history = [{"role": "user", "content": "What is machine learning?"}, {"role": "assistant", "content": first.text}]
    second = stream(tiny_engine, "Tell me more.", history=history)
    assert second.timings["prefix_tokens_saved"] > len(first.prompt_token_ids)  # the whole history, reply included
    assert second.timings["history_prefill_ms"] == 0  # nothing left to store first
    assert second.token_ids == fresh(tiny_engine, "Tell me more.", history=history)


def test_the_next_turn_stores_its_history_first_while_the_thread_is_busy(tiny_engine):
    """Under load the reply waits; the turn that continues it stores it before its lookup, and hits all of it."""
    with busy():
        first = stream(tiny_engine, "What is machine learning?")
        assert scheduler().call(tiny_engine._history.info)["waiting"] == 1
        history = [{"role": "user", "content": "What is machine learning?"}, {"role": "assistant", "content": first.text}]
        other = stream(tiny_engine, "Name three prime numbers.")  # shares the system prompt only: does not take it
        assert scheduler().call(tiny_engine._history.info)["waiting"] == 2
        second = stream(tiny_engine, "Tell me more.", history=history)
        info = scheduler().call(tiny_engine._history.info)
    assert info["promoted"] == 1 and info["waiting"] == 2, info  # the other reply still waits, and so does the second turn's
    assert second.timings["history_prefill_ms"] > 0
    assert second.timings["prefix_tokens_saved"] > len(first.prompt_token_ids)
    assert second.token_ids == fresh(tiny_engine, "Tell me more.", history=history)
    assert other.token_ids == fresh(tiny_engine, "Name three prime numbers.")


def test_a_clear_skips_the_replies_waiting_and_generate_waits_for_its_own(tiny_engine):
    with busy():
        stream(tiny_engine, "What is machine learning?")
        tiny_engine.cache.clear()
    info = settle(tiny_engine)
    assert info["skipped"] == 1 and info["stored"] == 0, info
    assert tiny_engine.cache.stats()["cached_tokens"] == 0  # the clear was not undone by a late insert
    result = tiny_engine.generate("What is machine learning?", system_prompt=SYSTEM, max_new_tokens=N)
    assert result.timings["history_prefill_ms"] > 0 and scheduler().call(tiny_engine._history.info)["stored"] == 1


def test_the_backlog_skips_its_oldest_reply_past_its_limit():
    backlog = Backlog(limit=2, limit_tokens=100)
    replies = [Reply(None, object(), 20, list(range(10)), 4, "ns", 0) for _ in range(3)]
    for reply in replies:
        backlog.add(reply)
    assert replies[0].done.is_set() and replies[0].outcome == "skipped" and replies[0].model_cache is None
    assert backlog.info() == {"waiting": 2, "stored": 0, "promoted": 0, "skipped": 1} and backlog.held_tokens == 40
    assert backlog.take_continued(list(range(9)), "other", 4) == []
    assert backlog.take_continued(list(range(9)), "ns", 4) == replies[1:]  # 4 + one chunk of 4 tokens shared
    assert backlog.held_tokens == 0
    big = Reply(None, object(), 80, list(range(10)), 4, "ns", 0)
    backlog.add(Reply(None, object(), 30, list(range(10)), 4, "ns", 0))
    backlog.add(big)  # 110 tokens held: the older one goes
    assert backlog.info()["waiting"] == 1 and backlog.take_oldest() is big
    assert Reply(None, None, 8, list(range(7)), 4, "ns", 0).continued_by(list(range(7)), "ns", 4) is False  # less than a whole chunk past its prompt
