"""What KV caching and prefix caching save, measured side by side with the alternatives in one run.

    python -m benchmark.prefix_bench            # full run (bundled SmolLM2; ~10-20 min on 2 CPU cores)
    python -m benchmark.prefix_bench --quick    # smoke run, under a minute
    python -m benchmark.prefix_bench --model HuggingFaceTB/SmolLM2-360M-Instruct --device cuda

Workloads, each timed with a warm-up and then the median (min-max) of several runs:

1. Shared system prompt (128-2048 tokens): miss vs exact hit vs partial hit (new question on a
   cached prefix), against plain ``model.generate`` and transformers' prompt-reuse recipe
   (prefill a ``DynamicCache`` on the prefix once, ``copy.deepcopy`` it per request).
2. Multi-turn conversation and 3. RAG document: TTFT per turn / question, prefix cache on vs off.
4. Decode tokens/s with the KV cache, without it (full recompute per step), and ``model.generate``.
5. Lookup time against the number of cached entries (synthetic segments, no model).
6. Memory: bytes per cached token against theory; 100 prompts sharing one prefix.

Greedy outputs are checked token for token against plain ``model.generate``. Prints tables, writes
``benchmark/results/<name>.{json,md,html}``, and prints the JSON summary as its last line. Reads
the engine's public API and ``PrefixCache``; never changes how either works.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmark.common import (
    fmt,
    fmt_stat,
    machine_info,
    markdown_table,
    print_machine_info,
    question,
    settled_decode_step,
    summarize,
    sync,
    text_of_tokens,
    timed,
    write_results,
)
from cache import PrefixCache, SizedKV, SlotAllocator
from engine import Engine
from engine.kv import kv_bytes_per_token
from engine.quant import QUANTIZED, WEIGHT_FORMATS


@dataclass(frozen=True)
class BenchConfig:
    """Sizes and repeat counts of every workload; ``PRESETS`` holds the full and quick runs."""

    prefix_sizes: tuple[int, ...] = (128, 256, 512, 1024, 2048)  # shared system prompt tokens
    repeats: int = 5  # timed runs per measurement, after one warm-up
    check_tokens: int = 16  # new tokens compared with model.generate in the warm-up round
    target_prefix: int = 512  # the size the TTFT targets are judged at
    conversation_turns: int = 5
    conversation_system_tokens: int = 256
    conversation_tokens: int = 24  # new tokens per assistant turn
    conversation_repeats: int = 3
    rag_document_tokens: int = 1024
    rag_questions: int = 5
    rag_tokens: int = 8
    rag_repeats: int = 3
    decode_contexts: tuple[int, ...] = (128, 512, 1024)
    decode_tokens: int = 64  # new tokens with the KV cache (engine and model.generate)
    recompute_tokens: int = 8  # new tokens without it: each step re-runs the whole sequence
    decode_repeats: int = 5
    recompute_repeats: int = 3  # slow: at 1,024 tokens each step is a full prefill
    lookup_entries: tuple[int, ...] = (10, 100, 1000, 10000)
    lookup_prompt_tokens: int = 512
    lookup_batches: int = 7
    lookup_batch_size: int = 50
    memory_prompts: int = 100
    memory_prefix_tokens: int = 500


PRESETS = {
    "full": BenchConfig(),
    "quick": BenchConfig(
        prefix_sizes=(128, 512),
        repeats=2,
        check_tokens=4,
        conversation_turns=3,
        conversation_system_tokens=64,
        conversation_tokens=4,
        conversation_repeats=1,
        rag_document_tokens=256,
        rag_questions=3,
        rag_tokens=2,
        rag_repeats=1,
        decode_contexts=(128, 512),
        decode_tokens=8,
        recompute_tokens=2,
        decode_repeats=1,
        recompute_repeats=1,
        lookup_batches=3,
        lookup_batch_size=20,
        memory_prompts=8,
    ),
}

DECODE_PROMPT = "Write a long and detailed story about a robot that works night shifts in a warehouse."
RAG_SYSTEM = "Answer the question using only the document. Be brief."


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.rerender:
        return rerender(Path(args.rerender))
    cfg = PRESETS["quick" if args.quick else "full"]
    if args.repeats:
        cfg = replace(cfg, repeats=args.repeats, conversation_repeats=args.repeats, rag_repeats=args.repeats, decode_repeats=args.repeats, recompute_repeats=args.repeats)
    name = args.name or ("prefix_bench_quick" if args.quick else "prefix_bench")
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)

    engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype, weights=args.weights, cache_budget_mb=args.cache_budget_mb, progress=lambda line: print(line, flush=True))
    info = machine_info(engine.device, {"model": engine.name, "dtype": str(engine.dtype).removeprefix("torch."), "weights": engine.info()["weights"], "decode_step": settled_decode_step(engine), "preset": "quick" if args.quick else "full"})
    print_machine_info(info)
    hf = Transformers(engine)

    results: dict[str, Any] = {"name": name, "machine": info, "config": asdict(cfg), "engine": engine.info()}
    workloads: list[tuple[str, Callable[[], Any]]] = [
        ("shared_prefix", lambda: bench_shared_prefix(engine, hf, cfg)),
        ("conversation", lambda: bench_conversation(engine, hf, cfg)),
        ("rag", lambda: bench_rag(engine, hf, cfg)),
        ("decode", lambda: bench_decode(engine, hf, cfg)),
        ("lookup", lambda: bench_lookup(engine, cfg)),
        ("memory", lambda: bench_memory(engine, cfg)),
    ]
    for key, run in workloads:
        if args.only and key not in args.only:
            continue
        t0 = time.perf_counter()
        print(f"[{key}] running... (load {_loadavg()})", flush=True)
        results[key] = run()
        results[key]["wall_s"] = time.perf_counter() - t0
        print(f"[{key}] done in {results[key]['wall_s']:.1f} s", flush=True)
        engine.cache.clear()

    results["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results["wall_s"] = time.perf_counter() - t_start
    results["targets"] = evaluate_targets(results, cfg)
    markdown = render_markdown(results)
    print()
    print(markdown)
    paths = write_results(name, results | {"summary": summary_of(results)}, markdown, make_figure(results))
    print("\nwrote " + ", ".join(str(p.relative_to(Path.cwd())) if p.is_relative_to(Path.cwd()) else str(p) for p in paths))
    print(json.dumps(summary_of(results)))
    return 0


def rerender(path: Path) -> int:
    """Targets, tables and chart again from a results JSON (after a change to the report, not the measuring)."""
    results = json.loads(path.read_text())
    results.pop("summary", None)
    cfg = BenchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in results["config"].items()})
    results["targets"] = evaluate_targets(results, cfg)
    markdown = render_markdown(results)
    print(markdown)
    write_results(results["name"], results | {"summary": summary_of(results)}, markdown, make_figure(results), out_dir=path.parent)
    print(json.dumps(summary_of(results)))
    return 0


# ---------------------------------------------------------------------- the baselines


class Transformers:
    """Plain transformers on the engine's own model and tokenizer: ``model.generate`` and the reuse recipe.

    Prompts are tokenized by the engine (same chat template), inside the timed span, as the
    engine's wall TTFT includes its own tokenizing too.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.model = engine.model
        self.device = engine.device
        self.pad_token_id = next(iter(engine.eos_token_ids), None)

    def prompt_ids(self, prompt: str, **kwargs: Any) -> list[int]:
        return self.engine.tokenize(self.engine.make_request(prompt, **kwargs))

    def generate(self, ids: list[int], max_new_tokens: int, cache: Any = None, streamer: Any = None) -> list[int]:
        """Greedy ``model.generate``: the new token ids."""
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                cache=cache,
                streamer=streamer,
                pad_token_id=self.pad_token_id,
            )
        return out[0, len(ids) :].tolist()

    def ttft(self, prompt: str, **kwargs: Any) -> float:
        """Milliseconds to the first token: tokenize, then ``generate(max_new_tokens=1)``."""
        ms, _ = timed(lambda: self.generate(self.prompt_ids(prompt, **kwargs), 1), self.device)
        return ms

    def decode(self, ids: list[int], max_new_tokens: int) -> dict[str, Any]:
        """Greedy generation with a streamer stamping each new token: TTFT and decode tokens/s."""
        stamps = _TokenStamps(self.device)
        sync(self.device)
        t0 = time.perf_counter()
        tokens = self.generate(ids, max_new_tokens, streamer=stamps)
        sync(self.device)
        t_end = time.perf_counter()
        first, last = stamps.times[0], stamps.times[-1]
        steps = len(stamps.times) - 1
        return {
            "tokens": tokens,
            "ttft_ms": (first - t0) * 1000,
            # the same span the engine's wall rate uses: first token to the end of the call
            "tokens_per_sec": steps / (t_end - first) if steps > 0 else 0.0,
            "step_tokens_per_sec": steps / (last - first) if steps > 0 else 0.0,
        }

    def prefill(self, ids: list[int]) -> Any:
        """The recipe's one-off step: a ``DynamicCache`` holding ``ids``' KV."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        with torch.inference_mode():
            self.model(input_ids=torch.tensor([ids], dtype=torch.long, device=self.device), cache=cache, use_cache=True)
        return cache

    def recipe(self, ids: list[int], prefix_cache: Any, max_new_tokens: int) -> tuple[float, float, list[int]]:
        """The documented reuse recipe: deepcopy the prefix cache, then ``generate(full_ids, cache=copy)``.

        Returns (total ms, deepcopy ms, new tokens). Correct only when ``ids`` extends the cached
        prefix by at least one token.
        """
        sync(self.device)
        t0 = time.perf_counter()
        cache = copy.deepcopy(prefix_cache)
        sync(self.device)
        t1 = time.perf_counter()
        tokens = self.generate(ids, max_new_tokens, cache=cache)
        sync(self.device)
        t2 = time.perf_counter()
        return (t2 - t0) * 1000, (t1 - t0) * 1000, tokens


class _TokenStamps:
    """A ``generate`` streamer that records when each new token arrives (the first put is the prompt)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        sync(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


# ---------------------------------------------------------------------- 1. shared system prompt


def bench_shared_prefix(engine: Engine, hf: Transformers, cfg: BenchConfig) -> dict[str, Any]:
    """Miss, exact hit and partial hit on a shared system prompt, against generate and the recipe."""
    out: dict[str, Any] = {"sizes": []}
    for size in cfg.prefix_sizes:
        system = text_of_tokens(engine.tokenizer, size)
        pairs = [(question(2 * r), question(2 * r + 1)) for r in range(cfg.repeats + 1)]  # (miss/hit, partial)
        all_ids = [hf.prompt_ids(q, system_prompt=system) for pair in pairs for q in pair]
        prefix_ids = all_ids[0][: _common_prefix_len(all_ids)]  # the system prompt in its chat template
        recipe_prefill_ms, recipe_cache = timed(lambda: hf.prefill(prefix_ids), engine.device)

        # Warm-up round, which doubles as the correctness check. The engine's miss, hit and partial hit
        # against its own run without the prefix cache (the central equivalence); the recipe against
        # plain greedy generate; the engine against generate only where it decodes with the model's
        # own weights (an int4/int8 step decodes with other weights, so its tokens may part).
        qa, qb = pairs[0]
        ids_a, ids_b = all_ids[0], all_ids[1]
        ref_a, ref_b = hf.generate(ids_a, cfg.check_tokens), hf.generate(ids_b, cfg.check_tokens)
        own_a, own_b = (engine.generate(q, system_prompt=system, max_new_tokens=cfg.check_tokens, use_prefix_cache=False) for q in (qa, qb))
        same = lambda result, expected: bit_identical(result, expected)  # noqa: E731
        engine.cache.clear()
        e_miss = engine.generate(qa, system_prompt=system, max_new_tokens=cfg.check_tokens)
        e_hit = engine.generate(qa, system_prompt=system, max_new_tokens=cfg.check_tokens)
        e_partial = engine.generate(qb, system_prompt=system, max_new_tokens=cfg.check_tokens)
        _, _, recipe_b = hf.recipe(ids_b, recipe_cache, cfg.check_tokens)
        checks = {
            "engine_miss": same(e_miss, own_a),
            "engine_hit": same(e_hit, own_a),
            "engine_partial": same(e_partial, own_b),
            "recipe_partial": recipe_b == ref_b,
            "engine_equals_generate": own_a.token_ids == ref_a and own_b.token_ids == ref_b if _decodes_own_weights(engine) else None,
        }
        if size == cfg.target_prefix or size == cfg.prefix_sizes[0]:
            # The recipe where the cache already holds the whole prompt: generate() has nothing to prefill.
            _, _, recipe_exact = hf.recipe(ids_a, hf.prefill(ids_a), cfg.check_tokens)
            checks["recipe_exact"] = recipe_exact == ref_a

        runs: dict[str, list] = {k: [] for k in ("miss", "hit", "partial", "generate_ms", "recipe_ms", "recipe_deepcopy_ms")}
        for r in range(1, cfg.repeats + 1):
            qa, qb = pairs[r]
            ids_b = all_ids[2 * r + 1]

            def engine_group() -> None:
                engine.cache.clear()
                for kind, q in (("miss", qa), ("hit", qa), ("partial", qb)):
                    res = engine.generate(q, system_prompt=system, max_new_tokens=1)
                    runs[kind].append(res.timings | {"cache_status": res.cache_status})

            def plain() -> None:
                runs["generate_ms"].append(hf.ttft(qa, system_prompt=system))

            def recipe() -> None:
                total, deepcopy_ms, _ = hf.recipe(hf.prompt_ids(qb, system_prompt=system), recipe_cache, 1)
                runs["recipe_ms"].append(total)
                runs["recipe_deepcopy_ms"].append(deepcopy_ms)

            for job in _rotated([engine_group, plain, recipe], r):
                job()

        row = {
            "prefix_tokens": size,
            "prompt_tokens": e_miss.timings["prompt_tokens"],
            "recipe_prefix_tokens": len(prefix_ids),
            "recipe_prefill_once_ms": recipe_prefill_ms,
            "checks": checks,
            "statuses": {k: sorted({t["cache_status"] for t in runs[k]}) for k in ("miss", "hit", "partial")},
            "generate_wall_ttft_ms": summarize(runs["generate_ms"]),
            "recipe_wall_ttft_ms": summarize(runs["recipe_ms"]),
            "recipe_deepcopy_ms": summarize(runs["recipe_deepcopy_ms"]),
        }
        for kind in ("miss", "hit", "partial"):
            for field in ("wall_ttft_ms", "ttft_ms", "prefill_ms", "cache_lookup_ms", "transfer_ms", "insert_ms"):
                row[f"{kind}_{field}"] = summarize([t[field] for t in runs[kind]])
            row[f"{kind}_prefill_tokens"] = runs[kind][-1]["prefill_tokens"]
            row[f"{kind}_reused_tokens"] = runs[kind][-1]["prefix_tokens_saved"]
        med = lambda key: row[key]["median"]  # noqa: E731
        row["miss_over_hit_wall"] = med("miss_wall_ttft_ms") / med("hit_wall_ttft_ms")
        row["miss_over_hit_model"] = med("miss_ttft_ms") / med("hit_ttft_ms")
        row["miss_over_partial_wall"] = med("miss_wall_ttft_ms") / med("partial_wall_ttft_ms")
        saved = med("miss_prefill_ms") - med("partial_prefill_ms")
        overhead = med("partial_cache_lookup_ms") + med("partial_transfer_ms")
        row["partial_prefill_saved_ms"] = saved
        row["partial_overhead_ms"] = overhead
        row["partial_overhead_share"] = overhead / saved if saved > 0 else None
        out["sizes"].append(row)
        print(
            f"  prefix {size:>5}: miss {med('miss_wall_ttft_ms'):8.1f} ms | hit {med('hit_wall_ttft_ms'):6.2f} ms | "
            f"partial {med('partial_wall_ttft_ms'):7.1f} ms | generate {med('generate_wall_ttft_ms'):8.1f} ms | "
            f"recipe {med('recipe_wall_ttft_ms'):7.1f} ms | checks {checks}",
            flush=True,
        )
    return out


# ---------------------------------------------------------------------- 2-3. conversation and RAG


def bench_conversation(engine: Engine, hf: Transformers, cfg: BenchConfig) -> dict[str, Any]:
    """A multi-turn chat with ``history=``: each turn's TTFT with the prefix cache on and off."""
    system = text_of_tokens(engine.tokenizer, cfg.conversation_system_tokens)
    requests = [{"prompt": question(i), "system_prompt": system, "max_new_tokens": cfg.conversation_tokens} for i in range(cfg.conversation_turns)]
    return _bench_sequence(engine, hf, requests, cfg.conversation_repeats, chat=True)


def bench_rag(engine: Engine, hf: Transformers, cfg: BenchConfig) -> dict[str, Any]:
    """One long document, several questions about it: TTFT per question with the prefix cache on and off."""
    document = text_of_tokens(engine.tokenizer, cfg.rag_document_tokens)
    requests = [
        {"prompt": f"Document:\n{document}\n\nQuestion: {question(i)}", "system_prompt": RAG_SYSTEM, "max_new_tokens": cfg.rag_tokens}
        for i in range(cfg.rag_questions)
    ]
    return _bench_sequence(engine, hf, requests, cfg.rag_repeats, chat=False)


def _bench_sequence(engine: Engine, hf: Transformers, requests: list[dict[str, Any]], repeats: int, chat: bool) -> dict[str, Any]:
    """Run ``requests`` in order with the prefix cache on (from empty) and off; plain generate's TTFT too.

    With ``chat``, each request carries the turns before it as ``history`` (the model's own answers).
    Round 0 is a warm-up; modes are interleaved, their order alternating round by round.
    """
    n = len(requests)
    walls: dict[str, list[list[float]]] = {m: [[] for _ in range(n)] for m in ("on", "off", "generate")}
    models: dict[str, list[list[float]]] = {m: [[] for _ in range(n)] for m in ("on", "off")}
    last: dict[str, list[Any]] = {}

    def run_mode(mode: str) -> list[Any]:
        engine.cache.clear()
        history: list[dict[str, str]] = []
        results = []
        for req in requests:
            res = engine.generate(**req, history=history if chat else None, use_prefix_cache=(mode == "on"))
            results.append((res, list(history)))
            if chat:
                history += [{"role": "user", "content": req["prompt"]}, {"role": "assistant", "content": res.text}]
        return results

    for round_ in range(repeats + 1):
        for mode in _rotated(["on", "off"], round_):
            last[mode] = run_mode(mode)
            if round_ > 0:
                for i, (res, _) in enumerate(last[mode]):
                    walls[mode][i].append(res.timings["wall_ttft_ms"])
                    models[mode][i].append(res.timings["ttft_ms"])
        if round_ > 0:
            for i, req in enumerate(requests):
                history = last["on"][i][1] if chat else None
                walls["generate"][i].append(hf.ttft(req["prompt"], system_prompt=req["system_prompt"], history=history))

    turns = []
    for i in range(n):
        on, off = last["on"][i][0], last["off"][i][0]
        turns.append(
            {
                "turn": i + 1,
                "prompt_tokens": on.timings["prompt_tokens"],
                "status_on": on.cache_status,
                "prefill_tokens_on": on.timings["prefill_tokens"],
                "prefill_tokens_off": off.timings["prefill_tokens"],
                "wall_ttft_on_ms": summarize(walls["on"][i]),
                "wall_ttft_off_ms": summarize(walls["off"][i]),
                "model_ttft_on_ms": summarize(models["on"][i]),
                "model_ttft_off_ms": summarize(models["off"][i]),
                "generate_wall_ttft_ms": summarize(walls["generate"][i]),
                # None: an earlier turn parted, so the two modes' histories (their own answers), and prompts, differ
                "tokens_equal": bit_identical(on, off) if on.prompt_token_ids == off.prompt_token_ids else None,
            }
        )
        t = turns[-1]
        print(
            f"  #{i + 1}: {t['prompt_tokens']:>5} tokens, {t['status_on']:>7} | on {t['wall_ttft_on_ms']['median']:7.1f} ms | "
            f"off {t['wall_ttft_off_ms']['median']:7.1f} ms | generate {t['generate_wall_ttft_ms']['median']:7.1f} ms",
            flush=True,
        )
    total = {m: sum(t[f"wall_ttft_{m}_ms"]["median"] for t in turns) for m in ("on", "off")}
    return {"turns": turns, "sum_wall_ttft_on_ms": total["on"], "sum_wall_ttft_off_ms": total["off"], "all_tokens_equal": all(t["tokens_equal"] is True for t in turns)}


# ---------------------------------------------------------------------- 4. decode


def bench_decode(engine: Engine, hf: Transformers, cfg: BenchConfig) -> dict[str, Any]:
    """Decode tokens/s: the engine with and without the KV cache, and ``model.generate``, per context length."""
    out: dict[str, Any] = {"contexts": []}
    overhead = len(hf.prompt_ids(DECODE_PROMPT, system_prompt="x")) - 1
    for context in cfg.decode_contexts:
        system = text_of_tokens(engine.tokenizer, max(context - overhead, 1))
        ids = hf.prompt_ids(DECODE_PROMPT, system_prompt=system)
        rates: dict[str, list[float]] = {k: [] for k in ("kv", "kv_engine_reported", "recompute", "generate")}
        last: dict[str, Any] = {}

        def kv() -> None:
            res = engine.generate(DECODE_PROMPT, system_prompt=system, max_new_tokens=cfg.decode_tokens, use_prefix_cache=False)
            rates["kv"].append(_wall_decode_rate(res))
            rates["kv_engine_reported"].append(res.timings["decode_tokens_per_sec"])
            last["kv"] = res.token_ids

        def recompute() -> None:
            res = engine.generate(DECODE_PROMPT, system_prompt=system, max_new_tokens=cfg.recompute_tokens, use_cache=False, use_prefix_cache=False)
            rates["recompute"].append(_wall_decode_rate(res))
            last["recompute"] = res.token_ids

        def generate() -> None:
            res = hf.decode(ids, cfg.decode_tokens)
            rates["generate"].append(res["tokens_per_sec"])
            last["generate"] = res["tokens"]

        kv(), generate()  # warm-up (the recompute path runs the same shapes as a prefill)
        for k in rates:
            rates[k].clear()
        for r in range(cfg.decode_repeats):
            jobs = [kv, recompute, generate] if r < cfg.recompute_repeats else [kv, generate]
            for job in _rotated(jobs, r):
                job()
        row = {"context_tokens": len(ids), "new_tokens_kv": len(last["kv"]), "new_tokens_recompute": len(last["recompute"])}
        row |= {f"{k}_tokens_per_sec": summarize(v) for k, v in rates.items()}
        row["kv_over_recompute"] = row["kv_tokens_per_sec"]["median"] / row["recompute_tokens_per_sec"]["median"]
        row["engine_over_generate"] = row["kv_tokens_per_sec"]["median"] / row["generate_tokens_per_sec"]["median"]
        same_weights = _decodes_own_weights(engine)  # else the KV step is int4/int8 and recompute float: tokens may part
        row["checks"] = {
            "engine_kv_equals_generate": last["kv"] == last["generate"] if same_weights else None,
            "recompute_equals_kv": last["recompute"] == last["kv"][: len(last["recompute"])] if same_weights else None,
        }
        out["contexts"].append(row)
        print(
            f"  context {len(ids):>5}: KV {row['kv_tokens_per_sec']['median']:6.1f} tok/s | recompute {row['recompute_tokens_per_sec']['median']:6.2f} tok/s | "
            f"generate {row['generate_tokens_per_sec']['median']:6.1f} tok/s | checks {row['checks']}",
            flush=True,
        )
    return out


def _wall_decode_rate(res: Any) -> float:
    """Tokens/s after the first token, on the wall clock (includes detokenizing and bookkeeping)."""
    steps = res.timings["new_tokens"] - 1
    span_s = (res.timings["total_ms"] - res.timings["wall_ttft_ms"]) / 1000
    return steps / span_s if steps > 0 and span_s > 0 else 0.0


# ---------------------------------------------------------------------- 5. lookup overhead


def bench_lookup(engine: Engine, cfg: BenchConfig) -> dict[str, Any]:
    """``match_prefix`` time on a realistic prompt against the number of cached entries.

    Each cache holds N sequences of ``lookup_prompt_tokens`` tokens: a shared half (a system
    prompt) and a distinct random half, the shape a chat service builds up. Three lookups: an
    exact hit on a stored sequence, a partial hit (shared half, new question), and a miss.
    """
    rng = random.Random(0)
    vocab = engine.model.config.get_text_config(decoder=True).vocab_size
    bpt = kv_bytes_per_token(engine.model.config, engine.dtype)
    half = cfg.lookup_prompt_tokens // 2
    shared = [rng.randrange(vocab) for _ in range(half)]
    rows = []
    for entries in cfg.lookup_entries:
        cache = PrefixCache(SlotAllocator(1 << 40, bpt), min_tokens=engine.cache.min_tokens)  # sizes only, no tensors
        stored = []
        t0 = time.perf_counter()
        for _ in range(entries):
            seq = shared + [rng.randrange(vocab) for _ in range(cfg.lookup_prompt_tokens - half)]
            cache.insert(seq, SizedKV(len(seq), logits_slots=math.ceil(vocab * 4 / bpt)))
            stored.append(seq)
        build_s = time.perf_counter() - t0
        probes = {
            "hit": [stored[rng.randrange(entries)] for _ in range(cfg.lookup_batch_size)],
            "partial": [shared + [rng.randrange(vocab) for _ in range(half)] for _ in range(cfg.lookup_batch_size)],
            "miss": [[rng.randrange(vocab) for _ in range(cfg.lookup_prompt_tokens)] for _ in range(cfg.lookup_batch_size)],
        }
        kinds_seen = {kind: cache.match_prefix(p[0]).kind for kind, p in probes.items()}
        row = {"entries": entries, "nodes": cache.stats()["cache_size"], "build_s": build_s, "kinds_seen": kinds_seen}
        per_lookup_us: dict[str, list[float]] = {k: [] for k in probes}
        for _ in range(cfg.lookup_batches):
            for kind in probes:  # interleaved, batch by batch
                t0 = time.perf_counter()
                for prompt in probes[kind]:
                    cache.release(cache.match_prefix(prompt))
                per_lookup_us[kind].append((time.perf_counter() - t0) / len(probes[kind]) * 1e6)
        row |= {f"{k}_us": summarize(v) for k, v in per_lookup_us.items()}
        rows.append(row)
        print(f"  {entries:>6} entries: " + " | ".join(f"{k} {row[f'{k}_us']['median']:.1f} µs" for k in probes), flush=True)
    spread = {k: max(r[f"{k}_us"]["median"] for r in rows) / min(r[f"{k}_us"]["median"] for r in rows) for k in ("hit", "partial", "miss")}
    return {"rows": rows, "spread": spread, "prompt_tokens": cfg.lookup_prompt_tokens}


# ---------------------------------------------------------------------- 6. memory


def bench_memory(engine: Engine, cfg: BenchConfig) -> dict[str, Any]:
    """Bytes per cached token against theory, and N prompts sharing one prefix against N copies."""
    vocab = engine.model.config.get_text_config(decoder=True).vocab_size
    logits_bytes = engine.pool.logits_slot_count * engine.pool.slot_bytes  # float32 logits, in whole slots
    theory = kv_bytes_per_token(engine.model.config, engine.dtype)
    system = text_of_tokens(engine.tokenizer, cfg.memory_prefix_tokens)

    engine.cache.clear()
    results = [engine.generate(question(i), system_prompt=system, max_new_tokens=1) for i in range(cfg.memory_prompts)]
    stats = engine.cache.stats()
    entries = engine.cache.entries()
    with_logits = sum(e.has_logits for e in entries)
    kv_bytes = stats["cached_bytes"] - with_logits * logits_bytes
    measured = kv_bytes / stats["cached_tokens"]

    prompts = [r.prompt_token_ids for r in results]
    shared_len = _common_prefix_len(prompts)
    # How many times the tree stores each position of the shared prefix: 1 everywhere means once.
    copies_of_prefix = sum(max(0, min(e.start + len(e.token_ids), shared_len) - e.start) for e in entries if e.start < shared_len) / shared_len
    separate_bytes = sum(len(p) for p in prompts) * theory + len(prompts) * logits_bytes
    partial = [r.timings["wall_ttft_ms"] for r in results[1:]]
    out = {
        "theory_bytes_per_token": theory,
        "measured_bytes_per_token": measured,
        "logits_bytes_per_entry": logits_bytes,
        "prompts": len(prompts),
        "shared_prefix_tokens": shared_len,
        "prompt_tokens_total": sum(len(p) for p in prompts),
        "cached_tokens": stats["cached_tokens"],
        "cache_nodes": stats["cache_size"],
        "cached_bytes": stats["cached_bytes"],
        "separate_copies_bytes": separate_bytes,
        "saving_factor": separate_bytes / stats["cached_bytes"],
        "prefix_copies_stored": copies_of_prefix,
        "statuses": {s: sum(r.cache_status == s for r in results) for s in ("miss", "partial", "hit")},
        "first_wall_ttft_ms": results[0].timings["wall_ttft_ms"],
        "later_wall_ttft_ms": summarize(partial),
    }
    print(
        f"  {measured:,.0f} B/token (theory {theory:,}) | {len(prompts)} prompts: {stats['cached_bytes'] / 2**20:.1f} MiB shared vs "
        f"{separate_bytes / 2**20:.1f} MiB separate; prefix stored {copies_of_prefix:g}x",
        flush=True,
    )
    return out


# ---------------------------------------------------------------------- targets, tables, plot


def evaluate_targets(results: dict[str, Any], cfg: BenchConfig) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and PASS/MISS (never asserted)."""
    targets = []

    def add(key: str, goal: str, measured: str, passed: bool | None) -> None:
        targets.append({"key": key, "target": goal, "measured": measured, "status": "n/a" if passed is None else ("PASS" if passed else "MISS")})

    sp = results.get("shared_prefix")
    if sp:
        row = _closest(sp["sizes"], "prefix_tokens", cfg.target_prefix)
        zero = all(r["hit_prefill_tokens"] == 0 for r in sp["sizes"])
        add(
            "exact_hit",
            f"Exact hit: 0 prefill tokens; wall TTFT ≥100× lower than a miss at {row['prefix_tokens']} prefix tokens",
            f"hit prefill tokens {'0 at every size' if zero else [r['hit_prefill_tokens'] for r in sp['sizes']]}; "
            f"miss/hit wall TTFT {row['miss_over_hit_wall']:,.0f}×",
            zero and row["miss_over_hit_wall"] >= 100,
        )
        share = row["partial_overhead_share"]
        add(
            "partial_overhead",
            f"Partial hit: lookup + transfer < 5% of the prefill time saved at {row['prefix_tokens']} prefix tokens",
            f"{row['partial_overhead_ms']:.2f} ms of {row['partial_prefill_saved_ms']:.0f} ms saved = {100 * share:.2f}%" if share is not None else "no prefill saved",
            share is not None and share < 0.05,
        )
    dec = results.get("decode")
    if dec:
        row = _closest(dec["contexts"], "context_tokens", 512)
        add(
            "kv_decode",
            f"KV-cache decode ≥10× the tokens/s of full recompute at {row['context_tokens']} tokens of context",
            f"{row['kv_tokens_per_sec']['median']:.1f} vs {row['recompute_tokens_per_sec']['median']:.2f} tok/s = {row['kv_over_recompute']:.1f}×",
            row["kv_over_recompute"] >= 10,
        )
        ratios = [r["engine_over_generate"] for r in dec["contexts"]]
        overlap = all(_ranges_overlap(r["kv_tokens_per_sec"], r["generate_tokens_per_sec"]) for r in dec["contexts"])
        add(
            "engine_vs_generate",
            "Engine decode tokens/s ≥ model.generate on the same model (median, every context"
            + (f"; the engine's step decodes {results['machine']['weights']}, generate float)" if results["machine"].get("weights") in QUANTIZED else ")"),
            ", ".join(f"{r['context_tokens']}: {r['kv_tokens_per_sec']['median']:.1f} vs {r['generate_tokens_per_sec']['median']:.1f} ({r['engine_over_generate']:.2f}×)" for r in dec["contexts"])
            + ("; min–max ranges overlap at every context" if overlap else ""),
            min(ratios) >= 1.0,
        )
    lk = results.get("lookup")
    if lk:
        first, last = lk["rows"][0]["entries"], lk["rows"][-1]["entries"]
        worst = max(lk["spread"].values())
        add(
            "lookup_flat",
            f"Lookup time flat (within 2×) from {first:,} to {last:,} cached entries",
            "max/min of medians: " + ", ".join(f"{k} {v:.2f}×" for k, v in lk["spread"].items()),
            worst <= 2.0,
        )
    mem = results.get("memory")
    if mem:
        add(
            "prefix_once",
            f"{mem['prompts']} prompts sharing a {mem['shared_prefix_tokens']}-token prefix store that prefix once",
            f"prefix stored {mem['prefix_copies_stored']:g}×; {mem['cached_bytes'] / 2**20:.1f} MiB vs {mem['separate_copies_bytes'] / 2**20:.1f} MiB as separate copies",
            abs(mem["prefix_copies_stored"] - 1) < 1e-9,
        )
    return targets


def render_markdown(results: dict[str, Any]) -> str:
    """Every table of the run, as markdown (printed, and written to ``<name>.md`` for the README)."""
    m = results["machine"]
    parts = [
        f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, torch {m.get('torch')} ({m.get('torch_threads')} threads, OMP_WAIT_POLICY={m.get('omp_wait_policy')}), "
        f"transformers {m.get('transformers')}, device {m.get('device')}{', ' + m['gpu'] if 'gpu' in m else ''}; "
        f"model {m['model']} ({m['dtype']}{', weights ' + m['weights'] if m.get('weights') else ''}{', decode step ' + m['decode_step'] if m.get('decode_step') else ''}); load average {m['loadavg_start']} at start, {m.get('loadavg_end')} at end; "
        f"commit {m.get('git_commit')}; {m['time_utc']}; {results['wall_s']:.0f} s. Cells: median (min–max).",
    ]
    parts.append("\n### Targets\n\n" + markdown_table(["target", "measured", "result"], [(t["target"], t["measured"], f"**{t['status']}**") for t in results["targets"]]))
    sp = results.get("shared_prefix")
    if sp:
        parts.append(
            "\n### Shared system prompt: wall TTFT (ms), miss vs exact hit vs partial hit vs transformers\n\n"
            + markdown_table(
                ["prefix tok", "prompt tok", "engine miss", "engine exact hit", "engine partial hit", "model.generate", "reuse recipe (deepcopy)", "miss/hit", "miss/partial"],
                [
                    (
                        r["prefix_tokens"],
                        r["prompt_tokens"],
                        fmt_stat(r["miss_wall_ttft_ms"]),
                        fmt_stat(r["hit_wall_ttft_ms"], 2),
                        fmt_stat(r["partial_wall_ttft_ms"]),
                        fmt_stat(r["generate_wall_ttft_ms"]),
                        f"{fmt_stat(r['recipe_wall_ttft_ms'])} ({fmt(r['recipe_deepcopy_ms']['median'])})",
                        f"{r['miss_over_hit_wall']:,.0f}×",
                        f"{r['miss_over_partial_wall']:.1f}×",
                    )
                    for r in sp["sizes"]
                ],
            )
        )
        parts.append(
            "\n### Shared system prompt: model TTFT (ms; tokenize + prefill + first sample), prefill tokens, overheads\n\n"
            + markdown_table(
                ["prefix tok", "model TTFT miss", "model TTFT hit", "model TTFT partial", "miss/hit", "prefill tok miss / hit / partial", "lookup (partial)", "transfer (partial)", "insert (miss)", "prefill saved", "(lookup+transfer)/saved"],
                [
                    (
                        r["prefix_tokens"],
                        fmt_stat(r["miss_ttft_ms"]),
                        fmt_stat(r["hit_ttft_ms"], 2),
                        fmt_stat(r["partial_ttft_ms"]),
                        f"{r['miss_over_hit_model']:,.0f}×",
                        f"{r['miss_prefill_tokens']} / {r['hit_prefill_tokens']} / {r['partial_prefill_tokens']}",
                        fmt_stat(r["partial_cache_lookup_ms"], 3),
                        fmt_stat(r["partial_transfer_ms"], 2),
                        fmt_stat(r["miss_insert_ms"], 2),
                        fmt(r["partial_prefill_saved_ms"]),
                        f"{100 * r['partial_overhead_share']:.2f}%" if r["partial_overhead_share"] is not None else "-",
                    )
                    for r in sp["sizes"]
                ],
            )
        )
        checks = sorted({k for r in sp["sizes"] for k in r["checks"]})
        parts.append(
            "\nSame greedy tokens (the warm-up round, "
            f"{results['config']['check_tokens']} new tokens): the engine's miss, hit and partial hit against its own run without the prefix cache; "
            "the recipe against plain `model.generate`; the engine against `model.generate` only where it decodes with the model's own weights "
            "(`-` for int4/int8, whose step decodes with other weights). The engine's checks are bit for bit: the same tokens and first-token logits (`torch.equal`). `recipe_exact` is the recipe when the cache already holds the whole prompt, "
            "which transformers does not support: a mismatch there is the expected failure.\n\n"
            + markdown_table(["prefix tok", *checks], [(r["prefix_tokens"], *[fmt(r["checks"].get(k)) for k in checks]) for r in sp["sizes"]])
            + "\n\nThe recipe's one-off prefix prefill (not in its TTFT above): "
            + ", ".join(f"{r['recipe_prefix_tokens']} tok {r['recipe_prefill_once_ms']:.0f} ms" for r in sp["sizes"])
            + "."
        )
    for key, title, label in (("conversation", "Multi-turn conversation (history=)", "turn"), ("rag", "RAG: one document, several questions", "question")):
        seq = results.get(key)
        if not seq:
            continue
        parts.append(
            f"\n### {title}: wall TTFT (ms) per {label}, prefix cache on vs off\n\n"
            + markdown_table(
                [label, "prompt tok", "status (on)", "prefill tok on / off", "cache on", "cache off", "model.generate", "off/on", "same tokens"],
                [
                    (
                        t["turn"],
                        t["prompt_tokens"],
                        t["status_on"],
                        f"{t['prefill_tokens_on']} / {t['prefill_tokens_off']}",
                        fmt_stat(t["wall_ttft_on_ms"]),
                        fmt_stat(t["wall_ttft_off_ms"]),
                        fmt_stat(t["generate_wall_ttft_ms"]),
                        f"{t['wall_ttft_off_ms']['median'] / t['wall_ttft_on_ms']['median']:.1f}×",
                        fmt(t["tokens_equal"]),
                    )
                    for t in seq["turns"]
                ],
            )
            + f"\n\nSum of TTFT medians: {seq['sum_wall_ttft_on_ms']:,.0f} ms on vs {seq['sum_wall_ttft_off_ms']:,.0f} ms off. "
            "Same tokens: `yes` the same tokens and first-token logits bit for bit; `NO` otherwise; "
            "`-` where an earlier turn parted, so that each mode's history (its own answers) and prompt differ."
        )
    dec = results.get("decode")
    if dec:
        parts.append(
            "\n### Decode tokens/s (wall clock after the first token)\n\n"
            + markdown_table(
                ["context tok", "engine, KV cache", "(engine-reported)", "engine, no KV cache", "model.generate", "KV / no KV", "engine / generate", "tokens = generate", "no-KV = KV"],
                [
                    (
                        r["context_tokens"],
                        fmt_stat(r["kv_tokens_per_sec"]),
                        fmt_stat(r["kv_engine_reported_tokens_per_sec"]),
                        fmt_stat(r["recompute_tokens_per_sec"], 2),
                        fmt_stat(r["generate_tokens_per_sec"]),
                        f"{r['kv_over_recompute']:.1f}×",
                        f"{r['engine_over_generate']:.2f}×",
                        fmt(r["checks"]["engine_kv_equals_generate"]),
                        fmt(r["checks"]["recompute_equals_kv"]),
                    )
                    for r in dec["contexts"]
                ],
            )
            + f"\n\nNew tokens: {dec['contexts'][0]['new_tokens_kv']} with the KV cache, {dec['contexts'][0]['new_tokens_recompute']} without (each step re-runs the whole sequence). "
            "Token checks are `-` where the engine's KV step decodes with int4/int8 copies of the weights and the other two with the float model."
        )
    lk = results.get("lookup")
    if lk:
        parts.append(
            f"\n### Prefix-cache lookup time (µs per `match_prefix` of a {lk['prompt_tokens']}-token prompt) vs cached entries\n\n"
            + markdown_table(
                ["entries", "tree nodes", "exact hit", "partial hit", "miss"],
                [(r["entries"], r["nodes"], fmt_stat(r["hit_us"]), fmt_stat(r["partial_us"]), fmt_stat(r["miss_us"])) for r in lk["rows"]],
            )
        )
    mem = results.get("memory")
    if mem:
        parts.append(
            "\n### Memory\n\n"
            + markdown_table(
                ["measure", "value"],
                [
                    ("KV bytes per cached token, measured", f"{mem['measured_bytes_per_token']:,.0f}"),
                    ("KV bytes per token, theory (2 × layers × kv_heads × head_dim × bytes)", f"{mem['theory_bytes_per_token']:,}"),
                    ("stored logits per cache entry", f"{mem['logits_bytes_per_entry']:,} B"),
                    (f"{mem['prompts']} prompts, shared prefix", f"{mem['shared_prefix_tokens']} tokens, stored {mem['prefix_copies_stored']:g}×"),
                    ("prompt tokens in total / tokens in the cache", f"{mem['prompt_tokens_total']:,} / {mem['cached_tokens']:,} ({mem['cache_nodes']} nodes)"),
                    ("cache bytes (prefix cache)", f"{mem['cached_bytes'] / 2**20:,.1f} MiB"),
                    ("the same prompts as separate copies", f"{mem['separate_copies_bytes'] / 2**20:,.1f} MiB ({mem['saving_factor']:.1f}× more)"),
                    ("wall TTFT: first prompt (miss) / the others (partial hits)", f"{mem['first_wall_ttft_ms']:,.1f} ms / {fmt_stat(mem['later_wall_ttft_ms'])} ms"),
                ],
            )
        )
    return "\n".join(parts)


def summary_of(results: dict[str, Any]) -> dict[str, Any]:
    """The one-line JSON summary: targets and the headline numbers."""
    summary: dict[str, Any] = {
        "bench": results["name"],
        "model": results["machine"]["model"],
        "device": results["machine"].get("device"),
        "wall_s": round(results["wall_s"], 1),
        "loadavg": results["machine"].get("loadavg_end"),
        "targets": {t["key"]: t["status"] for t in results["targets"]},
    }
    if "shared_prefix" in results:
        summary["ttft_ms"] = {
            str(r["prefix_tokens"]): {k: round(r[f"{k}_wall_ttft_ms"]["median"], 2) for k in ("miss", "hit", "partial", "generate", "recipe")} for r in results["shared_prefix"]["sizes"]
        }
    if "decode" in results:
        summary["decode_tok_s"] = {
            str(r["context_tokens"]): {k: round(r[f"{k}_tokens_per_sec"]["median"], 2) for k in ("kv", "recompute", "generate")} for r in results["decode"]["contexts"]
        }
    return summary


def make_figure(results: dict[str, Any]) -> Any:
    """Six panels, one per workload, medians with min-max error bars. None without plotly."""
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots
    except ImportError:
        return None
    fig = make_subplots(
        rows=3,
        cols=2,
        subplot_titles=[
            "Wall TTFT vs shared prefix (ms, log)",
            "Multi-turn conversation: wall TTFT per turn (ms)",
            "RAG document: wall TTFT per question (ms)",
            "Decode tokens/s vs context (log)",
            "Prefix-cache lookup (µs) vs cached entries",
            "Memory: prompts sharing one prefix vs separate copies (MiB)",
        ],
        vertical_spacing=0.09,
    )

    # One colour per method in every panel: green reuses KV, red does not, blue/orange are transformers.
    colors = {"reuse": "#2ca02c", "partial": "#17becf", "none": "#d62728", "generate": "#1f77b4", "recipe": "#ff7f0e"}

    def line(x: list, stats: list[dict], name: str, row: int, col: int, color: str, **kw: Any) -> None:
        med = [s["median"] for s in stats]
        fig.add_trace(
            go.Scatter(
                x=x,
                y=med,
                name=name,
                mode="lines+markers",
                line=dict(color=colors[color]),
                legendgroup=f"{row}{col}",
                error_y=dict(type="data", symmetric=False, array=[s["max"] - m for s, m in zip(stats, med)], arrayminus=[m - s["min"] for s, m in zip(stats, med)]),
                **kw,
            ),
            row=row,
            col=col,
        )

    if sp := results.get("shared_prefix"):
        x = [r["prefix_tokens"] for r in sp["sizes"]]
        for key, name, color in (
            ("miss_wall_ttft_ms", "TTFT: engine miss", "none"),
            ("partial_wall_ttft_ms", "TTFT: engine partial hit", "partial"),
            ("hit_wall_ttft_ms", "TTFT: engine exact hit", "reuse"),
            ("generate_wall_ttft_ms", "TTFT: model.generate", "generate"),
            ("recipe_wall_ttft_ms", "TTFT: deepcopy recipe", "recipe"),
        ):
            line(x, [r[key] for r in sp["sizes"]], name, 1, 1, color)
        fig.update_yaxes(type="log", row=1, col=1)
        fig.update_xaxes(title_text="prefix tokens", row=1, col=1)
    for key, col, row in (("conversation", 2, 1), ("rag", 1, 2)):
        if seq := results.get(key):
            x = [t["turn"] for t in seq["turns"]]
            for stat, name, color in (("wall_ttft_on_ms", "prefix cache on", "reuse"), ("wall_ttft_off_ms", "prefix cache off", "none"), ("generate_wall_ttft_ms", "model.generate", "generate")):
                line(x, [t[stat] for t in seq["turns"]], f"{key}: {name}", row, col, color)
    if dec := results.get("decode"):
        x = [r["context_tokens"] for r in dec["contexts"]]
        for key, name, color in (("kv_tokens_per_sec", "engine, KV cache", "reuse"), ("generate_tokens_per_sec", "model.generate", "generate"), ("recompute_tokens_per_sec", "engine, no KV cache", "none")):
            line(x, [r[key] for r in dec["contexts"]], f"decode: {name}", 2, 2, color)
        fig.update_yaxes(type="log", row=2, col=2)
        fig.update_xaxes(title_text="context tokens", row=2, col=2)
    if lk := results.get("lookup"):
        x = [r["entries"] for r in lk["rows"]]
        for key, color in (("hit", "reuse"), ("partial", "partial"), ("miss", "none")):
            line(x, [r[f"{key}_us"] for r in lk["rows"]], f"lookup: {key}", 3, 1, color)
        fig.update_xaxes(type="log", title_text="cached entries", row=3, col=1)
        fig.update_yaxes(rangemode="tozero", row=3, col=1)
    if mem := results.get("memory"):
        fig.add_trace(
            go.Bar(
                x=["prefix cache", "separate copies"],
                y=[mem["cached_bytes"] / 2**20, mem["separate_copies_bytes"] / 2**20],
                marker_color=[colors["reuse"], colors["none"]],
                name=f"memory: {mem['prompts']} prompts",
                legendgroup="32",
            ),
            row=3,
            col=2,
        )
    m = results["machine"]
    fig.update_layout(
        height=1500,
        width=1400,
        title_text=f"KV cache and prefix cache benchmark: {m['model']} on {m.get('device')} ({m['cpu']}, {m.get('torch_threads')} threads), {m['time_utc']}",
        legend=dict(groupclick="toggleitem"),
    )
    return fig


# ---------------------------------------------------------------------- helpers


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes, one repeat (under a minute)")
    parser.add_argument("--model", default=None, help="hub id, folder or .gguf (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    parser.add_argument("--dtype", default=None, help="auto, float32, bfloat16 or float16 (default: the engine's)")
    parser.add_argument("--weights", choices=WEIGHT_FORMATS, default=None, help="weight format (default: the engine's, as the app: auto, int4 decode on a CPU)")
    parser.add_argument("--cache-budget-mb", type=float, default=1024.0, help="prefix-cache budget (default 1024)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice, one per core)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 5 full, 2 quick)")
    parser.add_argument("--name", default=None, help="results file name (default prefix_bench, or prefix_bench_quick)")
    parser.add_argument("--rerender", metavar="JSON", help="measure nothing: rebuild the tables, targets and chart from a results JSON")
    parser.add_argument("--only", nargs="*", choices=["shared_prefix", "conversation", "rag", "decode", "lookup", "memory"], help="run only these workloads")
    return parser.parse_args(argv)


def bit_identical(result, expected) -> bool:
    """The exactness contract (engine/prefill.py): the same tokens and the first token's logits bit for bit."""
    return result.token_ids == expected.token_ids and torch.equal(result.first_token_logits, expected.first_token_logits)


def _decodes_own_weights(engine: Engine) -> bool:
    """Whether the engine's decode step uses the model's own weights (a float format), as ``model.generate`` does."""
    return engine.info()["weights"] not in QUANTIZED


def _rotated(items: list, shift: int) -> list:
    """``items`` rotated by ``shift``: interleaved jobs take turns at going first."""
    shift %= len(items)
    return items[shift:] + items[:shift]


def _common_prefix_len(sequences: list[list[int]]) -> int:
    n = min(len(s) for s in sequences)
    for i in range(n):
        if any(s[i] != sequences[0][i] for s in sequences[1:]):
            return i
    return n


def _ranges_overlap(a: dict, b: dict) -> bool:
    return a["max"] >= b["min"] and b["max"] >= a["min"]


def _closest(rows: list[dict], key: str, value: int) -> dict:
    return min(rows, key=lambda r: abs(r[key] - value))


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    sys.exit(main())
