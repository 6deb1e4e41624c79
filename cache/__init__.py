"""The prefix cache: a token-level radix tree of slot indices into a KV pool, with LRU eviction.

It never imports a model, a tokenizer or torch; the engine's pool (``engine/kv_pool.py``)
implements :class:`SlotPool` and copies the bytes.
"""

from cache.prefix_cache import DEFAULT_NAMESPACE, CacheEntry, ExportedNode, PrefixCache, PrefixMatch, common_prefix_len
from cache.slots import KVSource, MeteredPool, SimulatedPool, SizedKV, Slot, SlotAllocator, SlotPool

__all__ = ["DEFAULT_NAMESPACE", "CacheEntry", "ExportedNode", "KVSource", "MeteredPool", "PrefixCache", "PrefixMatch", "SimulatedPool", "SizedKV", "Slot", "SlotAllocator", "SlotPool", "common_prefix_len"]
