"""The torch KV pool: bytes in and out of slots are exact, the allocator stays small, budgets hold."""

from __future__ import annotations

import math

import pytest
import torch

from engine.kv import kv_bytes_per_token, new_model_cache
from engine.kv_pool import KVPool


@pytest.fixture
def filled_cache(tiny_model):
    """A live model cache after a 12-token prefill on the tiny model."""
    cache = new_model_cache(tiny_model.config, 16)
    with torch.inference_mode():
        tiny_model(input_ids=torch.arange(1, 13).unsqueeze(0), cache=cache, use_cache=True)
    return cache


def test_size_follows_the_budget(tiny_model):
    """num_slots = budget // one token's KV bytes; logits take ceil(vocab * 4 / slot_bytes) slots."""
    per_token = kv_bytes_per_token(tiny_model.config, torch.float32)
    pool = KVPool(tiny_model.config, torch.float32, 100 * per_token + 7)
    assert (pool.capacity, pool.slot_bytes) == (100, per_token)
    assert pool.logits_slot_count == math.ceil(tiny_model.config.vocab_size * 4 / per_token)
    assert pool.storage.shape == (100, per_token)
    assert KVPool(tiny_model.config, torch.float32, 0).capacity == 0


@pytest.mark.parametrize("slot_order", ["contiguous", "scattered"])
def test_kv_round_trip_is_bit_exact(tiny_model, filled_cache, slot_order):
    """KV written from a live cache into slots (in any order) reads back into a fresh cache unchanged."""
    pool = KVPool(tiny_model.config, torch.float32, 64 * kv_bytes_per_token(tiny_model.config, torch.float32))
    slots = pool.alloc(20)
    if slot_order == "scattered":
        pool.free(slots[::2])
        slots = slots[1::2][:4] + pool.alloc(4)  # interleaved runs of slots
    else:
        slots = slots[:8]
    pool.write_kv(filled_cache, 2, slots)  # tokens [2, 10)
    read = pool.read_kv(slots, tiny_model.config, torch.device("cpu"), capacity=8)
    for mine, live in zip(read.layers, filled_cache.layers):
        assert torch.equal(mine.keys, live.keys[:, :, 2:10]) and torch.equal(mine.values, live.values[:, :, 2:10])
        assert mine.keys.data_ptr() != pool.kv.data_ptr()  # a copy: decoding cannot change the pool


def test_logits_round_trip(tiny_model):
    """Float32 logits stored across any slots come back equal, as a fresh tensor."""
    pool = KVPool(tiny_model.config, torch.float32, 1000 * kv_bytes_per_token(tiny_model.config, torch.float32))
    logits = torch.randn(tiny_model.config.vocab_size)
    slots = pool.alloc(pool.logits_slot_count + 3)[::-1][: pool.logits_slot_count]
    pool.write_logits(logits, slots)
    back = pool.read_logits(slots, torch.device("cpu"))
    assert back.dtype == torch.float32 and torch.equal(back, logits)
    logits += 1
    assert not torch.equal(pool.read_logits(slots, torch.device("cpu")), logits)


def test_allocator_memory_grows_with_use_not_capacity(tiny_model):
    """A huge pool hands out slots from a bump pointer: no list of every free slot is ever built."""
    pool = KVPool(tiny_model.config, torch.float32, 1 << 30)  # 1 GiB: untouched pages cost nothing
    assert pool.capacity > 1000 and pool.num_free == pool.capacity
    a = pool.alloc(10)
    assert a == list(range(10)) and len(pool._free) == 0
    pool.free(a[:4])
    assert pool.alloc(4) == a[:4] and pool.num_used == 10  # freed slots first
    with pytest.raises(RuntimeError, match="free"):
        pool.alloc(pool.capacity)
