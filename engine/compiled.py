"""Compile the one-token decode step in the background and swap it in once it is ready and checked.

The step (``engine.fast_llama.FastDecoder.forward``) runs once per generated token; at this model
size on a CPU much of its time is Python and operator dispatch, which ``torch.compile`` removes
(inductor's ``cpp_wrapper``: the kernels called from C++, see :func:`inductor_options`).
Compiling takes tens of seconds, so :class:`StepCompiler` does it in a thread after load while
decoding waits (:meth:`StepCompiler.settled`). The step attends over views of the filled KV, whose
length is compiled dynamic (``mark_dynamic``): one graph serves every position and every request.

Why decoding waits instead of running eagerly meanwhile: the compiled graph fuses and reorders
float arithmetic, so its logits differ from the eager step's in the last bits, and a greedy token
can flip at a near-tie. An answer must not depend on when in the process's life it was asked (the
exactness contract, ``engine/prefill.py``), so one step serves every request: the compiled one
once it is ready, or the eager one for good when compiling is off or fails. Eager decoding beside
a compile ran at ~3 tok/s on a 2-core host anyway, and a warm inductor cache compiles in ~10 s.
When the graph is built it is checked against the eager step on a fixed prompt (the same greedy
tokens; a sanity check, not the contract) before it is put in place. Compiled calls are serialised by a lock: dynamo's guards and caches are not documented as
safe across threads, and on a CPU two steps at once only share the same cores.

Inductor keeps its cache in ``TORCHINDUCTOR_CACHE_DIR`` (by default the app's model cache folder,
``inductor/<kind of CPU kernels>/``), so a restart compiles from cache. Any failure (no C++ compiler, an inductor error,
different tokens) leaves the eager step in place with one log line, and the state says why.

Knows nothing about requests or caches; ``engine.engine`` starts it (``KVCI_COMPILE=auto|off``).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from engine.fast_llama import FastDecoder
from engine.kv import GrowingKVLayer

log = logging.getLogger("kvci.compile")

COMPILE_MODES = ("auto", "off")
EXPECTED_COMPILE_S = 70.0  # a cold compile on a 2-core host (benchmark/README.md); a warm one takes 8-13 s
CHECK_PROMPT_TOKENS = 48  # the fixed prompt the compiled step must continue exactly as the eager one does
CHECK_STEPS = 8


class StepCompiler:
    """The compile state of one decoder: ``off``, ``compiling``, ``compiled`` or ``eager`` (failed, with the reason).

    Example:
        >>> compiler = StepCompiler(engine.decoder, cache_dir); compiler.start()
        >>> compiler.wait(120); compiler.describe()
        'compiled in 41 s'
    """

    def __init__(self, decoder: Any, cache_dir: Path, mode: str = "auto", kv_dtype: torch.dtype | None = None, max_batch: int = 1) -> None:
        self.decoder = decoder
        self.max_batch = max_batch  # the compiled step is checked row-invariant up to this batch (FastDecoder.check_rows_invariant)
        self.cache_dir = cache_dir
        self.kv_dtype = kv_dtype  # the engine's KV storage dtype, which the graph is built for (None: the model's)
        self.state = "off"
        self.reason = "KVCI_COMPILE=off" if mode == "off" else "not compiled"
        self.seconds: float | None = None
        self.started_at: float | None = None  # time.monotonic() when compiling started
        self.expected_s = EXPECTED_COMPILE_S  # the page's countdown: the last compile's time on this machine, once known
        self.done = threading.Event()
        self._lock = threading.Lock()  # one compiled step at a time

    def start(self) -> None:
        """Compile in a daemon thread, unless this machine cannot (then the state says why, at once)."""
        reason = unavailable(self.decoder)
        if reason:
            self._fail(reason)
            return
        self.state, self.reason = "compiling", ""
        self.started_at = time.monotonic()
        self.expected_s = _last_compile_seconds(self.cache_dir) or EXPECTED_COMPILE_S
        threading.Thread(target=self._run, name="compile-decode-step", daemon=True).start()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until compiling has ended (compiled or failed); False on timeout or when it never started."""
        return self.done.wait(timeout) if self.state != "off" else False

    def settled(self) -> float:
        """Block while the step is compiling (a request's decode waits here: one step for the process's life); seconds waited."""
        if self.state != "compiling":
            return 0.0
        t0 = time.monotonic()
        self.done.wait()
        return time.monotonic() - t0

    def describe(self) -> str:
        """The page's words for the state."""
        if self.state == "compiled":
            return f"compiled in {self.seconds:.0f} s"
        if self.state == "compiling":
            left = max(self.expected_s - (time.monotonic() - (self.started_at or time.monotonic())), 0)
            return f"compiling the decode step (~{left:.0f} s left); decoding waits for it, so every answer comes from one step"
        if self.state == "eager":
            return f"eager (compile failed: {self.reason})"
        return f"eager ({self.reason})"

    def status(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self.started_at if self.state == "compiling" and self.started_at is not None else None
        return {
            "state": self.state, "description": self.describe(), "compile_seconds": self.seconds, "reason": self.reason or None,
            "elapsed_s": elapsed, "expected_s": self.expected_s if self.state == "compiling" else None,
            "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR") if self.state == "compiled" else None,
        }

    # ------------------------------------------------------------------ the compile thread

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            use_cache_folder(self.cache_dir / "inductor" / torch.backends.cpu.get_cpu_capability().lower())
            threading.Thread(target=check_vector_isa, name="compile-isa-check", daemon=True).start()
            eager = self.decoder.forward_batch
            graph = torch.compile(eager, fullgraph=True, options=inductor_options())
            kv_dtype = self.kv_dtype or self.decoder.norm_weight.dtype
            compiled = _Serialised(graph, self._lock)
            expected, got = check_tokens(self.decoder, eager, kv_dtype), check_tokens(self.decoder, compiled, kv_dtype)
            if got != expected:
                self._fail(f"the compiled step gave tokens {got} where the eager one gave {expected} on the check prompt")
                return
            invariant = self.decoder.check_rows_invariant(self.max_batch, kv_dtype, compiled) >= 2  # decides batching and the prefill for the process's life
            self.seconds = time.perf_counter() - t0
            self.decoder.step = compiled  # before any request decodes: they wait in settled()
            log.info("compiled step %s", "batches requests (rows checked invariant)" if invariant else "runs requests one at a time (rows not invariant)")
            _remember_compile_seconds(self.cache_dir, self.seconds)
            self.state = "compiled"
            log.info("decode step compiled in %.1f s (inductor cache: %s)", self.seconds, os.environ["TORCHINDUCTOR_CACHE_DIR"])
        except Exception as exc:  # any compiler or inductor failure: keep decoding eagerly
            self._fail(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else 'no message'}")
        finally:
            self.done.set()

    def _fail(self, reason: str) -> None:
        self.state, self.reason = "eager", reason
        log.warning("decode step stays eager: %s", reason)
        self.done.set()


def _last_compile_seconds(cache_dir: Path) -> float | None:
    try:
        return float((cache_dir / "inductor" / "last_compile_s.txt").read_text())
    except (OSError, ValueError):
        return None


def _remember_compile_seconds(cache_dir: Path, seconds: float) -> None:
    try:
        (cache_dir / "inductor").mkdir(parents=True, exist_ok=True)
        (cache_dir / "inductor" / "last_compile_s.txt").write_text(f"{seconds:.1f}")
    except OSError:
        pass  # only the countdown's estimate


def inductor_options() -> dict[str, bool | int]:
    """``cpp_wrapper`` (the kernels called from C++, not Python), built separately; no ``freezing``.

    Measured on the bundled model's int4 step (benchmark/README.md), each pair in one process with
    the runs alternated:

    - ``cpp_wrapper_build_separate``: the C++ wrapper (one call per kernel, 30 layers of them) is
      compiled at ``-O1`` apart from the kernels at ``-O3``, instead of all of it in one file at
      ``-O3``, a single g++ process of about 80 s. A cold compile takes 51-75 s instead of
      110-144 s, and decode is 3-8% slower (48.8 against 51.6 tok/s at 512 tokens; a ``-O2``
      wrapper gave 48.4, so the loss is the kernels no longer inlined into the wrapper). Taken for
      the cold start: a Space without persistent storage compiles cold at every restart.
    - ``cpp_wrapper`` itself: without it decode is 3-6% slower again (47.7 against 50.7 tok/s).
    - ``freezing`` (the weights folded in as constants) gave no speed (the int4 and int8 kernels
      take prepacked weights anyway) and cost ~10 s at every start from a warm cache (23 s, 13 s without).
    - ``max_fusion_buffer_group_pairwise_attempts`` 8 (default 64): the scheduler's fusion search
      took 4-6 s less, and the generated C++ was identical for the bundled model's step.
    """
    return {"cpp_wrapper": True, "cpp_wrapper_build_separate": True, "max_fusion_buffer_group_pairwise_attempts": 8}


def check_vector_isa() -> None:
    """Run inductor's check of which vector instructions g++ builds for here, ahead of the compile's own need.

    The check compiles and loads a few probes (~8 s cold, their results cached in the inductor
    folder) the first time inductor generates code, ~20 s into a compile. Started in a second
    thread when the compile starts, it runs beside dynamo's tracing on the other core, and the
    compile finds the answer ready (``functools.cache`` and a file lock per probe: a late
    start only repeats a lookup). Best effort: inductor runs the check itself, and reports its
    failures, if this one did not finish or failed.
    """
    try:
        from torch._inductor.cpu_vec_isa import valid_vec_isa_list

        valid_vec_isa_list()
    except Exception as exc:  # a private inductor function: moved or failing, the compile's own check still runs
        log.debug("vector ISA check ahead of the compile failed: %s", exc)


def use_cache_folder(folder: Path) -> None:
    """Point inductor's cache at ``folder``, unless someone chose another: torch sets its /tmp default itself on first use
    (importing parts of transformers does), so that value counts as unset.

    The folder is one per kind of ATen CPU kernels (``avx512``, ``avx2``, ...): inductor's cache key
    leaves that out, and a graph compiled under AVX-512 kernels, loaded from a shared cache by a
    process running AVX2 ones (``ATEN_CPU_CAPABILITY=avx2``), decoded only token 0, twice (the
    int4 weights are packed per kind of kernel). The check caught it; a folder each avoids it.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)


def unavailable(decoder: Any) -> str | None:
    """Why the step cannot be compiled here, or None: a CPU needs a C++ compiler; other devices are left eager."""
    if not isinstance(decoder, FastDecoder):
        return "transformers' own decode step is not compiled"
    device = decoder.norm_weight.device
    if device.type != "cpu":
        return f"compiling is set up for CPUs; {device.type} decodes eagerly"
    if not (shutil.which(os.environ.get("CXX", "")) or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        return "no C++ compiler (install g++, e.g. packages.txt on a Space)"
    return None


@torch.inference_mode()
def check_tokens(decoder: Any, step: Any, kv_dtype: torch.dtype) -> list[int]:
    """Greedy tokens of ``step`` after a fixed prompt, prefilled eagerly, in buffers of two sizes.

    The buffers are made as a request's are (``FastDecoder.new_kv``, outside inference mode): dynamo
    guards on how a tensor was made, and buffers made here in inference mode compiled a graph that
    every request then missed, compiling a second one at its first step.
    """
    vocab, device = decoder.embed.num_embeddings, decoder.norm_weight.device
    tokens: list[int] = []
    for capacity in (CHECK_PROMPT_TOKENS + CHECK_STEPS, 2 * (CHECK_PROMPT_TOKENS + CHECK_STEPS)):
        ks, vs = decoder.new_kv(capacity, kv_dtype)
        prompt = (torch.arange(CHECK_PROMPT_TOKENS, device=device) * 7919 % vocab)[None]
        position = CHECK_PROMPT_TOKENS
        token = int(decoder.forward(prompt, torch.arange(position, device=device), [k[:, :, :position] for k in ks], [v[:, :, :position] for v in vs]).argmax())
        cache = SimpleNamespace(layers=[GrowingKVLayer.holding(k, v, position) for k, v in zip(ks, vs)])
        for _ in range(CHECK_STEPS):
            token = int(decoder.decode_batch([token], [cache], step)[0].argmax())
            tokens.append(token)
    return tokens


class _Serialised:
    """The compiled step behind a lock, its batch dimension unbacked: one graph for every batch size, one request included."""

    def __init__(self, graph: Any, lock: threading.Lock) -> None:
        self.graph, self.lock = graph, lock

    def __call__(self, tokens: torch.Tensor, pos: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        # Unbacked, not merely dynamic: a dynamic size is still specialised at 1, and a graph for one request
        # apart from the batch's would be other code, whose rows need not be the batch's bits.
        torch._dynamo.decorators.mark_unbacked(tokens, 0)
        torch._dynamo.decorators.mark_unbacked(pos, 0)
        torch._dynamo.decorators.mark_unbacked(last, 0)
        with self.lock:
            return self.graph(tokens, pos, last)
