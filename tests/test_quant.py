"""Weight formats (engine/quant.py): exact Q4_1 import, kernels vs their reference, equivalence and quality per format."""

from __future__ import annotations

import pytest
import torch

from engine import Engine, EngineConfig, loading, quant
from engine.quality import MAX_NLL_RATIO, MIN_TOP1_AGREEMENT, quality_token_ids, same_tokens, teacher_forced
from tests.conftest import TEST_DEVICE, make_tiny_model

SYSTEM = "You are a careful assistant. Answer briefly and precisely, in plain words. " * 3
N = 8


EQUIVALENCE_STATUSES = ["miss", "hit", "partial", "partial", "miss", "partial"]  # what equivalence_statuses walks through


def equivalence_statuses(engine: Engine, bf16_ties: bool = False) -> list[str]:
    """Miss, exact hit, partial hit, a conversation's next turn and strict-prefix hit each give the tokens of a run with no cache at all.

    ``bf16_ties``: bf16 logits (8 bits of mantissa) of the real model often tie within a step of
    rounding, and a different order of the same sums (one query vs a whole sequence in attention)
    may then pick the other token. Allowed only there: where the tokens part, the no-cache run's top
    two logits must be within two bf16 steps of each other.
    """
    def same(prompt: str, **kwargs):
        expected = engine.generate(prompt, use_cache=False, use_prefix_cache=False, max_new_tokens=N, **kwargs).token_ids
        result = engine.generate(prompt, max_new_tokens=N, **kwargs)
        assert same_tokens(engine, result.prompt_token_ids, result.token_ids, expected) in ((True, "tie") if bf16_ties else (True,)), (result.cache_status, prompt)
        return result

    first_turn = "What is machine learning?"
    long_text, short_text = "alpha beta gamma delta epsilon zeta eta theta iota kappa", "alpha beta gamma delta epsilon"
    results = [same(first_turn, system_prompt=SYSTEM), same(first_turn, system_prompt=SYSTEM), same("Name three prime numbers.", system_prompt=SYSTEM)]
    # The next turn: the cache holds turn one's prompt, and its answer only where the step computed
    # the answer's KV as a prefill would (int4/int8 steps decode with other weights than the prefill).
    history = [{"role": "user", "content": first_turn}, {"role": "assistant", "content": results[1].text}]
    results.append(same("Give one example.", system_prompt=SYSTEM, history=history))
    results += [same(long_text, raw=True), same(short_text, raw=True)]
    return [result.cache_status for result in results]


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
def test_cached_equals_uncached_within_each_format_tiny(tokenizer, fmt):
    """Within one weight format, every prefix-cache path reproduces the uncached greedy tokens (tiny model)."""
    model = quant.apply_format(make_tiny_model(tokenizer), fmt)
    engine = Engine(model, tokenizer, EngineConfig(min_cached_tokens=4), name=f"tiny-{fmt}")
    assert equivalence_statuses(engine) == EQUIVALENCE_STATUSES
    assert engine.info()["weights"] == fmt
    assert engine.dtype == (torch.bfloat16 if fmt == "bf16" else torch.float32)  # int8/int4 prefill in fp32: KV in fp32


@pytest.fixture(scope="module")
def quality_reference(bundled_folder, tokenizer):
    """fp32's teacher-forced argmax and NLL on the scenarios' text."""
    engine = Engine.from_pretrained(device=TEST_DEVICE, weights="fp32", cache_budget_mb=8)
    ids = quality_token_ids(tokenizer)
    return ids, teacher_forced(engine, ids)


@pytest.mark.parametrize("fmt", ["int8", "int4"])  # fp32: tests/test_engine.py
def test_bundled_model_equivalence_and_quality_per_format(quality_reference, fmt):
    """The bundled model in each format: cached = uncached greedy (up to bf16 ties), and quality within the bar against fp32."""
    ids, reference = quality_reference
    engine = Engine.from_pretrained(device=TEST_DEVICE, weights=fmt, cache_budget_mb=8, min_cached_tokens=4)
    assert engine.info()["weights"] == fmt
    assert equivalence_statuses(engine, bf16_ties=True) == EQUIVALENCE_STATUSES
    scores = teacher_forced(engine, ids).against(reference)
    assert scores["top1_agreement"] >= MIN_TOP1_AGREEMENT and scores["nll_ratio"] <= MAX_NLL_RATIO, scores


def test_int4_takes_the_gguf_q4_1_blocks_exactly(bundled_folder, tmp_path):
    """Every Q4_1 linear of the bundled GGUF, de-quantized from our blocks (parsed, then read back from the cache), equals the converted fp32 weight bit for bit."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(bundled_folder), dtype=torch.float32)
    gguf = loading.bundled_gguf_path()
    legacy = tmp_path / f"{gguf.stem.lower()}-98362432-1795876126661423640.int4-blocks.pt"  # keyed by size and time: one per install
    legacy.write_bytes(b"old")
    parsed = quant.gguf_int4_blocks(gguf, model.config, tmp_path)
    blocks = quant.gguf_int4_blocks(gguf, model.config, tmp_path)  # from the cache file
    assert [p.name for p in tmp_path.glob("*.int4-blocks.pt")] == [f"{gguf.stem.lower()}-{loading.file_digest(gguf)[:16]}.int4-blocks.pt"]
    assert not list(tmp_path.glob("*.tmp"))
    assert len(blocks) == len(parsed) == 7 * model.config.num_hidden_layers
    assert all(torch.equal(getattr(blocks[name], f), getattr(parsed[name], f)) for name in parsed for f in ("q", "scale", "minimum"))
    for name, b in blocks.items():
        assert torch.equal(b.dequantize(), model.get_submodule(name).weight), name
    again = quant.Int4Blocks.from_float(blocks["model.layers.0.mlp.down_proj"].dequantize())  # rounding Q4_1's own values: no change
    assert torch.equal(again.q, blocks["model.layers.0.mlp.down_proj"].q)


@pytest.mark.parametrize("module", ["int4", "int8"])
def test_quantized_linear_matches_its_dequantized_weight(module):
    """The CPU kernels compute x @ W.T for the weight they stand for, up to bf16 rounding."""
    torch.manual_seed(0)
    weight, x = torch.randn(96, 128), torch.randn(5, 128)
    if module == "int4":
        blocks = quant.Int4Blocks.from_float(weight)
        linear, reference = quant.Int4Linear(blocks), blocks.dequantize()
        assert (reference - weight).abs().max() <= blocks.scale.max() / 2 + 1e-6  # round to nearest step
    else:
        linear = quant.Int8Linear(weight)
        reference = linear.weight_int8.float() * linear.scales.float()[:, None]
    expected = x @ reference.T
    got = linear(x).float()
    assert got.dtype == torch.float32 and got.shape == (5, 96)
    assert (got - expected).norm() / expected.norm() < 0.01


def test_weight_setting_is_checked_and_auto_is_int4_on_cpu():
    """KVCI_WEIGHTS / weights=: an unknown format is a ValueError; auto is int4 on a CPU unless a float dtype is asked for."""
    with pytest.raises(ValueError, match="weights"):
        EngineConfig(weights="int3")
    assert EngineConfig.from_env({"KVCI_WEIGHTS": "int8"}).weights == "int8"
    cpu = torch.device("cpu")
    assert quant.resolve_format("auto", "auto", cpu) == "int4"
    assert quant.resolve_format("auto", "float32", cpu) == "fp32"
    assert quant.resolve_format("bf16", "auto", cpu) == "bf16"
