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


@pytest.mark.parametrize("fmt", ["fp32", "int4"])
def test_many_tokens_at_once_equal_one_at_a_time(tokenizer, fmt):
    """FastDecoder.hidden over a whole text (the quality measure's pass) gives the logits the one-token steps give, and the same KV."""
    model = quant.apply_format(make_tiny_model(tokenizer, seed=3, hidden_size=128, num_key_value_heads=2), fmt)
    fast = FastDecoder(model)
    tokens = PROMPT + STEPS
    shape = (1, fast.kv_heads, len(tokens), fast.head_dim)
    at_once, one_by_one = ([[torch.zeros(shape) for _ in fast.layers] for _ in "kv"] for _ in range(2))
    with torch.inference_mode():
        logits = fast.lm_head(fast.hidden(torch.tensor([tokens]), torch.arange(len(tokens)), *at_once)[0]).float()  # [T, vocab]
        for i, token in enumerate(tokens):
            filled = [[buffer[:, :, : i + 1] for buffer in kv] for kv in one_by_one]  # the step attends over the filled positions
            step = fast(torch.tensor([[token]]), torch.tensor([i]), *filled)[0].float()
            tolerance = 1e-4 if fmt == "fp32" else 0.05 * step.abs().max().item()  # int4: bf16 activations, another row count in the kernel
            torch.testing.assert_close(logits[i], step, rtol=0, atol=tolerance)
    for a, b in zip(at_once[0] + at_once[1], one_by_one[0] + one_by_one[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4 if fmt == "fp32" else 0.05)


def test_quantized_formats_prefill_in_fp32_with_the_weights_the_step_decodes_with(tokenizer):
    """int4: the model stays fp32 (prefill), holds the copies' de-quantized weights, and only the step reads the 4-bit copies."""
    model = quant.apply_format(make_tiny_model(tokenizer, seed=1, hidden_size=128, num_key_value_heads=2), "int4")
    assert next(model.parameters()).dtype == torch.float32 and type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    copies = quant.decode_linears(model)
    assert type(copies["model.layers.0.mlp.down_proj"]) is quant.Int4Linear and type(copies["lm_head"]) is quant.Int8Linear
    weight = model.model.layers[0].mlp.down_proj.weight  # de-quantized: on the 4-bit grid, so rounding it again moves it by float error only
    torch.testing.assert_close(quant.Int4Blocks.from_float(weight).dequantize(), weight, rtol=0, atol=1e-6)
    fast = FastDecoder(model)
    assert type(fast.layers[0].wqkv) is quant.Int4Linear and type(fast.layers[0].w2) is quant.Int4Linear
    assert fast.bytes_per_step() < quant.weight_bytes(model) / 4  # the step reads 4-bit weights and an int8 lm_head, not fp32
