"""Random operation sequences on the simulated pool: every total the tree keeps agrees with the tree after every step."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cache import PrefixCache

# Prefixes of a few sequences that share their starts, so inserts split edges, end inside pinned paths and evict.
BASES = ([1, 2, 1, 2, 1, 2], [1, 2, 2, 1], [2, 1, 1])
TOKENS = [base[:n] for base in BASES for n in range(1, len(base) + 1)]
NAMESPACES = ["a", "a/salt", "b"]
OPS = ["insert", "insert", "insert inside", "pin", "unpin", "match", "release", "evict", "clear", "tick"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), quota=st.sampled_from([1.0, 0.5]), reserve=st.sampled_from([0.0, 0.2]))
def test_random_operations_keep_every_total_and_budget(data, quota, reserve):
    """Defect 1 of issue 24 (pins past their budget through an insert ending in a pinned path) and any
    total kept out of step are caught here: check_invariants recounts every total after each step."""
    now = [0.0]
    cache = PrefixCache.simulated(30, min_tokens=1, pin_share=0.25, namespace_quota=quota, reserve_share=reserve, clock=lambda: now[0])
    held, inserted = [], []
    for _ in range(data.draw(st.integers(5, 40))):
        op = data.draw(st.sampled_from(OPS))
        namespace = data.draw(st.sampled_from(NAMESPACES))
        tokens = data.draw(st.sampled_from(TOKENS))
        if op == "insert inside" and inserted:  # a strict prefix of a cached sequence: ends inside its path
            tokens, namespace = data.draw(st.sampled_from(inserted))
            tokens = tokens[: data.draw(st.integers(1, len(tokens)))]
            op = "insert"
        if op == "insert":
            cache.insert(tokens, cache.pool.source(tokens, "x" if data.draw(st.booleans()) else None), namespace)
            inserted.append((tokens, namespace))
        elif op in ("pin", "unpin") and inserted:
            tokens, namespace = data.draw(st.sampled_from(inserted))  # mostly cached: the pin is made
            try:
                cache.pin(tokens, namespace, ttl_s=data.draw(st.sampled_from([None, 5.0]))) if op == "pin" else cache.unpin(tokens, namespace)
            except ValueError:
                pass  # evicted since, or over the budget: refused, which is what a budget is for
        elif op == "match":
            held.append(cache.match_prefix(tokens, namespace))
        elif op == "release" and held:
            cache.release(held.pop(0))
        elif op == "evict":
            cache.evict(data.draw(st.integers(1, 20)))
        elif op == "clear":
            cache.clear(namespace)
        elif op == "tick":
            now[0] += 3.0
        cache.check_invariants()
    for match in held:
        cache.release(match)
    cache.check_invariants()
    cache.clear()
    assert cache.pool.num_free == cache.pool.capacity
