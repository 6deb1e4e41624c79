"""Snapshots of the prefix cache: cache/snapshot.py over a simulated pool (no model), then engine/snapshot.py on the tiny model."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from cache import DEFAULT_NAMESPACE, PrefixCache
from cache import snapshot as disk
from engine import Engine, EngineConfig
from engine.snapshot import Snapshots, stamp, status_line

SLOT_BYTES = 16
STAMP = {"model": "simulated", "kv_dtype": "int"}


class SimulatedBytes:
    """A SimulatedPool's values as bytes: JSON, zero-padded to the slot size (what a SlotBytes must round-trip)."""

    def __init__(self, pool) -> None:
        self.pool = pool
        self.slot_bytes = pool.slot_bytes

    def read(self, slots):
        rows = np.zeros((len(slots), self.slot_bytes), dtype=np.uint8)
        for i, slot in enumerate(slots):
            data = json.dumps(self.pool.data[slot]).encode()
            rows[i, : len(data)] = np.frombuffer(data, dtype=np.uint8)
        return rows

    def write(self, slots, rows):
        for slot, row in zip(slots, rows):
            self.pool.data[slot] = json.loads(bytes(row).rstrip(b"\0"))


def make(slots=1000, **kwargs):
    return PrefixCache.simulated(slots, slot_bytes=SLOT_BYTES, min_tokens=2, **kwargs)


def put(cache, seq, logits, namespace=DEFAULT_NAMESPACE):
    return cache.insert(seq, cache.pool.source(seq, logits), namespace)


def hit_of(cache, seq, namespace=DEFAULT_NAMESPACE):
    """(kind, tokens read back from the matched slots, logits) of a lookup, released."""
    match = cache.match_prefix(seq, namespace)
    try:
        logits = cache.pool.read(match.logits_slots)[0] if match.logits_slots else None
        return match.kind, cache.pool.read(match.slots), logits
    finally:
        cache.release(match)


def saved(tmp_path, cache, **kwargs):
    return disk.save(cache, SimulatedBytes(cache.pool), tmp_path, STAMP, **kwargs)


def restored(tmp_path, slots=1000, stamp=STAMP, **kwargs):
    cache = make(slots, **kwargs)
    snapshot = disk.load(tmp_path, stamp)
    return cache, disk.restore(cache, SimulatedBytes(cache.pool), snapshot)


# ---------------------------------------------------------------------- cache/snapshot.py, no model


def test_round_trip_keeps_every_sequence_its_kv_and_logits(tmp_path):
    """A tree with shared prefixes comes back with the same hits, the same bytes in the slots, and the same sizes."""
    cache = make()
    sequences = {(1, 2, 3, 4): "a", (1, 2, 3, 9, 9): "b", (1, 2, 7): "c", (5, 6, 7, 8): "d"}
    for seq, logits in sequences.items():
        put(cache, list(seq), logits)
    report = saved(tmp_path, cache)
    assert report["entries"] == cache.stats()["cache_size"] and report["bytes"] > 0
    back, done = restored(tmp_path)
    back.check_invariants()
    for seq, logits in sequences.items():
        assert hit_of(back, list(seq)) == ("hit", list(seq), logits)
    assert back.stats()["cached_tokens"] == cache.stats()["cached_tokens"] and back.cached_bytes == cache.cached_bytes
    assert done["dropped"] == 0


def test_recency_survives_so_eviction_order_does(tmp_path):
    """The restored cache evicts the entry the saved one would have evicted first (least recently used)."""
    cache = make()
    put(cache, [1, 1, 1], "old")
    put(cache, [2, 2, 2], "new")
    hit_of(cache, [1, 1, 1])  # now [2, 2, 2] is the least recently used
    saved(tmp_path, cache)
    back, _ = restored(tmp_path, slots=8)  # 8 slots: both entries (4 each), no room for another
    put(back, [3, 3, 3], "x")
    assert hit_of(back, [1, 1, 1])[0] == "hit" and hit_of(back, [2, 2, 2])[0] == "miss"


def saved_with_a_pin(tmp_path, ttl_s, saved_at):
    """A cache with [9 9 9 9] pinned for ``ttl_s`` at t=0, saved at ``saved_at``; returns its fake clock."""
    now = [0.0]
    cache = make(clock=lambda: now[0])
    put(cache, [9, 9, 9, 9], "pinned")
    cache.pin([9, 9, 9, 9], ttl_s=ttl_s)
    now[0] = saved_at
    saved(tmp_path, cache)
    return now


def test_pins_and_their_remaining_ttl_survive(tmp_path):
    """A pin comes back pinned, with the TTL it had left (not a fresh one), and keeps the entry through a flood."""
    saved_with_a_pin(tmp_path, ttl_s=100, saved_at=40.0)
    manifest = json.loads((tmp_path / disk.MANIFEST).read_text())
    assert [n["pin_expires_in_s"] for n in manifest["nodes"] if n["pin_ends_here"]] == [60.0]
    back, done = restored(tmp_path, slots=40)
    assert done["pins"] == 1 and back.stats()["pins"] == 1
    for i in range(30):
        put(back, [100 + i, 1, 2], str(i))
    assert hit_of(back, [9, 9, 9, 9])[0] == "hit"


def test_a_restored_pin_keeps_its_ttl_through_restarts(tmp_path):
    """Issue 24 defect 2: a restored pin got its time left as its TTL, so every hit renewed it to the
    shortened value and each restart shortened it again. It comes back with its time left, renewed to the whole TTL."""
    now = saved_with_a_pin(tmp_path, ttl_s=100, saved_at=90.0)
    back, done = restored(tmp_path, clock=lambda: now[0])
    with back.exported() as nodes:
        assert [(n.pin_expires_in_s, n.pin_ttl_s) for n in nodes if n.pin_ends_here] == [(10.0, 100)]
    hit_of(back, [9, 9, 9, 9])  # a hit renews the pin to its whole TTL, as on the original cache
    with back.exported() as nodes:
        assert [n.pin_expires_in_s for n in nodes if n.pin_ends_here] == [100.0]
    now[0] = 150.0
    saved(tmp_path, back)  # a second restart: the TTL is still 100
    again, _ = restored(tmp_path, clock=lambda: now[0])
    with again.exported() as nodes:
        assert [(n.pin_expires_in_s, n.pin_ttl_s) for n in nodes if n.pin_ends_here] == [(40.0, 100)]


def test_restore_counts_only_what_it_stored(tmp_path):
    """Issue 24 defect 3: restore counted every entry it tried, stored or not (a path shorter than today's
    min_tokens), and the pin after it then failed. Entries not stored are counted as dropped, and their pins skipped."""
    cache = make()
    put(cache, [1, 2, 3], "short")
    cache.pin([1, 2, 3])
    put(cache, [5, 6, 7, 8, 9, 10], "long")
    saved(tmp_path, cache)
    back = PrefixCache.simulated(1000, slot_bytes=SLOT_BYTES, min_tokens=5)  # restarted with a larger min_tokens
    done = disk.restore(back, SimulatedBytes(back.pool), disk.load(tmp_path, STAMP))
    assert (done["entries"], done["dropped"], done["pins"], done["pins_refused"]) == (1, 1, 0, 0)
    assert [seq for _, seq, _ in done["sequences"]] == [[5, 6, 7, 8, 9, 10]]
    back.check_invariants()


def test_only_the_namespaces_kept_are_saved(tmp_path):
    """The keep predicate (per-session mode: the shared namespace only) decides what reaches the disk."""
    cache = make()
    put(cache, [1, 2, 3], "shared")
    put(cache, [1, 2, 3], "alice's", namespace="session-alice")
    saved(tmp_path, cache, keep=lambda ns: ns == DEFAULT_NAMESPACE)
    text = (tmp_path / disk.MANIFEST).read_text()
    assert "session-alice" not in text
    back, _ = restored(tmp_path)
    assert hit_of(back, [1, 2, 3])[0] == "hit" and hit_of(back, [1, 2, 3], "session-alice")[0] == "miss"


def test_a_smaller_budget_keeps_the_shallow_and_recent_and_holds(tmp_path):
    """Restoring into fewer slots drops the deepest, then oldest entries; the tree stays whole and within budget."""
    cache = make()
    put(cache, [1, 2], "short")
    put(cache, [1, 2, 3, 4, 5, 6, 7, 8], "deep")
    put(cache, [5, 5, 5], "old")
    put(cache, [6, 6, 6], "recent")
    saved(tmp_path, cache)
    back, done = restored(tmp_path, slots=12)  # [1 2]+1, [6 6 6]+1, [5 5 5]+1 = 11 slots; the deep tail does not fit
    back.check_invariants()
    assert back.cached_bytes <= back.budget_bytes and done["dropped"] >= 1
    assert hit_of(back, [1, 2])[0] == "hit" and hit_of(back, [6, 6, 6])[0] == "hit"
    assert hit_of(back, [1, 2, 3, 4, 5, 6, 7, 8])[0] != "hit"


def test_a_namespace_over_its_quota_is_trimmed_not_evicting(tmp_path):
    """Per-session quota: a session's restored entries fit its share; nothing restored evicts anything restored."""
    cache = make()
    for i in range(6):
        put(cache, [i, i, i, i], str(i), namespace="session-a")
    saved(tmp_path, cache)
    back, done = restored(tmp_path, slots=40, namespace_quota=0.25)  # 10 slots: two entries of 5
    assert back.stats("session-a")["cached_bytes"] <= 10 * SLOT_BYTES and back.stats()["evictions"] == 0
    assert done["entries"] == 2 and done["dropped"] == 4


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda d: (d / disk.MANIFEST).write_text("{not json"), "not readable JSON"),
        (lambda d: (d / disk.MANIFEST).write_text(json.dumps({"format": 99})), "format"),
        (lambda d: _truncate(next(d.glob("kv-*.safetensors"))), "cannot be read"),
        (lambda d: _flip_last_byte(next(d.glob("kv-*.safetensors"))), "sha256"),
        (lambda d: next(d.glob("kv-*.safetensors")).unlink(), "cannot be read"),
        (lambda d: _edit_manifest(d, lambda m: m["nodes"][0].update(parent=5)), "malformed"),
        (lambda d: _edit_manifest(d, lambda m: m["nodes"][0].update(rows=[10**6, 3])), "malformed"),
        (lambda d: _edit_manifest(d, lambda m: m["stamp"].update(model="another")), "differs in: model"),
    ],
)
def test_a_damaged_or_foreign_snapshot_is_refused_with_its_reason(tmp_path, damage, reason):
    """Truncated safetensors, bad JSON, a flipped byte, a missing file, a malformed tree, another stamp: SnapshotRefused, saying which."""
    cache = make()
    put(cache, [1, 2, 3], "a")
    put(cache, [1, 2, 4], "b")
    saved(tmp_path, cache)
    damage(tmp_path)
    with pytest.raises(disk.SnapshotRefused, match=reason):
        disk.load(tmp_path, STAMP)


def test_no_snapshot_is_none_and_a_crash_before_the_manifest_keeps_the_old_one(tmp_path):
    """A save that dies after writing its KV file (the hook raises) leaves the previous snapshot whole and loadable."""
    assert disk.load(tmp_path, STAMP) is None
    cache = make()
    put(cache, [1, 2, 3], "first")
    saved(tmp_path, cache)
    put(cache, [7, 8, 9], "second")

    def crash():
        raise KeyboardInterrupt("killed mid-save")

    with pytest.raises(KeyboardInterrupt):
        saved(tmp_path, cache, before_commit=crash)
    back, _ = restored(tmp_path)
    assert hit_of(back, [1, 2, 3])[0] == "hit" and hit_of(back, [7, 8, 9])[0] == "miss"
    saved(tmp_path, cache)  # the next save cleans up what the crash left
    assert len(list(tmp_path.glob("kv-*"))) == 1


def test_a_save_runs_beside_inserts_and_evictions_without_a_torn_tree(tmp_path):
    """Inserts (evicting) go on in another thread during saves; every saved snapshot restores to a valid tree."""
    cache = make(slots=60)
    stop = threading.Event()

    def churn():
        i = 0
        while not stop.is_set():
            put(cache, [i % 50, 1, 2, 3], str(i))
            i += 1

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        for _ in range(20):
            saved(tmp_path, cache)
            back, _ = restored(tmp_path, slots=60)
            back.check_invariants()
    finally:
        stop.set()
        worker.join()
    cache.check_invariants()  # the save's locks were all released


# ---------------------------------------------------------------------- engine/snapshot.py, the tiny model


def fill(engine, n=3):
    prompts = [f"Question {i}: what is the capital of country {i}?" for i in range(n)]
    return [engine.generate(p, system_prompt="Answer in one word.", max_new_tokens=4).text for p in prompts], prompts


@pytest.mark.parametrize("kv_dtype", ["auto", "bf16"])
def test_engine_restart_gives_a_hit_with_the_same_bits(tiny_model, tokenizer, tmp_path, kv_dtype):
    """Save from one engine, restore into a fresh one over the same model, for every KV dtype (bf16 restores used to be
    refused): the check finds the same bits, and a repeat is an exact hit, 0 prefill tokens, the fresh run's logits and tokens."""
    config = EngineConfig(min_cached_tokens=4, kv_dtype=kv_dtype)
    first = Engine(tiny_model, tokenizer, config, name="tiny")
    texts, prompts = fill(first)
    Snapshots(first, tmp_path, keep=lambda ns: True).save()
    second = Engine(tiny_model, tokenizer, config, name="tiny")
    outcome = Snapshots(second, tmp_path, keep=lambda ns: True).restore()
    assert outcome["refused"] is None and outcome["entries"] > 0 and outcome["check_max_diff"] == 0
    result = second.generate(prompts[0], system_prompt="Answer in one word.", max_new_tokens=4)
    fresh = second.generate(prompts[0], system_prompt="Answer in one word.", max_new_tokens=4, use_prefix_cache=False)
    assert result.cache_status == "hit" and result.timings["prefill_tokens"] == 0 and result.text == texts[0]
    assert torch.equal(result.first_token_logits, fresh.first_token_logits) and result.token_ids == fresh.token_ids


def test_another_model_is_refused_and_starts_cold(tiny_model, tokenizer, tmp_path):
    """Other weights change the stamp: one log line names the difference and the cache stays empty."""
    from conftest import make_tiny_model

    first = Engine(tiny_model, tokenizer, EngineConfig(min_cached_tokens=4))
    fill(first)
    Snapshots(first, tmp_path, keep=lambda ns: True).save()
    other = Engine(make_tiny_model(tokenizer, seed=1), tokenizer, EngineConfig(min_cached_tokens=4))
    lines = []
    outcome = Snapshots(other, tmp_path, keep=lambda ns: True, progress=lines.append).restore()
    assert "weights_blake2b" in outcome["refused"] and other.cache.stats()["cache_size"] == 0
    assert len(lines) == 1 and "refused, starting cold" in lines[0]


def test_another_weight_format_changes_the_stamp(tiny_model, tokenizer):
    """The weight format string is in the stamp (bf16 weights make other KV), as are the KV dtype and slot size."""
    from engine import quant

    fp32 = Engine(tiny_model, tokenizer, EngineConfig(min_cached_tokens=4))
    bf16 = Engine(quant.apply_format(make_copy(tiny_model), "bf16"), tokenizer, EngineConfig(min_cached_tokens=4))
    a, b = stamp(fp32), stamp(bf16)
    assert {k for k in a if a[k] != b[k]} >= {"weights", "weights_blake2b", "kv_dtype", "slot_bytes"}


def test_a_corrupted_slot_fails_the_check_and_starts_cold(tiny_model, tokenizer, tmp_path):
    """A snapshot whose stamp and checksum match but whose KV is wrong (rewritten consistently) fails the check against a fresh prefill."""
    first = Engine(tiny_model, tokenizer, EngineConfig(min_cached_tokens=4))
    fill(first, n=1)
    first.pool.storage.view(first.pool.dtype)[:].mul_(3)  # every stored KV and logit, scaled
    Snapshots(first, tmp_path, keep=lambda ns: True).save()
    second = Engine(tiny_model, tokenizer, EngineConfig(min_cached_tokens=4))
    lines = []
    outcome = Snapshots(second, tmp_path, keep=lambda ns: True, progress=lines.append).restore()
    assert "from a fresh prefill" in outcome["refused"] and second.cache.stats()["cache_size"] == 0 and len(lines) == 1


def test_periodic_saves_run_in_the_background_and_stop_saves_once_more(tiny_engine, tmp_path):
    """interval_s > 0 saves on its own (no request needed); stop() (the clean shutdown) writes the latest entries."""
    import time

    snapshots = Snapshots(tiny_engine, tmp_path, keep=lambda ns: True, interval_s=0.2)
    snapshots.start_periodic()
    deadline = time.monotonic() + 30
    while snapshots.last_save is None:
        assert time.monotonic() < deadline, "no periodic save within 30 s"
        time.sleep(0.05)
    fill(tiny_engine, n=1)
    snapshots.stop()
    assert snapshots.last_save["entries"] > 0
    assert disk.load(tmp_path, snapshots.stamp).nodes


def test_the_inspector_line_says_when_it_was_saved_and_whether_it_was_restored():
    """The page's line: sizes only in the detailed block (a viewer of the whole cache), the reason of a cold start."""
    assert status_line(None) == ""
    detailed = {"last_saved_at": 1.0e9, "restored_at": 1.0e9, "restore_refused": None, "last_save_bytes": 3 * 2**20, "last_save_entries": 7, "restored_entries": 5}
    assert "7 entries, 3.0 MiB" in status_line(detailed) and "restored at start (5 entries)" in status_line(detailed)
    cold = {"last_saved_at": None, "restored_at": 1.0e9, "restore_refused": "no snapshot yet"}
    assert status_line(cold) == "Snapshot on disk: last saved not yet · started cold (no snapshot yet)"


def make_copy(model):
    import copy

    return copy.deepcopy(model)


# ---------------------------------------------------------------------- helpers


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_manifest(directory: Path, edit) -> None:
    manifest = json.loads((directory / disk.MANIFEST).read_text())
    edit(manifest)
    (directory / disk.MANIFEST).write_text(json.dumps(manifest))
