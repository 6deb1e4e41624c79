"""The request flow: tokenize, match, reuse, prefill, first token, insert the prompt, decode, queue the history, result.

``Engine.stream`` is the core: a generator that yields text deltas and finally a
:class:`GenerationResult`; ``Engine.generate`` collects it. The steps are small methods named for
what they do and called in order from :meth:`Engine._generate_tokens`, each timed in one place. The
engine owns the model, the tokenizer and the prefix cache; it knows nothing about the UI or HTTP
(``app.py`` calls it), and the radix tree itself lives in ``cache/`` and knows nothing about models.

Caching never changes the answer, by construction (``engine/prefill.py``): every KV row the prefix
cache stores, and every logits vector, is a function of the tokens up to it alone. With the int4 and
int8 steps, prompts prefill through the one decode step of the process's life, whose rows are
checked invariant: reuse stops at any token and a reply is stored as it was decoded. Otherwise the
float model prefills in aligned chunks, reuse stops at a chunk boundary, and a reply is prefilled
again before it is stored (after its request has answered: ``engine/history.py``).
``tests/test_exact.py`` checks it bit for bit.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Sequence

import torch

from cache import DEFAULT_NAMESPACE, PrefixCache, PrefixMatch, common_prefix_len
from engine import compiled, fast_llama, loading, quant
from engine.chat_tokens import ChatTokenizer
from engine.config import EngineConfig
from engine.explain import explain
from engine.history import Backlog, Reply
from engine.oracle import compare
from engine.kv import has_sliding_layers, kv_bytes_per_token, new_model_cache
from engine.kv_pool import KVPool
from engine.prefill import capacity as chunk_capacity, prefill_chunks, rewind, run_to_end, step_prefill_chunks
from engine.sampling import Sampler, SamplingParams
from engine.scheduler import Decode, Until, scheduler

CacheStatus = str  # "hit" | "partial" | "miss" | "skipped" (prompt under min_cached_tokens) | "off"


@dataclass(frozen=True)
class GenerationRequest:
    """One validated request. Built by :meth:`Engine.make_request`, which raises ``ValueError``."""

    prompt: str
    system_prompt: str | None = None
    history: tuple[tuple[str, str], ...] = ()  # earlier turns as (role, content), role user/assistant
    max_new_tokens: int = 64
    use_cache: bool = True
    use_prefix_cache: bool = True
    sampling: SamplingParams = field(default_factory=SamplingParams)
    raw: bool = False  # True: the prompt is fed as plain text, without the chat template
    cache_key: str = DEFAULT_NAMESPACE  # prefix-cache namespace; entries never match across keys
    verify: bool = False  # also run with no cache at all and compare (engine/oracle.py): twice the work


@dataclass
class GenerationResult:
    """What a request produced, and where its time went (milliseconds)."""

    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    cache_status: CacheStatus
    use_cache: bool
    use_prefix_cache: bool
    timings: dict[str, float]
    finish_reason: str  # "eos" or "length"
    cache_explanation: dict[str, Any] | None = None  # why the prefix cache reused what it did (engine/explain.py)
    verification: dict[str, Any] | None = None  # with verify=True: the same request reusing nothing, compared (engine/oracle.py)
    first_token_logits: torch.Tensor | None = field(default=None, repr=False, compare=False)  # float32 [vocab]: for the exactness tests, not sent
    batch_sizes: list[int] = field(default_factory=list)  # the batch each decode step ran in (engine/scheduler.py), for the page's chart

    @property
    def prefix_cache_hit(self) -> bool:
        """True when any cached KV was reused (an exact or a partial hit)."""
        return self.cache_status in ("hit", "partial")

    def to_dict(self) -> dict[str, Any]:
        """The REST response body."""
        total_s = self.timings["total_ms"] / 1000
        return {
            "text": self.text,
            "token_ids": list(self.token_ids),
            "latency_ms": self.timings["total_ms"],
            "tokens_per_sec": len(self.token_ids) / total_s if total_s > 0 else 0.0,
            "cache_enabled": self.use_cache,
            "prefix_cache_enabled": self.use_prefix_cache,
            "prefix_cache_hit": self.prefix_cache_hit,
            "cache_status": self.cache_status,
            "finish_reason": self.finish_reason,
            "timings": dict(self.timings),
            "cache_explanation": self.cache_explanation,
            "verification": self.verification,
            "batch_sizes": list(self.batch_sizes),
        }


class Engine:
    """A causal LM with KV caching and a cross-request prefix cache.

    Example:
        >>> engine = Engine.from_pretrained()             # the bundled SmolLM2-135M-Instruct
        >>> result = engine.generate("What is machine learning?", max_new_tokens=20)
        >>> result.text, result.timings["ttft_ms"], result.cache_status
        >>> engine.generate("What is machine learning?", max_new_tokens=20).cache_status
        'hit'

    Thread-safe: requests may run concurrently from several threads.
    """

    def __init__(self, model, tokenizer, config: EngineConfig | None = None, name: str | None = None) -> None:
        self.config = config or EngineConfig()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.storage_device = torch.device("cpu") if self.config.kv_storage == "cpu" else self.device
        # KV storage, every model cache's and the pool's alike ("auto": the model's dtype); only new_cache() makes model caches.
        self.kv_dtype: torch.dtype = _resolve_kv_dtype(self.config.kv_dtype, self.dtype, model.config) or self.dtype
        pin = self.storage_device.type == "cpu" and self.device.type == "cuda"  # pinned host memory: fast copies
        self.pool = KVPool(model.config, self.kv_dtype, self.config.cache_budget_bytes, self.storage_device, pin_memory=pin)
        self.cache = PrefixCache(
            self.pool, self.config.min_cached_tokens, namespace_quota=self.config.namespace_quota, namespace_idle_s=self.config.namespace_idle_s,
            policy=self.config.eviction_policy,
        )
        text_config = model.config.get_text_config(decoder=True)
        self.context_length: int = int(getattr(text_config, "max_position_embeddings", 2048))
        self.max_prompt_tokens: int = min(self.config.max_prompt_tokens or self.context_length, self.context_length)
        # No token is longer than this many characters, so a text longer than max_prompt_tokens times
        # it has too many tokens for sure: a cheap check before tokenizing a huge text.
        self._longest_token_chars = max(len(t) for t in tokenizer.get_vocab())
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        self.supports_prefix_cache = not has_sliding_layers(model.config)
        # Prefill chunk (engine/prefill.py); sliding-window layers cannot drop a chunk's pads, and have no prefix cache to be exact with.
        self.chunk_tokens: int | None = self.config.chunk_tokens if self.supports_prefix_cache else None
        # The one-token decode step, picked once: our own Llama step (engine/fast_llama.py) or transformers' forward.
        use_fast = _uses_fast_step(self.config, model)
        if quant.decode_linears(model) and not use_fast:
            raise ValueError(f"{quant.weight_format(model)} weights decode through engine/fast_llama.py's step, which needs a Llama model and decode=auto; use fp32 or bf16")
        self.decoder: Any = fast_llama.FastDecoder(model) if use_fast else _TransformersStep(self)
        # Rows of one call of the step: a decode batch, or a prompt's chunk where it prefills through the step.
        rows = max(self.config.max_batch, self.config.chunk_tokens) if self.config.prefill == "auto" and self.supports_prefix_cache else self.config.max_batch
        if use_fast:  # batching and the step's prefill, where its rows are each the bits of a row alone (engine/decode_attention.py)
            self.decoder.check_rows_invariant(rows, self.kv_dtype)
        self.compiler = compiled.StepCompiler(self.decoder, self.config.resolved_model_cache_dir(), self.config.compile, self.kv_dtype, rows)  # from_pretrained starts it
        self._running: dict[int, _Run] = {}  # the requests whose flows run now (running()); written on the model's thread only
        self._history = Backlog()  # replies waiting to be stored (step 8, engine/history.py); the model's thread only
        self._history_drainer = False  # whether the backlog's idle-time flow is submitted
        self.chat = ChatTokenizer(tokenizer)  # the chat template's rules, shared with the workload replay
        self._tokenizer_lock = self.chat.lock  # one lock for every use of the tokenizer

    @classmethod
    def from_pretrained(cls, model: str | None = None, config: EngineConfig | None = None, progress=None, **settings: Any) -> "Engine":
        """Load ``model`` (None: ``KVCI_MODEL`` or the bundled SmolLM2) with settings from the environment.

        Args:
            model: A hub id, a local folder, a ``.gguf`` file, or None for the bundled model.
            config: Settings; by default :meth:`EngineConfig.from_env` with ``settings`` applied
                (``weights="int4"`` and so on: the weight format, see ``engine/quant.py``).
            progress: Called with a line of text at each loading step (defaults to logging).

        Raises:
            ValueError: unknown model, or the bundled model is missing with no hub to fall back on.
        """
        config = config or EngineConfig.from_env(model=model, **settings)
        return scheduler().call(cls._load, config, progress)  # the model's thread (engine/scheduler.py: one OpenMP team)

    @classmethod
    def _load(cls, config: EngineConfig, progress) -> "Engine":
        device = _resolve_device(config.device)
        weights = quant.resolve_format(config.weights, config.dtype, device)
        dtype = torch.float32 if weights in ("int8", "int4") else _resolve_dtype(config.dtype, device)  # quantized from float32
        progress = progress or loading.log.info
        loaded = loading.load(config.model, device, dtype, config.resolved_model_cache_dir(), progress)
        if weights in quant.QUANTIZED and config.weights == "auto" and not _uses_fast_step(config, loaded.model):
            weights = "fp32"  # auto: the quantized formats need our Llama decode step
        if weights in quant.QUANTIZED:
            progress(f"Quantizing {loaded.name}'s decode step to {weights}{' from the GGUF file' if weights == 'int4' and loaded.gguf else ''} (prefill stays fp32)...")
        model = quant.apply_format(loaded.model, weights, gguf=loaded.gguf, cache_dir=config.resolved_model_cache_dir())
        engine = cls(model, loaded.tokenizer, config, name=loaded.name)
        if config.compile == "auto":
            engine.compiler.start()  # in the background: requests decode eagerly until it is ready
        return engine

    # ------------------------------------------------------------------ public API

    def generate(self, prompt: str, **kwargs: Any) -> GenerationResult:
        """Run one request to completion, its reply stored in the prefix cache (step 8) before it returns.

        Takes the same arguments as :meth:`stream`. A stream ends with its last token and stores the
        reply later (``engine/history.py``); here the reply's storing is waited for (until the model's
        thread is idle, or the reply is skipped) and timed in ``history_prefill_ms``, so that a script's
        next call finds the cache as the reply left it.
        """
        run = self._start(prompt, kwargs)
        result = final_result(self._stream_text(run))
        if run.history is not None:
            run.history.done.wait()
            result.timings["history_prefill_ms"] = run.history.prefill_ms
        return result

    def stream(self, prompt: str, **kwargs: Any) -> Iterator[str | GenerationResult]:
        """Yield text deltas as tokens are generated, then the :class:`GenerationResult`.

        Args:
            prompt: The user's message (or plain text with ``raw=True``).
            system_prompt: Optional system message for the chat template.
            history: Earlier turns, a list of ``{"role": "user"|"assistant", "content": str}``.
            max_new_tokens: 1 up to the context window (default 64).
            use_cache: KV cache during decoding; False re-runs the whole sequence at every step.
            use_prefix_cache: Reuse KV across requests (needs ``use_cache``).
            temperature: 0 for greedy (default); > 0 samples.
            top_p: Nucleus sampling mass in (0, 1] (default 1).
            seed: Seed for sampling, for repeatable samples.
            repetition_penalty: 1 (default) is off; above 1 discounts tokens this reply already
                generated (CTRL's penalty; the prompt's tokens are not penalised).
            no_repeat_ngram_size: 0 (default) is off; n never generates the same n tokens twice.
            frequency_penalty, presence_penalty: OpenAI's, -2 to 2 (0, the default, is off), over
                the tokens this reply generated.
            raw: Feed the prompt as plain text, without the chat template.
            cache_key: Prefix-cache namespace; requests only reuse entries of their own key.
            verify: Then run the request again with no cache at all and report, in ``verification``,
                whether the tokens are identical and the largest first-token logit difference.

        Raises:
            ValueError: bad input, with what is allowed (raised before anything is yielded).
        """
        return self._stream_text(self._start(prompt, kwargs))

    def _start(self, prompt: str, kwargs: dict[str, Any]) -> "_Run":
        """The request, validated and tokenized (step 1): eagerly, so that bad input raises here and not mid-stream."""
        run = _Run(self.make_request(prompt, **kwargs), self.device)
        with run.clock.span("tokenize_ms"):
            run.prompt_ids = self.tokenize(run.request)
        self.check_prompt_tokens(len(run.prompt_ids), run.request.max_new_tokens)
        return run

    def make_request(
        self,
        prompt: str,
        *,
        system_prompt: str | None = None,
        history: Sequence[dict[str, str]] | None = None,
        max_new_tokens: int = 64,
        use_cache: bool = True,
        use_prefix_cache: bool = True,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        repetition_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        raw: bool = False,
        cache_key: str = DEFAULT_NAMESPACE,
        verify: bool = False,
    ) -> GenerationRequest:
        """Validate arguments into a :class:`GenerationRequest`, or raise ``ValueError`` saying what is allowed."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt must be a non-empty string (it was empty or only whitespace)")
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise ValueError("system_prompt must be a string or None")
        for name, flag in (("use_cache", use_cache), ("use_prefix_cache", use_prefix_cache), ("raw", raw), ("verify", verify)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be true or false, got {flag!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise ValueError(f"max_new_tokens must be an integer, got {max_new_tokens!r}")
        if not 1 <= max_new_tokens < self.context_length:
            raise ValueError(f"max_new_tokens must be between 1 and {self.context_length - 1} (the context window), got {max_new_tokens}")
        if use_prefix_cache and not use_cache:
            raise ValueError("the prefix cache reuses KV, so it needs use_cache=True; turn the prefix cache off or the KV cache on")
        if use_prefix_cache and not self.supports_prefix_cache:
            raise ValueError(f"{self.name} has sliding-window attention layers, which the prefix cache does not support; set use_prefix_cache=False")
        if not isinstance(cache_key, str):
            raise ValueError("cache_key must be a string")
        if verify is True and temperature != 0 and seed is None:
            raise ValueError("verify compares tokens with a second run, so sampling (temperature > 0) needs a seed; set one or use temperature 0")
        history_turns = _validate_history(history)
        chars = len(prompt) + len(system_prompt or "") + sum(len(content) for _, content in history_turns)
        if chars > self.max_prompt_tokens * self._longest_token_chars:
            raise ValueError(
                f"the prompt is {chars} characters, more than the {self.max_prompt_tokens} tokens allowed "
                f"(max_prompt_tokens; the context window is {self.context_length} tokens): shorten it"
            )
        return GenerationRequest(
            prompt=prompt,
            system_prompt=system_prompt or None,
            history=history_turns,
            max_new_tokens=max_new_tokens,
            use_cache=use_cache,
            use_prefix_cache=use_prefix_cache,
            sampling=SamplingParams.checked(temperature, top_p, seed, repetition_penalty, no_repeat_ngram_size, frequency_penalty, presence_penalty),
            raw=raw,
            cache_key=cache_key,
            verify=verify,
        )

    def tokenize(self, request: GenerationRequest) -> list[int]:
        """Step 1: the prompt's token ids, through the chat template unless ``raw`` (or no template).

        Text the user typed is always plain text: a ``<|im_start|>system`` inside a prompt, the
        system prompt or the history becomes ordinary tokens, never a control token, so nobody can
        forge a turn of the conversation.
        """
        if request.raw or not self.chat.has_template:
            text = request.prompt if request.system_prompt is None else f"{request.system_prompt}\n\n{request.prompt}"
            with self._tokenizer_lock:
                return list(self.tokenizer(text, split_special_tokens=True).input_ids)
        return self.chat.prompt_ids(_messages(request))

    def decode(self, token_ids: Sequence[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def check_prompt_tokens(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Raise ``ValueError`` if a tokenized prompt is over ``max_prompt_tokens`` or, with the new tokens, the context."""
        if prompt_tokens > self.max_prompt_tokens:
            raise ValueError(
                f"the prompt is {prompt_tokens} tokens, more than the {self.max_prompt_tokens} allowed "
                f"(max_prompt_tokens; the context window is {self.context_length} tokens): shorten it"
            )
        if prompt_tokens + max_new_tokens > self.context_length:
            raise ValueError(
                f"the prompt is {prompt_tokens} tokens and max_new_tokens is {max_new_tokens}, "
                f"but the context window is {self.context_length} tokens: shorten the prompt or ask for fewer tokens"
            )

    def running(self, visible: Callable[[str], bool] = lambda namespace: True) -> list[dict[str, Any]]:
        """The requests running now in namespaces ``visible`` allows, oldest first, and the cached prefix each reused.

        ``shared_prefix`` names the prefix-cache prefix a request reused (its namespace and tokens, hashed),
        so that requests reusing the same one can be grouped; ``reused_tokens`` is its length.
        Its KV was copied into each request's own buffers (``benchmark/README.md``, "Continuous batching", says why).
        """
        rows = []
        for run in list(self._running.values()):  # a copy: the model's thread adds and removes
            namespace = run.request.cache_key
            if not visible(namespace):
                continue
            reused = run.reused_tokens
            rows.append({
                "namespace": namespace,
                "phase": "decode" if run.generated else "prefill",
                "prompt_tokens": len(run.prompt_ids),
                "new_tokens": len(run.generated),
                "max_new_tokens": run.request.max_new_tokens,
                "reused_tokens": reused,
                "shared_prefix": f"{hash((namespace, tuple(run.prompt_ids[:reused]))) & 0xFFFFFFFF:08x}" if reused else None,
                "batch_size": run.batch_sizes[-1] if run.batch_sizes else 0,
                "started_s_ago": time.perf_counter() - run.clock.start,
            })
        return sorted(rows, key=lambda row: -row["started_s_ago"])

    def info(self) -> dict[str, Any]:
        """What the page shows about the loaded model."""
        return {
            "model": self.name,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "weights": quant.weight_format(self.model),
            "weights_detail": self._weights_detail(),
            "decode_step": type(self.decoder).__name__,
            "decode_compile": self.compiler.status(),
            "prefill": {"through": "decode step" if self.step_prefill else "model", "reuse_align": self.align, "chunk_tokens": self.config.chunk_tokens},
            "batching": {  # engine/scheduler.py: decode steps of running requests share one call, up to max_batch
                "max_batch": self.max_batch,
                "rows_invariant": self.decoder.rows_invariant,
                "invariant_rows": self.decoder.invariant_rows,
                "steps": scheduler().steps,
                "batch_histogram": dict(scheduler().batch_histogram),
                "busy_s": dict(scheduler().busy_s),  # the model thread's time: batched decode steps, flows (prefill chunks, sampling, inserts), idle-time work
            },
            "history": self._history.info(),  # replies stored after their request (step 8): waiting, stored in idle time, promoted by a next turn, skipped
            "weight_bytes": self.decoder.bytes_per_step(),  # read per decode step
            "resident_weight_bytes": quant.weight_bytes(self.model) + sum(quant.weight_bytes(m) for m in quant.decode_linears(self.model).values()),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "context_length": self.context_length,
            "kv_dtype": str(self.pool.dtype).removeprefix("torch."),
            "kv_bytes_per_token": kv_bytes_per_token(self.model.config, self.pool.dtype),
            "kv_storage": str(self.storage_device),
            "cache_budget_bytes": self.cache.budget_bytes,
            "min_cached_tokens": self.cache.min_tokens,
        }

    @property
    def step_prefill(self) -> bool:
        """Whether prompts prefill through the decode step (``engine/prefill.py``): its rows are checked invariant and
        the settings allow it. Final once the compile has settled (the compiled step is checked again), before any prefill."""
        return self.config.prefill == "auto" and self.supports_prefix_cache and self.decoder.invariant_rows >= self.config.chunk_tokens

    @property
    def max_batch(self) -> int:
        """Requests one decode step takes at most: the setting, within what the step's rows were checked invariant for."""
        return max(1, min(self.config.max_batch, self.decoder.invariant_rows))

    @property
    def align(self) -> int:
        """Where a reuse may stop: any token with the step's prefill, else a whole chunk of the model's."""
        return 1 if self.step_prefill else self.chunk_tokens or 1

    def _weights_detail(self) -> str:
        fmt = quant.weight_format(self.model)
        prefill = f"prefill through the {fmt} decode step" if self.step_prefill else "fp32 prefill"
        if fmt == "int4" and getattr(self.model, "int4_from_gguf", False):
            return f"int4 weights (Q4_1 blocks from the GGUF), {prefill}"
        return f"{fmt} weights" + (f", {prefill}" if fmt in quant.QUANTIZED else "")

    # ------------------------------------------------------------------ the request flow

    def _stream_text(self, run: "_Run") -> Iterator[str | GenerationResult]:
        """Wrap the token generator: detokenize incrementally, then yield the result.

        Each step decodes only a short window of recent tokens (the prefix and read offsets of
        vLLM's and TGI's detokenizers), not the whole output: O(n) in all, not O(n^2).
        """
        pieces: list[str] = []
        prefix_offset = read_offset = 0  # tokens [prefix_offset, read_offset) were emitted last; context for the next
        ticket = scheduler().submit(self._generate_tokens(run))
        try:
            for _ in ticket:
                delta = self._new_text(run.generated, prefix_offset, read_offset)
                if delta and not delta.endswith("\ufffd"):  # hold back half a UTF-8 character
                    pieces.append(delta)
                    yield delta
                    prefix_offset, read_offset = read_offset, len(run.generated)
        finally:
            ticket.cancel()  # a consumer that stops reading: the request leaves the batch before its next step
        run.clock.stop()
        # 9. Return text, token ids and timings: the text is exactly what was streamed.
        pieces.append(self._new_text(run.generated, prefix_offset, read_offset))
        if pieces[-1]:
            yield pieces[-1]
        result = run.result("".join(pieces))
        result.first_token_logits = run.first_logits
        result.cache_explanation = self._explain(run)
        if run.request.verify:
            result.verification = self._verify(run)
        yield result

    def _verify(self, run: "_Run") -> dict[str, Any]:
        """10. Verify: the same request computed afresh, reusing nothing from the prefix cache, compared bit for bit.

        (The suite also checks a run with no KV cache at all, tests/test_exact.py; here it would cost one decode step per earlier token at every step.)
        """
        baseline = _Run(replace(run.request, use_prefix_cache=False, verify=False), self.device)
        baseline.prompt_ids = run.prompt_ids
        scheduler().submit(self._generate_tokens(baseline)).wait()
        return compare(run.generated, run.first_logits, baseline.generated, baseline.first_logits, self.decode)

    def _explain(self, run: "_Run") -> dict[str, Any]:
        """After the reply: why the prefix cache reused what it did (``engine/explain.py``)."""
        request = run.request
        messages = None if request.raw or not self.chat.has_template else _messages(request)
        return explain(run.match, run.prompt_ids, messages, self.chat, self.decode, self.cache.min_tokens, None if self.align == 1 else self.align)

    def _new_text(self, ids: list[int], prefix_offset: int, read_offset: int) -> str:
        """Text of ``ids[read_offset:]``, decoded with ``ids[prefix_offset:read_offset]`` before it as context."""
        before = self.decode(ids[prefix_offset:read_offset])
        return self.decode(ids[prefix_offset:])[len(before) :]

    def _generate_tokens(self, run: "_Run") -> Iterator[Any]:
        """Steps 2-7, and step 8 queued (``stream`` tokenizes, ``_stream_text`` returns), as a flow of the scheduler's (``engine/scheduler.py``).

        Runs on the model's thread. Yields each new token id as soon as it exists, and where it needs
        the scheduler: a decode step (batched with the other running requests), a pause between two
        prefill chunks, the compile's end. No lock is held across a yield: the prefix-cache match is
        released as soon as its KV is read (step 3), so a request cancelled anywhere leaves nothing behind.
        """
        self._running[id(run)] = run
        try:
            logits, model_cache = yield from self._prefill_prompt(run)  # 2-4
            token = self._first_token(run, logits)  # 5
            yield token
            self._insert_prompt(run, model_cache, logits)  # 6
            run.prompt_stored.set()
            yield from self._decode_n_tokens(run, token, model_cache)  # 7
            self._queue_history(run, model_cache)  # 8, after the reply: engine/history.py
        finally:
            run.prompt_stored.set()  # whatever happened: nobody waits on it any more
            self._running.pop(id(run), None)

    def _prefill_prompt(self, run: "_Run") -> Iterator[Any]:
        """Steps 2-4: match the prefix cache, reuse what may be reused, prefill the rest (``engine/prefill.py``).

        A sub-flow (it pauses between chunks); returns the logits after the prompt and the model cache
        holding the prompt's KV (None without a KV cache). An exact hit runs no model: the stored logits and every stored row are what a miss computes.
        """
        request, clock = run.request, run.clock
        yield from self._wait_for_step(run)
        if request.use_prefix_cache:
            yield from self._store_continued_history(run)
            yield from self._wait_for_shared_prefill(run)
        if not request.use_cache:  # no KV cache: the prompt's logits, nothing kept (step 7 recomputes every step)
            run.prefill_tokens = len(run.prompt_ids)
            with clock.span("prefill_ms"):
                return (yield from self._prefill(run.prompt_ids, self.new_cache(run.capacity))), None
        match = self._match(run)  # 2
        try:
            logits, model_cache = self._reuse(run, match)  # 3
        finally:
            if match is not None:
                self.cache.release(match)
        if logits is None:  # 4
            suffix = run.prompt_ids[run.reused_tokens :]
            run.prefill_tokens = len(suffix)
            run.prefilling = match is not None  # it will store its prompt (step 6): others may wait for it
            with clock.span("prefill_ms"):
                logits = yield from self._prefill(suffix, model_cache)
        return logits, model_cache

    def _wait_for_step(self, run: "_Run") -> Iterator[Any]:
        """Before any model work: while the compiled step is being built, wait for it (``compile_wait_ms``).

        Every request of the process's life computes with the same step (``engine/compiled.py``): the
        eager one's bits differ. It decides the prefill too: the compiled step's rows are checked again.
        """
        if self.compiler.state == "compiling":
            with run.clock.span("compile_wait_ms"):
                yield Until(self.compiler.done)

    def _prefill(self, token_ids: Sequence[int], model_cache: Any) -> Iterator[Any]:
        """Feed ``token_ids`` at the model cache's next positions, a chunk at a time (pausing between): the logits after them.
        Through the decode step where its rows are invariant, else the float model's aligned chunks (``engine/prefill.py``)."""
        if self.step_prefill:
            return (yield from step_prefill_chunks(self.decoder, token_ids, model_cache, self.config.chunk_tokens))
        return (yield from prefill_chunks(self.model, token_ids, model_cache, self.chunk_tokens))

    def _wait_for_shared_prefill(self, run: "_Run") -> Iterator[Any]:
        """2a. Before the lookup: if another request is prefilling whole chunks this prompt shares (past what
        it reused itself), wait until it has stored its prompt (step 6), then reuse them.

        All prefill runs on the one model thread, so computing the same chunks twice only doubles the
        work: eight requests arriving together on a new system prompt prefilled it eight times
        (``benchmark/README.md``, "Continuous batching and the served path"). The wait is
        ``shared_prefill_wait_ms``. A request that waits is not prefilling, so none waits on it.
        """
        while (leader := self._prefilling_leader(run)) is not None:
            with run.clock.span("shared_prefill_wait_ms"):
                yield Until(leader.prompt_stored)

    def _prefilling_leader(self, run: "_Run") -> "_Run | None":
        """The running request, prefilling in ``run``'s namespace, that shares the most whole chunks with it beyond its own reuse."""
        align, chunk, best, leader = self.align, self.config.chunk_tokens, 0, None
        for other in list(self._running.values()):
            if other is run or not other.prefilling or other.prompt_stored.is_set() or other.request.cache_key != run.request.cache_key:
                continue
            shared = common_prefix_len(other.prompt_ids, run.prompt_ids) // align * align
            if shared >= max(self.cache.min_tokens, other.reused_tokens + chunk) and shared > best:
                best, leader = shared, other
        return leader

    def _match(self, run: "_Run") -> PrefixMatch | None:
        """2. The prefix-cache lookup (it locks the matched path until :meth:`PrefixCache.release`)."""
        if not run.request.use_prefix_cache:
            return None
        with run.clock.span("cache_lookup_ms"):
            match = self.cache.match_prefix(run.prompt_ids, run.request.cache_key, align=self.align)
        run.match, run.lookup_lock_wait_s = match, match.lock_wait_s
        return match

    def _reuse(self, run: "_Run", match: PrefixMatch | None) -> tuple[torch.Tensor | None, Any]:
        """3. The model cache with the matched KV (timed as ``transfer_ms``), and the stored logits of an exact hit.

        With the model's prefill a partial match ends at a chunk boundary (the lookup's ``align``): a prompt
        that shares part of a chunk with a cached one prefills that chunk again, as a miss does
        (``engine/prefill.py``). With the step's prefill it ends where the match does.
        """
        exact = match is not None and match.kind == "hit"
        run.reused_tokens = reused = match.length if match is not None else 0
        if match is not None:
            run.cache_status = match.kind
        if not reused:
            return None, self.new_cache(run.capacity)
        with run.clock.span("transfer_ms"):
            model_cache = self.pool.read_kv(match.slots[:reused], self.model.config, self.device, run.capacity)
            logits = self.pool.read_logits(match.logits_slots, self.device) if exact else None
        return logits, model_cache

    def _first_token(self, run: "_Run", logits: torch.Tensor) -> int:
        """5. The first new token, from the prefill's (or the stored) logits: the time to first token ends here."""
        run.first_logits = run.last_logits = logits
        with run.clock.span("first_sample_ms"):
            token = run.sampler(logits)
        run.clock.mark_first_token()
        run.generated.append(token)
        return token

    def _insert_prompt(self, run: "_Run", model_cache: Any, logits: torch.Tensor | None) -> None:
        """6. The prompt's KV and the logits after it into the prefix cache (after the first token: not the user's wait),
        so concurrent and later requests hit while this one decodes. An exact hit has nothing new to store."""
        if run.match is not None and run.cache_status != "hit":
            self._insert(run, model_cache, len(run.prompt_ids), logits)

    def _decode_n_tokens(self, run: "_Run", token: int, model_cache: Any) -> Iterator[int]:
        """7. One decode step per new token until EOS or ``max_new_tokens`` (the step of the process's life: :meth:`_wait_for_step`)."""
        if self._finished(run, token):
            return
        while True:
            with run.clock.span("decode_ms"):
                if model_cache is None:
                    logits = yield from self._recompute(run)
                else:  # one step, batched by the scheduler with the other running requests' steps
                    step = yield Decode(self.decoder, token, model_cache, self.max_batch)
                    logits = step.logits
                    run.batch_sizes.append(step.batch_size)
                token = run.sampler(logits)
                run.last_logits = logits
            run.generated.append(token)
            yield token
            if self._finished(run, token):
                return

    def _recompute(self, run: "_Run") -> Iterator[Any]:
        """Without a KV cache: the logits after the sequence so far, recomputing every earlier position's KV, nothing kept.

        Each position is recomputed by the function that computed it with a KV cache, so the tokens are
        the same bits: the whole sequence by the step's prefill, or the prompt by the model's and each
        generated token by the decode step, one at a time. The price is the whole sequence at every step.
        """
        scratch = self.new_cache(run.capacity)
        if self.step_prefill:
            return (yield from self._prefill(run.prompt_ids + run.generated, scratch))
        yield from self._prefill(run.prompt_ids, scratch)
        for earlier in run.generated:
            step = yield Decode(self.decoder, earlier, scratch, self.max_batch)
        return step.logits

    def _queue_history(self, run: "_Run", model_cache: Any) -> None:
        """8. Prompt and reply into the prefix cache, so a conversation's next turn hits its whole history.

        With the step's prefill the reply's KV is what a prefill computes: stored now, as decoded, with
        the logits its last token was sampled from. With the model's, the reply's KV came from other
        kernels: it is prefilled again, from the prompt's last chunk boundary, so that every stored row
        is what a miss computes; that prefill waits in the backlog (``engine/history.py``), in idle time
        or at the start of the turn that continues it. With one token generated its KV is not in the
        model cache: step 6 stored all there is.
        """
        if run.match is None or model_cache is None or len(run.generated) < 2:
            return
        length = len(run.prompt_ids) + len(run.generated) - 1
        if length < self.cache.min_tokens:
            return
        if self.step_prefill:
            self._insert(run, model_cache, length, run.last_logits)
            return
        start = len(run.prompt_ids) // self.chunk_tokens * self.chunk_tokens
        run.history = Reply(run, model_cache, chunk_capacity(run.capacity, self.chunk_tokens), (run.prompt_ids + run.generated)[:length], start, run.request.cache_key, self.cache.clears)
        self._history.add(run.history)
        if not self._history_drainer:
            self._history_drainer = True
            scheduler().submit(self._store_history_when_idle(), background=True)

    def _store_history_when_idle(self) -> Iterator[Any]:
        """The backlog's idle-time flow: store waiting replies, oldest first, a chunk at a time while nothing else runs."""
        try:
            while (reply := self._history.take_oldest()) is not None:
                yield from self._store_history(reply, "stored")
        finally:
            self._history_drainer = False

    def _store_continued_history(self, run: "_Run") -> Iterator[Any]:
        """Before a lookup: store the waiting replies this prompt continues (a conversation's next turn), and wait for those being stored."""
        for reply in self._history.take_continued(run.prompt_ids, run.request.cache_key, self.chunk_tokens):
            with run.clock.span("history_prefill_ms"):
                yield from self._store_history(reply, "promoted")
        for reply in self._history.in_progress_continued(run.prompt_ids, run.request.cache_key, self.chunk_tokens):
            with run.clock.span("history_prefill_ms"):
                yield Until(reply.done)

    def _store_history(self, reply: Reply, outcome: str) -> Iterator[Any]:
        """Prefill a reply again from its prompt's last chunk boundary and insert it (skipped if the cache was cleared since)."""
        if reply.clears != self.cache.clears:
            self._history.finish(reply, "skipped")
            return
        self._history.storing.add(reply)
        t0, stored = time.perf_counter(), False
        try:
            model_cache = reply.model_cache
            rewind(model_cache, reply.start)
            logits = yield from prefill_chunks(self.model, reply.tokens[reply.start :], model_cache, self.chunk_tokens)
            reply.prefill_ms = (time.perf_counter() - t0) * 1000
            if reply.clears == self.cache.clears:
                self._insert(reply.run, model_cache, len(reply.tokens), logits)
                stored = True
        finally:
            self._history.finish(reply, outcome if stored else "skipped")

    def new_cache(self, capacity: int) -> Any:
        """The one way a model cache is made: room for ``capacity`` tokens and their last chunk's pads, KV in the engine's KV dtype."""
        return new_model_cache(self.model.config, chunk_capacity(capacity, self.chunk_tokens), self.kv_dtype, self.device)

    def prefill_sequence(self, token_ids: Sequence[int]) -> tuple[torch.Tensor, Any]:
        """A fresh prefill of ``token_ids`` (no cache read or written): the logits after them and the model cache with their KV."""
        def run() -> tuple[torch.Tensor, Any]:
            model_cache = self.new_cache(len(token_ids))
            return run_to_end(self._prefill(list(token_ids), model_cache)), model_cache

        self.compiler.settled()  # the step of the process's life decides the prefill
        return scheduler().call(run)

    def store(self, token_ids: Sequence[int], namespace: str, with_logits: bool = True) -> dict[str, int]:
        """Prefill ``token_ids`` into the prefix cache without generating (warming), reusing what is cached.

        Args:
            with_logits: Store the logits after them too, for a request that is exactly these tokens (an
                exact hit). A system prompt's shared prefix is never a whole prompt: without them it
                costs its KV alone (a vocabulary of float32 logits is ~200 KB).

        Returns ``reused`` (tokens already cached) and ``prefilled`` (computed now).
        """
        run = _Run(GenerationRequest(prompt="(stored)", max_new_tokens=1, cache_key=namespace), self.device)
        run.prompt_ids = list(token_ids)

        def flow() -> Iterator[Any]:
            logits, model_cache = yield from self._prefill_prompt(run)
            self._insert_prompt(run, model_cache, logits if with_logits else None)

        scheduler().submit(flow()).wait()
        return {"reused": run.reused_tokens, "prefilled": run.prefill_tokens}

    def _insert(self, run: "_Run", model_cache: Any, num_tokens: int, logits: torch.Tensor | None) -> None:
        """The first ``num_tokens`` tokens' KV and the logits after them into the prefix cache.

        The cache copies them straight from the live model cache into its pool (outside its lock),
        and only the tokens it does not hold yet. Sequences too short to cache copy nothing. A
        failed copy (out of memory) is the cache's to count: the reply goes on.
        """
        if num_tokens < self.cache.min_tokens:
            return
        sequence = (run.prompt_ids + run.generated)[:num_tokens]
        with run.clock.span("insert_ms"):
            self.cache.insert(sequence, self.pool.source(model_cache, num_tokens, logits), run.request.cache_key)
        run.lock_wait_s += self.cache.last_lock_wait_s()

    def _finished(self, run: "_Run", token: int) -> bool:
        if token in self.eos_token_ids:
            run.finish_reason = "eos"
            return True
        if len(run.generated) >= run.request.max_new_tokens:
            run.finish_reason = "length"
            return True
        return False


class _TransformersStep:
    """The decode step through transformers' own forward: the fallback seam beside ``fast_llama.FastDecoder``."""

    def __init__(self, engine: "Engine") -> None:
        self.engine = engine

    rows_invariant, invariant_rows = False, 1  # transformers' float GEMMs: a batch runs one request at a time

    @torch.inference_mode()
    def decode_one_token(self, token: int, model_cache: Any) -> torch.Tensor:
        return self.decode_tokens([token], model_cache)

    def decode_batch(self, tokens: list[int], model_caches: list[Any]) -> torch.Tensor:
        return torch.stack([self.decode_one_token(t, c) for t, c in zip(tokens, model_caches)])

    @torch.inference_mode()
    def decode_tokens(self, tokens: list[int], model_cache: Any) -> torch.Tensor:
        input_ids = torch.tensor([tokens], dtype=torch.long, device=self.engine.device)  # [1, T]
        return self.engine.model(input_ids=input_ids, cache=model_cache, use_cache=True, logits_to_keep=1).logits[0, -1].float()

    def bytes_per_step(self) -> int:
        """The model's weights but the embedding table (unless the lm_head reads it too)."""
        model = self.engine.model
        embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
        tied = head is not None and getattr(head, "weight", None) is embedding.weight
        return quant.weight_bytes(model, skip=() if tied else (embedding.weight,))


def final_result(stream: Iterator[str | GenerationResult]) -> GenerationResult:
    """Drain a :meth:`Engine.stream` (or anything relaying one) and return its closing result."""
    result = None
    for item in stream:
        if isinstance(item, GenerationResult):
            result = item
    assert result is not None, "the stream ended without a result"
    return result


# ---------------------------------------------------------------------- helpers


class _Clock:
    """Named spans of one request, with CUDA synchronised at each edge so GPU work is counted."""

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self.start = self._now()
        self.spans: dict[str, float] = {}
        self.first_token_at: float | None = None
        self.end: float | None = None

    def span(self, name: str) -> "_Span":
        return _Span(self, name)

    def mark_first_token(self) -> None:
        self.first_token_at = self._now()

    def stop(self) -> None:
        self.end = self._now()

    def ms(self, name: str) -> float:
        return self.spans.get(name, 0.0) * 1000

    def _now(self) -> float:
        if self._cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


class _Span:
    __slots__ = ("clock", "name", "t0")

    def __init__(self, clock: _Clock, name: str) -> None:
        self.clock, self.name = clock, name

    def __enter__(self) -> None:
        self.t0 = self.clock._now()

    def __exit__(self, *exc: object) -> None:
        self.clock.spans[self.name] = self.clock.spans.get(self.name, 0.0) + self.clock._now() - self.t0


class _Run:
    """The mutable state of one request while it runs."""

    def __init__(self, request: GenerationRequest, device: torch.device) -> None:
        self.request = request
        self.clock = _Clock(device)
        self.sampler = Sampler(request.sampling)  # the random stream and the history repetition control reads
        self.prompt_ids: list[int] = []
        self.generated: list[int] = []
        self.match: PrefixMatch | None = None  # the prefix-cache lookup, for the explanation
        self.first_logits: torch.Tensor | None = None  # float32 [vocab] of the first new token, for verify
        self.last_logits: torch.Tensor | None = None  # those the newest token was sampled from (stored with the reply: step 8)
        self.cache_status: CacheStatus = "off" if not request.use_prefix_cache else "miss"
        self.prefill_tokens = 0
        self.reused_tokens = 0
        self.lookup_lock_wait_s = 0.0  # of the prefix-cache lookup, before the first token
        self.lock_wait_s = 0.0  # of the inserts
        self.batch_sizes: list[int] = []  # how many requests each of this request's decode steps ran (engine/scheduler.py)
        self.history: Reply | None = None  # its prompt and reply, queued to be stored (step 8)
        self.prefilling = False  # computing its prompt's KV, which it will store (requests sharing it wait: step 2a)
        self.prompt_stored = threading.Event()  # step 6 done, or the request ended
        self.finish_reason = "length"

    @property
    def capacity(self) -> int:
        """Tokens the model cache will hold at most: the prompt and every new token (``Engine.new_cache`` adds the pads' room)."""
        return len(self.prompt_ids) + self.request.max_new_tokens

    def result(self, text: str) -> GenerationResult:
        c = self.clock
        first = (c.first_token_at or c.end) - c.start
        # ttft_ms: critical time to the first token (tokenize + waiting for the cache lock + prefill
        # + first sample); cache bookkeeping and transfers are left out. wall_ttft_ms: all of it, as a user waits.
        lookup_wait_ms = self.lookup_lock_wait_s * 1000
        ttft = c.ms("tokenize_ms") + lookup_wait_ms + c.ms("prefill_ms") + c.ms("first_sample_ms")
        decode_steps = max(len(self.generated) - 1, 0)
        decode_ms = c.ms("decode_ms")
        timings = {
            "tokenize_ms": c.ms("tokenize_ms"),
            "cache_lookup_ms": c.ms("cache_lookup_ms"),
            "cache_lock_wait_ms": lookup_wait_ms + self.lock_wait_s * 1000,
            "transfer_ms": c.ms("transfer_ms"),
            "prefill_ms": c.ms("prefill_ms"),
            "insert_ms": c.ms("insert_ms"),
            "history_prefill_ms": c.ms("history_prefill_ms"),  # step 8 of earlier turns this prompt continues, stored first (generate() sets its own)
            "compile_wait_ms": c.ms("compile_wait_ms"),  # waiting for the compiled decode step (engine/compiled.py)
            "shared_prefill_wait_ms": c.ms("shared_prefill_wait_ms"),  # waiting for another request to store the prompt part both share (step 2a)
            "ttft_ms": ttft,
            "wall_ttft_ms": first * 1000,
            "decode_ms": decode_ms,
            "total_ms": (c.end - c.start) * 1000,
            "decode_tokens_per_sec": decode_steps / (decode_ms / 1000) if decode_ms > 0 else 0.0,
            "prefix_tokens_saved": self.reused_tokens,
            "prompt_tokens": len(self.prompt_ids),
            "prefill_tokens": self.prefill_tokens,
            "new_tokens": len(self.generated),
            "batch_size_mean": sum(self.batch_sizes) / len(self.batch_sizes) if self.batch_sizes else 0.0,
            "batch_size_max": max(self.batch_sizes, default=0),
        }
        return GenerationResult(
            text=text,
            token_ids=list(self.generated),
            prompt_token_ids=list(self.prompt_ids),
            cache_status=self.cache_status,
            use_cache=self.request.use_cache,
            use_prefix_cache=self.request.use_prefix_cache,
            timings=timings,
            finish_reason=self.finish_reason,
            batch_sizes=list(self.batch_sizes),
        )


def _messages(request: GenerationRequest) -> list[dict[str, str]]:
    """The chat messages of a request: the system prompt, the earlier turns, the user's message."""
    messages = [{"role": "system", "content": request.system_prompt}] if request.system_prompt else []
    messages += [{"role": role, "content": content} for role, content in request.history]
    messages.append({"role": "user", "content": request.prompt})
    return messages


def _validate_history(history: Sequence[dict[str, str]] | None) -> tuple[tuple[str, str], ...]:
    if history is None:
        return ()
    if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
        raise ValueError("history must be a list of {'role': 'user'|'assistant', 'content': str} messages")
    turns = []
    for i, message in enumerate(history):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant") or not isinstance(message.get("content"), str):
            raise ValueError(f"history[{i}] must be {{'role': 'user'|'assistant', 'content': str}}, got {message!r}")
        turns.append((message["role"], message["content"]))
    return tuple(turns)


def _eos_token_ids(model, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def _uses_fast_step(config: EngineConfig, model) -> bool:
    """Whether ``model`` decodes through engine/fast_llama.py's step (the only one the quantized formats have)."""
    return config.decode == "auto" and fast_llama.supports(model)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {name!r}: use auto, cpu or cuda[:N]") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but torch sees no CUDA device; use auto or cpu")
    return device


def _resolve_kv_dtype(name: str, model_dtype: torch.dtype, config) -> torch.dtype | None:
    """The KV storage dtype: None for "auto" (the model's own), else fp32 or bf16 (not for sliding-window models, whose layers keep the model's)."""
    if name == "auto":
        return None
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
    if dtype != model_dtype and has_sliding_layers(config):
        raise ValueError(f"kv_dtype {name} needs full-attention layers; this model has sliding-window ones: use kv_dtype auto")
    return dtype


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, name)

