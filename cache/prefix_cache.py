"""A token-level radix tree over a slot pool: the cross-request prefix cache.

Prompts that share a prefix share the tree's path for it, so the prefix's KV is stored once. A
node holds the token ids on its edge and, for each, the index of the pool slot holding that
token's KV; where an inserted sequence ended it also holds the slots of the logits predicting the
next token (so an exact hit needs no model call at all). Splitting an edge copies indices, never
KV; freeing a node hands its slots back in O(1) per slot.

This module knows nothing about models, tensors or tokenizers: the pool (:class:`SlotPool`) hands
out slot indices, and an insert's :class:`KVSource` copies bytes into them. The pool's size is the
byte budget, so nothing the cache holds can live outside it. What a node counts for in the totals
(sizes, evictable, pinned) is derived from its state in one place, ``cache/ledger.py``.

Concurrency: one lock guards the tree. An insert reserves slots under it (evicting if it must),
copies KV *outside* it while the attach path stays locked against eviction, then publishes under
it, re-walking the tree: tokens another insert stored meanwhile are freed, not duplicated, and if
the namespace was cleared meanwhile everything reserved is freed. A failing copy (out of memory)
is logged and counted (``failed_inserts``); the tree is left as it was.

Eviction: unlocked leaves in the order of the policy's priority (``cache/policies.py``; least
recently used first by default), from heaps with lazy invalidation (a stale entry is skipped when
popped; a heap is compacted when stale entries outnumber live nodes), so an evicting insert costs
O(log n) per node whatever the number of nodes or namespaces. Totals of evictable and locked
slots say whether an insert can fit *before* anything is evicted: one that cannot is rejected and
evicts nothing.

Namespaces and owners: a lookup only sees entries inserted under the same namespace. A namespace
``"owner/sub"`` belongs to ``owner`` (a name without ``/`` is its own owner), and the quota, the
pin share and the reserve are charged per owner, all of its namespaces together: salting a
namespace name cannot escape them. One owner may hold at most ``namespace_quota`` of the pool;
over its share it evicts its own entries first. While the pool has free slots, one owner's inserts
never evict another's. Once the pool is full, an owner that holds less than ``reserve_share`` of
the pool makes room by LRU across all owners; one that holds its reserve or more makes room from
its own entries first, and takes others' only when its own are not enough. So a stranger's entries
are pushed out only by owners still growing into their reserve, and a visitor who fills the pool
to watch their own entries go learns little of others' steady traffic (``docs/cache.md`` says
exactly what remains). Evictions are counted against the namespace whose insert caused them, never
the victim's, and each namespace keeps its own log of evicted prefixes. A namespace with no
entries, no running lookup and no request for ``namespace_idle_s`` is forgotten with its counters.

A namespace cleared by name refuses inserts until the next lookup in it: a request that looked up
before the clear (a cancelled job still decoding) cannot bring the namespace back with its later
inserts, while a request that looks up after the clear uses the name as new.

Example:
    >>> cache = PrefixCache.simulated(num_slots=1000, min_tokens=2)
    >>> cache.insert([1, 2, 3, 4], cache.pool.source([1, 2, 3, 4], logits="after 4"))
    4
    >>> match = cache.match_prefix([1, 2, 3, 9])   # partial hit: 3 tokens reused
    >>> cache.pool.read(match.slots)                # the engine reads KV from these slots
    [1, 2, 3]
    >>> cache.release(match)
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Sequence

from cache.explain import CACHED_CONTEXT_TOKENS, EVICTION_LOG_SIZE, EvictionLog, LookupDetail
from cache.ledger import Ledger, Namespace, Node, Owner, Totals, contribution, owner_of
from cache.policies import get_priority, pinned_last
from cache.slots import KVSource, SimulatedPool, Slot, SlotPool

log = logging.getLogger(__name__)

DEFAULT_NAMESPACE = ""
MatchKind = Literal["hit", "partial", "miss", "skipped"]
SWEEP_INTERVAL_S = 1.0  # idle namespaces are looked for at most this often
SWEEP_BATCH = 256  # namespaces looked at per sweep, at most (the sweep runs under the tree lock)
TOMBSTONES = 65_536  # names of cleared namespaces remembered (refusing inserts until their next lookup), newest kept


@dataclass(frozen=True)
class PrefixMatch:
    """The result of :meth:`PrefixCache.match_prefix`.

    ``slots`` are the pool slots of the first ``length`` tokens, in order. ``logits_slots`` hold
    the stored logits, set only on an exact hit. The matched path stays locked (its slots are
    neither evicted nor reused, even across a clear) until :meth:`PrefixCache.release`.
    """

    kind: MatchKind
    length: int
    prompt_length: int
    namespace: str
    slots: tuple[Slot, ...] = ()
    logits_slots: tuple[Slot, ...] = ()
    lock_wait_s: float = 0.0  # time this lookup waited for the tree lock
    detail: LookupDetail = LookupDetail()  # what the lookup saw beyond what it reused (the miss explainer's input)
    _node: "Node | None" = field(default=None, repr=False, compare=False)  # deepest locked node


@dataclass(frozen=True)
class ExportedNode:
    """One node as :meth:`PrefixCache.exported` hands it out (to ``cache/snapshot.py``): parents come before children."""

    namespace: str
    parent: int  # index of the parent node in the export; -1 under the namespace's root
    token_ids: tuple[int, ...]
    slots: tuple[Slot, ...]  # one per token
    logits_slots: tuple[Slot, ...]  # empty when no logits end here
    recency: int  # the tick of its last use: only the order means anything
    last_used: float
    hits: int
    pinned: bool  # on a pinned path
    pin_ends_here: bool  # a pin was made on the sequence ending exactly here
    pin_expires_in_s: float | None  # that pin's seconds left (None: no TTL, or no pin here)
    pin_ttl_s: float | None = None  # that pin's TTL as made, which each hit renews (None: no TTL, or no pin here)


@dataclass(frozen=True)
class CacheEntry:
    """One node of the tree, as the cache inspector shows it."""

    namespace: str
    start: int  # position of the node's first token in the sequences that pass through it
    token_ids: tuple[int, ...]
    nbytes: int
    hits: int
    last_used: float  # time.time() of the last match or insert that touched it
    has_logits: bool
    locked: bool
    pinned: bool = False  # on a pinned path: exempt from eviction


class PrefixCache:
    """Radix tree keyed by token ids, holding slot indices of a pool, with LRU (or another policy's) eviction.

    Args:
        pool: Where KV lives; its ``capacity * slot_bytes`` is the budget.
        min_tokens: Sequences shorter than this are neither looked up (nor counted in the stats)
            nor inserted: their prefill is too cheap to be worth the bookkeeping.
        namespace_quota: The share of the pool one owner (all its namespaces) may hold, in (0, 1].
        namespace_idle_s: A namespace with no entries and no request for this long is forgotten.
        clock: Monotonic seconds, for idleness (tests pass a fake one).
        policy: The eviction policy, a name of ``cache.policies.POLICIES`` (``lru``, ``lfu``, ``fifo``, ``mru``).
        log_evictions: Keep the hashes of evicted prefixes (``cache/explain.py``) so a miss can say
            it was evicted; a replay, which never explains, turns it off.
        pin_share: The share of the pool pinned entries may hold, in [0, 1]; one owner may pin
            this share of its own quota (see :meth:`pin`).
        reserve_share: The share of the pool an owner may take from others' entries when the pool is
            full, in [0, 1]; above it, its inserts make room from its own entries first. 0: plain
            LRU across owners.
    """

    def __init__(
        self,
        pool: SlotPool,
        min_tokens: int = 20,
        namespace_quota: float = 1.0,
        namespace_idle_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        policy: str = "lru",
        log_evictions: bool = True,
        pin_share: float = 0.25,
        reserve_share: float = 0.05,
    ) -> None:
        if min_tokens < 1:
            raise ValueError(f"min_tokens must be >= 1, got {min_tokens}")
        if not 0 < namespace_quota <= 1:
            raise ValueError(f"namespace_quota must be in (0, 1], got {namespace_quota}")
        if namespace_idle_s < 0:
            raise ValueError(f"namespace_idle_s must be >= 0, got {namespace_idle_s}")
        for name, share in (("pin_share", pin_share), ("reserve_share", reserve_share)):
            if not 0 <= share <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {share}")
        self.pool = pool
        self.policy = policy
        self._priority = pinned_last(get_priority(policy))
        self.min_tokens = min_tokens
        self.namespace_quota = namespace_quota
        self.namespace_idle_s = namespace_idle_s
        self._quota_slots = int(namespace_quota * pool.capacity)
        self._pin_slots = int(pin_share * pool.capacity)  # all owners' pins together
        self._owner_pin_slots = int(pin_share * self._quota_slots)  # one owner's pins
        self._reserve_slots = int(reserve_share * pool.capacity)
        self._pins: dict[int, _Pin] = {}  # id(node) -> its pin
        self._clock = clock
        self._lock = threading.Lock()
        self._local = threading.local()  # per-thread lock wait of the last public call
        self._ticks = itertools.count(1)  # recency and age: a counter, so ties cannot happen
        self._namespaces: OrderedDict[str, Namespace] = OrderedDict()  # least recently active first
        self._owners: dict[str, Owner] = {}
        self._tombstones: OrderedDict[str, None] = OrderedDict()  # cleared by name, no lookup since: inserts refused
        self._totals = _Counters()  # every namespace's counters, including forgotten ones
        self.clears = 0  # clear() calls so far: work computed before one (a reply waiting to be stored) is dropped
        self._ledger = Ledger()
        self._all = self._ledger.all  # sizes over all namespaces
        self._heap: list[tuple[Any, int, Node]] = []  # evictable leaves of every namespace
        self.evicted = EvictionLog(EVICTION_LOG_SIZE if log_evictions else 0)  # per namespace: "this was cached, and evicted at T"
        self._last_sweep = clock()

    @classmethod
    def simulated(cls, num_slots: int, slot_bytes: int = 1, **kwargs: Any) -> "PrefixCache":
        """A cache over a :class:`SimulatedPool` (no tensors), for tests and benchmarks."""
        return cls(SimulatedPool(num_slots, slot_bytes), **kwargs)

    # ------------------------------------------------------------------ public API

    def match_prefix(self, tokens: Sequence[int], namespace: str = DEFAULT_NAMESPACE, align: int = 1) -> PrefixMatch:
        """Find the longest cached prefix of ``tokens`` and lock its path.

        Exact hit: the whole sequence is cached and logits are stored at its end. A shared prefix
        shorter than ``min_tokens`` (a chat template's first few tokens) is not reused: a miss.
        Otherwise at least one token is left to compute (a prompt that is a strict prefix of a
        cached sequence reuses all before its last token), because the caller needs logits for the
        last position, and the reuse is rounded down to a multiple of ``align``.

        Args:
            tokens: The prompt's token ids.
            namespace: Only entries inserted under this namespace can match.
            align: A caller that computes in chunks aligned to absolute positions (the engine's
                prefill, ``engine/prefill.py``) reuses whole chunks only, or all of an exact hit;
                the counters count what it reuses.

        Returns:
            A :class:`PrefixMatch`; pass it to :meth:`release` when its slots have been read.
        """
        key = tuple(tokens)
        self._local.wait_s = 0.0
        if len(key) < self.min_tokens:
            return PrefixMatch("skipped", 0, len(key), namespace)
        with self._locked():
            ns = self._active_namespace(namespace)
            if self._tombstones:
                self._tombstones.pop(namespace, None)  # a request that looks up now may use the name again
            path, matched = _walk(ns.root, key)
            depth = sum(len(n.key) for n in path)
            exact = matched == len(key) and path[-1].logits is not None and depth == matched  # ends at the node's end, not mid-edge
            if exact:
                kind: MatchKind = "hit"
                usable = matched
            else:
                usable = min(matched, len(key) - 1) // align * align
                if usable < self.min_tokens:  # a few shared template tokens are not worth a reuse
                    usable = 0
                kind = "partial" if usable > 0 else "miss"
            slots: list[Slot] = []
            deepest = None
            for node in path:
                if len(slots) == usable:
                    break
                slots.extend(node.value[: usable - len(slots)])
                deepest = node
                if node.pins and id(node) in self._pins:  # a hit refreshes the pin's TTL
                    self._pins[id(node)].refresh(self._clock())
            if deepest is not None:
                self._touch(deepest, hit=True)
                self._inc_lock(deepest)
            ns.counters.count(kind, usable, len(key))
            self._totals.count(kind, usable, len(key))
            cached_next = _cached_after(path, depth, matched)
            lock_wait_s = self._local.wait_s
        evicted = self.evicted.find(namespace, key, beyond=matched) if kind != "hit" else None  # outside the tree lock
        return PrefixMatch(
            kind=kind,
            length=usable,
            prompt_length=len(key),
            namespace=namespace,
            slots=tuple(slots),
            logits_slots=tuple(path[-1].logits) if exact else (),
            lock_wait_s=lock_wait_s,
            detail=LookupDetail(matched, depth, cached_next, evicted),
            _node=deepest,
        )

    def release(self, match: PrefixMatch) -> None:
        """Unlock the path locked by ``match_prefix``. Call exactly once per match."""
        self._local.wait_s = 0.0
        if match._node is not None:
            with self._locked():
                self._dec_lock(match._node)

    def insert(self, tokens: Sequence[int], kv: KVSource, namespace: str = DEFAULT_NAMESPACE) -> int:
        """Store the KV of ``tokens`` (only the part not cached yet) and the logits at its end.

        Args:
            tokens: The full sequence, from position 0.
            kv: KV for every token of ``tokens`` (``len(kv) >= len(tokens)``); the cache asks it to
                write only the uncached part, outside the tree lock.
            namespace: The namespace to store under.

        Returns:
            The number of tokens newly stored (0 when already cached, too short, over budget or
            quota, when the copy failed, or when ``namespace`` was cleared by name with no lookup in
            it since).
        """
        key = tuple(tokens)
        if len(kv) < len(key):
            raise ValueError(f"kv holds {len(kv)} tokens but {len(key)} tokens were given")
        self._local.wait_s = 0.0
        if len(key) < self.min_tokens:
            return 0
        with self._locked():
            reservation = self._reserve(key, kv.logits_slots, namespace)
        if reservation is None:
            return 0
        try:
            kv.write(reservation.start, reservation.slots, reservation.logits_slots)
        except BaseException as exc:
            with self._locked():
                self._abandon(reservation, failed=isinstance(exc, Exception))
            if not isinstance(exc, Exception):
                raise
            log.warning("prefix-cache insert of %d tokens failed, nothing stored: %r", len(reservation.slots), exc)
            return 0
        with self._locked():
            return self._publish(reservation)

    def evict(self, num_bytes: int) -> int:
        """Evict unlocked leaves, least recently used first, until ``num_bytes`` are freed.

        Returns:
            The bytes actually freed (less than asked when everything left is locked).
        """
        self._local.wait_s = 0.0
        with self._locked():
            self._expire_pins()
            return self._evict_from(self._heap, math.ceil(num_bytes / self.pool.slot_bytes), None, "evict() call") * self.pool.slot_bytes

    def clear(self, namespace: str | None = None) -> None:
        """Drop every entry and counter, or those of one namespace and of the namespaces under it.

        ``clear("owner")`` also clears every ``"owner/..."`` namespace (a session's salted and
        scratch ones). Requests already running keep the KV they matched: locked slots are freed
        only when the request releases them. Inserts still copying into a cleared namespace store
        nothing, and so does every insert into a namespace cleared by name until the next lookup in
        it (a running request cannot bring back what was cleared under it).
        """
        self._local.wait_s = 0.0
        with self._locked():
            self.clears += 1
            if namespace is None:
                names = list(self._namespaces)
            else:
                owner = self._owners.get(owner_of(namespace))
                below = namespace + "/"
                names = [n for n in owner.namespaces if n == namespace or n.startswith(below)] if owner is not None else []
            for name in names:
                self._drop(self._namespaces.pop(name))
                if namespace is not None:
                    self._tombstones[name] = None
                    self._tombstones.move_to_end(name)
                    if len(self._tombstones) > TOMBSTONES:
                        self._tombstones.popitem(last=False)
            if namespace is None:
                self._totals = _Counters()

    def stats(self, namespace: str | None = None) -> dict[str, Any]:
        """Counters and sizes, for all namespaces or one.

        ``hit_rate`` counts exact and partial hits; ``token_hit_rate`` is the share of looked-up
        prompt tokens that were reused; ``total_requests`` counts lookups of sequences of at least
        ``min_tokens`` tokens (``hits + partial_hits + misses``). A namespace's ``evictions``
        counts the entries its own inserts evicted, whichever namespace they belonged to; its
        ``pin_budget_bytes`` is its owner's.
        """
        self._local.wait_s = 0.0
        with self._locked():
            self._expire_pins()
            if namespace is None:
                counters, sizes = self._totals, self._all
                namespaces = sum(1 for ns in self._namespaces.values() if ns.sizes.nodes)
            else:
                ns = self._namespaces.get(namespace)
                counters, sizes = (ns.counters, ns.sizes) if ns is not None else (_Counters(), Totals())
                namespaces = int(sizes.nodes > 0)
            total = counters.hits + counters.partial_hits + counters.misses
            return {
                "cache_size": sizes.nodes,
                "cached_tokens": sizes.tokens,
                "cached_bytes": sizes.slots * self.pool.slot_bytes,
                "budget_bytes": self.budget_bytes,
                "hits": counters.hits,
                "partial_hits": counters.partial_hits,
                "misses": counters.misses,
                "total_requests": total,
                "hit_rate": (counters.hits + counters.partial_hits) / total if total else 0.0,
                "exact_hit_rate": counters.hits / total if total else 0.0,
                "tokens_saved": counters.tokens_saved,
                "token_hit_rate": counters.tokens_saved / counters.prompt_tokens if counters.prompt_tokens else 0.0,
                "evictions": counters.evictions,
                "rejected_inserts": counters.rejected_inserts,
                "failed_inserts": counters.failed_inserts,
                "namespaces": namespaces,
                "pins": sum(1 for p in self._pins.values() if namespace is None or p.node.ns.name == namespace),
                "pinned_bytes": sizes.pinned * self.pool.slot_bytes,
                "pin_budget_bytes": (self._pin_slots if namespace is None else self._owner_pin_slots) * self.pool.slot_bytes,
            }

    def entries(self, namespace: str | None = None) -> list[CacheEntry]:
        """Every node, depth first, for one namespace or all of them."""
        self._local.wait_s = 0.0
        with self._locked():
            names = list(self._namespaces) if namespace is None else [namespace]
            result = []
            for name in names:
                ns = self._namespaces.get(name)
                for node in _descendants(ns.root) if ns is not None else ():
                    result.append(
                        CacheEntry(
                            namespace=name,
                            start=node.depth - len(node.key),
                            token_ids=node.key,
                            nbytes=node.num_slots * self.pool.slot_bytes,
                            hits=node.hits,
                            last_used=node.last_used,
                            has_logits=node.logits is not None,
                            locked=node.lock_ref > 0,
                            pinned=node.pins > 0,
                        )
                    )
            return result

    def holds(self, tokens: Sequence[int], namespace: str = DEFAULT_NAMESPACE, logits: bool = False) -> bool:
        """Whether every token of ``tokens`` is cached in ``namespace`` (and, with ``logits``, the logits after the last).

        Looks only: no lock is taken on the path, no counter or recency changes (``cache/snapshot.py``
        checks with it what a restore stored).
        """
        key = tuple(tokens)
        with self._locked():
            ns = self._namespaces.get(namespace)
            if ns is None or not key:
                return False
            path, matched = _walk(ns.root, key)
            if matched < len(key):
                return False
            return not logits or (sum(len(n.key) for n in path) == matched and path[-1].logits is not None)

    def pin(self, tokens: Sequence[int], namespace: str = DEFAULT_NAMESPACE, ttl_s: float | None = None, expires_in_s: float | None = None) -> dict[str, Any]:
        """Exempt the cached sequence ``tokens`` (its whole path) from eviction, for ``ttl_s`` seconds or for good.

        A match through the pinned node renews the TTL; pinning it again sets a new one. The
        pinned path stays evictable by lock (a running request's release works as ever), but
        ``cache/policies.pinned_last`` ranks a pinned leaf after every other, and eviction stops
        there: pins live within ``pin_share`` of the pool, and of the owner's quota.

        Args:
            expires_in_s: The first expiry, when it is not ``ttl_s`` from now (a restored pin's
                time left); each later hit renews the pin to ``ttl_s``.

        Returns:
            ``{"pinned_tokens", "pinned_bytes", "expires_in_s"}`` (``expires_in_s`` None: no TTL).

        Raises:
            ValueError: ``tokens`` is not cached in ``namespace`` (insert it first), or the pin would
                go over a pin budget (the message speaks only of the caller's own pins).
        """
        key = tuple(tokens)
        for name, value in (("ttl_s", ttl_s), ("expires_in_s", expires_in_s)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 seconds or None (no expiry), got {value}")
        self._local.wait_s = 0.0
        with self._locked():
            self._expire_pins()
            ns = self._namespaces.get(namespace)
            path, matched = _walk(ns.root, key) if ns is not None and key else ([], 0)
            if not key or matched < len(key):
                raise ValueError(f"only a cached sequence can be pinned: {matched} of its {len(key)} tokens are cached in this namespace; warm it first")
            node, _ = self._attach_point(ns, key)  # the node ending exactly at the sequence's end
            now = self._clock()
            pin = self._pins.get(id(node))
            if pin is None:
                new = sum(n.num_slots for n in _ancestry(node) if not n.pins)
                refusal = self._pin_refusal(ns.owner, new)
                if refusal:
                    raise ValueError(f"pin refused: it needs {new * self.pool.slot_bytes:,} bytes and {refusal}; unpin or let a pin expire first")
                pin = self._pins[id(node)] = _Pin(node, ttl_s)
                self._pin_path(node, +1)
            pin.ttl_s = ttl_s
            pin.refresh(now)
            if expires_in_s is not None and ttl_s is not None:
                pin.deadline = now + min(expires_in_s, ttl_s)
            return {"pinned_tokens": len(key), "pinned_bytes": sum(n.num_slots for n in _ancestry(node)) * self.pool.slot_bytes, "expires_in_s": pin.expires_in(now)}

    def unpin(self, tokens: Sequence[int], namespace: str = DEFAULT_NAMESPACE) -> bool:
        """Drop the pin of ``tokens``; False when there was none. The entry stays cached, evictable again."""
        with self._locked():
            ns = self._namespaces.get(namespace)
            path, matched = _walk(ns.root, tuple(tokens)) if ns is not None else ([], 0)
            pin = self._pins.get(id(path[-1])) if path and matched == len(tokens) and sum(len(n.key) for n in path) == matched else None
            if pin is not None:
                self._unpin(pin)
            return pin is not None

    @contextmanager
    def exported(self, keep: Callable[[str], bool] = lambda name: True) -> Iterator[list[ExportedNode]]:
        """Every node of the namespaces ``keep`` selects, with their slots locked until the block ends.

        The list is one consistent picture, taken in a single hold of the tree lock; the block itself
        runs outside it, so the caller may copy the slots' bytes slowly while requests go on. The
        slots are neither evicted nor reused meanwhile (even across a clear), exactly as a match's.

        Example:
            >>> with cache.exported(lambda name: name == "") as nodes:
            ...     rows = pool_bytes.read([s for n in nodes for s in n.slots + n.logits_slots])
        """
        self._local.wait_s = 0.0
        with self._locked():
            self._expire_pins()
            now, nodes, leaves, index = self._clock(), [], [], {}
            for ns in self._namespaces.values():
                if not keep(ns.name):
                    continue
                for node in _descendants(ns.root):
                    index[id(node)] = len(nodes)
                    pin = self._pins.get(id(node))
                    nodes.append(
                        ExportedNode(
                            ns.name, index.get(id(node.parent), -1), node.key, tuple(node.value), tuple(node.logits or ()),
                            node.last_access, node.last_used, node.hits, node.pins > 0, pin is not None,
                            pin.expires_in(now) if pin is not None else None, pin.ttl_s if pin is not None else None,
                        )
                    )
                    if not node.children:  # a leaf's lock holds its whole path
                        leaves.append(node)
                        self._inc_lock(node)
        try:
            yield nodes
        finally:
            with self._locked():
                for leaf in leaves:
                    self._dec_lock(leaf)

    @property
    def cached_bytes(self) -> int:
        """Bytes of the slots the tree's entries hold (not counting inserts still copying)."""
        return self._all.slots * self.pool.slot_bytes

    @property
    def budget_bytes(self) -> int:
        return self.pool.capacity * self.pool.slot_bytes

    def last_lock_wait_s(self) -> float:
        """Seconds the calling thread's last public call waited for the tree lock."""
        return getattr(self._local, "wait_s", 0.0)

    def check_invariants(self) -> None:
        """Assert that every total, budget, heap and the pool agree with a fresh count of the tree (tests call this)."""
        with self._locked():
            nodes = [n for ns in self._namespaces.values() for n in _descendants(ns.root)]
            assert all(n.booked == contribution(n) for n in nodes), "a node's state changed without the ledger"
            fresh = self._ledger.recount(nodes)
            assert self._all.as_tuple()[:6] == fresh.as_tuple()[:6], f"totals drifted: {self._all.as_tuple()} kept, {fresh.as_tuple()} counted"
            assert self.pool.capacity - self.pool.num_free == self._all.slots + self._all.pending + self._all.doomed, "slots leaked"
            assert self._all.pinned <= self._pin_slots, "pins went over their budget"
            for owner in self._owners.values():
                mine = [n for ns in owner.namespaces.values() for n in _descendants(ns.root)]
                assert owner.sizes.as_tuple()[:6] == self._ledger.recount(mine).as_tuple()[:6], f"owner {owner.name!r}'s totals drifted"
                assert owner.sizes.pinned <= self._owner_pin_slots, f"owner {owner.name!r}'s pins went over their budget"
                assert owner.sizes.pending == sum(ns.sizes.pending for ns in owner.namespaces.values()) >= 0
                for ns in owner.namespaces.values():
                    assert self._namespaces.get(ns.name) is ns and ns.owner is owner, f"namespace {ns.name!r} is filed under the wrong owner"
                    assert ns.sizes.as_tuple()[:6] == self._ledger.recount(_descendants(ns.root)).as_tuple()[:6], f"namespace {ns.name!r}'s totals drifted"
                for heap in (owner.heap, self._heap):
                    live = {id(e[2]) for e in heap if self._valid(e)}
                    assert all(id(n) in live for n in mine if _evictable(n)), "an evictable leaf is missing from a heap"
            assert sum(len(o.namespaces) for o in self._owners.values()) == len(self._namespaces), "a namespace has no owner record"

    # ------------------------------------------------------------------ insert, in three phases

    def _reserve(self, key: tuple[int, ...], logits_slots: int, name: str) -> "_Reservation | None":
        """Phase 1, under the lock: lock the matched path, make room, take the slots. Changes no edge."""
        if name in self._tombstones:  # cleared, with no lookup since: a request still running must not bring it back
            return None
        ns = self._active_namespace(name)
        path, matched = _walk(ns.root, key)
        anchor = path[-1] if path else ns.root  # the edge may go on past `matched`: it is split at publish, if at all
        logits_here = anchor.logits is not None and sum(len(n.key) for n in path) == matched
        new_tokens = len(key) - matched
        logits = logits_slots if logits_slots and (new_tokens or not logits_here) else 0
        needed = new_tokens + logits
        if needed == 0:
            self._touch(anchor, hit=False)
            self._push_if_evictable(anchor)
            return None
        self._inc_lock(anchor)  # the matched path must outlive the copy
        if not self._make_room(ns, needed):
            self._dec_lock(anchor)
            self._count(ns, "rejected_inserts")
            return None
        slots = self.pool.alloc(needed)
        self._ledger.reserve(ns, needed)
        return _Reservation(ns, anchor, key, matched, slots[:new_tokens], slots[new_tokens:])

    def _publish(self, r: "_Reservation") -> int:
        """Phase 3, under the lock: attach what no other insert stored meanwhile; free the rest."""
        self._ledger.reserve(r.ns, -(len(r.slots) + len(r.logits_slots)))
        if r.ns.dropped:  # cleared while copying
            self._dec_lock(r.parent)
            self.pool.free(r.slots + r.logits_slots)
            return 0
        # The path to r.parent stayed locked, so at least r.start tokens still match.
        parent, matched = self._attach_point(r.ns, r.key)
        duplicate = matched - r.start
        assert duplicate >= 0, "a locked path lost tokens"
        self.pool.free(r.slots[:duplicate])
        end, grows = parent, matched < len(r.key)
        if grows:
            end = Node(r.key[matched:], parent, r.slots[duplicate:], r.ns)
            parent.children[end.key[0]] = end
            end.created = next(self._ticks)
        # Logits landing on a pinned node (an insert ending inside a pinned path) count against the
        # pin budgets, which were checked when the pin was made: store them only where those have room.
        logits = bool(r.logits_slots) and end.logits is None and not (end.pins and self._pin_refusal(r.ns.owner, len(r.logits_slots)))
        if logits:
            end.logits = r.logits_slots
        elif r.logits_slots:
            self.pool.free(r.logits_slots)
        if grows:
            self._ledger.attach(end)
        elif logits:
            self._ledger.rebook(end)
        self._dec_lock(r.parent)
        self._touch(end, hit=False)
        self._push_if_evictable(end)
        return len(r.key) - matched

    def _abandon(self, r: "_Reservation", failed: bool) -> None:
        """The copy raised: free the reservation, leave the tree as it was."""
        self._ledger.reserve(r.ns, -(len(r.slots) + len(r.logits_slots)))
        self._dec_lock(r.parent)
        self.pool.free(r.slots + r.logits_slots)
        if failed:
            self._count(r.ns, "failed_inserts")

    def _make_room(self, ns: Namespace, needed: int) -> bool:
        """Evict so that ``needed`` slots are free within the owner's quota; False (evicting nothing) if impossible.

        Room beyond the owner's quota comes from its own entries. Room in a full pool comes from the
        least valuable entries of every owner while this owner holds less than its reserve, and from
        its own entries first once it holds the reserve or more (so its steady traffic does not show
        in others' sizes).
        """
        owner = ns.owner
        own_excess = owner.sizes.slots + owner.sizes.pending + needed - self._quota_slots
        shortfall = needed - self.pool.num_free
        self._expire_pins()
        if needed > self._quota_slots or own_excess > owner.sizes.unpinned or shortfall > self._all.unpinned:
            return False
        if own_excess > 0:
            self._evict_from(owner.heap, own_excess, ns, "namespace quota" if self.namespace_quota < 1 else "memory pressure")
        shortfall = needed - self.pool.num_free
        if shortfall > 0 and self._reserve_slots and owner.sizes.slots >= self._reserve_slots:
            self._evict_from(owner.heap, shortfall, ns, "memory pressure")
            shortfall = needed - self.pool.num_free
        if shortfall > 0:
            self._evict_from(self._heap, shortfall, ns, "memory pressure")
        assert self.pool.num_free >= needed, "evictable totals promised more than eviction freed"
        return True

    # ------------------------------------------------------------------ tree helpers

    def _attach_point(self, ns: Namespace, key: tuple[int, ...]) -> tuple[Node, int]:
        """The node where ``key``'s uncached part would hang, splitting an edge ``key`` leaves mid-way."""
        path, matched = _walk(ns.root, key)
        if not path:
            return ns.root, matched
        node, depth = path[-1], sum(len(n.key) for n in path)
        if depth > matched:  # the sequence leaves (or ends inside) the last node's edge
            node = self._split(node, len(node.key) - (depth - matched))
        return node, matched

    def _split(self, node: Node, at: int) -> Node:
        """Cut ``node``'s edge after ``at`` tokens; returns the new upper node. Copies slot indices, not KV.

        ::

            parent -[a b c d]-> node      becomes      parent -[a b]-> upper -[c d]-> node

        The logits stay with ``node``: they belong to the end of the original edge. ``upper``
        takes ``node``'s lock count and pins, so a release walking up from ``node`` unlocks it too.
        """
        assert 0 < at < len(node.key), f"split at {at} of an edge of {len(node.key)} tokens"
        upper = Node(node.key[:at], node.parent, node.value[:at], node.ns)
        upper.lock_ref, upper.hits, upper.last_access, upper.last_used = node.lock_ref, node.hits, node.last_access, node.last_used
        upper.created, upper.pins = node.created, node.pins
        node.parent.children[upper.key[0]] = upper
        node.key, node.value, node.parent = node.key[at:], node.value[at:], upper
        upper.children[node.key[0]] = node
        self._ledger.rebook(node)
        self._ledger.attach(upper)
        return upper

    def _delete_leaf(self, node: Node) -> None:
        assert _evictable(node), "only unlocked leaves are deleted"
        self.pool.free(node.slots())
        self._ledger.detach(node)
        del node.parent.children[node.key[0]]
        self._push_if_evictable(node.parent)

    def _evict_from(self, heap: list, num_slots: int, cause: Namespace | None, why: str) -> int:
        """Delete leaves popped from ``heap`` (lowest priority first) until ``num_slots`` are freed; count them against ``cause``.

        Each evicted node's path is logged by hash in its own namespace's log (``why`` says what made
        room necessary), so a later miss there can say it was evicted rather than never cached.
        """
        freed, now = 0, time.time()
        while freed < num_slots and heap:
            entry = heapq.heappop(heap)
            if not self._valid(entry):
                continue
            node = entry[2]
            if node.pins:  # pinned_last ranks every pinned leaf after every other: only pinned ones are left
                heapq.heappush(heap, entry)
                break
            if self.evicted.size:
                self.evicted.record(node.ns.name, _path_tokens(node), now, why)
            freed += node.num_slots
            self._delete_leaf(node)
            self._count(cause, "evictions")
        return freed

    def _inc_lock(self, node: Node) -> None:
        while node.parent is not None:
            node.lock_ref += 1
            if node.lock_ref == 1:  # no longer evictable
                self._ledger.lock_crossed(node)
            node = node.parent

    def _dec_lock(self, node: Node) -> None:
        """Unlock from the deepest locked node to the root (splits since the lock are on the way)."""
        while node.parent is not None:
            assert node.lock_ref > 0, "release() called twice for the same match"
            node.lock_ref -= 1
            if node.lock_ref == 0 and node.doomed:  # cleared while in use: its slots are free only now
                self.pool.free(node.slots())
                node.doomed = False
                self._ledger.rebook(node)
            elif node.lock_ref == 0:
                self._ledger.lock_crossed(node)
                self._push_if_evictable(node)
            node = node.parent

    def _touch(self, node: Node, hit: bool) -> None:
        """Mark ``node`` and its ancestors used now."""
        now, tick = time.time(), next(self._ticks)
        while node.parent is not None:
            node.last_access, node.last_used = tick, now
            node.hits += hit
            node.parent.recent_child = node
            node = node.parent

    # ------------------------------------------------------------------ pins

    def _pin_refusal(self, owner: Owner, slots: int) -> str:
        """Why ``slots`` more pinned slots of ``owner`` would go over a pin budget ('' when they fit).

        Speaks only of the owner's own pins: what other owners pinned is theirs to know.
        """
        slot_bytes = self.pool.slot_bytes
        own = f"your pins hold {owner.sizes.pinned * slot_bytes:,} of your {self._owner_pin_slots * slot_bytes:,} bytes"
        if owner.sizes.pinned + slots > self._owner_pin_slots:
            return own
        if self._all.pinned + slots > self._pin_slots:
            return f"the cache's pins are full for now ({own})"
        return ""

    def _pin_path(self, node: Node, delta: int) -> None:
        """Count one pin more (or fewer) through ``node`` and its ancestors, and re-rank them."""
        for n in _ancestry(node):
            was = n.pins > 0
            n.pins += delta
            if was != (n.pins > 0):
                self._ledger.rebook(n)
                self._push_if_evictable(n)  # its priority changed: the old heap entry is stale

    def _unpin(self, pin: "_Pin") -> None:
        del self._pins[id(pin.node)]
        if pin.node.alive:
            self._pin_path(pin.node, -1)

    def _expire_pins(self) -> None:
        """Unpin every pin whose TTL has passed (O(pins): their number is bounded by the pin budget)."""
        now = self._clock()
        for pin in [p for p in self._pins.values() if p.deadline <= now]:
            self._unpin(pin)

    # ------------------------------------------------------------------ heaps

    def _push_if_evictable(self, node: Node) -> None:
        if not _evictable(node):
            return
        entry = (self._priority(node), next(self._ticks), node)
        owner = node.ns.owner
        for heap, live in ((self._heap, self._all.nodes), (owner.heap, owner.sizes.nodes)):
            heapq.heappush(heap, entry)
            if len(heap) > 2 * live + 64:  # stale entries dominate: compact (amortised O(1) per push)
                heap[:] = [e for e in heap if self._valid(e)]
                heapq.heapify(heap)

    def _valid(self, entry: tuple[Any, int, Node]) -> bool:
        """A heap entry still names an evictable leaf, at the priority it was pushed with."""
        node = entry[2]
        return _evictable(node) and entry[0] == self._priority(node)

    # ------------------------------------------------------------------ namespaces

    def _active_namespace(self, name: str) -> Namespace:
        """The namespace record for a request now (created if new), after an occasional idle sweep."""
        now = self._clock()
        if now - self._last_sweep >= SWEEP_INTERVAL_S:
            self._sweep(now)
        ns = self._namespaces.get(name)
        if ns is None:
            owner_name = owner_of(name)
            owner = self._owners.get(owner_name)
            if owner is None:
                owner = self._owners[owner_name] = Owner(owner_name)
            ns = self._namespaces[name] = owner.namespaces[name] = Namespace(name, owner, self._all, _Counters())
        else:
            self._namespaces.move_to_end(name)
        ns.last_active = now
        return ns

    def _sweep(self, now: float) -> None:
        """Forget namespaces with no entries and no request for ``namespace_idle_s`` (oldest first, bounded work)."""
        self._last_sweep = now
        for _ in range(min(SWEEP_BATCH, len(self._namespaces))):
            name, ns = next(iter(self._namespaces.items()))
            if now - ns.last_active < self.namespace_idle_s:
                break
            if ns.sizes.nodes == 0 and ns.sizes.pending == 0:
                del self._namespaces[name]
                self._forget(ns)
            else:  # idle but holding entries: keep it, look at the next one
                self._namespaces.move_to_end(name)

    def _drop(self, ns: Namespace) -> None:
        """Remove a namespace's entries: free unlocked slots now, locked ones at their release."""
        for pin in [p for p in self._pins.values() if p.node.ns is ns]:
            del self._pins[id(pin.node)]
        for node in _descendants(ns.root):
            if node.lock_ref == 0:
                self.pool.free(node.slots())
            self._ledger.detach(node)
        self._forget(ns)

    def _forget(self, ns: Namespace) -> None:
        """``ns`` (already out of ``_namespaces``) is gone, and its owner with it when it was the last."""
        ns.dropped = True
        self.evicted.forget(ns.name)
        owner = ns.owner
        del owner.namespaces[ns.name]
        if not owner.namespaces:
            del self._owners[owner.name]

    def _count(self, ns: Namespace | None, name: str) -> None:
        for counters in (ns.counters if ns is not None else None, self._totals):
            if counters is not None:
                setattr(counters, name, getattr(counters, name) + 1)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        t0 = time.perf_counter()
        with self._lock:
            self._local.wait_s = getattr(self._local, "wait_s", 0.0) + time.perf_counter() - t0
            yield


# ---------------------------------------------------------------------- helpers


class _Pin:
    """A pinned sequence: the node at its end, and until when (``clock()`` seconds; inf: no TTL)."""

    __slots__ = ("node", "ttl_s", "deadline")

    def __init__(self, node: Node, ttl_s: float | None) -> None:
        self.node, self.ttl_s, self.deadline = node, ttl_s, math.inf

    def refresh(self, now: float) -> None:
        self.deadline = math.inf if self.ttl_s is None else now + self.ttl_s

    def expires_in(self, now: float) -> float | None:
        return None if self.ttl_s is None else max(self.deadline - now, 0.0)


@dataclass
class _Reservation:
    """Slots taken for an insert's copy: ``slots`` for tokens ``key[start:]``, then the logits'."""

    ns: Namespace
    parent: Node  # the deepest node of the matched path, locked during the copy
    key: tuple[int, ...]
    start: int
    slots: list[Slot]
    logits_slots: list[Slot]


@dataclass
class _Counters:
    hits: int = 0
    partial_hits: int = 0
    misses: int = 0
    tokens_saved: int = 0
    prompt_tokens: int = 0  # of the counted lookups, for the token-weighted hit rate
    evictions: int = 0  # entries evicted to make room for this namespace's inserts
    rejected_inserts: int = 0
    failed_inserts: int = 0

    def count(self, kind: MatchKind, reused: int, prompt_tokens: int) -> None:
        if kind == "hit":
            self.hits += 1
        elif kind == "partial":
            self.partial_hits += 1
        elif kind == "miss":
            self.misses += 1
        self.tokens_saved += reused
        self.prompt_tokens += prompt_tokens


def _evictable(node: Node) -> bool:
    return node.alive and not node.children and node.lock_ref == 0 and node.parent is not None


def _walk(root: Node, key: tuple[int, ...]) -> tuple[list[Node], int]:
    """Follow ``key`` from ``root``: the nodes entered (the last maybe only partly) and tokens matched."""
    path: list[Node] = []
    matched = 0
    node = root
    while matched < len(key):
        child = node.children.get(key[matched])
        if child is None:
            break
        common = common_prefix_len(child.key, key, matched)
        path.append(child)
        matched += common
        if common < len(child.key):
            break
        node = child
    return path, matched


def common_prefix_len(edge: Sequence[int], key: Sequence[int], offset: int = 0) -> int:
    """Tokens ``edge`` and ``key[offset:]`` share (both tuples or both lists: a tuple never equals a list), comparing slices in C rather than token by token.

    Along a matched path whole edges are equal, so one slice comparison settles most calls; where
    they differ, a binary search over slices finds the point in O(n) compared tokens, O(log n) steps.
    """
    n = min(len(edge), len(key) - offset)
    if key[offset : offset + n] == (edge if n == len(edge) else edge[:n]):
        return n
    lo, hi = 0, n  # edge[:lo] matches, edge[:hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if key[offset + lo : offset + mid] == edge[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _cached_after(path: list[Node], depth: int, matched: int) -> tuple[int, ...]:
    """Up to ``CACHED_CONTEXT_TOKENS`` cached tokens where a walk that matched ``matched`` tokens stopped.

    Inside the last node's edge: the rest of that edge. At its end: the most recently used child's edge
    (``recent_child``, or any child where that one was split or evicted since). Never a scan of the
    children: a system prompt shared by 10,000 conversations has 10,000 of them, and a scan under the
    tree lock made each partial hit on it 44x slower (870 against 20 µs, ``prefix_bench`` lookup).
    """
    if not path:
        return ()
    last = path[-1]
    if depth > matched:
        at = len(last.key) - (depth - matched)
        return last.key[at : at + CACHED_CONTEXT_TOKENS]
    if last.children:
        child = last.recent_child
        if child is None or child.parent is not last or not child.alive:
            child = next(iter(last.children.values()))
        return child.key[:CACHED_CONTEXT_TOKENS]
    return ()


def _path_tokens(node: Node) -> tuple[int, ...]:
    """The token ids from the root to the end of ``node``'s edge."""
    edges = []
    while node.parent is not None:
        edges.append(node.key)
        node = node.parent
    return tuple(token for edge in reversed(edges) for token in edge)


def _ancestry(node: Node) -> Iterator[Node]:
    """``node`` and its ancestors up to (not including) the root."""
    while node.parent is not None:
        yield node
        node = node.parent


def _descendants(root: Node) -> list[Node]:
    """Every node below ``root``, depth first, parents before children."""
    result, stack = [], list(root.children.values())[::-1]
    while stack:
        node = stack.pop()
        result.append(node)
        stack.extend(list(node.children.values())[::-1])
    return result
