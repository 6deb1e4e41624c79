"""Eviction policies (cache/policies.py): one priority function each, picked once by PrefixCache, used by its heaps."""

from __future__ import annotations

import random

import pytest

from cache import PrefixCache
from cache.policies import POLICIES


def make(policy, slots):
    return PrefixCache.simulated(slots, min_tokens=1, policy=policy)


def put(cache, seq):
    return cache.insert(seq, cache.pool.source(seq, "logits"))


def survivors(cache):
    return sorted(e.token_ids[0] for e in cache.entries())


@pytest.mark.parametrize(
    "policy, expected",
    [
        ("lru", [10, 30, 40]),  # 20 was used longest ago
        ("lfu", [10, 20, 40]),  # 20 was matched twice; 30 and 10 once each, 30 longer ago
        ("fifo", [20, 30, 40]),  # 10 was stored first, however recently it was used
        ("mru", [20, 30, 40]),  # 10 was used last
    ],
)
def test_each_policy_picks_its_victim(policy, expected):
    """Three 3-token entries fill the pool; one match pattern; a fourth insert evicts the policy's choice.

    ::

        stored:   10  20  30          matched: 20, 20, 30, 10          insert 40 -> evict one
    """
    cache = make(policy, slots=3 * 4)  # 3 tokens + 1 logits slot each
    for first in (10, 20, 30):
        put(cache, [first, 1, 2])
    for first in (20, 20, 30, 10):
        cache.release(cache.match_prefix([first, 1, 2]))
    put(cache, [40, 1, 2])
    assert survivors(cache) == expected
    assert cache.stats()["evictions"] == 1


@pytest.mark.parametrize("policy", list(POLICIES))
def test_every_policy_keeps_the_tree_consistent_under_random_load(policy):
    """Random inserts, matches and evictions under each policy: invariants hold and the budget is respected."""
    rng = random.Random(7)
    cache = make(policy, slots=150)
    for _ in range(600):
        seq = [rng.randrange(4)] + [rng.randrange(30) for _ in range(rng.randrange(1, 25))]
        if rng.random() < 0.5:
            put(cache, seq)
        else:
            match = cache.match_prefix(seq)
            assert cache.pool.read(match.slots) == seq[: match.length]
            cache.release(match)
        cache.check_invariants()
    assert cache.stats()["evictions"] > 0


def test_unknown_policy_is_refused_by_the_cache_and_the_engine_settings():
    """A misspelt policy fails at start-up with the names that exist, never mid-flow."""
    from engine import EngineConfig

    with pytest.raises(ValueError, match="lru, lfu, fifo, mru"):
        PrefixCache.simulated(10, policy="random")
    with pytest.raises(ValueError, match="unknown eviction policy 'LRU '"):
        EngineConfig(eviction_policy="LRU ")
    assert EngineConfig.from_env({"KVCI_EVICTION_POLICY": "lfu"}).eviction_policy == "lfu"
