"""The prefix tree's records and the one place their totals change: nodes, namespaces, owners, the ledger.

``cache/prefix_cache.py`` walks and edits the tree; this module says what a node *counts for*. A
node's share of the totals (nodes, tokens, slots, evictable, pinned, pinned and evictable, doomed)
is a function of its state alone (:func:`contribution`). The :class:`Ledger` is the only code that
adds to or takes from the totals: after any change to a node's accounted state (its key, slots,
logits, ``lock_ref``, ``pins``, ``alive``, ``doomed``) the tree calls :meth:`Ledger.rebook`, which
books the difference between what the node counted for and what it counts for now. Slots reserved
by inserts still copying (``pending``) go through :meth:`Ledger.reserve`. So no total is kept in
step by hand, and ``PrefixCache.check_invariants`` can compare every total with a fresh sum over
the tree.

Totals are kept at three levels: the namespace, its owner (all of one owner's namespaces: the
quota, the pin share and the reserve are charged there), and the whole cache. An owner is the part
of a namespace's name before its first ``/`` (:func:`owner_of`): ``"session-ab/salt-1"`` belongs
to ``"session-ab"``, and a name without ``/`` is its own owner.

Knows nothing of pools, models or locks: the tree holds its lock while calling in here.
"""

from __future__ import annotations

from typing import Any

from cache.slots import Slot

Contribution = tuple[int, int, int, int, int, int, int]  # nodes, tokens, slots, evictable, pinned, pinned_evictable, doomed
NOTHING: Contribution = (0, 0, 0, 0, 0, 0, 0)


def owner_of(namespace: str) -> str:
    """The owner a namespace is charged to: its name up to the first ``/`` (the whole name if none)."""
    return namespace.split("/", 1)[0]


class Node:
    """One edge of the tree: its tokens, their slots, and (maybe) the slots of the logits after its last token."""

    __slots__ = ("key", "value", "logits", "parent", "children", "recent_child", "ns", "lock_ref", "pins", "hits", "last_access", "last_used", "created", "alive", "doomed", "booked")

    def __init__(self, key: tuple[int, ...], parent: "Node | None", value: list[Slot], ns: "Namespace | None") -> None:
        self.key = key
        self.value = value  # one slot per token of key
        self.logits: list[Slot] | None = None
        self.parent = parent
        self.children: dict[int, Node] = {}  # keyed by the first token of the child's edge
        self.recent_child: Node | None = None  # the child touched last: the explainer's "cached next" in O(1)
        self.ns = ns
        self.lock_ref = 0  # running requests (and copying inserts) whose path goes through here
        self.pins = 0  # pins whose path goes through here (cache/policies.pinned_last ranks them last)
        self.hits = 0
        self.last_access = 0
        self.last_used = 0.0
        self.created = 0  # the tick at which it was stored (fifo)
        self.alive = False  # True from the ledger's attach until evicted or cleared
        self.doomed = False  # cleared while locked: free the slots at the last release
        self.booked: Contribution = NOTHING  # what the ledger last counted this node for

    @property
    def num_slots(self) -> int:
        return len(self.value) + (len(self.logits) if self.logits else 0)

    def slots(self) -> list[Slot]:
        """Every slot the node holds: its tokens' KV, then its logits'."""
        return self.value + (self.logits or [])

    @property
    def depth(self) -> int:
        """Tokens from the root to the end of this node's edge."""
        depth, node = 0, self
        while node is not None:
            depth += len(node.key)
            node = node.parent
        return depth


def contribution(node: Node) -> Contribution:
    """What ``node`` counts for in the totals, from its state alone.

    A live node counts once, with its tokens and slots; its slots are ``evictable`` while no request
    holds it, ``pinned`` while a pin goes through it. A cleared node a request still holds counts
    only as ``doomed`` (its slots are freed at the last release); any other dead node, for nothing.
    """
    n = len(node.value) + (len(node.logits) if node.logits else 0)
    if node.alive:
        free = n if node.lock_ref == 0 else 0
        return (1, len(node.key), n, free, n if node.pins else 0, free if node.pins else 0, 0)
    return (0, 0, 0, 0, 0, 0, n) if node.doomed else NOTHING


class Totals:
    """Sums of :func:`contribution` over a set of nodes, plus the slots reserved by inserts still copying.

    ``pinned`` is the pin budget's use; ``pinned_evictable`` the pinned slots no request holds:
    evictable by lock, but exempt by pin, so not room an insert can make (see :attr:`unpinned`).
    """

    __slots__ = ("nodes", "tokens", "slots", "evictable", "pinned", "pinned_evictable", "doomed", "pending")

    def __init__(self) -> None:
        self.nodes = self.tokens = self.slots = self.evictable = self.pinned = self.pinned_evictable = self.doomed = self.pending = 0

    @property
    def unpinned(self) -> int:
        """Slots eviction can actually free."""
        return self.evictable - self.pinned_evictable

    def as_tuple(self) -> Contribution:
        return (self.nodes, self.tokens, self.slots, self.evictable, self.pinned, self.pinned_evictable, self.doomed)

    def shift(self, old: Contribution, new: Contribution) -> None:
        self.nodes += new[0] - old[0]
        self.tokens += new[1] - old[1]
        self.slots += new[2] - old[2]
        self.evictable += new[3] - old[3]
        self.pinned += new[4] - old[4]
        self.pinned_evictable += new[5] - old[5]
        self.doomed += new[6] - old[6]


class Owner:
    """Everything one owner's namespaces hold together, and their heap (an owner over its quota, or above
    its reserve, makes room from its own entries, least valuable first)."""

    __slots__ = ("name", "sizes", "heap", "namespaces")

    def __init__(self, name: str) -> None:
        self.name = name
        self.sizes = Totals()
        self.heap: list[tuple[Any, int, Node]] = []
        self.namespaces: dict[str, Namespace] = {}


class Namespace:
    """A namespace's root, counters and sizes."""

    __slots__ = ("name", "owner", "root", "counters", "sizes", "chain", "last_active", "dropped")

    def __init__(self, name: str, owner: Owner, all_sizes: Totals, counters: Any) -> None:
        self.name = name
        self.owner = owner
        self.root = Node((), None, [], self)
        self.counters = counters
        self.sizes = Totals()
        self.chain = (self.sizes, owner.sizes, all_sizes)  # every Totals a node of this namespace counts in
        self.last_active = 0.0
        self.dropped = False


class Ledger:
    """The cache's totals and the only code that changes them.

    Example:
        >>> ledger.attach(node)            # a new node counts from now on
        >>> node.pins += 1; ledger.rebook(node)   # any state change: book the difference
    """

    def __init__(self) -> None:
        self.all = Totals()

    def rebook(self, node: Node) -> None:
        """Book the difference between what ``node`` counted for and what its state says now."""
        new = contribution(node)
        old = node.booked
        if new != old:
            node.booked = new
            nodes, tokens, slots, evictable, pinned, pinned_evictable, doomed = (a - b for a, b in zip(new, old))
            rare = pinned or pinned_evictable or doomed
            for totals in node.ns.chain:
                totals.nodes += nodes
                totals.tokens += tokens
                totals.slots += slots
                totals.evictable += evictable
                if rare:
                    totals.pinned += pinned
                    totals.pinned_evictable += pinned_evictable
                    totals.doomed += doomed

    def lock_crossed(self, node: Node) -> None:
        """:meth:`rebook` for the commonest change, ``node.lock_ref`` going from 0 to 1 or back (every
        lookup makes two per node on its path): only ``evictable`` and ``pinned_evictable`` move, by the
        node's slots. ``PrefixCache.check_invariants`` checks it agrees with :func:`contribution`."""
        if not node.alive:  # a dead node counts the same locked or not
            return
        old = node.booked
        free = 0 if node.lock_ref else old[2]
        delta = free - old[3]
        if delta:
            pinned_delta = delta if node.pins else 0
            node.booked = (old[0], old[1], old[2], free, old[4], old[5] + pinned_delta, old[6])
            for totals in node.ns.chain:
                totals.evictable += delta
                totals.pinned_evictable += pinned_delta

    def attach(self, node: Node) -> None:
        """``node`` (already hung in the tree) is live from now on."""
        node.alive = True
        self.rebook(node)

    def detach(self, node: Node) -> None:
        """``node`` is gone (evicted, or cleared); held by a request, its slots count as doomed until the release."""
        node.alive = False
        node.doomed = node.lock_ref > 0
        self.rebook(node)

    def reserve(self, ns: Namespace, slots: int) -> None:
        """``slots`` more (or, negative, fewer) are reserved by ``ns``'s inserts still copying."""
        for totals in ns.chain:
            totals.pending += slots

    def recount(self, nodes: list[Node]) -> Totals:
        """Fresh sums of :func:`contribution` over ``nodes`` (for checking the running totals)."""
        fresh = Totals()
        for node in nodes:
            fresh.shift(NOTHING, contribution(node))
        return fresh
