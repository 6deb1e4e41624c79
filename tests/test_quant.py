"""Weight formats (engine/quant.py): exact Q4_1 import, kernels vs their reference, equivalence and quality per format."""

from __future__ import annotations

import pytest
import torch

from engine import Engine, EngineConfig, loading, quant
from engine.quality import MAX_NLL_RATIO, MIN_TOP1_AGREEMENT, quality_token_ids, teacher_forced
from tests.conftest import TEST_DEVICE, make_tiny_model
from tests.test_exact import walk_every_path

@pytest.fixture(scope="module")
def quality_reference(bundled_folder, tokenizer):
    """fp32's teacher-forced argmax and NLL on the scenarios' text."""
    engine = Engine.from_pretrained(device=TEST_DEVICE, weights="fp32", cache_budget_mb=8)
    ids = quality_token_ids(tokenizer)
    return ids, teacher_forced(engine, ids)


@pytest.mark.parametrize("fmt", ["int8", "int4"])  # fp32: tests/test_engine.py
def test_bundled_model_equivalence_and_quality_per_format(quality_reference, fmt):
    """The bundled model in each format: every cache path gives the fresh run's bits, and quality within the bar against fp32."""
    ids, reference = quality_reference
    engine = Engine.from_pretrained(device=TEST_DEVICE, weights=fmt, cache_budget_mb=8, min_cached_tokens=4)
    assert engine.info()["weights"] == fmt
    walk_every_path(engine, new=4)
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
