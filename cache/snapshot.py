"""The prefix cache on disk: entries, pins and stats as JSON, the bytes of their slots as safetensors; and back.

A snapshot is two files in one directory:

- ``kv-<id>.safetensors``: one ``uint8`` tensor ``slots`` of shape ``[rows, slot_bytes]``, every saved
  node's token slots and then its logits slots, in the manifest's node order;
- ``prefix-cache.json`` (the manifest): the caller's stamp, the tree (per node: namespace, parent,
  token ids, its rows, recency, hits, pin, its TTL and the time it has left), the stats, and the KV
  file's name and sha256.

Writes are atomic: each file is written under a temporary name in the same directory, fsynced,
renamed, and the directory fsynced. The manifest is replaced last and names its KV file, and older KV
files are removed only after that, so a process killed at any point leaves the previous snapshot or
the new one whole, never a mix.

Restoring goes through the cache's own ``insert`` and ``pin``: slots come from the pool's allocator
and the budget, the owner's quota and the pin budget hold as for any request, and only what the
cache actually holds afterwards counts as restored. A snapshot larger than what fits keeps the most
useful part: unpinned before pinned, deepest then oldest dropped first. A restored pin keeps its
TTL and the time it had left, so restarts do not shorten it.

Knows nothing about models: the caller hands in a ``stamp`` (a JSON-able dict; a snapshot saved under
another one is refused) and a :class:`SlotBytes` that reads and writes the pool's slots.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
from safetensors.numpy import load_file, save_file

from cache.ledger import owner_of
from cache.prefix_cache import ExportedNode, PrefixCache
from cache.slots import Slot

log = logging.getLogger(__name__)

FORMAT = 1  # the manifest's layout; bump when it changes
MANIFEST = "prefix-cache.json"
KV_PREFIX, KV_SUFFIX, TMP_SUFFIX = "kv-", ".safetensors", ".tmp"


class SlotBytes(Protocol):
    """The bytes of a pool's slots, as ``uint8`` rows of ``slot_bytes`` each (the engine's pool: ``engine/snapshot.py``)."""

    @property
    def slot_bytes(self) -> int: ...

    def read(self, slots: Sequence[Slot]) -> np.ndarray:
        """A fresh ``uint8`` array ``[len(slots), slot_bytes]`` holding the slots' bytes, in order."""
        ...

    def write(self, slots: Sequence[Slot], rows: np.ndarray) -> None:
        """Copy ``rows`` (``[len(slots), slot_bytes]``) into the slots."""
        ...


class SnapshotRefused(ValueError):
    """A snapshot that cannot be used: another stamp, a missing or corrupt file. The message says which."""


@dataclass(frozen=True)
class Snapshot:
    """A snapshot read back and checked: its manifest and the KV rows it names."""

    manifest: dict[str, Any]
    rows: np.ndarray  # uint8 [rows, slot_bytes]

    @property
    def nodes(self) -> list[dict[str, Any]]:
        return self.manifest["nodes"]


def save(
    cache: PrefixCache,
    slot_bytes: SlotBytes,
    directory: str | Path,
    stamp: dict[str, Any],
    keep: Callable[[str], bool] = lambda name: True,
    before_commit: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Write the entries of the namespaces ``keep`` selects to ``directory``, replacing the snapshot there.

    The slots are copied with the entries locked against eviction but outside the tree lock
    (``PrefixCache.exported``), so requests run meanwhile; the files are written after the locks are
    released. ``before_commit`` runs between the KV file and the manifest (tests slow a save there).

    Returns:
        ``entries`` (nodes), ``bytes`` (of both files), ``kv_file``, ``saved_at`` (time.time()), ``seconds``,
        ``locked_seconds`` (how long the entries were held against eviction: the copy).
    """
    start = time.perf_counter()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with cache.exported(keep) as exported:
        slots = [s for node in exported for s in node.slots + node.logits_slots]
        rows = slot_bytes.read(slots) if slots else np.zeros((0, slot_bytes.slot_bytes), dtype=np.uint8)
    copied = time.perf_counter()
    manifest = {
        "format": FORMAT,
        "stamp": stamp,
        "saved_at": time.time(),
        "slot_bytes": slot_bytes.slot_bytes,
        "rows": int(rows.shape[0]),
        "kv_sha256": hashlib.sha256(rows.data).hexdigest(),
        "nodes": _node_records(exported),
        "stats": cache.stats(),
    }
    kv_name = f"{KV_PREFIX}{uuid.uuid4().hex}{KV_SUFFIX}"
    _write_atomic(directory / kv_name, lambda path: save_file({"slots": rows}, str(path)), before_commit)
    manifest["kv_file"] = kv_name
    _write_atomic(directory / MANIFEST, lambda path: path.write_text(json.dumps(manifest), encoding="utf-8"))
    for old in directory.iterdir():  # only now is the previous snapshot no longer the one in use
        if old.name != kv_name and old.name.startswith(KV_PREFIX) and (old.name.endswith(KV_SUFFIX) or old.name.endswith(TMP_SUFFIX)):
            old.unlink(missing_ok=True)
    size = (directory / kv_name).stat().st_size + (directory / MANIFEST).stat().st_size
    return {"entries": len(exported), "bytes": size, "kv_file": kv_name, "saved_at": manifest["saved_at"], "seconds": time.perf_counter() - start, "locked_seconds": copied - start}


def load(directory: str | Path, stamp: dict[str, Any]) -> Snapshot | None:
    """The snapshot in ``directory``, checked whole; None when there is none.

    Raises:
        SnapshotRefused: the manifest is not valid JSON or not of this format, the stamp differs
            (the message names the fields), or the KV file is missing, truncated or altered.
    """
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SnapshotRefused(f"{path} is not readable JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SnapshotRefused(f"{path} is not a snapshot of format {FORMAT}")
    saved = manifest.get("stamp")
    if saved != stamp:
        differ = sorted(k for k in set(stamp) | set(saved if isinstance(saved, dict) else {}) if not isinstance(saved, dict) or saved.get(k) != stamp.get(k))
        raise SnapshotRefused(f"it was saved under another stamp (differs in: {', '.join(differ)})")
    kv_path = Path(directory) / str(manifest.get("kv_file", ""))
    try:
        rows = load_file(str(kv_path))["slots"]
    except Exception as exc:  # missing, truncated or a bad header: safetensors raises several kinds
        raise SnapshotRefused(f"its KV file {kv_path.name} cannot be read ({type(exc).__name__}: {exc})") from None
    if rows.dtype != np.uint8 or rows.shape != (manifest.get("rows"), manifest.get("slot_bytes")) or hashlib.sha256(rows.data).hexdigest() != manifest.get("kv_sha256"):
        raise SnapshotRefused(f"its KV file {kv_path.name} does not hold the bytes the manifest names (shape or sha256 differ)")
    _check_nodes(manifest, int(rows.shape[0]))
    return Snapshot(manifest, rows)


def restore(cache: PrefixCache, slot_bytes: SlotBytes, snapshot: Snapshot) -> dict[str, Any]:
    """Insert the snapshot's entries into ``cache`` (empty or not) through its allocator, then its pins.

    What does not fit the free slots, or an owner's quota, is dropped first: unpinned before
    pinned, then the deepest, then the oldest (a node's descendants always go before it).
    Entries are inserted oldest first, so the restored cache evicts in the order the saved one would.
    An entry the cache did not store (shorter than its ``min_tokens``, or refused for room) counts
    as dropped, and its pin is not tried.

    Returns:
        ``entries`` (restored nodes), ``dropped`` (nodes not restored), ``pins``, ``pins_refused``,
        ``sequences``: ``(namespace, token ids, has logits)`` per restored node, most recent first.
    """
    if snapshot.manifest["slot_bytes"] != slot_bytes.slot_bytes:
        raise SnapshotRefused(f"its slots are {snapshot.manifest['slot_bytes']} bytes, this pool's {slot_bytes.slot_bytes}")
    nodes = snapshot.nodes
    paths = _paths(nodes)
    kept = _fitting(nodes, paths, free=cache.pool.num_free, quota=int(cache.namespace_quota * cache.pool.capacity))
    order = sorted(kept, key=lambda i: nodes[i]["recency"])  # a parent is used whenever a child is: it comes after, re-touching the path
    for i in order:
        tokens, rows = paths[i]
        logits = nodes[i]["logits_rows"]
        source = _Rows(slot_bytes, snapshot.rows, rows, list(range(logits[0], logits[0] + logits[1])) if logits else [])
        cache.insert(tokens, source, nodes[i]["namespace"])
    restored = [i for i in order if cache.holds(paths[i][0], nodes[i]["namespace"], logits=bool(nodes[i]["logits_rows"]))]  # the insert's count says only what was new
    pins, refused = _restore_pins(cache, nodes, paths, restored)
    dropped = len(nodes) - len(restored)
    if dropped:
        log.warning("snapshot: %d of %d entries were not restored (over the budget, deepest and oldest first, or refused by the cache)", dropped, len(nodes))
    sequences = [(nodes[i]["namespace"], paths[i][0], bool(nodes[i]["logits_rows"])) for i in reversed(restored)]
    return {"entries": len(restored), "dropped": dropped, "pins": pins, "pins_refused": refused, "sequences": sequences}


# ---------------------------------------------------------------------- helpers


def _restore_pins(cache: PrefixCache, nodes: list[dict[str, Any]], paths: list, restored: list[int]) -> tuple[int, int]:
    """Pin again what was pinned: with its TTL as made and the time it had left. Returns (pins, refused)."""
    pins = refused = 0
    for i in restored:
        node = nodes[i]
        if node["pin_ends_here"]:
            left = node["pin_expires_in_s"]
            try:
                cache.pin(paths[i][0], node["namespace"], ttl_s=node.get("pin_ttl_s", left), expires_in_s=left)  # older manifests: no TTL of their own
                pins += 1
            except ValueError as exc:
                refused += 1
                log.warning("snapshot: a pin was not restored: %s", exc)
    return pins, refused


class _Rows:
    """A :class:`cache.KVSource` over a snapshot's rows: token ``t`` of the sequence is row ``rows[t]``."""

    def __init__(self, slot_bytes: SlotBytes, data: np.ndarray, rows: list[int], logits_rows: list[int]) -> None:
        self.slot_bytes, self.data, self.rows, self.logits_rows = slot_bytes, data, rows, logits_rows

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def logits_slots(self) -> int:
        return len(self.logits_rows)

    def write(self, start: int, slots: Sequence[Slot], logits_slots: Sequence[Slot]) -> None:
        self.slot_bytes.write(slots, self.data[self.rows[start : start + len(slots)]])
        if logits_slots:
            self.slot_bytes.write(logits_slots, self.data[self.logits_rows])


def _node_records(exported: list[ExportedNode]) -> list[dict[str, Any]]:
    """The manifest's nodes: each one's rows are ``[first, count]`` into the KV tensor, tokens then logits."""
    records, row = [], 0
    for node in exported:
        n, m = len(node.slots), len(node.logits_slots)
        records.append(
            {
                "namespace": node.namespace,
                "parent": node.parent,
                "token_ids": list(node.token_ids),
                "rows": [row, n],
                "logits_rows": [row + n, m] if m else None,
                "recency": node.recency,
                "last_used": node.last_used,
                "hits": node.hits,
                "pinned": node.pinned,
                "pin_ends_here": node.pin_ends_here,
                "pin_expires_in_s": node.pin_expires_in_s,
                "pin_ttl_s": node.pin_ttl_s,
            }
        )
        row += n + m
    return records


def _check_nodes(manifest: dict[str, Any], num_rows: int) -> None:
    """Refuse a manifest whose tree is malformed: a parent after its child, rows outside the tensor, odd types."""
    nodes = manifest.get("nodes")
    if not isinstance(nodes, list):
        raise SnapshotRefused("its manifest has no list of nodes")
    for i, node in enumerate(nodes):
        try:
            parent, tokens, (first, n), logits = node["parent"], node["token_ids"], node["rows"], node["logits_rows"]
            ok = (
                isinstance(node["namespace"], str) and isinstance(parent, int) and -1 <= parent < i
                and (parent == -1 or nodes[parent]["namespace"] == node["namespace"])
                and isinstance(tokens, list) and len(tokens) == n > 0 and all(isinstance(t, int) and not isinstance(t, bool) for t in tokens)
                and 0 <= first and first + n <= num_rows
                and (logits is None or (0 <= logits[0] and logits[0] + logits[1] <= num_rows))
                and isinstance(node["recency"], int) and isinstance(node["pin_ends_here"], bool)
                and all(node.get(k) is None or (isinstance(node[k], (int, float)) and node[k] > 0) for k in ("pin_expires_in_s", "pin_ttl_s"))
            )
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise SnapshotRefused(f"its manifest's node {i} is malformed")


def _paths(nodes: list[dict[str, Any]]) -> list[tuple[list[int], list[int]]]:
    """Per node, the token ids from the namespace's root to its end and the rows holding their KV (parents come first)."""
    paths: list[tuple[list[int], list[int]]] = []
    for node in nodes:
        tokens, rows = paths[node["parent"]] if node["parent"] >= 0 else ([], [])
        first, n = node["rows"]
        paths.append((tokens + node["token_ids"], rows + list(range(first, first + n))))
    return paths


def _fitting(nodes: list[dict[str, Any]], paths: list, free: int, quota: int) -> set[int]:
    """The nodes to restore: drop (unpinned first, deepest, oldest) until each owner's namespaces fit ``quota`` slots and all fit ``free``.

    A node's descendants are deeper, and pinned only if it is: they are always dropped before it,
    so what is kept is closed under parents.
    """
    size = [len(n["token_ids"]) + (n["logits_rows"][1] if n["logits_rows"] else 0) for n in nodes]
    order = sorted(range(len(nodes)), key=lambda i: (nodes[i]["pinned"], -len(paths[i][0]), nodes[i]["recency"]))
    kept = set(range(len(nodes)))
    per_owner: dict[str, int] = {}
    for i in kept:
        owner = owner_of(nodes[i]["namespace"])
        per_owner[owner] = per_owner.get(owner, 0) + size[i]
    for i in order:  # each owner within its quota
        owner = owner_of(nodes[i]["namespace"])
        if per_owner[owner] > quota:
            kept.discard(i)
            per_owner[owner] -= size[i]
    total = sum(size[i] for i in kept)
    for i in order:  # then everything within the free slots
        if total <= free:
            break
        if i in kept:
            kept.discard(i)
            total -= size[i]
    return kept


def _write_atomic(path: Path, write: Callable[[Path], Any], before_rename: Callable[[], None] | None = None) -> None:
    """Write through ``path`` + ``.tmp``: fsync the file, rename it over ``path``, fsync the directory."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    write(tmp)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if before_rename is not None:
        before_rename()
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
