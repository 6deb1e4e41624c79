"""The KV pool: one preallocated tensor whose slots hold the prefix cache's KV and logits.

The radix tree (``cache/``) only sees slot indices; this module owns the bytes. The pool is one
flat ``uint8`` tensor ``[num_slots, slot_bytes]`` sized by the cache budget, with a typed view
``[num_slots, layers, 2 (K, V), kv_heads, head_dim]`` for KV: a slot is one token's KV in the
KV dtype (the model's, or bf16 with ``--kv-dtype bf16``: half the bytes, twice the tokens per budget;
the request's model cache stores the same precision, so a hit changes no token). Logits (float32 ``[vocab]``) take ``ceil(vocab * 4 / slot_bytes)`` slots, any
slots, gathered on read: nothing the cache holds lives outside the pool, so the budget is exact.

Memory comes from ``torch.empty``: untouched pages of a host pool cost nothing until used. With
the model on CUDA and KV kept on the host, the pool is pinned so copies run at full speed.

Copies go straight between a live model cache and the pool (one ``copy_`` per contiguous run of
slots and layer, across devices if need be), never through an intermediate tensor. Reads build a
fresh model cache: the model never holds a pool tensor, so decoding cannot change what is stored.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from transformers import DynamicCache

from cache import Slot, SlotAllocator
from engine.kv import kv_bytes_per_token, new_model_cache


class KVPool(SlotAllocator):
    """A :class:`cache.SlotPool` over a tensor, with KV and logits reads and writes.

    Args:
        config: The model's config (layers, KV heads, head size, vocabulary).
        dtype: The dtype KV is stored in (the engine's KV dtype), here and in the model caches it builds.
        budget_bytes: Size of the pool; ``budget_bytes // slot_bytes`` slots.
        device: Where the pool lives (the host or the model's device).
        pin_memory: Pin a host pool (for fast copies to and from a CUDA model).
    """

    def __init__(self, config, dtype: torch.dtype, budget_bytes: int, device: torch.device | str = "cpu", pin_memory: bool = False) -> None:
        text = config.get_text_config(decoder=True)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        slot_bytes = kv_bytes_per_token(config, dtype)
        super().__init__(max(budget_bytes, 0) // slot_bytes, slot_bytes)
        self.device = torch.device(device)
        self.dtype = dtype
        self.vocab_size = int(text.vocab_size)
        self.logits_slot_count = math.ceil(self.vocab_size * 4 / slot_bytes)
        self.storage = torch.empty((self.capacity, slot_bytes), dtype=torch.uint8, device=self.device, pin_memory=pin_memory)
        # kv: [num_slots, layers, 2, kv_heads, head_dim], a view of the same bytes
        self.kv = self.storage.view(dtype).view(self.capacity, text.num_hidden_layers, 2, kv_heads, head_dim)

    def source(self, model_cache: DynamicCache, num_tokens: int, logits: torch.Tensor | None) -> "ModelCacheKV":
        """The first ``num_tokens`` tokens of a live model cache (and the logits after them), for an insert."""
        return ModelCacheKV(self, model_cache, num_tokens, logits)

    def write_kv(self, model_cache: DynamicCache, start: int, slots: Sequence[Slot]) -> None:
        """Copy the KV of tokens ``[start, start + len(slots))`` of ``model_cache`` into ``slots``."""
        for slot, offset, n in _runs(slots):
            for i, layer in enumerate(model_cache.layers):
                # layer.keys: [1, kv_heads, T, head_dim] -> [n, kv_heads, head_dim]
                self.kv[slot : slot + n, i, 0].copy_(layer.keys[0, :, start + offset : start + offset + n].transpose(0, 1))
                self.kv[slot : slot + n, i, 1].copy_(layer.values[0, :, start + offset : start + offset + n].transpose(0, 1))

    def write_logits(self, logits: torch.Tensor, slots: Sequence[Slot]) -> None:
        """Store float32 ``[vocab]`` logits across ``slots`` (``logits_slot_count`` of them)."""
        assert logits.numel() == self.vocab_size and len(slots) == self.logits_slot_count, "logits do not fit their slots"
        data = logits.detach().float().contiguous().view(torch.uint8)  # [vocab * 4]
        for j, slot in enumerate(slots):
            piece = data[j * self.slot_bytes : (j + 1) * self.slot_bytes]
            self.storage[slot, : piece.numel()].copy_(piece)

    def read_kv(self, slots: Sequence[Slot], config, device: torch.device, capacity: int = 0) -> DynamicCache:
        """A fresh model cache on ``device`` holding the KV of ``slots`` (in order), room for ``capacity`` tokens."""
        cache = new_model_cache(config, capacity, self.dtype, device)
        if not slots:
            return cache
        # data: [T, layers, 2, kv_heads, head_dim], moved to the device in one transfer
        data = self._gather(self.kv, slots).to(device)
        for i, layer in enumerate(cache.layers):
            # update() copies into the layer's own buffer: the model never holds pool memory.
            layer.update(data[:, i, 0].transpose(0, 1).unsqueeze(0), data[:, i, 1].transpose(0, 1).unsqueeze(0))
        return cache

    def read_logits(self, slots: Sequence[Slot], device: torch.device) -> torch.Tensor:
        """The float32 ``[vocab]`` logits stored in ``slots``, as a fresh tensor on ``device``."""
        data = self.storage[self._index(slots)].reshape(-1)[: self.vocab_size * 4]
        return data.view(torch.float32).to(device, copy=True)

    def _gather(self, tensor: torch.Tensor, slots: Sequence[Slot]) -> torch.Tensor:
        runs = _runs(slots)
        if len(runs) == 1:  # the common case: a view, no host-side copy
            return tensor[runs[0][0] : runs[0][0] + runs[0][2]]
        return tensor[self._index(slots)]

    def _index(self, slots: Sequence[Slot]) -> torch.Tensor:
        return torch.tensor(list(slots), dtype=torch.long, device=self.device)


class ModelCacheKV:
    """A :class:`cache.KVSource`: a live model cache's first tokens and the logits after them."""

    def __init__(self, pool: KVPool, model_cache: DynamicCache, num_tokens: int, logits: torch.Tensor | None) -> None:
        self.pool, self.model_cache, self.num_tokens, self.logits = pool, model_cache, num_tokens, logits

    def __len__(self) -> int:
        return self.num_tokens

    @property
    def logits_slots(self) -> int:
        return self.pool.logits_slot_count if self.logits is not None else 0

    def write(self, start: int, slots: Sequence[Slot], logits_slots: Sequence[Slot]) -> None:
        self.pool.write_kv(self.model_cache, start, slots)
        if logits_slots:
            self.pool.write_logits(self.logits, logits_slots)


def _runs(slots: Sequence[Slot]) -> list[tuple[int, int, int]]:
    """Contiguous runs of ``slots`` as ``(first slot, offset in slots, length)``."""
    runs: list[tuple[int, int, int]] = []
    for offset, slot in enumerate(slots):
        if runs and runs[-1][0] + runs[-1][2] == slot:
            first, at, n = runs[-1]
            runs[-1] = (first, at, n + 1)
        else:
            runs.append((slot, offset, 1))
    return runs
