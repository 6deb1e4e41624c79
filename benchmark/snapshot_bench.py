"""Prefix-cache snapshots: save and restore time and size for a cache of N entries, on the bundled model.

The cache is filled with N distinct system prompts of ``--tokens`` tokens each (prefilled and
stored as ``engine/warm.py`` does), growing from one N to the next. At each N: a save to a fresh
directory (``engine/snapshot.Snapshots.save``: copy the slots, write safetensors and JSON, fsync,
rename), how long the save held the tree lock (listing the nodes) and how long it kept the entries
locked against eviction (the copy of their slots, outside the tree lock), then
the cache is cleared and restored from disk (read, checksum, insert through the allocator, then
the check against a fresh prefill), and the check's own time and its largest difference (0: the
same bits, as the exactness contract requires; anything else refuses the snapshot). Also the stamp's cost (the weights' digest),
paid once per start. Prints a table and, last, a JSON summary.

    python -m benchmark.snapshot_bench                       # N = 8, 32, 40 (40 x 256 tokens ~ the 512 MiB budget); ~6 min on 2 busy cores
    python -m benchmark.snapshot_bench --entries 4 16 --tokens 128
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmark.common import machine_info, markdown_table, print_machine_info, settled_decode_step, text_of_tokens, write_results
from cache import DEFAULT_NAMESPACE
from engine import Engine
from engine.snapshot import Snapshots, check
from engine.warm import warm, warm_tokens


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, nargs="+", default=[8, 32, 40], help="cache sizes N to measure, ascending")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per system prompt")
    parser.add_argument("--weights", default="fp32", help="weight format of the bundled model")
    args = parser.parse_args(argv)

    engine = Engine.from_pretrained(device="cpu", weights=args.weights)
    info = machine_info(engine.device, {"model": engine.name, "dtype": str(engine.dtype), "decode_step": settled_decode_step(engine)})
    print_machine_info(info)
    t0 = time.perf_counter()
    Snapshots(engine, tempfile.mkdtemp(prefix="kvci-snap-"), keep=lambda ns: True)
    stamp_s = time.perf_counter() - t0
    print(f"stamp (weights and tokenizer digests): {stamp_s:.2f} s", flush=True)
    body = text_of_tokens(engine.tokenizer, args.tokens)

    rows, results = [], []
    filled = 0
    for n in sorted(args.entries):
        while filled < n:
            warm(engine, [{"role": "system", "content": f"Prompt {filled}. {body}"}], DEFAULT_NAMESPACE)
            filled += 1
        directory = tempfile.mkdtemp(prefix="kvci-snap-")
        snapshots = Snapshots(engine, directory, keep=lambda ns: True)

        t0 = time.perf_counter()
        with engine.cache.exported():  # what a save holds the tree lock for: listing the nodes, locking the leaves
            lock_ms = (time.perf_counter() - t0) * 1000
        saved = snapshots.save()
        cached_bytes = engine.cache.cached_bytes
        engine.cache.clear()
        restored = snapshots.restore()
        assert restored["refused"] is None and engine.cache.cached_bytes == cached_bytes, restored
        newest = f"Prompt {filled - 1}. {body}"
        tokens = warm_tokens(engine.chat, [{"role": "system", "content": newest}])
        t0 = time.perf_counter()
        check(engine, DEFAULT_NAMESPACE, tokens)
        check_s = time.perf_counter() - t0
        row = {
            "entries": n,
            "nodes": saved["entries"],
            "cached_mib": cached_bytes / 2**20,
            "file_mib": saved["bytes"] / 2**20,
            "save_s": saved["seconds"],
            "lock_ms": lock_ms,
            "entries_locked_s": saved["locked_seconds"],
            "restore_s": restored["seconds"],
            "check_s": check_s,
            "check_max_diff": restored["check_max_diff"],
            "loadavg": os.getloadavg()[0],
        }
        results.append(row)
        rows.append([str(n), str(row["nodes"]), row["cached_mib"], row["file_mib"], f"{row['save_s']:.2f}", f"{row['lock_ms']:.2f}", f"{row['entries_locked_s']:.2f}", f"{row['restore_s']:.2f}", f"{row['check_s']:.2f}", f"{row['check_max_diff']:.1e}", f"{row['loadavg']:.1f}"])
        print(f"N={n}: saved {row['file_mib']:.1f} MiB in {row['save_s']:.2f} s, restored in {row['restore_s']:.2f} s (check {row['check_s']:.2f} s)", flush=True)

    table = markdown_table(["N", "nodes", "cached MiB", "on disk MiB", "save s", "tree lock ms", "entries locked s", "restore s", "of which check s", "check max diff", "load avg"], rows)
    print(table)
    summary = {"machine": info, "tokens_per_entry": args.tokens, "stamp_s": stamp_s, "rows": results, "loadavg_end": [round(x, 2) for x in os.getloadavg()]}
    write_results("snapshot_bench", summary, f"{table}\n\nstamp: {stamp_s:.2f} s\n")
    print(json.dumps({"stamp_s": stamp_s, "rows": results}))
    return summary


if __name__ == "__main__":
    main()
