"""The served backend and the rules around it, composed: what the rest of the app calls.

The backend (``backends``: our engine, or a remote serving engine) is picked once at start-up;
nothing here depends on which. Every generation, whichever door it came in by (the Gradio queue,
gradio_client or plain REST), goes through :class:`EngineService`, which puts together three jobs
kept in their own modules:

- ``ui.admission``: the bounded, fair worker pool and the in-flight limits (:class:`Job`, :class:`Busy`);
- ``ui.lifecycle``: loading the backend, the prefix cache's snapshots, the warm file (:class:`NotReady`);
  :class:`EngineService` is a :class:`~ui.lifecycle.Lifecycle`, so the app calls those methods on it;
- ``ui.isolation``: which namespace a session uses, and what of the cache it may see, clear or pin
  (:class:`NotAllowed`).

Sessions themselves come from ``ui.sessions``. The errors and :class:`Job` are importable from here.
"""

from __future__ import annotations

from typing import Any, Sequence

from backends import Backend
from engine import Engine, GenerationResult
from engine.warm import unpin, warm
from ui.admission import Admission, Busy, Job
from ui.isolation import Isolation, NotAllowed
from ui.lifecycle import Lifecycle, Loader, NotReady, make_served_backend
from ui.sessions import Session
from ui.settings import AppSettings

__all__ = ["Busy", "EngineService", "Job", "NotAllowed", "NotReady"]


class EngineService(Lifecycle):
    """The app's one backend and the rules around it.

    Its lifecycle (``start_loading``, ``wait_ready``, ``ready``, ``engine``, ``status``, ``save_cache``,
    ``stop``, ...) is :class:`~ui.lifecycle.Lifecycle`'s; admission and isolation are parts it holds
    (``ui.admission.Admission``, ``ui.isolation.Isolation``).

    Example:
        >>> service = EngineService(AppSettings()); service.start_loading()
        >>> service.wait_ready(timeout=60)
        >>> service.generate(session, prompt="Hi", max_new_tokens=8).text   # session: from ui.sessions
    """

    def __init__(self, settings: AppSettings, loader: Loader = Engine.from_pretrained, backend: Backend | None = None) -> None:
        backend = backend or make_served_backend(settings, loader)
        self._admission = Admission(settings, backend)
        self._isolation = Isolation(settings, backend)
        super().__init__(settings, backend, persisted=self._isolation.persisted, inflight=lambda: self._admission.inflight)

    # ------------------------------------------------------------------ generation

    def stream(self, session: Session, namespace: str | None = None, cache_salt: str | None = None, **kwargs: Any) -> Job:
        """Queue a request (``Engine.stream`` arguments and ``stop``) in ``session``'s namespace
        (or ``namespace``; or the session's salted one for ``cache_salt``).

        Returns a :class:`Job`: iterate it (or ``aiter``) for text deltas, then the result.

        Raises:
            ValueError: bad input (raised here, before anything is queued, except a prompt too
                long for the context window, which surfaces on the first item).
            NotReady, Busy: the model is not loaded, or this client or the server has too many
                requests queued or running.
        """
        self.require_ready()
        namespace = namespace or self.namespace_for(session, cache_salt)
        self.backend.check(namespace, **kwargs)  # validate now, so the caller gets a ValueError at once
        job = Job(session, namespace, kwargs, on_cancel=self._cancelled, on_end=self._ended)
        self._admission.admit(session, job.cost)
        self._isolation.claim(session, namespace)  # before a worker can end the job
        self._admission.put(job)
        return job

    def generate(self, session: Session, namespace: str | None = None, **kwargs: Any) -> GenerationResult:
        """Run one request to completion on the pool."""
        return self.stream(session, namespace, **kwargs).result()

    def warm(self, session: Session, messages: list[dict[str, str]], pin: bool = False, ttl_s: float | None = None) -> dict[str, Any]:
        """Prefill ``messages`` into the session's namespace (``engine/warm.py``), and pin the entry if asked.

        A warm is a request's work: it takes one of the session's in-flight places while it runs (on
        the caller's thread). Pinning is refused to an anonymous caller (its namespace dies with its
        call) and, on a public server, in the shared namespace (a visitor would hold everyone's
        budget); per-session, a pin lives at most ``MAX_PIN_TTL_S`` without a hit, within the
        session's own pin budget.

        Raises:
            NotAllowed: a pin this caller may not make. ValueError: bad input or a pin over budget.
            NotReady, Busy: as :meth:`stream`.
        """
        engine = self._pinning_engine(session, checked=pin)
        if pin:
            ttl_s = self._isolation.pin_ttl_s(ttl_s)
        with self._admission.admitted(session):
            return warm(engine, messages, self.namespace_for(session), pin=pin, ttl_s=ttl_s)

    def unpin(self, session: Session, messages: list[dict[str, str]]) -> dict[str, Any]:
        """Drop the pin that warming ``messages`` made in the session's own namespace (``engine/warm.unpin``).

        The same rules as pinning: an anonymous caller has no pins, and a visitor of a public server
        cannot unpin the shared namespace. Another session's pin is out of reach: only the caller's
        own namespace is looked at, so that case reads as "nothing pinned".

        Returns:
            ``tokens``, ``unpinned`` (False: no such pin here) and a ``message`` saying which.

        Raises:
            NotAllowed, ValueError, NotReady, Busy: as :meth:`warm`.
        """
        engine = self._pinning_engine(session, checked=True)
        with self._admission.admitted(session):
            done = unpin(engine, messages, self.namespace_for(session))
        what = f"{done['tokens']} tokens"
        message = f"Unpinned {what}: cached still, evictable again." if done["unpinned"] else f"Nothing to unpin: these {what} are not pinned in your cache."
        return {**done, "message": message}

    # ------------------------------------------------------------------ what a session may see and do

    def namespace_for(self, session: Session, cache_salt: str | None = None) -> str:
        """The session's prefix-cache namespace (``ui.isolation.Isolation.namespace_for``)."""
        return self._isolation.namespace_for(session, cache_salt)

    scratch_namespace = staticmethod(Isolation.scratch_namespace)

    def stats(self, session: Session) -> dict[str, Any]:
        """Prefix-cache stats as a session may see them: its own namespace, or the shared one."""
        self.require_ready()
        return self._isolation.stats(session, self.snapshots)

    def clear(self, session: Session) -> dict[str, Any]:
        """Clear what this session may clear (``ui.isolation.Isolation.clear``)."""
        self.require_ready()
        return self._isolation.clear(session)

    def drop_namespace(self, namespace: str) -> None:
        """Forget a scratch namespace (a scenario run's), entries and counters."""
        if self.ready:
            self.backend.drop(namespace)

    def entries(self, session: Session, own_sequences: Sequence[Sequence[int]] = ()) -> list[dict[str, Any]]:
        """The cache inspector's rows for a session (``ui.isolation.Isolation.entries``): text only of its own tokens."""
        self.require_ready()
        return self._isolation.entries(session, own_sequences)

    def running(self, session: Session) -> list[dict[str, Any]]:
        """The requests running now that the session's inspector shows (``ui.isolation.Isolation.running``): its own, or all in shared mode."""
        self.require_ready()
        return self._isolation.running(session)

    @property
    def inflight(self) -> int:
        """Generations queued or running, all clients together."""
        return self._admission.inflight

    # ------------------------------------------------------------------ helpers

    def _pinning_engine(self, session: Session, checked: bool) -> Engine:
        """The local engine for a warm or an unpin, after the pin rules when ``checked``; NotAllowed says which rule."""
        self.require_ready()
        engine = getattr(self.backend, "engine", None)
        if engine is None:
            raise ValueError(f"warming and pinning need the local engine; this app measures a remote {self.backend.info().kind} server")
        if checked:
            self._isolation.check_pin(session)
        return engine

    def _cancelled(self, job: Job) -> None:
        if self._admission.withdraw(job):  # never reached a worker: its slot is free now
            self._ended(job)

    def _ended(self, job: Job) -> None:
        self._admission.leave(job.session, job.cost)
        if self._isolation.release(job.namespace):
            self.drop_namespace(job.namespace)  # an anonymous call's namespace lives for that call only
