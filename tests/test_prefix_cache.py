"""The radix tree on its own, over a simulated pool: no model, no torch (cache/ must not need them)."""

from __future__ import annotations

import random
import threading

import pytest

from cache import DEFAULT_NAMESPACE, PrefixCache


SLOT_BYTES = 10  # one token's KV; logits take one slot in these tests


def make(slots=1000, min_tokens=1, **kwargs):
    return PrefixCache.simulated(slots, slot_bytes=SLOT_BYTES, min_tokens=min_tokens, **kwargs)


def put(cache, seq, logits=None, namespace=DEFAULT_NAMESPACE):
    """Insert ``seq`` with KV whose slots hold the tokens themselves (and ``logits`` in one slot)."""
    return cache.insert(seq, cache.pool.source(seq, logits), namespace)


def matched_tokens(cache, match):
    return cache.pool.read(match.slots)


def logits_of(cache, match):
    return cache.pool.read(match.logits_slots)[0] if match.logits_slots else None


def test_exact_partial_and_miss():
    """The three outcomes, and that a partial hit returns exactly the shared prefix's KV."""
    cache = make()
    seq = [1, 2, 3, 4, 5]
    put(cache, seq, "end")

    hit = cache.match_prefix(seq)
    assert (hit.kind, hit.length, logits_of(cache, hit)) == ("hit", 5, "end")
    assert matched_tokens(cache, hit) == seq
    cache.release(hit)

    partial = cache.match_prefix([1, 2, 3, 9, 9])
    assert (partial.kind, partial.length, partial.logits_slots) == ("partial", 3, ())
    assert matched_tokens(cache, partial) == [1, 2, 3]
    cache.release(partial)

    miss = cache.match_prefix([7, 8, 9])
    assert (miss.kind, miss.length, miss.slots) == ("miss", 0, ())
    cache.release(miss)


def test_strict_prefix_leaves_last_token_to_compute():
    """A prompt that is a strict prefix of a cached sequence has no stored logits: reuse all but one token."""
    cache = make()
    put(cache, [1, 2, 3, 4, 5, 6], "6")
    match = cache.match_prefix([1, 2, 3, 4])
    assert (match.kind, match.length) == ("partial", 3)
    assert matched_tokens(cache, match) == [1, 2, 3]


def test_sequence_without_logits_is_never_an_exact_hit():
    """Without logits the caller must run at least one token, even when every token is cached."""
    cache = make()
    put(cache, [1, 2, 3])
    match = cache.match_prefix([1, 2, 3])
    assert (match.kind, match.length) == ("partial", 2)


def test_split_on_divergence_stores_shared_prefix_once():
    """Two prompts sharing a prefix: the tree splits where they diverge and stores the prefix once.

    ::

        root -[1 2 3 4]-> (end A)        root -[1 2]-> X -[3 4]-> (end A)
                              becomes                  X -[8 9]-> (end B)
    """
    cache = make()
    put(cache, [1, 2, 3, 4], "A")
    put(cache, [1, 2, 8, 9], "B")
    entries = {e.token_ids: e for e in cache.entries()}
    assert set(entries) == {(1, 2), (3, 4), (8, 9)}
    assert entries[(3, 4)].start == 2 and entries[(3, 4)].has_logits and not entries[(1, 2)].has_logits
    stats = cache.stats()
    assert stats["cached_tokens"] == 6  # not 8: the prefix [1, 2] is stored once
    assert stats["cached_bytes"] == 6 * SLOT_BYTES + 2 * SLOT_BYTES
    for seq, tag in (([1, 2, 3, 4], "A"), ([1, 2, 8, 9], "B")):
        m = cache.match_prefix(seq)
        assert (m.kind, logits_of(cache, m), matched_tokens(cache, m)) == ("hit", tag, seq)


def test_insert_ending_inside_an_edge_splits_and_stores_logits_there():
    """Inserting a prefix of a cached sequence with logits makes that prefix an exact hit."""
    cache = make()
    put(cache, [1, 2, 3, 4, 5], "long")
    assert put(cache, [1, 2, 3], "short") == 0
    m = cache.match_prefix([1, 2, 3])
    assert (m.kind, logits_of(cache, m)) == ("hit", "short")
    assert logits_of(cache, cache.match_prefix([1, 2, 3, 4, 5])) == "long"


@pytest.mark.parametrize(
    "prompts, expected_tokens",
    [
        ([[1, 2, 3], [1, 2, 3]], 3),  # same prompt twice
        ([[1, 2, 3], [1, 2, 3, 4, 5]], 5),  # extension
        ([[1, 2, 3], [4, 5, 6]], 6),  # disjoint
        ([[1, 2, 3, 4], [1, 2, 5, 6], [1, 7]], 7),  # two splits of one edge
    ],
)
def test_cached_tokens_are_unique_tokens(prompts, expected_tokens):
    """cached_tokens counts each stored token once, whatever the insert order."""
    cache = make()
    for p in prompts:
        put(cache, p)
    assert cache.stats()["cached_tokens"] == expected_tokens


def test_lru_evicts_least_recently_used_leaf():
    """When the budget is full, the leaf used longest ago goes first; a recent match protects an entry."""
    cache = make(slots=3 * 4)  # three 3-token entries with logits: 4 slots each
    for first in (10, 20, 30):
        put(cache, [first, 1, 2], first)
    cache.release(cache.match_prefix([10, 1, 2]))  # 10 is now the most recently used
    put(cache, [40, 1, 2], 40)
    firsts = sorted(e.token_ids[0] for e in cache.entries())
    assert firsts == [10, 30, 40]
    assert cache.stats()["evictions"] == 1


def test_parent_left_childless_becomes_evictable():
    """Evicting every child of an inner node lets the inner node itself be evicted next."""
    cache = make(slots=100)
    put(cache, [1, 2, 3])
    put(cache, [1, 2, 4])
    assert cache.evict(10_000) == 4 * SLOT_BYTES
    assert cache.stats()["cache_size"] == 0 and cache.cached_bytes == 0


def test_locked_entries_survive_eviction():
    """Entries in use by a running request are never evicted; released ones are."""
    cache = make(slots=100)
    put(cache, [1, 2, 3])
    put(cache, [4, 5, 6])
    match = cache.match_prefix([1, 2, 3, 7])
    cache.evict(10_000)
    assert [e.token_ids for e in cache.entries()] == [(1, 2, 3)]
    assert cache.entries()[0].locked
    cache.release(match)
    cache.evict(10_000)
    assert cache.entries() == []


def test_insert_over_budget_is_dropped_not_squeezed_in():
    """An insert that cannot fit even after evicting everything unlocked is rejected; the budget holds."""
    cache = make(slots=5)
    assert put(cache, list(range(10))) == 0  # 10 slots > 5
    assert cache.stats()["rejected_inserts"] == 1 and cache.cached_bytes == 0
    put(cache, [1, 2, 3])
    match = cache.match_prefix([1, 2, 3, 4])  # lock it: nothing can be evicted now
    assert put(cache, [5, 6, 7]) == 0
    cache.release(match)
    assert put(cache, [5, 6, 7]) == 3


def test_budget_never_exceeded_under_random_load():
    """Random inserts and lookups: cached bytes stay within budget and match the stored segments."""
    rng = random.Random(0)
    cache = make(slots=200)
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(1, 30))] for _ in range(8)]
    for _ in range(500):
        seq = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(0, 40))]
        if rng.random() < 0.5:
            put(cache, seq, "x" if rng.random() < 0.5 else None)
        else:
            m = cache.match_prefix(seq)
            assert matched_tokens(cache, m) == seq[: m.length]
            cache.release(m)
        assert cache.cached_bytes <= cache.budget_bytes
        assert cache.cached_bytes == sum(e.nbytes for e in cache.entries())
    assert cache.stats()["evictions"] > 0


def test_namespaces_are_isolated():
    """An entry inserted under one namespace never matches a lookup under another."""
    cache = make()
    seq = [1, 2, 3, 4]
    put(cache, seq, "a", namespace="alice")
    assert cache.match_prefix(seq, namespace="bob").kind == "miss"
    assert cache.match_prefix(seq).kind == "miss"  # the default namespace is a namespace too
    assert cache.match_prefix(seq, namespace="alice").kind == "hit"
    assert [e.namespace for e in cache.entries()] == ["alice"]
    assert cache.entries("bob") == []
    assert cache.stats("alice")["hits"] == 1 and cache.stats("bob")["misses"] == 1
    cache.clear("bob")
    assert cache.stats()["cached_tokens"] == 4
    cache.clear("alice")
    assert cache.stats()["cached_tokens"] == 0


def test_min_tokens_short_prompts_are_neither_cached_nor_counted():
    """Prompts under min_tokens skip the cache entirely and leave the stats alone."""
    cache = make(min_tokens=5)
    assert put(cache, [1, 2, 3]) == 0
    assert cache.match_prefix([1, 2, 3]).kind == "skipped"
    assert cache.stats()["total_requests"] == 0 and cache.stats()["cache_size"] == 0


def test_stats_add_up():
    """hits + partial_hits + misses == total_requests, and tokens_saved sums the reused tokens."""
    cache = make()
    seq = [1, 2, 3, 4, 5]
    for s in (seq, [9, 9, 9]):
        cache.release(cache.match_prefix(s))  # two misses
    put(cache, seq, "end")
    cache.release(cache.match_prefix(seq))  # hit: 5 saved
    cache.release(cache.match_prefix([1, 2, 3, 0]))  # partial: 3 saved
    s = cache.stats()
    assert (s["hits"], s["partial_hits"], s["misses"], s["total_requests"]) == (1, 1, 2, 4)
    assert s["hits"] + s["partial_hits"] + s["misses"] == s["total_requests"]
    assert s["tokens_saved"] == 8 and s["hit_rate"] == 0.5 and s["exact_hit_rate"] == 0.25


def test_clear_keeps_running_matches_valid():
    """Clearing while a request holds a match: its segments stay usable and release is harmless."""
    cache = make()
    seq = [1, 2, 3, 4]
    put(cache, seq, "x")
    match = cache.match_prefix(seq)
    cache.clear()
    assert matched_tokens(cache, match) == seq
    cache.release(match)
    assert cache.stats()["cache_size"] == 0
    assert put(cache, seq) == 4


def test_bad_constructor_arguments():
    """Nonsense settings are refused with a message."""
    with pytest.raises(ValueError, match="capacity"):
        PrefixCache.simulated(-1)
    with pytest.raises(ValueError, match="namespace_quota"):
        make(namespace_quota=0)
    with pytest.raises(ValueError, match="min_tokens"):
        make(min_tokens=0)
    with pytest.raises(ValueError, match="kv holds"):
        cache = make()
        cache.insert([1, 2, 3], cache.pool.source([1]))


def test_threads_keep_the_tree_consistent():
    """8 threads inserting, matching and evicting: no lost bytes, stats add up, budget respected."""
    cache = make(slots=300)
    errors = []

    def worker(seed):
        rng = random.Random(seed)
        try:
            for _ in range(300):
                seq = [seed % 3] + [rng.randrange(20) for _ in range(rng.randrange(1, 20))]
                m = cache.match_prefix(seq)
                assert matched_tokens(cache, m) == seq[: m.length]
                put(cache, seq, "x")
                cache.release(m)
                assert cache.cached_bytes <= cache.budget_bytes
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    s = cache.stats()
    assert s["total_requests"] == 8 * 300 == s["hits"] + s["partial_hits"] + s["misses"]
    assert s["cached_bytes"] == cache.cached_bytes <= cache.budget_bytes
    assert not any(e.locked for e in cache.entries())


def test_cache_package_imports_no_model_code():
    """cache/ knows nothing about models: importing it alone pulls in neither torch nor transformers."""
    import subprocess
    import sys

    code = "import sys, cache; bad = {'torch', 'transformers', 'tokenizers'} & set(sys.modules); print(sorted(bad))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_shared_prefix_shorter_than_min_tokens_is_a_miss():
    """Prompts sharing only a chat template's first tokens reuse nothing and do not inflate the hit rate."""
    cache = make(min_tokens=5)
    seq = list(range(1, 11))
    put(cache, seq, "x")
    short_share = cache.match_prefix([1, 2, 3, 50, 51, 52])
    assert (short_share.kind, short_share.length, short_share.slots) == ("miss", 0, ())
    long_share = cache.match_prefix(seq[:6] + [60, 61])
    assert (long_share.kind, long_share.length) == ("partial", 6)
    s = cache.stats()
    assert (s["partial_hits"], s["misses"], s["tokens_saved"]) == (1, 1, 6)
    assert s["token_hit_rate"] == 6 / (6 + 8)
