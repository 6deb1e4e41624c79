"""Decode speed per weight format and decode step, side by side in one run: tok/s, prefill, quality, ceiling.

For each format (fp32, bf16, int8, int4) the bundled model is loaded through
``Engine.from_pretrained(weights=...)`` and measured with both decode steps (transformers'
forward and ``engine/fast_llama.py``'s eager step): decode tokens/s after a prompt of 128 / 512 /
1,024 tokens (greedy, ``--new-tokens`` each, median of ``--repeats``, the methods interleaved),
prefill tokens/s of a 512-token prompt, teacher-forced quality against fp32 (``engine/quality.py``),
and the bandwidth ceiling: the machine's measured copy bandwidth over the bytes a step reads.
``--avx2`` repeats the fastest cell in a child process with ``ATEN_CPU_CAPABILITY=avx2`` (what a
machine without AVX-512 gets). Prints a table and, last, a JSON summary.

    python -m benchmark.decode_bench                    # all formats, ~10 min on 2 cores
    python -m benchmark.decode_bench --formats int4 --contexts 512 --repeats 3 --avx2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as prefix_bench: spinning OpenMP threads under outside load

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmark.common import fmt, fmt_stat, machine_info, markdown_table, print_machine_info, summarize, text_of_tokens, write_results
from engine import Engine, quant
from engine.engine import _TransformersStep
from engine.fast_llama import FastDecoder
from engine.kv import new_model_cache
from engine.quality import passes, quality_token_ids, teacher_forced

FORMATS = ["fp32", "bf16", "int8", "int4"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", default=FORMATS, choices=FORMATS)
    parser.add_argument("--contexts", nargs="+", type=int, default=[128, 512, 1024])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--avx2", action="store_true", help="also measure int4 / fast at 512 with ATEN_CPU_CAPABILITY=avx2")
    parser.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)  # the --avx2 child
    args = parser.parse_args(argv)

    info = machine_info("cpu", {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")})
    if not args.json_only:
        print_machine_info(info)
    bandwidth = copy_bandwidth()
    results: dict = {"machine": info, "copy_bandwidth_gb_s": bandwidth / 1e9, "formats": {}}
    reference = None
    for name in args.formats:
        engine = Engine.from_pretrained(device="cpu", weights=name, cache_budget_mb=1, progress=lambda _: None)
        steps = {"transformers": _TransformersStep(engine), "fast": engine.decoder if isinstance(engine.decoder, FastDecoder) else FastDecoder(engine.model)}
        row: dict = {"weight_bytes": quant.weight_bytes(engine.model)}
        row["ceiling_tok_s"] = bandwidth / row["weight_bytes"]
        for context in args.contexts:
            prompt = engine.tokenizer(text_of_tokens(engine.tokenizer, context)).input_ids[:context]
            runs = {step: [] for step in steps}
            for repeat in range(args.repeats):
                for step in (list(steps) if repeat % 2 == 0 else list(steps)[::-1]):  # interleaved, order alternating
                    runs[step].append(decode_tokens_per_s(engine, steps[step], prompt, args.new_tokens))
            for step, values in runs.items():
                row[f"decode_{step}_{context}"] = summarize(values)
        prompt = engine.tokenizer(text_of_tokens(engine.tokenizer, 512)).input_ids[:512]
        row["prefill_512_tok_s"] = summarize([prefill_tokens_per_s(engine, prompt) for _ in range(max(args.repeats // 2, 1))])
        if not args.json_only:
            ids = quality_token_ids(engine.tokenizer)
            scored = teacher_forced(engine.model, ids)
            reference = reference or (scored if name == "fp32" else teacher_forced(_fp32_model(), ids))
            row["quality"] = scored.against(reference)
            row["quality"]["passes"] = passes(row["quality"])
        results["formats"][name] = row
        del engine, steps
    if args.avx2 and not args.json_only:
        results["avx2"] = avx2_figure(args)
    if args.json_only:
        print(json.dumps(results))
        return results
    markdown = render(results, args)
    print(markdown)
    write_results("decode_bench" if set(args.formats) == set(FORMATS) else "decode_bench_partial", results, markdown)
    summary = {name: {"decode_fast_512": (row.get("decode_fast_512") or {}).get("median"), "ceiling": row["ceiling_tok_s"]} for name, row in results["formats"].items()}
    print(json.dumps({"summary": summary, "avx2": results.get("avx2"), "loadavg_end": [round(x, 2) for x in os.getloadavg()]}))
    return results


@torch.inference_mode()
def decode_tokens_per_s(engine: Engine, step, prompt: list[int], new_tokens: int) -> float:
    """Prefill ``prompt`` (not timed), then ``new_tokens`` greedy steps timed on the wall clock."""
    cache = new_model_cache(engine.model.config, len(prompt) + new_tokens + 1)
    token = int(engine._transformers_forward(prompt, cache, use_cache=True).argmax())
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        token = int(step.decode_one_token(token, cache).argmax())
    return new_tokens / (time.perf_counter() - t0)


@torch.inference_mode()
def prefill_tokens_per_s(engine: Engine, prompt: list[int]) -> float:
    cache = new_model_cache(engine.model.config, len(prompt) + 1)
    t0 = time.perf_counter()
    engine._transformers_forward(prompt, cache, use_cache=True)
    return len(prompt) / (time.perf_counter() - t0)


def copy_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes/s moved by a large tensor copy (read + write), best of ``repeats``: what a decode step can stream at most."""
    src = torch.ones(megabytes << 18)  # float32: megabytes MiB
    dst = torch.empty_like(src)
    best = min(_timed_copy(dst, src) for _ in range(repeats))
    return 2 * src.numel() * 4 / best


def avx2_figure(args) -> dict:
    """int4 with the fast step at 512 tokens, in a child process that sees only AVX2 kernels."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    cmd = [sys.executable, "-m", "benchmark.decode_bench", "--formats", "int4", "--contexts", "512", "--repeats", str(args.repeats), "--new-tokens", str(args.new_tokens), "--json-only"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, check=True).stdout
    child = json.loads(out.strip().splitlines()[-1])
    row = child["formats"]["int4"]
    return {"cpu_capability": child["machine"]["cpu_capability"], "decode_fast_512": row["decode_fast_512"], "decode_transformers_512": row["decode_transformers_512"]}


def render(results: dict, args) -> str:
    headers = ["format", "MB read / token", "ceiling tok/s"]
    for context in args.contexts:
        headers += [f"transformers @ {context}", f"fast step @ {context}"]
    headers += ["prefill 512 tok/s", "top-1 vs fp32", "NLL vs fp32", "quality bar"]
    rows = []
    for name, row in results["formats"].items():
        cells = [name, row["weight_bytes"] / 1e6, row["ceiling_tok_s"]]
        for context in args.contexts:
            cells += [fmt_stat(row[f"decode_transformers_{context}"]), fmt_stat(row[f"decode_fast_{context}"])]
        q = row.get("quality", {})
        cells += [fmt_stat(row["prefill_512_tok_s"], 0), f"{q.get('top1_agreement', 0):.1%}", f"{q.get('nll_ratio', 1) - 1:+.2%}", fmt(q.get("passes"))]
        rows.append(cells)
    m = results["machine"]
    text = (
        f"Machine: {m['cpu']}, {m['torch_threads']} threads, {m['cpu_capability']}, torch {m['torch']}, load average {m['loadavg_start']} at start; "
        f"copy bandwidth {results['copy_bandwidth_gb_s']:.1f} GB/s. Decode tok/s: median (min–max) of {args.repeats}, {args.new_tokens} new tokens.\n\n"
    )
    text += markdown_table(headers, rows)
    if "avx2" in results:
        a = results["avx2"]
        text += f"\n\nForced {a['cpu_capability']}: int4, 512 tokens: transformers {fmt_stat(a['decode_transformers_512'])}, fast step {fmt_stat(a['decode_fast_512'])} tok/s."
    return text


def _timed_copy(dst: torch.Tensor, src: torch.Tensor) -> float:
    t0 = time.perf_counter()
    dst.copy_(src)
    return time.perf_counter() - t0


def _fp32_model():
    return Engine.from_pretrained(device="cpu", weights="fp32", cache_budget_mb=1, progress=lambda _: None).model


if __name__ == "__main__":
    main()
