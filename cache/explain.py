"""Why a lookup missed, at the level of token ids: the bounded log of evicted prefixes, and what a lookup saw.

The tree (``cache/prefix_cache.py``) fills a :class:`LookupDetail` during ``match_prefix`` (how far
the prompt matched, the nearest cached sequence, a few cached tokens after the divergence) and
records every evicted node in an :class:`EvictionLog`. The engine turns both into words
(``engine/explain.py``): which part of the chat the divergence is in, decoded context.

The log keeps hashes, never tokens: ``(namespace, length, hash(prefix))`` of each evicted node's
whole path, the last :data:`EVICTION_LOG_SIZE` of them, so "this prefix was cached and evicted at
T" costs a few dozen bytes per eviction and cannot be read back as text. Knows nothing of models.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

EVICTION_LOG_SIZE = 4096  # evicted prefixes remembered, all namespaces together
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
    """The hashes of the last ``size`` evicted prefixes, per namespace, looked up by a prompt's prefixes.

    Example:
        >>> log = EvictionLog(size=8)
        >>> log.record("", (1, 2, 3, 4), at=100.0, cause="memory pressure")
        >>> log.find("", (1, 2, 3, 4, 5), beyond=2)
        Evicted(length=4, at=100.0, cause='memory pressure')
    """

    def __init__(self, size: int = EVICTION_LOG_SIZE) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, int, int], Evicted] = OrderedDict()  # oldest first
        self._lengths: dict[str, dict[int, int]] = {}  # namespace -> length -> entries of that length

    def record(self, namespace: str, prefix: Sequence[int], at: float, cause: str) -> None:
        """Remember that ``prefix`` (a node's whole path) was evicted from ``namespace``."""
        key = (namespace, len(prefix), hash(tuple(prefix)))
        with self._lock:
            if self._entries.pop(key, None) is None:
                lengths = self._lengths.setdefault(namespace, {})
                lengths[len(prefix)] = lengths.get(len(prefix), 0) + 1
            self._entries[key] = Evicted(len(prefix), at, cause)
            while len(self._entries) > self.size:
                (name, length, _), _ = self._entries.popitem(last=False)
                self._forget_length(name, length)

    def find(self, namespace: str, tokens: Sequence[int], beyond: int) -> Evicted | None:
        """The longest evicted prefix of ``tokens`` in ``namespace`` longer than ``beyond`` tokens, if any."""
        with self._lock:
            lengths = sorted((n for n in self._lengths.get(namespace, ()) if beyond < n <= len(tokens)), reverse=True)
        key = tuple(tokens)
        for length in lengths[:MAX_LENGTHS_CHECKED]:  # hashing outside the lock: O(length) each, in C
            found = self._entries.get((namespace, length, hash(key[:length])))
            if found is not None:
                return found
        return None

    def forget(self, namespace: str) -> None:
        """Drop a namespace's entries (it was cleared: nothing of it was evicted any more)."""
        with self._lock:
            if self._lengths.pop(namespace, None) is not None:
                for key in [k for k in self._entries if k[0] == namespace]:
                    del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)

    def _forget_length(self, namespace: str, length: int) -> None:
        lengths = self._lengths[namespace]
        lengths[length] -= 1
        if not lengths[length]:
            del lengths[length]
            if not lengths:
                del self._lengths[namespace]
