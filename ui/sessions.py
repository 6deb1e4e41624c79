"""Sessions issued by the server: who a request is, decided from what the server handed out.

A session is never what the client merely claims. Three ways to have one:

- **the page**: the first page load sets a signed, HttpOnly cookie holding a random id
  (SameSite=Lax locally; Secure, SameSite=None and Partitioned on a Space, whose page is an iframe);
- **scripts** (REST, gradio_client): ``POST /session`` hands out a random id, sent back as
  ``Authorization: Bearer <id>`` or ``X-Session-Id: <id>``; a self-chosen id is accepted when it
  has at least 128 bits (32 to 128 characters of ``[A-Za-z0-9_-]``). It is hashed whole;
- **nothing valid**: an anonymous caller gets a fresh random key per call, so it shares nothing
  with anyone (in per-session mode its namespace is dropped after the call).

Gradio's ``session_hash`` is never an identity: any caller can send anyone's. This module knows
nothing about namespaces or the cache; ``ui.isolation`` maps a session to its namespace.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from typing import Any, Mapping

COOKIE_NAME = "kvci_session"
SESSION_HEADER = "X-Session-Id"
MIN_ID_CHARS, MAX_ID_CHARS = 32, 128  # 32 base64url characters are 192 bits; >= 128 bits is the floor
_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{%d,%d}" % (MIN_ID_CHARS, MAX_ID_CHARS))
ID_RULE = f"{MIN_ID_CHARS} to {MAX_ID_CHARS} characters of A-Z, a-z, 0-9, '_' and '-' (get one from POST /session)"


class BadSession(ValueError):
    """A session id that is not of the allowed form; answered 400 with :data:`ID_RULE`."""


@dataclass(frozen=True)
class Session:
    """Who is asking: ``key`` names the session (a hash), ``client`` is what per-client limits count,
    ``address`` where the request came from (``address:<ip>``; anonymous callers from one address share one ``client``).

    The address is counted too: ids are free to mint (``POST /session``), so a per-session limit
    alone would let one machine fill the whole queue with fresh sessions.
    """

    key: str
    client: str
    anonymous: bool
    address: str = "address:unknown"


class SessionIssuer:
    """Hands out ids, signs page cookies and resolves a request's headers into a :class:`Session`.

    Example:
        >>> issuer = SessionIssuer(secure_cookie=False)
        >>> token = issuer.new_id()
        >>> issuer.resolve({"authorization": f"Bearer {token}"}, {}, "127.0.0.1").anonymous
        False
    """

    def __init__(self, secure_cookie: bool, secret: bytes | None = None, trust_proxy: bool = False, proxy_hops: int = 1) -> None:
        # A fresh secret per process unless KVCI_SESSION_SECRET is set: a restart ends page sessions.
        env_secret = os.environ.get("KVCI_SESSION_SECRET", "")
        self._secret = secret or (env_secret.encode() if env_secret else secrets.token_bytes(32))
        self.secure_cookie = secure_cookie
        self.trust_proxy = trust_proxy
        self.proxy_hops = proxy_hops  # proxies of ours in front: each appends the address it saw to X-Forwarded-For

    @staticmethod
    def new_id() -> str:
        return secrets.token_urlsafe(32)  # 43 characters, 256 bits

    # ------------------------------------------------------------------ page cookies

    def new_cookie(self) -> str:
        """A ``Set-Cookie`` header value for a fresh page session."""
        value = self._sign(self.new_id())
        if self.secure_cookie:  # a Space shows the page in a cross-site iframe: only this gets sent there
            return f"{COOKIE_NAME}={value}; Path=/; HttpOnly; Secure; SameSite=None; Partitioned"
        return f"{COOKIE_NAME}={value}; Path=/; HttpOnly; SameSite=Lax"

    def cookie_id(self, cookie: str | None) -> str | None:
        """The id inside a cookie value, or None when it is missing or not signed by this server."""
        if not cookie or "." not in cookie or not cookie.isascii():  # compare_digest raises on non-ASCII text: a 500 on every route
            return None
        session_id = cookie.rpartition(".")[0]
        return session_id if session_id and hmac.compare_digest(self._sign(session_id), cookie) else None

    # ------------------------------------------------------------------ resolving a request

    def resolve(self, headers: Mapping[str, str], cookies: Mapping[str, str], peer: str | None) -> Session:
        """The session of a request: a bearer / X-Session-Id id, else the page cookie, else anonymous.

        Raises:
            BadSession: an id was sent but is not of the allowed form.
        """
        address = self._address(headers, peer)
        given = _bearer(headers.get("authorization", "")) or headers.get(SESSION_HEADER.lower(), "").strip()
        if given:
            if not _ID_PATTERN.fullmatch(given):
                raise BadSession(f"a session id must be {ID_RULE}; got {min(len(given), 10**6)} characters that are not")
            return self._known("id:" + given, address)
        cookie_id = self.cookie_id(cookies.get(COOKIE_NAME))
        if cookie_id is not None:
            return self._known("cookie:" + cookie_id, address)
        return Session(key="anonymous-" + secrets.token_hex(16), client="anonymous@" + address, anonymous=True, address=address)

    def resolve_request(self, request: Any) -> Session:
        """:meth:`resolve` for a Starlette or Gradio request (None: a direct Python call, nobody's session)."""
        if request is None:
            return self.resolve({}, {}, None)
        return self.resolve(request.headers, request.cookies, _peer(request))

    def request_address(self, request: Any) -> str:
        """The ``address:<ip>`` :meth:`resolve_request` gives a session, without resolving one (the planner's turns need no session)."""
        return self._address({} if request is None else request.headers, _peer(request))

    def client_address(self, headers: Mapping[str, str], peer: str | None) -> str:
        """The caller's address: the peer's, or behind ``proxy_hops`` trusted proxies the X-Forwarded-For
        entry the outermost of them wrote, counted from the right.

        Never the leftmost entry: a proxy appends to what the client sent, so everything left of
        our proxies' entries is the client's own claim, free to change at every request (and with
        it the per-address limits).
        """
        hops = [hop.strip() for hop in headers.get("x-forwarded-for", "").split(",")] if self.trust_proxy else []
        return (hops[-self.proxy_hops] if len(hops) >= self.proxy_hops else "") or peer or "unknown"

    # ------------------------------------------------------------------ helpers

    def _address(self, headers: Mapping[str, str], peer: str | None) -> str:
        return "address:" + self.client_address(headers, peer)

    def _known(self, identity: str, address: str) -> Session:
        key = hashlib.sha256(identity.encode()).hexdigest()
        return Session(key=key, client="session:" + key, anonymous=False, address=address)

    def _sign(self, session_id: str) -> str:
        signature = hmac.new(self._secret, session_id.encode(), hashlib.sha256).hexdigest()[:32]
        return f"{session_id}.{signature}"


def _bearer(authorization: str) -> str:
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _peer(request: Any) -> str | None:
    """The host of the connection a Starlette or Gradio request came on (None when there is none)."""
    return getattr(getattr(request, "client", None), "host", None)
