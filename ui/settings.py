"""The app's settings: one dataclass built once from CLI flags and environment variables.

Also decides the prefix-cache isolation mode. Cross-request prefix caching is a timing side
channel (a fast first token tells you someone sent the same prefix), so a public server isolates
sessions by default and only a local run shares one cache.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

from engine.config import KV_DTYPES
from engine.quant import WEIGHT_FORMATS
from ui.limits import UPLOAD_BUDGET_MB, UPLOAD_KEPT_MIN

CacheMode = Literal["shared", "per-session"]
CACHE_MODES: tuple[str, ...] = ("shared", "per-session")
BACKEND_KINDS: tuple[str, ...] = ("vllm", "sglang", "llama-server", "kvci", "openai")  # backends/remote.py's adapters
PUBLIC_MAX_PROMPT_TOKENS = 1024  # one prompt's prefill on a 2-core CPU: a few seconds, not a minute


@dataclass(frozen=True)
class AppSettings:
    """How the app serves: address, model, cache budget and isolation, and limits on requests."""

    host: str = "127.0.0.1"
    port: int = 7860
    model: str | None = None  # None: the engine's default (KVCI_MODEL, else the bundled SmolLM2)
    weights: str | None = None  # None: the engine's default (KVCI_WEIGHTS, else auto: int4 on a CPU)
    cache_budget_mb: float | None = None  # None: the engine's default (KVCI_CACHE_BUDGET_MB, else 512)
    kv_dtype: str | None = None  # KV storage, auto / fp32 / bf16; None: the engine's default (KVCI_KV_DTYPE, else auto)
    cache_mode: CacheMode = "shared"
    on_space: bool = False  # running on Hugging Face Spaces (SPACE_ID is set)
    concurrency: int = 8  # generations at once, UI and REST together: the engine batches their decode steps (engine/scheduler.py, max_batch 8)
    max_queue: int = 32  # requests waiting beyond that are refused (503 / gr.Error)
    public: bool = False  # behave as on a public address although bound to loopback (tests use it)
    allow_shared_public: bool = False  # a shared cache on a public server is a prefix oracle: opt in
    trust_proxy: bool = False  # take the client address from X-Forwarded-For (only behind a proxy you run)
    proxy_hops: int = 1  # with trust_proxy: how many proxies of ours append to X-Forwarded-For (the address is that many entries from the right)
    max_prompt_tokens: int | None = None  # None: the context window locally, PUBLIC_MAX_PROMPT_TOKENS when public
    session_cache_share: float = 0.25  # per-session mode: the share of the cache budget one session may hold
    max_inflight_per_session: int = 2  # queued or running requests of one session (or one anonymous address)
    max_inflight_per_address: int = 8  # public server: of all sessions from one address together (ids are free to mint)
    backend_url: str | None = None  # a remote OpenAI-compatible server to measure instead of the local engine
    backend_model: str | None = None  # its model name (default: the first of its /v1/models)
    backend_api_key: str | None = field(default=None, repr=False)  # sent to it as a bearer token
    backend_kind: str | None = None  # vllm, sglang, llama-server, kvci, openai (default: detected)
    warm_file: str | None = None  # JSON list of system prompts (or {"messages": [...], "ttl_s": ...}) pinned at start
    cache_dir: str | None = None  # the prefix cache is saved here and restored at start (engine/snapshot.py)
    cache_save_interval_min: float = 10.0  # with cache_dir: save every this many minutes (0: only on POST /cache/save and at shutdown)
    persist_session_caches: bool = False  # per-session mode: save sessions' namespaces too (default: only the shared one)
    upload_budget_mb: float = UPLOAD_BUDGET_MB  # trace uploads on disk at most, all addresses together (ui/security.UploadBudget)
    upload_kept_min: float = UPLOAD_KEPT_MIN  # an upload is deleted this long after it was written

    def __post_init__(self) -> None:
        if self.warm_file is not None and self.cache_mode == "per-session":
            raise ValueError("--warm-file pins into the shared namespace, which per-session mode never reads; use --cache-mode shared")
        if self.cache_mode not in CACHE_MODES:
            raise ValueError(f"cache_mode must be one of {', '.join(CACHE_MODES)}, got {self.cache_mode!r}")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port must be between 1 and 65535, got {self.port}")
        if min(self.concurrency, self.max_queue, self.max_inflight_per_session, self.max_inflight_per_address, self.proxy_hops) < 1:
            raise ValueError("concurrency, max_queue, max_inflight_per_session, max_inflight_per_address and proxy_hops must be >= 1")
        if not 0 < self.session_cache_share <= 1:
            raise ValueError(f"session_cache_share must be in (0, 1], got {self.session_cache_share}")
        if self.backend_kind is not None and self.backend_kind not in BACKEND_KINDS:
            raise ValueError(f"backend_kind must be one of {', '.join(BACKEND_KINDS)}, got {self.backend_kind!r}")
        if self.cache_save_interval_min < 0:
            raise ValueError(f"cache_save_interval_min must be >= 0 (0: no periodic save), got {self.cache_save_interval_min}")
        if self.upload_budget_mb <= 0 or self.upload_kept_min <= 0:
            raise ValueError(f"upload_budget_mb and upload_kept_min must be > 0, got {self.upload_budget_mb} and {self.upload_kept_min}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        if self.cache_mode == "shared" and not self.is_local and not self.allow_shared_public:
            raise ValueError(
                "a shared prefix cache on a public server lets anyone learn other visitors' prompts from "
                "timing and reused-token counts; use --cache-mode per-session (the default there), or pass "
                "--allow-shared-public if every visitor may see what the others send"
            )


    @property
    def is_local(self) -> bool:
        """Only this machine can reach the server: bound to loopback and not on a Space."""
        return not self.on_space and not self.public and is_loopback(self.host)

    @property
    def per_session(self) -> bool:
        return self.cache_mode == "per-session"

    @property
    def may_clear_everything(self) -> bool:
        """Clearing the whole cache is a local, shared-mode privilege; otherwise a session clears its own."""
        return self.is_local and not self.per_session

    @property
    def prompt_token_limit(self) -> int | None:
        """The engine's ``max_prompt_tokens``: as given, else a small cap on a public server, else the context."""
        if self.max_prompt_tokens is not None:
            return self.max_prompt_tokens
        return None if self.is_local else PUBLIC_MAX_PROMPT_TOKENS

    @property
    def anonymous_inflight_limit(self) -> int:
        """Callers without a session share a limit per address; locally that address is the owner's own."""
        return self.concurrency + self.max_queue if self.is_local else self.max_inflight_per_session

    @property
    def address_inflight_limit(self) -> int:
        """All requests from one address, whatever their sessions; locally, no limit beyond the queue's."""
        return self.concurrency + self.max_queue if self.is_local else self.max_inflight_per_address


def parse_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> AppSettings:
    """Settings from ``argv`` (flags win) and ``environ`` (GRADIO_SERVER_NAME/PORT, SPACE_ID)."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(description="KV cache and prefix cache, measured: the web app and its REST API.")
    parser.add_argument("--host", default=environ.get("GRADIO_SERVER_NAME") or AppSettings.host, help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=int(environ.get("GRADIO_SERVER_PORT") or AppSettings.port), help="port (default 7860)")
    parser.add_argument("--model", default=None, help="hub id, model folder or .gguf file (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--weights", choices=WEIGHT_FORMATS, default=None, help="weight format: auto (int4 on a CPU: a 4-bit decode step, prompts prefilled through it), fp32, bf16, int8, int4 (default: env KVCI_WEIGHTS, else auto)")
    parser.add_argument("--cache-budget-mb", type=float, default=None, help="prefix-cache byte budget in MiB (default 512)")
    parser.add_argument("--kv-dtype", choices=KV_DTYPES, default=None, help="KV storage precision: auto (the model's dtype), fp32, or bf16 (half the bytes per cached token; env KVCI_KV_DTYPE)")
    parser.add_argument(
        "--cache-mode",
        choices=CACHE_MODES,
        default=None,
        help="shared: everyone's prefixes are reusable; per-session: each session gets its own cache "
        "(default: shared on loopback, per-session on a public address or a Space)",
    )
    parser.add_argument("--concurrency", type=int, default=AppSettings.concurrency, help="generations at once; the local engine batches their decode steps (default 8)")
    parser.add_argument("--max-prompt-tokens", type=int, default=None, help=f"longest prompt in tokens (default: the context window locally, {PUBLIC_MAX_PROMPT_TOKENS} on a public server)")
    parser.add_argument("--session-cache-share", type=float, default=AppSettings.session_cache_share, help="per-session mode: share of the cache budget one session may hold (default 0.25)")
    parser.add_argument("--max-inflight-per-session", type=int, default=AppSettings.max_inflight_per_session, help="queued or running requests per session (default 2)")
    parser.add_argument("--max-inflight-per-address", type=int, default=AppSettings.max_inflight_per_address, help="public server: queued or running requests of all sessions from one address (default 8)")
    parser.add_argument("--trust-proxy", action="store_true", help="take client addresses from X-Forwarded-For (default: only on a Space)")
    parser.add_argument("--proxy-hops", type=int, default=AppSettings.proxy_hops, help="with --trust-proxy: proxies in front of the app, each appending to X-Forwarded-For; the address is that many entries from the right (default 1)")
    parser.add_argument("--allow-shared-public", action="store_true", help="allow --cache-mode shared on a public server (every visitor can probe the others' prefixes)")
    parser.add_argument("--backend", default=environ.get("KVCI_BACKEND_URL") or None, help="measure a remote OpenAI-compatible server (vLLM, SGLang, llama-server, ...) at this URL instead of the local engine (env KVCI_BACKEND_URL)")
    parser.add_argument("--backend-model", default=environ.get("KVCI_BACKEND_MODEL") or None, help="the remote's model name (default: the first it lists; env KVCI_BACKEND_MODEL)")
    parser.add_argument("--api-key", default=environ.get("KVCI_BACKEND_API_KEY") or None, help="bearer token for the remote (env KVCI_BACKEND_API_KEY)")
    parser.add_argument("--backend-kind", choices=BACKEND_KINDS, default=environ.get("KVCI_BACKEND_KIND") or None, help="the remote's engine (default: detected from what it serves; env KVCI_BACKEND_KIND)")
    parser.add_argument("--warm-file", default=environ.get("KVCI_WARM_FILE") or None, help='JSON list of system prompts (or {"messages": [...], "ttl_s": N}) prefilled and pinned at start (env KVCI_WARM_FILE)')
    parser.add_argument("--cache-dir", default=environ.get("KVCI_CACHE_DIR") or None, help="save the prefix cache here (at shutdown, on POST /cache/save, periodically) and restore it at start (env KVCI_CACHE_DIR)")
    parser.add_argument("--cache-save-interval-min", type=float, default=AppSettings.cache_save_interval_min, help="with --cache-dir: minutes between saves (default 10; 0: off)")
    parser.add_argument("--persist-session-caches", action="store_true", help="with --cache-dir in per-session mode: save every session's namespace, not only the shared one")
    parser.add_argument("--upload-budget-mb", type=float, default=AppSettings.upload_budget_mb, help=f"MiB of uploaded traces kept on disk at most, all callers together; one address may fill a sixteenth (default {UPLOAD_BUDGET_MB})")
    parser.add_argument("--upload-kept-min", type=float, default=AppSettings.upload_kept_min, help=f"minutes an uploaded trace is kept before it is deleted (default {UPLOAD_KEPT_MIN})")
    parser.add_argument("--public", action="store_true", help=argparse.SUPPRESS)  # a loopback server that behaves as a public one (tests)
    args = parser.parse_args(argv)
    on_space = bool(environ.get("SPACE_ID"))
    public = args.public or environ.get("KVCI_PUBLIC", "") not in ("", "0")
    mode = args.cache_mode or default_cache_mode(args.host, on_space or public)
    try:
        return _settings_from(args, mode, on_space, public)
    except ValueError as exc:
        parser.error(str(exc))  # exits with the message and status 2


def _settings_from(args: argparse.Namespace, mode: CacheMode, on_space: bool, public: bool) -> AppSettings:
    return AppSettings(
        host=args.host,
        port=args.port,
        model=args.model,
        weights=args.weights,
        cache_budget_mb=args.cache_budget_mb,
        kv_dtype=args.kv_dtype,
        cache_mode=mode,
        on_space=on_space,
        concurrency=args.concurrency,
        public=public,
        allow_shared_public=args.allow_shared_public,
        trust_proxy=args.trust_proxy or on_space,
        proxy_hops=args.proxy_hops,
        max_prompt_tokens=args.max_prompt_tokens,
        session_cache_share=args.session_cache_share,
        max_inflight_per_session=args.max_inflight_per_session,
        max_inflight_per_address=args.max_inflight_per_address,
        backend_url=args.backend,
        backend_model=args.backend_model,
        backend_api_key=args.api_key,
        backend_kind=args.backend_kind,
        warm_file=args.warm_file,
        cache_dir=args.cache_dir,
        cache_save_interval_min=args.cache_save_interval_min,
        persist_session_caches=args.persist_session_caches,
        upload_budget_mb=args.upload_budget_mb,
        upload_kept_min=args.upload_kept_min,
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
