"""The hand-written Llama decode step (engine/fast_llama.py) against transformers' own, per weight format."""

from __future__ import annotations

import pytest
import torch

from engine import Engine, EngineConfig, quant
from engine.fast_llama import FastDecoder, fuse_linears
from engine.kv import new_model_cache
from tests.conftest import make_tiny_model

PROMPT = list(range(100, 140))
STEPS = [5, 17, 99, 3, 42, 7]  # past the capacity of 2 new tokens: the buffers grow once


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8", "int4"])
def test_fast_step_matches_transformers_step(tokenizer, fmt):
    """Same logits (fp32: to 1e-4; bf16 formats: to bf16 rounding) and the same KV in the model cache, step after step."""
    model = quant.apply_format(make_tiny_model(tokenizer, seed=1, hidden_size=128, num_key_value_heads=2), fmt)
    fast = FastDecoder(model)
    caches = [new_model_cache(model.config, len(PROMPT) + 2) for _ in range(2)]
    with torch.inference_mode():
        for cache in caches:
            model(input_ids=torch.tensor([PROMPT]), cache=cache, logits_to_keep=1)
        for token in STEPS:
            expected = model(input_ids=torch.tensor([[token]]), cache=caches[0], logits_to_keep=1).logits[0, -1].float()
            got = fast.decode_one_token(token, caches[1])
            tolerance = 1e-4 if fmt == "fp32" else 0.05 * expected.abs().max().item()
            torch.testing.assert_close(got, expected, rtol=0, atol=tolerance)
            assert got.argmax() == expected.argmax()
    assert caches[1].get_seq_length() == len(PROMPT) + len(STEPS)
    for a, b in zip(caches[0].layers, caches[1].layers):  # the prefix cache reads these: one KV format for both steps
        torch.testing.assert_close(b.keys.float(), a.keys.float(), rtol=0, atol=1e-4 if fmt == "fp32" else 0.05)
        torch.testing.assert_close(b.values.float(), a.values.float(), rtol=0, atol=1e-4 if fmt == "fp32" else 0.05)


@pytest.mark.parametrize("fmt", ["fp32", "int8", "int4"])
@pytest.mark.parametrize("sizes", [(128, 64, 64), (64, 32, 32)])
def test_fused_projections_equal_the_separate_ones(fmt, sizes):
    """Fused QKV / gate-up give exactly the separate outputs (int4 off the 64-row packing grid: concatenated, unfused)."""
    torch.manual_seed(0)
    linears = [torch.nn.Linear(128, n, bias=False) for n in sizes]
    if fmt == "int8":
        linears = [quant.Int8Linear(l.weight) for l in linears]
    elif fmt == "int4":
        linears = [quant.Int4Linear(quant.Int4Blocks.from_float(l.weight)) for l in linears]
    x = torch.randn(1, 1, 128, dtype=torch.float32 if fmt == "fp32" else torch.bfloat16)
    with torch.inference_mode():
        separate = torch.cat([l(x) for l in linears], dim=-1)
        fused = fuse_linears(linears)
        assert torch.equal(fused(x), separate)
        assert torch.equal(torch.cat([l(x) for l in linears], dim=-1), separate)  # the originals still work (views)


def test_engine_picks_the_fast_step_for_llama_and_transformers_on_request(tiny_model, tokenizer):
    """decode=auto uses the fast step on a Llama model; decode=transformers keeps transformers' forward; same greedy tokens."""
    fast = Engine(tiny_model, tokenizer, EngineConfig(min_cached_tokens=4))
    slow = Engine(tiny_model, tokenizer, EngineConfig(min_cached_tokens=4, decode="transformers"))
    assert (fast.info()["decode_step"], slow.info()["decode_step"]) == ("FastDecoder", "_TransformersStep")
    a = fast.generate("What is machine learning?", max_new_tokens=12)
    b = slow.generate("What is machine learning?", max_new_tokens=12)
    assert a.token_ids == b.token_ids
    with pytest.raises(ValueError, match="decode"):
        EngineConfig(decode="turbo")
