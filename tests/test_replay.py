"""The workload replay (cache/traces.py, cache/budget_plan.py, cache/replay.py): engine semantics on the real tree, formats, errors, the CLI."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from cache.budget_plan import ReplaySettings, ReplayTimeout, load_model_size, model_size_from_dict, parse_budgets, plan, replay
from cache.traces import Trace, TraceError, TraceLimits, TraceRequest, load_trace

REPO_ROOT = Path(__file__).resolve().parent.parent
BLOCK = 16
SETTINGS = ReplaySettings(kv_bytes_per_token=10, logits_bytes=40, min_tokens=1)


def block_lines(chains, block=BLOCK, last_partial=5):
    """Mooncake-format lines: each chain of hash ids, its last block ``last_partial`` tokens short."""
    return [json.dumps({"timestamp": i, "input_length": len(c) * block - last_partial, "output_length": 3, "hash_ids": c}) for i, c in enumerate(chains)]


def by_hand_reused_blocks(chains, min_blocks=1):
    """What an unbounded cache reuses, counted by hand: the longest shared leading run of ids with an
    earlier request, all but the last block at most (block traces store no logits), none under min_blocks."""
    seen: set[tuple[int, ...]] = set()
    total = 0
    for chain in chains:
        shared = max((n for n in range(len(chain) + 1) if tuple(chain[:n]) in seen), default=0)
        reused = min(shared, len(chain) - 1)
        total += reused if reused >= min_blocks else 0
        seen.update(tuple(chain[:n]) for n in range(1, len(chain) + 1))
    return total


def random_chains(seed, count=300):
    """Conversations that grow turn by turn, plus one-off prompts, sharing system-prompt blocks."""
    rng = random.Random(seed)
    next_id, chains, live = 1000, [], []
    systems = [[i * 10 + j for j in range(rng.randrange(1, 4))] for i in range(5)]
    for _ in range(count):
        if live and rng.random() < 0.6:
            i = rng.randrange(len(live))
            live[i] = live[i] + list(range(next_id, next_id + rng.randrange(1, 4)))
            chain = live[i]
        else:
            chain = rng.choice(systems) + list(range(next_id, next_id + rng.randrange(1, 5)))
            live.append(chain)
        next_id += 10
        chains.append(chain)
    return chains


@pytest.mark.parametrize("chains", [[[0, 1], [0, 1, 2], [0, 3], [0, 1], [7]], random_chains(0), random_chains(1)], ids=["small", "random-0", "random-1"])
def test_unbounded_token_hit_rate_equals_a_count_by_hand(chains):
    """The acceptance check: with no budget limit, reused tokens are exactly the reused prefix blocks counted by hand."""
    trace = load_trace(block_lines(chains), block_size=BLOCK)
    row = replay(trace, None, "lru", SETTINGS)
    blocks = by_hand_reused_blocks(chains)
    prompt_tokens = sum(len(c) * BLOCK - 5 for c in chains)
    assert (row.reused_tokens, row.prompt_tokens, row.evictions) == (blocks * BLOCK, prompt_tokens, 0)
    assert row.token_hit_rate == blocks * BLOCK / prompt_tokens
    assert row.peak_bytes == len({tuple(c[:n]) for c in chains for n in range(1, len(c) + 1)}) * BLOCK * 10  # each distinct block once


def test_token_trace_follows_the_engine_exact_partial_strict_prefix_and_output():
    """Token traces: an exact repeat reuses everything, a strict prefix all but one token, the output makes the next turn hit."""
    lines = [
        {"token_ids": list(range(30)), "output_ids": [100, 101, 102]},
        {"token_ids": list(range(30))},  # exact: stored with logits
        {"token_ids": list(range(30)) + [100, 101, 102, 7, 8]},  # the next turn: prompt + reply reused
        {"token_ids": list(range(25))},  # a strict prefix of a cached sequence: all but its last token
        {"token_ids": [5] * 10},  # under min_tokens: skipped, counted as a request that reused nothing
    ]
    trace = load_trace([json.dumps(line) for line in lines])
    row = replay(trace, None, "lru", ReplaySettings(kv_bytes_per_token=10, logits_bytes=40, min_tokens=20))
    assert row.reused_tokens == 0 + 30 + 33 + 24 + 0
    assert (row.requests, row.request_hit_rate, row.prompt_tokens) == (5, 3 / 5, 30 + 30 + 35 + 25 + 10)


def test_a_small_budget_evicts_and_never_exceeds_it():
    """Bounded replays evict, reuse less than an unbounded one, and peak within the budget."""
    trace = load_trace(block_lines(random_chains(2)), block_size=BLOCK)
    rows = plan(trace, [20 * BLOCK * 10, 80 * BLOCK * 10, None], ["lru", "lfu", "fifo", "mru"], SETTINGS)
    assert len(rows) == 4 * 3
    for row in rows:
        if row.budget_bytes is not None:
            assert row.peak_bytes <= row.budget_bytes
    small = [r for r in rows if r.budget_bytes == 20 * BLOCK * 10]
    assert all(r.evictions > 0 and r.reused_tokens < rows[-1].reused_tokens for r in small)
    assert len({r.reused_tokens for r in small}) > 1  # the policies really differ
    assert sum(r.knee for r in rows) == 4  # one knee per policy


def test_auto_sweep_and_knee():
    """No budgets: halvings of the unbounded peak, then unbounded; the knee is the smallest within 5% of unbounded."""
    trace = load_trace(block_lines(random_chains(3)), block_size=BLOCK)
    rows = plan(trace, None, ["lru"], SETTINGS)
    assert [r.budget_bytes for r in rows][-1] is None and len(rows) == 8
    peak = rows[-1].peak_bytes
    assert rows[-2].budget_bytes == peak
    knee = next(r for r in rows if r.knee)
    assert knee.reused_tokens >= 0.95 * rows[-1].reused_tokens
    assert all(r.reused_tokens < 0.95 * rows[-1].reused_tokens for r in rows[: rows.index(knee)])


def test_deadline_stops_a_replay():
    """The app bounds a replay's time: past the deadline it raises instead of running on."""
    trace = Trace("tokens", [TraceRequest(tuple(range(i, i + 30)), (), 30) for i in range(1000)])
    with pytest.raises(ReplayTimeout, match="ran out of time"):
        replay(trace, None, "lru", SETTINGS, deadline=0.0)


@pytest.mark.parametrize(
    "lines, message",
    [
        ([], "empty"),
        (["", "  "], "empty"),
        (['{"prompt": "hi"}', "{not json"], "line 2: not valid JSON"),
        (["[1, 2]"], "line 1: each line must be a JSON object"),
        (['{"text": "hi"}'], "line 1: no 'messages', 'prompt', 'token_ids' or 'hash_ids'"),
        (['{"hash_ids": 3, "input_length": 5}'], "line 1: hash_ids must be a list"),
        (['{"hash_ids": [1, "a"], "input_length": 20}'], "line 1: hash_ids must hold non-negative integers"),
        (['{"hash_ids": [1], "input_length": -4}'], "line 1: input_length must not be negative"),
        (['{"hash_ids": [1]}'], "line 1: input_length must be an integer, and is required"),
        (['{"hash_ids": [1], "input_length": 10, "output_length": -1}'], "output_length must not be negative"),
        (['{"hash_ids": [1, 2, 3], "input_length": 10}'], "line 1: input_length 10 needs 1 blocks of 16 tokens, but hash_ids has 3"),
        (['{"hash_ids": [1], "input_length": 10, "timestamp": "noon"}'], "timestamp must be a number"),
        (['{"token_ids": [1, 2]}', '{"hash_ids": [1], "input_length": 4}'], "line 2: a blocks request in a tokens trace"),
        (['{"messages": []}'], "line 1: messages must be a non-empty list"),
        (['{"messages": [{"role": "robot", "content": "x"}]}'], "messages[0] needs a role"),
        (['{"messages": [{"role": "user", "content": 5}]}'], "messages[0].content must be a string"),
        (['{"prompt": "hi", "output": 3}'], "output must be a string"),
    ],
)
def test_bad_traces_name_the_line_and_the_problem(lines, message):
    """Every kind of bad input is a TraceError (a ValueError) whose message says which line and why."""
    with pytest.raises(TraceError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_trace(lines, tokenizer=lambda: pytest.fail("nothing is tokenized before every line is checked"), block_size=BLOCK)


def test_limits_refuse_oversized_traces():
    """The app's bounds: too many requests, or too many tokens in all."""
    lines = [json.dumps({"token_ids": [1] * 30})] * 5
    with pytest.raises(TraceError, match="more than 4 requests"):
        load_trace(lines, limits=TraceLimits(max_requests=4))
    with pytest.raises(TraceError, match="150 tokens, more than the 100 allowed"):
        load_trace(lines, limits=TraceLimits(max_units=100))


def test_timestamps_order_the_replay():
    """Requests replay in timestamp order when every line has one (a trace need not be sorted)."""
    lines = [json.dumps({"token_ids": list(range(40)), "timestamp": 2}), json.dumps({"token_ids": list(range(30)), "timestamp": 1})]
    trace = load_trace(lines)
    assert [len(r.units) for r in trace.requests] == [30, 40]


@pytest.mark.parametrize(
    "name, kv_bytes_bf16",
    [("smollm2-135m", 2 * 30 * 3 * 64 * 2), ("llama-3.1-8b", 128 * 1024), ("llama-3.1-70b", 320 * 1024), ("qwen2.5-7b", 56 * 1024), ("mistral-7b", 128 * 1024)],
)
def test_shipped_model_configs(name, kv_bytes_bf16):
    """KV bytes per token = 2 (K, V) × layers × KV heads × head size × dtype bytes, for each shipped config."""
    model = load_model_size(name)
    assert model.kv_bytes_per_token("bf16") == kv_bytes_bf16
    assert model.kv_bytes_per_token("fp8") * 2 == model.kv_bytes_per_token("fp16") == kv_bytes_bf16 == model.kv_bytes_per_token("fp32") // 2


def test_hugging_face_config_json_is_accepted(tmp_path):
    """A model's own config.json works: head_dim from hidden_size / heads, KV heads defaulting to heads."""
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64, "vocab_size": 100}))
    model = load_model_size(str(tmp_path))
    assert (model.num_key_value_heads, model.head_dim, model.kv_bytes_per_token("fp32")) == (4, 16, 2 * 2 * 4 * 16 * 4)
    with pytest.raises(TraceError, match="needs num_hidden_layers"):
        model_size_from_dict({"layers": 3})


@pytest.mark.parametrize(
    "text, expected",
    [("1GiB,512MiB,inf", [1 << 30, 512 << 20, None]), ("1.5GB, 100000", [1_500_000_000, 100_000]), ("auto", None)],
)
def test_budgets_parse(text, expected):
    assert parse_budgets(text) == expected


@pytest.mark.parametrize("text", ["1XB", "-1GiB", "0", "lots"])
def test_bad_budgets_are_refused(text):
    with pytest.raises(TraceError):
        parse_budgets(text)


def test_chat_trace_tokenizes_as_the_engine_and_reuses_the_history(tiny_engine):
    """Chat lines get the engine's own token ids; a conversation's second turn reuses the first turn's prompt and reply."""
    system = {"role": "system", "content": "You are a patient tutor who explains computer science ideas with short examples."}
    first = [system, {"role": "user", "content": "What is a cache?"}]
    reply = "A cache keeps recent results close at hand so they need not be computed again."
    second = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "Why does it help?"}]
    lines = [json.dumps({"messages": first, "output": reply}), json.dumps({"messages": second})]
    trace = load_trace(lines, tokenizer=tiny_engine.chat)
    expected = tiny_engine.tokenize(tiny_engine.make_request("What is a cache?", system_prompt=system["content"]))
    assert list(trace.requests[0].units) == expected
    row = replay(trace, None, "lru", ReplaySettings(kv_bytes_per_token=10, logits_bytes=40))
    assert row.reused_tokens == len(expected) + len(trace.requests[0].output)  # the whole first turn, reply included
    assert list(trace.requests[1].units[: row.reused_tokens]) == expected + list(trace.requests[0].output)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "cache.replay", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def test_cli_json_and_html_on_a_block_trace(tmp_path):
    """`python -m cache.replay` on a Mooncake-format trace: JSON rows with the documented fields, and a chart file."""
    trace = tmp_path / "trace.jsonl"
    trace.write_text("\n".join(block_lines(random_chains(4), block=512)) + "\n")
    html = tmp_path / "chart.html"
    out = run_cli(str(trace), "--model-config", "llama-3.1-8b", "--budgets", "1GiB,4GiB,inf", "--policies", "lru,lfu", "--format", "json", "--html", str(html))
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [(r["policy"], r["budget_bytes"]) for r in rows] == [(p, b) for p in ("lru", "lfu") for b in (1 << 30, 4 << 30, None)]
    assert set(rows[0]) >= {"requests", "request_hit_rate", "token_hit_rate", "prompt_tokens", "reused_tokens", "peak_bytes", "evictions", "prefill_s_saved", "budget_bytes", "policy"}
    assert "plotly" in html.read_text()[:100_000].lower()


@pytest.mark.parametrize(
    "content, args, message",
    [
        ('{"hash_ids": [1], "input_length": 5}\n{"hash_ids": [1], "input_length": -5}\n', [], "line 2: input_length must not be negative"),
        ("", [], "the trace is empty"),
        ('{"hash_ids": [1], "input_length": 5}\n', ["--budgets", "1XB"], "is not a size"),
        ('{"hash_ids": [1], "input_length": 5}\n', ["--model-config", "gpt-9"], "no model config 'gpt-9'"),
        ('{"hash_ids": [1], "input_length": 5}\n', ["--policies", "random"], "unknown eviction policy"),
    ],
)
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, content, args, message):
    """Bad input: exit code 2, a message on stderr, nothing on stdout, no chart file."""
    trace = tmp_path / "trace.jsonl"
    trace.write_text(content)
    html = tmp_path / "chart.html"
    out = run_cli(str(trace), "--html", str(html), *args)
    assert (out.returncode, out.stdout) == (2, "")
    assert message in out.stderr
    assert not html.exists() and list(tmp_path.iterdir()) == [trace]


def test_cli_replays_the_example_traces():
    """Every shipped example trace replays (text traces through the bundled tokenizer)."""
    for trace in sorted((REPO_ROOT / "assets" / "traces").glob("*.jsonl")):
        out = run_cli(str(trace), "--budgets", "16MiB,inf", "--policies", "lru,lfu")
        assert out.returncode == 0, f"{trace.name}: {out.stderr}"
        assert "knee" in out.stdout


def test_replay_imports_no_model_code():
    """cache.replay on a block or token trace needs neither torch nor transformers."""
    code = "import sys, cache.replay; bad = {'torch', 'transformers', 'tokenizers', 'plotly'} & set(sys.modules); print(sorted(bad))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    assert out.stdout.strip() == "[]"
