"""The engine under faults and memory pressure: failures leave the cache whole, memory stays bounded."""

from __future__ import annotations

import os

import psutil
import torch
import pytest

from engine import Engine, EngineConfig

SYSTEM = "You are a careful assistant. Answer briefly and precisely, in plain words. " * 3
QUESTION = "What is machine learning?"


def assert_cache_consistent(engine: Engine) -> None:
    entries = engine.cache.entries()
    assert engine.cache.cached_bytes == sum(e.nbytes for e in entries) <= engine.cache.budget_bytes
    assert not any(e.locked for e in entries), "a failed request left part of the tree locked"


@pytest.mark.parametrize("fail_at_call", [1, 3])  # 1: during prefill; 3: mid-decode
def test_model_failure_mid_generation(tiny_engine, monkeypatch, fail_at_call):
    """The model raises: the caller gets the error, the cache holds nothing half-written, the next request works."""
    expected = tiny_engine.generate(QUESTION, system_prompt=SYSTEM, max_new_tokens=6, use_prefix_cache=False).token_ids
    import engine.engine as flow

    calls = []

    def flaky(real):
        def call(*args, **kwargs):
            calls.append(1)
            if len(calls) == fail_at_call:
                raise RuntimeError("injected fault")
            return real(*args, **kwargs)
        return call

    with monkeypatch.context() as patch:  # the model's two doors: the prefill, and the decode step
        patch.setattr(flow, "prefill_chunks", flaky(flow.prefill_chunks))
        patch.setattr(tiny_engine.decoder, "decode_batch", flaky(tiny_engine.decoder.decode_batch))
        with pytest.raises(RuntimeError, match="injected fault"):
            tiny_engine.generate(QUESTION, system_prompt=SYSTEM, max_new_tokens=6)
    assert_cache_consistent(tiny_engine)
    again = tiny_engine.generate(QUESTION, system_prompt=SYSTEM, max_new_tokens=6)
    assert again.token_ids == expected
    # A prefill fault stored nothing; a decode fault had already stored the (complete) prompt.
    assert again.cache_status == ("miss" if fail_at_call == 1 else "hit")


def test_abandoned_stream_releases_its_locks(tiny_engine):
    """A client that stops reading a stream half-way leaves no locked entries behind."""
    stream = tiny_engine.stream(QUESTION, system_prompt=SYSTEM, max_new_tokens=8)
    next(stream)
    stream.close()
    assert_cache_consistent(tiny_engine)


def test_clear_during_generation_does_not_break_the_request(tiny_engine):
    """Clearing the cache while a request decodes: that request still finishes with the right tokens."""
    expected = tiny_engine.generate(QUESTION, system_prompt=SYSTEM, max_new_tokens=8, use_prefix_cache=False).token_ids
    tiny_engine.generate(QUESTION, system_prompt=SYSTEM, max_new_tokens=8)
    items = []
    for item in tiny_engine.stream(QUESTION, system_prompt=SYSTEM, max_new_tokens=8):
        items.append(item)
        if len(items) == 1:
            tiny_engine.cache.clear()
    result = items[-1]
    assert result.cache_status == "hit" and result.token_ids == expected
    assert_cache_consistent(tiny_engine)


def test_flood_stays_within_budget_and_memory_settles(tiny_model, tokenizer):
    """500 unique ~300-token prompts under a small budget: never over budget, evictions counted, RSS flat."""
    budget_mb = 4
    engine = Engine(tiny_model, tokenizer, EngineConfig(cache_budget_mb=budget_mb, min_cached_tokens=20))
    process = psutil.Process(os.getpid())
    words = "river stone cloud lamp forest paper window garden silver orange".split()
    rss = []
    for i in range(500):
        prompt = f"Request {i}: " + " ".join(words[(i * 7 + j * 3) % len(words)] + str(j * i % 97) for j in range(100))
        result = engine.generate(prompt, max_new_tokens=1)
        assert engine.cache.cached_bytes <= engine.cache.budget_bytes
        rss.append(process.memory_info().rss)
    assert result.timings["prompt_tokens"] > 250
    stats = engine.cache.stats()
    assert stats["evictions"] > 100 and stats["misses"] + stats["partial_hits"] + stats["hits"] == 500
    growth_mb = (max(rss[-100:]) - rss[-100]) / (1 << 20)
    assert growth_mb < 32, f"RSS grew by {growth_mb:.1f} MiB over the last 100 requests"


def test_out_of_memory_in_the_kv_copy_does_not_kill_the_reply(tiny_engine, monkeypatch):
    """An insert whose copy runs out of memory: the reply completes with the right tokens, the failure is
    counted, and the tree is exactly as before."""
    expected = tiny_engine.generate(QUESTION, system_prompt=SYSTEM, max_new_tokens=6, use_prefix_cache=False).token_ids
    tiny_engine.generate("Another question, cached first.", system_prompt=SYSTEM, max_new_tokens=2)
    shape = lambda: ([(e.start, e.token_ids, e.nbytes, e.has_logits) for e in tiny_engine.cache.entries()], tiny_engine.pool.num_free)
    before = shape()

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("injected: CUDA out of memory")

    monkeypatch.setattr(tiny_engine.pool, "write_kv", out_of_memory)
    result = tiny_engine.generate(QUESTION, system_prompt=SYSTEM, max_new_tokens=6)
    assert result.token_ids == expected and result.cache_status == "partial"
    assert tiny_engine.cache.stats()["failed_inserts"] == 2  # the prompt, then prompt + reply
    assert shape() == before
    tiny_engine.cache.check_invariants()
    assert_cache_consistent(tiny_engine)
