"""The prefix cache's own costs, without a model: lookup, insert and evicting insert against tree size and namespaces.

The tree runs over a pool that holds no bytes (one slot per token, one for the logits), so what is
measured is the tree's bookkeeping alone: the part that runs under the cache's global lock. Each
cell is the median over many operations of the time of one operation, in microseconds.

``--compare PATH`` also runs this script against the ``cache`` package of another checkout (an
older commit: ``git worktree add /tmp/old <commit>``) in a subprocess, and prints both side by side.
The script speaks both the current API (slot pools) and the one before it (byte budgets, sliced
segments), so the same workload runs on each.

    python -m benchmark.cache_bench                      # this checkout
    python -m benchmark.cache_bench --compare /tmp/old   # before / after, side by side

Writes ``benchmark/results/cache_bench.json``; the last line printed is the JSON summary.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "cache_bench.json"
TOKENS = 64  # per sequence: a shared half (a system prompt) and a unique half
SIZES = (10, 100, 1_000, 10_000)  # entries in the tree
NAMESPACE_COUNTS = (10, 10_000)
OPS = 200  # timed operations per cell


class Tree:
    """One workload, over either cache API: slot pools (now) or byte budgets with sliceable segments (before)."""

    def __init__(self, budget_tokens: int) -> None:
        import cache

        self.new_api = hasattr(cache, "SlotAllocator")
        if self.new_api:
            self.cache = cache.PrefixCache(cache.SlotAllocator(budget_tokens, 1), min_tokens=1)
        else:
            self.cache = cache.PrefixCache(budget_bytes=budget_tokens, min_tokens=1)

    def insert(self, seq: list[int], namespace: str = "") -> None:
        if self.new_api:
            from cache import SizedKV

            self.cache.insert(seq, SizedKV(len(seq), logits_slots=1), namespace)
        else:
            self.cache.insert(seq, _OldKV(len(seq)), _OldLogits(), namespace)

    def lookup(self, seq: list[int], namespace: str = "") -> None:
        self.cache.release(self.cache.match_prefix(seq, namespace))


class _OldKV:
    """The pre-pool segment protocol: ``len``, ``nbytes`` and a copying ``slice``; one byte per token."""

    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    @property
    def nbytes(self) -> int:
        return self.n

    def slice(self, start: int, stop: int) -> "_OldKV":
        return _OldKV(stop - start)


class _OldLogits:
    nbytes = 1


def sequences(rng: random.Random, count: int, shared: list[int]) -> list[list[int]]:
    return [shared + [rng.randrange(50_000) for _ in range(TOKENS - len(shared))] for _ in range(count)]


def median_us(op, items) -> float:
    times = []
    for item in items:
        t0 = time.perf_counter()
        op(item)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def bench_size(size: int) -> dict[str, float]:
    """Lookup, insert with room, and evicting insert, in a tree of ``size`` entries."""
    rng = random.Random(size)
    shared = [rng.randrange(50_000) for _ in range(TOKENS // 2)]
    stored = sequences(rng, size, shared)
    per_entry = TOKENS - len(shared) + 1  # unique tokens + logits
    roomy = Tree(budget_tokens=1 << 40)
    for seq in stored:
        roomy.insert(seq)
    lookup = median_us(roomy.lookup, [rng.choice(stored) for _ in range(OPS)])
    insert = median_us(roomy.insert, sequences(rng, OPS, shared))
    full = Tree(budget_tokens=len(shared) + size * per_entry)  # exactly full: each new entry evicts one
    for seq in stored:
        full.insert(seq)
    evicting = median_us(full.insert, sequences(rng, OPS, shared))
    return {"lookup_us": lookup, "insert_us": insert, "evicting_insert_us": evicting}


def bench_namespaces(count: int) -> float:
    """An evicting insert with ``count`` namespaces holding one entry each (the pool full)."""
    rng = random.Random(count)
    tree = Tree(budget_tokens=count * (TOKENS + 1))
    for i, seq in enumerate(sequences(rng, count, [])):
        tree.insert(seq, f"ns-{i}")
    items = [(seq, f"ns-{i % count}") for i, seq in enumerate(sequences(rng, OPS, []))]
    return median_us(lambda item: tree.insert(*item), items)


def run() -> dict:
    import cache

    result = {"cache_module": str(Path(cache.__file__).resolve().parent), "tokens_per_sequence": TOKENS, "ops_per_cell": OPS}
    result["by_size"] = {str(size): bench_size(size) for size in SIZES}
    result["evicting_insert_us_by_namespaces"] = {str(n): bench_namespaces(n) for n in NAMESPACE_COUNTS}
    return result


def table(runs: dict[str, dict]) -> str:
    labels = list(runs)
    lines = [f"{'what':<34}" + "".join(f"{label:>14}" for label in labels)]
    for size in SIZES:
        for metric in ("lookup_us", "insert_us", "evicting_insert_us"):
            name = f"{metric.removesuffix('_us').replace('_', ' ')} µs, {size:,} entries"
            lines.append(f"{name:<34}" + "".join(f"{runs[label]['by_size'][str(size)][metric]:>14.1f}" for label in labels))
    for n in NAMESPACE_COUNTS:
        name = f"evicting insert µs, {n:,} namespaces"
        lines.append(f"{name:<34}" + "".join(f"{runs[label]['evicting_insert_us_by_namespaces'][str(n)]:>14.1f}" for label in labels))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", help="import the cache package from this checkout instead of this one")
    parser.add_argument("--compare", metavar="PATH", help="also run against the checkout at PATH, side by side")
    parser.add_argument("--json-only", action="store_true", help="print only the JSON result (for --compare)")
    args = parser.parse_args()
    if args.tree:
        sys.path.insert(0, str(Path(args.tree).resolve()))
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    runs = {}
    if args.compare:
        out = subprocess.run([sys.executable, __file__, "--tree", args.compare, "--json-only"], capture_output=True, text=True, check=True)
        runs["before"] = json.loads(out.stdout.strip().splitlines()[-1])
    runs["after" if args.compare else "this"] = run()
    if args.json_only:
        print(json.dumps(runs[next(iter(runs))]))
        return
    print(table(runs))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(runs, indent=2) + "\n")
    print(json.dumps(runs))


if __name__ == "__main__":
    main()
