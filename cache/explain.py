"""Why a lookup missed, at the level of token ids: the bounded log of evicted prefixes, and what a lookup saw.

The tree (``cache/prefix_cache.py``) fills a :class:`LookupDetail` during ``match_prefix`` (how far
the prompt matched, the nearest cached sequence, a few cached tokens after the divergence) and
records every evicted node in an :class:`EvictionLog`. The engine turns both into words
(``engine/explain.py``): which part of the chat the divergence is in, decoded context.

The log keeps hashes, never tokens: ``(length, hash(prefix))`` of each evicted node's whole path,
the last :data:`EVICTION_LOG_SIZE` of them per namespace, so "this prefix was cached and evicted at
T" costs a few dozen bytes per eviction and cannot be read back as text. Knows nothing of models.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

EVICTION_LOG_SIZE = 256  # evicted prefixes remembered per namespace
MAX_LENGTHS_CHECKED = 64  # distinct evicted lengths a lookup hashes its prompt at, longest first
CACHED_CONTEXT_TOKENS = 8  # cached tokens kept after the divergence point


@dataclass(frozen=True)
class Evicted:
    """An evicted prefix of the prompt: its length, when (``time.time()``) and why."""

    length: int
    at: float
    cause: str  # "memory pressure" (the pool was full) or "namespace quota" (the namespace's own share)


@dataclass(frozen=True)
class LookupDetail:
    """What one lookup saw in its namespace, beyond what it reused.

    ``matched`` counts the prompt's tokens found on the tree's path (before the ``min_tokens`` rule
    and the one-token-left rule); ``nearest`` is the length of the nearest cached sequence (the
    deepest node reached); ``cached_next`` is up to :data:`CACHED_CONTEXT_TOKENS` tokens that sequence
    has where the prompt diverges (from the deepest node's edge, else its most recently used child).
    """

    matched: int = 0
    nearest: int = 0
    cached_next: tuple[int, ...] = ()
    evicted: Evicted | None = None


class EvictionLog:
    """The hashes of each namespace's last ``size`` evicted prefixes, looked up by a prompt's prefixes.

    Each namespace has its own bounded record: one namespace's evictions never push another's out,
    so what a namespace's lookups answer ("evicted" or not) depends on its own entries alone. Memory
    is ``size`` records (a few dozen bytes each) per namespace that had evictions, until the tree
    forgets the namespace (:meth:`forget`).

    Example:
        >>> log = EvictionLog(size=8)
        >>> log.record("", (1, 2, 3, 4), at=100.0, cause="memory pressure")
        >>> log.find("", (1, 2, 3, 4, 5), beyond=2)
        Evicted(length=4, at=100.0, cause='memory pressure')
    """

    def __init__(self, size: int = EVICTION_LOG_SIZE) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._entries: dict[str, OrderedDict[tuple[int, int], Evicted]] = {}  # namespace -> (length, hash) -> record, oldest first
        self._lengths: dict[str, dict[int, int]] = {}  # namespace -> length -> entries of that length

    def record(self, namespace: str, prefix: Sequence[int], at: float, cause: str) -> None:
        """Remember that ``prefix`` (a node's whole path) was evicted from ``namespace``."""
        key = (len(prefix), hash(tuple(prefix)))
        with self._lock:
            entries = self._entries.get(namespace)
            if entries is None:
                entries = self._entries[namespace] = OrderedDict()
                self._lengths[namespace] = {}
            lengths = self._lengths[namespace]
            if entries.pop(key, None) is None:
                lengths[key[0]] = lengths.get(key[0], 0) + 1
            entries[key] = Evicted(len(prefix), at, cause)
            while len(entries) > self.size:
                (length, _), _ = entries.popitem(last=False)
                lengths[length] -= 1
                if not lengths[length]:
                    del lengths[length]

    def find(self, namespace: str, tokens: Sequence[int], beyond: int) -> Evicted | None:
        """The longest evicted prefix of ``tokens`` in ``namespace`` longer than ``beyond`` tokens, if any."""
        with self._lock:
            lengths = sorted((n for n in self._lengths.get(namespace, ()) if beyond < n <= len(tokens)), reverse=True)
            entries = self._entries.get(namespace, {})
        key = tuple(tokens)
        for length in lengths[:MAX_LENGTHS_CHECKED]:  # hashing outside the lock: O(length) each, in C
            found = entries.get((length, hash(key[:length])))
            if found is not None:
                return found
        return None

    def forget(self, namespace: str) -> None:
        """Drop a namespace's entries (it was cleared or forgotten: nothing of it was evicted any more)."""
        with self._lock:
            self._entries.pop(namespace, None)
            self._lengths.pop(namespace, None)

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._entries.values())
