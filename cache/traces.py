"""Request traces for the replay: four JSON Lines formats, checked line by line, tokenized into tree units.

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

Knows nothing about models or tokenizers: text is tokenized by whatever :class:`TextTokenizer` the
caller passes. The replay itself is ``cache/budget_plan.py``; the command line and its outputs are
``cache/replay.py``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol, Sequence

DEFAULT_BLOCK_SIZE = 512  # Mooncake's


class TraceError(ValueError):
    """Bad input: a malformed line, a missing field, a bad option. The message says where and why."""


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


# ---------------------------------------------------------------------- public API


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


# ---------------------------------------------------------------------- helpers


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
