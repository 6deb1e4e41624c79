"""The workload replay's speed (cache/replay.py): a Mooncake-sized block trace and 100,000 token requests, at one budget.

We do not have Mooncake's conversation trace offline, so a synthetic one stands in with the same
counts (12,031 requests, 288,500 blocks of 512 tokens) and its kind of sharing: conversations whose
every turn resends the whole history (a chain of hash ids that grows turn by turn), opening with one
of a few shared system prompts, interleaved in time, plus one-off requests. The token workload is
100,000 pre-tokenized 500-token prompts: a 200-token system prompt out of 50, then 300 tokens of
their own. Both replay through the real PrefixCache at one bounded budget (evicting), and the cost
per block or token is reported per tenth of the run, to show it stays flat as the tree grows.

    python -m benchmark.replay_bench                       # both workloads; writes results/replay_bench.json
    python -m benchmark.replay_bench --only blocks         # one of them
    python -m benchmark.replay_bench --write-sample assets/traces/mooncake_synthetic.jsonl --requests 400

The last line printed is the JSON summary.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cache.budget_plan import ReplaySettings, format_bytes, load_model_size, replay  # noqa: E402
from cache.traces import Trace, TraceRequest, load_trace  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "replay_bench.json"
MOONCAKE_REQUESTS, MOONCAKE_BLOCKS, BLOCK = 12_031, 288_500, 512
TOKEN_REQUESTS, TOKEN_LENGTH, SYSTEM_TOKENS, SYSTEMS = 100_000, 500, 200, 50
TENTHS = 10


def synthetic_mooncake(requests: int = MOONCAKE_REQUESTS, blocks: int = MOONCAKE_BLOCKS, seed: int = 0) -> list[dict]:
    """Mooncake-format lines with exactly ``requests`` requests and ``blocks`` hash ids in all.

    Conversations: a shared system prompt (one of 30, 2-8 blocks), then turns that each add the
    previous reply and a new message (1-4 blocks); 80% of requests. One-off requests (20%): a
    system prompt and 4-40 blocks of their own; their own blocks are what is trimmed or padded
    at the end to hit ``blocks`` exactly.
    """
    rng = random.Random(seed)
    next_id = 0

    def fresh(n: int) -> list[int]:
        nonlocal next_id
        next_id += n
        return list(range(next_id - n, next_id))

    systems = [fresh(rng.randint(2, 8)) for _ in range(30)]
    events: list[tuple[float, list[int], bool]] = []  # (time s, hash ids, one-off)
    while len(events) < requests:
        start = rng.uniform(0, 3600)
        if rng.random() < 0.45:  # a conversation (5 turns on average): 80% of requests come from them
            chain = rng.choice(systems) + fresh(rng.randint(2, 12))
            for turn in range(rng.randint(1, 9)):
                events.append((start + 30 * turn + rng.uniform(0, 20), chain, False))
                chain = chain + fresh(rng.randint(1, 4))
        else:
            events.append((start, rng.choice(systems) + fresh(rng.randint(4, 40)), True))
    events = sorted(events[:requests], key=lambda e: e[0])
    total = sum(len(ids) for _, ids, _ in events)
    one_offs = [i for i, e in enumerate(events) if e[2]]
    while total != blocks:  # trim or pad one-off requests' own blocks (shared by nobody) to the exact count
        i = rng.choice(one_offs)
        ids = events[i][1]
        if total < blocks:
            events[i] = (events[i][0], ids + fresh(1), True)
            total += 1
        elif len(ids) > 9:
            events[i] = (events[i][0], ids[:-1], True)
            total -= 1
    return [
        {"timestamp": int(t * 1000), "input_length": len(ids) * BLOCK - rng.randrange(BLOCK), "output_length": rng.randint(20, 600), "hash_ids": ids}
        for t, ids, _ in events
    ]


def token_requests(count: int = TOKEN_REQUESTS, seed: int = 0) -> list[TraceRequest]:
    """``count`` 500-token prompts: one of 50 shared 200-token system prompts, then 300 tokens of their own."""
    rng = random.Random(seed)
    vocab = list(range(49_152))  # shared int objects: the trace's memory is its pointers
    systems = [tuple(rng.choices(vocab, k=SYSTEM_TOKENS)) for _ in range(SYSTEMS)]
    return [TraceRequest(rng.choice(systems) + tuple(rng.choices(vocab, k=TOKEN_LENGTH - SYSTEM_TOKENS)), (), TOKEN_LENGTH) for _ in range(count)]


class TimedTrace:
    """A trace whose iteration stamps the time every tenth of the way: the replay's cost per tenth."""

    def __init__(self, trace: Trace) -> None:
        self.trace, self.marks = trace, []

    def __iter__(self):
        step = max(1, len(self.trace.requests) // TENTHS)
        self.marks = [time.perf_counter()]
        for i, request in enumerate(self.trace.requests, 1):
            yield request
            if i % step == 0:
                self.marks.append(time.perf_counter())


def run_one(name: str, trace: Trace, budget: int, settings: ReplaySettings) -> dict:
    timed = TimedTrace(trace)
    t0 = time.perf_counter()
    row = replay(Trace(trace.kind, timed, trace.unit_tokens), budget, "lru", settings)  # type: ignore[arg-type]
    seconds = time.perf_counter() - t0
    units = [len(r.units) for r in trace.requests]
    step = max(1, len(units) // TENTHS)
    per_unit_us = [
        1e6 * (timed.marks[k + 1] - timed.marks[k]) / max(1, sum(units[k * step : (k + 1) * step])) for k in range(len(timed.marks) - 1)
    ]
    return {
        "workload": name,
        "requests": row.requests,
        "units": sum(units),
        "unit": "block" if trace.unit_tokens > 1 else "token",
        "budget": format_bytes(budget),
        "seconds": seconds,
        "us_per_unit_by_tenth": per_unit_us,
        "flatness_last_over_first": per_unit_us[-1] / per_unit_us[0],
        "token_hit_rate": row.token_hit_rate,
        "evictions": row.evictions,
        "peak_bytes": row.peak_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["blocks", "tokens"], help="run one workload")
    parser.add_argument("--write-sample", metavar="FILE", help="write a synthetic Mooncake-format trace and exit")
    parser.add_argument("--requests", type=int, default=400, help="requests in the written sample (blocks scale with them)")
    args = parser.parse_args()
    if args.write_sample:
        lines = synthetic_mooncake(args.requests, round(args.requests * MOONCAKE_BLOCKS / MOONCAKE_REQUESTS), seed=1)
        Path(args.write_sample).write_text("".join(json.dumps(line) + "\n" for line in lines))
        print(f"wrote {len(lines)} requests to {args.write_sample}")
        return
    model = load_model_size("llama-3.1-8b")
    settings = ReplaySettings.for_model(model, "bf16")
    results = []
    if args.only in (None, "blocks"):
        t0 = time.perf_counter()
        lines = [json.dumps(line) for line in synthetic_mooncake()]
        generated = time.perf_counter() - t0
        t0 = time.perf_counter()
        trace = load_trace(lines, block_size=BLOCK)
        parsed = time.perf_counter() - t0
        result = run_one("Mooncake-sized conversation trace (synthetic)", trace, 256 << 30, settings)  # 256 GiB: ~4k blocks of Llama-3.1-8B
        results.append({**result, "generate_s": generated, "parse_s": parsed})
    if args.only in (None, "tokens"):
        t0 = time.perf_counter()
        trace = Trace("tokens", token_requests())
        generated = time.perf_counter() - t0
        # 64 GiB of Llama-3.1-8B KV: 512k tokens, about 1,700 of the 100,000 prompts' own parts.
        results.append({**run_one("100,000 pre-tokenized 500-token requests", trace, 64 << 30, settings), "generate_s": generated})
    print(f"{'workload':<50} {'requests':>9} {'units':>12} {'budget':>9} {'replay s':>9} {'µs/unit first→last tenth':>26} {'tok hit':>8} {'evictions':>10}")
    for r in results:
        tenths = f"{r['us_per_unit_by_tenth'][0]:.2f} → {r['us_per_unit_by_tenth'][-1]:.2f} ({r['flatness_last_over_first']:.2f}×)"
        print(f"{r['workload']:<50} {r['requests']:>9,} {r['units']:>12,} {r['budget']:>9} {r['seconds']:>9.2f} {tenths:>26} {r['token_hit_rate']:>8.1%} {r['evictions']:>10,}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({r["workload"]: {"seconds": round(r["seconds"], 2), "flatness": round(r["flatness_last_over_first"], 2)} for r in results}))


if __name__ == "__main__":
    main()
