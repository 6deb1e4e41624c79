"""The pure parts of benchmark/server_bench.py: SSE parsing, the per-stream and per-cell figures,
llama-server's best setting, the request mix and the command line. No model, no server: a few
seconds. The servers themselves are exercised by running the benchmark (its docstring says how).
"""

from __future__ import annotations

import json

import pytest

from benchmark import server_bench as sb

# llama-server's stream, as the build dev.py makes (llama.cpp tools/server vendored by
# llama-cpp-python 0.3.36, commit 0c1e570) sent it for max_tokens 4 with include_usage (model path
# shortened). Its shape is the one tools/server/README.md documents: OpenAI's chunks, the role chunk
# with "content": null, and a last chunk with "usage" and "timings" ("Timings and context usage").
LLAMA_SERVER_STREAM = """\
data: {"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":null}}],"created":1796623677,"id":"chatcmpl-YtHs","model":"SmolLM2-135M-Instruct.Q4_1.gguf","system_fingerprint":"b1-0c1e570","object":"chat.completion.chunk"}

data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"Hello"}}],"created":1796623677,"id":"chatcmpl-YtHs","model":"SmolLM2-135M-Instruct.Q4_1.gguf","system_fingerprint":"b1-0c1e570","object":"chat.completion.chunk"}

data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"!"}}],"created":1796623677,"id":"chatcmpl-YtHs","model":"SmolLM2-135M-Instruct.Q4_1.gguf","system_fingerprint":"b1-0c1e570","object":"chat.completion.chunk"}

data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":" How"}}],"created":1796623677,"id":"chatcmpl-YtHs","model":"SmolLM2-135M-Instruct.Q4_1.gguf","system_fingerprint":"b1-0c1e570","object":"chat.completion.chunk"}

data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":" can"}}],"created":1796623677,"id":"chatcmpl-YtHs","model":"SmolLM2-135M-Instruct.Q4_1.gguf","system_fingerprint":"b1-0c1e570","object":"chat.completion.chunk"}

data: {"choices":[{"finish_reason":"length","index":0,"delta":{}}],"created":1796623677,"id":"chatcmpl-YtHs","model":"SmolLM2-135M-Instruct.Q4_1.gguf","system_fingerprint":"b1-0c1e570","object":"chat.completion.chunk"}

data: {"choices":[],"created":1796623677,"id":"chatcmpl-YtHs","model":"SmolLM2-135M-Instruct.Q4_1.gguf","system_fingerprint":"b1-0c1e570","object":"chat.completion.chunk","usage":{"completion_tokens":4,"prompt_tokens":31,"total_tokens":35,"prompt_tokens_details":{"cached_tokens":0}},"timings":{"cache_n":0,"prompt_n":31,"prompt_ms":243.517,"prompt_per_token_ms":7.8553870967741934,"prompt_per_second":127.30117404534386,"predicted_n":4,"predicted_ms":43.152,"predicted_per_token_ms":14.384,"predicted_per_second":69.52169076751947}}

data: [DONE]

"""

# OpenAI's API reference, "Create chat completion" with stream: true (the chat.completion.chunk
# example: role chunk, content chunks, finish chunk). Without stream_options.include_usage no usage
# chunk comes, so the tokens are counted from the content chunks.
OPENAI_STREAM = """\
data: {"id":"chatcmpl-123","object":"chat.completion.chunk","created":1694268190,"model":"gpt-4o-mini", "system_fingerprint": "fp_44709d6fcb", "choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}

data: {"id":"chatcmpl-123","object":"chat.completion.chunk","created":1694268190,"model":"gpt-4o-mini", "system_fingerprint": "fp_44709d6fcb", "choices":[{"index":0,"delta":{"content":"Hello"},"logprobs":null,"finish_reason":null}]}

data: {"id":"chatcmpl-123","object":"chat.completion.chunk","created":1694268190,"model":"gpt-4o-mini", "system_fingerprint": "fp_44709d6fcb", "choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]}

data: [DONE]

"""

# OpenAI's API reference, stream_options.include_usage: "an additional chunk will be streamed before
# the data: [DONE] message. The usage field on this chunk shows the token usage statistics for the
# entire request, and the choices field will always be an empty array."
OPENAI_USAGE_CHUNK = 'data: {"id":"chatcmpl-123","object":"chat.completion.chunk","created":1694268190,"model":"gpt-4o-mini","system_fingerprint":"fp_44709d6fcb","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":1,"total_tokens":10}}'


def timed(body: str, start: float = 10.0, step: float = 0.1) -> list[tuple[float, str]]:
    """The body's lines with made-up arrival times ``step`` apart, as ``_timed_lines`` yields them."""
    return [(start + i * step, line) for i, line in enumerate(body.splitlines())]


def record_with_chunks(times: list[float], t_send: float = 0.0, usage: dict | None = None, error: str | None = None) -> sb.StreamRecord:
    """A finished stream whose content chunks arrived at ``times``."""
    return sb.StreamRecord(t_send=t_send, status=200, chunk_times=list(times), text="x" * len(times), t_end=(times[-1] if times else t_send), done=error is None, usage=usage, error=error, error_kind="dropped" if error else None)


def cell(mix: str, clients: int, tok_s: float, completed: int = 4, ttft: float = 100.0) -> dict:
    """The part of a cell summary the comparison reads."""
    return {"mix": mix, "clients": clients, "out_tok_s": tok_s, "completed": completed, "ttft_p50_ms": ttft}


# ---------------------------------------------------------------------- SSE parsing


@pytest.mark.parametrize(
    "line, expected",
    [
        ('data: {"a": 1}', {"a": 1}),
        ('data:{"a": 1}', {"a": 1}),  # SSE makes the space after the colon optional
        ("data: [DONE]", sb.DONE),
        ("", None),  # the blank line between events
        (": ping", None),  # a keep-alive comment (llama-server's sse_ping_interval)
        ("event: message", None),
        ("id: 7", None),
        ("data: ", None),
    ],
)
def test_parse_sse_line(line, expected):
    """Only data lines carry events; comments and separators must never be taken for tokens."""
    assert sb.parse_sse_line(line) == expected


@pytest.mark.parametrize("line", ["data: {not json", "data: [1, 2]", 'data: "text"'])
def test_parse_sse_line_refuses_what_is_not_a_json_object(line):
    """A broken data line is an error to count, not an event to guess at."""
    with pytest.raises(ValueError):
        sb.parse_sse_line(line)


def test_llama_server_stream_is_read_whole():
    """llama-server's stream: four content chunks (the role chunk's null content is not one), usage
    counts the tokens, and its timings are kept as an extra field."""
    lines = timed(LLAMA_SERVER_STREAM)
    record = sb.collect_stream(sb.StreamRecord(t_send=9.0), lines)
    assert record.done and record.error is None
    assert record.text == "Hello! How can"
    content_times = [t for t, line in lines if '"content":"' in line]
    assert record.chunk_times == content_times and len(content_times) == 4
    assert record.finish_reason == "length"
    assert record.usage["completion_tokens"] == 4 and record.usage["prompt_tokens"] == 31
    assert record.extra["timings"]["predicted_n"] == 4 and record.extra["timings"]["cache_n"] == 0
    assert sb.completion_tokens(record) == (4, "usage")


def test_openai_stream_without_usage_counts_chunks():
    """OpenAI's documented stream: the empty role content is no chunk; without a usage chunk the
    token count falls back to the content chunks, and says so."""
    record = sb.collect_stream(sb.StreamRecord(t_send=9.0), timed(OPENAI_STREAM))
    assert record.done and record.text == "Hello" and len(record.chunk_times) == 1
    assert record.finish_reason == "stop" and record.usage is None and record.extra == {}
    assert sb.completion_tokens(record) == (1, "chunks")


def test_openai_usage_chunk_sets_the_count():
    """The include_usage chunk (choices empty) supplies the count and adds no content chunk."""
    body = OPENAI_STREAM.replace("data: [DONE]", OPENAI_USAGE_CHUNK + "\n\ndata: [DONE]")
    record = sb.collect_stream(sb.StreamRecord(t_send=9.0), timed(body))
    assert len(record.chunk_times) == 1 and sb.completion_tokens(record) == (1, "usage")


def test_app_extra_fields_are_kept_as_they_come():
    """This app puts its cache status and timings under "kvci" on its last chunk: recorded, not parsed."""
    extra = {"cache_status": "partial", "timings": {"prefix_tokens_saved": 384}}
    closing = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [], "usage": {"prompt_tokens": 420, "completion_tokens": 2}, "kvci": extra}
    body = 'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\ndata: ' + json.dumps(closing) + "\n\ndata: [DONE]\n"
    record = sb.collect_stream(sb.StreamRecord(t_send=0.0), timed(body))
    assert record.extra == {"kvci": extra}


@pytest.mark.parametrize(
    "body, kind",
    [
        ('data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n', "dropped"),  # the connection closed before [DONE]
        ('data: {"error": {"message": "the generation failed", "type": "server_error"}}\n\ndata: [DONE]\n', "stream_error"),
    ],
)
def test_stream_failures_are_recorded_not_raised(body, kind):
    """A stream cut short or carrying an error event is one error of its kind; the run goes on."""
    record = sb.collect_stream(sb.StreamRecord(t_send=0.0), timed(body))
    assert record.error and record.error_kind == kind
    assert not sb.stream_stats(record)["ok"]


# ---------------------------------------------------------------------- gaps, percentiles, aggregates


def test_inter_chunk_gaps():
    """Gaps are between consecutive content chunks; one chunk has none."""
    assert sb.inter_chunk_gaps([1.0, 1.5, 3.0]) == [0.5, 1.5]
    assert sb.inter_chunk_gaps([1.0]) == []


@pytest.mark.parametrize(
    "window, expected",
    [
        ((1.2, 1.3), 0.5),  # inside one gap: that gap
        ((0.5, 1.1), 1.0),  # the first gap began before the window: it counts
        ((1.1, 2.6), 0.9),  # several gaps overlap: the longest (the one ending at the window's start does not overlap it)
        ((3.5, 4.0), None),  # after the last chunk: no gap overlaps
        ((0.0, 0.5), 1.0),  # a gap starting inside the window and ending after it counts
    ],
)
def test_longest_gap_within(window, expected):
    """The stall is the gap that overlaps the prefill window, even when it spans the whole window."""
    times = [0.1, 1.1, 1.6, 2.5, 3.0]  # gaps 1.0, 0.5, 0.9, 0.5
    assert sb.longest_gap_within(times, *window) == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize("values, q, expected", [([], 50, None), ([7.0], 95, 7.0), ([1.0, 2.0, 3.0, 4.0], 50, 2.5), ([1.0, 2.0, 3.0, 4.0, 5.0], 95, 4.8)])
def test_percentile_interpolates_as_numpy(values, q, expected):
    """TTFT p50/p95 use numpy's default (linear) interpolation, without importing numpy."""
    assert sb.percentile(values, q) == (None if expected is None else pytest.approx(expected))


def test_stream_stats():
    """TTFT is send to first content chunk; decode tok/s counts the tokens after the first over the
    first-to-last chunk time; usage's count wins over the chunk count."""
    stats = sb.stream_stats(record_with_chunks([0.5, 0.6, 0.8, 1.5], t_send=0.0, usage={"completion_tokens": 5, "prompt_tokens": 420, "prompt_tokens_details": {"cached_tokens": 384}}))
    assert stats["ok"] and stats["ttft_ms"] == pytest.approx(500)
    assert stats["max_gap_ms"] == pytest.approx(700) and stats["median_gap_ms"] == pytest.approx(200)
    assert stats["completion_tokens"] == 5 and stats["token_source"] == "usage"
    assert stats["decode_tok_s"] == pytest.approx(4 / 1.0)
    assert stats["prompt_tokens"] == 420 and stats["cached_tokens"] == 384


def test_stream_stats_of_a_one_token_reply():
    """One chunk: a TTFT, but no gap and no decode rate (nothing to divide by)."""
    stats = sb.stream_stats(record_with_chunks([0.3]))
    assert stats["ttft_ms"] == pytest.approx(300) and stats["max_gap_ms"] is None and stats["decode_tok_s"] is None


def test_summarize_cell_counts_only_completed_requests():
    """Output tok/s and requests/s are over the cell's wall time and completed requests; a failed
    request is an error of its kind and adds no tokens; mixed token sources are named."""
    good = sb.stream_stats(record_with_chunks([1.0, 1.1, 1.3], usage={"completion_tokens": 3}))
    chunks_only = sb.stream_stats(record_with_chunks([2.0, 2.2]))
    failed = sb.stream_stats(record_with_chunks([1.0, 5.0], error="dropped connection"))
    c = sb.summarize_cell([good, chunks_only, failed], wall_s=2.0, planned=4)
    assert c["completed"] == 2 and c["errors"] == 1 and c["not_sent"] == 1 and c["errors_by_kind"] == {"dropped": 1}
    assert c["completion_tokens"] == 5 and c["out_tok_s"] == pytest.approx(2.5) and c["requests_per_sec"] == pytest.approx(1.0)
    assert c["max_gap_ms"] == pytest.approx(200)  # the failed stream's 4 s gap is not counted
    assert c["ttft_p50_ms"] == pytest.approx(1500)
    assert c["decode_tok_s_mean"] == pytest.approx((2 / 0.3 + 1 / 0.2) / 2)
    assert c["token_source"] == "mixed"


# ---------------------------------------------------------------------- the best setting, the comparison


def runs_for_comparison() -> list[dict]:
    return [
        {"server": "app", "setting": "defaults", "cells": [cell("shared", 1, 40.0), cell("shared", 4, 90.0)]},
        {"server": "llama-server", "setting": "-np 1 -t 1", "cells": [cell("shared", 1, 60.0), cell("shared", 4, 60.0)]},
        {"server": "llama-server", "setting": "-np 4 -t 1", "cells": [cell("shared", 1, 55.0), cell("shared", 4, 150.0)]},
        {"server": "llama-server", "setting": "-np 4 -t 2", "cells": [cell("shared", 1, 500.0, completed=0), cell("shared", 4, 20.0)]},
    ]


def test_best_llama_cell_takes_the_highest_completed_setting():
    """Per cell the best llama-server setting is the one with the most output tok/s; a setting that
    completed nothing is never best, and the app is never a candidate."""
    runs = runs_for_comparison()
    assert sb.best_llama_cell(runs, "shared", 1)[0]["setting"] == "-np 1 -t 1"
    assert sb.best_llama_cell(runs, "shared", 4)[0]["setting"] == "-np 4 -t 1"
    assert sb.best_llama_cell(runs, "unique", 1) is None
    assert sb.best_llama_cell([runs[0]], "shared", 1) is None


def test_compare_cells_ratio():
    """The summary row: the app's tok/s over llama-server's best; '-' (None) when either side is missing."""
    rows = sb.compare_cells(runs_for_comparison(), ["shared"], [1, 4, 8])
    assert [r["llama_best"] for r in rows] == ["-np 1 -t 1", "-np 4 -t 1", None]
    assert rows[0]["ratio"] == pytest.approx(40 / 60) and rows[1]["ratio"] == pytest.approx(90 / 150)
    assert rows[2]["ratio"] is None and rows[2]["app_tok_s"] is None


# ---------------------------------------------------------------------- the stall test


def test_stall_figures():
    """The stall is the running stream's longest gap overlapping the long prompt's prefill (send to
    first token), beside its median gap alone."""
    alone = record_with_chunks([0.00, 0.02, 0.04, 0.06, 0.08])
    running = record_with_chunks([0.00, 0.02, 0.04, 0.90, 0.92])
    prompt = record_with_chunks([0.85], t_send=0.05, usage={"prompt_tokens": 2040, "completion_tokens": 1})
    s = sb.stall_figures(alone, running, prompt)
    assert s["alone_median_gap_ms"] == pytest.approx(20) and s["during_prefill_max_gap_ms"] == pytest.approx(860)
    assert s["prefill_window_ms"] == pytest.approx(800) and s["prompt_tokens"] == 2040
    assert s["running_outlived_prefill"] and s["running_chunks_before_prompt"] == 3 and s["errors"] == []


# ---------------------------------------------------------------------- the plan and the requests


def test_plan_llama_runs_default():
    """Every -t x -np setting, threads outermost; the stall test runs where two requests can run at once."""
    runs = sb.plan_llama_runs(sb.CompareConfig())
    assert [r.setting.label for r in runs] == ["-np 1 -t 1", "-np 4 -t 1", "-np 8 -t 1", "-np 1 -t 2", "-np 4 -t 2", "-np 8 -t 2"]
    assert [r.stall for r in runs] == [False, True, True, False, True, True] and all(r.load for r in runs)


def test_plan_llama_runs_adds_two_slots_for_the_stall():
    """With one slot only, a stall-only -np 2 process per thread setting is added; --no-stall adds none."""
    runs = sb.plan_llama_runs(sb.CompareConfig(np_values=(1,), threads=(1, 2)))
    assert [(r.setting.label, r.load, r.stall) for r in runs] == [("-np 1 -t 1", True, False), ("-np 1 -t 2", True, False), ("-np 2 -t 1", False, True), ("-np 2 -t 2", False, True)]
    assert len(sb.plan_llama_runs(sb.CompareConfig(np_values=(1,), stall=False))) == 2


def test_llama_setting_splits_the_context_across_slots():
    """llama-server gives each slot -c / np tokens, so -c is np x the per-slot context."""
    flags = sb.LlamaSetting(np=4, threads=2).flags(2560)
    assert flags[flags.index("-c") + 1] == "10240" and flags[flags.index("-t") + 1] == "2" and flags[flags.index("-np") + 1] == "4"
    command = sb.LlamaSetting(np=4, threads=2).command("/bin/llama-server", "/m.gguf", 8080, 2560)
    assert command[:3] == ["/bin/llama-server", "-m", "/m.gguf"] and command[command.index("--port") + 1] == "8080"


@pytest.mark.parametrize("clients, expected", [(1, 4), (2, 4), (4, 8), (8, 16)])
def test_requests_in_cell(clients, expected):
    """A cell sends requests_per_client x clients requests, at least min_requests."""
    assert sb.CompareConfig().requests_in_cell(clients) == expected


def test_chat_requests_are_seeded_and_shared_as_named():
    """Both servers get the same prompts (only the model name differs); ``shared`` shares one system
    prompt, new for each cell; ``unique`` shares none."""
    cfg = sb.CompareConfig()
    shared = sb.chat_requests(cfg, "shared", 4, "app-model")
    again = sb.chat_requests(cfg, "shared", 4, "gguf-model")
    assert [b["messages"] for b in shared] == [b["messages"] for b in again] and len(shared) == 8
    assert len({b["messages"][0]["content"] for b in shared}) == 1
    assert len({b["messages"][1]["content"] for b in shared}) == 8
    assert shared[0]["messages"][0]["content"] != sb.chat_requests(cfg, "shared", 1, "m")[0]["messages"][0]["content"]
    unique = sb.chat_requests(cfg, "unique", 4, "m")
    assert len({b["messages"][0]["content"].splitlines()[0] for b in unique}) == 8
    body = shared[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True} and body["temperature"] == 0 and body["max_tokens"] == 64


# ---------------------------------------------------------------------- the command line


def test_compare_defaults():
    """`--compare-llama-server` alone runs the full default comparison."""
    cfg = sb.compare_config(sb._parse_args(["--compare-llama-server"]))
    assert cfg == sb.CompareConfig()
    assert (cfg.clients, cfg.mixes, cfg.np_values, cfg.threads, cfg.max_tokens, cfg.stall) == ((1, 4, 8), ("shared", "unique"), (1, 4, 8), (1, 2), 64, True)


def test_compare_small_run_flags():
    """The small verification run's flags are all taken."""
    argv = ["--compare-llama-server", "--clients", "1,2", "--requests-per-client", "2", "--max-tokens", "16", "--np", "1,2", "--threads", "2", "--mixes", "unique", "--no-stall"]
    cfg = sb.compare_config(sb._parse_args(argv))
    assert (cfg.clients, cfg.requests_per_client, cfg.max_tokens, cfg.np_values, cfg.threads, cfg.mixes, cfg.stall) == ((1, 2), 2, 16, (1, 2), (2,), ("unique",), False)


@pytest.mark.parametrize(
    "argv",
    [
        ["--compare-llama-server", "--mixes", "shared,other"],
        ["--compare-llama-server", "--clients", "0"],
        ["--compare-llama-server", "--np", "1,100"],
        ["--compare-llama-server", "--max-tokens", "600"],
        ["--compare-llama-server", "--slot-context", "100"],
    ],
)
def test_compare_refuses_bad_settings(argv):
    """Bad settings stop the run before anything is launched, with a message."""
    with pytest.raises(SystemExit):
        sb.compare_config(sb._parse_args(argv))


@pytest.mark.parametrize("argv", [["--compare-llama-server", "--launch"], ["--clients", "1"], ["--compare-llama-server", "--clients", "a,b"]])
def test_command_line_errors(argv):
    """One target at a time, a target is required, and client counts are numbers."""
    with pytest.raises(SystemExit):
        sb._parse_args(argv)


def test_rest_mode_keeps_its_defaults():
    """The REST mode's flags and defaults are as before: one client count, 16 tokens, 300 s per mode."""
    cfg = sb.load_config(sb._parse_args(["--launch"]))
    assert cfg == sb.LoadConfig()
    with pytest.raises(SystemExit):
        sb.load_config(sb._parse_args(["--launch", "--clients", "1,4"]))


# ---------------------------------------------------------------------- the report


def test_report_names_the_machine_every_setting_and_the_best():
    """A figure names its machine and its peer's settings: the report lists the CPU, the app's
    weights and decode step, every llama-server setting tried (a failed one too) and the best per cell."""
    runs = runs_for_comparison()
    for run in runs:
        for c in run["cells"]:
            c.update(sb.summarize_cell([], wall_s=1.0, planned=4) | {"out_tok_s": c["out_tok_s"], "completed": c["completed"]})
        if run["server"] == "llama-server":
            run |= {"flags": ["-c", "2560", "-t", run["setting"][-1], "-np", run["setting"][4], "--no-webui"], "stall_only": False, "threads": int(run["setting"][-1])}
    runs.append({"server": "llama-server", "setting": "-np 8 -t 2", "flags": ["-c", "20480", "-t", "2", "-np", "8", "--no-webui"], "stall_only": False, "error": "llama-server exited", "cells": [], "stall": None})
    results = {
        "name": "server_bench_compare",
        "machine": {"cpu": "Test CPU 9000", "cpu_count": 2, "loadavg_start": [0.1], "loadavg_end": [0.2], "time_utc": "now", "app_weights": "int4", "app_decode_step": "compiled in 11 s", "llama_server_version": "0.5.0-test"},
        "config": sb.asdict(sb.CompareConfig(clients=(1, 4), mixes=("shared",))),
        "runs": runs,
        "wall_s": 60.0,
    }
    results["comparison"] = sb.compare_cells(runs, ["shared"], [1, 4])
    text = sb.render_compare_markdown(results)
    for needle in ("Test CPU 9000", "int4", "compiled in 11 s", "`-c 2560 -t 1 -np 1 --no-webui`", "`-c 2560 -t 2 -np 4 --no-webui`", "failed to start", "0.60x"):
        assert needle in text
    summary = sb.compare_summary(results)
    assert summary["cells"]["shared/4"]["llama_best"] == "-np 4 -t 1" and summary["failed_starts"] == ["llama-server -np 8 -t 2"]
    json.dumps(summary)  # the last printed line is JSON
