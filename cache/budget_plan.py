"""What prefix caching would save on a workload, per memory budget and eviction policy: the replay and the plan.

Replay semantics are the engine's (``engine/engine.py``, steps 2 and 6), on a real
:class:`~cache.prefix_cache.PrefixCache` over a :class:`~cache.slots.MeteredPool` that holds no
bytes: look the prompt up (a prompt under ``min_tokens`` skips the cache; a shared prefix under
``min_tokens`` is a miss; an exact hit needs the prompt stored with its logits; a prompt that is a
strict prefix of a cached sequence reuses all but its last token, or block), insert the prompt with
its logits unless it was an exact hit, then insert prompt + output when an output is given (the
next turn of a conversation then reuses its whole history), and release. Logits take
``ceil(vocab_size * 4 / slot_bytes)`` slots, as in the engine's pool. A block trace has no ids for
its outputs, so only prompts are inserted; and it stores no logits (a whole block of memory for
half a megabyte would overstate the budget): an exact repeat reuses all its blocks but the last,
as block-granular servers (vLLM) recompute the last block when a prompt hits in full.

Counted per row: every request of the trace (skipped ones too), the requests that reused at least
one token, all prompt tokens, the tokens reused, the pool's peak bytes, the evictions. Time saved
is reused tokens / ``prefill_tokens_per_s``. The knee, per policy, is the smallest budget whose
reused tokens are within 5% of an unbounded cache's (policies do not matter without eviction:
one unbounded replay serves them all).

Knows nothing about models or tokenizers: model sizes come from small JSON configs
(``assets/model_configs/``) or a Hugging Face ``config.json``; traces are ``cache/traces.py``'s; the
command line, the table, the CSV and the chart are ``cache/replay.py``'s.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from cache.policies import POLICIES
from cache.prefix_cache import PrefixCache
from cache.slots import MeteredPool, SizedKV
from cache.traces import Trace, TraceError

MODEL_CONFIGS = Path(__file__).resolve().parent.parent / "assets" / "model_configs"
DEFAULT_MODEL_CONFIG = "smollm2-135m"
KV_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}
DEFAULT_MIN_TOKENS = 20  # the engine's default (KVCI_MIN_CACHED_TOKENS)
# Measured, not assumed: the bundled SmolLM2-135M (fp32) prefills ~500 tokens/s on this project's
# 2-core CPU (a 512-token prefix: ~1 s, benchmark/results/prefix_bench.md). Pass your own hardware's.
DEFAULT_PREFILL_TOKENS_PER_S = 500.0
KNEE_TOLERANCE = 0.05
AUTO_BUDGET_STEPS = 7  # an automatic sweep: the unbounded peak times 1, 1/2, ... 1/64, then unbounded
LOGITS_BYTES_PER_ENTRY = 4  # float32, as engine/kv_pool.py stores them
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
ROW_FIELDS = (
    "policy", "budget", "budget_bytes", "requests", "request_hit_rate", "token_hit_rate", "prompt_tokens",
    "reused_tokens", "peak_bytes", "evictions", "prefill_s_saved", "knee",
)  # fmt: skip


class ReplayTimeout(RuntimeError):
    """The replay ran past its deadline (the app bounds the work of an upload)."""


@dataclass(frozen=True)
class ModelSize:
    """What sizes a token's KV: layers, KV heads and head size (and the vocabulary, for stored logits)."""

    name: str
    num_hidden_layers: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int

    def kv_bytes_per_token(self, kv_dtype: str) -> int:
        """K and V of every layer: ``2 * layers * kv_heads * head_dim * bytes``."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * dtype_bytes(kv_dtype)


@dataclass(frozen=True)
class ReplaySettings:
    """The target: bytes of one token's KV and of the logits, and the engine's ``min_tokens``."""

    kv_bytes_per_token: int
    logits_bytes: int
    min_tokens: int = DEFAULT_MIN_TOKENS
    prefill_tokens_per_s: float = DEFAULT_PREFILL_TOKENS_PER_S

    @classmethod
    def for_model(cls, model: ModelSize, kv_dtype: str = "bf16", **kwargs: Any) -> "ReplaySettings":
        return cls(model.kv_bytes_per_token(kv_dtype), model.vocab_size * LOGITS_BYTES_PER_ENTRY, **kwargs)

    def __post_init__(self) -> None:
        if self.kv_bytes_per_token < 1 or self.logits_bytes < 0:
            raise ValueError("KV bytes per token must be >= 1 and logits bytes >= 0")
        if self.min_tokens < 1:
            raise ValueError(f"min_tokens must be >= 1, got {self.min_tokens}")
        if not (self.prefill_tokens_per_s > 0 and math.isfinite(self.prefill_tokens_per_s)):
            raise ValueError(f"prefill tokens per second must be a positive number, got {self.prefill_tokens_per_s}")


@dataclass(frozen=True)
class ReplayRow:
    """One budget under one policy; ``budget_bytes`` None is an unbounded cache."""

    policy: str
    budget: str
    budget_bytes: int | None
    requests: int
    request_hit_rate: float
    token_hit_rate: float
    prompt_tokens: int
    reused_tokens: int
    peak_bytes: int
    evictions: int
    prefill_s_saved: float
    knee: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


Progress = Callable[[int, int], None]  # (replays done, replays in all)


# ---------------------------------------------------------------------- public API: replay and plan


def replay(trace: Trace, budget_bytes: int | None, policy: str, settings: ReplaySettings, deadline: float | None = None) -> ReplayRow:
    """Replay ``trace`` through a fresh prefix cache of ``budget_bytes`` (None: unbounded) under ``policy``.

    Raises:
        ReplayTimeout: ``time.monotonic()`` passed ``deadline``.
    """
    slot_bytes = settings.kv_bytes_per_token * trace.unit_tokens
    pool = MeteredPool(None if budget_bytes is None else budget_bytes // slot_bytes, slot_bytes)
    # Logits as the engine stores them; a block trace stores none (see the module docstring).
    logits_slots = 0 if trace.unit_tokens > 1 else max(1, math.ceil(settings.logits_bytes / slot_bytes))
    cache = PrefixCache(pool, min_tokens=math.ceil(settings.min_tokens / trace.unit_tokens), policy=policy, log_evictions=False)
    requests = hit_requests = prompt_tokens = reused_tokens = 0
    for requests, request in enumerate(trace.requests, 1):
        if deadline is not None and requests % 256 == 0 and time.monotonic() > deadline:
            raise ReplayTimeout(f"the replay ran out of time after {requests:,} requests; send a shorter trace or fewer budgets")
        # The engine's steps 2 and 6: lookup (path locked), insert the prompt, then prompt + output, release.
        match = cache.match_prefix(request.units)
        if match.kind != "hit":
            cache.insert(request.units, SizedKV(len(request.units), logits_slots))
        if request.output:
            sequence = request.units + request.output
            cache.insert(sequence, SizedKV(len(sequence), logits_slots))
        cache.release(match)
        reused = min(match.length * trace.unit_tokens, request.prompt_tokens)  # only the last block is partial
        hit_requests += reused > 0
        prompt_tokens += request.prompt_tokens
        reused_tokens += reused
    return ReplayRow(
        policy=policy,
        budget=format_bytes(budget_bytes),
        budget_bytes=budget_bytes,
        requests=requests,
        request_hit_rate=hit_requests / requests if requests else 0.0,
        token_hit_rate=reused_tokens / prompt_tokens if prompt_tokens else 0.0,
        prompt_tokens=prompt_tokens,
        reused_tokens=reused_tokens,
        peak_bytes=pool.peak_slots * slot_bytes,
        evictions=cache.stats()["evictions"],
        prefill_s_saved=reused_tokens / settings.prefill_tokens_per_s,
    )


def plan(
    trace: Trace,
    budgets: Sequence[int | None] | None,
    policies: Sequence[str],
    settings: ReplaySettings,
    progress: Progress | None = None,
    deadline: float | None = None,
) -> list[ReplayRow]:
    """One row per policy × budget (None: unbounded), with each policy's knee marked.

    Args:
        budgets: Bytes, ascending or not; None as a budget is an unbounded cache. ``None`` instead
            of a list: an automatic sweep, the unbounded peak times 1, 1/2, ..., 1/64, then unbounded.
        progress: Called with (replays done, replays in all) after each replay.

    Example:
        >>> trace = Trace("tokens", [TraceRequest(tuple(range(40)), (), 40)] * 3)
        >>> rows = plan(trace, [1 << 20, None], ["lru"], ReplaySettings(kv_bytes_per_token=64, logits_bytes=0))
        >>> [(r.budget, round(r.token_hit_rate, 3)) for r in rows]
        [('1 MiB', 0.667), ('inf', 0.667)]
    """
    for policy in policies:
        if policy not in POLICIES:
            raise ValueError(f"unknown eviction policy {policy!r}; choose from: {', '.join(POLICIES)}")
    finite = sorted({b for b in budgets if b is not None}) if budgets is not None else None
    total = 1 + len(policies) * (len(finite) if finite is not None else AUTO_BUDGET_STEPS)
    unbounded = replay(trace, None, policies[0], settings, deadline)  # no eviction: the same for every policy
    if progress:
        progress(1, total)
    if finite is None:
        finite = auto_budgets(unbounded.peak_bytes)
        total = 1 + len(policies) * len(finite)
    with_unbounded = budgets is None or None in budgets
    rows: list[ReplayRow] = []
    done = 1
    for policy in policies:
        mine = []
        for budget in finite:
            mine.append(replay(trace, budget, policy, settings, deadline))
            done += 1
            if progress:
                progress(done, total)
        if with_unbounded:
            mine.append(dataclasses.replace(unbounded, policy=policy))
        rows += _mark_knee(mine, unbounded.reused_tokens)
    return rows


def auto_budgets(peak_bytes: int) -> list[int]:
    """Budgets for a sweep: the unbounded peak halved ``AUTO_BUDGET_STEPS - 1`` times, ascending."""
    if peak_bytes <= 0:
        return []
    return sorted({max(1, peak_bytes >> k) for k in range(AUTO_BUDGET_STEPS)})


# ---------------------------------------------------------------------- public API: model sizes and options


def load_model_size(spec: str) -> ModelSize:
    """A shipped config by name (``assets/model_configs/<name>.json``), a JSON file, or a folder with ``config.json``.

    Our configs use Hugging Face's field names, so a model's own ``config.json`` works as it is
    (``head_dim`` defaults to ``hidden_size / num_attention_heads``, KV heads to attention heads).
    """
    path = MODEL_CONFIGS / f"{spec}.json"
    if not path.is_file():
        path = Path(spec).expanduser()
        if path.is_dir():
            path = path / "config.json"
    if not path.is_file():
        raise TraceError(f"no model config {spec!r}: name one of {', '.join(model_config_names())}, or give a config.json path")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TraceError(f"{path}: not a JSON model config ({exc})") from None
    return model_size_from_dict(raw, default_name=path.stem if path.name != "config.json" else path.parent.name)


def model_size_from_dict(raw: Any, default_name: str = "model") -> ModelSize:
    """Sizes from a config dict (ours or Hugging Face's; a multimodal one's ``text_config``)."""
    if not isinstance(raw, dict):
        raise TraceError("a model config must be a JSON object")
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw
    try:
        layers, heads = int(text["num_hidden_layers"]), text.get("num_attention_heads")
        kv_heads = int(text.get("num_key_value_heads") or heads)
        head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // int(heads))
        vocab = int(text["vocab_size"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise TraceError(f"a model config needs num_hidden_layers, num_key_value_heads (or num_attention_heads), head_dim (or hidden_size) and vocab_size: {exc!r}") from None
    if min(layers, kv_heads, head_dim, vocab) < 1:
        raise TraceError("a model config's sizes must be positive")
    return ModelSize(str(raw.get("name") or default_name), layers, kv_heads, head_dim, vocab)


def model_config_names() -> list[str]:
    return sorted(p.stem for p in MODEL_CONFIGS.glob("*.json"))


def dtype_bytes(kv_dtype: str) -> int:
    if kv_dtype not in KV_DTYPE_BYTES:
        raise TraceError(f"unknown KV dtype {kv_dtype!r}; choose one of: {', '.join(KV_DTYPE_BYTES)}")
    return KV_DTYPE_BYTES[kv_dtype]


def parse_budgets(text: str) -> list[int | None] | None:
    """``"1GiB,4GiB,inf"`` -> bytes (None: unbounded); ``"auto"`` -> None (a sweep). Units: B, KB..TB, KiB..TiB."""
    if text.strip().lower() == "auto":
        return None
    budgets: list[int | None] = []
    for part in text.split(","):
        part = part.strip().lower().replace(" ", "")
        if part in ("inf", "unbounded"):
            budgets.append(None)
            continue
        found = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]*)", part)
        if not found or found.group(2) not in _UNITS:
            raise TraceError(f"budget {part!r} is not a size: write it like 512MiB, 4GiB, 1.5GB, 100000 or inf")
        size = int(float(found.group(1)) * _UNITS[found.group(2)])
        if size < 1:
            raise TraceError(f"budget {part!r} must be at least one byte")
        budgets.append(size)
    return budgets


def parse_policies(text: str) -> list[str]:
    policies = [p.strip().lower() for p in text.split(",") if p.strip()]
    for policy in policies:
        if policy not in POLICIES:
            raise TraceError(f"unknown eviction policy {policy!r}; choose from: {', '.join(POLICIES)}")
    if not policies:
        raise TraceError(f"name at least one eviction policy ({', '.join(POLICIES)})")
    return list(dict.fromkeys(policies))


def format_bytes(size: int | None) -> str:
    if size is None:
        return "inf"
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size} B"


# ---------------------------------------------------------------------- helpers


def _mark_knee(rows: list[ReplayRow], unbounded_reused: int) -> list[ReplayRow]:
    """Mark the first row (ascending budgets, unbounded last) within KNEE_TOLERANCE of the unbounded savings."""
    for i, row in enumerate(rows):
        if row.reused_tokens >= (1 - KNEE_TOLERANCE) * unbounded_reused:
            rows[i] = dataclasses.replace(row, knee=True)
            break
    return rows
