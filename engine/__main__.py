"""Command-line demo: run a prompt twice (a miss, then a hit) and print the text and where the time went.

    python -m engine "What is machine learning?" --system "You are a concise assistant."
"""

from __future__ import annotations

import argparse
import sys

from engine import Engine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="What is machine learning? Answer in two sentences.")
    parser.add_argument("--system", default="You are a helpful, concise assistant. " * 4, help="system prompt")
    parser.add_argument("--model", default=None, help="hub id, model folder or .gguf (default: bundled SmolLM2)")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--no-kv-cache", action="store_true", help="recompute the whole sequence at every step")
    args = parser.parse_args(argv)

    try:
        engine = Engine.from_pretrained(args.model, progress=lambda line: print(line, file=sys.stderr))
        info = engine.info()
        print(f"{info['model']} on {info['device']} ({info['dtype']}), {info['parameters'] / 1e6:.0f}M parameters\n")
        use_cache = not args.no_kv_cache
        for label in ("first request (prefix-cache miss)", "same request again (prefix-cache hit)"):
            print(f"== {label}")
            result = None
            for item in engine.stream(args.prompt, system_prompt=args.system, max_new_tokens=args.max_new_tokens,
                                      use_cache=use_cache, use_prefix_cache=use_cache):
                if isinstance(item, str):
                    print(item, end="", flush=True)
                else:
                    result = item
            t = result.timings
            print(f"\n   cache {result.cache_status}: prompt {t['prompt_tokens']} tokens, prefilled {t['prefill_tokens']}, "
                  f"reused {t['prefix_tokens_saved']}")
            print(f"   TTFT {t['ttft_ms']:.1f} ms (wall {t['wall_ttft_ms']:.1f} ms), decode {t['decode_ms']:.0f} ms "
                  f"for {t['new_tokens']} tokens ({t['decode_tokens_per_sec']:.1f} tok/s), total {t['total_ms']:.0f} ms\n")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("cache:", engine.cache.stats())
    return 0


if __name__ == "__main__":
    sys.exit(main())
