"""The served engine: loaded in the background, shared by UI and REST through one bounded worker pool.

The engine is thread-safe, but the machine has few cores: every generation, whichever door it came
in by (the Gradio queue, gradio_client or plain REST), runs on one pool of ``concurrency`` threads,
with at most ``max_queue`` more waiting. The pool thread runs the engine's own stream, so the
engine's clock starts when the work starts (queueing is not counted as TTFT) and an abandoned
stream still finishes and frees its slot.

This module also owns cache isolation: which prefix-cache namespace a session uses, and what of
the cache a session may see or clear. It never shows the text of another session's prompts.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Sequence

from cache import DEFAULT_NAMESPACE
from engine import Engine, GenerationResult, final_result
from ui.settings import AppSettings

log = logging.getLogger(__name__)

Loader = Callable[..., Engine]


class NotReady(RuntimeError):
    """The model is still loading (or failed to load): REST answers 503."""


class Busy(RuntimeError):
    """Too many requests are waiting: REST answers 503."""


class EngineService:
    """The app's one engine and the rules around it.

    Example:
        >>> service = EngineService(AppSettings()); service.start_loading()
        >>> service.wait_ready(timeout=60)
        >>> service.generate(service.namespace_for("alice"), prompt="Hi", max_new_tokens=8).text
    """

    def __init__(self, settings: AppSettings, loader: Loader = Engine.from_pretrained) -> None:
        self.settings = settings
        self._loader = loader
        self._engine: Engine | None = None
        self._loaded = threading.Event()
        self.load_error: str | None = None
        self.progress_lines: list[str] = []
        self._pool = ThreadPoolExecutor(max_workers=settings.concurrency, thread_name_prefix="generate")
        self._slots = threading.BoundedSemaphore(settings.concurrency + settings.max_queue)

    # ------------------------------------------------------------------ loading

    def start_loading(self) -> None:
        """Load the model in a background thread; ``progress_lines`` fills as it goes."""
        threading.Thread(target=self._load, name="load-model", daemon=True).start()

    def _load(self) -> None:
        def progress(line: object) -> None:
            self.progress_lines.append(str(line))
            log.info("%s", line)

        try:
            self._engine = self._loader(self.settings.model, progress=progress, cache_budget_mb=self.settings.cache_budget_mb)
            info = self._engine.info()
            progress(f"Ready: {info['model']} on {info['device']} ({info['dtype']}).")
        except Exception as exc:  # shown on the page and by /health; the server keeps running
            self.load_error = f"the model could not be loaded: {exc}"
            progress(self.load_error)
        finally:
            self._loaded.set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._loaded.wait(timeout) and self._engine is not None

    @property
    def ready(self) -> bool:
        return self._engine is not None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise NotReady(self.load_error or "the model is still loading; try again in a few seconds")
        return self._engine

    def status(self) -> dict[str, Any]:
        """What /health and the page header show."""
        info = self._engine.info() if self._engine is not None else {}
        return {
            "ready": self.ready,
            "error": self.load_error,
            "progress": list(self.progress_lines[-6:]),
            "cache_mode": self.settings.cache_mode,
            "model": info.get("model"),
            "device": info.get("device"),
            "dtype": info.get("dtype"),
            "parameters": info.get("parameters"),
            "context_length": info.get("context_length"),
        }

    # ------------------------------------------------------------------ sessions and namespaces

    def namespace_for(self, session_id: str | None) -> str:
        """The prefix-cache namespace of a session: one shared namespace, or one per session."""
        if not self.settings.per_session:
            return DEFAULT_NAMESPACE
        digest = hashlib.sha256((session_id or "anonymous").encode("utf-8", "surrogatepass")).hexdigest()[:16]
        return f"session-{digest}"

    @staticmethod
    def scratch_namespace(namespace: str) -> str:
        """A cold namespace for one scenario run (dropped afterwards), under the session's own."""
        return f"{namespace}/scenario-{uuid.uuid4().hex[:8]}"

    # ------------------------------------------------------------------ generation

    def stream(self, namespace: str, **kwargs: Any) -> Iterator[str | GenerationResult]:
        """Like ``Engine.stream`` with ``cache_key=namespace``, run on the shared pool.

        Raises:
            ValueError: bad input (raised here, before anything is queued, except a prompt too
                long for the context window, which surfaces on the first ``next``).
            NotReady, Busy: the model is not loaded, or too many requests are waiting.
        """
        engine = self.engine
        engine.make_request(cache_key=namespace, **kwargs)  # validate now, so the caller gets a ValueError at once
        if not self._slots.acquire(blocking=False):
            raise Busy(f"the server is busy ({self.settings.max_queue} requests waiting); try again shortly")
        items: queue.SimpleQueue = queue.SimpleQueue()
        try:
            self._pool.submit(self._run, engine, namespace, kwargs, items)
        except BaseException:
            self._slots.release()
            raise
        return _drain(items)

    def generate(self, namespace: str, **kwargs: Any) -> GenerationResult:
        """Run one request to completion on the pool."""
        return final_result(self.stream(namespace, **kwargs))

    def _run(self, engine: Engine, namespace: str, kwargs: dict[str, Any], items: queue.SimpleQueue) -> None:
        try:
            for item in engine.stream(cache_key=namespace, **kwargs):
                items.put(("item", item))
        except Exception as exc:  # handed to the consumer, which re-raises it in its own thread
            items.put(("error", exc))
        finally:
            items.put(("done", None))
            self._slots.release()

    # ------------------------------------------------------------------ what a session may see and do

    def stats(self, namespace: str) -> dict[str, Any]:
        """Prefix-cache stats as a session may see them: its own namespace, or the shared one."""
        stats = self.engine.cache.stats(namespace=namespace)
        return {**stats, "cache_mode": self.settings.cache_mode, "scope": "session" if self.settings.per_session else "shared"}

    def clear(self, namespace: str) -> dict[str, Any]:
        """Clear what this session may clear: everything (local, shared mode), else its own namespace.

        A shared cache on a public server is never cleared by a visitor: that would let anyone wipe
        everyone's prefixes (and learn from the next request's timing that it was wiped).
        """
        cache = self.engine.cache
        if self.settings.may_clear_everything:
            cache.clear()
            return {"cleared": "all", "message": "cleared the whole prefix cache"}
        if self.settings.per_session:
            cache.clear(namespace)
            return {"cleared": "session", "message": "cleared this session's prefix cache"}
        return {"cleared": "nothing", "message": "the shared cache of a public server cannot be cleared by a visitor"}

    def drop_namespace(self, namespace: str) -> None:
        """Forget a scratch namespace (a scenario run's), entries and counters."""
        if self._engine is not None:
            self._engine.cache.clear(namespace)

    def entries(self, namespace: str, own_sequences: Sequence[Sequence[int]] = ()) -> list[dict[str, Any]]:
        """The cache inspector's rows for a session, with a text preview only of the session's own tokens.

        In per-session mode the namespace holds only the session's own requests. In shared mode
        an entry's text is shown only when its whole path from the root is a prefix of a sequence
        this session sent or received itself; others' entries show sizes and counts, never text.
        """
        engine = self.engine
        own_all = self.settings.per_session
        rows, stack = [], []  # stack: (end position, path tokens) of the ancestors of the current node
        for entry in engine.cache.entries(namespace):
            while stack and stack[-1][0] != entry.start:
                stack.pop()
            path = (stack[-1][1] if stack else ()) + entry.token_ids
            stack.append((entry.start + len(entry.token_ids), path))
            own = own_all or any(_is_prefix(path, seq) for seq in own_sequences)
            rows.append(
                {
                    "start": entry.start,
                    "tokens": len(entry.token_ids),
                    "bytes": entry.nbytes,
                    "hits": entry.hits,
                    "last_used": entry.last_used,
                    "logits": entry.has_logits,
                    "locked": entry.locked,
                    "preview": _preview(engine.decode(entry.token_ids)) if own else "(another session's tokens)",
                }
            )
        return rows


# ---------------------------------------------------------------------- helpers


def _drain(items: queue.SimpleQueue) -> Iterator[str | GenerationResult]:
    while True:
        kind, value = items.get()
        if kind == "item":
            yield value
        elif kind == "error":
            raise value
        else:
            return


def _is_prefix(prefix: Sequence[int], sequence: Sequence[int]) -> bool:
    return len(prefix) <= len(sequence) and tuple(sequence[: len(prefix)]) == tuple(prefix)


def _preview(text: str, limit: int = 90) -> str:
    """The start and the end of a node's text: the end is where prompts sharing the start differ."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    half = (limit - 3) // 2
    return f"{text[:half]} … {text[-half:]}"
