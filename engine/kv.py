"""Adapters between transformers' ``DynamicCache`` and the prefix cache's opaque KV segments.

A :class:`TensorKV` is the per-layer keys and values of a run of tokens. The prefix cache only
calls ``len``, ``nbytes`` and ``slice``; this module turns a matched path back into a
``DynamicCache`` on the model's device. Cached tensors are never handed to the model as they are:
the model's cache always starts from a copy, so a later decode cannot change what is stored.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import DynamicCache


class TensorKV:
    """Keys and values of consecutive tokens for every layer.

    Each tensor is ``[batch=1, kv_heads, tokens, head_dim]``. ``slice`` copies onto
    ``storage_device``, so a segment built from views of a live model cache can be handed to the
    prefix cache, which then stores only the tokens it did not have.
    """

    __slots__ = ("keys", "values", "storage_device")

    def __init__(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], storage_device: torch.device | str = "cpu") -> None:
        assert len(keys) == len(values) and len(keys) > 0, "one key and one value tensor per layer"
        self.keys = tuple(keys)
        self.values = tuple(values)
        self.storage_device = torch.device(storage_device)

    def __len__(self) -> int:
        return self.keys[0].shape[-2]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.keys) + sum(t.nbytes for t in self.values)

    def slice(self, start: int, stop: int) -> "TensorKV":
        def piece(t: torch.Tensor) -> torch.Tensor:
            # .clone() after .to(): a same-device .to() returns a view, and views would keep the
            # whole original tensor alive (and make the byte budget lie).
            return t[:, :, start:stop, :].to(self.storage_device).clone()

        return TensorKV([piece(k) for k in self.keys], [piece(v) for v in self.values], self.storage_device)

    @classmethod
    def from_model_cache(cls, cache: DynamicCache, num_tokens: int, storage_device: torch.device | str) -> "TensorKV":
        """Views of the first ``num_tokens`` tokens of a live model cache (no copy until sliced)."""
        keys = [layer.keys[:, :, :num_tokens, :] for layer in cache.layers]
        values = [layer.values[:, :, :num_tokens, :] for layer in cache.layers]
        return cls(keys, values, storage_device)


def build_model_cache(segments: Sequence[tuple[TensorKV, int]], config, device: torch.device, dtype: torch.dtype) -> DynamicCache:
    """Concatenate the used part of each matched segment into a fresh ``DynamicCache`` on ``device``.

    Args:
        segments: ``(segment, tokens_used)`` pairs from the root down, as the prefix cache returns them.
    """
    num_layers = len(segments[0][0].keys)
    layers = []
    for i in range(num_layers):
        # k, v: [1, kv_heads, sum(tokens_used), head_dim]
        k = torch.cat([seg.keys[i][:, :, :used, :] for seg, used in segments], dim=-2)
        v = torch.cat([seg.values[i][:, :, :used, :] for seg, used in segments], dim=-2)
        layers.append((k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)))
    # torch.cat always allocates, so the model's cache owns fresh storage and its later updates
    # (which concatenate into new tensors too) never touch what the prefix cache holds.
    cache = DynamicCache(config=config)
    for layer, (k, v) in zip(cache.layers, layers):
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
    return cache


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Theory: 2 (K and V) x layers x kv_heads x head_dim x bytes per element."""
    text = config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def has_sliding_layers(config) -> bool:
    """Sliding-window layers keep only their last window of KV, so a stored prefix would be incomplete."""
    return any(getattr(layer, "is_sliding", False) for layer in DynamicCache(config=config).layers)
