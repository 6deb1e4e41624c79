"""Load tests over HTTP: the app's REST API alone, or the app beside llama.cpp's llama-server on /v1.

    python -m benchmark.server_bench --launch                 # REST: start app.py on a free port, run, stop it
    python -m benchmark.server_bench --url http://127.0.0.1:7860 --clients 4 --requests 40
    python -m benchmark.server_bench --compare-llama-server   # this app and llama-server, side by side
    python -m benchmark.server_bench --compare-llama-server --clients 1,2 --requests-per-client 2 --max-tokens 16 --np 1,2 --threads 2

**REST** (``--launch`` or ``--url``): N client threads (one ``httpx.Client`` each) send a fixed,
seeded mix of ``POST /generate`` requests: most share one long system prompt (prefix-cache hits
after the first), the rest start with a unique line (misses). The same mix runs with the prefix
cache on and then off. Reports p50/p95 of the server's wall TTFT and of the client-side latency,
requests per second, hit rate and errors. Bounded in requests (``--requests`` per mode) and in
time (``--max-seconds`` per mode).

**Comparison** (``--compare-llama-server``): one OpenAI streaming client (``POST
/v1/chat/completions``, ``stream: true``, ``stream_options.include_usage``, the SSE ``data:`` lines
parsed here) drives, one server at a time so that they never share the CPU, this app (launched
here, measured once /health says its decode step's compile ended) and then llama-server (built by
``python3 dev.py llama-server``, or ``KVCI_LLAMA_SERVER``) on the same GGUF, one process per
``--np`` x ``--threads`` setting. Every server runs the same seeded cells: each mix (``shared``: one
~400-token system prompt per cell and a distinct question; ``unique``: a distinct first line, so
nothing is shared) at each client count, clients sending back to back, ``max(--min-requests,
--requests-per-client x clients)`` requests per cell, ``--max-tokens`` each at temperature 0.
Per cell: output tok/s (completion tokens / the cell's wall time), requests/s, TTFT p50/p95 (send
to first content chunk), the longest gap between content chunks in any stream, mean per-stream
decode tok/s, errors (HTTP, dropped, timeouts; counted, never fatal). The stall test: one
``--stall-tokens`` stream alone (its median gap), then again while a ~2,000-token prompt with
max_tokens 1 arrives (its longest gap during that prefill), on the app and on every llama-server
setting with two slots or more. Names llama-server's best setting per cell (highest output tok/s)
and the app's ratio to it; writes ``benchmark/results/server_bench_compare.{json,md,html,png}``.

Loopback only: the app is a local demo, and this is load, so other hosts are refused. The JSON
summary is the last line printed.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import queue
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator
from urllib.parse import urlsplit

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from benchmark.common import REPO_ROOT, fmt, handbook_text, machine_info, markdown_table, print_machine_info, question, write_results

MIXES = ("shared", "unique")
DONE = "[DONE]"  # what parse_sse_line returns for the stream's last line
# Top-level fields of an OpenAI chat.completion.chunk; anything else a server adds (this app's "kvci",
# llama-server's "timings") is kept as its extra fields.
OPENAI_CHUNK_FIELDS = frozenset({"id", "object", "created", "model", "system_fingerprint", "service_tier", "choices", "usage", "obfuscation"})


@dataclass(frozen=True)
class LoadConfig:
    """The REST load: one client count, a share of shared-prefix requests, prefix cache on and off."""

    clients: int = 4  # concurrent client threads
    requests: int = 32  # per mode
    shared_fraction: float = 0.75  # share of requests on the common system prompt
    system_sections: int = 10  # handbook sections in the system prompt (about 40 tokens each)
    max_new_tokens: int = 16
    max_seconds: float = 300.0  # per mode: clients stop taking requests after this
    request_timeout_s: float = 180.0
    seed: int = 0


@dataclass(frozen=True)
class CompareConfig:
    """The comparison: load cells (mix x clients), llama-server settings, the stall test."""

    clients: tuple[int, ...] = (1, 4, 8)
    mixes: tuple[str, ...] = MIXES
    requests_per_client: int = 2  # a cell sends max(min_requests, requests_per_client x clients) requests
    min_requests: int = 4
    max_tokens: int = 64
    # Nine handbook sections plus the first line: ~420 tokens of system prompt (SmolLM2's tokenizer).
    system_sections: int = 9
    np_values: tuple[int, ...] = (1, 4, 8)  # llama-server -np (slots)
    threads: tuple[int, ...] = (1, 2)  # llama-server -t (-tb follows it)
    # Tokens of context per llama-server slot; -c is np x this, since llama-server splits -c across
    # its slots. 2,560 holds the stall test's ~2,050-token prompt with its chat template.
    slot_context: int = 2560
    cell_seconds: float = 120.0  # clients start no request after this long into a cell
    request_timeout_s: float = 120.0  # a stream still open this long after its send is cut (a timeout)
    stall: bool = True
    stall_tokens: int = 256  # the long reply whose gaps are watched
    stall_prompt_sections: int = 43  # the long prompt: ~2,000 tokens of unique text
    stall_lead_chunks: int = 8  # content chunks of the long reply before the long prompt is sent
    ready_timeout_s: float = 600.0  # the app's load and compile; llama-server's load
    seed: int = 0

    def requests_in_cell(self, clients: int) -> int:
        return max(self.min_requests, self.requests_per_client * clients)


@dataclass(frozen=True)
class LlamaSetting:
    """One llama-server process: its slots (-np) and threads (-t)."""

    np: int
    threads: int

    @property
    def label(self) -> str:
        return f"-np {self.np} -t {self.threads}"

    def flags(self, slot_context: int) -> list[str]:
        """Its flags: -c is np x ``slot_context``, as llama-server gives each slot -c / np tokens."""
        return ["-c", str(self.np * slot_context), "-t", str(self.threads), "-np", str(self.np), "--no-webui"]

    def command(self, binary: Path | str, gguf: Path | str, port: int, slot_context: int) -> list[str]:
        return [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), *self.flags(slot_context)]


@dataclass(frozen=True)
class LlamaRun:
    """One llama-server process of the comparison and what it measures."""

    setting: LlamaSetting
    load: bool  # the load cells
    stall: bool  # the stall test (needs two slots, so that both requests run at once)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # a kill stops the servers we started, as Ctrl-C does
    try:
        if args.compare_llama_server:
            return compare(compare_config(args), args.app_args, args.llama_server, args.name or "server_bench_compare")
        return rest_load(args)
    except KeyboardInterrupt as exc:  # the with-blocks have stopped every server this run started
        print(f"interrupted ({str(exc) or 'Ctrl-C'}); the servers this run started are stopped", file=sys.stderr, flush=True)
        return 130


# ---------------------------------------------------------------------- REST mode


def rest_load(args: argparse.Namespace) -> int:
    """The REST load against one app (launched or running): prefix cache on, then off."""
    cfg = load_config(args)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("on", "off") for m in modes):
        raise SystemExit("--modes is a comma-separated list of 'on' and 'off'")
    name = args.name or "server_bench"
    t_start = time.perf_counter()
    app = launch_app(args.app_args) if args.launch else _existing(args.url)
    with app as url:
        check_loopback(url)
        with httpx.Client(base_url=url, timeout=30, trust_env=False) as http:
            health = wait_ready(http, args.ready_timeout, app.alive)
        info = machine_info(health.get("device"), app_fields(health) | {"url": url, "launched": args.launch})
        print_machine_info(info)
        results: dict[str, Any] = {"name": name, "machine": info, "config": asdict(cfg), "modes": {}}
        for mode in modes:
            print(f"[{mode}] {cfg.requests} requests, {cfg.clients} clients, prefix cache {mode} (load {_loadavg()})", flush=True)
            results["modes"][mode] = run_load(url, cfg, prefix_cache=(mode == "on"))
            _print_mode(mode, results["modes"][mode])
    results["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results["wall_s"] = time.perf_counter() - t_start
    markdown = render_markdown(results)
    print()
    print(markdown)
    summary = summary_of(results)
    paths = write_results(name, results | {"summary": summary}, markdown)
    print("\nwrote " + ", ".join(str(p) for p in paths))
    print(json.dumps(summary))
    errors = sum(m["errors"] for m in results["modes"].values())
    return 1 if errors else 0


def load_config(args: argparse.Namespace) -> LoadConfig:
    """The REST load's settings from the command line (one client count), checked."""
    if len(args.clients or [LoadConfig.clients]) != 1:
        raise SystemExit("--clients takes one number without --compare-llama-server")
    cfg = LoadConfig(
        clients=(args.clients or [LoadConfig.clients])[0],
        requests=args.requests,
        shared_fraction=args.shared_fraction,
        max_new_tokens=args.max_tokens or LoadConfig.max_new_tokens,
        max_seconds=args.max_seconds or LoadConfig.max_seconds,
        system_sections=args.system_sections or LoadConfig.system_sections,
        seed=args.seed,
    )
    _check_bounds(cfg)
    return cfg


# ---------------------------------------------------------------------- the comparison


def compare(cfg: CompareConfig, app_args: list[str], llama_binary: str | None, name: str) -> int:
    """This app, then llama-server at each setting, on the same cells; the tables, chart and JSON."""
    t_start = time.perf_counter()
    binary, why_not = find_llama_server(llama_binary)
    gguf = _bundled_gguf()
    plan = plan_llama_runs(cfg)
    info = machine_info(None, {"llama_server": str(binary) if binary else None, "llama_server_version": llama_server_version(binary) if binary else None, "gguf": str(gguf) if gguf else None})
    info["llama_server_settings"] = [" ".join(run.setting.flags(cfg.slot_context)) for run in plan] if binary else []
    print_machine_info(info)
    results: dict[str, Any] = {"name": name, "machine": info, "config": asdict(cfg), "runs": []}
    if binary is None or gguf is None:
        results["llama_server_missing"] = why_not or "the bundled GGUF is not installed (llama-server needs it as its model)"
        print(f"llama-server: not run, only this app is measured: {results['llama_server_missing']}", flush=True)
        plan = []
    else:
        print(f"llama-server {info['llama_server_version']} ({binary}); settings: " + ", ".join(info["llama_server_settings"]), flush=True)

    results["runs"].append(app_run(cfg, app_args, info))
    for run in plan:
        results["runs"].append(llama_run(cfg, binary, gguf, run))

    results["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results["wall_s"] = time.perf_counter() - t_start
    results["comparison"] = compare_cells(results["runs"], cfg.mixes, cfg.clients)
    markdown = render_compare_markdown(results)
    print()
    print(markdown)
    summary = compare_summary(results)
    paths = write_results(name, results | {"summary": summary}, markdown, make_compare_figure(results))
    print("\nwrote " + ", ".join(str(p) for p in paths))
    print(json.dumps(summary))
    return 1 if summary["errors"] or any(run.get("error") for run in results["runs"]) else 0


def compare_config(args: argparse.Namespace) -> CompareConfig:
    """The comparison's settings from the command line, checked."""
    mixes = tuple(m.strip() for m in args.mixes.split(",") if m.strip())
    if not mixes or any(m not in MIXES for m in mixes) or len(set(mixes)) != len(mixes):
        raise SystemExit(f"--mixes is a comma-separated list of {' and '.join(MIXES)}, got {args.mixes!r}")
    defaults = CompareConfig()
    cfg = CompareConfig(
        clients=tuple(args.clients or defaults.clients),
        mixes=mixes,
        requests_per_client=args.requests_per_client,
        min_requests=args.min_requests,
        max_tokens=args.max_tokens or defaults.max_tokens,
        system_sections=args.system_sections or defaults.system_sections,
        np_values=tuple(args.np),
        threads=tuple(args.threads),
        slot_context=args.slot_context,
        cell_seconds=args.max_seconds or defaults.cell_seconds,
        request_timeout_s=args.request_timeout,
        stall=args.stall,
        stall_tokens=args.stall_tokens,
        ready_timeout_s=args.ready_timeout,
        seed=args.seed,
    )
    _check_compare_bounds(cfg)
    return cfg


def plan_llama_runs(cfg: CompareConfig) -> list[LlamaRun]:
    """One llama-server process per -t x -np setting, threads outermost. The stall test runs in every
    one with two slots or more; when none has, one -np 2 process per thread setting is added for it."""
    runs = [LlamaRun(LlamaSetting(np, t), load=True, stall=cfg.stall and np >= 2) for t in cfg.threads for np in cfg.np_values]
    if cfg.stall and not any(run.stall for run in runs):
        runs += [LlamaRun(LlamaSetting(2, t), load=False, stall=True) for t in cfg.threads]
    return runs


def find_llama_server(override: str | None = None) -> tuple[Path | None, str | None]:
    """llama-server's binary: ``--llama-server``, else KVCI_LLAMA_SERVER, else dev.py's build; or (None, why)."""
    chosen = override or os.environ.get("KVCI_LLAMA_SERVER")
    if chosen:
        return (Path(chosen), None) if os.access(chosen, os.X_OK) else (None, f"{chosen} is not an executable file")
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    import dev  # standard library only: where dev.py builds llama-server

    binary = dev.llama_server_binary()
    return (binary, None) if binary else (None, dev.llama_server_not_built_reason())


def llama_server_version(binary: Path) -> str:
    """``llama-server --version``'s version, e.g. '0.5.0-dev (build 1, commit 0c1e570)'."""
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"
    lines = [line.strip() for line in (out.stdout + out.stderr).splitlines() if line.strip().startswith("version:")]
    return lines[0][len("version:") :].strip() if lines else "unknown"


def app_run(cfg: CompareConfig, app_args: list[str], info: dict[str, Any]) -> dict[str, Any]:
    """Launch this app, wait for its compile, run the cells and the stall test; a failed start is recorded."""
    setting = " ".join(app_args) or "defaults"
    about = {"app_args": app_args}
    try:
        app = launch_app(app_args)
        with app as url:
            with httpx.Client(base_url=url, timeout=30, trust_env=False) as http:
                health = wait_ready(http, cfg.ready_timeout_s, app.alive)
            fields = app_fields(health)
            info.update({"app_" + k: v for k, v in fields.items()} | {"device": health.get("device")})
            print("app: " + " | ".join(f"{k}={v}" for k, v in fields.items()), flush=True)
            return measure_server("app", setting, url, cfg, load=True, stall=cfg.stall) | about | {"health": fields}
    except (SystemExit, httpx.HTTPError) as exc:  # it did not start, or stopped answering: the run goes on with llama-server
        print(f"[app] not measured: {exc}", flush=True)
        return {"server": "app", "setting": setting, "error": str(exc), "cells": [], "stall": None} | about


def llama_run(cfg: CompareConfig, binary: Path, gguf: Path, run: LlamaRun) -> dict[str, Any]:
    """Launch llama-server at one setting, wait for /health 200, run its share; a failed start is recorded."""
    about = {"np": run.setting.np, "threads": run.setting.threads, "flags": run.setting.flags(cfg.slot_context), "stall_only": not run.load}
    server = launch_llama_server(binary, gguf, run.setting, cfg.slot_context)
    try:
        with server as url:
            with httpx.Client(base_url=url, timeout=30, trust_env=False) as http:
                wait_llama_ready(http, cfg.ready_timeout_s, server.alive)
            return measure_server("llama-server", run.setting.label, url, cfg, load=run.load, stall=run.stall) | about
    except (SystemExit, httpx.HTTPError) as exc:  # the next setting still runs
        print(f"[llama-server {run.setting.label}] not measured: {exc}", flush=True)
        return {"server": "llama-server", "setting": run.setting.label, "error": str(exc), "cells": [], "stall": None} | about


def measure_server(server: str, setting: str, url: str, cfg: CompareConfig, load: bool, stall: bool) -> dict[str, Any]:
    """One warm-up request, then the cells (mix x clients) and the stall test against one server."""
    tag = f"[{server} {setting}]"
    with httpx.Client(base_url=url, timeout=30, trust_env=False) as http:
        model = served_model(http)
    run: dict[str, Any] = {"server": server, "setting": setting, "model": model, "loadavg_start": _loadavg(), "cells": [], "stall": None, "error": None}
    # 1. warm-up: a prompt no cell shares, the same on every server
    with httpx.Client(base_url=url, trust_env=False) as http:
        run["warmup"] = stream_stats(stream_chat(http, chat_body(model, None, "Warm-up: say hello.", 8), cfg.request_timeout_s))
    # 2. the load cells
    if load:
        for mix in cfg.mixes:
            for clients in cfg.clients:
                bodies = chat_requests(cfg, mix, clients, model)
                print(f"{tag} {mix}, {clients} clients, {len(bodies)} requests (load {_loadavg()})", flush=True)
                cell = {"mix": mix, "clients": clients} | run_cell(url, bodies, clients, cfg)
                _print_cell(cell)
                run["cells"].append(cell)
    # 3. the stall test
    if stall:
        print(f"{tag} stall: a {cfg.stall_tokens}-token reply alone, then beside a long prompt (load {_loadavg()})", flush=True)
        run["stall"] = run_stall(url, model, cfg)
        _print_stall(run["stall"])
    run["loadavg_end"] = _loadavg()
    return run


def served_model(http: httpx.Client) -> str:
    """The first model of ``GET /v1/models``: the name both servers are asked for."""
    data = http.get("/v1/models").json().get("data") or []
    if not data:
        raise SystemExit(f"{http.base_url}/v1/models lists no model")
    return data[0]["id"]


# ---------------------------------------------------------------------- the streaming client


def parse_sse_line(line: str) -> dict[str, Any] | str | None:
    """One line of a server-sent event stream: the JSON object of a ``data:`` line, :data:`DONE` for
    ``data: [DONE]``, None for anything else (the blank line between events, ``: ping`` comments,
    ``event:`` and ``id:`` fields), so that a stream's keep-alives are not taken for tokens.

    Raises ``ValueError`` for a data line that is not a JSON object (a broken stream, counted as an error).
    """
    if not line.startswith("data:"):
        return None
    payload = line[len("data:") :].strip()  # SSE allows one space after the colon; servers send one
    if not payload:
        return None
    if payload == DONE:
        return DONE
    event = json.loads(payload)  # json.JSONDecodeError is a ValueError
    if not isinstance(event, dict):
        raise ValueError(f"a data line that is not a JSON object: {payload[:80]}")
    return event


@dataclass
class StreamRecord:
    """What one streamed chat completion returned, with the client's clock at each content chunk."""

    t_send: float  # time.perf_counter() when the request was sent
    status: int | None = None
    chunk_times: list[float] = field(default_factory=list)  # at each chunk whose delta has content
    text: str = ""
    t_end: float | None = None  # at the last data line ([DONE] included)
    done: bool = False  # data: [DONE] arrived
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # the server's own fields: llama-server's timings, this app's kvci
    error: str | None = None
    error_kind: str | None = None  # http, timeout, dropped, stream_error


def collect_stream(record: StreamRecord, timed_lines: Iterable[tuple[float, str]]) -> StreamRecord:
    """Fill ``record`` from an SSE body's (client time, line) pairs, up to ``data: [DONE]``.

    A content chunk is one whose first choice's delta has non-empty ``content`` (the opening role
    chunk and the closing finish and usage chunks are not). Fields outside OpenAI's chunk are kept
    as they come, the latest value winning (llama-server repeats ``timings`` on its last chunks).
    A body that ends without ``[DONE]`` is a dropped stream.
    """
    for now, line in timed_lines:
        event = parse_sse_line(line)
        if event is None:
            continue
        record.t_end = now
        if event == DONE:
            record.done = True
            break
        if "error" in event:  # an error after the 200: the headers were sent, so it comes in the stream
            record.error, record.error_kind = f"in the stream: {json.dumps(event['error'])[:200]}", "stream_error"
            break
        for choice in event.get("choices") or []:
            content = (choice.get("delta") or {}).get("content")
            if content:
                record.chunk_times.append(now)
                record.text += content
            record.finish_reason = choice.get("finish_reason") or record.finish_reason
        if event.get("usage"):
            record.usage = event["usage"]
        record.extra.update({k: v for k, v in event.items() if k not in OPENAI_CHUNK_FIELDS and v is not None})
    if not record.done and record.error is None:
        record.error, record.error_kind = "the stream ended without data: [DONE]", "dropped"
    return record


def stream_chat(http: httpx.Client, body: dict[str, Any], timeout_s: float, record: StreamRecord | None = None) -> StreamRecord:
    """POST one streaming chat completion and time its chunks; never raises: errors are recorded.

    ``record`` (optional) is filled while the stream runs, so another thread can watch its chunks.
    A stream still open ``timeout_s`` after its send is cut and recorded as a timeout.
    """
    record = record or StreamRecord(t_send=time.perf_counter())
    record.t_send = time.perf_counter()
    try:
        with http.stream("POST", "/v1/chat/completions", json=body, timeout=httpx.Timeout(timeout_s, connect=10.0)) as response:
            record.status = response.status_code
            if response.status_code != 200:
                response.read()
                record.error, record.error_kind = f"HTTP {response.status_code}: {response.text[:200]}", "http"
                return record
            collect_stream(record, _timed_lines(response, record.t_send + timeout_s))
    except (_Deadline, httpx.TimeoutException) as exc:
        record.error, record.error_kind = f"cut after {timeout_s:.0f} s ({type(exc).__name__})", "timeout"
    except httpx.HTTPError as exc:  # a refused or dropped connection
        record.error, record.error_kind = repr(exc)[:200], "dropped"
    except ValueError as exc:  # a data line that is not JSON
        record.error, record.error_kind = f"unreadable stream: {exc}"[:200], "stream_error"
    return record


def chat_body(model: str, system: str | None, user: str, max_tokens: int) -> dict[str, Any]:
    """The one request shape sent to both servers: greedy, streamed, with the usage chunk."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}


# ---------------------------------------------------------------------- per stream, per cell


def inter_chunk_gaps(times: list[float]) -> list[float]:
    """Gaps between consecutive content chunks (seconds)."""
    return [b - a for a, b in zip(times, times[1:])]


def longest_gap_within(times: list[float], start: float, end: float) -> float | None:
    """The longest gap between consecutive chunks that overlaps [start, end] (seconds), or None.

    A gap that began before ``start`` or ended after ``end`` counts: a stream stalled by a prefill
    that ran from ``start`` to ``end`` shows its stall as one gap spanning that window.
    """
    gaps = [b - a for a, b in zip(times, times[1:]) if b > start and a < end]
    return max(gaps) if gaps else None


def completion_tokens(record: StreamRecord) -> tuple[int, str]:
    """The reply's token count and where it came from: ``usage.completion_tokens`` when the server sent
    it, else the number of content chunks (a server may merge tokens into one chunk, or hold one back)."""
    if record.usage and isinstance(record.usage.get("completion_tokens"), int):
        return record.usage["completion_tokens"], "usage"
    return len(record.chunk_times), "chunks"


def stream_stats(record: StreamRecord) -> dict[str, Any]:
    """One request's figures: TTFT (send to first content chunk), tokens, the longest and median gap
    between content chunks, its decode tok/s (tokens after the first over the first-to-last chunk
    time), and what the server sent beside them (usage, llama-server's timings, this app's fields)."""
    times = record.chunk_times
    gaps = inter_chunk_gaps(times)
    tokens, source = completion_tokens(record)
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    usage = record.usage or {}
    return {
        "ok": record.error is None,
        "status": record.status,
        "error": record.error,
        "error_kind": record.error_kind,
        "ttft_ms": (times[0] - record.t_send) * 1000 if times else None,
        "latency_ms": ((record.t_end or record.t_send) - record.t_send) * 1000,
        "completion_tokens": tokens,
        "token_source": source,
        "chunks": len(times),
        "max_gap_ms": max(gaps) * 1000 if gaps else None,
        "median_gap_ms": statistics.median(gaps) * 1000 if gaps else None,
        "decode_tok_s": (tokens - 1) / span if tokens > 1 and span > 0 else None,
        "prompt_tokens": usage.get("prompt_tokens"),
        "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
        "finish_reason": record.finish_reason,
        "usage": record.usage,
        "extra": record.extra,
        "text": record.text,
    }


def summarize_cell(stats: list[dict[str, Any]], wall_s: float, planned: int) -> dict[str, Any]:
    """A cell's figures over its requests: output tok/s and requests/s over the cell's wall time (only
    completed requests count), TTFT p50/p95, the longest gap in any stream, the mean of the streams'
    decode tok/s, errors by kind, and where the token counts came from."""
    ok = [s for s in stats if s["ok"]]
    tokens = sum(s["completion_tokens"] for s in ok)
    ttfts = [s["ttft_ms"] for s in ok if s["ttft_ms"] is not None]
    decodes = [s["decode_tok_s"] for s in ok if s["decode_tok_s"] is not None]
    gaps = [s["max_gap_ms"] for s in ok if s["max_gap_ms"] is not None]
    sources = sorted({s["token_source"] for s in ok})
    return {
        "planned": planned,
        "sent": len(stats),
        "completed": len(ok),
        "errors": len(stats) - len(ok),
        "not_sent": planned - len(stats),  # left when the cell's time bound ran out
        "errors_by_kind": dict(Counter(s["error_kind"] for s in stats if not s["ok"])),
        "error_samples": sorted({s["error"] for s in stats if not s["ok"]})[:5],
        "wall_s": wall_s,
        "completion_tokens": tokens,
        "out_tok_s": tokens / wall_s if wall_s > 0 else 0.0,
        "requests_per_sec": len(ok) / wall_s if wall_s > 0 else 0.0,
        "ttft_p50_ms": percentile(ttfts, 50),
        "ttft_p95_ms": percentile(ttfts, 95),
        "max_gap_ms": max(gaps) if gaps else None,
        "decode_tok_s_mean": statistics.fmean(decodes) if decodes else None,
        "token_source": sources[0] if len(sources) == 1 else ("mixed" if sources else None),
        "prompt_tokens_mean": _mean([s["prompt_tokens"] for s in ok]),
        "cached_tokens_mean": _mean([s["cached_tokens"] for s in ok]),
    }


def best_llama_cell(runs: list[dict[str, Any]], mix: str, clients: int) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """llama-server's best setting for one cell: the (run, cell) with the highest output tok/s among
    the settings that completed a request; the first such setting on a tie; None if there is none."""
    best = None
    for run in runs:
        if run["server"] != "llama-server":
            continue
        for cell in run["cells"]:
            if cell["mix"] == mix and cell["clients"] == clients and cell["completed"] and (best is None or cell["out_tok_s"] > best[1]["out_tok_s"]):
                best = (run, cell)
    return best


def compare_cells(runs: list[dict[str, Any]], mixes: Iterable[str], clients: Iterable[int]) -> list[dict[str, Any]]:
    """For each mix x clients: this app's cell, llama-server's best setting and the app / llama-server ratio of output tok/s."""
    rows = []
    app = next((run for run in runs if run["server"] == "app"), None)
    for mix in mixes:
        for n in clients:
            mine = next((c for c in (app or {}).get("cells", []) if c["mix"] == mix and c["clients"] == n), None)
            best = best_llama_cell(runs, mix, n)
            theirs = best[1] if best else None
            ratio = mine["out_tok_s"] / theirs["out_tok_s"] if mine and mine["completed"] and theirs and theirs["out_tok_s"] > 0 else None
            rows.append(
                {
                    "mix": mix,
                    "clients": n,
                    "app_tok_s": mine["out_tok_s"] if mine else None,
                    "app_ttft_p50_ms": mine["ttft_p50_ms"] if mine else None,
                    "llama_best": best[0]["setting"] if best else None,
                    "llama_tok_s": theirs["out_tok_s"] if theirs else None,
                    "llama_ttft_p50_ms": theirs["ttft_p50_ms"] if theirs else None,
                    "ratio": ratio,
                }
            )
    return rows


# ---------------------------------------------------------------------- the load cells and the stall test


def chat_requests(cfg: CompareConfig, mix: str, clients: int, model: str) -> list[dict[str, Any]]:
    """The seeded bodies of one cell, the same on every server and setting. ``shared``: one system
    prompt (new for each cell, so every cell starts cold) and a distinct question each; ``unique``: a
    system prompt with a distinct first line each, so no two share more than the chat template's opening."""
    rng = random.Random(f"{cfg.seed}/{mix}/{clients}")
    shared = shared_system_prompt(cfg.system_sections, desk=f"{rng.getrandbits(32):08x}")
    bodies = []
    for i in range(cfg.requests_in_cell(clients)):
        system = shared if mix == "shared" else unique_system_prompt(rng, cfg.system_sections)
        bodies.append(chat_body(model, system, question(i), cfg.max_tokens))
    return bodies


def run_cell(url: str, bodies: list[dict[str, Any]], clients: int, cfg: CompareConfig) -> dict[str, Any]:
    """``clients`` threads take the bodies in order, back to back, until they run out or the cell's
    time bound passes; returns :func:`summarize_cell` with every request's figures."""
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for body in bodies:
        todo.put(body)
    stats: list[dict[str, Any]] = []
    lock = threading.Lock()
    deadline = time.monotonic() + cfg.cell_seconds

    def client() -> None:
        with httpx.Client(base_url=url, trust_env=False) as http:
            for body in _drain(todo, deadline):
                one = stream_stats(stream_chat(http, body, cfg.request_timeout_s))
                with lock:
                    stats.append(one)

    t0 = time.perf_counter()
    # Daemon threads: on Ctrl-C the main thread leaves at once and stops the servers; these then fail fast.
    threads = [threading.Thread(target=client, name=f"client-{i}", daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summarize_cell(stats, time.perf_counter() - t0, len(bodies)) | {"requests": stats}


def run_stall(url: str, model: str, cfg: CompareConfig) -> dict[str, Any]:
    """A long reply alone, then the same length again with a long prompt (max_tokens 1) sent once it
    is streaming: how long the running stream stalls while a newcomer's prompt is prefilled."""
    rng = random.Random(f"{cfg.seed}/stall")
    with httpx.Client(base_url=url, trust_env=False) as http:
        alone = stream_chat(http, long_reply_body(model, rng, cfg), cfg.request_timeout_s)
    running = StreamRecord(t_send=time.perf_counter())
    reply_body, prompt_body = long_reply_body(model, rng, cfg), long_prompt_body(model, rng, cfg)

    def stream_reply() -> None:
        with httpx.Client(base_url=url, trust_env=False) as http:
            stream_chat(http, reply_body, cfg.request_timeout_s, record=running)

    reader = threading.Thread(target=stream_reply, name="stall-reply", daemon=True)
    reader.start()
    deadline = time.monotonic() + cfg.request_timeout_s
    while len(running.chunk_times) < cfg.stall_lead_chunks and reader.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    with httpx.Client(base_url=url, trust_env=False) as http:
        prompt = stream_chat(http, prompt_body, cfg.request_timeout_s)
    reader.join()
    return stall_figures(alone, running, prompt)


def stall_figures(alone: StreamRecord, running: StreamRecord, prompt: StreamRecord) -> dict[str, Any]:
    """The stall test's figures. The prefill window runs from the long prompt's send to its first
    content chunk (its end, if it sent none): the running stream's longest gap overlapping it, beside
    the same stream's median and longest gap with nobody else."""
    start = prompt.t_send
    end = prompt.chunk_times[0] if prompt.chunk_times else (prompt.t_end or prompt.t_send)
    alone_gaps = inter_chunk_gaps(alone.chunk_times)
    during = longest_gap_within(running.chunk_times, start, end)
    return {
        "alone_median_gap_ms": statistics.median(alone_gaps) * 1000 if alone_gaps else None,
        "alone_max_gap_ms": max(alone_gaps) * 1000 if alone_gaps else None,
        "alone_tokens": completion_tokens(alone)[0],
        "during_prefill_max_gap_ms": during * 1000 if during is not None else None,
        "prefill_window_ms": (end - start) * 1000,
        "prompt_tokens": (prompt.usage or {}).get("prompt_tokens"),
        "running_tokens": completion_tokens(running)[0],
        "running_chunks_before_prompt": sum(t < start for t in running.chunk_times),
        "running_outlived_prefill": bool(running.chunk_times) and running.chunk_times[-1] > end,  # else its gaps cover only part of the window
        "errors": [f"{name}: {r.error}" for name, r in (("alone", alone), ("running", running), ("prompt", prompt)) if r.error],
        "running_chunk_ms": [round((t - start) * 1000, 1) for t in running.chunk_times],  # relative to the long prompt's send
        "prompt_extra": prompt.extra,
    }


def long_reply_body(model: str, rng: random.Random, cfg: CompareConfig) -> dict[str, Any]:
    """A short, unique request for a long answer (``stall_tokens``; greedy SmolLM2 rarely stops early)."""
    user = f"Request {rng.getrandbits(48):012x}. Write a long, detailed, numbered guide to running a fleet of warehouse robots: charging, safety, firmware updates, support tickets, billing and data, with an example for every point."
    return chat_body(model, None, user, cfg.stall_tokens)


def long_prompt_body(model: str, rng: random.Random, cfg: CompareConfig) -> dict[str, Any]:
    """~2,000 tokens of text behind a unique first line (nothing to reuse), one token of reply."""
    user = f"Case {rng.getrandbits(48):012x}: a new document follows.\n\n" + handbook_text(cfg.stall_prompt_sections) + "\n\nIn one word, what is it about?"
    return chat_body(model, None, user, 1)


def shared_system_prompt(sections: int, desk: str | None = None) -> str:
    """The shared system prompt: a fixed first line (naming ``desk``, when given) and the handbook."""
    who = "You are the support assistant of Acme Robotics" + (f", desk {desk}" if desk else "")
    return f"{who}.\n\n" + handbook_text(sections)


def unique_system_prompt(rng: random.Random, sections: int) -> str:
    """A system prompt as long as the shared one whose unique first line makes every token after the chat template's opening differ."""
    return f"Case {rng.getrandbits(48):012x}: answer as the Acme support team.\n\n" + handbook_text(sections)


# ---------------------------------------------------------------------- the servers


def check_loopback(url: str) -> None:
    """Raise ``SystemExit`` unless ``url`` is http(s) on a loopback address (this is a load generator)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SystemExit(f"--url must be http://127.0.0.1:PORT or similar, got {url!r}")
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(parts.hostname, parts.port or 80, proto=socket.IPPROTO_TCP)}
    except socket.gaierror as exc:
        raise SystemExit(f"cannot resolve {parts.hostname!r}: {exc}") from None
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise SystemExit(f"refusing {url}: server_bench only targets loopback addresses (127.0.0.1, ::1, localhost), and {parts.hostname} is {sorted(addresses)}")


class launch_process:
    """Start a server on a free loopback port in its own process group; stop the group on exit.

    The ``with`` block exits on a normal end, an error or Ctrl-C alike, and stopping the group also
    stops anything the server started. Output goes to ``benchmark/results/<log_name>`` (ignored by git).
    """

    name = "the server"

    def __init__(self, log_name: str) -> None:
        self.log_path = REPO_ROOT / "benchmark" / "results" / log_name
        self.proc: subprocess.Popen | None = None
        self.command_line: list[str] = []

    def command(self, port: int) -> list[str]:
        raise NotImplementedError

    def __enter__(self) -> str:
        port = _free_port()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "w")
        self.command_line = self.command(port)
        print(f"launching: {' '.join(self.command_line)} (log: {self.log_path})", flush=True)
        self.proc = subprocess.Popen(self.command_line, cwd=REPO_ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        return f"http://127.0.0.1:{port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        self.log.close()
        print(f"stopped {self.name} (exit code {self.proc.returncode})", flush=True)


class launch_app(launch_process):
    """``python app.py --host 127.0.0.1 --port <free>`` from the repository (log: ``server_bench_app.log.tmp``)."""

    name = "the app"

    def __init__(self, extra_args: list[str]) -> None:
        super().__init__("server_bench_app.log.tmp")
        self.extra_args = extra_args

    def command(self, port: int) -> list[str]:
        return [sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port), *self.extra_args]


class launch_llama_server(launch_process):
    """llama-server on the GGUF at one setting (log: ``server_bench_llama_server.log.tmp``)."""

    name = "llama-server"

    def __init__(self, binary: Path, gguf: Path, setting: LlamaSetting, slot_context: int) -> None:
        super().__init__("server_bench_llama_server.log.tmp")
        self.binary, self.gguf, self.setting, self.slot_context = binary, gguf, setting, slot_context

    def command(self, port: int) -> list[str]:
        return self.setting.command(self.binary, self.gguf, port, self.slot_context)


class _existing:
    def __init__(self, url: str | None) -> None:
        if not url:
            raise SystemExit("pass --url http://127.0.0.1:PORT of a running app, or --launch to start one")
        self.url = url.rstrip("/")

    def __enter__(self) -> str:
        check_loopback(self.url)  # before the first request
        return self.url

    def alive(self) -> bool:
        return True

    def __exit__(self, *exc: object) -> None:
        pass


def wait_ready(http: httpx.Client, timeout_s: float, alive: Any = lambda: True) -> dict[str, Any]:
    """Poll ``GET /health`` until the model is loaded and the background compile of its decode step
    has ended (compiled or eager), as the other benchmarks do; return the health body.

    Measuring beside the compile would time a step that switches from eager to compiled midway,
    with the compile holding a core."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        if not alive():
            raise SystemExit(f"the app exited before it was ready; see benchmark/results/server_bench_app.log.tmp (last /health: {last})")
        try:
            response = http.get("/health")
            if response.status_code == 200:
                last = response.json()
                if last.get("ready") and (last.get("decode") or {}).get("state") != "compiling":
                    return last
                if last.get("error"):
                    raise SystemExit(f"the app failed to load its model: {last['error']}")
        except httpx.TransportError as exc:
            last = repr(exc)
        time.sleep(0.5)
    raise SystemExit(f"the app was not ready within {timeout_s:.0f} s (last /health: {last})")


def wait_llama_ready(http: httpx.Client, timeout_s: float, alive: Any = lambda: True) -> None:
    """Poll llama-server's ``GET /health`` until it answers 200 (503 while the model loads)."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        if not alive():
            raise SystemExit(f"llama-server exited before it was ready; see benchmark/results/server_bench_llama_server.log.tmp (last /health: {last})")
        try:
            response = http.get("/health")
            if response.status_code == 200:
                return
            last = f"{response.status_code} {response.text[:100]}"
        except httpx.TransportError as exc:
            last = repr(exc)
        time.sleep(0.3)
    raise SystemExit(f"llama-server was not healthy within {timeout_s:.0f} s (last /health: {last})")


def app_fields(health: dict[str, Any]) -> dict[str, Any]:
    """What the app's /health says about what it runs: model, weights, decode step, dtype."""
    decode = (health.get("decode") or {}).get("description") or "transformers' step"
    return {"model": health.get("model"), "weights": health.get("weights"), "decode_step": decode, "dtype": health.get("dtype")}


# ---------------------------------------------------------------------- the REST load


def make_requests(cfg: LoadConfig, prefix_cache: bool) -> list[dict[str, Any]]:
    """The seeded request mix: the same prompts in the same order for every mode."""
    rng = random.Random(cfg.seed)
    shared_system = shared_system_prompt(cfg.system_sections)
    requests = []
    for i in range(cfg.requests):
        shared = rng.random() < cfg.shared_fraction
        system = shared_system if shared else unique_system_prompt(rng, cfg.system_sections)
        body = {"prompt": question(i), "system_prompt": system, "max_new_tokens": cfg.max_new_tokens, "use_cache": True, "use_prefix_cache": prefix_cache, "temperature": 0.0}
        requests.append({"kind": "shared" if shared else "unique", "body": body})
    return requests


def run_load(url: str, cfg: LoadConfig, prefix_cache: bool) -> dict[str, Any]:
    """Clear the cache, send the mix from ``cfg.clients`` threads, and summarize what came back."""
    with httpx.Client(base_url=url, timeout=30, trust_env=False) as http:
        cleared = http.post("/cache/clear")
        clear_status = cleared.status_code
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for item in make_requests(cfg, prefix_cache):
        todo.put(item)
    records: list[dict[str, Any]] = []
    lock = threading.Lock()
    deadline = time.monotonic() + cfg.max_seconds

    def client() -> None:
        with httpx.Client(base_url=url, timeout=cfg.request_timeout_s, trust_env=False) as http:
            for item in _drain(todo, deadline):
                records_item = send(http, item)
                with lock:
                    records.append(records_item)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, name=f"client-{i}") for i in range(cfg.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    with httpx.Client(base_url=url, timeout=30, trust_env=False) as http:
        stats = http.get("/cache/stats").json()
    return summarize_load(records, elapsed, cfg.requests, stats, clear_status)


def send(http: httpx.Client, item: dict[str, Any]) -> dict[str, Any]:
    """One POST /generate; never raises (errors are counted, not fatal)."""
    t0 = time.perf_counter()
    record: dict[str, Any] = {"kind": item["kind"]}
    try:
        response = http.post("/generate", json=item["body"])
        record["client_ms"] = (time.perf_counter() - t0) * 1000
        record["status"] = response.status_code
        if response.status_code == 200:
            body = response.json()
            record |= {
                "cache_status": body["cache_status"],
                "wall_ttft_ms": body["timings"]["wall_ttft_ms"],
                "latency_ms": body["latency_ms"],
                "prompt_tokens": body["timings"]["prompt_tokens"],
                "reused_tokens": body["timings"]["prefix_tokens_saved"],
                "new_tokens": body["timings"]["new_tokens"],
            }
        else:
            record["error"] = response.text[:200]
    except httpx.HTTPError as exc:
        record |= {"client_ms": (time.perf_counter() - t0) * 1000, "status": None, "error": repr(exc)[:200]}
    return record


def summarize_load(records: list[dict[str, Any]], elapsed_s: float, planned: int, stats: dict[str, Any], clear_status: int) -> dict[str, Any]:
    ok = [r for r in records if r.get("status") == 200]
    out: dict[str, Any] = {
        "planned": planned,
        "sent": len(records),
        "completed": len(ok),
        "errors": len(records) - len(ok),
        "not_sent": planned - len(records),  # left when the time bound ran out
        "error_samples": sorted({str(r.get("status")) + ": " + r.get("error", "") for r in records if r.get("status") != 200})[:5],
        "elapsed_s": elapsed_s,
        "requests_per_sec": len(ok) / elapsed_s if elapsed_s > 0 else 0.0,
        "hit_rate": sum(r["cache_status"] in ("hit", "partial") for r in ok) / len(ok) if ok else 0.0,
        "reused_token_share": sum(r["reused_tokens"] for r in ok) / max(1, sum(r["prompt_tokens"] for r in ok)),
        "statuses": {s: sum(r["cache_status"] == s for r in ok) for s in sorted({r["cache_status"] for r in ok})},
        "server_cache_stats": stats,
        "cache_clear_status": clear_status,
        "by_kind": {},
    }
    for kind, group in (("all", ok), ("shared", [r for r in ok if r["kind"] == "shared"]), ("unique", [r for r in ok if r["kind"] == "unique"])):
        out["by_kind"][kind] = {
            "n": len(group),
            **{f"{metric}_{p}": percentile([r[metric] for r in group], q) for metric in ("wall_ttft_ms", "latency_ms", "client_ms") for p, q in (("p50", 50), ("p95", 95))},
        }
    return out


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


# ---------------------------------------------------------------------- reporting: the comparison


def render_compare_markdown(results: dict[str, Any]) -> str:
    """The machine and every setting tried, all cells, this app against llama-server's best, the stall test."""
    m, cfg = results["machine"], results["config"]
    runs = results["runs"]
    app = next((run for run in runs if run["server"] == "app"), {})
    llama_runs = [run for run in runs if run["server"] == "llama-server"]
    lines = [
        f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, torch {m.get('torch')}, OMP_WAIT_POLICY {m.get('omp_wait_policy')}; load average {m['loadavg_start']} at start, "
        f"{m.get('loadavg_end')} at end; commit {m.get('git_commit')}; {m['time_utc']}; {results['wall_s'] / 60:.1f} min in all.",
        f"\nThis app (`{' '.join(['python app.py', *app.get('app_args', [])])}`): model {m.get('app_model')} on {m.get('device')}, weights {m.get('app_weights') or m.get('app_dtype')}, decode step: {m.get('app_decode_step', 'not reported')}."
        + (f" **Not measured: {app['error']}**" if app.get("error") else ""),
    ]
    if llama_runs:
        tried = ", ".join(f"`{' '.join(run['flags'])}`" + (" (stall test only)" if run["stall_only"] else "") + (f" (**failed to start**: {run['error']})" if run.get("error") else "") for run in llama_runs)
        lines.append(f"\nllama-server {m.get('llama_server_version')} on the same GGUF ({Path(m.get('gguf') or '').name}), one process per setting, one server at a time; settings tried: {tried}.")
    else:
        lines.append(f"\nllama-server: not run ({results.get('llama_server_missing')}).")
    lines.append(
        f"\nLoad: each cell sends max({cfg['min_requests']}, {cfg['requests_per_client']} x clients) streamed chat requests back to back from its clients, "
        f"max_tokens {cfg['max_tokens']}, temperature 0; `shared`: one system prompt of {cfg['system_sections']} handbook sections per cell (new for each cell) and a distinct question; "
        f"`unique`: a distinct first line each. Time bound {cfg['cell_seconds']:.0f} s per cell, {cfg['request_timeout_s']:.0f} s per request. "
        f"Output tok/s = completion tokens of the completed requests / the cell's wall time; TTFT = send to first content chunk, client side; "
        f"longest gap = between consecutive content chunks of any stream; decode = the mean of the streams' (tokens - 1) / (last - first chunk). "
        f"Tokens counted from: {_token_sources(runs)}.\n"
    )
    rows = []
    for run in runs:
        for c in run["cells"]:
            rows.append(
                (
                    run["server"],
                    run["setting"],
                    c["mix"],
                    c["clients"],
                    f"{c['completed']} / {c['planned']}",
                    _fmt_prompt(c),
                    fmt(c["out_tok_s"]),
                    f"{c['requests_per_sec']:.2f}",
                    f"{fmt(c['ttft_p50_ms'], 0)} / {fmt(c['ttft_p95_ms'], 0)}",
                    fmt(c["max_gap_ms"], 0),
                    fmt(c["decode_tok_s_mean"]),
                    _fmt_errors(c),
                )
            )
    lines.append("### Every cell\n")
    lines.append(markdown_table(["server", "setting", "mix", "clients", "ok / planned", "prompt tokens (cached)", "out tok/s", "req/s", "TTFT p50 / p95 (ms)", "longest gap (ms)", "decode tok/s per stream", "errors"], rows))
    lines.append("\n### This app against llama-server's best setting per cell (highest out tok/s)\n")
    lines.append(
        markdown_table(
            ["mix", "clients", "app out tok/s", "llama-server best", "its out tok/s", "app / llama-server", "TTFT p50 app / llama-server (ms)"],
            [
                (r["mix"], r["clients"], fmt(r["app_tok_s"]), r["llama_best"] or "-", fmt(r["llama_tok_s"]), f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-", f"{fmt(r['app_ttft_p50_ms'], 0)} / {fmt(r['llama_ttft_p50_ms'], 0)}")
                for r in results["comparison"]
            ],
        )
    )
    stalls = [run for run in runs if run.get("stall")]
    if stalls:
        prompt_tokens = next((run["stall"]["prompt_tokens"] for run in stalls if run["stall"]["prompt_tokens"]), None)
        lines.append(
            f"\n### Stall: a {cfg['stall_tokens']}-token reply while a {fmt(prompt_tokens)}-token prompt (max_tokens 1) is prefilled\n\n"
            "The long prompt is sent once the reply has streamed a few chunks; its prefill window runs from its send to its first token. "
            "A reply that ended inside the window (last column: no) shows only part of it.\n"
        )
        lines.append(
            markdown_table(
                ["server", "setting", "alone: median gap (ms)", "alone: longest gap (ms)", "longest gap during the prefill (ms)", "prefill window (ms)", "reply outlived the prefill", "errors"],
                [
                    (
                        run["server"],
                        run["setting"],
                        fmt(s["alone_median_gap_ms"]),
                        fmt(s["alone_max_gap_ms"], 0),
                        fmt(s["during_prefill_max_gap_ms"], 0),
                        fmt(s["prefill_window_ms"], 0),
                        fmt(s["running_outlived_prefill"]),
                        "; ".join(s["errors"]) or "0",
                    )
                    for run in stalls
                    for s in [run["stall"]]
                ],
            )
        )
    return "\n".join(lines)


def compare_summary(results: dict[str, Any]) -> dict[str, Any]:
    """The last printed line: per cell the app's and llama-server's best out tok/s and their ratio, the stall gaps, errors."""
    runs = results["runs"]
    return {
        "bench": results["name"],
        "cpu": results["machine"].get("cpu"),
        "wall_s": round(results["wall_s"], 1),
        "loadavg": results["machine"].get("loadavg_end"),
        "app": {k: results["machine"].get("app_" + k) for k in ("weights", "decode_step")},
        "llama_server_settings": [run["setting"] for run in runs if run["server"] == "llama-server"],
        "cells": {
            f"{r['mix']}/{r['clients']}": {"app_tok_s": _round(r["app_tok_s"]), "llama_best": r["llama_best"], "llama_tok_s": _round(r["llama_tok_s"]), "ratio": None if r["ratio"] is None else round(r["ratio"], 3)}
            for r in results["comparison"]
        },
        "stall_gap_ms": {f"{run['server']} {run['setting']}": {"alone_median": _round(run["stall"]["alone_median_gap_ms"]), "during_prefill_max": _round(run["stall"]["during_prefill_max_gap_ms"])} for run in runs if run.get("stall")},
        "token_source": _token_sources(runs),
        "errors": sum(c["errors"] for run in runs for c in run["cells"]) + sum(len(run["stall"]["errors"]) for run in runs if run.get("stall")),
        "failed_starts": [f"{run['server']} {run['setting']}" for run in runs if run.get("error")],
    }


def make_compare_figure(results: dict[str, Any]) -> Any:
    """Output tok/s and TTFT p50 against clients, one line per server setting, one column per mix;
    the stall test's gaps as bars below. None without plotly."""
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots
    except ImportError:
        return None
    mixes = results["config"]["mixes"]
    titles = [f"{what}, {mix} mix" for what in ("Output tokens/s", "TTFT p50 (ms, log)") for mix in mixes] + ["Stall: gaps of a running stream (ms, log)"]
    specs = [[{} for _ in mixes], [{} for _ in mixes], [{"colspan": len(mixes)}] + [None] * (len(mixes) - 1)]
    fig = make_subplots(rows=3, cols=len(mixes), subplot_titles=titles, specs=specs, vertical_spacing=0.09)
    # One colour per server setting in every panel: the app thick green; llama-server dotted at -t 2 and above.
    palette = ["#1f77b4", "#ff7f0e", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
    for i, run in enumerate(r for r in results["runs"] if r["cells"]):
        name = "this app" if run["server"] == "app" else f"llama-server {run['setting']}"
        style = dict(color="#2ca02c", width=4) if run["server"] == "app" else dict(color=palette[i % len(palette)], dash="dot" if run.get("threads", 1) > 1 else "solid")
        for col, mix in enumerate(mixes, start=1):
            cells = sorted((c for c in run["cells"] if c["mix"] == mix), key=lambda c: c["clients"])
            x = [c["clients"] for c in cells]
            for row, key in ((1, "out_tok_s"), (2, "ttft_p50_ms")):
                fig.add_trace(go.Scatter(x=x, y=[c[key] for c in cells], name=name, legendgroup=name, showlegend=(row == 1 and col == 1), mode="lines+markers", line=style), row=row, col=col)
    stalls = [run for run in results["runs"] if run.get("stall")]
    labels = ["this app" if run["server"] == "app" else f"llama-server {run['setting']}" for run in stalls]
    fig.add_trace(go.Bar(x=labels, y=[run["stall"]["alone_median_gap_ms"] for run in stalls], name="alone: median gap"), row=3, col=1)
    fig.add_trace(go.Bar(x=labels, y=[run["stall"]["during_prefill_max_gap_ms"] for run in stalls], name="longest gap during a ~2,000-token prefill"), row=3, col=1)
    for col in range(1, len(mixes) + 1):
        for row in (1, 2):
            fig.update_xaxes(tickvals=list(results["config"]["clients"]), row=row, col=col)
        fig.update_xaxes(title_text="concurrent clients", row=2, col=col)
        fig.update_yaxes(type="log", row=2, col=col)
    fig.update_yaxes(type="log", title_text="ms (log)", row=3, col=1)
    m = results["machine"]
    fig.update_layout(
        title=f"This app vs llama-server on {m['cpu']} ({m['cpu_count']} CPUs): weights {m.get('app_weights')}, {m.get('app_decode_step')}",
        height=1500,
        width=1400,
        barmode="group",
    )
    return fig


def _print_cell(c: dict[str, Any]) -> None:
    print(
        f"  {c['completed']}/{c['planned']} ok in {c['wall_s']:.1f} s: {c['out_tok_s']:.1f} tok/s, {c['requests_per_sec']:.2f} req/s, "
        f"TTFT p50 {fmt(c['ttft_p50_ms'], 0)} ms p95 {fmt(c['ttft_p95_ms'], 0)} ms, longest gap {fmt(c['max_gap_ms'], 0)} ms, "
        f"decode {fmt(c['decode_tok_s_mean'])} tok/s per stream, errors {_fmt_errors(c)} (tokens from {c['token_source']})",
        flush=True,
    )
    for sample in c["error_samples"]:
        print(f"  error: {sample}", flush=True)


def _print_stall(s: dict[str, Any]) -> None:
    print(
        f"  alone: median gap {fmt(s['alone_median_gap_ms'])} ms, longest {fmt(s['alone_max_gap_ms'], 0)} ms; beside a {fmt(s['prompt_tokens'])}-token prompt: "
        f"longest gap {fmt(s['during_prefill_max_gap_ms'], 0)} ms in a {fmt(s['prefill_window_ms'], 0)} ms prefill window (reply outlived it: {fmt(s['running_outlived_prefill'])})",
        flush=True,
    )
    for error in s["errors"]:
        print(f"  error: {error}", flush=True)


def _fmt_errors(c: dict[str, Any]) -> str:
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(c["errors_by_kind"].items()))
    text = f"{c['errors']}" + (f" ({kinds})" if kinds else "")
    return text + (f" +{c['not_sent']} not sent" if c["not_sent"] else "")


def _fmt_prompt(c: dict[str, Any]) -> str:
    if c["prompt_tokens_mean"] is None:
        return "-"
    return f"{c['prompt_tokens_mean']:.0f}" + (f" ({c['cached_tokens_mean']:.0f})" if c["cached_tokens_mean"] is not None else "")


def _token_sources(runs: list[dict[str, Any]]) -> str:
    """Where each server's token counts came from: 'app: usage; llama-server: usage'."""
    by_server: dict[str, set[str]] = {}
    for run in runs:
        for c in run["cells"]:
            if c["token_source"]:
                by_server.setdefault(run["server"], set()).add(c["token_source"])
    names = {"usage": "usage.completion_tokens", "chunks": "content chunks (no usage sent)", "mixed": "usage where sent, else content chunks"}
    return "; ".join(f"{server}: {' and '.join(names[s] for s in sorted(sources))}" for server, sources in by_server.items()) or "no completed request"


# ---------------------------------------------------------------------- reporting: REST


def render_markdown(results: dict[str, Any]) -> str:
    m, cfg = results["machine"], results["config"]
    lines = [
        f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, torch {m.get('torch')}; app at {m['url']} ({'launched by the benchmark' if m['launched'] else 'already running'}), "
        f"model {m.get('model')} on {m.get('device')} ({m.get('weights') or m.get('dtype')}; decode step: {m.get('decode_step', 'not reported')}); load average {m['loadavg_start']} at start, {m.get('loadavg_end')} at end; {m['time_utc']}.",
        f"\n{cfg['clients']} concurrent clients, {cfg['requests']} requests per mode ({100 * cfg['shared_fraction']:.0f}% on one shared system prompt, "
        f"the rest unique), {cfg['max_new_tokens']} new tokens each. TTFT and latency are the server's own timings; client is the round trip, queueing included.\n",
    ]
    rows = []
    for mode, r in results["modes"].items():
        for kind in ("all", "shared", "unique"):
            k = r["by_kind"][kind]
            if not k["n"]:
                continue
            rows.append(
                (
                    f"prefix cache {mode}",
                    kind,
                    k["n"],
                    f"{fmt(k['wall_ttft_ms_p50'])} / {fmt(k['wall_ttft_ms_p95'])}",
                    f"{fmt(k['latency_ms_p50'])} / {fmt(k['latency_ms_p95'])}",
                    f"{fmt(k['client_ms_p50'])} / {fmt(k['client_ms_p95'])}",
                    f"{r['requests_per_sec']:.2f}" if kind == "all" else "",
                    f"{100 * r['hit_rate']:.0f}% ({100 * r['reused_token_share']:.0f}% of tokens)" if kind == "all" else "",
                    f"{r['errors']}" + (f" (+{r['not_sent']} not sent)" if r["not_sent"] else "") if kind == "all" else "",
                )
            )
    lines.append(markdown_table(["mode", "requests", "n", "wall TTFT p50 / p95 (ms)", "latency p50 / p95 (ms)", "client p50 / p95 (ms)", "req/s", "hit rate", "errors"], rows))
    return "\n".join(lines)


def summary_of(results: dict[str, Any]) -> dict[str, Any]:
    return {
        "bench": results["name"],
        "model": results["machine"].get("model"),
        "wall_s": round(results["wall_s"], 1),
        "loadavg": results["machine"].get("loadavg_end"),
        **{
            f"prefix_{mode}": {
                "rps": round(r["requests_per_sec"], 3),
                "ttft_p50_ms": _round(r["by_kind"]["all"]["wall_ttft_ms_p50"]),
                "ttft_p95_ms": _round(r["by_kind"]["all"]["wall_ttft_ms_p95"]),
                "hit_rate": round(r["hit_rate"], 3),
                "errors": r["errors"],
            }
            for mode, r in results["modes"].items()
        },
    }


def _print_mode(mode: str, r: dict[str, Any]) -> None:
    a = r["by_kind"]["all"]
    print(
        f"  {r['completed']}/{r['planned']} ok in {r['elapsed_s']:.1f} s ({r['requests_per_sec']:.2f} req/s), errors {r['errors']}, "
        f"hit rate {100 * r['hit_rate']:.0f}%, wall TTFT p50 {fmt(a['wall_ttft_ms_p50'])} ms p95 {fmt(a['wall_ttft_ms_p95'])} ms",
        flush=True,
    )
    for sample in r["error_samples"]:
        print(f"  error: {sample}", flush=True)


# ---------------------------------------------------------------------- helpers


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class _Deadline(Exception):
    """A stream still open past its request's time bound."""


def _timed_lines(response: httpx.Response, deadline: float) -> Iterator[tuple[float, str]]:
    """The body's lines, each with the client's clock when it arrived; raises _Deadline past ``deadline``."""
    for line in response.iter_lines():
        now = time.perf_counter()
        yield now, line
        if now > deadline:
            raise _Deadline()


def _drain(todo: queue.SimpleQueue, deadline: float) -> Iterator[Any]:
    while time.monotonic() < deadline:
        try:
            yield todo.get_nowait()
        except queue.Empty:
            return


def _check_bounds(cfg: LoadConfig) -> None:
    if not 1 <= cfg.clients <= 64:
        raise SystemExit("--clients must be between 1 and 64")
    if not 1 <= cfg.requests <= 2000:
        raise SystemExit("--requests must be between 1 and 2000")
    if not 0 <= cfg.shared_fraction <= 1:
        raise SystemExit("--shared-fraction must be between 0 and 1")
    if not 1 <= cfg.max_new_tokens <= 512:
        raise SystemExit("--max-new-tokens must be between 1 and 512 (the app's cap)")
    if not 0 < cfg.max_seconds <= 3600:
        raise SystemExit("--max-seconds must be in (0, 3600]")


def _check_compare_bounds(cfg: CompareConfig) -> None:
    if not cfg.clients or not all(1 <= n <= 64 for n in cfg.clients):
        raise SystemExit("--clients must be between 1 and 64 each")
    if not cfg.np_values or not all(1 <= n <= 64 for n in cfg.np_values):
        raise SystemExit("--np must be between 1 and 64 each")
    if not cfg.threads or not all(1 <= n <= 256 for n in cfg.threads):
        raise SystemExit("--threads must be between 1 and 256 each")
    if not 1 <= cfg.requests_per_client <= 100 or not 1 <= cfg.min_requests <= 1000:
        raise SystemExit("--requests-per-client must be between 1 and 100, --min-requests between 1 and 1000")
    if not 1 <= cfg.max_tokens <= 512 or not 1 <= cfg.stall_tokens <= 512:
        raise SystemExit("--max-tokens and --stall-tokens must be between 1 and 512 (the app's cap)")
    if not 512 <= cfg.slot_context <= 8192:
        raise SystemExit("--slot-context must be between 512 and 8192 (SmolLM2's context window)")
    if not 0 < cfg.cell_seconds <= 3600 or not 0 < cfg.request_timeout_s <= 3600:
        raise SystemExit("--max-seconds and --request-timeout must be in (0, 3600]")


def _int_list(text: str) -> list[int]:
    """'1,4,8' -> [1, 4, 8] (argparse type)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _bundled_gguf() -> Path | None:
    from engine.loading import bundled_gguf_path  # imported here: the REST mode and the tests need no engine

    return bundled_gguf_path()


def _mean(values: list[Any]) -> float | None:
    numbers = [v for v in values if isinstance(v, (int, float))]
    return statistics.fmean(numbers) if numbers else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="REST: a running app on loopback, e.g. http://127.0.0.1:7860")
    target.add_argument("--launch", action="store_true", help="REST: start python app.py on a free loopback port and stop it afterwards")
    target.add_argument("--compare-llama-server", action="store_true", help="launch this app, then llama-server at each setting, and compare them on /v1 streaming")
    parser.add_argument("--app-args", nargs=argparse.REMAINDER, default=[], help="extra arguments for app.py when it is launched (put last)")
    parser.add_argument("--clients", type=_int_list, default=None, help="concurrent clients: REST one number (default 4); comparison a list (default 1,4,8)")
    parser.add_argument("--max-tokens", "--max-new-tokens", dest="max_tokens", type=int, default=None, help="new tokens per request (default: REST 16, comparison 64)")
    parser.add_argument("--system-sections", type=int, default=None, help="handbook sections in the system prompt, ~45 tokens each (default: REST 10, comparison 9)")
    parser.add_argument("--max-seconds", type=float, default=None, help="time bound: REST per mode (default 300), comparison per cell (default 120)")
    parser.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for the model to load and its decode step to compile (default 600)")
    parser.add_argument("--name", default=None, help="results file name (default: server_bench, or server_bench_compare)")
    parser.add_argument("--seed", type=int, default=0, help="the prompts' seed (default 0)")
    rest = parser.add_argument_group("REST mode (--url / --launch)")
    rest.add_argument("--requests", type=int, default=LoadConfig.requests, help="requests per mode (default 32)")
    rest.add_argument("--shared-fraction", type=float, default=LoadConfig.shared_fraction, help="share of requests on the shared system prompt (default 0.75)")
    rest.add_argument("--modes", default="on,off", help="prefix cache modes to run, in order (default on,off)")
    comparison = parser.add_argument_group("comparison (--compare-llama-server)")
    comparison.add_argument("--mixes", default=",".join(MIXES), help="prompt mixes, in order (default shared,unique)")
    comparison.add_argument("--requests-per-client", type=int, default=CompareConfig.requests_per_client, help="a cell sends this many x clients requests ... (default 2)")
    comparison.add_argument("--min-requests", type=int, default=CompareConfig.min_requests, help="... and at least this many (default 4)")
    comparison.add_argument("--np", type=_int_list, default=list(CompareConfig.np_values), help="llama-server slot counts, one process each (default 1,4,8)")
    comparison.add_argument("--threads", type=_int_list, default=list(CompareConfig.threads), help="llama-server -t values, each with every --np (default 1,2)")
    comparison.add_argument("--slot-context", type=int, default=CompareConfig.slot_context, help="llama-server context per slot; -c is np x this (default 2560)")
    comparison.add_argument("--request-timeout", type=float, default=CompareConfig.request_timeout_s, help="seconds before an open stream is cut and counted as a timeout (default 120)")
    comparison.add_argument("--stall", action=argparse.BooleanOptionalAction, default=True, help="the stall test: a long reply while a ~2,000-token prompt is prefilled (default on)")
    comparison.add_argument("--stall-tokens", type=int, default=CompareConfig.stall_tokens, help="the stall test's long reply (default 256)")
    comparison.add_argument("--llama-server", default=None, help="llama-server binary (default: KVCI_LLAMA_SERVER, else dev.py's build)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
