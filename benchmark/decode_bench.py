"""Decode speed per weight format, eager and compiled step side by side in one run, with llama.cpp beside them.

For each format (fp32, bf16, int8, int4) the bundled model is loaded through
``Engine.from_pretrained(weights=...)`` and measured: decode tokens/s after a prompt of 128 / 512 /
1,024 tokens with the eager and the compiled decode step (and, for the float formats, transformers'
own forward; the quantized formats decode only through our step), greedy, ``--new-tokens`` each,
median of ``--repeats``, the steps interleaved; prefill tokens/s of a 512-token prompt; wall TTFT of
an exact and of a partial prefix-cache hit (a ~400-token system prompt); teacher-forced quality
against fp32 through the decode step (``engine/quality.py``); and the bandwidth ceiling: the
machine's copy bandwidth over the weight bytes one step reads (KV reads left out).

Compile time, cold and warm, is measured in two child processes sharing a fresh inductor cache
folder (``--compile-times``, int4 by default). ``--avx2`` repeats int4 at 512 tokens in a child with
``ATEN_CPU_CAPABILITY=avx2`` (a CPU without AVX-512). llama.cpp's ``llama-server`` (built by
``python3 dev.py llama-server``, or ``KVCI_LLAMA_SERVER``) decodes the same GGUF after the same
512-token prompt with as many threads as torch uses. Prints a table and, last, a JSON summary.

    python -m benchmark.decode_bench                    # everything, ~15 min on a quiet 2-core CPU
    python -m benchmark.decode_bench --formats int4 --contexts 512 --repeats 3 --avx2
    python -m benchmark.decode_bench --device cuda --formats fp32 bf16 --compile-times bf16   # on a GPU

On a GPU (``--device cuda``) the same columns are measured there: the copy bandwidth is the
device's, and llama-server and the AVX2 figure are left out (they are CPU figures).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# OMP_WAIT_POLICY is left as the app runs it (unset: OpenMP's default, which spins briefly), as in
# every benchmark here: PASSIVE measured a slower decode than the app's, since a step is hundreds of
# tiny parallel regions and sleeping threads wake for each one (int4 eager at 512 tokens: 12-21
# tok/s PASSIVE, 33-50 unset or ACTIVE; llama-server, which inherits the variable, 15 against 33).

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO_ROOT))

from benchmark.common import fmt, fmt_stat, handbook_text, machine_info, markdown_table, print_machine_info, question, summarize, sync, text_of_tokens, write_results
from engine import Engine, loading, quant
from engine.engine import _TransformersStep
from engine.prefill import prefill
from engine.quality import passes, quality_token_ids, teacher_forced

FORMATS = ["fp32", "bf16", "int8", "int4"]
DEVICE, MODEL = "cpu", None  # --device, --model
COMPILE_TIMEOUT_S = 1800


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", default=FORMATS, choices=FORMATS)
    parser.add_argument("--contexts", nargs="+", type=int, default=[128, 512, 1024])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="measure the eager step only")
    parser.add_argument("--compile-times", nargs="*", default=["int4"], choices=FORMATS, help="formats whose cold and warm compile time is measured in child processes (default int4; none: empty)")
    parser.add_argument("--avx2", action="store_true", help="also measure int4 at 512 tokens with ATEN_CPU_CAPABILITY=avx2")
    parser.add_argument("--no-llama", action="store_true", help="leave llama-server out even where it is built")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--model", default=None, help="hub id, folder or .gguf (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--child", choices=["measure", "compile-time"], help=argparse.SUPPRESS)  # the child processes
    args = parser.parse_args(argv)
    global DEVICE, MODEL
    DEVICE, MODEL = args.device, args.model
    if args.child == "compile-time":
        return compile_time_child(args.formats[0])
    if args.child or "TORCHINDUCTOR_CACHE_DIR" in os.environ:  # a child, or a folder the caller chose: use it
        return run(args)
    # One fresh inductor cache folder for the run, removed after it (children inherit it): the first
    # compile of a format is cold, later ones warm.
    with tempfile.TemporaryDirectory(prefix="decode-bench-inductor-") as folder:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
        try:
            return run(args)
        finally:
            del os.environ["TORCHINDUCTOR_CACHE_DIR"]


def run(args) -> dict:
    """The measurements (``main`` gives them their inductor cache folder); a child prints its results as JSON."""
    on_cpu = torch.device(DEVICE).type == "cpu"
    child = args.child == "measure"
    info = machine_info(DEVICE, {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "model": MODEL or "bundled"})
    if not child:
        print_machine_info(info)
    bandwidth = copy_bandwidth()
    results: dict = {"machine": info, "copy_bandwidth_gb_s": bandwidth / 1e9, "formats": {}}
    if not child and not args.no_compile:
        results["compile_seconds"] = {name: compile_times(name) for name in args.compile_times}
        print(f"compile seconds: {json.dumps(results['compile_seconds'])}", flush=True)
    reference = None
    for name in args.formats:
        engine = _engine(name, cache_budget_mb=64, min_cached_tokens=16)
        row = measure_format(engine, args, bandwidth)
        prompt_512 = text_of_tokens(engine.tokenizer, 512)  # llama-server's prompt: the same text
        if not child:
            ids = quality_token_ids(engine.tokenizer)
            scored = teacher_forced(engine, ids)
            reference = reference or (scored if name == "fp32" else teacher_forced(_fp32_engine(), ids))
            row["quality"] = scored.against(reference)
            row["quality"]["passes"] = passes(row["quality"])
        results["formats"][name] = row
        if not child:
            print(f"{name}: {json.dumps(row)}", flush=True)  # as it goes: a long run interrupted still says what it measured
        del engine
    if child:
        print(json.dumps(results))
        return results
    if not args.no_llama and on_cpu:
        results["llama_server"] = llama_server_figure(args, prompt_512)
    if args.avx2 and on_cpu:
        results["avx2"] = avx2_figure(args)
    markdown = render(results, args)
    print(markdown)
    name = "decode_bench" if set(args.formats) == set(FORMATS) else "decode_bench_" + "_".join(args.formats)  # a run of some formats keeps the others' files
    write_results(name if on_cpu else f"{name}_{torch.device(DEVICE).type}", results, markdown)
    summary = {name: {"eager_512": _median(row, "eager_512"), "compiled_512": _median(row, "compiled_512"), "ceiling": row["ceiling_tok_s"]} for name, row in results["formats"].items()}
    print(json.dumps({"summary": summary, "compile_seconds": results.get("compile_seconds"), "llama_server": results.get("llama_server"), "avx2": results.get("avx2"), "loadavg_end": [round(x, 2) for x in os.getloadavg()]}))
    return results


def measure_format(engine: Engine, args, bandwidth: float) -> dict:
    """Decode tok/s per context and step, prefill tok/s, exact and partial hit TTFT, for one loaded engine."""
    decoder = engine.decoder
    row: dict = {"weights": engine.info()["weights_detail"], "weight_bytes": decoder.bytes_per_step()}
    row["ceiling_tok_s"] = bandwidth / row["weight_bytes"]
    steps = {"eager": decoder.forward_batch}
    if not args.no_compile:
        engine.compiler.start()
        engine.compiler.wait(COMPILE_TIMEOUT_S)
        row["compile"] = engine.compiler.status()
        if engine.compiler.state == "compiled":
            steps["compiled"] = decoder.step
    transformers = _TransformersStep(engine) if not quant.decode_linears(engine.model) else None  # int8/int4 decode only through the step
    for context in args.contexts:
        prompt = engine.tokenizer(text_of_tokens(engine.tokenizer, context)).input_ids[:context]
        runs: dict[str, list[float]] = {step: [] for step in [*steps, *(["transformers"] if transformers else [])]}
        for repeat in range(args.repeats):
            for step in list(runs) if repeat % 2 == 0 else list(runs)[::-1]:  # interleaved, order alternating
                if step == "transformers":
                    runs[step].append(decode_tokens_per_s(engine, transformers.decode_one_token, prompt, args.new_tokens))
                else:
                    decoder.step = steps[step]
                    runs[step].append(decode_tokens_per_s(engine, decoder.decode_one_token, prompt, args.new_tokens))
        for step, values in runs.items():
            row[f"{step}_{context}"] = summarize(values)
    decoder.step = steps.get("compiled", decoder.forward_batch)
    prompt = engine.tokenizer(text_of_tokens(engine.tokenizer, 512)).input_ids[:512]
    row["prefill_512_tok_s"] = summarize([prefill_tokens_per_s(engine, prompt) for _ in range(max(args.repeats // 2, 1))])
    row.update(hit_ttfts(engine, max(args.repeats // 2, 1)))
    return row


@torch.inference_mode()
def decode_tokens_per_s(engine: Engine, step, prompt: list[int], new_tokens: int) -> float:
    """Prefill ``prompt`` (not timed), then ``new_tokens`` greedy steps of ``step(token, cache)`` timed on the wall clock."""
    cache = engine.new_cache(len(prompt) + new_tokens + 1)
    token = int(prefill(engine.model, prompt, cache, engine.chunk_tokens).argmax())  # int(): waits for the device too
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        token = int(step(token, cache).argmax())
    return new_tokens / (time.perf_counter() - t0)


def prefill_tokens_per_s(engine: Engine, prompt: list[int]) -> float:
    """As the engine prefills (engine/prefill.py): through the decode step where its rows are invariant, else the model's aligned chunks."""
    sync(engine.device)
    t0 = time.perf_counter()
    engine.prefill_sequence(prompt)
    sync(engine.device)
    return len(prompt) / (time.perf_counter() - t0)


def hit_ttfts(engine: Engine, repeats: int) -> dict:
    """Wall TTFT (ms) of a miss, then an exact hit (the same request) and a partial hit (same system prompt, another question)."""
    out: dict[str, list[float]] = {"miss_wall_ttft_ms": [], "exact_hit_wall_ttft_ms": [], "partial_hit_wall_ttft_ms": []}
    for repeat in range(repeats):
        system = f"Handbook edition {repeat}.\n\n" + handbook_text(12)  # a fresh prefix per repeat: the first request misses
        for key, i in (("miss_wall_ttft_ms", 0), ("exact_hit_wall_ttft_ms", 0), ("partial_hit_wall_ttft_ms", 1)):
            result = engine.generate(question(i), system_prompt=system, max_new_tokens=1)
            assert result.cache_status == {"miss_wall_ttft_ms": "miss", "exact_hit_wall_ttft_ms": "hit", "partial_hit_wall_ttft_ms": "partial"}[key], result.cache_status
            out[key].append(result.timings["wall_ttft_ms"])
    engine.cache.clear()
    return {key: summarize(values) for key, values in out.items()} | {"hit_prompt_tokens": result.timings["prompt_tokens"]}


def copy_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes/s moved by a large tensor copy (read + write), best of ``repeats``: what a decode step can stream at most."""
    src = torch.ones(megabytes << 18, device=DEVICE)  # float32: megabytes MiB
    dst = torch.empty_like(src)
    _timed_copy(dst, src)  # warm-up
    best = min(_timed_copy(dst, src) for _ in range(repeats))
    return 2 * src.numel() * 4 / best


def compile_times(name: str) -> dict:
    """Seconds to compile ``name``'s step in a child with the run's (still empty) inductor cache folder (cold), then in another reusing it (warm)."""
    return {kind: _child(["--child", "compile-time", "--formats", name], {}) for kind in ("cold", "warm")}


def compile_time_child(name: str) -> dict:
    engine = _engine(name)
    engine.compiler.start()
    engine.compiler.wait(COMPILE_TIMEOUT_S)
    status = engine.compiler.status()
    print(json.dumps(status))
    return status


def avx2_figure(args) -> dict:
    """int4 at 512 tokens in a child process that sees only AVX2 kernels."""
    cmd = ["--child", "measure", "--formats", "int4", "--contexts", "512", "--repeats", str(args.repeats), "--new-tokens", str(args.new_tokens)]
    # Its own inductor cache folder, as engine/compiled.py keeps one per kind of kernels: inductor's
    # cache key leaves the kind out, and the AVX-512 graph of this run decodes zeros under AVX2.
    with tempfile.TemporaryDirectory(prefix="decode-bench-inductor-avx2-") as folder:
        child = _child(cmd + (["--no-compile"] if args.no_compile else []), {"ATEN_CPU_CAPABILITY": "avx2", "TORCHINDUCTOR_CACHE_DIR": folder})
    row = child["formats"]["int4"]
    return {"cpu_capability": child["machine"]["cpu_capability"], "eager_512": row.get("eager_512"), "compiled_512": row.get("compiled_512"), "compile": row.get("compile")}


def llama_server_figure(args, prompt: str) -> dict:
    """llama-server's own decode and prompt tok/s (its ``timings``) on the bundled GGUF after the same 512-token prompt."""
    import socket

    import httpx

    sys.path.insert(0, str(REPO_ROOT))
    import dev  # standard library only: where it builds llama-server

    binary = os.environ.get("KVCI_LLAMA_SERVER") or dev.llama_server_binary()
    gguf = loading.bundled_gguf_path()
    if not binary or gguf is None:
        return {"measured": False, "reason": "not measured in this run: " + (dev.llama_server_not_built_reason() if not binary else "no bundled GGUF")}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = torch.get_num_threads()
    command = [str(binary), "-m", str(gguf), "--port", str(port), "-c", "2048", "-t", str(threads), "-np", "1", "--no-webui", "--host", "127.0.0.1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            return {"measured": False, "reason": f"llama-server did not become healthy (exit code {process.poll()})"}
        decode, prompt_tps = [], []
        for _ in range(args.repeats):
            body = {"prompt": prompt, "n_predict": args.new_tokens, "temperature": 0, "cache_prompt": False, "ignore_eos": True}
            timings = httpx.post(url + "/completion", json=body, timeout=600).json()["timings"]
            decode.append(timings["predicted_per_second"])
            prompt_tps.append(timings["prompt_per_second"])
        return {"measured": True, "threads": threads, "decode_512": summarize(decode), "prefill_512_tok_s": summarize(prompt_tps)}
    finally:
        process.terminate()
        process.wait(30)


def render(results: dict, args) -> str:
    steps = ["transformers", "eager", "compiled"]
    headers = ["format", "MB read / token", "ceiling tok/s"]
    for context in args.contexts:
        headers += [f"{step} @ {context}" for step in steps]
    headers += ["prefill 512 tok/s", "miss / exact / partial TTFT ms", "top-1 vs fp32", "NLL vs fp32", "quality bar"]
    rows = []
    for name, row in results["formats"].items():
        cells = [name, row["weight_bytes"] / 1e6, row["ceiling_tok_s"]]
        for context in args.contexts:
            cells += [fmt_stat(row.get(f"{step}_{context}")) for step in steps]
        ttft = " / ".join(fmt_stat(row[k], 0) for k in ("miss_wall_ttft_ms", "exact_hit_wall_ttft_ms", "partial_hit_wall_ttft_ms"))
        q = row.get("quality", {})
        cells += [fmt_stat(row["prefill_512_tok_s"], 0), ttft, f"{q.get('top1_agreement', 0):.1%}", f"{q.get('nll_ratio', 1) - 1:+.2%}", fmt(q.get("passes"))]
        rows.append(cells)
    m = results["machine"]
    text = (
        f"Machine: {m.get('gpu') + ' (' + m['device'] + '), ' if m['device'] != 'cpu' and m.get('gpu') else ''}{m['cpu']}, {m['torch_threads']} threads, {m['cpu_capability']}, torch {m['torch']}, OMP_WAIT_POLICY {m.get('omp_wait_policy')}, load average {m['loadavg_start']} at start; "
        f"copy bandwidth {results['copy_bandwidth_gb_s']:.1f} GB/s. Decode tok/s: median (min–max) of {args.repeats}, {args.new_tokens} new tokens. "
        "int8/int4 prefill in fp32 and decode only through our step (no transformers column).\n\n"
    )
    text += markdown_table(headers, rows)
    for name, row in results["formats"].items():
        if row.get("compile") and row["compile"]["state"] != "compiled":
            text += f"\n\n{name}: decode step {row['compile']['description']}."
    for name, times in (results.get("compile_seconds") or {}).items():
        text += f"\n\nCompile time, {name}: cold {_seconds(times['cold'])}, warm inductor cache {_seconds(times['warm'])}."
    llama = results.get("llama_server")
    if llama:
        text += (
            f"\n\nllama-server (same GGUF, {llama['threads']} threads, 512-token prompt): decode {fmt_stat(llama['decode_512'])} tok/s, prompt {fmt_stat(llama['prefill_512_tok_s'], 0)} tok/s."
            if llama["measured"] else f"\n\nllama-server: {llama['reason']}."
        )
    if "avx2" in results:
        a = results["avx2"]
        text += f"\n\nForced {a['cpu_capability']}: int4, 512 tokens: eager {fmt_stat(a['eager_512'])}, compiled {fmt_stat(a['compiled_512'])} tok/s."
    return text


def _child(argv: list[str], env: dict[str, str]) -> dict:
    cmd = [sys.executable, "-m", "benchmark.decode_bench", *argv, "--device", DEVICE, *(["--model", MODEL] if MODEL else [])]
    out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, cwd=REPO_ROOT, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _seconds(status: dict) -> str:
    return f"{status['compile_seconds']:.0f} s" if status.get("compile_seconds") else status["description"]


def _median(row: dict, key: str) -> float | None:
    return (row.get(key) or {}).get("median")


def _timed_copy(dst: torch.Tensor, src: torch.Tensor) -> float:
    sync(dst.device)
    t0 = time.perf_counter()
    dst.copy_(src)
    sync(dst.device)
    return time.perf_counter() - t0


def _engine(weights: str, **settings) -> Engine:
    """The model of this run (``--model``, ``--device``) in ``weights``, its step left eager (measure_format compiles it)."""
    return Engine.from_pretrained(MODEL, device=DEVICE, weights=weights, compile="off", progress=lambda _: None, **settings)


def _fp32_engine() -> Engine:
    return _engine("fp32", cache_budget_mb=1)



if __name__ == "__main__":
    main()
