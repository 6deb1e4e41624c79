"""A remote OpenAI-compatible server as a backend: vLLM, SGLang, llama-server, this project's /v1, or any other.

One request is one streamed ``POST /v1/chat/completions`` (``/v1/completions`` for raw text) with
``stream_options.include_usage``. Times are the client's: wall TTFT from sending the request to
the first text, decode from the first text to the last. Cached tokens come from the server's
answer. What differs between engines (how to turn the prefix cache off, keep sessions apart,
read server-wide stats, clear) is one small :class:`Adapter` per engine, picked once: detected
from what the server serves, or named by ``--backend-kind``.

The URL is the operator's (command line or environment), never a client's: no request can make
this app fetch another address. Token ids are not known here (servers send text); the result
carries none.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import httpx

from backends import BackendInfo, BackendUnavailable, CannotClear, Capability, Progress
from cache import DEFAULT_NAMESPACE
from engine import GenerationResult

PROBE_TIMEOUT_S = 10.0
REQUEST_TIMEOUT = httpx.Timeout(600.0, connect=10.0)


# ====================================================================== adapters: what differs per engine


@dataclass
class Usage:
    """What a response said about the prompt: tokens, and how many came from the server's prefix cache."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None  # None: the server did not say


class Adapter:
    """An OpenAI-compatible server that reports ``usage.prompt_tokens_details.cached_tokens`` if anything.

    Subclasses override what their engine does differently; the defaults are what OpenAI's API allows.
    """

    kind = "openai"
    salt_field: str | None = None  # a request field that selects a prefix-cache namespace (vLLM's cache_salt)
    cached_zero_omitted = False  # vLLM leaves prompt_tokens_details out when nothing was cached
    # vLLM's, SGLang's and our extra field (theirs count the prompt's tokens too; OpenAI itself refuses it with a 400)
    repetition_penalty_field = "repetition_penalty"

    def request_fields(self, namespace: str | None, prefix_cache: bool) -> dict[str, Any]:
        """Extra request fields: the namespace's salt, or what turns the prefix cache off for this request."""
        if self.salt_field is None:
            return {}
        if not prefix_cache:
            return {self.salt_field: "off-" + uuid.uuid4().hex}  # a fresh namespace: nothing to hit
        return {self.salt_field: salt_of(namespace)} if namespace else {}

    def usage(self, chunk: Mapping[str, Any]) -> Usage | None:
        """The usage in a response or chunk (None where it has none)."""
        usage = chunk.get("usage")
        if not isinstance(usage, Mapping):
            return None
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, Mapping) else None
        if cached is None and self.cached_zero_omitted:
            cached = 0
        return Usage(_int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens")), _int(cached))

    def server_stats(self, http: httpx.Client) -> dict[str, Any] | None:
        """Server-wide prefix-cache figures, or None where the engine has none to offer."""
        return None

    def clear(self, http: httpx.Client) -> str:
        raise CannotClear(f"a generic OpenAI-compatible server ({self.kind}) has no endpoint to clear its prefix cache")

    def capabilities(self) -> dict[str, Capability]:
        return {
            "kv_cache_off": Capability(False, "the KV cache cannot be turned off on a serving engine: it is how they decode"),
            "prefix_cache_off": self._prefix_off(),
            "isolation": Capability(self.salt_field is not None, f"per-session namespaces through {self.salt_field}" if self.salt_field else "one prefix cache for every session: the server has no per-request namespace"),
            "cached_tokens": Capability(True, "usage.prompt_tokens_details.cached_tokens, where the server sends it"),
            "server_stats": Capability(False, "no server-wide prefix-cache counters: this app's own per-request counts"),
            "clear": Capability(False, "this server has no endpoint to clear its prefix cache"),
            "token_ids": Capability(False, "servers stream text, not token ids"),
            "running": Capability(False, "a serving engine does not say which requests it runs, nor what they share"),
        }

    def _prefix_off(self) -> Capability:
        if self.salt_field:
            return Capability(True, f"a fresh {self.salt_field} per request: nothing cached can match")
        return Capability(False, "this server cannot skip its prefix cache for one request")


class VLLMAdapter(Adapter):
    """vLLM: ``cache_salt``, Prometheus counters, ``POST /reset_prefix_cache``.

    Cached tokens need ``--enable-prompt-tokens-details``; vLLM omits the details when nothing was cached.
    """

    kind = "vllm"
    salt_field = "cache_salt"
    cached_zero_omitted = True

    def server_stats(self, http: httpx.Client) -> dict[str, Any] | None:
        metrics = prometheus_values(http.get("/metrics").text)
        queries, hits = metrics.get("vllm:prefix_cache_queries_total"), metrics.get("vllm:prefix_cache_hits_total")
        if queries is None or hits is None:
            return None
        return {"source": "vllm:prefix_cache_queries / vllm:prefix_cache_hits", "queried_tokens": queries, "hit_tokens": hits, "token_hit_rate": hits / queries if queries else 0.0}

    def clear(self, http: httpx.Client) -> str:
        response = http.post("/reset_prefix_cache")
        if response.status_code >= 400:
            raise CannotClear(f"vLLM refused POST /reset_prefix_cache ({response.status_code}: {response.text[:200]}); in recent versions it needs VLLM_SERVER_DEV_MODE=1")
        return "reset vLLM's prefix cache (POST /reset_prefix_cache), for every user of that server"

    def capabilities(self) -> dict[str, Capability]:
        return super().capabilities() | {
            "cached_tokens": Capability(True, "usage.prompt_tokens_details.cached_tokens (start vLLM with --enable-prompt-tokens-details)"),
            "server_stats": Capability(True, "vllm:prefix_cache_queries and vllm:prefix_cache_hits from /metrics"),
            "clear": Capability(True, "POST /reset_prefix_cache: the whole server's cache, not one session's"),
        }


class SGLangAdapter(Adapter):
    """SGLang: cached tokens with ``--enable-cache-report``, ``sglang:cache_hit_rate``, ``POST /flush_cache``."""

    kind = "sglang"

    def server_stats(self, http: httpx.Client) -> dict[str, Any] | None:
        rate = prometheus_values(http.get("/metrics").text).get("sglang:cache_hit_rate")
        return None if rate is None else {"source": "sglang:cache_hit_rate", "token_hit_rate": rate}

    def clear(self, http: httpx.Client) -> str:
        response = http.post("/flush_cache")
        if response.status_code >= 400:
            raise CannotClear(f"SGLang refused POST /flush_cache ({response.status_code}: {response.text[:200]}); it flushes only when no request is running")
        return "flushed SGLang's radix cache (POST /flush_cache), for every user of that server"

    def capabilities(self) -> dict[str, Capability]:
        return super().capabilities() | {
            "cached_tokens": Capability(True, "usage.prompt_tokens_details.cached_tokens (start SGLang with --enable-cache-report)"),
            "server_stats": Capability(True, "sglang:cache_hit_rate from /metrics (start SGLang with --enable-metrics)"),
            "clear": Capability(True, "POST /flush_cache: the whole server's cache, when idle"),
        }


class LlamaServerAdapter(Adapter):
    """llama.cpp's llama-server: ``cache_prompt``, ``timings.cache_n`` / ``prompt_n``, slots erased one by one."""

    kind = "llama-server"
    repetition_penalty_field = "repeat_penalty"  # llama.cpp's: over its last 64 tokens, prompt included

    def request_fields(self, namespace: str | None, prefix_cache: bool) -> dict[str, Any]:
        return {} if prefix_cache else {"cache_prompt": False}

    def usage(self, chunk: Mapping[str, Any]) -> Usage | None:
        usage = super().usage(chunk)
        timings = chunk.get("timings")
        if isinstance(timings, Mapping) and "cache_n" in timings:
            cached, computed = _int(timings.get("cache_n")), _int(timings.get("prompt_n"))
            usage = usage or Usage()
            usage.cached_tokens = cached
            if usage.prompt_tokens is None and cached is not None and computed is not None:
                usage.prompt_tokens = cached + computed
        return usage

    def clear(self, http: httpx.Client) -> str:
        response = http.get("/slots")
        if response.status_code >= 400:
            raise CannotClear(f"llama-server does not list its slots (GET /slots: {response.status_code}); start it without --no-slots")
        erased = 0
        for slot in response.json():
            answer = http.post(f"/slots/{int(slot['id'])}", params={"action": "erase"})
            if answer.status_code == 501:  # measured on llama.cpp in llama-cpp-python 0.3.36: every slot action needs it
                raise CannotClear("llama-server erases slots only when started with --slot-save-path DIR; this one was not")
            if answer.status_code >= 400:
                raise CannotClear(f"llama-server refused to erase slot {slot['id']} ({answer.status_code}: {answer.text[:200]})")
            erased += int(answer.json().get("n_erased", 0))
        return f"erased llama-server's slots ({erased} tokens); prompts it had moved to its host-memory cache (--cache-ram) are not cleared by this and can still hit"

    def capabilities(self) -> dict[str, Capability]:
        return super().capabilities() | {
            "prefix_cache_off": Capability(True, "cache_prompt: false per request"),
            "cached_tokens": Capability(True, "timings.cache_n (and prompt_n) in the last chunk"),
            "clear": Capability(True, "POST /slots/{id}?action=erase for every slot, with llama-server started with --slot-save-path (not the --cache-ram host cache)"),
        }


class KvciAdapter(Adapter):
    """This project's own /v1: ``cache_salt`` within the api key's session, ``/cache/stats``, ``/cache/clear``."""

    kind = "kvci"
    salt_field = "cache_salt"

    def server_stats(self, http: httpx.Client) -> dict[str, Any] | None:
        stats = http.get("/cache/stats").json()
        return {"source": "GET /cache/stats", **{k: stats.get(k) for k in ("hits", "partial_hits", "misses", "hit_rate", "token_hit_rate", "cache_size", "cached_tokens")}}

    def clear(self, http: httpx.Client) -> str:
        response = http.post("/cache/clear")
        body = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
        if response.status_code >= 400 or body.get("cleared") == "nothing":
            raise CannotClear(f"the server refused: {body.get('message') or body.get('detail') or response.text[:200]}")
        return f"the server says: {body.get('message')}"

    def capabilities(self) -> dict[str, Capability]:
        return super().capabilities() | {
            "server_stats": Capability(True, "GET /cache/stats of the api key's session"),
            "clear": Capability(True, "POST /cache/clear as the api key's session"),
        }


ADAPTERS: dict[str, type[Adapter]] = {a.kind: a for a in (VLLMAdapter, SGLangAdapter, LlamaServerAdapter, KvciAdapter, Adapter)}
OWNED_BY = {"vllm": "vllm", "sglang": "sglang", "llamacpp": "llama-server", "kv-cache-inference": "kvci"}


def detect_kind(models: Mapping[str, Any], probe: Any) -> str:
    """The engine behind a URL: from ``owned_by`` in /v1/models, else from what it answers (``probe(path)`` -> response or None)."""
    for card in models.get("data") or []:
        kind = OWNED_BY.get(str(card.get("owned_by", "")).lower())
        if kind:
            return kind
    props = probe("/props")
    if props is not None and props.status_code == 200 and "default_generation_settings" in props.text:
        return "llama-server"
    metrics = probe("/metrics")
    if metrics is not None and metrics.status_code == 200:
        if "vllm:" in metrics.text:
            return "vllm"
        if "sglang:" in metrics.text:
            return "sglang"
    info = probe("/get_server_info")
    if info is not None and info.status_code == 200:
        return "sglang"
    return "openai"


def salt_of(namespace: str) -> str:
    """A namespace as a salt: hashed, so the server never sees our session keys."""
    return hashlib.sha256(namespace.encode()).hexdigest()[:32]


def prometheus_values(text: str) -> dict[str, float]:
    """Prometheus text format as ``{name: value}``, summed over label sets (all engines, all models)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _PROM_LINE.match(line)
        if match:
            try:
                values[match["name"]] = values.get(match["name"], 0.0) + float(match["value"])
            except ValueError:
                continue
    return values


_PROM_LINE = re.compile(r"^(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)(?:\{.*\})?\s+(?P<value>\S+)")


# ====================================================================== the backend


@dataclass
class _Counts:
    """This app's own per-namespace counts of what the server reported."""

    hits: int = 0
    partial_hits: int = 0
    misses: int = 0
    tokens_saved: int = 0
    prompt_tokens: int = 0
    unknown: int = 0  # requests whose answer said nothing about cached tokens


@dataclass
class RemoteBackend:
    """A remote server. ``load`` reaches it, picks the model and the adapter; nothing is sent before.

    Example:
        >>> backend = RemoteBackend("http://127.0.0.1:8000/v1"); backend.load(print)
        >>> [x for x in backend.stream("default", prompt="Hi", max_new_tokens=4)][-1].timings["wall_ttft_ms"]
    """

    url: str
    model: str | None = None
    api_key: str | None = field(default=None, repr=False)
    kind: str | None = None
    adapter: Adapter = field(default_factory=Adapter, init=False)
    _counts: dict[str, _Counts] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/").removesuffix("/v1")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"--backend must be an http:// or https:// URL, got {self.url!r}")
        self._http = httpx.Client(base_url=self.url, headers=self._headers(), timeout=REQUEST_TIMEOUT, trust_env=False)

    # ------------------------------------------------------------------ the Backend protocol

    def load(self, progress: Progress) -> None:
        progress(f"Reaching {self.url} ...")
        try:
            response = self._http.get("/v1/models", timeout=PROBE_TIMEOUT_S)
            response.raise_for_status()
            models = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise BackendUnavailable(f"{self.url}/v1/models did not answer with a model list: {exc}") from None
        ids = [str(card.get("id")) for card in models.get("data") or []]
        if self.model is None:
            if not ids:
                raise BackendUnavailable(f"{self.url} lists no model; pass --backend-model")
            self.model = ids[0]
        kind = self.kind or detect_kind(models, self._probe)
        self.adapter = ADAPTERS[kind]()
        progress(f"Ready: {self.model} on a remote {kind} server at {self.url} (times measured here, client-side).")

    def info(self) -> BackendInfo:
        return BackendInfo(kind=self.adapter.kind, model=self.model, url=self.url, timings="client", capabilities=self.adapter.capabilities())

    def check(self, namespace: str, stop: Sequence[str] | None = None, verify: bool = False, **request: Any) -> None:
        if verify:
            raise ValueError("verify compares with an uncached run of the local engine; a remote server cannot do that")
        if not request.get("use_cache", True):
            raise ValueError("the KV cache cannot be turned off on a remote serving engine; it is local-only")
        if request.get("no_repeat_ngram_size", 0):
            raise ValueError("no_repeat_ngram_size runs in the local engine's sampler; an OpenAI-compatible server has no such field: set it to 0")
        if request.get("use_prefix_cache", True) is False and not self.adapter.capabilities()["prefix_cache_off"].available:
            raise ValueError(f"the prefix cache cannot be turned off on this {self.adapter.kind} server: {self.adapter.capabilities()['prefix_cache_off'].note}")

    def stream(self, namespace: str, stop: Sequence[str] | None = None, **request: Any) -> Iterator[str | GenerationResult]:
        path, body = self._request_body(namespace, list(stop or []), **request)
        start = time.perf_counter()
        first_at = last_at = None
        pieces: list[str] = []
        usage, finish = None, "length"
        try:
            with self._http.stream("POST", path, json=body) as response:
                if response.status_code >= 400:
                    _raise_for(response)
                for chunk in _sse_chunks(response.iter_lines()):
                    usage = self.adapter.usage(chunk) or usage
                    for choice in chunk.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
                        if text:
                            last_at = time.perf_counter()
                            first_at = first_at or last_at
                            pieces.append(text)
                            yield text
                        if choice.get("finish_reason"):
                            finish = "length" if choice["finish_reason"] == "length" else "eos"
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"the {self.adapter.kind} server at {self.url} failed: {exc}") from None
        end = time.perf_counter()
        yield self._result("".join(pieces), usage or Usage(), finish, start, first_at, last_at, end, request, namespace)

    def stats(self, namespace: str | None) -> dict[str, Any]:
        with self._lock:
            counts = _Counts() if namespace is None else self._counts.get(namespace, _Counts())
            if namespace is None:
                for c in self._counts.values():
                    for name in vars(counts):
                        setattr(counts, name, getattr(counts, name) + getattr(c, name))
        total = counts.hits + counts.partial_hits + counts.misses
        try:
            server = self.adapter.server_stats(self._http)
        except (httpx.HTTPError, ValueError):
            server = None
        return {
            "cache_size": None, "cached_tokens": None, "cached_bytes": None, "budget_bytes": None,  # the server's, unknown here
            "hits": counts.hits,
            "partial_hits": counts.partial_hits,
            "misses": counts.misses,
            "total_requests": total,
            "hit_rate": (counts.hits + counts.partial_hits) / total if total else 0.0,
            "tokens_saved": counts.tokens_saved,
            "token_hit_rate": counts.tokens_saved / counts.prompt_tokens if counts.prompt_tokens else 0.0,
            "evictions": None,
            "unreported": counts.unknown,
            "server": server,
            "source": f"this app's counts of the {self.adapter.kind} server's cached_tokens" + (", and the server's own counters" if server else ""),
        }

    def clear(self, namespace: str | None) -> str:
        if namespace is not None:
            raise CannotClear(f"a {self.adapter.kind} server clears its whole cache or nothing; one session's entries cannot be cleared there")
        try:
            message = self.adapter.clear(self._http)
        except httpx.HTTPError as exc:
            raise CannotClear(f"the {self.adapter.kind} server did not answer the clear request: {exc}") from None
        with self._lock:
            self._counts.clear()
        return message

    def drop(self, namespace: str) -> None:
        with self._lock:
            self._counts.pop(namespace, None)

    def entries(self, namespace: str) -> Sequence[Any]:
        return ()  # a server does not show its cache's entries

    def running(self, visible: Callable[[str], bool]) -> list[dict[str, Any]]:
        return []  # a server does not show what it runs

    def decode(self, token_ids: Sequence[int]) -> str:
        return ""

    def status(self) -> dict[str, Any]:
        return {"model": self.model, "device": f"remote {self.adapter.kind}", "dtype": None, "parameters": None, "context_length": None}

    # ------------------------------------------------------------------ helpers

    def _request_body(self, namespace: str, stop: list[str], *, prompt: str, system_prompt: str | None = None, history: Sequence[Mapping[str, str]] | None = None, max_new_tokens: int = 64, use_cache: bool = True, use_prefix_cache: bool = True, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, repetition_penalty: float = 1.0, frequency_penalty: float = 0.0, presence_penalty: float = 0.0, raw: bool = False, verify: bool = False) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "stream": True, "stream_options": {"include_usage": True}}
        if repetition_penalty != 1.0:
            body[self.adapter.repetition_penalty_field] = repetition_penalty
        body |= {name: value for name, value in (("frequency_penalty", frequency_penalty), ("presence_penalty", presence_penalty)) if value}  # OpenAI's own fields
        if seed is not None:
            body["seed"] = seed
        if stop:
            body["stop"] = stop
        body |= self.adapter.request_fields(namespace if namespace != DEFAULT_NAMESPACE else None, use_prefix_cache)
        if raw:
            return "/v1/completions", body | {"prompt": prompt if system_prompt is None else f"{system_prompt}\n\n{prompt}"}
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [dict(m) for m in history or ()]
        return "/v1/chat/completions", body | {"messages": messages + [{"role": "user", "content": prompt}]}

    def _result(self, text: str, usage: Usage, finish: str, start: float, first_at: float | None, last_at: float | None, end: float, request: Mapping[str, Any], namespace: str) -> GenerationResult:
        prompt_tokens = usage.prompt_tokens or 0
        cached = usage.cached_tokens
        prefix_on = request.get("use_prefix_cache", True)
        if not prefix_on:
            status = "off"
        elif cached is None:
            status = "unknown"
        else:
            status = "miss" if cached == 0 else "hit" if cached >= prompt_tokens - 1 else "partial"
        self._count(namespace, status, cached or 0, prompt_tokens)
        wall_ttft = ((first_at or end) - start) * 1000
        decode_ms = ((last_at or end) - (first_at or end)) * 1000
        new_tokens = usage.completion_tokens or 0
        timings = {
            "tokenize_ms": 0.0, "cache_lookup_ms": 0.0, "cache_lock_wait_ms": 0.0, "transfer_ms": 0.0, "prefill_ms": 0.0, "insert_ms": 0.0,
            "ttft_ms": wall_ttft,  # the server's own split is not known: both TTFTs are the client's
            "wall_ttft_ms": wall_ttft,
            "decode_ms": decode_ms,
            "total_ms": (end - start) * 1000,
            "decode_tokens_per_sec": (new_tokens - 1) / (decode_ms / 1000) if decode_ms > 0 and new_tokens > 1 else 0.0,
            "prefix_tokens_saved": cached or 0,
            "prompt_tokens": prompt_tokens,
            "prefill_tokens": prompt_tokens - (cached or 0),
            "new_tokens": new_tokens,
        }
        return GenerationResult(text=text, token_ids=[], prompt_token_ids=[], cache_status=status, use_cache=True, use_prefix_cache=prefix_on, timings=timings, finish_reason=finish)

    def _count(self, namespace: str, status: str, cached: int, prompt_tokens: int) -> None:
        with self._lock:
            counts = self._counts.setdefault(namespace, _Counts())
            if status == "unknown":
                counts.unknown += 1
            elif status != "off":
                setattr(counts, {"hit": "hits", "partial": "partial_hits", "miss": "misses"}[status], getattr(counts, {"hit": "hits", "partial": "partial_hits", "miss": "misses"}[status]) + 1)
                counts.tokens_saved += cached
                counts.prompt_tokens += prompt_tokens

    def _probe(self, path: str) -> httpx.Response | None:
        try:
            return self._http.get(path, timeout=PROBE_TIMEOUT_S)
        except httpx.HTTPError:
            return None

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def _sse_chunks(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """The JSON payloads of an event stream, up to ``data: [DONE]``; an error event raises."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return
        chunk = json.loads(data)
        if isinstance(chunk, dict) and "error" in chunk and "choices" not in chunk:
            raise ValueError(f"the server stopped the stream: {_message(chunk)}")
        yield chunk


def _raise_for(response: httpx.Response) -> None:
    """A refused request: the caller's fault (4xx: ValueError, shown to the user) or the server's (BackendUnavailable)."""
    response.read()
    try:
        message = _message(response.json())
    except ValueError:
        message = response.text[:300]
    if 400 <= response.status_code < 500 and response.status_code not in (401, 403, 404, 429):
        raise ValueError(f"the server refused the request ({response.status_code}): {message}")
    raise BackendUnavailable(f"the server answered {response.status_code}: {message}")


def _message(body: Any) -> str:
    if isinstance(body, Mapping):
        error = body.get("error")
        if isinstance(error, Mapping):
            return str(error.get("message"))[:300]
        if isinstance(error, str):
            return error[:300]
        return str(body.get("detail") or body.get("message") or body)[:300]
    return str(body)[:300]


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
