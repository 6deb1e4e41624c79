"""The server's limits on requests: one set, used by every entry point (page, gradio_client, REST).

These are serving caps, not the model's: the engine still checks its context window and
``max_prompt_tokens`` (a prompt whose tokens do not fit is its ``ValueError``, answered 400).
Sampling bounds live with the sampler (``engine.sampling``) so the engine checks the same ones.
"""

from __future__ import annotations

MAX_NEW_TOKENS = 512  # a serving cap: a 2-core CPU decodes 35-65 tokens/s (int4 step), 512 tokens take 10-15 s
DEFAULT_MAX_NEW_TOKENS = 64  # POST /generate without max_new_tokens (/v1 without max_tokens gets MAX_NEW_TOKENS, as OpenAI gives "all")
MAX_HISTORY_TURNS = 256  # earlier turns of one /v1 chat request (the engine still checks the context window)
MAX_STOP_STRINGS, MAX_STOP_CHARS = 4, 64  # /v1 "stop", as OpenAI allows
MAX_PROMPT_CHARS = 32_000  # about SmolLM2's 8k-token context window; longer text cannot fit anyway
MAX_BODY_BYTES = 256 * 1024  # any larger request body (REST or /gradio_api) gets 413 before it is parsed
BODY_MEMORY_BYTES = 128 * 2**20  # request bodies held in memory at once, all requests together (beyond: 503)
BODY_MEMORY_PER_ADDRESS_BYTES = 16 * 2**20  # ... and those of one address
HEADER_READ_TIMEOUT_S = 10  # a request's headers must be complete this long after the connection (or the last response)
BODY_READ_GRACE_S = 10  # a request body must be complete within this ...
BODY_MIN_BYTES_PER_S = 64 * 1024  # ... plus its length at this rate (a 2 MiB trace: 42 s)
RETRY_AFTER_S = 5  # what a 503 (busy) asks the client to wait
RETRY_AFTER = {"Retry-After": str(RETRY_AFTER_S)}  # the header of every busy or loading refusal
MAX_CHART_RECORDS = 200  # a page session's chart history keeps the newest this many requests
SESSION_STATE_TTL_S = 3600  # a page session's gr.State is dropped this long after its last change

# The workload planner (ui/planner.py): an uploaded trace is bounded in bytes, requests, tokens and time.
PLAN_MAX_TRACE_BYTES = 2 * 1024 * 1024  # the trace text (UTF-8) of one plan
PLAN_MAX_BODY_BYTES = PLAN_MAX_TRACE_BYTES + 64 * 1024  # POST /plan and page uploads: the trace plus JSON or multipart framing
PLAN_MAX_REQUESTS = 20_000
PLAN_MAX_UNITS = 2_000_000  # tokens (or blocks of a block trace) over all requests
PLAN_MAX_BUDGETS = 12
PLAN_TIME_LIMIT_S = 60.0  # a replay still running after this stops with an error
PLAN_TURN_KEPT_S = 30.0  # a caller refused while another's plan ran keeps its place in line this long after its last try
UPLOAD_BUDGET_MB = 512  # trace uploads (/gradio_api/upload) all addresses may have on disk: Gradio keeps each until its sweep
UPLOAD_KEPT_MIN = 15  # an upload is deleted this long after it was written (gr.Blocks delete_cache), checked every third of it
UPLOAD_ADDRESS_SHARE = 1 / 16  # of that budget, what one address may fill (at least one whole trace)
UPLOAD_MIN_CHARGE_BYTES = 4096  # an upload counts at least this much
UPLOAD_FILE_CHARGE_BYTES = 8192  # and each file in it this much beside its bytes: Gradio writes a folder and a file, a block each
# Gradio's page sessions and events (ui/security.Guard): each new session_hash costs Gradio a page state
# (16,000 cheap joins with fresh hashes grew the process by 1.7 GiB, ~110 KiB each), so they are rate limited per address.
NEW_PAGE_SESSIONS_PER_S = 2.0  # new Gradio session hashes one address may open, a second, after ...
NEW_PAGE_SESSION_BURST = 256  # ... this many at once (a NAT of many browsers, a test suite)
EVENT_CALLS_PER_S = 20.0  # page events (queue/join, run/predict, call/*) one address may call, a second, after ...
EVENT_CALL_BURST = 200  # ... this many at once
MAX_BOUND_KEYS = 50_000  # session hashes, event ids and upload paths the guard remembers an owner for (each table)
MAX_FILES_PER_UPLOAD = 4  # files in one multipart upload (the page sends one trace)
MAX_PIN_TTL_S = 24 * 3600  # a pin lasts at most a day without a hit (per-session mode: also the default)

# The page's generation defaults. Its repetition control is picked by measurement on the page's own
# examples and scenarios (benchmark/repetition_bench.py): plain greedy SmolLM2-135M loops. The engine's
# own default stays plain greedy (penalty 1, no ban), and so do REST, gradio_client and /v1.
PAGE_MAX_NEW_TOKENS = 48
PAGE_REPETITION_PENALTY = 1.2  # removed every repeated 4-gram and loop at 48 and 128 tokens; 1.1 left some
PAGE_NO_REPEAT_NGRAM_SIZE = 0
