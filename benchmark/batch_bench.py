"""Continuous batching in the engine, side by side in one run on the bundled model (no HTTP: ``server_bench`` does that).

    python -m benchmark.batch_bench              # ~4 min on 2 cores, compiled step
    python -m benchmark.batch_bench --quick

Measured:

- **decode throughput at 1, 2, 4 and 8 running requests**: N requests of the same length submitted
  together (``Scheduler.hold``), their decode steps batched (one call per step) against the same N
  with batching off (rows one at a time through the same step, as a non-row-invariant step runs),
  alternated in every round. Total new tokens per second of decode, and each request's own tok/s;
- **the stall**: one request streams ``--stall-tokens`` tokens; once it runs, a ``--long-prompt``-token
  prompt arrives. The longest gap between two tokens of the first stream, against its median gap;
  and the same with the long prompt's prefill in one piece (the
  whole prefill between two steps, ``Scheduler.chunks_per_step = 0``), to show what one chunk per step buys;
- **sharing a cached prefix instead of copying it**: what a hit's copy of its matched KV into the
  request's own buffers costs once (``KVPool.read_kv``), against what reading the prefix from the
  pool's token-major layout costs at every decode step (attention over a strided view of it).

Writes ``benchmark/results/batch_bench.{json,md}``; the machine line names the CPU and the load.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from dataclasses import replace

import torch
from torch.nn import functional as F

from benchmark.common import machine_info, markdown_table, print_machine_info, summarize, text_of_tokens, write_results
from engine import Engine
from engine.scheduler import scheduler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stall-tokens", type=int, default=160)
    parser.add_argument("--long-prompt", type=int, default=2000)
    parser.add_argument("--compile", default="auto", choices=["auto", "off"])
    parser.add_argument("--quick", action="store_true", help="1 round, batches 1 and 4")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.batches = 1, [1, 4]

    engine = Engine.from_pretrained(compile=args.compile)
    engine.compiler.settled()
    info = machine_info(engine.device, {"weights": engine.info()["weights_detail"], "decode_step": engine.compiler.describe(),
                                        "rows_invariant": engine.decoder.rows_invariant})
    print_machine_info(info)
    results = {"machine": info, "throughput": throughput(engine, args), "stall": stall(engine, args), "sharing": sharing(engine)}
    scheduler().chunks_per_step = 0
    try:
        results["stall_whole_prefill"] = stall(engine, args)
    finally:
        scheduler().chunks_per_step = 1
    text = render(results, args)
    print(text)
    write_results("batch_bench", results, text)


def throughput(engine: Engine, args) -> dict:
    """Decode tok/s of N requests together, batched and one row at a time, alternated per round."""
    tokenizer = engine.tokenizer
    base = tokenizer(text_of_tokens(tokenizer, args.prompt_tokens + 64)).input_ids
    out: dict[str, dict[str, list[float]]] = {}
    invariant, config = engine.decoder.rows_invariant, engine.config
    for _ in range(args.rounds):
        for n in args.batches:
            for mode in (["batched", "one at a time"] if invariant and n > 1 else ["one at a time" if n > 1 else "batched"]):
                engine.config = config if mode == "batched" else replace(config, max_batch=1)  # one request per decode step
                prompts = [engine.decode(base[i : i + args.prompt_tokens]) for i in range(n)]  # distinct, about the same length
                results, wall = _together(engine, prompts, args.new_tokens)
                cell = out.setdefault(f"{n}|{mode}", {"total_tok_s": [], "per_request_tok_s": [], "mean_batch": []})
                decode_tokens = sum(len(r.token_ids) - 1 for r in results)
                decode_wall = max(r.timings["decode_ms"] for r in results) / 1000
                cell["total_tok_s"].append(decode_tokens / decode_wall)
                cell["per_request_tok_s"].append(statistics.median(r.timings["decode_tokens_per_sec"] for r in results))
                cell["mean_batch"].append(statistics.mean(r.timings["batch_size_mean"] for r in results))
    engine.config = config
    return {key: {name: summarize(values) for name, values in cell.items()} for key, cell in out.items()}


def _together(engine: Engine, prompts: list[str], new_tokens: int) -> tuple[list, float]:
    results: list = [None] * len(prompts)

    def ask(i: int) -> None:
        results[i] = engine.generate(prompts[i], raw=True, max_new_tokens=new_tokens, use_prefix_cache=False)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    t0 = time.perf_counter()
    with scheduler().hold():
        for t in threads:
            t.start()
        while scheduler().pending() < len(prompts):
            time.sleep(0.001)
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def stall(engine: Engine, args) -> dict:
    """The longest gap between two tokens of a running stream while a long prompt arrives, and its median gap."""
    tokenizer = engine.tokenizer
    long_prompt = engine.decode(tokenizer(text_of_tokens(tokenizer, args.long_prompt + 200)).input_ids[: args.long_prompt])
    gaps: list[float] = []
    arrived = threading.Event()
    long_done: dict = {}

    def long_request() -> None:
        t0 = time.perf_counter()
        result = engine.generate(long_prompt, raw=True, max_new_tokens=1, use_prefix_cache=False)
        long_done.update(wall_ms=(time.perf_counter() - t0) * 1000, prefill_ms=result.timings["prefill_ms"])

    last = None
    sender = threading.Thread(target=long_request)
    for item in engine.stream("Write a long story about a lighthouse keeper.", max_new_tokens=args.stall_tokens, use_prefix_cache=False):
        now = time.perf_counter()
        if last is not None:
            gaps.append((now - last) * 1000)
        last = now
        if len(gaps) == 20 and not arrived.is_set():  # the stream is running: the long prompt arrives
            arrived.set()
            sender.start()
    sender.join()
    before = gaps[:20]
    return {"median_gap_ms_before": statistics.median(before), "max_gap_ms_before": max(before),
            "max_gap_ms_during": max(gaps[20:]) if len(gaps) > 20 else None, "gaps_ms": gaps,
            "long_prompt_tokens": args.long_prompt, "long_prefill_ms": long_done.get("prefill_ms"), "long_wall_ms": long_done.get("wall_ms"),
            "chunk_tokens": engine.chunk_tokens}


@torch.inference_mode()
def sharing(engine: Engine, prefix_tokens: int = 480, steps: int = 64) -> dict:
    """Copy a cached prefix once (what a hit does) against attending over it in the pool's layout at every step."""
    ids = [(i * 7919 + 13) % 40000 + 50 for i in range(prefix_tokens)]
    engine.store(ids, "bench-sharing")
    match = engine.cache.match_prefix(ids, "bench-sharing", align=engine.align)
    try:
        slots = match.slots[: match.length]
        copies = []
        for _ in range(5):
            t0 = time.perf_counter()
            engine.pool.read_kv(slots, engine.model.config, engine.device, prefix_tokens + steps)
            copies.append((time.perf_counter() - t0) * 1000)
        pool_kv = engine.pool.kv  # [slots, layers, 2, kv_heads, head_dim]
        start = slots[0]
        layers, heads = engine.model.config.num_hidden_layers, engine.model.config.num_attention_heads
        q = torch.randn(1, heads, 1, pool_kv.shape[-1])
        strided = [(pool_kv[start : start + match.length, i, 0].transpose(0, 1)[None], pool_kv[start : start + match.length, i, 1].transpose(0, 1)[None]) for i in range(layers)]
        contiguous = [(k.contiguous(), v.contiguous()) for k, v in strided]

        def attend(kv) -> float:
            t0 = time.perf_counter()
            for _ in range(steps):
                for k, v in kv:
                    F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), enable_gqa=True)
            return (time.perf_counter() - t0) * 1000 / steps

        own, pooled = [], []
        for _ in range(3):
            own.append(attend(contiguous))
            pooled.append(attend(strided))
    finally:
        engine.cache.release(match)
        engine.cache.clear("bench-sharing")
    return {"prefix_tokens": match.length, "copy_once_ms": statistics.median(copies), "attention_per_step_own_ms": statistics.median(own),
            "attention_per_step_pool_ms": statistics.median(pooled), "kv_bytes": engine.pool.kv[0].numel() * engine.pool.kv.element_size() * match.length}


def render(results: dict, args) -> str:
    m = results["machine"]
    machine = " | ".join(f"{k}={m[k]}" for k in ("cpu", "cpu_count", "torch_threads", "weights", "decode_step", "rows_invariant", "loadavg_start", "git_commit") if k in m)
    rows = []
    for key, cell in results["throughput"].items():
        n, mode = key.split("|")
        rows.append((n, mode, f"{cell['total_tok_s']['median']:.1f}", f"{cell['per_request_tok_s']['median']:.1f}", f"{cell['mean_batch']['median']:.2f}"))
    s = results["stall"]
    sh = results["sharing"]
    return (
        f"machine: {machine}\n\n{args.rounds} rounds, alternated; prompts of {args.prompt_tokens} tokens, {args.new_tokens} new tokens each\n\n"
        + markdown_table(["running requests", "decode steps", "total decode tok/s", "per-request tok/s", "mean batch"], rows)
        + f"\n\nStall: a stream's median gap {s['median_gap_ms_before']:.1f} ms (max {s['max_gap_ms_before']:.1f}) before a {s['long_prompt_tokens']}-token prompt arrives; "
        f"longest gap while it prefills ({s['long_prefill_ms']:.0f} ms of prefill, chunks of {s['chunk_tokens']}): {s['max_gap_ms_during']:.1f} ms, one chunk between "
        f"two steps; {results['stall_whole_prefill']['max_gap_ms_during']:.1f} ms with the whole prefill between two steps\n\n"
        f"Sharing a {sh['prefix_tokens']}-token cached prefix: copying it once {sh['copy_once_ms']:.2f} ms ({sh['kv_bytes'] / 1e6:.1f} MB); attention per step over "
        f"own contiguous KV {sh['attention_per_step_own_ms']:.2f} ms against the pool's strided layout {sh['attention_per_step_pool_ms']:.2f} ms (30 layers)\n"
    )


if __name__ == "__main__":
    main()
