"""A prefix cache that survives restarts: the stamp, the check of a restored entry, and when to save.

``cache/snapshot.py`` writes and reads the tree and the slots' bytes and knows no model. This module
adds what needs one:

- the **stamp** every snapshot carries: a digest of the weights (of the state dict's bytes, computed
  once at start), of the tokenizer (vocabulary, chat template, special tokens), the weight format and
  decode step, the KV dtype and the pool's slot layout, the device type, and the versions of torch and
  transformers. Anything that changes the KV a prompt produces changes the stamp, and a snapshot under
  another stamp is refused;
- the **check** before any restored entry is used: the most recent restored sequence is prefilled
  afresh, and its logits and every KV row must equal the restored ones bit for bit. Every stored
  row and logit was computed by the chunked prefill (``engine/prefill.py``), so on the same weights,
  kernels and host they are the same bits; anything else (another CPU's kernels, a corrupt slot) is refused;
- :class:`Snapshots`, the app's directory: restore at start, save on demand, every N minutes and at stop.

A refused snapshot (another stamp, a corrupt file, a failed check) is one log line, and the cache
starts cold: a snapshot never stops the app from starting.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import transformers

from cache import Slot
from cache import snapshot as disk

log = logging.getLogger(__name__)

SAVE_DELAY_ENV = "KVCI_SNAPSHOT_SAVE_DELAY_S"  # tests only: seconds a save waits between its KV file and its manifest


class PoolBytes:
    """The engine pool's slots as ``uint8`` rows: a :class:`cache.snapshot.SlotBytes`."""

    CHUNK = 4096  # slots per gather: the gathered copy never doubles the pool in memory

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    @property
    def slot_bytes(self) -> int:
        return self.pool.slot_bytes

    def read(self, slots: Sequence[Slot]) -> np.ndarray:
        out = np.empty((len(slots), self.slot_bytes), dtype=np.uint8)
        for a in range(0, len(slots), self.CHUNK):
            index = torch.tensor(list(slots[a : a + self.CHUNK]), dtype=torch.long, device=self.pool.device)
            torch.from_numpy(out[a : a + len(index)]).copy_(self.pool.storage[index])
        return out

    def write(self, slots: Sequence[Slot], rows: np.ndarray) -> None:
        index = torch.tensor(list(slots), dtype=torch.long, device=self.pool.device)
        self.pool.storage[index] = torch.from_numpy(np.ascontiguousarray(rows)).to(self.pool.device)


def stamp(engine: Any, weights_digest: str | None = None) -> dict[str, Any]:
    """What a snapshot must have been saved under to be restored into ``engine``."""
    info, pool = engine.info(), engine.pool
    return {
        "weights_blake2b": weights_digest or digest_weights(engine.model),
        "tokenizer_sha256": digest_tokenizer(engine.tokenizer),
        "weights": info["weights"],
        "decode_step": info["decode_step"],
        "kv_dtype": str(pool.dtype).removeprefix("torch."),
        "kv_layout": list(pool.kv.shape[1:]),  # [layers, 2, kv_heads, head_dim]
        "slot_bytes": pool.slot_bytes,
        "logits_slots": pool.logits_slot_count,
        "device": engine.device.type,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def digest_weights(model: torch.nn.Module) -> str:
    """blake2b of every state-dict tensor's name, dtype, shape and bytes (quantized buffers included)."""
    hasher = hashlib.blake2b(digest_size=20)
    for name, tensor in sorted(model.state_dict().items()):
        if tensor is None:
            continue
        hasher.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        flat = tensor.detach().reshape(-1).contiguous().cpu()
        hasher.update(flat.view(torch.uint8).numpy().data if flat.numel() else b"")
    return hasher.hexdigest()


def digest_tokenizer(tokenizer: Any) -> str:
    """sha256 of the vocabulary, the chat template and the special tokens."""
    parts = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "special_ids": sorted(tokenizer.all_special_ids),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def check(engine: Any, namespace: str, tokens: Sequence[int]) -> float:
    """The largest difference between a fresh prefill of ``tokens`` and what the cache restored for them:
    the logits after them and every KV row. 0.0 is the contract (the same bits); ``inf``: not cached whole.
    """
    tokens = list(tokens)
    match = engine.cache.match_prefix(tokens, namespace)
    try:
        if match.kind != "hit":
            return float("inf")
        stored = engine.pool.read_logits(match.logits_slots, engine.device)
        restored = engine.pool.read_kv(match.slots, engine.model.config, engine.device, len(tokens))
    finally:
        engine.cache.release(match)
    fresh, fresh_cache = engine.prefill_sequence(tokens)
    diffs = [(stored - fresh).abs().max()]
    for ours, theirs in zip(restored.layers, fresh_cache.layers):
        diffs += [(ours.keys.float() - theirs.keys.float()).abs().max(), (ours.values.float() - theirs.values.float()).abs().max()]
    return float(torch.stack(diffs).max())


class Snapshots:
    """The app's snapshot directory for one engine.

    Args:
        engine: The loaded engine (its cache, pool and model).
        directory: Where the snapshot lives (created if missing).
        keep: Which namespaces are saved (the app: the shared one, unless sessions' are persisted too).
        interval_s: Save every this many seconds (0: only on demand and at stop).
        progress: Where the one-line outcome of a restore goes besides the log (the app's loading lines).

    Example:
        >>> snapshots = Snapshots(engine, "/var/cache/kvci", keep=lambda ns: ns == ""); snapshots.restore()
        >>> snapshots.save()["entries"]
    """

    def __init__(self, engine: Any, directory: str | Path, keep: Callable[[str], bool], interval_s: float = 0.0, progress: Callable[[str], None] = lambda line: None) -> None:
        self.engine, self.directory, self.keep, self.interval_s = engine, Path(directory), keep, interval_s
        self._progress = progress
        self._bytes = PoolBytes(engine.pool)
        t0 = time.perf_counter()
        self.stamp = stamp(engine)
        self.stamp_seconds = time.perf_counter() - t0
        self._save_lock = threading.Lock()
        self._stopped = threading.Event()
        self.last_save: dict[str, Any] | None = None
        self.last_restore: dict[str, Any] | None = None
        self._delay_s = float(os.environ.get(SAVE_DELAY_ENV) or 0)

    def restore(self) -> dict[str, Any]:
        """Load and check the snapshot, if any; on any problem log one line and leave the cache cold. Never raises."""
        t0 = time.perf_counter()
        outcome: dict[str, Any] = {"at": time.time(), "entries": 0, "refused": None}
        try:
            snapshot = disk.load(self.directory, self.stamp)
            if snapshot is None:
                outcome["refused"] = "no snapshot yet"
            else:
                done = disk.restore(self.engine.cache, self._bytes, snapshot)
                outcome.update(entries=done["entries"], dropped=done["dropped"], pins=done["pins"])
                checked = next(((ns, tokens) for ns, tokens, has_logits in done["sequences"] if has_logits), None)
                if checked is not None:
                    error = check(self.engine, *checked)
                    outcome["check_max_diff"] = error
                    if error != 0:
                        raise disk.SnapshotRefused(f"a restored entry differs from a fresh prefill of its tokens by up to {error:.3g} (its logits or KV): not the same bits, so it was computed by other kernels or was damaged")
        except Exception as exc:  # a snapshot never stops the app: anything that went wrong means a cold start
            self.engine.cache.clear()
            outcome.update(entries=0, refused=str(exc))
            line = f"Prefix-cache snapshot in {self.directory} refused, starting cold: {exc}"
            log.warning("%s", line)
            self._progress(line)
        else:
            if snapshot is not None:
                self._report(
                    f"Restored {outcome['entries']} prefix-cache entries from {self.directory} in {time.perf_counter() - t0:.2f} s "
                    f"({outcome['dropped']} dropped to fit the budget; checked against a fresh prefill: {outcome.get('check_max_diff', 0):.2g}, bit for bit where 0)."
                )
        outcome["seconds"] = time.perf_counter() - t0
        self.last_restore = outcome
        return outcome

    def _report(self, line: str) -> None:
        log.info("%s", line)
        self._progress(line)

    def save(self) -> dict[str, Any]:
        """Write the snapshot now (one save at a time; a second waits for the first). Raises OSError."""
        with self._save_lock:
            delay = (lambda: time.sleep(self._delay_s)) if self._delay_s > 0 else None
            self.last_save = disk.save(self.engine.cache, self._bytes, self.directory, self.stamp, self.keep, before_commit=delay)
        log.info("Saved %d prefix-cache entries (%d bytes) to %s in %.2f s", self.last_save["entries"], self.last_save["bytes"], self.directory, self.last_save["seconds"])
        return self.last_save

    def start_periodic(self) -> None:
        """Save every ``interval_s`` seconds in a background thread, until :meth:`stop`."""
        if self.interval_s > 0:
            threading.Thread(target=self._periodic, name="snapshot-save", daemon=True).start()

    def stop(self) -> None:
        """The clean shutdown's save (once, whoever calls first)."""
        if not self._stopped.is_set():
            self._stopped.set()
            try:
                self.save()
            except OSError as exc:
                log.error("the prefix cache could not be saved to %s at shutdown: %s", self.directory, exc)

    def status(self, detailed: bool) -> dict[str, Any]:
        """The ``snapshot`` block of the stats; ``detailed`` adds sizes and counts (a viewer of the whole cache only)."""
        save, restore = self.last_save or {}, self.last_restore or {}
        block: dict[str, Any] = {"last_saved_at": save.get("saved_at"), "restored_at": restore.get("at"), "restore_refused": restore.get("refused")}
        if detailed:
            block.update(last_save_bytes=save.get("bytes"), last_save_entries=save.get("entries"), last_save_seconds=save.get("seconds"), restored_entries=restore.get("entries", 0))
        return block

    def _periodic(self) -> None:
        while not self._stopped.wait(self.interval_s):
            try:
                self.save()
            except OSError as exc:  # a full disk is a log line; the next save tries again
                log.error("the periodic prefix-cache save to %s failed: %s", self.directory, exc)


def status_line(block: dict[str, Any] | None) -> str:
    """The cache inspector's line about the snapshot ('' without a cache dir)."""
    if not block:
        return ""
    saved = time.strftime("%H:%M:%S", time.localtime(block["last_saved_at"])) if block.get("last_saved_at") else "not yet"
    if block.get("restored_at") and not block.get("restore_refused"):
        restored = f"restored at start ({block['restored_entries']} entries)" if "restored_entries" in block else "restored at start"
    else:
        restored = f"started cold ({block.get('restore_refused') or 'no snapshot'})"
    size = f" ({block['last_save_entries']} entries, {block['last_save_bytes'] / 2**20:,.1f} MiB)" if block.get("last_save_bytes") else ""
    return f"Snapshot on disk: last saved {saved}{size} · {restored}"

