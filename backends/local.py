"""The local backend: this project's engine, in this process, with server-side timings.

Loads the model (the engine's own defaults and the app's cache settings) and runs requests with
``Engine.stream`` in a namespace (``cache_key``). Stop strings, which the engine does not know,
are applied by ``backends.with_stop``. Everything here can be turned off, cleared and inspected.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

from backends import BackendInfo, Capability, Progress, with_stop
from engine import Engine, GenerationResult

Loader = Callable[..., Engine]

CAPABILITIES = {
    "kv_cache_off": Capability(True, "the KV cache can be turned off: every decode step re-runs the whole sequence"),
    "prefix_cache_off": Capability(True, "the prefix cache can be turned off per request"),
    "isolation": Capability(True, "per-session namespaces: entries never match across sessions"),
    "cached_tokens": Capability(True, "reused tokens counted by the engine"),
    "server_stats": Capability(True, "the prefix cache's own counters and sizes"),
    "clear": Capability(True, "clears the whole cache or one namespace"),
    "token_ids": Capability(True, "prompt and output token ids"),
    "running": Capability(True, "the requests running now, the batch each decodes in and the cached prefix each reused"),
}


class LocalBackend:
    """Our engine. ``engine`` is None until :meth:`load` has run.

    Example:
        >>> backend = LocalBackend(None, {"cache_budget_mb": 64}); backend.load(print)
        >>> "".join(x for x in backend.stream("default", prompt="Hi", max_new_tokens=4) if isinstance(x, str))
    """

    def __init__(self, model: str | None, engine_settings: dict[str, Any], loader: Loader = Engine.from_pretrained) -> None:
        self._model = model
        self._settings = engine_settings
        self._loader = loader
        self.engine: Engine | None = None

    def load(self, progress: Progress) -> None:
        self.engine = self._loader(self._model, progress=progress, **self._settings)
        info = self.engine.info()
        progress(f"Ready: {info['model']} on {info['device']} ({info['dtype']}).")

    def info(self) -> BackendInfo:
        return BackendInfo(kind="local", model=self.engine.name if self.engine else self._model, timings="server", capabilities=CAPABILITIES)

    def check(self, namespace: str, stop: Sequence[str] | None = None, **request: Any) -> None:
        self.engine.make_request(cache_key=namespace, **request)

    def stream(self, namespace: str, stop: Sequence[str] | None = None, **request: Any) -> Iterator[str | GenerationResult]:
        return with_stop(self.engine.stream(cache_key=namespace, **request), stop)

    def stats(self, namespace: str | None) -> dict[str, Any]:
        return self.engine.cache.stats(namespace=namespace)

    def clear(self, namespace: str | None) -> str:
        self.engine.cache.clear(namespace)
        return "cleared the whole prefix cache" if namespace is None else "cleared this session's prefix cache"

    def drop(self, namespace: str) -> None:
        if self.engine is not None:
            self.engine.cache.clear(namespace)

    def entries(self, namespace: str) -> Sequence[Any]:
        return self.engine.cache.entries(namespace)

    def running(self, visible: Callable[[str], bool]) -> list[dict[str, Any]]:
        return self.engine.running(visible)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.engine.decode(token_ids)

    def status(self) -> dict[str, Any]:
        return self.engine.info() if self.engine is not None else {}
