"""Warming: prefill a system prompt (or a list of messages) into the prefix cache without generating, and maybe pin it.

A list ending with a user message is stored exactly as a request with those messages would send
it (the assistant's turn opened), so that request is an exact hit. Otherwise (a system prompt, or
a conversation ending with the assistant) only the tokens every next user turn shares are stored:
the common prefix of renderings with different user messages, so any request that goes on
from there is a partial hit. :func:`unpin` drops such a pin by the same messages. Pinning itself is
the cache's (``PrefixCache.pin``, ``unpin``); this module knows nothing of sessions, budgets per caller or HTTP.
"""

from __future__ import annotations

from typing import Any, Sequence


_PROBES = ("A", "z", "1", " ")  # user messages that differ from their first character (a token merge with one is not shared by all)


def warm_tokens(chat: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """The token ids warming ``messages`` stores (see the module docstring)."""
    messages = [dict(m) for m in messages]
    if messages and messages[-1]["role"] == "user":
        return chat.prompt_ids(messages)
    renderings = [chat.prompt_ids(messages + [{"role": "user", "content": probe}]) for probe in _PROBES]
    shared = 0
    while all(len(r) > shared for r in renderings) and len({r[shared] for r in renderings}) == 1:
        shared += 1
    return renderings[0][:shared]


def warm(engine: Any, messages: Sequence[dict[str, str]], namespace: str, pin: bool = False, ttl_s: float | None = None) -> dict[str, Any]:
    """Prefill ``messages`` into ``namespace`` (reusing what is cached already), then pin it if asked.

    Returns:
        ``tokens`` (stored sequence length), ``reused`` (already cached), ``prefilled`` (computed now),
        ``pinned`` and, for a pin, the cache's pin facts (``pinned_bytes``, ``expires_in_s``).

    Raises:
        ValueError: too few tokens to cache, too many for the context, or the pin refused (over budget).
    """
    tokens = warm_tokens(engine.chat, messages)
    if len(tokens) < engine.cache.min_tokens:
        raise ValueError(f"this warms {len(tokens)} tokens, fewer than the {engine.cache.min_tokens} the prefix cache keeps; send a longer prompt")
    engine.check_prompt_tokens(len(tokens), 1)
    exact = bool(messages) and messages[-1]["role"] == "user"  # a whole prompt: keep the logits after it, for its exact hit
    stored = engine.store(tokens, namespace, with_logits=exact)  # reuses what is cached, prefills the rest, stores the whole
    result = {"tokens": len(tokens), "reused": stored["reused"], "prefilled": stored["prefilled"], "pinned": False}
    if pin:
        result.update(engine.cache.pin(tokens, namespace, ttl_s), pinned=True)  # ValueError when not stored (over budget) or over the pin budget
    return result


def unpin(engine: Any, messages: Sequence[dict[str, str]], namespace: str) -> dict[str, Any]:
    """Drop the pin that warming ``messages`` with a pin made in ``namespace``; the entry stays cached, evictable again.

    Returns:
        ``tokens`` (the warmed sequence's length) and ``unpinned`` (False: that sequence had no pin here).
    """
    tokens = warm_tokens(engine.chat, messages)
    return {"tokens": len(tokens), "unpinned": engine.cache.unpin(tokens, namespace)}
