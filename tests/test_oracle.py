"""The correctness oracle (engine/oracle.py, verify=True): identical on a healthy cache, caught on a corrupted one."""

from __future__ import annotations

import pytest
import torch

from test_explain import SYSTEM

N = 6


def test_verify_reports_identical_on_a_healthy_cache(tiny_engine):
    """Miss, exact hit and partial hit all verify identical, with a first-token logit difference near 0."""
    for question in ("What is bread?", "What is bread?", "What is cake?"):
        v = tiny_engine.generate(question, system_prompt=SYSTEM, max_new_tokens=N, verify=True).verification
        assert v["identical"] and v["first_difference"] is None and v["max_abs_logit_diff"] < 1e-3
        assert v["message"].startswith("verified identical")


def test_verify_catches_a_corrupted_kv_slot(tiny_engine):
    """Garbage written into the pool slots a partial hit reuses: the oracle reports a difference."""
    tiny_engine.generate("What is bread?", system_prompt=SYSTEM, max_new_tokens=N)
    prompt_ids = tiny_engine.tokenize(tiny_engine.make_request("What is cake?", system_prompt=SYSTEM))
    match = tiny_engine.cache.match_prefix(prompt_ids)
    assert match.kind == "partial"
    slots = torch.tensor(match.slots)
    tiny_engine.cache.release(match)
    generator = torch.Generator().manual_seed(0)
    tiny_engine.pool.kv[slots] = torch.randn(tiny_engine.pool.kv[slots].shape, generator=generator) * 50
    result = tiny_engine.generate("What is cake?", system_prompt=SYSTEM, max_new_tokens=N, verify=True)
    v = result.verification
    assert result.cache_status == "partial" and not v["identical"] and v["max_abs_logit_diff"] > 0.1
    assert v["first_difference"] == 0 and v["cached_token"]["id"] == result.token_ids[0]
    assert "differs at token 0" in v["message"]


def test_verify_without_a_seed_refuses_sampling(tiny_engine):
    """Sampled tokens can only be compared with the same seed: a clear ValueError otherwise."""
    with pytest.raises(ValueError, match="needs a seed"):
        tiny_engine.generate("What is bread?", temperature=0.7, verify=True)
    v = tiny_engine.generate("What is bread?", system_prompt=SYSTEM, temperature=0.7, seed=3, max_new_tokens=N, verify=True).verification
    assert v["identical"]
