"""The exactness contract (engine/prefill.py): every cache path gives the bits of a run that reuses nothing.

``torch.equal`` on the first token's logits and equal token lists, never closeness and never a "tie"
allowance: where two paths part, they computed different numbers. The tiny model covers every weight
format and KV dtype in a scripted walk through the paths; the bundled model, in the app's default
configuration (int4 decode step, compiled), gets a property test over prompts drawn from the
scenarios' text and random words, with conversations, cut points, ``max_new_tokens`` and concurrency.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cache import common_prefix_len
from engine import Engine, EngineConfig, quant
from engine.scheduler import scheduler
from tests.conftest import TEST_DEVICE, make_tiny_model
from ui.scenarios import SCENARIOS_PATH

SYSTEM = "You are a careful assistant. Answer briefly and precisely, in plain words. " * 3
RAW = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau upsilon phi chi psi omega"


def same(result, reference, why: str = "") -> None:
    """The contract, for one result: the first token's logits bit for bit, and every token."""
    assert torch.equal(result.first_token_logits, reference.first_token_logits), (
        f"{why}: first-token logits differ by {float((result.first_token_logits - reference.first_token_logits).abs().max()):.3g} ({result.cache_status})"
    )
    assert result.token_ids == reference.token_ids, f"{why}: tokens {result.token_ids} vs {reference.token_ids} ({result.cache_status})"


def fresh(engine: Engine, prompt: str, **kwargs):
    """The reference: the same request reusing nothing from the prefix cache."""
    return engine.generate(prompt, use_prefix_cache=False, **kwargs)


def walk_every_path(engine: Engine, new: int = 8) -> list[str]:
    """Miss, exact hit, partial hits (other question, one-token suffix, strict prefix), turns 2-5, no KV cache,
    another max_new_tokens and 8 at once, each against its fresh run. Returns the statuses seen."""
    statuses = []

    def check(prompt: str, why: str, **kwargs):
        reference = fresh(engine, prompt, max_new_tokens=new, **kwargs)
        result = engine.generate(prompt, max_new_tokens=new, **kwargs)
        same(result, reference, why)
        statuses.append(result.cache_status)
        return result

    check("What is machine learning?", "miss", system_prompt=SYSTEM)
    first = check("What is machine learning?", "exact hit", system_prompt=SYSTEM)
    check("Name three prime numbers.", "partial hit", system_prompt=SYSTEM)
    check(RAW, "raw miss", raw=True)
    check(RAW + " z", "one-token suffix", raw=True)
    check(RAW[: len(RAW) // 2], "strict prefix of a cached prompt", raw=True)
    history = [{"role": "user", "content": "What is machine learning?"}, {"role": "assistant", "content": first.text}]
    for turn in range(2, 6):  # turns 2-5: each hits the previous turn's whole history, the reply prefilled again before it was stored
        reply = check(f"Tell me more, part {turn}.", f"turn {turn}", system_prompt=SYSTEM, history=history)
        history += [{"role": "user", "content": f"Tell me more, part {turn}."}, {"role": "assistant", "content": reply.text}]
    no_kv = engine.generate("What is machine learning?", system_prompt=SYSTEM, max_new_tokens=new, use_cache=False, use_prefix_cache=False)
    same(no_kv, first, "no KV cache at all")
    shorter = engine.generate("What is machine learning?", system_prompt=SYSTEM, max_new_tokens=3)  # another buffer capacity
    assert torch.equal(shorter.first_token_logits, first.first_token_logits) and shorter.token_ids == first.token_ids[:3]
    prompts = [f"Question {i}: what is {i} plus {i}?" for i in range(8)]
    alone = [fresh(engine, p, system_prompt=SYSTEM, max_new_tokens=new) for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: engine.generate(p, system_prompt=SYSTEM, max_new_tokens=new), prompts))
    for i, (a, b) in enumerate(zip(together, alone)):
        same(a, b, f"concurrent request {i}")
    return statuses


@pytest.mark.parametrize("kv_dtype", ["auto", "bf16"])
@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8", "int4"])
def test_every_cache_path_is_bit_identical_tiny(tokenizer, fmt, kv_dtype):
    """The contract holds for every weight format and KV dtype: no path may part, not even at a near-tie."""
    model = quant.apply_format(make_tiny_model(tokenizer), fmt) if fmt != "fp32" else make_tiny_model(tokenizer)
    engine = Engine(model, tokenizer, EngineConfig(min_cached_tokens=4, chunk_tokens=8, kv_dtype=kv_dtype), name=f"tiny-{fmt}")
    statuses = walk_every_path(engine)
    assert statuses[:6] == ["miss", "hit", "partial", "miss", "partial", "partial"], statuses
    assert statuses[6:10] == ["partial"] * 4, statuses  # turns 2-5 reuse the history


def run_together(engine: Engine, prompts: list[str], cache_keys: list[str] | None = None, **kwargs) -> list:
    """``prompts`` submitted while the scheduler is held between two steps, so that they all join the same step (in ``cache_keys``' namespaces, if given)."""
    results: list = [None] * len(prompts)

    def ask(i: int) -> None:
        results[i] = engine.generate(prompts[i], **kwargs, **({"cache_key": cache_keys[i]} if cache_keys else {}))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    with scheduler().hold():
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while scheduler().pending() < len(prompts):  # every request submitted (page state, not elapsed time)
            assert time.monotonic() < deadline, f"only {scheduler().pending()} of {len(prompts)} requests reached the scheduler"
            time.sleep(0.01)
    for t in threads:
        t.join()
    return results


def check_batches(engine: Engine, new: int = 10) -> None:
    """One request alone, then inside batches of 2, 4 and 8 with other neighbours each time: its tokens and first logits are the same bits,
    and it did run at those batch sizes (the neighbours are shorter and ask for more tokens, so they are decoding when it is)."""
    target = "Explain what a prefix cache does, in two sentences."
    reference = fresh(engine, target, max_new_tokens=new)
    assert reference.batch_sizes == [1] * (len(reference.token_ids) - 1)
    for size, first in ((2, 0), (4, 10), (8, 20)):
        neighbours = [f"Hi {first + i}." for i in range(size - 1)]
        results = run_together(engine, [target, *neighbours], max_new_tokens=new, use_prefix_cache=False)
        same(results[0], reference, f"in a batch of {size}")
        if engine.decoder.rows_invariant and len(results[0].token_ids) > 1:
            assert max(results[0].batch_sizes) == size, (size, results[0].batch_sizes)
        for i, neighbour in enumerate(neighbours, 1):
            same(results[i], fresh(engine, neighbour, max_new_tokens=new), f"neighbour {i} in a batch of {size}")


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8", "int4"])
def test_a_decode_batch_gives_each_request_its_logits_alone(tokenizer, fmt):
    """Rows of one batched decode step, in batches of 2, 4 and 8 with different neighbours and places, are each request's logits alone, bit for bit.
    int4/int8: one call for the batch (their kernels are row-invariant); fp32/bf16: one call where the start-up check found the float GEMMs
    row-invariant at this size, else one row at a time (the bundled model's fp32 GEMMs are not)."""
    model = quant.apply_format(make_tiny_model(tokenizer), fmt) if fmt != "fp32" else make_tiny_model(tokenizer)
    engine = Engine(model, tokenizer, EngineConfig(min_cached_tokens=4, chunk_tokens=8), name=f"tiny-{fmt}")
    if fmt in ("int8", "int4"):
        assert engine.decoder.rows_invariant, "torch's int4/int8 CPU kernels are row-invariant on the hosts measured"
    prompts = [engine.tokenize(engine.make_request(f"Request {i}: " + "word " * (3 * i))) for i in range(12)]
    steps = [7, 11, 13]

    def decode(rows: list[int], at: int) -> list[torch.Tensor]:
        caches = [engine.prefill_sequence(prompts[r])[1] for r in rows]
        return [engine.decoder.decode_batch([token] * len(rows), caches)[at] for token in steps]

    alone = decode([0], 0)
    for size, first in ((2, 1), (4, 3), (8, 4)):
        rows = list(range(first, first + size - 1))
        for at in (0, size // 2, size - 1):  # first, middle and last row
            got = decode(rows[:at] + [0] + rows[at:], at)
            for step, (a, b) in enumerate(zip(got, alone)):
                assert torch.equal(a, b), f"{fmt}: row {at} of a batch of {size}, step {step}: differs by {float((a - b).abs().max()):.3g}"


@pytest.mark.parametrize("fmt", ["fp32", "int4"])
def test_the_same_request_alone_and_in_batches_of_2_4_8(tokenizer, fmt):
    """Through the engine and its scheduler: a request gives the same tokens alone and batched with 1, 3 and 7 other requests."""
    model = quant.apply_format(make_tiny_model(tokenizer), fmt) if fmt != "fp32" else make_tiny_model(tokenizer)
    check_batches(Engine(model, tokenizer, EngineConfig(min_cached_tokens=4, chunk_tokens=8), name=f"tiny-{fmt}"))


@pytest.mark.parametrize("fmt", ["fp32", "int4"])
def test_requests_arriving_together_on_a_new_prompt_prefill_it_once(tokenizer, fmt):
    """Step 2a: four requests on one new system prompt, started at the same step. One prefills the
    shared chunks; the others wait for its prompt to be stored and reuse them. Each gives its fresh bits."""
    model = quant.apply_format(make_tiny_model(tokenizer), fmt) if fmt != "fp32" else make_tiny_model(tokenizer)
    engine = Engine(model, tokenizer, EngineConfig(min_cached_tokens=4, chunk_tokens=8), name=f"tiny-{fmt}")
    questions = [f"Question {i}: what is {i} times {i}?" for i in range(4)]
    together = run_together(engine, questions, system_prompt=SYSTEM, max_new_tokens=6)
    waited = [r for r in together if r.timings["shared_prefill_wait_ms"] > 0]
    assert len(waited) == 3, [r.timings["shared_prefill_wait_ms"] for r in together]
    shared = min(r.timings["prefix_tokens_saved"] for r in waited)
    assert shared >= len(engine.tokenize(engine.make_request(questions[0], system_prompt=SYSTEM))) // 2, shared  # the system prompt's chunks
    assert sum(r.timings["prefill_tokens"] for r in together) < 2 * len(together[0].prompt_token_ids)  # the shared part once, not four times
    for question, result in zip(questions, together):
        same(result, fresh(engine, question, system_prompt=SYSTEM, max_new_tokens=6), f"arrived together: {question}")


def test_requests_in_other_namespaces_never_wait_for_each_other(tokenizer):
    """Step 2a stays inside a namespace: four sessions sending the same new prompt together each prefill it,
    so no session's time to first token depends on what another session is prefilling."""
    engine = Engine(make_tiny_model(tokenizer), tokenizer, EngineConfig(min_cached_tokens=4, chunk_tokens=8), name="tiny-fp32")
    together = run_together(engine, ["What is a KV cache?"] * 4, cache_keys=[f"session-{i}" for i in range(4)], system_prompt=SYSTEM, max_new_tokens=6)
    assert [r.timings["shared_prefill_wait_ms"] for r in together] == [0.0] * 4
    assert [r.cache_status for r in together] == ["miss"] * 4
    reference = fresh(engine, "What is a KV cache?", system_prompt=SYSTEM, max_new_tokens=6)
    for result in together:
        same(result, reference, "another namespace, same prompt")


@pytest.mark.parametrize("kv_dtype", ["auto", "bf16"])
def test_warmed_and_pinned_prefixes_give_the_fresh_bits(tokenizer, kv_dtype):
    """A system prompt warmed and pinned (engine/warm.py) is stored by the same prefill: requests over it are the fresh runs' bits."""
    from cache import DEFAULT_NAMESPACE
    from engine.warm import warm

    engine = Engine(make_tiny_model(tokenizer), tokenizer, EngineConfig(min_cached_tokens=4, chunk_tokens=8, kv_dtype=kv_dtype), name="tiny")
    stored = warm(engine, [{"role": "system", "content": SYSTEM}], DEFAULT_NAMESPACE, pin=True)
    assert stored["pinned"] and stored["prefilled"] == stored["tokens"]
    for question in ("What is machine learning?", "Name three prime numbers."):
        result = engine.generate(question, system_prompt=SYSTEM, max_new_tokens=8)
        assert result.cache_status == "partial"
        same(result, fresh(engine, question, system_prompt=SYSTEM, max_new_tokens=8), f"after a warm and a pin: {question}")


def tiny_engine_in(tokenizer, fmt: str, **settings) -> Engine:
    model = quant.apply_format(make_tiny_model(tokenizer), fmt) if fmt != "fp32" else make_tiny_model(tokenizer)
    return Engine(model, tokenizer, EngineConfig(min_cached_tokens=4, chunk_tokens=8, **settings), name=f"tiny-{fmt}")


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_the_step_prefill_leaves_the_same_rows_in_any_split_and_as_decoding_does(tokenizer, fmt):
    """The int4 and int8 steps prefill (engine/prefill.py): a prompt fed one token at a time (as decoding feeds a
    reply), in chunks of 3, of 8, or whole, leaves the same KV bits in every layer and the same logits after it."""
    engine = tiny_engine_in(tokenizer, fmt)
    assert engine.step_prefill and engine.align == 1, "the quantized steps' rows are invariant: prompts prefill through them"
    ids = engine.tokenize(engine.make_request("Which book should I read next, and why?", system_prompt=SYSTEM))

    def fed(split: int):
        cache = engine.new_cache(len(ids))
        logits = scheduler().call(lambda: [engine.decoder.step_rows([ids[at : at + split]], [cache]) for at in range(0, len(ids), split)][-1])
        return logits, cache

    reference_logits, reference = fed(1)
    for split in (3, 8, len(ids)):
        logits, cache = fed(split)
        assert torch.equal(logits, reference_logits), f"logits after a split of {split}"
        for i, (a, b) in enumerate(zip(cache.layers, reference.layers)):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values), f"layer {i}'s KV after a split of {split}"


def test_the_rows_check_keeps_every_size_up_to_the_first_that_differs(tokenizer):
    """A step whose rows part past 5 rows (a host whose kernel blocks otherwise): requests batch up to 5, and
    prompts prefill through the float model, since a chunk of 8 would not be the rows' bits alone."""
    engine = tiny_engine_in(tokenizer, "int4")
    decoder = engine.decoder

    def differs_past_5(tokens, pos, last):
        logits = decoder.forward_batch(tokens, pos, last)
        return logits + 1 if tokens.shape[0] > 5 else logits

    assert scheduler().call(lambda: decoder.check_rows_invariant(8, engine.kv_dtype, differs_past_5)) == 5
    assert (engine.max_batch, engine.step_prefill, engine.align) == (5, False, 8)


@pytest.mark.parametrize("fmt, aligned", [("int4", False), ("fp32", True)])
def test_a_partial_hit_reuses_every_matched_token_through_the_step(tokenizer, fmt, aligned):
    """With the step's prefill a reuse stops where the match does; with the float model's, at a whole chunk. Fresh bits either way."""
    engine = tiny_engine_in(tokenizer, fmt)
    assert engine.step_prefill is not aligned
    cached = engine.generate(RAW, raw=True, max_new_tokens=4)
    prompt = RAW[: len(RAW) * 2 // 3] + " and then something else entirely"
    shared = common_prefix_len(cached.prompt_token_ids, engine.tokenize(engine.make_request(prompt, raw=True)))
    result = engine.generate(prompt, raw=True, max_new_tokens=6)
    assert result.cache_status == "partial"
    assert result.timings["prefix_tokens_saved"] == (shared // 8 * 8 if aligned else shared), (shared, result.timings["prefix_tokens_saved"])
    same(result, fresh(engine, prompt, raw=True, max_new_tokens=6), "a partial hit")


def test_a_reply_is_stored_as_decoded_through_the_step(tokenizer):
    """Step 8 with the step's prefill: the reply's KV is what a prefill computes, so it is stored when the request ends,
    with no second prefill and no backlog; the next turn reuses prompt and reply, and gives its fresh bits."""
    engine = tiny_engine_in(tokenizer, "int4")
    first = engine.generate("What is machine learning?", system_prompt=SYSTEM, max_new_tokens=8)
    assert first.timings["history_prefill_ms"] == 0 and engine.info()["history"]["waiting"] == 0, (first.timings, engine.info()["history"])
    assert engine.cache.stats()["cached_tokens"] >= len(first.prompt_token_ids) + len(first.token_ids) - 1
    history = [{"role": "user", "content": "What is machine learning?"}, {"role": "assistant", "content": first.text}]
    turn = engine.generate("Tell me more.", system_prompt=SYSTEM, history=history, max_new_tokens=8)
    assert turn.timings["prefix_tokens_saved"] >= len(first.prompt_token_ids) + len(first.token_ids) - 2, turn.timings
    same(turn, fresh(engine, "Tell me more.", system_prompt=SYSTEM, history=history, max_new_tokens=8), "the next turn")


@pytest.mark.parametrize("cached, prompt, align, kind, reused", [
    (40, 40, 32, "hit", 40),  # an exact hit reuses everything
    (40, 50, 32, "partial", 32),  # a partial hit stops at a chunk boundary
    (31, 50, 32, "miss", 0),
    (64, 60, 32, "partial", 32),  # a strict prefix of a cached sequence: its last chunk again, for the logits
    (64, 65, 32, "partial", 64),
    (40, 50, 1, "partial", 40),  # unaligned (a caller without chunks)
])
def test_reuse_stops_at_chunk_boundaries(cached, prompt, align, kind, reused):
    """Only whole chunks are reused, so the suffix is computed in the same chunks as a miss computes it; the counters count what is reused."""
    from cache import PrefixCache

    cache = PrefixCache.simulated(1024, min_tokens=4)
    cache.insert(list(range(cached)), cache.pool.source(list(range(cached)), logits="logits"))
    match = cache.match_prefix(list(range(cached))[:prompt] + list(range(1000, 1000 + max(prompt - cached, 0))), align=align)
    cache.release(match)
    assert (match.kind, match.length) == (kind, reused)
    assert cache.stats()["tokens_saved"] == reused


# ====================================================================== the bundled model, default configuration


@pytest.fixture(scope="module")
def default_engine():
    """SmolLM2 as the app serves it: weights=auto (int4 decode step on a CPU), compile on, started in the background."""
    engine = Engine.from_pretrained(device=TEST_DEVICE, compile="auto", cache_budget_mb=256)
    yield engine


def _scenario_text() -> list[str]:
    pieces = []
    for scenario in json.loads(SCENARIOS_PATH.read_text())["scenarios"]:
        pieces.append(scenario.get("system_prompt") or "")
        pieces += [(scenario.get("prompt_prefix") or "") + p for p in scenario.get("prompts", [])]
    return [p for p in pieces if p.strip()]


TEXTS = _scenario_text()
WORDS = sorted({w for text in TEXTS for w in text.split()})[:400] + ["zebra", "quantum", "kettle", "42", "ñandú", "東京"]


@pytest.mark.timeout(1800)  # a cold compile on a loaded 2-core host
def test_requests_during_the_compile_wait_for_it_and_match_those_after(default_engine):
    """Before and after the compiled step is ready: requests wait for it, so one step computes every answer of the process's life."""
    engine = default_engine
    prompts = [f"{TEXTS[i % len(TEXTS)][:200]} Question {i}?" for i in range(4)]
    during: list = [None] * len(prompts)
    compiling = engine.compiler.state == "compiling"

    def ask(i: int) -> None:
        during[i] = engine.generate(prompts[i], max_new_tokens=6)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    assert engine.compiler.wait(0), engine.compiler.status()  # settled: compiled, or eager for good with the reason
    if compiling and engine.compiler.state == "compiled":
        assert any(r.timings["compile_wait_ms"] > 0 for r in during), "requests sent while compiling should have waited for it"
    for i, prompt in enumerate(prompts):
        same(during[i], fresh(engine, prompt, max_new_tokens=6), f"request {i} sent while compiling")


@st.composite
def requests(draw):
    """A request drawn from the scenarios' text and random words: raw text cut anywhere, a chat turn, a conversation's next turn, no KV cache.

    The engine and its prefix cache live across examples, so later ones hit, partially hit or
    strictly prefix what earlier ones stored.
    """
    kind = draw(st.sampled_from(["raw", "raw", "chat", "chat", "conversation", "no_kv"]))
    system = draw(st.one_of(st.none(), st.sampled_from(TEXTS), st.lists(st.sampled_from(WORDS), min_size=5, max_size=60).map(" ".join)))
    question = draw(st.one_of(st.sampled_from(TEXTS), st.lists(st.sampled_from(WORDS), min_size=1, max_size=25).map(" ".join)))
    raw_text = draw(st.sampled_from(TEXTS))
    cut = draw(st.integers(1, len(raw_text)))
    raw = raw_text[:cut] if raw_text[:cut].strip() else raw_text
    return {"kind": kind, "system": system, "question": question, "raw": raw, "new": draw(st.integers(1, 6))}


@pytest.mark.timeout(2400)  # 200 examples: ~4 min on a quiet 2-core host, far more on a loaded one
@settings(max_examples=int(os.environ.get("KVCI_EXACT_EXAMPLES", "200")), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])
@given(case=requests())
def test_every_cache_path_is_bit_identical_on_the_bundled_model(default_engine, case):
    """Property: whatever the prompt, the cut and the history, a cached run is the fresh run, bit for bit (int4 step, compiled)."""
    engine, new, kind = default_engine, case["new"], case["kind"]
    engine.compiler.settled()
    if kind in ("raw", "no_kv"):  # a hit, a partial hit, a strict prefix or a miss of text cut anywhere
        reference = fresh(engine, case["raw"], raw=True, max_new_tokens=new)
        result = engine.generate(case["raw"], raw=True, max_new_tokens=new, **({"use_cache": False, "use_prefix_cache": False} if kind == "no_kv" else {}))
        same(result, reference, kind)
        return
    history: list[dict[str, str]] = []
    for turn in range(2 if kind == "conversation" else 1):  # turn 2 hits turn 1's history, its reply prefilled again before it was stored
        question = case["question"] if turn == 0 else "And then?"
        result = engine.generate(question, system_prompt=case["system"], history=history, max_new_tokens=new)
        same(result, fresh(engine, question, system_prompt=case["system"], history=history, max_new_tokens=new), f"{kind} turn {turn + 1}")
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": result.text}]


def test_batches_of_2_4_8_give_each_request_its_bits_alone_on_the_bundled_model(default_engine):
    """The bundled model as served (int4 step, compiled): one request alone and batched with different neighbours, the same bits."""
    default_engine.compiler.settled()
    assert default_engine.decoder.rows_invariant or default_engine.compiler.state != "compiled", "the compiled int4 step batches on this host"
    check_batches(default_engine)


def test_eight_concurrent_requests_equal_each_alone_on_the_bundled_model(default_engine):
    """The same request alone and among 8 concurrent ones (the compiled step is shared behind its lock)."""
    engine = default_engine
    engine.compiler.settled()
    prompts = [TEXTS[i % len(TEXTS)] + f" ({i})" for i in range(8)]
    alone = [fresh(engine, p, max_new_tokens=8) for p in prompts]
    for p in prompts:  # warm the cache so the concurrent ones hit
        engine.generate(p, max_new_tokens=2)
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: engine.generate(p, max_new_tokens=8), prompts))
    for i, (a, b) in enumerate(zip(together, alone)):
        same(a, b, f"concurrent request {i}")
