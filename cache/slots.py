"""Slot pools: fixed-size cells the prefix cache hands out to store one token's KV each.

The radix tree (``cache/prefix_cache.py``) never touches KV bytes. It asks a pool for slot
indices, records them on its nodes, and frees them; the bytes are written and read by whoever
owns the pool (the engine's torch pool in ``engine/kv_pool.py``). This module holds the protocol
the tree needs, the bump-pointer allocator every pool shares, and a pure-Python
:class:`SimulatedPool` for tests and benchmarks (no torch, as SGLang's simulated constructors).

A pool of ``capacity`` slots of ``slot_bytes`` each *is* the byte budget: the tree cannot hold
more than the pool has, whatever its own bookkeeping says.
"""

from __future__ import annotations

from typing import Any, NewType, Protocol, Sequence, runtime_checkable

Slot = NewType("Slot", int)  # an index into a pool, not a token id or a position


@runtime_checkable
class SlotPool(Protocol):
    """What the tree needs of a pool: sizes, and O(1)-per-slot allocation and freeing."""

    @property
    def capacity(self) -> int:
        """Slots in the pool."""
        ...

    @property
    def slot_bytes(self) -> int:
        """Bytes one slot holds (one token's KV)."""
        ...

    @property
    def num_free(self) -> int: ...

    def alloc(self, n: int) -> list[Slot]:
        """``n`` free slots; raises ``RuntimeError`` when fewer are free (the tree checks first)."""
        ...

    def free(self, slots: Sequence[Slot]) -> None: ...


@runtime_checkable
class KVSource(Protocol):
    """KV the tree can copy into its slots: what an insert hands over (a live model cache, in the engine).

    ``write`` runs *outside* the tree's lock, so it may be slow or raise (out of memory): the tree
    then frees the reserved slots and stores nothing.
    """

    def __len__(self) -> int:
        """Tokens of KV available, from position 0."""
        ...

    @property
    def logits_slots(self) -> int:
        """Slots the logits after the last token take (0: no logits to store)."""
        ...

    def write(self, start: int, slots: Sequence[Slot], logits_slots: Sequence[Slot]) -> None:
        """Copy the KV of tokens ``[start, start + len(slots))`` into ``slots`` and the logits into ``logits_slots``."""
        ...


class SlotAllocator:
    """Bump pointer plus free list: its own memory grows with the slots ever used, not with capacity.

    A fresh pool of a million slots costs nothing here; slots are handed out from the free list
    first (recently freed, likely still in cache), then from the untouched end of the pool.
    """

    def __init__(self, capacity: int, slot_bytes: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0 slots, got {capacity}")
        if slot_bytes < 1:
            raise ValueError(f"slot_bytes must be >= 1, got {slot_bytes}")
        self._capacity = capacity
        self._slot_bytes = slot_bytes
        self._next = 0  # slots [_next, capacity) were never handed out
        self._free: list[Slot] = []

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def slot_bytes(self) -> int:
        return self._slot_bytes

    @property
    def num_free(self) -> int:
        return self._capacity - self._next + len(self._free)

    @property
    def num_used(self) -> int:
        return self._capacity - self.num_free

    def alloc(self, n: int) -> list[Slot]:
        if n > self.num_free:
            raise RuntimeError(f"asked for {n} slots with {self.num_free} free: the caller must make room first")
        reused = min(n, len(self._free))
        slots = self._free[len(self._free) - reused :]
        del self._free[len(self._free) - reused :]
        fresh = n - reused
        slots.extend(range(self._next, self._next + fresh))  # type: ignore[arg-type]  # Slot is an int
        self._next += fresh
        return slots

    def free(self, slots: Sequence[Slot]) -> None:
        self._free.extend(slots)
        assert len(self._free) <= self._next, "more slots freed than were handed out"


UNBOUNDED = 1 << 62  # slots of a pool that never runs out: the allocator's memory grows with use, not capacity


class MeteredPool(SlotAllocator):
    """A pool that holds no bytes and remembers its peak use: what a replay (``cache/replay.py``) runs on.

    ``capacity=None`` is an unbounded budget: :data:`UNBOUNDED` slots, never all handed out, so the
    tree never evicts, while ``num_used`` and ``peak_slots`` still count every slot in use.
    """

    def __init__(self, capacity: int | None, slot_bytes: int = 1) -> None:
        super().__init__(UNBOUNDED if capacity is None else capacity, slot_bytes)
        self.bounded = capacity is not None
        self.peak_slots = 0

    def alloc(self, n: int) -> list[Slot]:
        slots = super().alloc(n)
        self.peak_slots = max(self.peak_slots, self.num_used)
        return slots


class SimulatedPool(SlotAllocator):
    """A pool without tensors: each slot holds one Python value, and ownership is checked.

    Tests write the token id itself into its slot, so reading a match's slots back shows exactly
    which tokens a lookup returned. Double frees and double allocations raise at once.
    """

    def __init__(self, capacity: int, slot_bytes: int = 1) -> None:
        super().__init__(capacity, slot_bytes)
        self.data: dict[Slot, Any] = {}
        self.owned: set[Slot] = set()

    def alloc(self, n: int) -> list[Slot]:
        slots = super().alloc(n)
        assert self.owned.isdisjoint(slots), "a slot was handed out twice"
        self.owned.update(slots)
        return slots

    def free(self, slots: Sequence[Slot]) -> None:
        assert self.owned.issuperset(slots) and len(set(slots)) == len(slots), "a slot was freed twice"
        self.owned.difference_update(slots)
        for slot in slots:
            self.data.pop(slot, None)
        super().free(slots)

    def source(self, tokens: Sequence[Any], logits: Any = None, logits_slots: int = 1) -> "SimulatedKV":
        """KV for ``tokens`` whose slots will hold the tokens themselves (and ``logits`` in its slots)."""
        return SimulatedKV(self, list(tokens), logits, logits_slots if logits is not None else 0)

    def read(self, slots: Sequence[Slot]) -> list[Any]:
        return [self.data[s] for s in slots]


class SimulatedKV:
    """A :class:`KVSource` for a :class:`SimulatedPool`."""

    def __init__(self, pool: SimulatedPool, tokens: list[Any], logits: Any, logits_slots: int) -> None:
        self.pool, self.tokens, self.logits, self._logits_slots = pool, tokens, logits, logits_slots

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def logits_slots(self) -> int:
        return self._logits_slots

    def write(self, start: int, slots: Sequence[Slot], logits_slots: Sequence[Slot]) -> None:
        for slot, token in zip(slots, self.tokens[start : start + len(slots)]):
            self.pool.data[slot] = token
        for slot in logits_slots:
            self.pool.data[slot] = self.logits


class SizedKV:
    """A :class:`KVSource` of ``tokens`` tokens that writes nothing: benchmarks of the tree alone."""

    __slots__ = ("tokens", "_logits_slots")

    def __init__(self, tokens: int, logits_slots: int = 0) -> None:
        self.tokens, self._logits_slots = tokens, logits_slots

    def __len__(self) -> int:
        return self.tokens

    @property
    def logits_slots(self) -> int:
        return self._logits_slots

    def write(self, start: int, slots: Sequence[Slot], logits_slots: Sequence[Slot]) -> None:
        pass
