"""Engine settings: one dataclass with defaults, built once from arguments or environment variables.

Leaves loading to ``engine.loading`` and the request flow to ``engine.engine``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, get_args, get_type_hints

from cache.policies import get_priority
from engine.compiled import COMPILE_MODES
from engine.prefill import CHUNK_TOKENS, PREFILL_MODES
from engine.quant import WEIGHT_FORMATS

ENV_PREFIX = "KVCI_"  # KVCI_MODEL, KVCI_DEVICE, KVCI_DTYPE, KVCI_WEIGHTS, KVCI_KV_DTYPE, KVCI_CACHE_BUDGET_MB, ...
KV_DTYPES = ("auto", "fp32", "bf16")  # how KV is stored, in the request's model cache and the prefix cache alike


@dataclass(frozen=True)
class EngineConfig:
    """How to load the model and size the prefix cache.

    Every field can be set by an environment variable named ``KVCI_<FIELD>`` (for example
    ``KVCI_MODEL=HuggingFaceTB/SmolLM2-135M-Instruct`` or ``KVCI_CACHE_BUDGET_MB=64``).
    """

    model: str | None = None  # None: the bundled SmolLM2-135M-Instruct; else a hub id, a folder or a .gguf file
    device: str = "auto"  # "auto" (cuda when available, else cpu), "cpu", "cuda", "cuda:1", ...
    dtype: str = "auto"  # "auto" (bf16 on cuda, fp32 on cpu), "float32", "bfloat16", "float16"
    weights: str = "auto"  # weight format: "auto" (int4 on cpu, else dtype's), "fp32", "bf16", "int8", "int4" (engine.quant)
    kv_dtype: str = "auto"  # KV storage: "auto" (the model's dtype), "fp32" or "bf16" (half the bytes per cached token)
    decode: str = "auto"  # the decode step: "auto" (engine.fast_llama's for Llama models, else transformers') or "transformers"
    compile: str = "auto"  # "auto": from_pretrained compiles that step in the background (engine.compiled); "off": eager
    cache_budget_mb: float = 512.0  # byte budget of the prefix cache
    min_cached_tokens: int = 20  # shorter prompts are neither cached nor counted
    chunk_tokens: int = CHUNK_TOKENS  # the prefill's chunk (engine/prefill.py); the model prefill's reuse stops at a whole one
    prefill: str = "auto"  # "auto": through the decode step where its rows are invariant (any reuse, replies stored as decoded); "model": the float model's aligned chunks
    max_batch: int = 8  # running requests whose decode steps share one batched call (engine/scheduler.py); 1: one at a time
    kv_storage: str = "cpu"  # where cached KV lives: "cpu" (moved to the device on a hit) or "device"
    max_prompt_tokens: int | None = None  # longer prompts are refused; None: the model's context window
    namespace_quota: float = 1.0  # share of the cache budget one prefix-cache namespace may hold, in (0, 1]
    namespace_idle_s: float = 600.0  # an empty namespace with no request for this long is forgotten
    eviction_policy: str = "lru"  # which cached prefix goes first when the budget is full: lru, lfu, fifo, mru (cache.policies)
    model_cache_dir: str | None = None  # converted models; default $XDG_CACHE_HOME/kv-cache-inference

    def __post_init__(self) -> None:
        if self.cache_budget_mb < 0:
            raise ValueError(f"cache_budget_mb must be >= 0, got {self.cache_budget_mb}")
        if self.min_cached_tokens < 1:
            raise ValueError(f"min_cached_tokens must be >= 1, got {self.min_cached_tokens}")
        if not 1 <= self.chunk_tokens <= 4096:
            raise ValueError(f"chunk_tokens must be between 1 and 4096, got {self.chunk_tokens}")
        if not 1 <= self.max_batch <= 64:
            raise ValueError(f"max_batch must be between 1 and 64, got {self.max_batch}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1 or None, got {self.max_prompt_tokens}")
        if not 0 < self.namespace_quota <= 1:
            raise ValueError(f"namespace_quota must be in (0, 1], got {self.namespace_quota}")
        if self.namespace_idle_s < 0:
            raise ValueError(f"namespace_idle_s must be >= 0, got {self.namespace_idle_s}")
        get_priority(self.eviction_policy)  # ValueError naming the policies for an unknown one
        if self.kv_storage not in ("cpu", "device"):
            raise ValueError(f"kv_storage must be 'cpu' or 'device', got {self.kv_storage!r}")
        if self.weights not in WEIGHT_FORMATS:
            raise ValueError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, got {self.weights!r}")
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {self.kv_dtype!r}")
        if self.decode not in ("auto", "transformers"):
            raise ValueError(f"decode must be auto or transformers, got {self.decode!r}")
        if self.prefill not in PREFILL_MODES:
            raise ValueError(f"prefill must be one of {', '.join(PREFILL_MODES)}, got {self.prefill!r}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> "EngineConfig":
        """Defaults, then ``KVCI_*`` environment variables, then explicit ``overrides`` (None ignored)."""
        environ = os.environ if environ is None else environ
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            kind = next(t for t in get_args(hints[f.name]) or (hints[f.name],) if t is not type(None))  # int | None -> int
            try:
                values[f.name] = kind(raw)
            except ValueError as exc:
                raise ValueError(f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not a valid {kind.__name__}") from exc
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown engine settings: {sorted(unknown)}")
        return replace(cls(), **values)

    @property
    def cache_budget_bytes(self) -> int:
        return int(self.cache_budget_mb * (1 << 20))

    def resolved_model_cache_dir(self) -> Path:
        if self.model_cache_dir:
            return Path(self.model_cache_dir).expanduser()
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(base) / "kv-cache-inference"
