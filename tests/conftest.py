"""Shared fixtures: a tiny random Llama (fast, CPU) and the real bundled SmolLM2, both behind an Engine.

The tiny model uses the bundled model's tokenizer (so the chat template is the real one) with
random weights from a seeded config: generation is gibberish but deterministic, which is all the
equivalence tests need.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engine import Engine, EngineConfig
from engine import loading

TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)


@pytest.fixture(scope="session")
def bundled_folder():
    """The bundled GGUF converted to safetensors (converted once per machine, then reused)."""
    gguf = loading.bundled_gguf_path()
    if gguf is None:
        pytest.fail(f"the bundled model is not installed: {loading.INSTALL_HINT}")
    return loading.convert_gguf(gguf, EngineConfig().resolved_model_cache_dir())


@pytest.fixture(scope="session")
def tokenizer(bundled_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(bundled_folder))


def make_tiny_model(tokenizer, seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{**TINY_CONFIG, **overrides},
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    return make_tiny_model(tokenizer)


@pytest.fixture
def tiny_engine(tiny_model, tokenizer):
    """A fresh engine (empty prefix cache) around the shared tiny model."""
    return Engine(tiny_model, tokenizer, EngineConfig(min_cached_tokens=4), name="tiny-llama")


@pytest.fixture(scope="session")
def smol_engine_shared():
    return Engine.from_pretrained(device="cpu")


@pytest.fixture
def smol_engine(smol_engine_shared):
    """The real bundled model with an emptied prefix cache."""
    smol_engine_shared.cache.clear()
    return smol_engine_shared
