"""Cache isolation: which prefix-cache namespace a session uses, and what of the cache it may see, clear or pin.

A ``cache_salt`` is hashed with the session, so it never reaches another session's namespace; an
anonymous call's namespace lives for that call only; a scenario run gets a scratch namespace. The
inspector never shows the text of another session's prompts, and a visitor of a public server
never clears or pins the shared cache.

It leaves sessions themselves to ``ui.sessions``, checking that the backend has loaded to
``ui.lifecycle`` (its callers do that first), and how much a session may run to ``ui.admission``.
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from typing import Any, Sequence

from backends import Backend, CannotClear
from cache import DEFAULT_NAMESPACE
from engine.snapshot import Snapshots
from ui.limits import MAX_PIN_TTL_S
from ui.sessions import Session
from ui.settings import AppSettings


class NotAllowed(PermissionError):
    """Something this caller may not do here (pin anonymously, pin a public shared cache): REST answers 403."""


class Isolation:
    """The namespace rules of one app: whose namespace, and what a session may see, clear and pin there.

    Example:
        >>> isolation = Isolation(AppSettings(cache_mode="per-session"), backend)
        >>> isolation.namespace_for(session)   # "session-<key>"; the shared namespace in shared mode
    """

    def __init__(self, settings: AppSettings, backend: Backend) -> None:
        self.settings = settings
        self.backend = backend
        self._lock = threading.Lock()
        self._ephemeral: set[str] = set()  # namespaces of anonymous calls, dropped when their job ends

    def namespace_for(self, session: Session, cache_salt: str | None = None) -> str:
        """The prefix-cache namespace of a session: one shared namespace, or one per session.

        A ``cache_salt`` (vLLM's request field) selects a sub-namespace of the session's own,
        ``<session's namespace>/salt-<hash>``, hashed from the session's key and the salt: the same
        salt from another session is another namespace. The cache charges a namespace ``"owner/sub"``
        to its owner (the part before the first "/"): its quota and pin share, and clearing the
        owner clears its subs, so salts cannot take a session past its share (issue 21, finding 3).
        """
        own = f"session-{session.key[-32:]}" if self.settings.per_session else DEFAULT_NAMESPACE
        if cache_salt:
            return f"{own}/salt-" + hashlib.sha256(f"{session.key}\0{cache_salt}".encode()).hexdigest()[:32]
        return own

    @staticmethod
    def scratch_namespace(namespace: str) -> str:
        """A cold namespace for one scenario run (dropped afterwards), under the session's own."""
        return f"{namespace}/scenario-{uuid.uuid4().hex[:8]}"

    def claim(self, session: Session, namespace: str) -> None:
        """Note the namespace an anonymous call runs in: nobody can name it again, so it ends with the call."""
        if session.anonymous and namespace != DEFAULT_NAMESPACE:
            with self._lock:
                self._ephemeral.add(namespace)

    def release(self, namespace: str) -> bool:
        """A call in ``namespace`` ended: True when the namespace was an anonymous call's, to be dropped now."""
        with self._lock:
            ephemeral = namespace in self._ephemeral
            self._ephemeral.discard(namespace)
        return ephemeral

    def persisted(self, namespace: str) -> bool:
        """Which namespaces a snapshot keeps: the shared one; sessions' only with --persist-session-caches (never scratch or anonymous ones)."""
        if "/scenario-" in namespace or namespace in self._ephemeral:
            return False
        return namespace == DEFAULT_NAMESPACE or self.settings.persist_session_caches

    def check_pin(self, session: Session) -> None:
        """The pin rules: NotAllowed for an anonymous caller (its namespace dies with its call) and, on a
        public server, for the shared namespace (a visitor would hold everyone's budget)."""
        if session.anonymous:
            raise NotAllowed("an anonymous caller cannot pin or unpin: get a session id from POST /session and send it as Authorization: Bearer <id>")
        if not self.settings.per_session and not self.settings.may_clear_everything:
            raise NotAllowed("the shared cache of a public server cannot be pinned or unpinned by a visitor")

    def pin_ttl_s(self, ttl_s: float | None) -> float | None:
        """How long a pin lives without a hit: per-session, at most ``MAX_PIN_TTL_S``."""
        if self.settings.per_session:
            return min(ttl_s or MAX_PIN_TTL_S, MAX_PIN_TTL_S)
        return ttl_s

    def stats(self, session: Session, snapshots: Snapshots | None) -> dict[str, Any]:
        """Prefix-cache stats as a session may see them: its own namespace, or the shared one."""
        stats = self.backend.stats(self.namespace_for(session))
        if snapshots is not None:  # sizes of the saved cache only to whoever sees the whole cache
            stats["snapshot"] = snapshots.status(detailed=not self.settings.per_session)
        return {**stats, "cache_mode": self.settings.cache_mode, "scope": "session" if self.settings.per_session else "shared"}

    def clear(self, session: Session) -> dict[str, Any]:
        """Clear what this session may clear: everything (local, shared mode), else its own namespace.

        A shared cache on a public server is never cleared by a visitor: that would let anyone wipe
        everyone's prefixes (and learn from the next request's timing that it was wiped).
        """
        try:
            if self.settings.may_clear_everything:
                return {"cleared": "all", "message": self.backend.clear(None)}
            if self.settings.per_session:
                return {"cleared": "session", "message": self.backend.clear(self.namespace_for(session))}
        except CannotClear as exc:
            return {"cleared": "nothing", "message": str(exc)}
        return {"cleared": "nothing", "message": "the shared cache of a public server cannot be cleared by a visitor"}

    def inspected(self, session: Session) -> str:
        """The one namespace whose entries and running requests the inspector shows a session: its own
        (:meth:`namespace_for`), which in shared mode is everyone's. Never a scenario's scratch namespace
        nor a ``cache_salt``'s, even the session's own: the tree and the "Running now" table show the same namespace."""
        return self.namespace_for(session)

    def running(self, session: Session) -> list[dict[str, Any]]:
        """The requests running now that a session may see (``Engine.running``'s rows): those in its :meth:`inspected`
        namespace, so per-session only its own, shared everyone's in the shared namespace.

        A row keeps no namespace name (a session's is made from its key); ``shared_prefix`` is an opaque
        id, equal for the requests that reuse the same cached prefix, and no text is ever shown.
        """
        shown = self.inspected(session)
        return [{k: v for k, v in row.items() if k != "namespace"} for row in self.backend.running(lambda namespace: namespace == shown)]

    def entries(self, session: Session, own_sequences: Sequence[Sequence[int]] = ()) -> list[dict[str, Any]]:
        """The cache inspector's rows for a session, with a text preview only of the session's own tokens.

        In per-session mode the namespace holds only the session's own requests. In shared mode
        an entry's text is shown only when its whole path from the root is a prefix of a sequence
        this session sent or received itself; others' entries show sizes and counts, never text.
        Rows come depth first; ``id`` and ``parent`` give the tree's shape (the inspector's tree view).
        """
        own_all = self.settings.per_session
        rows, stack = [], []  # stack: (end position, path tokens, row id) of the ancestors of the current node
        for entry in self.backend.entries(self.inspected(session)):
            while stack and stack[-1][0] != entry.start:
                stack.pop()
            path = (stack[-1][1] if stack else ()) + entry.token_ids
            parent = stack[-1][2] if stack else None
            stack.append((entry.start + len(entry.token_ids), path, len(rows)))
            own = own_all or any(_is_prefix(path, seq) for seq in own_sequences)
            rows.append(
                {
                    "id": len(rows),  # depth-first index; the tree view draws from "id" and "parent"
                    "parent": parent,  # the parent node's id, None under the root
                    "start": entry.start,
                    "tokens": len(entry.token_ids),
                    "bytes": entry.nbytes,
                    "hits": entry.hits,
                    "last_used": entry.last_used,
                    "logits": entry.has_logits,
                    "locked": entry.locked,
                    "pinned": getattr(entry, "pinned", False),
                    "preview": _preview(self.backend.decode(entry.token_ids)) if own else "(another session's tokens)",
                }
            )
        return rows


# ---------------------------------------------------------------------- helpers


def _is_prefix(prefix: Sequence[int], sequence: Sequence[int]) -> bool:
    return len(prefix) <= len(sequence) and tuple(sequence[: len(prefix)]) == tuple(prefix)


def _preview(text: str, limit: int = 90) -> str:
    """The start and the end of a node's text: the end is where prompts sharing the start differ."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    half = (limit - 3) // 2
    return f"{text[:half]} … {text[-half:]}"
