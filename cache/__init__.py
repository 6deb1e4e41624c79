"""The prefix cache: a token-level radix tree of opaque KV segments with LRU eviction.

It never imports a model, a tokenizer or torch; the engine adapts its tensors to :class:`KVSegment`.
"""

from cache.prefix_cache import DEFAULT_NAMESPACE, CacheEntry, KVSegment, PrefixCache, PrefixMatch

__all__ = ["DEFAULT_NAMESPACE", "CacheEntry", "KVSegment", "PrefixCache", "PrefixMatch"]
