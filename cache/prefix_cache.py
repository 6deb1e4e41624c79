"""A token-level radix tree of KV segments: the cross-request prefix cache.

Prompts that share a prefix share the tree's path for it, so the prefix's KV is stored once. Each
node holds the KV of the tokens on its edge and, where an inserted sequence ended, the logits that
predict the token after it (so an exact hit needs no model call at all).

This module knows nothing about models, tensors or tokenizers. Keys are sequences of token ids;
values are opaque handles that only need ``nbytes``, ``len()`` and ``slice(start, stop)`` (see
:class:`KVSegment`). Turning those handles into a model's cache is the engine's job.

Memory is bounded by a byte budget: unreferenced leaves are evicted least recently used first.
Nodes on the path of a running request are locked (``lock_ref > 0``) and never evicted. Entries
live in namespaces: a lookup only ever sees entries inserted under the same namespace. Every public
method takes one re-entrant lock, so the cache can be shared by request threads.

Example:
    >>> cache = PrefixCache(budget_bytes=1 << 20, min_tokens=2)
    >>> cache.insert([1, 2, 3, 4], segment_of_4_tokens, last_logits=logits)
    >>> match = cache.match_prefix([1, 2, 3, 9])   # partial hit: 3 tokens reused
    >>> ...                                         # use match.segments, then:
    >>> cache.release(match)
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, Sequence, runtime_checkable

DEFAULT_NAMESPACE = ""
MatchKind = Literal["hit", "partial", "miss", "skipped"]


@runtime_checkable
class KVSegment(Protocol):
    """What the cache needs of a stored value: its token count, its size, and a copying slice."""

    @property
    def nbytes(self) -> int: ...

    def __len__(self) -> int: ...

    def slice(self, start: int, stop: int) -> "KVSegment":
        """Tokens ``[start, stop)`` as a segment with its own storage (so freeing one piece frees it)."""
        ...


@dataclass(frozen=True)
class PrefixMatch:
    """The result of :meth:`PrefixCache.match_prefix`.

    ``segments`` are ``(segment, tokens_used)`` pairs from the root down; their ``tokens_used`` add
    up to ``length``. The last pair may use only the start of its segment. ``last_logits`` is set
    only on an exact hit. The matched path stays locked against eviction until
    :meth:`PrefixCache.release`.
    """

    kind: MatchKind
    length: int
    prompt_length: int
    namespace: str
    segments: tuple[tuple[KVSegment, int], ...] = ()
    last_logits: Any = None
    _locked: tuple["_Node", ...] = field(default=(), repr=False, compare=False)


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


class PrefixCache:
    """Radix tree keyed by token ids, with LRU eviction under a byte budget.

    Args:
        budget_bytes: Upper bound on the bytes of all stored segments and logits. Never exceeded:
            an insert that cannot fit after evicting every unlocked leaf is dropped.
        min_tokens: Sequences shorter than this are neither looked up (nor counted in the stats)
            nor inserted: their prefill is too cheap to be worth the bookkeeping.
    """

    def __init__(self, budget_bytes: int = 512 << 20, min_tokens: int = 20) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        if min_tokens < 1:
            raise ValueError(f"min_tokens must be >= 1, got {min_tokens}")
        self.budget_bytes = budget_bytes
        self.min_tokens = min_tokens
        self._lock = threading.RLock()
        self._clock = itertools.count(1)  # LRU order: a counter, so ties cannot happen
        self._roots: dict[str, _Node] = {}
        self._counters: dict[str, _Counters] = {}
        self._cached_bytes = 0

    # ------------------------------------------------------------------ public API

    def match_prefix(self, tokens: Sequence[int], namespace: str = DEFAULT_NAMESPACE) -> PrefixMatch:
        """Find the longest cached prefix of ``tokens`` and lock its path.

        Exact hit: the whole sequence is cached and logits are stored at its end. A shared prefix
        shorter than ``min_tokens`` (a chat template's first few tokens) is not reused: a miss.
        Otherwise at least one token is left to compute (a prompt that is a strict prefix of a cached sequence
        reuses all but its last token), because the caller needs logits for the last position.

        Args:
            tokens: The prompt's token ids.
            namespace: Only entries inserted under this namespace can match.

        Returns:
            A :class:`PrefixMatch`; pass it to :meth:`release` when the KV has been used.
        """
        key = tuple(tokens)
        with self._lock:
            if len(key) < self.min_tokens:
                return PrefixMatch("skipped", 0, len(key), namespace)
            node_path, matched = self._walk(self._roots.get(namespace), key)
            end_node = node_path[-1] if node_path else None
            exact = (
                matched == len(key)
                and end_node is not None
                and end_node.last_logits is not None
                and sum(len(n.key) for n in node_path) == matched  # ends at the node's end, not mid-edge
            )
            if exact:
                kind: MatchKind = "hit"
                usable = matched
            else:
                usable = min(matched, len(key) - 1)
                if usable < self.min_tokens:  # a few shared template tokens are not worth a reuse
                    usable = 0
                kind = "partial" if usable > 0 else "miss"

            segments, used_nodes, remaining = [], [], usable
            for node in node_path:
                if remaining == 0:
                    break
                take = min(len(node.key), remaining)
                segments.append((node.kv, take))
                used_nodes.append(node)
                remaining -= take
            self._touch(used_nodes, hit=True)
            for node in used_nodes:
                node.lock_ref += 1

            counters = self._counters_for(namespace)
            counters.count(kind, usable, len(key))
            return PrefixMatch(
                kind=kind,
                length=usable,
                prompt_length=len(key),
                namespace=namespace,
                segments=tuple(segments),
                last_logits=end_node.last_logits if exact else None,
                _locked=tuple(used_nodes),
            )

    def release(self, match: PrefixMatch) -> None:
        """Unlock the path locked by ``match_prefix``. Call exactly once per match."""
        with self._lock:
            for node in match._locked:
                assert node.lock_ref > 0, "release() called twice for the same match"
                node.lock_ref -= 1

    def insert(
        self,
        tokens: Sequence[int],
        kv: KVSegment,
        last_logits: Any = None,
        namespace: str = DEFAULT_NAMESPACE,
    ) -> int:
        """Store the KV of ``tokens`` (only the part not cached yet) and the logits at its end.

        Args:
            tokens: The full sequence, from position 0.
            kv: KV for every token of ``tokens`` (``len(kv) >= len(tokens)``); the cache slices
                out the uncached part, so the caller's segment is never kept or changed.
            last_logits: Logits predicting the token after ``tokens`` (anything with ``nbytes``),
                or None.
            namespace: The namespace to store under.

        Returns:
            The number of tokens newly stored (0 when already cached, too short, or over budget).
        """
        key = tuple(tokens)
        if len(kv) < len(key):
            raise ValueError(f"kv holds {len(kv)} tokens but {len(key)} tokens were given")
        with self._lock:
            if len(key) < self.min_tokens:
                return 0
            root = self._roots.setdefault(namespace, _Node(key=(), parent=None))
            node_path, matched = self._walk(root, key)
            parent = root
            if node_path:
                depth = sum(len(n.key) for n in node_path)
                parent = node_path[-1]
                if depth > matched:  # the sequence leaves (or ends inside) the last node's edge
                    parent = self._split(parent, len(parent.key) - (depth - matched))
            new_tokens = key[matched:]
            new_kv = kv.slice(matched, len(key)) if new_tokens else None
            logits_needed = last_logits is not None and (new_tokens or parent.last_logits is None)
            needed = (new_kv.nbytes if new_kv is not None else 0) + (_nbytes(last_logits) if logits_needed else 0)
            path = _ancestors(parent)
            for node in path:
                node.lock_ref += 1  # keep the attach point alive while making room
            try:
                if not self._make_room(needed):
                    self._counters_for(namespace).rejected_inserts += 1
                    if not root.children:
                        del self._roots[namespace]
                    return 0
            finally:
                for node in path:
                    node.lock_ref -= 1
            end = parent
            if new_tokens:
                end = _Node(key=new_tokens, parent=parent, kv=new_kv)
                parent.children[new_tokens[0]] = end
                self._cached_bytes += new_kv.nbytes
            if logits_needed:
                end.last_logits = last_logits
                self._cached_bytes += _nbytes(last_logits)
            self._touch(_ancestors(end), hit=False)
            assert self._cached_bytes <= self.budget_bytes, "budget exceeded after insert"
            return len(new_tokens)

    def evict(self, num_bytes: int) -> int:
        """Evict unlocked leaves, least recently used first, until ``num_bytes`` are freed.

        Returns:
            The bytes actually freed (less than asked when everything left is locked).
        """
        with self._lock:
            return self._evict(num_bytes)

    def clear(self, namespace: str | None = None) -> None:
        """Drop every entry and counter, or only those of one namespace.

        Requests already running keep the KV they matched; their later inserts start afresh.
        """
        with self._lock:
            names = list(self._roots) if namespace is None else [namespace]
            for name in names:
                root = self._roots.pop(name, None)
                if root is not None:
                    self._cached_bytes -= sum(n.nbytes for n in _descendants(root))
            if namespace is None:
                self._counters.clear()
            else:
                self._counters.pop(namespace, None)

    def stats(self, namespace: str | None = None) -> dict[str, Any]:
        """Counters and sizes, for all namespaces or one.

        ``hit_rate`` counts exact and partial hits; ``token_hit_rate`` is the share of looked-up
        prompt tokens that were reused; ``total_requests`` counts lookups of sequences of at least
        ``min_tokens`` tokens (``hits + partial_hits + misses``).
        """
        with self._lock:
            names = list(self._roots) if namespace is None else [namespace]
            nodes = [n for name in names if name in self._roots for n in _descendants(self._roots[name])]
            counters = _Counters()
            for name, c in self._counters.items():
                if namespace is None or name == namespace:
                    counters.add(c)
            total = counters.hits + counters.partial_hits + counters.misses
            return {
                "cache_size": len(nodes),
                "cached_tokens": sum(len(n.key) for n in nodes),
                "cached_bytes": sum(n.nbytes for n in nodes),
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
                "namespaces": len(names) if namespace is None else int(namespace in self._roots),
            }

    def entries(self, namespace: str | None = None) -> list[CacheEntry]:
        """Every node, depth first, for one namespace or all of them."""
        with self._lock:
            names = list(self._roots) if namespace is None else [namespace]
            result = []
            for name in names:
                root = self._roots.get(name)
                if root is None:
                    continue
                for node in _descendants(root):
                    result.append(
                        CacheEntry(
                            namespace=name,
                            start=node.depth - len(node.key),
                            token_ids=node.key,
                            nbytes=node.nbytes,
                            hits=node.hits,
                            last_used=node.last_used,
                            has_logits=node.last_logits is not None,
                            locked=node.lock_ref > 0,
                        )
                    )
            return result

    @property
    def cached_bytes(self) -> int:
        with self._lock:
            return self._cached_bytes

    # ------------------------------------------------------------------ internals

    def _walk(self, root: "_Node | None", key: tuple[int, ...]) -> tuple[list["_Node"], int]:
        """Follow ``key`` from ``root``: the nodes entered (the last maybe only partly) and tokens matched."""
        path: list[_Node] = []
        matched = 0
        node = root
        while node is not None and matched < len(key):
            child = node.children.get(key[matched])
            if child is None:
                break
            common = _common_prefix_len(child.key, key, matched)
            path.append(child)
            matched += common
            if common < len(child.key):
                break
            node = child
        return path, matched

    def _split(self, node: "_Node", at: int) -> "_Node":
        """Cut ``node``'s edge after ``at`` tokens; returns the new upper node.

        ::

            parent -[a b c d]-> node      becomes      parent -[a b]-> upper -[c d]-> node

        The logits stay with ``node``: they belong to the end of the original edge.
        """
        assert 0 < at < len(node.key), f"split at {at} of an edge of {len(node.key)} tokens"
        upper = _Node(key=node.key[:at], parent=node.parent, kv=node.kv.slice(0, at))
        upper.hits, upper.last_access, upper.last_used = node.hits, node.last_access, node.last_used
        # upper stays unlocked: while node is locked, upper has a child and so is not evictable.
        lower_kv = node.kv.slice(at, len(node.key))
        self._cached_bytes += upper.kv.nbytes + lower_kv.nbytes - node.kv.nbytes
        node.parent.children[upper.key[0]] = upper
        node.key, node.kv, node.parent = node.key[at:], lower_kv, upper
        upper.children[node.key[0]] = node
        return upper

    def _make_room(self, needed: int) -> bool:
        if needed > self.budget_bytes:
            return False
        overflow = self._cached_bytes + needed - self.budget_bytes
        if overflow > 0:
            self._evict(overflow)
        return self._cached_bytes + needed <= self.budget_bytes

    def _evict(self, num_bytes: int) -> int:
        # A heap of evictable leaves by LRU priority; a parent left childless joins it.
        heap = [(_lru_priority(n), id(n), n) for root in self._roots.values() for n in _descendants(root) if n.evictable]
        heapq.heapify(heap)
        freed = 0
        while freed < num_bytes and heap:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            freed += node.nbytes
            self._cached_bytes -= node.nbytes
            del parent.children[node.key[0]]
            self._counters_for(self._namespace_of(parent)).evictions += 1
            if parent.evictable:
                heapq.heappush(heap, (_lru_priority(parent), id(parent), parent))
        return freed

    def _namespace_of(self, node: "_Node") -> str:
        while node.parent is not None:
            node = node.parent
        return next((name for name, root in self._roots.items() if root is node), DEFAULT_NAMESPACE)

    def _touch(self, nodes: Sequence["_Node"], hit: bool) -> None:
        now, tick = time.time(), next(self._clock)
        for node in nodes:
            node.last_access, node.last_used = tick, now
            if hit:
                node.hits += 1

    def _counters_for(self, namespace: str) -> "_Counters":
        return self._counters.setdefault(namespace, _Counters())


# ---------------------------------------------------------------------- helpers


class _Node:
    """One edge of the tree: the tokens on it, their KV, and (maybe) the logits after its last token."""

    __slots__ = ("key", "kv", "parent", "children", "last_logits", "lock_ref", "hits", "last_access", "last_used")

    def __init__(self, key: tuple[int, ...], parent: "_Node | None", kv: KVSegment | None = None) -> None:
        self.key = key
        self.kv = kv
        self.parent = parent
        self.children: dict[int, _Node] = {}  # keyed by the first token of the child's edge
        self.last_logits: Any = None
        self.lock_ref = 0
        self.hits = 0
        self.last_access = 0
        self.last_used = 0.0

    @property
    def nbytes(self) -> int:
        return (self.kv.nbytes if self.kv is not None else 0) + _nbytes(self.last_logits)

    @property
    def depth(self) -> int:
        """Tokens from the root to the end of this node's edge."""
        depth, node = 0, self
        while node is not None:
            depth += len(node.key)
            node = node.parent
        return depth

    @property
    def evictable(self) -> bool:
        return not self.children and self.lock_ref == 0 and self.parent is not None


@dataclass
class _Counters:
    hits: int = 0
    partial_hits: int = 0
    misses: int = 0
    tokens_saved: int = 0
    prompt_tokens: int = 0  # of the counted lookups, for the token-weighted hit rate
    evictions: int = 0
    rejected_inserts: int = 0

    def count(self, kind: MatchKind, reused: int, prompt_tokens: int) -> None:
        if kind == "hit":
            self.hits += 1
        elif kind == "partial":
            self.partial_hits += 1
        elif kind == "miss":
            self.misses += 1
        self.tokens_saved += reused
        self.prompt_tokens += prompt_tokens

    def add(self, other: "_Counters") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


def _lru_priority(node: _Node) -> int:
    """Eviction order: the least recently used leaf goes first."""
    return node.last_access


def _common_prefix_len(edge: tuple[int, ...], key: tuple[int, ...], offset: int) -> int:
    n = min(len(edge), len(key) - offset)
    i = 0
    while i < n and edge[i] == key[offset + i]:
        i += 1
    return i


def _ancestors(node: _Node) -> list[_Node]:
    """The path from just below the root down to ``node`` (empty for a root)."""
    path = []
    while node.parent is not None:
        path.append(node)
        node = node.parent
    return path[::-1]


def _descendants(root: _Node) -> list[_Node]:
    """Every node below ``root``, depth first, parents before children."""
    result, stack = [], list(root.children.values())[::-1]
    while stack:
        node = stack.pop()
        result.append(node)
        stack.extend(list(node.children.values())[::-1])
    return result


def _nbytes(value: Any) -> int:
    return 0 if value is None else int(value.nbytes)
