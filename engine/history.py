"""Step 8's backlog: replies waiting to go into the prefix cache after their request has answered.

With the float model's prefill (``prefill="model"``, the fp32 and bf16 formats; the int4 and int8
steps prefill through the decode step and store a reply as decoded, with no backlog), storing a reply
costs a prefill: the decode step's KV has other bits than a miss computes, so the reply is prefilled again before it is stored (``Engine._store_history``, ``engine/prefill.py``).
Under load that prefill was a third to a half of the model thread's time (``benchmark/README.md``,
"Continuous batching and the served path"), paid before the client saw the end of its stream. So
nobody waits for it any more; a stored reply only serves a later request, and this backlog decides when:

- **idle time**: the scheduler runs the backlog when no request needs the thread
  (``Scheduler.submit(..., background=True)``);
- **the conversation's next turn**: a request whose prompt continues a waiting reply (same
  namespace, at least one whole chunk past the reply's prompt) stores it first, so a next turn
  hits the whole history as before, whatever the load;
- **overflow**: past :data:`BACKLOG` waiting replies, or :data:`BACKLOG_TOKENS` tokens of model
  cache held by them, the oldest is skipped: under sustained load the work is shed, not queued;
- **a clear of the cache** since the reply: skipped, so a clear is never undone by a late insert.

Knows nothing of models or of the scheduler: the engine runs the prefills.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

BACKLOG = 16  # replies waiting at most
BACKLOG_TOKENS = 8192  # and the model-cache room they hold (46 KB per token for SmolLM2-135M at fp32 KV: ~380 MB)


@dataclass(eq=False)
class Reply:
    """A finished request's prompt and reply, waiting to be stored.

    ``tokens`` are the ``length`` tokens to store (the reply's last token has no KV yet); their
    prefill starts again at ``start``, the prompt's last chunk boundary. ``done`` is set once it
    is stored or skipped.
    """

    run: Any  # the request (engine._Run) whose reply it is
    model_cache: Any
    held_tokens: int  # the model cache's room, in tokens
    tokens: list[int]
    start: int
    namespace: str
    clears: int  # the prefix cache's clear count when the reply ended
    done: threading.Event = field(default_factory=threading.Event)
    prefill_ms: float = 0.0
    outcome: str = "waiting"  # then "stored", "promoted" or "skipped"

    def continued_by(self, prompt_ids: Sequence[int], namespace: str, chunk: int) -> bool:
        """Whether a prompt in ``namespace`` would reuse at least one whole chunk of the reply once stored."""
        reach = self.start + chunk
        return namespace == self.namespace and len(self.tokens) >= reach and list(prompt_ids[:reach]) == self.tokens[:reach]


class Backlog:
    """Waiting replies, oldest first, and what became of them. Used on the model's thread only."""

    def __init__(self, limit: int = BACKLOG, limit_tokens: int = BACKLOG_TOKENS) -> None:
        self.limit, self.limit_tokens = limit, limit_tokens
        self.held_tokens = 0
        self._waiting: OrderedDict[int, Reply] = OrderedDict()
        self.storing: set[Reply] = set()  # taken, and their prefill under way
        self.counts = {"stored": 0, "promoted": 0, "skipped": 0}

    def add(self, reply: Reply) -> None:
        """Queue ``reply``; past either limit the oldest waiting ones are skipped (the reply itself, if it alone is over)."""
        self._waiting[id(reply)] = reply
        self.held_tokens += reply.held_tokens
        while self._waiting and (len(self._waiting) > self.limit or self.held_tokens > self.limit_tokens):
            self.finish(self._take(next(iter(self._waiting))), "skipped")

    def take_continued(self, prompt_ids: Sequence[int], namespace: str, chunk: int) -> list[Reply]:
        """The waiting replies that a prompt continues, taken off the backlog (oldest first)."""
        return [self._take(id(r)) for r in list(self._waiting.values()) if r.continued_by(prompt_ids, namespace, chunk)]

    def in_progress_continued(self, prompt_ids: Sequence[int], namespace: str, chunk: int) -> list[Reply]:
        """The replies being stored now (by idle time) that a prompt continues: it waits for them."""
        return [r for r in self.storing if r.continued_by(prompt_ids, namespace, chunk)]

    def take_oldest(self) -> Reply | None:
        return self._take(next(iter(self._waiting))) if self._waiting else None

    def _take(self, key: int) -> Reply:
        reply = self._waiting.pop(key)
        self.held_tokens -= reply.held_tokens
        return reply

    def finish(self, reply: Reply, outcome: str) -> None:
        """Record what became of ``reply``, drop its model cache and wake whoever waits for it."""
        reply.outcome, reply.model_cache = outcome, None
        self.storing.discard(reply)
        self.counts[outcome] += 1
        reply.done.set()

    def info(self) -> dict[str, int]:
        return {"waiting": len(self._waiting), **self.counts}
