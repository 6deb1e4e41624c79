"""The workload planner's service: replay a trace across memory budgets and eviction policies.

Three doors, one validation (:func:`parse_plan`) and one bounded runner (:class:`Planner`):

- the page tab (``ui/tabs_planner.py``): a bundled sample or an uploaded JSONL file, a model
  config, budgets and policies; a progress bar, then a chart, a table and CSV / JSON downloads;
- gradio_client ``/plan``: the trace as text (the ``/gradio_api`` body cap, 256 KiB, applies);
- REST ``POST /plan``: JSON ``{"trace": "<jsonl text>", "model": ..., ...}`` up to
  ``PLAN_MAX_BODY_BYTES`` (the request guard gives this path its own cap).

The trace is bounded in bytes, requests and tokens before any replay, one plan runs at a time on
the server (a second gets :class:`~ui.service.Busy`), and a replay past ``PLAN_TIME_LIMIT_S`` stops
with an error. Turns are fair between addresses (:class:`Turns`): a caller refused while another's
plan runs keeps its place in line, so a client that loops on ``/plan`` cannot keep the planner
from everyone else. Replays run in throwaway caches over metered pools (``cache.replay``), never in the
live one; no path the client names is ever opened (the page's upload arrives as bytes), and model
configs are picked by name from the shipped ones only. Text traces are tokenized by the served
engine's tokenizer, as its requests are. No business logic here beyond wiring: it is ``cache.replay``'s.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import gradio as gr
from pydantic import BaseModel, ConfigDict, Field, field_validator

from cache.budget_plan import (
    DEFAULT_MODEL_CONFIG,
    DEFAULT_PREFILL_TOKENS_PER_S,
    KV_DTYPE_BYTES,
    ModelSize,
    ReplayRow,
    ReplaySettings,
    ReplayTimeout,
    load_model_size,
    model_config_names,
    parse_budgets,
    parse_policies,
    plan,
)
from cache.replay import knee_sentence
from cache.traces import DEFAULT_BLOCK_SIZE, TextTokenizer, TraceLimits, load_trace
from ui.limits import PLAN_MAX_BUDGETS, PLAN_MAX_REQUESTS, PLAN_MAX_TRACE_BYTES, PLAN_MAX_UNITS, PLAN_TIME_LIMIT_S, PLAN_TURN_KEPT_S
from ui.schemas import parse_body
from ui.service import Busy, NotReady

TABLE_COLUMNS = ["policy", "budget", "requests", "request hit rate", "token hit rate", "prompt tokens", "reused tokens", "peak", "evictions", "prefill s saved", "knee"]


class PlanBody(BaseModel):
    """``POST /plan`` (and the page's and gradio_client's arguments): one replay plan. Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", strict=True)

    trace: str = Field(min_length=1, max_length=PLAN_MAX_TRACE_BYTES, description="the JSONL trace, one request per line")
    model: str = Field(DEFAULT_MODEL_CONFIG, description="a shipped model config: " + ", ".join(model_config_names()))
    kv_dtype: str = Field("bf16", description="KV storage dtype: " + ", ".join(KV_DTYPE_BYTES))
    budgets: str = Field("auto", max_length=400, description="comma-separated sizes (512MiB,4GiB,inf) or 'auto'")
    policies: str = Field("lru", max_length=100, description="comma-separated eviction policies (lru,lfu,fifo,mru)")
    block_size: int = Field(DEFAULT_BLOCK_SIZE, ge=1, le=1 << 20, description="tokens per hash id of a block trace")
    prefill_tokens_per_s: float = Field(DEFAULT_PREFILL_TOKENS_PER_S, gt=0, le=1e9, allow_inf_nan=False, description="to turn reused tokens into time")

    @field_validator("trace")
    @classmethod
    def _trace_size(cls, value: str) -> str:
        size = len(value.encode("utf-8", errors="replace"))
        if size > PLAN_MAX_TRACE_BYTES:
            raise ValueError(f"the trace is {size:,} bytes, more than the {PLAN_MAX_TRACE_BYTES // 1024:,} KiB allowed; send a shorter one")
        return value

    @field_validator("model")
    @classmethod
    def _shipped_model(cls, value: str) -> str:
        if value not in model_config_names():  # a name, never a path: nothing the client names is opened
            raise ValueError(f"unknown model config; choose one of: {', '.join(model_config_names())}")
        return value

    @field_validator("kv_dtype")
    @classmethod
    def _dtype(cls, value: str) -> str:
        if value not in KV_DTYPE_BYTES:
            raise ValueError(f"choose one of: {', '.join(KV_DTYPE_BYTES)}")
        return value

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, value: str) -> str:
        budgets = parse_budgets(value)
        if budgets is not None and len(budgets) > PLAN_MAX_BUDGETS:
            raise ValueError(f"at most {PLAN_MAX_BUDGETS} budgets per plan")
        return value

    @field_validator("policies")
    @classmethod
    def _policies(cls, value: str) -> str:
        parse_policies(value)
        return value


def parse_plan(raw: bytes | dict) -> PlanBody:
    """The one validation of a plan request: a REST body (JSON bytes) or a page / gradio_client call (a dict).

    Raises:
        BadRequest: what is wrong, one line per field, without echoing the trace.
    """
    return parse_body(raw, PlanBody)


@dataclass(frozen=True)
class PlanResult:
    """A finished plan: the rows, and what they were computed for."""

    model: ModelSize
    kv_dtype: str
    kv_bytes_per_token: int
    trace_kind: str
    requests: int
    rows: list[ReplayRow]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        policies = list(dict.fromkeys(r.policy for r in self.rows))
        return {
            "model": self.model.name,
            "kv_dtype": self.kv_dtype,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "trace_kind": self.trace_kind,
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
            "knee": {p: next((r.budget for r in self.rows if r.policy == p and r.knee), None) for p in policies},
            "rows": [r.to_dict() for r in self.rows],
        }

    def summary(self) -> str:
        head = f"**{self.model.name}**, {self.kv_bytes_per_token:,} bytes of KV per token ({self.kv_dtype}) · {self.requests:,} requests ({self.trace_kind} trace) · replayed in {self.seconds:.1f} s"
        return head + "\n\n" + "\n".join(f"- {knee_sentence(self.rows, p)}" for p in dict.fromkeys(r.policy for r in self.rows))


class Turns:
    """The line for the one planner slot: who may start a plan when it is free.

    A caller refused while the slot is taken gets a place in line, kept ``kept_s`` after its last
    try. While anyone is in line only the first may start; the others (a caller who just had its
    go included) join the line behind. A client that loops on ``/plan`` so gets every other go at
    most, never all of them; a place whose caller does not come back lapses. At most ``max_waiting``
    places are kept. Not thread-safe: the :class:`Planner` holds its lock around every call.

    Example:
        >>> turns = Turns(kept_s=30); turns.may_start("address:a")
        True
        >>> turns.wait("address:b"); turns.may_start("address:a"), turns.may_start("address:b")
        (False, True)
    """

    def __init__(self, kept_s: float = PLAN_TURN_KEPT_S, clock: Callable[[], float] = time.monotonic, max_waiting: int = 256) -> None:
        self.kept_s, self._clock, self.max_waiting = kept_s, clock, max_waiting
        self._line: dict[str, float] = {}  # caller -> when its place lapses, in the order they joined

    def may_start(self, caller: str) -> bool:
        self._drop_lapsed()
        return not self._line or next(iter(self._line)) == caller

    def wait(self, caller: str) -> None:
        """``caller`` was refused: keep (or refresh) its place at the end of the line."""
        self._drop_lapsed()
        if caller in self._line or len(self._line) < self.max_waiting:
            self._line[caller] = self._clock() + self.kept_s

    def started(self, caller: str) -> None:
        self._line.pop(caller, None)

    def _drop_lapsed(self) -> None:
        now = self._clock()
        for caller in [c for c, until in self._line.items() if until <= now]:
            del self._line[caller]


class Planner:
    """Runs plans one at a time, bounded in size and time, on throwaway caches, in fair turns between callers.

    Args:
        tokenizer: Returns the served engine's chat tokenizer (raises ``NotReady`` while it loads);
            called only for text traces.
    """

    def __init__(self, tokenizer: Callable[[], TextTokenizer], time_limit_s: float = PLAN_TIME_LIMIT_S, turns: Turns | None = None) -> None:
        self._tokenizer = tokenizer
        self.time_limit_s = time_limit_s
        self.turns = turns or Turns()
        self._lock = threading.Lock()  # guards _running and the turns
        self._running = False

    def run(self, body: PlanBody, progress: Callable[[int, int], None] | None = None, caller: str = "address:unknown") -> PlanResult:
        """Replay ``body.trace`` for ``caller`` (its address); raises ``ValueError`` (bad trace, too much work), ``Busy`` or ``NotReady``."""
        with self._lock:
            if self._running or not self.turns.may_start(caller):
                why = "another workload plan is running" if self._running else "other callers are waiting for the planner"
                self.turns.wait(caller)
                raise Busy(f"{why}; your place in line is kept for {self.turns.kept_s:g} s: try again in a few seconds")
            self._running = True
            self.turns.started(caller)
        try:
            t0 = time.monotonic()
            model = load_model_size(body.model)
            settings = ReplaySettings.for_model(model, body.kv_dtype, prefill_tokens_per_s=body.prefill_tokens_per_s)
            limits = TraceLimits(max_requests=PLAN_MAX_REQUESTS, max_units=PLAN_MAX_UNITS)
            trace = load_trace(body.trace.splitlines(), self._tokenizer, body.block_size, limits)
            try:
                rows = plan(trace, parse_budgets(body.budgets), parse_policies(body.policies), settings, progress, deadline=t0 + self.time_limit_s)
            except ReplayTimeout as exc:
                raise ValueError(f"{exc} (the limit here is {self.time_limit_s:g} s)") from None
            return PlanResult(model, body.kv_dtype, settings.kv_bytes_per_token, trace.kind, len(trace.requests), rows, time.monotonic() - t0)
        finally:
            with self._lock:
                self._running = False


# ---------------------------------------------------------------------- gradio_client (the page's tab: ui/tabs_planner.py)


def plan_api(planner: Planner, address_of: Callable[[Any], str]) -> Callable[..., dict]:
    """The gradio_client ``/plan`` function (register with ``gr.api(..., api_name="plan")``)."""

    def plan_endpoint(
        trace: str,
        model: str = DEFAULT_MODEL_CONFIG,
        kv_dtype: str = "bf16",
        budgets: str = "auto",
        policies: str = "lru",
        block_size: int = DEFAULT_BLOCK_SIZE,
        prefill_tokens_per_s: float = DEFAULT_PREFILL_TOKENS_PER_S,
        request: gr.Request = None,
    ) -> dict:
        """Replay a JSONL trace (text) through the prefix cache at each memory budget and eviction policy.

        Args:
            trace: the JSONL trace, one request per line (chat messages, prompts, token ids or a Mooncake block trace).
            model: a shipped model config, whose KV bytes per token size the cache.
            kv_dtype: the KV storage dtype (bf16, fp16, fp32, ...).
            budgets: comma-separated sizes (512MiB,4GiB,inf) or "auto".
            policies: comma-separated eviction policies (lru,lfu,fifo,mru).
            block_size: tokens per hash id of a block trace.
            prefill_tokens_per_s: the prefill speed that turns reused tokens into seconds saved.
        Returns:
            dict with model, kv_dtype, kv_bytes_per_token, trace_kind, requests, seconds, knee (the smallest budget within reach of an unbounded cache, per policy) and rows (one per policy and budget: hit rates, reused tokens, peak bytes, evictions, prefill seconds saved).
        """
        raw = dict(trace=trace, model=model, kv_dtype=kv_dtype, budgets=budgets, policies=policies, block_size=block_size, prefill_tokens_per_s=prefill_tokens_per_s)
        return gradio_call(planner, lambda: raw, address_of(request)).to_dict()

    return plan_endpoint


def gradio_call(planner: Planner, fields: Callable[[], dict], caller: str, progress: Callable[[int, int], None] | None = None) -> PlanResult:
    """A page or gradio_client plan: bad input, a busy server or a loading model become a gr.Error with the message."""
    try:
        return planner.run(parse_plan(fields()), progress, caller)
    except (ValueError, Busy, NotReady) as exc:
        raise gr.Error(str(exc)) from None
