"""Repetition control (engine/sampling.py): transformers' semantics over the reply's own tokens,
O(1) history per step, the caller's logits untouched, and cached runs still equal uncached ones."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

from conftest import make_tiny_model
from engine import Engine, EngineConfig
from engine.sampling import NO_REPEAT_NGRAM_MAX, REPETITION_PENALTY_MAX, Sampler, SamplingParams

VOCAB = 50
SYSTEM = "You are a careful assistant. Answer briefly and precisely, in plain words. " * 3
N = 12  # enough new tokens for the tiny model to repeat itself


def feed(sampler: Sampler, tokens: list[int]) -> None:
    """Make ``tokens`` the sampler's history: each step's logits put all the mass on the next one."""
    for token in tokens:
        logits = torch.full((VOCAB,), -10.0)
        logits[token] = 10.0
        assert sampler(logits) == token


@pytest.mark.parametrize("penalty", [1.3, 2.0])
def test_penalty_matches_transformers_over_generated_tokens(penalty):
    """The penalty is transformers' RepetitionPenaltyLogitsProcessor applied to the generated tokens only."""
    sampler = Sampler(SamplingParams.checked(0.0, 1.0, None, repetition_penalty=penalty))
    history = [3, 7, 3, 11]
    feed(sampler, history)
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(0)) * 5
    expected = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([history]), logits[None].clone())[0]
    torch.testing.assert_close(sampler._controlled(logits), expected)
    assert sampler(logits) == int(expected.argmax())


@pytest.mark.parametrize("n", [1, 2, 3])
def test_ngram_ban_matches_transformers(n):
    """The n-gram ban bans exactly what transformers' NoRepeatNGramLogitsProcessor bans on the same history."""
    history = [1, 2, 3, 1, 2, 4, 1, 2]
    sampler = Sampler(SamplingParams.checked(0.0, 1.0, None, no_repeat_ngram_size=n))
    feed(sampler, history[: n - 1] if n > 1 else [])  # a ban may forbid the history itself: feed what it allows
    sampler.history, sampler._followers = [], {}
    for token in history:  # then replay the history through the index alone
        sampler._observe(token)
    expected = NoRepeatNGramLogitsProcessor(n)(torch.tensor([history]), torch.zeros(1, VOCAB))[0]
    assert sampler.banned() == set(torch.nonzero(expected == -math.inf).flatten().tolist())


def test_greedy_never_repeats_an_ngram():
    """With a ban of n, a model that always prefers the same loop still never emits an n-gram twice."""
    sampler = Sampler(SamplingParams.checked(0.0, 1.0, None, no_repeat_ngram_size=2))
    preference = torch.arange(VOCAB, dtype=torch.float32).flip(0)  # token 0 best, then 1, ...
    out = [sampler(preference) for _ in range(30)]
    grams = list(zip(out, out[1:]))
    assert len(grams) == len(set(grams))


def test_frequency_and_presence_penalties_are_openais():
    """OpenAI's formula, as vLLM applies it to the reply: logit - count * frequency_penalty - (count > 0) * presence_penalty."""
    sampler = Sampler(SamplingParams.checked(0.0, 1.0, None, frequency_penalty=0.5, presence_penalty=1.0))
    feed(sampler, [3, 3, 7])
    expected = torch.zeros(VOCAB)
    expected[3], expected[7] = -(2 * 0.5 + 1.0), -(0.5 + 1.0)
    torch.testing.assert_close(sampler._controlled(torch.zeros(VOCAB)), expected)


def test_logits_are_not_modified():
    """The engine stores these logits in the prefix cache and compares them in verify: the sampler must not touch them."""
    sampler = Sampler(SamplingParams.checked(0.0, 1.0, None, repetition_penalty=1.5, no_repeat_ngram_size=1))
    logits = torch.linspace(-3, 3, VOCAB)
    before = logits.clone()
    for _ in range(5):
        sampler(logits)
    assert torch.equal(logits, before)


def test_plain_greedy_is_plain_argmax():
    """Defaults (penalty 1, no ban) leave greedy decoding exactly the argmax, as the engine always did."""
    sampler = Sampler(SamplingParams())
    logits = torch.randn(VOCAB)
    assert [sampler(logits) for _ in range(3)] == [int(logits.argmax())] * 3


BAD = [
    (dict(repetition_penalty=math.nan), "repetition_penalty"),
    (dict(repetition_penalty=math.inf), "repetition_penalty"),
    (dict(repetition_penalty=-1.2), "repetition_penalty"),
    (dict(repetition_penalty=0.5), "repetition_penalty"),
    (dict(repetition_penalty=REPETITION_PENALTY_MAX + 0.01), "repetition_penalty"),
    (dict(repetition_penalty="1.2"), "repetition_penalty"),
    (dict(repetition_penalty=True), "repetition_penalty"),
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
    (dict(no_repeat_ngram_size=NO_REPEAT_NGRAM_MAX + 1), "no_repeat_ngram_size"),
    (dict(no_repeat_ngram_size=10**18), "no_repeat_ngram_size"),
    (dict(no_repeat_ngram_size=3.0), "no_repeat_ngram_size"),
    (dict(no_repeat_ngram_size=True), "no_repeat_ngram_size"),
    (dict(no_repeat_ngram_size="3"), "no_repeat_ngram_size"),
    (dict(frequency_penalty=2.5), "frequency_penalty"),
    (dict(frequency_penalty=math.nan), "frequency_penalty"),
    (dict(presence_penalty=-3), "presence_penalty"),
    (dict(presence_penalty=False), "presence_penalty"),
]


@pytest.mark.parametrize("kwargs, field", BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_bad_values_are_a_value_error_naming_the_field(tiny_engine, kwargs, field):
    """SamplingParams.checked is the one place the bounds live; the engine raises its ValueError before any work."""
    with pytest.raises(ValueError, match=field):
        tiny_engine.generate("What is bread?", max_new_tokens=2, **kwargs)
    assert tiny_engine.cache.stats()["cached_tokens"] == 0


# ---------------------------------------------------------------------- equivalence with repetition control on

CONTROL = [
    dict(repetition_penalty=2.0),
    dict(no_repeat_ngram_size=2),
    dict(repetition_penalty=1.2, no_repeat_ngram_size=3),
    dict(frequency_penalty=2.0, presence_penalty=1.0),
]


@pytest.fixture(scope="module")
def looping_model(tokenizer):
    """A tiny random model with tied embeddings: it predicts its input token, so greedy loops at once (as SmolLM2 does later)."""
    return make_tiny_model(tokenizer, tie_word_embeddings=True)


@pytest.fixture
def looping_engine(looping_model, tokenizer):
    return Engine(looping_model, tokenizer, EngineConfig(min_cached_tokens=4, chunk_tokens=4), name="tiny-looping-llama")


@pytest.mark.parametrize("control", CONTROL, ids=str)
def test_cached_runs_equal_uncached_with_repetition_control(looping_engine, control):
    """The control reads only the reply's tokens, so exact, partial and strict-prefix hits still give the no-cache tokens."""

    def run(prompt: str, cache: bool = True, **kwargs) -> tuple[list[int], str]:
        result = looping_engine.generate(prompt, max_new_tokens=N, use_cache=cache, use_prefix_cache=cache, **control, **kwargs)
        return result.token_ids, result.cache_status

    plain = looping_engine.generate("What is bread?", system_prompt=SYSTEM, max_new_tokens=N, use_prefix_cache=False).token_ids
    for prompt, kwargs, status in [
        ("What is bread?", dict(system_prompt=SYSTEM), "miss"),
        ("What is bread?", dict(system_prompt=SYSTEM), "hit"),
        ("Why is the sky blue?", dict(system_prompt=SYSTEM), "partial"),
    ]:
        tokens, got = run(prompt, **kwargs)
        assert got == status and tokens == run(prompt, cache=False, **kwargs)[0]
    long_text, short_text = "alpha beta gamma delta epsilon zeta eta theta", "alpha beta gamma delta epsilon"
    run(long_text, raw=True)
    tokens, got = run(short_text, raw=True)
    assert got == "partial" and tokens == run(short_text, cache=False, raw=True)[0]
    controlled = run("What is bread?", cache=False, system_prompt=SYSTEM)[0]
    assert controlled != plain, "the control changed nothing on this prompt: the test would not catch a control that is skipped"
