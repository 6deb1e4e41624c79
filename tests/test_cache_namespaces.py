"""Owners, drops and what one namespace can learn of another: the cache side of issues 21 and 24, on the simulated pool."""

from __future__ import annotations

import pytest

from cache import PrefixCache


def make(slots=1000, **kwargs):
    return PrefixCache.simulated(slots, min_tokens=1, **kwargs)


def put(cache, seq, namespace, logits="x"):
    return cache.insert(seq, cache.pool.source(seq, logits), namespace)


def held_tokens(cache, owner):
    """Tokens cached in ``owner``'s namespaces (what its own stats tell it)."""
    return sum(e.nbytes for e in cache.entries() if e.namespace == owner or e.namespace.startswith(owner + "/"))


# ---------------------------------------------------------------------- owners: quota, pins, clear


@pytest.mark.parametrize("namespace, owner", [("a", "a"), ("a/salt-1", "a"), ("a/b/c", "a"), ("", ""), ("/scenario-1", "")])
def test_owner_is_the_name_before_the_first_slash(namespace, owner):
    """The agreed contract with issue 21's service: "owner/sub" belongs to "owner"; a name without "/" is its own owner."""
    from cache.ledger import owner_of

    assert owner_of(namespace) == owner


def test_salted_namespaces_share_their_owners_quota():
    """Issue 21, finding 3: 16 salts took 4.6x a session's quota. One owner's namespaces together stay within it."""
    cache = make(slots=400, namespace_quota=0.25)  # 100 slots per owner
    put(cache, [7] * 20, "victim")
    for salt in range(16):
        put(cache, [salt] + [1] * 29, f"attacker/salt-{salt}")  # 31 slots each: 496 asked
        cache.check_invariants()
    assert held_tokens(cache, "attacker") <= 100
    assert cache.match_prefix([7] * 20, "victim").kind == "hit"


def test_clearing_an_owner_clears_its_sub_namespaces_only():
    """Issue 21: a session's clear reaches its salted and scratch namespaces, and no one else's (not "ab", a name that merely starts alike)."""
    cache = make()
    for namespace in ("a", "a/salt-1", "a/scenario-2", "ab", "b/salt-1"):
        put(cache, [1, 2, 3], namespace)
    cache.clear("a")
    assert sorted({e.namespace for e in cache.entries()}) == ["ab", "b/salt-1"]
    cache.clear("b/salt-1")  # a sub-namespace alone
    assert sorted({e.namespace for e in cache.entries()}) == ["ab"]
    cache.check_invariants()


def test_pins_of_salted_namespaces_count_against_their_owner():
    """Issue 21, finding 5: a session cannot take more than its pin share by pinning under many salts."""
    cache = make(slots=400, namespace_quota=0.25, pin_share=0.2)  # an owner may pin 20 slots
    pinned = 0
    for salt in range(8):
        put(cache, [salt] * 9, f"a/salt-{salt}")  # 10 slots each
        try:
            cache.pin([salt] * 9, f"a/salt-{salt}")
            pinned += 1
        except ValueError:
            pass
    assert pinned == 2 and cache.stats()["pinned_bytes"] == 20


# ---------------------------------------------------------------------- a dropped namespace stays dropped


def test_an_insert_after_its_namespace_was_dropped_does_not_bring_it_back():
    """Issue 24, defect 4: a scenario's scratch namespace was dropped while its request still ran, and the
    request's later inserts (steps 6a and 6b) brought it back for good. Inserts are refused until a new lookup."""
    cache = make()
    cache.release(cache.match_prefix([1, 2, 3, 4], "s/scenario-1"))  # the request looked up before the drop
    cache.clear("s")
    assert put(cache, [1, 2, 3, 4], "s/scenario-1") == 0  # the prompt's insert, after the drop
    assert put(cache, [1, 2, 3, 4, 5, 6], "s/scenario-1") == 0  # the history's
    assert cache.entries() == [] and cache.stats()["namespaces"] == 0
    cache.release(cache.match_prefix([1, 2, 3, 4], "s/scenario-1"))  # a later request may use the name again
    assert put(cache, [1, 2, 3, 4], "s/scenario-1") == 4
    cache.check_invariants()


def test_a_dropped_namespace_stays_dropped_on_the_engine(tiny_engine):
    """Defect 4 on the engine, as the review reproduced it: clear the namespace after the first text delta,
    finish the stream; 2 nodes and 72 tokens remained. Now nothing does."""
    stream = tiny_engine.stream("Tell me about prefix caches, please.", max_new_tokens=8, cache_key="s/scenario-1")
    next(stream)
    tiny_engine.cache.clear("s")
    for _ in stream:
        pass
    assert tiny_engine.cache.entries("s/scenario-1") == [] and tiny_engine.cache.stats()["cache_size"] == 0
    tiny_engine.cache.check_invariants()


# ---------------------------------------------------------------------- what one namespace learns of another


def test_one_namespaces_evictions_do_not_push_out_anothers_eviction_log():
    """Issue 21, finding 12: the log of evicted prefixes was one list for every namespace, so one namespace's
    evictions decided how long another's "evicted" answers lasted. Each namespace now has its own."""
    cache = make(slots=40)
    put(cache, [5, 5, 5], "alice")
    cache.evict(10**6)
    for i in range(2000):  # bob evicts a great deal
        put(cache, [i, i + 1, i + 2], "bob")
    match = cache.match_prefix([5, 5, 5, 6], "alice")
    assert match.detail.evicted is not None and match.detail.evicted.length == 3
    assert cache.match_prefix([5, 5, 5, 6], "bob").detail.evicted is None


def attack(cache, victim_sizes, pool_slots, salts=16):
    """Issue 21, finding 6: a stranger fills what it can of the pool (under 16 salts) while others' entries
    stay in use, then watches its own cached tokens while a visitor sends requests of ``victim_sizes``
    tokens. Returns the stranger's loss after each request (its best case: its entries are the oldest)."""
    others = [[20_000 + k, j] + [0] * 30 for k in range(3) for j in range(pool_slots // 100)]
    for seq in others:
        put(cache, seq, f"other-{seq[0]}")
    for i in range(salts):
        for j in range(pool_slots // (salts * 32) + 1):
            put(cache, [10_000 + i, j] + [0] * 30, f"stranger/salt-{i}")
    for seq in others:  # the others are active: their entries are used again, the stranger's are the oldest
        cache.release(cache.match_prefix(seq, f"other-{seq[0]}"))
    losses = []
    for n, size in enumerate(victim_sizes):
        before = held_tokens(cache, "stranger")
        put(cache, [30_000 + n] + [1] * (size - 1), "victim")
        losses.append(before - held_tokens(cache, "stranger"))
    return losses


SIZES = [160, 38, 120, 60, 90, 38, 160]


def test_a_stranger_stops_seeing_a_visitors_requests_once_the_visitor_holds_its_reserve():
    """Finding 6: with plain LRU across owners the stranger lost about the size of every request the visitor
    sent. With a reserve (204 slots here), the visitor takes from others only until it holds it; then it
    recycles its own entries, and the stranger sees nothing more."""
    plain = attack(make(slots=4096, namespace_quota=0.25, reserve_share=0.0), SIZES, 4096)
    reserved = attack(make(slots=4096, namespace_quota=0.25, reserve_share=0.05), SIZES, 4096)
    assert all(loss > 0 for loss in plain) and sum(plain) >= sum(SIZES) - 121 - 32  # every request shows (121 slots were free)
    assert reserved[:3] == plain[:3] and reserved[3:] == [0, 0, 0, 0]  # until the visitor holds its reserve, then nothing


def test_a_closed_scenario_run_drops_its_namespace_again_once_its_request_has_ended():
    """Defect 4's other half: the run dropped its scratch namespace in ``finally`` while its cancelled request
    could still be starting (looking up after the drop, then storing). It now drops again when the request ends."""
    import asyncio
    import threading

    from ui.scenarios import Scenario, run_scenario

    class FakeJob:
        def __init__(self) -> None:
            self.started, self.finish = threading.Event(), threading.Event()

        def result(self):
            self.started.set()
            self.finish.wait(10)  # the worker still runs the cancelled request
            raise RuntimeError("cancelled")

        async def aresult(self):  # as ui.service.Job's: a thread the cancelled task leaves running
            import anyio

            return await anyio.to_thread.run_sync(self.result, abandon_on_cancel=True)

        def cancel(self) -> None:
            pass

    class FakeService:
        def __init__(self) -> None:
            self.job, self.drops = FakeJob(), []

        def namespace_for(self, session):
            return "s"

        def scratch_namespace(self, namespace):
            return f"{namespace}/scenario-1"

        def stream(self, session, namespace, **kwargs):
            return self.job

        def drop_namespace(self, namespace):
            self.drops.append(namespace)

    async def close_mid_request(service):
        run = run_scenario(service, Scenario("s", "", None, "", ("hi",), False, 4), session=None)
        step = asyncio.ensure_future(run.__anext__())
        for _ in range(500):
            if service.job.started.is_set():
                break
            await asyncio.sleep(0.01)
        step.cancel()  # the page went away
        with pytest.raises(asyncio.CancelledError):
            await step
        await run.aclose()

    service = FakeService()
    asyncio.run(close_mid_request(service))
    assert service.drops == ["s/scenario-1"]  # at once
    service.job.finish.set()  # the request ends (having stored what it stored)
    for _ in range(200):
        if len(service.drops) == 2:
            break
        threading.Event().wait(0.01)
    assert service.drops == ["s/scenario-1", "s/scenario-1"]
