"""The cost of the exactness contract (engine/prefill.py), side by side in one run on the bundled model.

    python -m benchmark.exact_bench            # ~3 min on 2 cores
    python -m benchmark.exact_bench --quick

Measured, alternating the variants in every round (medians):

- **partial-hit TTFT** at 512 prompt tokens whose first ``--shared`` are cached: the engine as it runs
  (reuse down to a chunk boundary, the rest in padded chunks of C) for C = 16, 32 and 64, against the
  previous design (reuse every matched token, the suffix in one unpadded call), which was not exact;
- **miss TTFT** at 512 tokens: the chunked prefill against one unpadded call;
- **the reply's second prefill** (step 8, after the last token, off the user's wait): 64 generated tokens;
- **the prefill through the decode step** (``engine.prefill.step_prefill_chunks``, what the int4 and int8
  engines run): the miss and the partial hit (every matched token reused, no chunk boundary) in calls of
  C = 16, 32 and 64 rows, each C up to the call size the step was checked row-invariant for (32 by
  default: ``EngineConfig.chunk_tokens``). It stores a reply as decoded, so it has no second prefill.

``--compile auto`` measures the step compiled, as the app runs it.

(The decode comparison of commit ba97311, the step over filled views against the previous one over the
whole buffer, lived here until the step became batched (``engine/decode_attention.py``); its figures are
in benchmark/README.md and its code in git history.)

Writes ``benchmark/results/exact_bench.{json,md}``; the machine line names the CPU and the load.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmark.common import machine_info, markdown_table, print_machine_info, summarize, write_results
from engine import Engine
from engine.prefill import prefill, run_to_end, step_prefill_chunks
from engine.scheduler import scheduler

CHUNKS = (16, 32, 64)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--shared", type=int, default=500, help="cached tokens of the partial hit")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--compile", default="off", choices=["auto", "off"])
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    args = parser.parse_args(argv)
    rounds = 3 if args.quick else args.rounds

    engine = Engine.from_pretrained(compile=args.compile)
    engine.compiler.settled()
    info = machine_info(engine.device, {"weights": engine.info()["weights_detail"], "decode_step": engine.compiler.describe()})
    print_machine_info(info)
    vocab = engine.pool.vocab_size
    ids = [(i * 7919 + 13) % (vocab - 100) + 50 for i in range(args.prompt_tokens)]
    times: dict[str, list[float]] = {}

    def timed(name: str, fn) -> None:
        t0 = time.perf_counter()
        fn()
        times.setdefault(name, []).append((time.perf_counter() - t0) * 1000)

    _, full_cache = engine.prefill_sequence(ids)  # the cached prefix's rows
    rows = {i: (layer.keys.clone(), layer.values.clone()) for i, layer in enumerate(full_cache.layers)}

    def reused_cache(n: int):
        cache = engine.new_cache(len(ids) + args.new_tokens)
        for i, layer in enumerate(cache.layers):
            if n:
                layer.update(rows[i][0][:, :, :n], rows[i][1][:, :, :n])
        return cache

    @torch.inference_mode()
    def unpadded(start: int) -> None:
        cache = reused_cache(start)
        engine.model(input_ids=torch.tensor([ids[start:]]), cache=cache, use_cache=True, logits_to_keep=1)

    def chunked(start: int, chunk: int) -> None:
        aligned = start // chunk * chunk
        prefill(engine.model, ids[aligned:], reused_cache(aligned), chunk)

    def reply_prefill(chunk: int) -> None:
        cache = reused_cache(len(ids) // chunk * chunk)
        prefill(engine.model, (ids + ids[: args.new_tokens])[len(ids) // chunk * chunk : len(ids) + args.new_tokens - 1], cache, chunk)

    def through_the_step(start: int, chunk: int) -> None:
        run_to_end(step_prefill_chunks(engine.decoder, ids[start:], reused_cache(start), chunk))

    def one_round() -> None:  # on the model's thread, as the engine prefills (one OpenMP team: engine/scheduler.py)
        timed("partial, previous (not exact)", lambda: unpadded(args.shared))
        timed("miss, previous (not exact)", lambda: unpadded(0))
        for chunk in CHUNKS:
            timed(f"partial, C={chunk}", lambda: chunked(args.shared, chunk))
            timed(f"miss, C={chunk}", lambda: chunked(0, chunk))
            timed(f"reply prefill, C={chunk}", lambda: reply_prefill(chunk))
            if chunk <= engine.decoder.invariant_rows:  # larger calls were not checked row-invariant: the step would run them row by row
                timed(f"partial through the step, C={chunk}", lambda: through_the_step(args.shared, chunk))
                timed(f"miss through the step, C={chunk}", lambda: through_the_step(0, chunk))

    if not engine.decoder.rows_invariant:
        print("the decode step's rows are not invariant here: no prefill through the step to measure")
    for _ in range(rounds):
        scheduler().call(one_round)

    result = {name: summarize(values) for name, values in times.items()}
    table = markdown_table(["what", "median ms", "min", "max"], [(k, f"{v['median']:.1f}", f"{v['min']:.1f}", f"{v['max']:.1f}") for k, v in result.items() if k != "decode_tok_s"])
    machine = " | ".join(f"{k}={info[k]}" for k in ("cpu", "cpu_count", "torch_threads", "weights", "decode_step", "loadavg_start", "git_commit") if k in info)
    decode = "\n".join(f"- {k}: {v['median']:.1f} tok/s (min {v['min']:.1f}, max {v['max']:.1f})" for k, v in result.items() if k.startswith("decode"))
    text = (f"machine: {machine}\n\n{rounds} rounds, alternated; prompt {args.prompt_tokens} tokens, {args.shared} cached for the partial hit\n\n{table}\n\n"
            f"Decode, {args.new_tokens} tokens after {args.prompt_tokens}:\n{decode}\n")
    print(text)
    write_results("exact_bench", {"machine": info, "results": result}, text)


if __name__ == "__main__":
    main()
