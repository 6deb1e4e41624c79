"""The backend seam: what the app measures, our own engine or a remote OpenAI-compatible server.

A :class:`Backend` runs one request in a prefix-cache namespace as a generator of text deltas,
then a :class:`~engine.GenerationResult` with the same timing fields whichever backend ran it;
it also reports cache stats, clears, and says what it can and cannot do (:class:`Capability`).
It is picked once at start-up by :func:`make_backend`; nothing downstream asks which one it is.

What a backend leaves to others: sessions, admission, fairness and cancellation are
``ui.admission``'s (the same for every backend); which namespace a session uses is
``ui.isolation``'s. A backend never sees a client's URL or headers: a remote URL comes only from the operator.

    local   ``backends.local.LocalBackend``: the engine in this process (server-side timings)
    remote  ``backends.remote.RemoteBackend``: vLLM, SGLang, llama-server, this project's /v1, any
            OpenAI-compatible server, with one small adapter per engine (client-side timings)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

from engine import GenerationResult

Progress = Callable[[str], None]
CAPABILITY_NAMES = ("kv_cache_off", "prefix_cache_off", "isolation", "cached_tokens", "server_stats", "clear", "token_ids", "running")


class BackendUnavailable(RuntimeError):
    """A remote that does not answer, or answers with a server error; the service reports 503."""


class CannotClear(RuntimeError):
    """This backend cannot clear what was asked (the engine has no such endpoint, or not for one namespace)."""


@dataclass(frozen=True)
class Capability:
    """One thing a backend may do: ``available``, and ``note`` saying how, or why not."""

    available: bool
    note: str


@dataclass(frozen=True)
class BackendInfo:
    """What the page, /health and benchmarks say about the backend being measured."""

    kind: str  # "local", "vllm", "sglang", "llama-server", "kvci" (this project), "openai" (anything else)
    model: str | None
    url: str | None = None  # None for the local engine
    timings: str = "server"  # "server": the engine's own clock; "client": measured from the stream by this app
    capabilities: Mapping[str, Capability] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "model": self.model,
            "url": self.url,
            "timings": self.timings,
            "capabilities": {name: {"available": c.available, "note": c.note} for name, c in self.capabilities.items()},
        }

    def reason_unavailable(self, name: str) -> str | None:
        """None when capability ``name`` is available, else the sentence saying why not."""
        capability = self.capabilities.get(name)
        return None if capability is None or capability.available else capability.note


class Backend(Protocol):
    """What the service calls. Requests are ``Engine.stream`` keyword arguments plus ``stop``."""

    def load(self, progress: Progress) -> None:
        """Get ready (load the model, or reach the server and detect what it is); raise on failure."""

    def info(self) -> BackendInfo: ...

    def check(self, namespace: str, **request: Any) -> None:
        """Raise ``ValueError`` for a request this backend cannot run, before it is queued."""

    def stream(self, namespace: str, **request: Any) -> Iterator[str | GenerationResult]:
        """Text deltas, then the result. Closing the generator stops the work."""

    def stats(self, namespace: str | None) -> dict[str, Any]:
        """Prefix-cache stats for one namespace (None: all), the keys of ``PrefixCache.stats``."""

    def clear(self, namespace: str | None) -> str:
        """Clear one namespace (None: everything); the message to show. Raises :class:`CannotClear`."""

    def drop(self, namespace: str) -> None:
        """Forget a scratch namespace (a scenario run's): entries where possible, and counters."""

    def entries(self, namespace: str) -> Sequence[Any]:
        """The cache's entries in ``namespace`` (``cache.CacheEntry``), or none where they cannot be seen."""

    def running(self, visible: Callable[[str], bool]) -> list[dict[str, Any]]:
        """The requests running now in the namespaces ``visible`` allows (``Engine.running``'s rows), or none where they cannot be seen."""

    def decode(self, token_ids: Sequence[int]) -> str: ...

    def status(self) -> dict[str, Any]:
        """The model's facts for /health: model, device, dtype, parameters, context_length (None where unknown)."""


def make_backend(settings: Any, local: Callable[[], Backend]) -> Backend:
    """The backend the operator chose: ``settings.backend_url`` (a remote) or the local engine."""
    if not getattr(settings, "backend_url", None):
        return local()
    from backends.remote import RemoteBackend

    return RemoteBackend(settings.backend_url, model=settings.backend_model, api_key=settings.backend_api_key, kind=settings.backend_kind)


def with_stop(stream: Iterator[str | GenerationResult], stop: Sequence[str] | None) -> Iterator[str | GenerationResult]:
    """Relay ``stream`` up to the first of the ``stop`` strings (not included); finish_reason "stop".

    For an engine without stop strings: text after the stop is held back, and the stream runs to
    its own end so the result keeps its timings and token counts. A stop string split across
    deltas is found: up to ``len(longest stop) - 1`` characters are held back until it is clear.
    """
    if not stop:
        yield from stream
        return
    hold = max(len(s) for s in stop) - 1
    text, sent, stopped = "", 0, False
    try:
        for item in stream:
            if isinstance(item, GenerationResult):
                if stopped:
                    item = replace(item, text=text, finish_reason="stop")
                elif sent < len(text):
                    yield text[sent:]
                yield item
                return
            if stopped:
                continue
            text += item
            cut = min((i for i in (text.find(s, max(sent - hold, 0)) for s in stop) if i >= 0), default=-1)
            if cut >= 0:
                text, stopped = text[:cut], True
                if sent < len(text):
                    yield text[sent:]
                sent = len(text)
            elif len(text) - hold > sent:
                yield text[sent : len(text) - hold]
                sent = len(text) - hold
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()


def env_default(name: str) -> str | None:
    """An operator's environment variable (empty is unset)."""
    return os.environ.get(name) or None
