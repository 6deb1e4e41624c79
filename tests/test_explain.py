"""The miss explainer (engine/explain.py, cache/explain.py): the right position and reason on crafted prompts, and nothing of others' text."""

from __future__ import annotations

import pytest

from cache.explain import EvictionLog
from engine import Engine, EngineConfig

SYSTEM = "You are a careful assistant for a bakery. Answer briefly and precisely, in plain words, and never invent prices. " * 2
N = 4


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def ids(engine: Engine, prompt: str, **kwargs) -> list[int]:
    return engine.tokenize(engine.make_request(prompt, **kwargs))


def test_cold_cache_says_cold(tiny_engine):
    """A first request in an empty namespace: nothing similar cached."""
    explanation = tiny_engine.generate("What is bread?", system_prompt=SYSTEM, max_new_tokens=N, cache_key="me").cache_explanation
    assert explanation["reason"] == "cold" and explanation["matched_tokens"] < 5


def test_edited_system_prompt_is_placed_in_the_system_prompt(tiny_engine):
    """An edit in the middle of the system prompt: diverged, at the first differing token, in the system prompt."""
    edited = SYSTEM.replace("never invent prices", "always quote the price list")
    tiny_engine.generate("What is bread?", system_prompt=SYSTEM, max_new_tokens=N, cache_key="me")
    result = tiny_engine.generate("What is bread?", system_prompt=edited, max_new_tokens=N, cache_key="me")
    e = result.cache_explanation
    expected = first_difference(ids(tiny_engine, "What is bread?", system_prompt=SYSTEM), result.prompt_token_ids)
    assert (e["reason"], e["where"], e["diverged_at"]) == ("diverged", "system", expected)
    assert "invent" in e["cached_after"] and "quote" in e["prompt_after"] and e["before"].strip().endswith("and")
    assert "system prompt" in e["hint"] and e["nearest_cached_tokens"] > expected


def test_edited_earlier_turn_is_placed_in_the_history(tiny_engine):
    """A conversation whose assistant turn was edited: diverged in that turn of the history."""
    history = [{"role": "user", "content": "Do you sell rye bread on Sundays?"}, {"role": "assistant", "content": "Yes, until noon, and sourdough too."}]
    edited = [history[0], {"role": "assistant", "content": "Yes, until six, and sourdough too."}]
    tiny_engine.generate("And croissants?", system_prompt=SYSTEM, history=history, max_new_tokens=N, cache_key="me")
    result = tiny_engine.generate("And croissants?", system_prompt=SYSTEM, history=edited, max_new_tokens=N, cache_key="me")
    e = result.cache_explanation
    expected = first_difference(ids(tiny_engine, "And croissants?", system_prompt=SYSTEM, history=history), result.prompt_token_ids)
    assert (e["reason"], e["diverged_at"]) == ("diverged", expected) and e["where"].startswith("history (turn 2, assistant")
    assert "history" in e["hint"]


def test_new_question_diverges_in_the_users_message(tiny_engine):
    """Same system prompt, new question: a partial hit that diverges in the user's message."""
    tiny_engine.generate("What is bread?", system_prompt=SYSTEM, max_new_tokens=N, cache_key="me")
    e = tiny_engine.generate("What is cake?", system_prompt=SYSTEM, max_new_tokens=N, cache_key="me").cache_explanation
    chunk = tiny_engine.chunk_tokens
    assert (e["reason"], e["where"]) == ("diverged", "user") and e["reused_tokens"] == e["diverged_at"] // chunk * chunk  # whole chunks (engine/prefill.py)
    if e["reused_tokens"] < e["diverged_at"]:
        assert f"reuse stops at a whole {chunk}-token chunk" in e["message"]


def test_prompt_under_min_tokens(tiny_engine):
    """A prompt shorter than min_cached_tokens is neither looked up nor stored: below_min_tokens."""
    e = tiny_engine.generate("hi", raw=True, max_new_tokens=N).cache_explanation
    assert e["reason"] == "below_min_tokens" and e["prompt_tokens"] < tiny_engine.cache.min_tokens


def test_exact_hit_and_cache_off(tiny_engine):
    """An exact repeat says hit; a request with the prefix cache off says off."""
    tiny_engine.generate("What is bread?", system_prompt=SYSTEM, max_new_tokens=N)
    assert tiny_engine.generate("What is bread?", system_prompt=SYSTEM, max_new_tokens=N).cache_explanation["reason"] == "hit"
    assert tiny_engine.generate("What is bread?", use_prefix_cache=False, max_new_tokens=N).cache_explanation["reason"] == "off"


def test_evicted_prefix_is_reported_with_time_and_cause(tiny_model, tokenizer):
    """A prompt cached, then pushed out by a flood, then sent again: evicted (memory pressure), not cold."""
    engine = Engine(tiny_model, tokenizer, EngineConfig(min_cached_tokens=4, cache_budget_mb=0.6), name="tiny")
    first = engine.generate("Tell me about rye.", system_prompt=SYSTEM, max_new_tokens=N, cache_key="me")
    for i in range(6):
        engine.generate(f"Flood {i}: " + "other words entirely " * 5, raw=True, max_new_tokens=N, cache_key="me")
    assert engine.cache.stats("me")["evictions"] > 0
    e = engine.generate("Tell me about rye.", system_prompt=SYSTEM, max_new_tokens=N, cache_key="me").cache_explanation
    assert e["reason"] == "evicted" and e["evicted"]["cause"] == "memory pressure"
    assert e["evicted"]["length"] <= len(first.prompt_token_ids) + N and e["evicted"]["at"] > 0
    assert "evicted" in e["message"]


def test_shared_namespace_reveals_no_cached_text(tiny_engine):
    """In the shared namespace the cached side past the common prefix is never decoded, nor its length given."""
    secret = SYSTEM + " The vault code is 7731."
    tiny_engine.generate("Hello?", system_prompt=secret, max_new_tokens=N)  # someone else's request
    e = tiny_engine.generate("Hello?", system_prompt=SYSTEM + " The vault code is 1234.", max_new_tokens=N).cache_explanation
    assert e["reason"] == "diverged" and e["cached_after"] is None and e["nearest_cached_tokens"] is None
    assert "7731" not in repr(e)


def test_shared_namespace_hides_matches_under_min_tokens(tiny_model, tokenizer):
    """A shared-namespace match shorter than min_tokens (not reused, so not otherwise visible) is reported as cold."""
    engine = Engine(tiny_model, tokenizer, EngineConfig(min_cached_tokens=40), name="tiny")
    engine.generate("What is bread?", system_prompt=SYSTEM, max_new_tokens=N)
    e = engine.generate("What is bread, and why does it rise in the oven? " * 4, system_prompt="You are a careful teacher.", max_new_tokens=N).cache_explanation
    assert e["reason"] == "cold" and e["matched_tokens"] == 0


@pytest.mark.parametrize(
    "recorded, tokens, beyond, expected",
    [
        ([(1, 2, 3, 4)], (1, 2, 3, 4, 5), 2, 4),  # an evicted prefix of the prompt
        ([(1, 2, 3, 4)], (1, 2, 3, 4, 5), 4, None),  # no longer than what still matched
        ([(1, 2, 9)], (1, 2, 3, 4), 0, None),  # not a prefix
        ([(1, 2), (1, 2, 3)], (1, 2, 3, 4), 0, 3),  # the longest wins
    ],
)
def test_eviction_log_finds_the_longest_evicted_prefix(recorded, tokens, beyond, expected):
    """The log matches whole evicted paths by hash, longest first, beyond what still matched."""
    log = EvictionLog(size=16)
    for prefix in recorded:
        log.record("ns", prefix, at=1.0, cause="memory pressure")
    found = log.find("ns", tokens, beyond)
    assert (found.length if found else None) == expected
    assert log.find("other", tokens, 0) is None


def test_eviction_log_is_bounded():
    """The log keeps its last `size` entries: memory stays flat under any flood."""
    log = EvictionLog(size=3)
    for i in range(10):
        log.record("ns", (i, i + 1), at=float(i), cause="memory pressure")
    assert len(log) == 3 and log.find("ns", (0, 1), 0) is None and log.find("ns", (9, 10), 0).at == 9.0
