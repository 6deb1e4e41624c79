"""KV storage precision side by side: quality against fp32 KV, and what a cache budget holds, per ``--kv-dtype``.

For each KV dtype (fp32, bf16) on the bundled model (fp32 weights):

- **quality**: ``engine/quality.py``'s measure, teacher-forced over the scenarios' text with the
  model attending over KV stored at that precision: top-1 agreement with fp32 KV and the mean NLL
  ratio (the bar for weight formats: >= 90% and <= 1.02);
- **entries per budget**: an engine with a ``--budget-mb`` prefix cache receives distinct prompts
  (one new token each) until it has evicted for ``--rounds`` prompts; the entries and tokens it
  then holds are read from its own stats (each entry also stores its float32 logits);
- **decode speed**: tokens/s of ``--new-tokens`` greedy tokens after a ``--context``-token prompt,
  the dtypes interleaved, median of ``--repeats`` (bf16 KV is cast to the compute dtype for
  attention at every step: this is what that costs). Report it with the load average beside it.

Prints a table and a JSON summary last.

    python -m benchmark.kv_dtype_bench                 # ~3 min on 2 busy cores
    python -m benchmark.kv_dtype_bench --budget-mb 64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmark.common import fmt_stat, machine_info, markdown_table, print_machine_info, question, settled_decode_step, summarize, text_of_tokens, write_results
from engine import Engine
from engine.quality import passes, quality_token_ids, teacher_forced

KV_DTYPES = ["fp32", "bf16"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-mb", type=float, default=32.0)
    parser.add_argument("--rounds", type=int, default=20, help="prompts sent after the first eviction")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    results: dict = {"kv_dtypes": {}}
    engines = {name: Engine.from_pretrained(device="cpu", weights="fp32", kv_dtype=name, cache_budget_mb=args.budget_mb, min_cached_tokens=1, progress=lambda _: None)
               for name in KV_DTYPES}
    results["machine"] = machine_info("cpu", {"model": engines["fp32"].name, "decode_step": settled_decode_step(*engines.values())})
    print_machine_info(results["machine"])
    speeds = decode_speeds(engines, args)
    reference = None
    for name, engine in engines.items():
        ids = quality_token_ids(engine.tokenizer)
        scored = teacher_forced(engine, ids)
        reference = reference or scored
        quality = scored.against(reference) | {"tokens": len(ids)}
        quality["passes"] = passes(quality)
        results["kv_dtypes"][name] = {"kv_dtype": engine.info()["kv_dtype"], "kv_bytes_per_token": engine.info()["kv_bytes_per_token"],
                                      "pool_slots": engine.pool.capacity, "quality": quality, "decode_tokens_per_sec": speeds[name], **fill(engine, args.rounds)}
        print(f"{name}: {results['kv_dtypes'][name]}", flush=True)
    results["budget_mb"] = args.budget_mb
    results["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    rows = [[name, r["kv_dtype"], f"{r['kv_bytes_per_token']:,}", f"{r['pool_slots']:,}", str(r["entries"]), f"{r['cached_tokens']:,}",
             f"{r['quality']['top1_agreement']:.2%}", f"{r['quality']['nll_ratio']:.4f}", fmt_stat(r["decode_tokens_per_sec"])] for name, r in results["kv_dtypes"].items()]
    markdown = (f"Prefix-cache budget {args.budget_mb:g} MiB; quality over {quality['tokens']} tokens against fp32 KV; decode after {args.context} tokens, "
                f"{args.new_tokens} new, median (min-max) of {args.repeats}, load average {results['machine'].get('loadavg_start')} at the start.\n\n") + markdown_table(
        ["--kv-dtype", "stored as", "bytes / token", "slots in budget", "entries held", "tokens held", "top-1 vs fp32 KV", "NLL ratio", "decode tok/s"], rows)
    print(markdown)
    write_results("kv_dtype_bench", results, markdown)
    print(json.dumps({name: {k: r[k] for k in ("entries", "cached_tokens", "kv_bytes_per_token")} | {k: r["quality"][k] for k in ("top1_agreement", "nll_ratio")}
                      | {"decode_tokens_per_sec": r["decode_tokens_per_sec"]["median"]}
                      for name, r in results["kv_dtypes"].items()} | {"loadavg_end": results["loadavg_end"]}))
    return results


def decode_speeds(engines: dict[str, Engine], args: argparse.Namespace) -> dict[str, dict]:
    """Decode tokens/s per KV dtype, the dtypes interleaved so that outside load falls on both alike."""
    prompt = text_of_tokens(engines["fp32"].tokenizer, args.context)
    values: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.repeats):
        for name, engine in engines.items():
            result = engine.generate(prompt, raw=True, max_new_tokens=args.new_tokens, use_prefix_cache=False)
            values[name].append(result.timings["decode_tokens_per_sec"])
    return {name: summarize(v) for name, v in values.items()}


def fill(engine: Engine, rounds: int) -> dict:
    """Distinct prompts (raw text: no shared chat-template prefix) until ``rounds`` prompts after the first eviction."""
    sent = after_eviction = 0
    while after_eviction < rounds:
        engine.generate(f"Request {sent}. {question(sent)}", raw=True, max_new_tokens=1)
        sent += 1
        after_eviction += engine.cache.stats()["evictions"] > 0
    stats = engine.cache.stats()
    return {"prompts_sent": sent, "entries": stats["cache_size"], "cached_tokens": stats["cached_tokens"], "cached_bytes": stats["cached_bytes"]}


if __name__ == "__main__":
    main()
