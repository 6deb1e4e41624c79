"""Replay a workload through the prefix cache: what prefix caching would save, per memory budget and eviction policy.

    python -m cache.replay TRACE [--model-config llama-3.1-8b] [--kv-dtype bf16] [--budgets 1GiB,4GiB,inf]
                                 [--policies lru,lfu] [--format table|json] [--html FILE] [--block-size 512]

A trace is JSON Lines, one request a line, in one of four formats (told apart by the first line's keys):

- **chat**: ``{"messages": [{"role": ..., "content": ...}, ...], "output": "the reply"}``: OpenAI chat
  requests, tokenized through the tokenizer's chat template as the engine does;
- **prompt**: ``{"prompt": "...", "system_prompt": "...", "output": "..."}``: one user message each;
- **tokens**: ``{"token_ids": [...], "output_ids": [...]}``: already tokenized;
- **blocks**: Mooncake's traces (FAST'25), ``{"timestamp", "input_length", "output_length", "hash_ids"}``:
  each hash id names one block of ``block_size`` tokens; requests whose prompts start alike share
  the leading ids. A block trace is replayed **one tree element per block** (a slot holds a whole
  block's KV, ``block_size`` × bytes per token), as a paged KV cache stores it: the last block,
  usually partial (``input_length`` need not be a multiple of the block size), is charged a whole
  block of memory, and its reuse counts its real ``input_length - (n - 1) * block_size`` tokens.

``output``/``output_ids`` and ``timestamp`` are optional; requests replay in timestamp order when
every line has one (stable), else in file order, one after another (no overlap).

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

Knows nothing about models or tokenizers: text is tokenized by whatever :class:`TextTokenizer` the
caller passes (the CLI loads ``engine.chat_tokens`` lazily, only for text traces). Model sizes come
from small JSON configs (``assets/model_configs/``) or a Hugging Face ``config.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

from cache.policies import POLICIES
from cache.prefix_cache import PrefixCache
from cache.slots import MeteredPool, SizedKV

MODEL_CONFIGS = Path(__file__).resolve().parent.parent / "assets" / "model_configs"
DEFAULT_MODEL_CONFIG = "smollm2-135m"
KV_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}
DEFAULT_BLOCK_SIZE = 512  # Mooncake's
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


class TraceError(ValueError):
    """Bad input: a malformed line, a missing field, a bad option. The message says where and why."""


class ReplayTimeout(RuntimeError):
    """The replay ran past its deadline (the app bounds the work of an upload)."""


class TextTokenizer(Protocol):
    """What a text trace needs: the engine's tokenization of a chat request and of a reply."""

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]: ...

    def reply_ids(self, text: str) -> list[int]: ...


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request, in tree units (tokens, or blocks of a block trace)."""

    units: tuple[int, ...]  # the prompt
    output: tuple[int, ...]  # the reply, inserted after the prompt (empty: none)
    prompt_tokens: int  # real tokens of the prompt (a block trace's last block may be partial)


@dataclass(frozen=True)
class Trace:
    """A workload: its requests in replay order, and how many tokens one tree unit stands for."""

    kind: str  # "chat", "prompt", "tokens" or "blocks"
    requests: Sequence[TraceRequest]
    unit_tokens: int = 1  # 1, or the block size of a block trace


@dataclass(frozen=True)
class TraceLimits:
    """Bounds on a trace's size (the app's; the CLI has none): ``ValueError`` past them."""

    max_requests: int | None = None
    max_units: int | None = None  # tokens (or blocks) over all requests, outputs included


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


# ---------------------------------------------------------------------- public API: reading traces and options


def load_trace(
    lines: Iterable[str],
    tokenizer: TextTokenizer | Callable[[], TextTokenizer] | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    limits: TraceLimits = TraceLimits(),
) -> Trace:
    """Parse and check every line, then tokenize: a :class:`Trace`, or a :class:`TraceError` naming the line.

    Args:
        lines: The JSONL text, line by line (blank lines are skipped, numbering counts them).
        tokenizer: For chat and prompt traces: a :class:`TextTokenizer`, or a function returning
            one (called only when the trace holds text, after every line has been checked).
        block_size: Tokens per hash id of a block trace.
        limits: Bounds on requests and tokens; a trace over them is refused.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise TraceError(f"block size must be a positive integer, got {block_size!r}")
    kind, records = None, []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = _parse_line(line, number)
        line_kind = _kind_of(record, number)
        if kind is None:
            kind = line_kind
        elif line_kind != kind:
            raise TraceError(f"line {number}: a {line_kind} request in a {kind} trace (every line must be one format)")
        records.append((number, record))
        if limits.max_requests is not None and len(records) > limits.max_requests:
            raise TraceError(f"the trace has more than {limits.max_requests:,} requests, the limit here; send fewer")
    if kind is None:
        raise TraceError("the trace is empty: send one JSON object per line")
    checked = [(number, _CHECKS[kind](record, number, block_size)) for number, record in records]
    if all(timestamp is not None for _, (timestamp, _) in checked):
        checked.sort(key=lambda item: item[1][0])  # stable: ties keep file order
    fields = [item[1][1] for item in checked]
    if kind in ("chat", "prompt"):
        tok = tokenizer() if callable(tokenizer) and not hasattr(tokenizer, "prompt_ids") else tokenizer
        if tok is None:
            raise TraceError(f"a {kind} trace holds text: it needs a tokenizer")
        requests = [_tokenized(tok, messages, output) for messages, output in fields]
    elif kind == "tokens":
        requests = [TraceRequest(tuple(ids), tuple(out), len(ids)) for ids, out in fields]
    else:
        requests = [TraceRequest(tuple(ids), (), length) for ids, length in fields]
    units = sum(len(r.units) + len(r.output) for r in requests)
    if limits.max_units is not None and units > limits.max_units:
        what = "blocks" if kind == "blocks" else "tokens"
        raise TraceError(f"the trace has {units:,} {what}, more than the {limits.max_units:,} allowed here; send a shorter one")
    return Trace(kind, requests, block_size if kind == "blocks" else 1)


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


# ---------------------------------------------------------------------- public API: reports


def table(rows: Sequence[ReplayRow], model: str = "", unit_note: str = "") -> str:
    """The rows as a fixed-width text table, then each policy's knee."""
    head = f"{'policy':<6} {'budget':>10} {'requests':>9} {'req hit':>8} {'tok hit':>8} {'prompt tok':>13} {'reused tok':>13} {'peak':>10} {'evictions':>10} {'prefill saved':>14}"
    lines = [f"# {model}{unit_note}".rstrip() if model or unit_note else None, head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.policy:<6} {r.budget:>10} {r.requests:>9,} {r.request_hit_rate:>8.1%} {r.token_hit_rate:>8.1%} {r.prompt_tokens:>13,} "
            f"{r.reused_tokens:>13,} {format_bytes(r.peak_bytes):>10} {r.evictions:>10,} {_seconds(r.prefill_s_saved):>14}"
            + ("  <- knee" if r.knee else "")
        )
    lines.append("")
    lines += [knee_sentence(rows, policy) for policy in dict.fromkeys(r.policy for r in rows)]
    return "\n".join(line for line in lines if line is not None)


def knee_sentence(rows: Sequence[ReplayRow], policy: str) -> str:
    knee = next((r for r in rows if r.policy == policy and r.knee), None)
    if knee is None:
        return f"{policy}: no budget saves within {KNEE_TOLERANCE:.0%} of an unbounded cache"
    return f"{policy}: knee at {knee.budget} (the smallest budget within {KNEE_TOLERANCE:.0%} of an unbounded cache's savings: {knee.token_hit_rate:.1%} of prompt tokens reused)"


def rows_csv(rows: Sequence[ReplayRow]) -> str:
    """The rows as CSV, the columns of :data:`ROW_FIELDS`."""
    import csv
    import io

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=ROW_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(r.to_dict() for r in rows)
    return out.getvalue()


def hit_rate_figure(rows: Sequence[ReplayRow], title: str = "Prefix-cache token hit rate vs memory budget"):
    """A plotly figure: token hit rate vs budget (log axis), one line per policy, unbounded as a dashed line."""
    import plotly.graph_objects as go  # only for a chart: the replay itself needs no plotly

    fig = go.Figure()
    for policy in dict.fromkeys(r.policy for r in rows):
        mine = [r for r in rows if r.policy == policy and r.budget_bytes is not None]
        fig.add_trace(
            go.Scatter(
                x=[r.budget_bytes / (1 << 30) for r in mine],
                y=[100 * r.token_hit_rate for r in mine],
                mode="lines+markers",
                name=policy,
                customdata=[[r.budget, 100 * r.request_hit_rate, r.evictions] for r in mine],
                hovertemplate="%{customdata[0]}: %{y:.1f}% of prompt tokens reused, %{customdata[1]:.1f}% of requests hit, %{customdata[2]:,} evictions<extra>" + policy + "</extra>",
            )
        )
    unbounded = next((r for r in rows if r.budget_bytes is None), None)
    if unbounded is not None:
        fig.add_hline(y=100 * unbounded.token_hit_rate, line_dash="dash", annotation_text=f"unbounded (peak {format_bytes(unbounded.peak_bytes)})")
    fig.update_layout(title=title, xaxis_title="memory budget (GiB, log scale)", yaxis_title="prompt tokens reused (%)", xaxis_type="log", yaxis_range=[0, 100], template="plotly_white", legend_title="policy")
    return fig


# ---------------------------------------------------------------------- the command line


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cache.replay``: 0 on success, 2 (with a message on stderr) for bad input; writes nothing partial."""
    args = _parser().parse_args(argv)
    try:
        model = load_model_size(args.model_config)
        settings = ReplaySettings.for_model(model, args.kv_dtype, min_tokens=args.min_tokens, prefill_tokens_per_s=args.prefill_tokens_per_s)
        budgets, policies = parse_budgets(args.budgets), parse_policies(args.policies)
        with open(args.trace, encoding="utf-8", errors="strict") as lines:
            trace = load_trace(lines, lambda: _load_tokenizer(args.tokenizer), args.block_size)
        rows = plan(trace, budgets, policies, settings)
    except (ValueError, OSError) as exc:  # TraceError, UnicodeDecodeError and a missing file among them
        print(f"error: {exc}", file=sys.stderr)
        return 2
    note = f" · {settings.kv_bytes_per_token:,} B of KV per token ({args.kv_dtype})" + (f" · blocks of {trace.unit_tokens} tokens" if trace.kind == "blocks" else "")
    if args.html:
        _write_atomically(args.html, hit_rate_figure(rows, f"{model.name}: prefix-cache token hit rate vs budget").to_html(include_plotlyjs=True, full_html=True))
    if args.format == "json":
        print(json.dumps([r.to_dict() for r in rows], indent=2))
    else:
        print(table(rows, model.name, note))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cache.replay", description=__doc__.splitlines()[0])
    parser.add_argument("trace", help="a JSONL trace: chat requests, prompts, token ids, or Mooncake blocks")
    parser.add_argument("--model-config", default=DEFAULT_MODEL_CONFIG, help=f"a shipped config ({', '.join(model_config_names())}), a JSON file or a folder with config.json")
    parser.add_argument("--kv-dtype", default="bf16", choices=list(KV_DTYPE_BYTES), help="the dtype KV is stored in (default bf16)")
    parser.add_argument("--budgets", default="auto", help="comma-separated sizes (512MiB,4GiB,inf); 'auto' sweeps from the unbounded peak down (default)")
    parser.add_argument("--policies", default="lru", help=f"comma-separated eviction policies: {', '.join(POLICIES)} (default lru)")
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="tokens per hash id in a block trace (default 512, Mooncake's)")
    parser.add_argument("--min-tokens", type=int, default=DEFAULT_MIN_TOKENS, help="the engine's min_cached_tokens (default 20)")
    parser.add_argument("--tokenizer", default="bundled", help="for text traces: 'bundled' (SmolLM2's) or a local tokenizer folder")
    parser.add_argument("--prefill-tokens-per-s", type=float, default=DEFAULT_PREFILL_TOKENS_PER_S, help=f"to turn reused tokens into time (default {DEFAULT_PREFILL_TOKENS_PER_S:g}: the bundled model on a 2-core CPU, measured)")
    parser.add_argument("--format", choices=["table", "json"], default="table", help="stdout: a table (default) or a JSON list of rows")
    parser.add_argument("--html", metavar="FILE", help="also write a plotly chart of hit rate vs budget, one line per policy")
    return parser


def _load_tokenizer(spec: str) -> TextTokenizer:
    from engine.chat_tokens import ChatTokenizer  # lazily: only text traces need a tokenizer (and torch)

    return ChatTokenizer.load(spec)


def _write_atomically(path: str, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (a temporary file in the same folder, renamed)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".replay-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# ---------------------------------------------------------------------- helpers


def _mark_knee(rows: list[ReplayRow], unbounded_reused: int) -> list[ReplayRow]:
    """Mark the first row (ascending budgets, unbounded last) within KNEE_TOLERANCE of the unbounded savings."""
    for i, row in enumerate(rows):
        if row.reused_tokens >= (1 - KNEE_TOLERANCE) * unbounded_reused:
            rows[i] = dataclasses.replace(row, knee=True)
            break
    return rows


def _seconds(s: float) -> str:
    return f"{s:,.1f} s" if s < 3600 else f"{s / 3600:,.1f} h"


def _parse_line(line: str, number: int) -> dict:
    try:
        record = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise TraceError(f"line {number}: not valid JSON ({str(exc)[:120]})") from None
    if not isinstance(record, dict):
        raise TraceError(f"line {number}: each line must be a JSON object, got {type(record).__name__}")
    return record


def _kind_of(record: dict, number: int) -> str:
    for key, kind in (("hash_ids", "blocks"), ("messages", "chat"), ("prompt", "prompt"), ("token_ids", "tokens")):
        if key in record:
            return kind
    keys = ", ".join(sorted(record)[:8]) or "none"
    raise TraceError(f"line {number}: no 'messages', 'prompt', 'token_ids' or 'hash_ids' field (keys: {keys})")


def _timestamp(record: dict, number: int) -> float | None:
    value = record.get("timestamp")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TraceError(f"line {number}: timestamp must be a number, got {value!r:.40}")
    return float(value)


def _int_list(value: Any, field: str, number: int) -> list[int]:
    if not isinstance(value, list):
        raise TraceError(f"line {number}: {field} must be a list of integers, got {type(value).__name__}")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            raise TraceError(f"line {number}: {field} must hold non-negative integers, found {item!r:.40}")
    return value


def _length(record: dict, field: str, number: int, required: bool) -> int:
    value = record.get(field)
    if value is None and not required:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise TraceError(f"line {number}: {field} must be an integer" + (", and is required" if value is None else f", got {value!r:.40}"))
    if value < 0:
        raise TraceError(f"line {number}: {field} must not be negative, got {value}")
    return value


def _text(value: Any, field: str, number: int, required: bool = True) -> str | None:
    if value is None and not required:
        return None
    if isinstance(value, list):  # OpenAI content parts: only text parts
        if all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value):
            return "".join(p["text"] for p in value)
        raise TraceError(f"line {number}: {field} may hold only text parts ({{\"type\": \"text\", \"text\": ...}})")
    if not isinstance(value, str):
        raise TraceError(f"line {number}: {field} must be a string" + (", and is required" if value is None else f", got {type(value).__name__}"))
    return value


def _check_chat(record: dict, number: int, block_size: int) -> tuple[float | None, tuple[list[dict[str, str]], str | None]]:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise TraceError(f"line {number}: messages must be a non-empty list of {{\"role\", \"content\"}} objects")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise TraceError(f"line {number}: messages[{i}] needs a role of system, user or assistant")
        checked.append({"role": message["role"], "content": _text(message.get("content"), f"messages[{i}].content", number)})
    return _timestamp(record, number), (checked, _text(record.get("output"), "output", number, required=False))


def _check_prompt(record: dict, number: int, block_size: int) -> tuple[float | None, tuple[list[dict[str, str]], str | None]]:
    prompt = _text(record["prompt"], "prompt", number)
    system = _text(record.get("system_prompt"), "system_prompt", number, required=False)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return _timestamp(record, number), (messages, _text(record.get("output"), "output", number, required=False))


def _check_tokens(record: dict, number: int, block_size: int) -> tuple[float | None, tuple[list[int], list[int]]]:
    ids = _int_list(record["token_ids"], "token_ids", number)
    out = _int_list(record.get("output_ids", []), "output_ids", number)
    return _timestamp(record, number), (ids, out)


def _check_blocks(record: dict, number: int, block_size: int) -> tuple[float | None, tuple[list[int], int]]:
    ids = _int_list(record["hash_ids"], "hash_ids", number)
    length = _length(record, "input_length", number, required=True)
    _length(record, "output_length", number, required=False)
    if length > len(ids) * block_size or (ids and length <= (len(ids) - 1) * block_size):
        raise TraceError(
            f"line {number}: input_length {length} needs {math.ceil(length / block_size)} blocks of {block_size} tokens, "
            f"but hash_ids has {len(ids)} (is --block-size right?)"
        )
    return _timestamp(record, number), (ids, length)


_CHECKS = {"chat": _check_chat, "prompt": _check_prompt, "tokens": _check_tokens, "blocks": _check_blocks}


def _tokenized(tokenizer: TextTokenizer, messages: list[dict[str, str]], output: str | None) -> TraceRequest:
    ids = tuple(tokenizer.prompt_ids(messages))
    return TraceRequest(ids, tuple(tokenizer.reply_ids(output)) if output else (), len(ids))


if __name__ == "__main__":
    sys.exit(main())
