"""The app's settings: one dataclass built once from CLI flags and environment variables.

Also decides the prefix-cache isolation mode. Cross-request prefix caching is a timing side
channel (a fast first token tells you someone sent the same prefix), so a public server isolates
sessions by default and only a local run shares one cache.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

CacheMode = Literal["shared", "per-session"]
CACHE_MODES: tuple[str, ...] = ("shared", "per-session")


@dataclass(frozen=True)
class AppSettings:
    """How the app serves: address, model, cache budget and isolation, and limits on requests."""

    host: str = "127.0.0.1"
    port: int = 7860
    model: str | None = None  # None: the engine's default (KVCI_MODEL, else the bundled SmolLM2)
    cache_budget_mb: float | None = None  # None: the engine's default (KVCI_CACHE_BUDGET_MB, else 512)
    cache_mode: CacheMode = "shared"
    on_space: bool = False  # running on Hugging Face Spaces (SPACE_ID is set)
    concurrency: int = 2  # generations at once, UI and REST together (2 CPU cores: more only contends)
    max_queue: int = 32  # requests waiting beyond that are refused (503 / gr.Error)

    def __post_init__(self) -> None:
        if self.cache_mode not in CACHE_MODES:
            raise ValueError(f"cache_mode must be one of {', '.join(CACHE_MODES)}, got {self.cache_mode!r}")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port must be between 1 and 65535, got {self.port}")
        if self.concurrency < 1 or self.max_queue < 1:
            raise ValueError("concurrency and max_queue must be >= 1")

    @property
    def is_local(self) -> bool:
        """Only this machine can reach the server: bound to loopback and not on a Space."""
        return not self.on_space and is_loopback(self.host)

    @property
    def per_session(self) -> bool:
        return self.cache_mode == "per-session"

    @property
    def may_clear_everything(self) -> bool:
        """Clearing the whole cache is a local, shared-mode privilege; otherwise a session clears its own."""
        return self.is_local and not self.per_session


def parse_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> AppSettings:
    """Settings from ``argv`` (flags win) and ``environ`` (GRADIO_SERVER_NAME/PORT, SPACE_ID)."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(description="KV cache and prefix cache, measured: the web app and its REST API.")
    parser.add_argument("--host", default=environ.get("GRADIO_SERVER_NAME") or AppSettings.host, help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=int(environ.get("GRADIO_SERVER_PORT") or AppSettings.port), help="port (default 7860)")
    parser.add_argument("--model", default=None, help="hub id, model folder or .gguf file (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--cache-budget-mb", type=float, default=None, help="prefix-cache byte budget in MiB (default 512)")
    parser.add_argument(
        "--cache-mode",
        choices=CACHE_MODES,
        default=None,
        help="shared: everyone's prefixes are reusable; per-session: each session gets its own cache "
        "(default: shared on loopback, per-session on a public address or a Space)",
    )
    parser.add_argument("--concurrency", type=int, default=AppSettings.concurrency, help="generations at once (default 2)")
    args = parser.parse_args(argv)
    on_space = bool(environ.get("SPACE_ID"))
    mode = args.cache_mode or default_cache_mode(args.host, on_space)
    return AppSettings(
        host=args.host,
        port=args.port,
        model=args.model,
        cache_budget_mb=args.cache_budget_mb,
        cache_mode=mode,
        on_space=on_space,
        concurrency=args.concurrency,
    )


def default_cache_mode(host: str, on_space: bool) -> CacheMode:
    """Shared for a local run; per-session wherever strangers can send requests."""
    return "shared" if not on_space and is_loopback(host) else "per-session"


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost: assume it is reachable from outside
