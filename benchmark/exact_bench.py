"""The cost of the exactness contract (engine/prefill.py), side by side in one run on the bundled model.

    python -m benchmark.exact_bench            # ~3 min on 2 cores
    python -m benchmark.exact_bench --quick

Measured, alternating the variants in every round (medians):

- **partial-hit TTFT** at 512 prompt tokens whose first ``--shared`` are cached: the engine as it runs
  (reuse down to a chunk boundary, the rest in padded chunks of C) for C = 16, 32 and 64, against the
  previous design (reuse every matched token, the suffix in one unpadded call), which was not exact;
- **miss TTFT** at 512 tokens: the chunked prefill against one unpadded call;
- **the reply's second prefill** (step 8, after the last token, off the user's wait): 64 generated tokens;
- **decode tok/s** at 512 tokens of context, both compiled in this process and alternated: the step
  as it runs now (attention over the filled positions, their length dynamic) against the previous
  step (attention over the whole buffer under a mask row, whose sums depended on the capacity).

Writes ``benchmark/results/exact_bench.{json,md}``; the machine line names the CPU and the load.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmark.common import machine_info, markdown_table, print_machine_info, summarize, write_results
from engine import Engine, compiled
from engine.fast_llama import _rms_norm
from engine.prefill import prefill

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

    for _ in range(rounds):
        timed("partial, previous (not exact)", lambda: unpadded(args.shared))
        timed("miss, previous (not exact)", lambda: unpadded(0))
        for chunk in CHUNKS:
            timed(f"partial, C={chunk}", lambda: chunked(args.shared, chunk))
            timed(f"miss, C={chunk}", lambda: chunked(0, chunk))
            timed(f"reply prefill, C={chunk}", lambda: reply_prefill(chunk))

    result = {name: summarize(values) for name, values in times.items()}
    if args.compile == "auto":
        result.update(decode_before_after(engine, ids, args.new_tokens, rounds))
    table = markdown_table(["what", "median ms", "min", "max"], [(k, f"{v['median']:.1f}", f"{v['min']:.1f}", f"{v['max']:.1f}") for k, v in result.items() if k != "decode_tok_s"])
    machine = " | ".join(f"{k}={info[k]}" for k in ("cpu", "cpu_count", "torch_threads", "weights", "decode_step", "loadavg_start", "git_commit") if k in info)
    decode = "\n".join(f"- {k}: {v['median']:.1f} tok/s (min {v['min']:.1f}, max {v['max']:.1f})" for k, v in result.items() if k.startswith("decode"))
    text = (f"machine: {machine}\n\n{rounds} rounds, alternated; prompt {args.prompt_tokens} tokens, {args.shared} cached for the partial hit\n\n{table}\n\n"
            f"Decode, {args.new_tokens} tokens after {args.prompt_tokens}:\n{decode}\n")
    print(text)
    write_results("exact_bench", {"machine": info, "results": result}, text)


@torch.inference_mode()
def decode_before_after(engine: Engine, ids: list[int], new_tokens: int, rounds: int) -> dict:
    """Compiled decode tok/s now (filled views) and before (whole buffer, mask row), alternated in one process."""
    decoder = engine.decoder

    def whole_buffer_step(tokens, pos, k_buffers, v_buffers):  # the previous compiled step, for this comparison only
        x = decoder.embed(tokens)
        cos, sin = decoder.cos[pos], decoder.sin[pos]
        mask = (torch.arange(k_buffers[0].shape[2], device=pos.device) <= pos[:, None]).view(1, 1, 1, -1)
        for layer, k, v in zip(decoder.layers, k_buffers, v_buffers):
            x = layer(x, pos, cos, sin, mask, k, v, decoder.eps)
        return decoder.lm_head(_rms_norm(x, decoder.norm_weight, decoder.eps)[:, -1])

    before = torch.compile(whole_buffer_step, fullgraph=True, options=compiled.inductor_options())
    now = decoder.step  # the engine's compiled step

    def run(step, whole: bool) -> float:
        cache = engine.new_cache(len(ids) + new_tokens + 1)
        token = int(prefill(engine.model, ids, cache, engine.chunk_tokens).argmax())
        layers = cache.layers
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            position = layers[0].get_seq_length()
            for layer in layers:
                layer.reserve(1)
            end = position + 1
            ks = [layer.key_buffer if whole else layer.key_buffer[:, :, :end] for layer in layers]
            vs = [layer.value_buffer if whole else layer.value_buffer[:, :, :end] for layer in layers]
            for t in ks + vs:
                torch._dynamo.mark_dynamic(t, 2)
            token = int(step(torch.tensor([[token]]), torch.tensor([position]), ks, vs).argmax())
            for layer in layers:
                layer.advance(1)
        return new_tokens / (time.perf_counter() - t0)

    run(before, True)  # compiles the previous step (warm-up)
    speeds: dict[str, list[float]] = {"decode now (filled views)": [], "decode before (whole buffer, mask)": []}
    for _ in range(rounds):
        speeds["decode now (filled views)"].append(run(now, False))
        speeds["decode before (whole buffer, mask)"].append(run(before, True))
    return {k: summarize(v) for k, v in speeds.items()}


if __name__ == "__main__":
    main()
