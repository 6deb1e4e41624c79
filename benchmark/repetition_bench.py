"""How often greedy decoding repeats itself on the page's examples and scenarios, per repetition control.

Runs every playground example (``assets/examples.json``, at the page's max new tokens) and every
scenario prompt (``assets/scenarios.json``, at the scenario's own max new tokens, a conversation
with its own earlier replies) through the bundled model, once per setting of
``repetition_penalty`` / ``no_repeat_ngram_size``, and measures each reply's tokens:

- **repeated 4-grams**: the share of the reply's 4-token windows that already occurred earlier
  in the same reply (0 for text that never repeats a phrase; near 1 for a loop);
- **ends in a loop**: the reply was cut by the length limit while its last tokens repeat one unit
  of at most 16 tokens (at least 12 tokens and 3 repetitions of it).

Prints a table per setting and per item, the page's default marked, and a JSON summary last.

    python -m benchmark.repetition_bench                      # ~6 settings, a few minutes on 2 cores
    python -m benchmark.repetition_bench --settings 1.0:0 1.2:0 1.0:3 --max-new-tokens 128   # longer replies loop more
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmark.common import machine_info, markdown_table, print_machine_info, settled_decode_step, write_results
from engine import Engine
from ui.limits import PAGE_MAX_NEW_TOKENS, PAGE_NO_REPEAT_NGRAM_SIZE, PAGE_REPETITION_PENALTY
from ui.scenarios import load_examples, load_scenarios

DEFAULT_SETTINGS = ["1.0:0", "1.1:0", "1.2:0", "1.3:0", "1.0:3", "1.0:4", "1.1:4"]
LOOP_UNIT_MAX, LOOP_MIN_TOKENS = 16, 12


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, help="repetition_penalty:no_repeat_ngram_size pairs")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="override the page's and the scenarios' own lengths")
    parser.add_argument("--weights", default="fp32")
    args = parser.parse_args(argv)
    settings = [(float(p), int(n)) for p, n in (s.split(":") for s in args.settings)]
    page = (PAGE_REPETITION_PENALTY, PAGE_NO_REPEAT_NGRAM_SIZE)
    if page not in settings:
        settings.append(page)

    engine = Engine.from_pretrained(device="cpu", weights=args.weights, progress=lambda _: None)
    info = machine_info("cpu", {"model": engine.name, "weights": args.weights, "decode_step": settled_decode_step(engine)})
    print_machine_info(info)
    results: dict = {"machine": info, "page_default": list(page), "settings": {}}
    for penalty, ngram in settings:
        replies = [measure(engine, item, penalty, ngram, args.max_new_tokens) for item in items()]
        key = f"{penalty:g}:{ngram}"
        results["settings"][key] = {
            "repetition_penalty": penalty,
            "no_repeat_ngram_size": ngram,
            "mean_repeated_4gram_share": sum(r["repeated_4gram_share"] for r in replies) / len(replies),
            "loops": sum(r["ends_in_loop"] for r in replies),
            "replies": replies,
        }
        print(f"{key}: mean repeated 4-grams {results['settings'][key]['mean_repeated_4gram_share']:.3f}, "
              f"{results['settings'][key]['loops']} of {len(replies)} end in a loop", flush=True)
    results["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    markdown = render(results, page)
    print(markdown)
    write_results("repetition_bench" + (f"_{args.max_new_tokens}" if args.max_new_tokens else ""), results, markdown)
    print(json.dumps({k: {m: v[m] for m in ("mean_repeated_4gram_share", "loops")} for k, v in results["settings"].items()} | {"loadavg_end": results["loadavg_end"]}))
    return results


def items() -> list[dict]:
    """The page's requests: each example, then each scenario's prompts (conversations carry their history)."""
    out = [dict(label=f"example {i + 1}", system_prompt=system or None, prompt=prompt, max_new_tokens=PAGE_MAX_NEW_TOKENS, conversation=None)
           for i, (system, prompt) in enumerate(load_examples())]
    for scenario in load_scenarios().values():
        history: list[dict[str, str]] | None = [] if scenario.conversation else None
        for i, prompt in enumerate(scenario.prompts):
            out.append(dict(label=f"{scenario.name} #{i + 1}", system_prompt=scenario.system_prompt, prompt=scenario.message(prompt),
                            max_new_tokens=scenario.max_new_tokens, conversation=history))
    return out


def measure(engine: Engine, item: dict, penalty: float, ngram: int, max_new_tokens: int | None) -> dict:
    """One reply and its repetition figures. A conversation's history is its own replies under this setting."""
    history = item["conversation"]
    result = engine.generate(
        item["prompt"], system_prompt=item["system_prompt"], history=list(history) if history is not None else None,
        max_new_tokens=max_new_tokens or item["max_new_tokens"], repetition_penalty=penalty, no_repeat_ngram_size=ngram,
    )
    if history is not None:
        history += [{"role": "user", "content": item["prompt"]}, {"role": "assistant", "content": result.text}]
    tokens = result.token_ids
    return {
        "item": item["label"],
        "tokens": len(tokens),
        "repeated_4gram_share": repeated_ngram_share(tokens, 4),
        "ends_in_loop": result.finish_reason == "length" and loop_unit(tokens) is not None,
        "text": result.text,
    }


def repeated_ngram_share(tokens: list[int], n: int) -> float:
    """Share of the n-token windows of ``tokens`` that occurred earlier in ``tokens``."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    seen: set[tuple[int, ...]] = set()
    repeated = 0
    for gram in grams:
        repeated += gram in seen
        seen.add(gram)
    return repeated / len(grams) if grams else 0.0


def loop_unit(tokens: list[int]) -> int | None:
    """The length of the unit the tail of ``tokens`` repeats (at least 3 times, 12 tokens), or None."""
    for unit in range(1, LOOP_UNIT_MAX + 1):
        span = max(3 * unit, LOOP_MIN_TOKENS)
        tail = tokens[-span:]
        if len(tail) == span and all(tail[i] == tail[i - unit] for i in range(unit, span)):
            return unit
    return None


def render(results: dict, page: tuple[float, int]) -> str:
    page_key = f"{page[0]:g}:{page[1]}"
    rows = [[f"{v['repetition_penalty']:g}", str(v["no_repeat_ngram_size"]), f"{v['mean_repeated_4gram_share']:.3f}", f"{v['loops']} of {len(v['replies'])}",
             "page default" if key == page_key else ""] for key, v in results["settings"].items()]
    summary = markdown_table(["repetition_penalty", "no_repeat_ngram_size", "mean repeated 4-grams", "end in a loop", ""], rows)
    keys = list(results["settings"])
    per_item = [[reply["item"]] + [f"{results['settings'][k]['replies'][i]['repeated_4gram_share']:.2f}{' loop' if results['settings'][k]['replies'][i]['ends_in_loop'] else ''}" for k in keys]
                for i, reply in enumerate(results["settings"][keys[0]]["replies"])]
    return summary + "\n\nRepeated 4-gram share per reply (penalty:ngram):\n\n" + markdown_table(["reply"] + keys, per_item)


if __name__ == "__main__":
    main()
