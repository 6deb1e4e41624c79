"""Eviction policies: one priority function per policy, the smallest priority is evicted first.

The tree (``cache/prefix_cache.py``) keeps its evictable leaves (unlocked, childless) in heaps of
``(priority(node), tick, node)``; ``PrefixCache(pool, policy="lfu")`` picks the function once, and
the same function serves the engine's live cache and a replay (``cache/replay.py``). A heap entry
is valid only while the node's priority still equals the one it was pushed with, so a policy must
depend only on fields the tree changes through ``_touch`` and ``_add_node`` (which re-push).

As SGLang's ``get_priority`` per eviction strategy. This module knows nothing of pools or models.

Fields a node offers (see ``_Node``): ``last_access`` (a tick, larger is more recent),
``hits`` (matches through the node), ``created`` (the tick at which the node was stored),
``pins`` (pins through the node: :func:`pinned_last` ranks them after the rest).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol


class _Ranked(Protocol):
    last_access: int
    hits: int
    created: int
    pins: int


Priority = Callable[[_Ranked], Any]  # a value comparable with the policy's other values


def lru(node: _Ranked) -> int:
    """Least recently used first: the default, what a chat server with returning users wants."""
    return node.last_access


def lfu(node: _Ranked) -> tuple[int, int]:
    """Least frequently matched first, the least recently used among equals (a new leaf goes first)."""
    return node.hits, node.last_access


def fifo(node: _Ranked) -> int:
    """Oldest stored first, however often it is used (a baseline: what recency buys)."""
    return node.created


def mru(node: _Ranked) -> int:
    """Most recently used first: keeps old prefixes when a scan of one-off prompts streams through."""
    return -node.last_access


POLICIES: dict[str, Priority] = {"lru": lru, "lfu": lfu, "fifo": fifo, "mru": mru}


def get_priority(policy: str) -> Priority:
    """The priority function of ``policy`` (one of :data:`POLICIES`).

    Raises:
        ValueError: an unknown policy name.
    """
    try:
        return POLICIES[policy]
    except (KeyError, TypeError):
        raise ValueError(f"unknown eviction policy {policy!r}; choose one of: {', '.join(POLICIES)}") from None


def pinned_last(priority: Priority) -> Priority:
    """``priority``, with every pinned leaf (``node.pins > 0``) ranked after every unpinned one.

    The tree wraps its policy with this once; eviction stops at the first pinned leaf it pops, so a
    pin is an exemption expressed as a rank, and it works the same under every policy. Pinning and
    unpinning re-push the node, which keeps heap entries valid (see the module docstring).
    """

    def ranked(node: Any) -> tuple[bool, Any]:
        return node.pins > 0, priority(node)

    ranked.__name__ = f"pinned_last({getattr(priority, '__name__', 'priority')})"
    return ranked
