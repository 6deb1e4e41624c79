"""KV storage precision (engine/kv.py, --kv-dtype): the model attends over the KV the prefix cache
stores, so within each KV dtype cached and uncached greedy runs give identical tokens."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model
from engine import Engine, EngineConfig, quant
from engine.kv import GrowingKVLayer, kv_bytes_per_token
from test_exact import walk_every_path

SYSTEM = "You are a careful assistant. Answer briefly and precisely, in plain words. " * 3
QUESTIONS = ["What is machine learning?", "Name three prime numbers.", "Why is the sky blue?"]
N = 8


def kv_engine(like: Engine, kv_dtype: str, decode: str = "auto") -> Engine:
    return Engine(like.model, like.tokenizer, EngineConfig(min_cached_tokens=4, chunk_tokens=4, kv_dtype=kv_dtype, decode=decode), name=like.name)


def test_bf16_layer_stores_bf16_and_hands_attention_the_rounded_values():
    """A bf16 layer keeps bf16 buffers and returns, in the compute dtype, exactly the values it stored."""
    layer = GrowingKVLayer(capacity=8, storage_dtype=torch.bfloat16)
    k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    keys, values = layer.update(k, v)
    assert layer.key_buffer.dtype == layer.value_buffer.dtype == layer.keys.dtype == torch.bfloat16
    assert keys.dtype == values.dtype == torch.float32
    assert torch.equal(keys, k.bfloat16().float()) and torch.equal(values, v.bfloat16().float())
    assert not torch.equal(keys, k), "bf16 storage rounded nothing: the test cannot see the precision"


@pytest.mark.parametrize("decode", ["auto", "transformers"])
@pytest.mark.parametrize("kv_dtype", ["fp32", "bf16"])
def test_cached_runs_equal_uncached_within_each_kv_dtype(tiny_engine, kv_dtype, decode):
    """Exact, partial, strict-prefix and multi-turn hits give the no-cache tokens, with either decode step."""
    engine = kv_engine(tiny_engine, kv_dtype, decode)

    def baseline(prompt: str, **kwargs) -> list[int]:
        return engine.generate(prompt, use_cache=False, use_prefix_cache=False, max_new_tokens=N, **kwargs).token_ids

    for question, status in [(QUESTIONS[0], "miss"), (QUESTIONS[0], "hit"), (QUESTIONS[1], "partial")]:
        result = engine.generate(question, system_prompt=SYSTEM, max_new_tokens=N)
        assert result.cache_status == status and result.token_ids == baseline(question, system_prompt=SYSTEM)
    long_text, short_text = "alpha beta gamma delta epsilon zeta eta theta", "alpha beta gamma delta epsilon"
    engine.generate(long_text, raw=True, max_new_tokens=N)
    result = engine.generate(short_text, raw=True, max_new_tokens=N)
    assert result.cache_status == "partial" and result.token_ids == baseline(short_text, raw=True)
    history = [{"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": engine.decode(baseline(QUESTIONS[0], system_prompt=SYSTEM))}]
    result = engine.generate(QUESTIONS[2], system_prompt=SYSTEM, history=history, max_new_tokens=N, verify=True)
    assert result.cache_status == "partial" and result.verification["identical"]
    assert result.verification["max_abs_logit_diff"] == 0


def test_bf16_kv_is_stored_and_attended_at_bf16(tiny_engine):
    """With kv_dtype bf16 the pool and the model caches hold bf16, and every run, cached or not, attends over bf16 KV."""
    fp32, bf16 = kv_engine(tiny_engine, "fp32"), kv_engine(tiny_engine, "bf16")
    assert bf16.pool.kv.dtype == torch.bfloat16 and bf16.info()["kv_dtype"] == "bfloat16" and fp32.info()["kv_dtype"] == "float32"
    run = {}
    for name, engine in (("fp32", fp32), ("bf16", bf16)):
        run[name] = engine.generate(QUESTIONS[0], system_prompt=SYSTEM, max_new_tokens=1, use_prefix_cache=False, verify=True)
        assert run[name].verification["identical"]
    cache = bf16.pool.read_kv([0, 1, 2], bf16.model.config, bf16.device)
    assert cache.layers[0].keys.dtype == torch.bfloat16
    # Without a KV cache the bf16 engine still attends over bf16-rounded KV (every model cache comes from Engine.new_cache): its logits are a cached run's, not fp32's.
    no_kv = bf16.generate(QUESTIONS[0], system_prompt=SYSTEM, max_new_tokens=1, use_cache=False, use_prefix_cache=False)
    assert torch.equal(no_kv.first_token_logits, run["bf16"].first_token_logits)
    assert not torch.equal(run["bf16"].first_token_logits, run["fp32"].first_token_logits)


def test_bf16_kv_halves_the_bytes_per_token_and_doubles_the_slots(tiny_engine):
    """The budget holds twice the tokens: a slot is one token's KV at the storage precision."""
    fp32, bf16 = kv_engine(tiny_engine, "fp32"), kv_engine(tiny_engine, "bf16")
    config = tiny_engine.model.config
    assert bf16.info()["kv_bytes_per_token"] * 2 == fp32.info()["kv_bytes_per_token"] == kv_bytes_per_token(config, torch.float32)
    assert bf16.pool.capacity == 2 * fp32.pool.capacity


@pytest.mark.parametrize("value", ["int8", "float16", "", "BF16"])
def test_unknown_kv_dtype_is_a_value_error(value):
    with pytest.raises(ValueError, match="kv_dtype"):
        EngineConfig(kv_dtype=value)


@pytest.mark.parametrize("fmt, kv_dtype", [("bf16", "fp32"), ("int4", "fp32"), ("int8", "bf16")])
def test_kv_dtype_with_other_weight_formats(tokenizer, fmt, kv_dtype):
    """A KV dtype other than the compute dtype of a quantized or bf16 model keeps every cache path equal to no cache."""
    model = quant.apply_format(make_tiny_model(tokenizer), fmt)
    engine = Engine(model, tokenizer, EngineConfig(min_cached_tokens=4, chunk_tokens=8, kv_dtype=kv_dtype), name=f"tiny-{fmt}")
    walk_every_path(engine)
    assert engine.pool.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[kv_dtype]
