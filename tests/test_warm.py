"""engine/warm.py: warming stores what the next request reuses, and a pin through it holds."""

from __future__ import annotations

import pytest

from engine.warm import unpin, warm, warm_tokens

SYSTEM = "You are a careful assistant for a small bakery. Answer in one short sentence, politely."


def test_warm_system_prompt_then_request_is_a_partial_hit(tiny_engine):
    """A warmed system prompt is reused by any request that starts with it (a partial hit over its whole chunks: engine/prefill.py)."""
    done = warm(tiny_engine, [{"role": "system", "content": SYSTEM}], "", pin=True)
    assert done["prefilled"] == done["tokens"] > 10 and done["pinned"]
    result = tiny_engine.generate("Do you sell rye bread?", system_prompt=SYSTEM, max_new_tokens=2)
    assert result.cache_status == "partial" and result.cache_explanation["reused_tokens"] == done["tokens"] // tiny_engine.chunk_tokens * tiny_engine.chunk_tokens


def test_warm_messages_ending_with_the_user_is_an_exact_hit(tiny_engine):
    """Warming [system, user] stores the prompt as a request sends it: that request needs no prefill."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Do you sell rye bread?"}]
    warm(tiny_engine, messages, "")
    assert tiny_engine.generate("Do you sell rye bread?", system_prompt=SYSTEM, max_new_tokens=2).cache_status == "hit"
    again = warm(tiny_engine, messages, "")
    assert again["prefilled"] == 0  # already cached: nothing is computed


def test_warm_tokens_stop_where_user_turns_differ(tiny_engine):
    """The system-only warm is the common prefix of any continuation: a prefix of a real request's tokens."""
    tokens = warm_tokens(tiny_engine.chat, [{"role": "system", "content": SYSTEM}])
    request = tiny_engine.chat.prompt_ids([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello"}])
    assert request[: len(tokens)] == tokens


def test_warm_too_short_is_refused(tiny_engine):
    """Fewer tokens than the cache keeps cannot be warmed or pinned: a ValueError saying so."""
    tiny_engine.cache.min_tokens = 10_000
    with pytest.raises(ValueError, match="fewer than"):
        warm(tiny_engine, [{"role": "system", "content": SYSTEM}], "")


def test_unpin_by_the_same_messages_drops_only_that_pin(tiny_engine):
    """unpin finds the pin a warm made from the same messages; another namespace's or an unpinned one is False."""
    messages = [{"role": "system", "content": SYSTEM}]
    warm(tiny_engine, messages, "a", pin=True)
    warm(tiny_engine, messages, "b", pin=True)
    assert unpin(tiny_engine, messages, "c")["unpinned"] is False  # never warmed there
    done = unpin(tiny_engine, messages, "a")
    assert done["unpinned"] is True and done["tokens"] == len(warm_tokens(tiny_engine.chat, messages))
    assert unpin(tiny_engine, messages, "a")["unpinned"] is False
    assert tiny_engine.cache.stats("a")["pins"] == 0 and tiny_engine.cache.stats("b")["pins"] == 1
    assert tiny_engine.cache.stats("a")["cache_size"] > 0  # cached still
