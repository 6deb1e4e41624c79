"""The miss explainer: why a request reused what it did, in words, from what its lookup saw.

``explain`` turns the tree's :class:`cache.explain.LookupDetail` (tokens matched, the nearest cached
sequence, cached tokens after the divergence, an evicted prefix) into the ``cache_explanation`` of
every result: a reason (``hit``, ``off``, ``below_min_tokens``, ``evicted``, ``diverged``, ``cold``),
the position where the prompt leaves the nearest cached sequence, which part of the chat that is
(the chat template, the system prompt, an earlier turn, the user's message) and the decoded
context on both sides. It runs after the reply, never on the way to the first token.

What it may reveal: it only ever looks in the request's own namespace. The shared namespace
(``cache.DEFAULT_NAMESPACE``) holds everyone's prefixes, so there the cached side beyond the common
prefix is never decoded, the nearest sequence's length is not given, and a match shorter than
``min_tokens`` is not reported (the reused-token count already says as much as what is left). Knows
nothing of HTTP or sessions.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from cache import DEFAULT_NAMESPACE, PrefixMatch
from engine.chat_tokens import ChatTokenizer

CONTEXT_TOKENS = 8  # decoded tokens shown on each side of the divergence

HINTS = {
    "template": "the chat template differs here (another template, or another order of turns): only requests with the same template share a prefix",
    "system": "the system prompt differs from the cached one: keep it byte-identical across requests (no dates, ids or per-user text in it) to reuse it",
    "history": "an earlier turn differs: resend the history exactly as it was, the assistant's replies included, to reuse it",
    "user": "everything before your message matched: only your message is new, as expected",
    "prompt": "the text differs here (raw prompt, no chat template)",
    "end": "the prompt ends inside a cached sequence: every whole chunk before its last token was reused",
}


def explain(
    match: PrefixMatch | None,
    prompt_ids: Sequence[int],
    messages: Sequence[dict[str, str]] | None,
    chat: ChatTokenizer,
    decode: Callable[[Sequence[int]], str],
    min_tokens: int,
    chunk: int | None = None,
) -> dict[str, Any]:
    """The ``cache_explanation`` of a request.

    Args:
        match: The request's lookup (None: the prefix cache was off).
        prompt_ids: The prompt's token ids.
        messages: The chat messages the prompt was built from (None: raw text).
        chat: The tokenizer with the chat template, to place the divergence in a message.
        decode: Token ids to text.
        min_tokens: The cache's ``min_tokens``.
        chunk: The prefill's chunk (engine/prefill.py): reuse stops at a whole chunk, said when it cut the match short.
    """
    n = len(prompt_ids)
    base = {"prompt_tokens": n, "reused_tokens": match.length if match is not None else 0, "min_tokens": min_tokens}
    if match is None:
        return {**base, "reason": "off", "message": "The prefix cache was off for this request."}
    if match.kind == "skipped":
        return {**base, "reason": "below_min_tokens", "message": f"The prompt has {n} tokens, fewer than the {min_tokens} the cache stores or looks up: its prefill is cheaper than the bookkeeping."}
    if match.kind == "hit":
        return {**base, "reason": "hit", "matched_tokens": n, "message": f"Exact hit: all {n} tokens and the logits after them were cached; no model call before the first token."}

    shared = match.namespace == DEFAULT_NAMESPACE
    detail = match.detail
    matched = detail.matched if not (shared and detail.matched < min_tokens) else 0
    spans = _content_spans(chat, messages, prompt_ids) if messages is not None else None
    first_content = min((start for start, _, _ in spans), default=0) if spans else 0
    evicted = detail.evicted if detail.evicted is not None and (not shared or detail.evicted.length >= min_tokens) else None
    out: dict[str, Any] = {
        **base,
        "matched_tokens": matched,
        "nearest_cached_tokens": None if shared else detail.nearest,
        "evicted": None if evicted is None else {"length": evicted.length, "at": evicted.at, "cause": evicted.cause},
    }
    if evicted is not None:
        reason = "evicted"
    elif matched > first_content and matched > 0:
        reason = "diverged"
    else:
        reason = "cold"
    out["reason"] = reason
    if reason == "cold" and evicted is None:
        out["message"] = "Cold: nothing similar was cached in " + ("the shared cache" if shared else "your namespace") + " (at most the chat template's first tokens matched)."
        return out

    where = "end" if matched >= n else _where(matched, spans, messages)
    out.update(
        diverged_at=matched,
        where=where,
        hint=HINTS[where if where in HINTS else "history"],
        before=decode(prompt_ids[max(matched - CONTEXT_TOKENS, 0) : matched]),
        prompt_after=decode(prompt_ids[matched : matched + CONTEXT_TOKENS]),
        cached_after=None if shared else decode(detail.cached_next),
    )
    place = {"end": "at its end", "template": "in the chat template", "system": "in the system prompt", "user": "in your message", "prompt": "in the text"}.get(where, f"in {where}")
    out["message"] = f"The prompt leaves the nearest cached sequence at token {matched} of {n}, {place}."
    if chunk and 0 < match.length < min(matched, n - 1):
        out["message"] += (
            f" {match.length} of the {matched} matching tokens were reused: reuse stops at a whole {chunk}-token chunk, and the rest"
            " of that chunk is computed again, so the answer is bit for bit the one a miss gives."
        )
    if evicted is not None:
        out["message"] = (
            f"A {evicted.length}-token prefix of this prompt was cached and evicted ({evicted.cause}); "
            f"now {match.length} tokens were reused. " + out["message"]
        )
    return out


# ---------------------------------------------------------------------- helpers


def _where(position: int, spans: list[tuple[int, int, str]] | None, messages: Sequence[dict[str, str]] | None) -> str:
    """Which part of the prompt token ``position`` is in: template, system, user, "history (turn i)", or prompt (raw)."""
    if messages is None:
        return "prompt"
    if spans is None:  # tokenized as text (control-token text in a message): no offsets to place it
        return "user"
    for start, end, label in spans:
        if start <= position < end:
            return label
    return "template"


def _content_spans(chat: ChatTokenizer, messages: Sequence[dict[str, str]], prompt_ids: Sequence[int]) -> list[tuple[int, int, str]] | None:
    """Token ranges ``[start, end)`` of each message's content, labelled, from the template's character offsets.

    None when the rendered template, tokenized with offsets, does not give exactly ``prompt_ids``.
    """
    tokenizer = chat.tokenizer
    if not chat.has_template:
        return None
    with chat.lock:
        rendered = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        encoded = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    if list(encoded.input_ids) != list(prompt_ids):
        return None
    offsets = encoded.offset_mapping
    spans, cursor, turn = [], 0, 0
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    for i, message in enumerate(messages):
        at = rendered.find(message["content"], cursor)
        if at < 0 or not message["content"]:
            continue
        end_char = at + len(message["content"])
        cursor = end_char
        start = next((t for t, (_, e) in enumerate(offsets) if e > at), len(offsets))
        end = next((t for t, (s, _) in enumerate(offsets) if s >= end_char), len(offsets))
        if message["role"] == "system":
            label = "system"
        elif i == last_user:
            label = "user"
        else:
            turn += 1
            label = f"history (turn {turn}, {message['role']})"
        spans.append((start, end, label))
    return spans
