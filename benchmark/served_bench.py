"""The served path against the engine alone: one client's decode speed through HTTP, as a share of the engine's own, in one run.

    python -m benchmark.served_bench               # ~5 min on 2 cores: 2 rounds of each, alternated
    python -m benchmark.served_bench --rounds 1 --requests 3 --max-tokens 64

Alternates, round by round, so that drift on a shared host hits both sides alike:

- **engine alone**: a fresh process (``--engine-alone``) loads the bundled model as the app does,
  waits for its compiled step, and runs the requests through ``Engine.stream``: no HTTP, no worker
  threads. Its decode tok/s is the engine's ``decode_tokens_per_sec`` (new tokens after the first
  over the decode time), and the same from the stream's deltas, timed as a client would;
- **served**: ``python app.py`` on a free port (launched here, measured once its compile ended), one
  client streaming ``/v1/chat/completions`` with the same prompts. Its decode tok/s is the client's
  (tokens after the first over first-to-last content chunk) and, from the same responses, the
  engine's own inside the app (``kvci.timings.decode_tokens_per_sec``); and one ``POST /generate``
  (REST) per request, the engine's figure from its body.

The requests: the page's shared system prompt mix (~400 tokens, server_bench's), a new question
each, greedy. The first request of each side is a warm-up (a miss) and is not counted.
Writes ``benchmark/results/served_bench.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from benchmark.common import REPO_ROOT, machine_info, markdown_table, print_machine_info, question, write_results
from benchmark.server_bench import chat_body, launch_app, served_model, shared_system_prompt, stream_chat, stream_stats, wait_ready


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=5, help="per side and round, after one warm-up")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--sections", type=int, default=9, help="handbook sections in the system prompt")
    parser.add_argument("--engine-alone", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    prompts = [question(i) for i in range(args.requests + 1)]
    system = shared_system_prompt(args.sections)
    if args.engine_alone:
        print(json.dumps(engine_alone(system, prompts, args.max_tokens)), flush=True)
        os._exit(0)  # not through interpreter shutdown: the model's daemon threads may be inside torch, and libstdc++ aborts on them
    info = machine_info(extra={"max_tokens": args.max_tokens, "requests": args.requests})
    print_machine_info(info)
    rounds = []
    for r in range(args.rounds):
        alone = run_engine_alone(args)
        served = run_served(system, prompts, args.max_tokens)
        rounds.append({"round": r + 1, "engine_alone": alone, "served": served})
        print(json.dumps(round_summary(rounds[-1])), flush=True)
    results = {"machine": info, "rounds": rounds, "summary": summary(rounds)}
    write_results("served_bench", results, render(results))
    print(json.dumps(results["summary"]))
    return 0


def engine_alone(system: str, prompts: list[str], max_tokens: int) -> dict[str, Any]:
    """In this process: the engine as the app loads it, the requests through ``Engine.stream``."""
    from engine import Engine, GenerationResult

    engine = Engine.from_pretrained()
    engine.compiler.wait()
    rows = []
    for prompt in prompts:
        times, result = [], None
        for item in engine.stream(prompt, system_prompt=system, max_new_tokens=max_tokens):
            if isinstance(item, GenerationResult):
                result = item
            elif item:
                times.append(time.perf_counter())
        tokens = len(result.token_ids)
        rows.append({"engine_decode_tok_s": result.timings["decode_tokens_per_sec"], "stream_decode_tok_s": (tokens - 1) / (times[-1] - times[0]) if len(times) > 1 else None,
                     "tokens": tokens, "cache_status": result.cache_status})
    return {"decode_step": engine.compiler.describe(), "requests": rows[1:]}


def run_engine_alone(args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmark.served_bench", "--engine-alone", "--requests", str(args.requests), "--max-tokens", str(args.max_tokens), "--sections", str(args.sections)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"the engine-alone process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_served(system: str, prompts: list[str], max_tokens: int) -> dict[str, Any]:
    """Launch the app, then one client: each prompt streamed on /v1, then sent again on REST /generate (an exact hit: the engine's decode alone)."""
    app = launch_app([])
    with app as url, httpx.Client(base_url=url, timeout=300, trust_env=False) as http:
        health = wait_ready(http, 600, app.alive)
        model = served_model(http)
        rows = []
        for prompt in prompts:
            stats = stream_stats(stream_chat(http, chat_body(model, system, prompt, max_tokens), 300))
            if not stats["ok"]:
                raise SystemExit(f"a served request failed: {stats['error']}")
            kvci = (stats["extra"] or {}).get("kvci") or {}
            rest = http.post("/generate", json={"prompt": prompt, "system_prompt": system, "max_new_tokens": max_tokens})
            rest.raise_for_status()
            rows.append({"client_decode_tok_s": stats["decode_tok_s"], "engine_decode_tok_s": (kvci.get("timings") or {}).get("decode_tokens_per_sec"),
                         "rest_engine_decode_tok_s": rest.json()["timings"]["decode_tokens_per_sec"], "tokens": stats["completion_tokens"],
                         "cache_status": kvci.get("cache_status")})
        busy = (http.get("/health").json().get("batching") or {}).get("busy_s")
    return {"decode_step": (health.get("decode") or {}).get("state"), "requests": rows[1:], "busy_s": busy}


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [row[key] for row in rows if row.get(key)]
    return statistics.median(values) if values else None


def round_summary(r: dict[str, Any]) -> dict[str, Any]:
    alone, served = r["engine_alone"]["requests"], r["served"]["requests"]
    return {
        "round": r["round"],
        "engine_alone_tok_s": _median(alone, "engine_decode_tok_s"),
        "engine_alone_stream_tok_s": _median(alone, "stream_decode_tok_s"),
        "served_client_tok_s": _median(served, "client_decode_tok_s"),
        "served_engine_tok_s": _median(served, "engine_decode_tok_s"),
        "rest_engine_tok_s": _median(served, "rest_engine_decode_tok_s"),
    }


def summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    per_round = [round_summary(r) for r in rounds]
    keys = [k for k in per_round[0] if k != "round"]
    out: dict[str, Any] = {k: statistics.median(p[k] for p in per_round if p[k]) for k in keys}
    out["served_share"] = out["served_client_tok_s"] / out["engine_alone_tok_s"]
    out["rest_share"] = out["rest_engine_tok_s"] / out["engine_alone_tok_s"]
    out["per_round"] = per_round
    return out


def render(results: dict[str, Any]) -> str:
    m, s = results["machine"], results["summary"]
    head = (f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, torch {m.get('torch')}; load average {m['loadavg_start']} at start; commit {m['git_commit']}; {m['time_utc']}. "
            f"One client, {m['requests']} requests per side and round (after a warm-up), {m['max_tokens']} new tokens, greedy; sides alternated.")
    rows = [[p["round"], p["engine_alone_tok_s"], p["engine_alone_stream_tok_s"], p["served_client_tok_s"], p["served_engine_tok_s"], p["rest_engine_tok_s"]] for p in s["per_round"]]
    table = markdown_table(["round", "engine alone (engine's clock)", "engine alone (stream deltas)", "served /v1 (client's clock)", "served /v1 (engine's clock inside the app)", "served REST (engine's clock)"], rows)
    return f"{head}\n\n{table}\n\nMedians: served /v1 at {s['served_share']:.0%} of the engine alone; REST's engine at {s['rest_share']:.0%}.\n"


if __name__ == "__main__":
    raise SystemExit(main())
