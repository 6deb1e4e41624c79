"""The served backend's lifecycle: built once, loaded in the background, its prefix cache restored
from disk and saved there, and warmed from a file.

The backend (``backends``: our engine, or a remote serving engine) is picked once at start-up;
nothing here depends on which. Loading runs in a thread so the page can show its progress; a
backend that cannot load is reported (``/health``, the page), not fatal. With ``--cache-dir`` the
snapshot is restored before any request can use the cache; ``--warm-file`` entries are then pinned
in the shared namespace.

It leaves to others who may run what and when (``ui.admission``), and which namespaces a session
uses or a snapshot keeps (``ui.isolation``, which hands in ``persisted``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from pathlib import Path
from typing import Any, Callable

from backends import Backend, BackendInfo, make_backend
from backends.local import LocalBackend
from cache import DEFAULT_NAMESPACE
from engine import Engine, EngineConfig
from engine.snapshot import Snapshots
from engine.warm import warm
from ui.isolation import NotAllowed
from ui.schemas import WarmBody, parse_body
from ui.settings import AppSettings

log = logging.getLogger(__name__)

Loader = Callable[..., Engine]


class NotReady(RuntimeError):
    """The model is still loading (or failed to load): REST answers 503."""


def make_served_backend(settings: AppSettings, loader: Loader = Engine.from_pretrained) -> Backend:
    """The backend the settings pick: a remote server, or our engine (built by ``loader`` when it loads)."""
    return make_backend(settings, lambda: LocalBackend(settings.model, _engine_settings(settings), loader))


class Lifecycle:
    """One backend from start-up to shutdown: its load, its snapshots and its warm file.

    Example:
        >>> lifecycle = Lifecycle(AppSettings(), make_served_backend(AppSettings()), persisted=lambda namespace: True)
        >>> lifecycle.start_loading(); lifecycle.wait_ready(timeout=60)
    """

    def __init__(self, settings: AppSettings, backend: Backend, persisted: Callable[[str], bool], inflight: Callable[[], int] = lambda: 0) -> None:
        self.settings = settings
        self.backend = backend
        self._persisted = persisted  # which namespaces a snapshot keeps (ui.isolation decides)
        self._inflight = inflight  # generations queued or running, for status() (ui.admission counts them)
        self._ready = False
        self._loaded = threading.Event()
        self.load_error: str | None = None
        self.progress_lines: list[str] = []
        self.snapshots: Snapshots | None = None  # with --cache-dir: the prefix cache on disk

    def start_loading(self) -> None:
        """Load the model in a background thread; ``progress_lines`` fills as it goes."""
        threading.Thread(target=self._load, name="load-model", daemon=True).start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._loaded.wait(timeout) and self._ready

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def engine(self) -> Engine:
        """The local engine (the planner's tokenizer, tests); NotReady while loading or for a remote backend."""
        self.require_ready()
        engine = getattr(self.backend, "engine", None)
        if engine is None:
            raise NotReady(f"this app measures a remote {self.backend.info().kind} server, which has no local engine")
        return engine

    def backend_info(self) -> BackendInfo:
        return self.backend.info()

    def status(self) -> dict[str, Any]:
        """What /health and the page header show."""
        info = self.backend.status() if self._ready else {}
        return {
            "ready": self.ready,
            "error": self.load_error,
            "progress": list(self.progress_lines[-6:]),
            "cache_mode": self.settings.cache_mode,
            "model": info.get("model"),
            "device": info.get("device"),
            "dtype": info.get("dtype"),
            "kv_dtype": info.get("kv_dtype"),
            "weights": info.get("weights_detail"),
            "decode": info.get("decode_compile"),
            "prefill": info.get("prefill"),  # engine/prefill.py: through the decode step or the float model, and where a reuse may stop
            "batching": info.get("batching"),  # engine/scheduler.py: max batch, steps per batch size, the model thread's busy time
            "history": info.get("history"),  # engine/history.py: replies waiting to be stored, stored in idle time, promoted by a next turn, skipped
            "parameters": info.get("parameters"),
            "context_length": info.get("context_length"),
            "max_prompt_tokens": self.settings.prompt_token_limit or info.get("context_length"),
            "inflight": self._inflight(),
            "backend": self.backend.info().to_dict(),
        }

    def require_ready(self) -> None:
        """Raise NotReady unless the backend has loaded."""
        if not self._ready:
            raise NotReady(self.not_ready_reason())

    def not_ready_reason(self) -> str:
        """Why requests are refused before the model is ready: the load's error, or that it is still loading."""
        return self.load_error or "the model is still loading; try again in a few seconds"

    def save_cache(self) -> dict[str, Any]:
        """``POST /cache/save``: write the snapshot now. Only where the server is local (only its owner can call it).

        On a public server a visitor must not make the disk work (nor learn the cache's size from the
        reply): it saves every N minutes and at shutdown on its own.

        Raises:
            NotAllowed: on a public server. ValueError: no ``--cache-dir``. NotReady: still loading. OSError: the write failed.
        """
        self.require_ready()
        if not self.settings.is_local:
            raise NotAllowed("the prefix cache is saved by the server itself (every few minutes and at shutdown); visitors of a public server cannot trigger a save")
        if self.snapshots is None:
            raise ValueError("this app has no --cache-dir (KVCI_CACHE_DIR), so there is nowhere to save the prefix cache")
        return self.snapshots.save()

    def stop(self) -> None:
        """A clean shutdown: save the prefix cache, if there is a cache dir."""
        if self.snapshots is not None:
            self.snapshots.stop()

    # ------------------------------------------------------------------ helpers

    def _load(self) -> None:
        def progress(line: object) -> None:
            self.progress_lines.append(str(line))
            log.info("%s", line)

        try:
            self.backend.load(progress)
            if self.settings.cache_dir:
                self._open_snapshots(self.settings.cache_dir, progress)  # restored and checked before any request can use it
            self._ready = True
            if self.settings.warm_file:
                self._warm_from_file(self.settings.warm_file, progress)
        except Exception as exc:  # shown on the page and by /health; the server keeps running
            self.load_error = f"the model could not be loaded: {exc}" if self.backend.info().kind == "local" else f"the backend is not usable: {exc}"
            progress(self.load_error)
        finally:
            self._loaded.set()

    def _open_snapshots(self, directory: str, progress: Callable[[object], None]) -> None:
        """``--cache-dir``: restore the snapshot there (or start cold, saying why), then save every N minutes."""
        engine = getattr(self.backend, "engine", None)
        if engine is None:
            progress(f"--cache-dir {directory}: not used (a remote {self.backend.info().kind} server keeps its own cache)")
            return
        try:
            # Its own log lines (a refusal is a warning); here only the page's loading lines.
            self.snapshots = Snapshots(engine, directory, self._persisted, self.settings.cache_save_interval_min * 60, lambda line: self.progress_lines.append(line))
        except Exception as exc:  # an odd tokenizer or an unwritable path: serve without snapshots
            progress(f"--cache-dir {directory}: not used ({exc})")
            return
        self.snapshots.restore()
        self.snapshots.start_periodic()

    def _warm_from_file(self, path: str, progress: Callable[[object], None]) -> None:
        """``--warm-file``: prefill and pin each entry in the shared namespace; a bad file or entry is a warning
        on stderr (and a /health progress line), not a failed start: the app serves, colder."""

        def refused(line: str) -> None:
            progress(line)
            log.warning("%s", line)  # progress logs at INFO, which the app does not print

        try:
            entries = json.loads(Path(path).read_text(encoding="utf-8"))
            if not isinstance(entries, list):
                raise ValueError("the file must hold a JSON list")
        except (OSError, ValueError) as exc:
            refused(f"--warm-file {path}: not used ({exc})")
            return
        engine = getattr(self.backend, "engine", None)
        for i, entry in enumerate(entries):
            raw = {"system_prompt": entry} if isinstance(entry, str) else entry
            try:
                body = parse_body({**raw, "pin": True} if isinstance(raw, dict) else raw, WarmBody)
                done = warm(engine, body.message_dicts(), DEFAULT_NAMESPACE, pin=True, ttl_s=body.ttl_s)
                progress(f"Pinned warm-file entry {i}: {done['tokens']} tokens, {done['pinned_bytes']:,} bytes.")
            except (ValueError, AttributeError) as exc:
                refused(f"--warm-file {path}: entry {i} not pinned: {exc}")


def _engine_settings(settings: AppSettings) -> dict[str, Any]:
    """The app's engine settings, each passed only where this engine version has the field."""
    engine_settings = {"cache_budget_mb": settings.cache_budget_mb, "max_prompt_tokens": settings.prompt_token_limit, "kv_dtype": settings.kv_dtype, "weights": settings.weights}
    if settings.per_session:
        engine_settings["namespace_quota"] = settings.session_cache_share
    known = {f.name for f in dataclasses.fields(EngineConfig)}
    return {name: value for name, value in engine_settings.items() if name in known and value is not None}
