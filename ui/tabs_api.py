"""The "API" tab and the gradio_client endpoints it documents: /generate, /cache_stats, /clear_cache, /warm_cache, /unpin_cache, /plan.

Each endpoint's docstring (Args, Returns) is what Gradio's "Use via API" page shows, so it names
every parameter and the shape of the answer. Every call takes its session from its headers
(``ui.sessions``) and its body through ``ui.schemas.parse_body``, as the page and REST do.
"""

from __future__ import annotations

import inspect
from typing import Callable

import gradio as gr
from gradio import utils
from gradio.context import get_blocks_context

from ui.page_context import PageContext, ui_errors
from ui.planner import plan_api
from ui.schemas import UnpinBody, WarmBody, parse_body
from ui.sessions import ID_RULE, SESSION_HEADER

CLIENT_SNIPPET = '''```python
import httpx
from gradio_client import Client

url = "{url}"
session = httpx.post(url + "/session").json()["session_id"]  # one namespace for all the calls below
client = Client(url, headers={{"Authorization": f"Bearer {{session}}"}})
first = client.predict("What is a KV cache?", "You are terse.", api_name="/generate")
again = client.predict("What is a KV cache?", "You are terse.", api_name="/generate")
print(first["cache_status"], again["cache_status"], again["timings"]["ttft_ms"])  # miss, then hit
print(client.predict(api_name="/cache_stats")["hit_rate"])
```'''


def build_api_tab(ctx: PageContext) -> None:
    """The tab; call inside ``gr.Tabs()``."""
    with gr.Tab("API", elem_id="kv-api-tab"):
        gr.Markdown(api_help(ctx.service.settings.cache_mode), elem_id="kv-api-help")


def api_help(cache_mode: str, url: str = "http://127.0.0.1:7860") -> str:
    return (
        "**REST** (same port): `POST /generate` with JSON "
        '`{"prompt": "...", "system_prompt": null, "max_new_tokens": 32, "use_cache": true, "use_prefix_cache": true, "temperature": 0}` '
        "(optional `top_p`, `seed`, `repetition_penalty`, `no_repeat_ngram_size`, `frequency_penalty`, `presence_penalty`) returns the engine's response; `GET /cache/stats`; `POST /cache/clear`; "
        '`POST /cache/warm` with `{"system_prompt": "...", "pin": true, "ttl_s": 600}` (or `"messages": [...]`) prefills and pins; `POST /cache/save` writes the cache to `--cache-dir` (local servers); '
        "`POST /cache/unpin` with the same `system_prompt` or `messages` drops the pin; `POST /plan` replays a trace; "
        "`GET /health`; schema at `/docs`. OpenAI-compatible: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.\n\n"
        "**Sessions.** To keep a session (and its cache) across calls, get an id from `POST /session` and send it as "
        f"`Authorization: Bearer <id>` or `{SESSION_HEADER}: <id>` (or choose one: {ID_RULE.split(' (')[0]}). "
        "Without one, each call is a session of its own, and in per-session mode (a Space's default) it never hits.\n\n"
        "**gradio_client**: endpoints `/generate`, `/cache_stats`, `/clear_cache`, `/warm_cache`, `/unpin_cache`, `/plan` "
        "(parameters and answers under \"Use via API\" at the foot of the page):\n\n" + CLIENT_SNIPPET.format(url=url) + "\n\n"
        f"Cache mode: **{cache_mode}**. In per-session mode each session gets its own namespace: identical "
        "prompts from two sessions never hit each other, and stats, the inspector and clearing only ever see your own."
    )


def register_client_api(ctx: PageContext) -> None:
    """Register the named endpoints; call inside ``gr.Blocks``."""
    stats, clear, warm, unpin = _cache_endpoints(ctx)
    for fn, name, limit in (
        (_generate_endpoint(ctx), "generate", "default"),
        (warm, "warm_cache", "default"),
        (unpin, "unpin_cache", "default"),
        (stats, "cache_stats", None),
        (clear, "clear_cache", None),
        (plan_api(ctx.planner, ctx.issuer.request_address), "plan", 1),  # ui/planner.py: a workload replay, no model work
    ):
        gr.api(fn, api_name=name, concurrency_limit=limit)
        document(fn, name)


def document(fn: Callable, api_name: str) -> None:
    """Give the endpoint's Api components the names and words of ``fn``'s docstring (Args, Returns).

    ``gr.api`` labels them "1st", "2nd" and reads no parameter descriptions, so the "Use via API"
    page said "value provided in the '1st' Api component", and "Any" for a dict answer.
    """
    block_fn = next(f for f in get_blocks_context().fns.values() if f.api_name == api_name)
    _, described, returns = utils.get_function_description(fn)
    for component, name in zip(block_fn.inputs, [p for p in inspect.signature(fn).parameters if p != "request"]):
        component.label = name
        component._api_info = {**component._api_info, "additional_description": described.get(name, "")}
    for component in block_fn.outputs:
        component.label = "answer"
        component._api_info = {"type": "object", "description": " ".join(returns).strip()}


def _generate_endpoint(ctx: PageContext):
    service = ctx.service

    async def api_generate(
        prompt: str,
        system_prompt: str | None = None,
        max_new_tokens: int = 64,
        use_cache: bool = True,
        use_prefix_cache: bool = True,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        verify: bool = False,
        repetition_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        request: gr.Request = None,
    ) -> dict:
        """Generate a reply and report where its time went and what came from the prefix cache.

        Args:
            prompt: the user's message (at least one character).
            system_prompt: an optional system prompt; a long one shared by several calls is what the prefix cache saves.
            max_new_tokens: tokens to generate at most.
            use_cache: keep keys and values while decoding (false: every step re-runs the whole sequence).
            use_prefix_cache: reuse keys and values cached by earlier calls of this session (or of everyone, in shared mode).
            temperature: 0 is greedy.
            top_p: nucleus sampling threshold (1 is off).
            seed: the sampling seed, for a reproducible sampled reply.
            verify: also run reusing nothing from the prefix cache and compare tokens and first-token logits bit for bit.
            repetition_penalty: 1 is off; above 1 discounts tokens the reply already used.
            no_repeat_ngram_size: 0 is off; n: never the same n tokens twice.
            frequency_penalty: OpenAI-style, subtracted per earlier use of a token.
            presence_penalty: OpenAI-style, subtracted once for a token already used.
        Returns:
            dict with text, token_ids, prompt_token_ids, cache_status (hit, partial, miss, skipped, off), use_cache, use_prefix_cache, finish_reason, timings (ttft_ms, wall_ttft_ms, prefill_ms, decode_ms, total_ms, decode_tokens_per_sec, prompt_tokens, prefill_tokens, prefix_tokens_saved, new_tokens, ...), cache_explanation, and verification when asked.
        """
        raw = dict(
            prompt=prompt, system_prompt=system_prompt, max_new_tokens=max_new_tokens, use_cache=use_cache, use_prefix_cache=use_prefix_cache,
            temperature=temperature, top_p=top_p, seed=seed, verify=verify, repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
            frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
        )
        session = ctx.session_of(request)
        with ui_errors():
            job = service.stream(session, **parse_body(raw).engine_kwargs())
            return (await job.aresult()).to_dict()  # the client's job.cancel() cancels this task, and the job

    return api_generate


def _cache_endpoints(ctx: PageContext) -> tuple:
    service = ctx.service

    def api_cache_stats(request: gr.Request = None) -> dict:
        """Prefix-cache statistics for this client's scope (its own namespace in per-session mode).

        Returns:
            dict with cache_size (entries), cached_tokens, cached_bytes, budget_bytes, hits, partial_hits, misses, hit_rate (0-1), tokens_saved, evictions, pins, pinned_bytes, pin_budget_bytes, scope and cache_mode.
        """
        with ui_errors():
            return service.stats(ctx.session_of(request))

    def api_clear_cache(request: gr.Request = None) -> dict:
        """Clear this client's namespace (or the whole cache, for a local shared-mode app).

        Returns:
            dict with cleared ("everything", "namespace" or "nothing") and a message.
        """
        with ui_errors():
            return service.clear(ctx.session_of(request))

    def api_warm_cache(system_prompt: str | None = None, messages: list | None = None, pin: bool = False, ttl_s: float | None = None, request: gr.Request = None) -> dict:
        """Prefill a system prompt or a list of messages into this client's namespace; pin it (within the pin budget) if asked.

        Args:
            system_prompt: the system prompt to prefill (or give messages).
            messages: chat messages [{"role": ..., "content": ...}] to prefill instead.
            pin: keep it from eviction, within the pin budget.
            ttl_s: with pin, drop the pin after this many seconds without a hit.
        Returns:
            dict with tokens, prefilled, reused, pinned, pinned_bytes and expires_in_s.
        """
        session = ctx.session_of(request)
        with ui_errors():
            body = parse_body(dict(system_prompt=system_prompt, messages=messages, pin=pin, ttl_s=ttl_s), WarmBody)
            return service.warm(session, body.message_dicts(), pin=body.pin, ttl_s=body.ttl_s)

    def api_unpin_cache(system_prompt: str | None = None, messages: list | None = None, request: gr.Request = None) -> dict:
        """Drop the pin of a system prompt or messages in this client's own namespace.

        Args:
            system_prompt: the pinned system prompt (or give messages).
            messages: the pinned chat messages.
        Returns:
            dict with unpinned (false when there was no such pin) and a message.
        """
        session = ctx.session_of(request)
        with ui_errors():
            body = parse_body(dict(system_prompt=system_prompt, messages=messages), UnpinBody)
            return service.unpin(session, body.message_dicts())

    return api_cache_stats, api_clear_cache, api_warm_cache, api_unpin_cache
