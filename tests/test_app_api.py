"""The app's API on one port, as scripts use it: gradio_client endpoints and plain REST, good and bad input.

Runs against `python app.py` in shared mode (the local default), launched once per session by the
`app_server` fixture in conftest.py. Every test uses its own system prompt, so tests do not hit
each other's cache entries.
"""

from __future__ import annotations

import json
import math
import uuid

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ui.limits import MAX_BODY_BYTES, MAX_NEW_TOKENS


def long_system_prompt() -> str:
    """A system prompt of ~80 tokens, unique per call: the first request with it is a miss."""
    return f"Session {uuid.uuid4().hex}. You are a careful assistant for a bookshop. " + "Answer briefly, politely and only about books. " * 6


def body(**overrides) -> dict:
    return {"prompt": "What is a KV cache?", "max_new_tokens": 8, "use_cache": True, "use_prefix_cache": True, **overrides}


VALID = body(prompt="Name one famous novel, please.", system_prompt="You are a helpful assistant that answers about books in one short line.", max_new_tokens=1)


@pytest.fixture(scope="module")
def client(app_server):
    gradio_client = pytest.importorskip("gradio_client")
    return gradio_client.Client(app_server.url, verbose=False)


# ---------------------------------------------------------------------- gradio_client


def test_gradio_client_second_identical_request_is_a_hit_with_the_same_text(client):
    """The acceptance path for scripts: a repeated long system prompt is served from the prefix cache."""
    system = long_system_prompt()
    first = client.predict("What is a KV cache?", system, 8, api_name="/generate")
    second = client.predict("What is a KV cache?", system, 8, api_name="/generate")
    assert first["cache_status"] == "miss"
    assert second["cache_status"] == "hit" and second["prefix_cache_hit"] is True
    assert second["timings"]["prefill_tokens"] == 0
    assert second["text"] == first["text"] and second["token_ids"] == first["token_ids"]

    stats = client.predict(api_name="/cache_stats")
    assert stats["hits"] >= 1 and stats["cache_size"] >= 1 and stats["cache_mode"] == "shared"
    assert stats["hits"] + stats["partial_hits"] + stats["misses"] == stats["total_requests"]
    assert client.predict(api_name="/clear_cache")["cleared"] == "all"
    cleared = client.predict(api_name="/cache_stats")
    assert cleared["cache_size"] == 0 and cleared["total_requests"] == 0


def test_gradio_client_sees_only_the_named_endpoints(client):
    """UI events are private: only /generate, /cache_stats, /clear_cache, /warm_cache, /unpin_cache and /plan are callable by clients."""
    named = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert set(named) == {"/generate", "/cache_stats", "/clear_cache", "/warm_cache", "/unpin_cache", "/plan"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt="   "), "whitespace"),
        (dict(prompt=""), "at least 1 character"),
        (dict(prompt="hi", max_new_tokens=0), "greater than or equal to 1"),
        (dict(prompt="hi", max_new_tokens=10**9), f"less than or equal to {MAX_NEW_TOKENS}"),
        (dict(prompt="hi", temperature=-1.0), "temperature"),
        (dict(prompt="hi", repetition_penalty=0.5), "repetition_penalty"),
        (dict(prompt="hi", no_repeat_ngram_size=10**6), "no_repeat_ngram_size"),
        (dict(prompt="hi", no_repeat_ngram_size=True), "no_repeat_ngram_size"),
        (dict(prompt="hi", use_cache=False, use_prefix_cache=True), "needs use_cache=True"),
        (dict(prompt="x " * 9000, max_new_tokens=8), "context window"),
    ],
)
def test_gradio_client_bad_input_is_an_error_with_the_message(client, kwargs, message):
    """Bad input through gradio_client raises with a message that says what is wrong; the app keeps serving."""
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message):
        client.predict(**kwargs, api_name="/generate")


# ---------------------------------------------------------------------- REST


def test_rest_generate_twice_is_a_hit_then_stats_and_clear(rest):
    """POST /generate returns the engine's body; the repeat is an exact hit; stats count it; clear empties."""
    request = body(system_prompt=long_system_prompt())
    first = rest.post("/generate", json=request)
    second = rest.post("/generate", json=request)
    assert first.status_code == 200 and second.status_code == 200, first.text
    first, second = first.json(), second.json()
    assert set(first) >= {"text", "token_ids", "latency_ms", "tokens_per_sec", "cache_status", "prefix_cache_hit", "finish_reason", "timings"}
    assert (first["cache_status"], second["cache_status"]) == ("miss", "hit")
    assert second["timings"]["prefill_tokens"] == 0 and second["text"] == first["text"]

    stats = rest.get("/cache/stats").json()
    assert stats["hits"] >= 1 and stats["cached_bytes"] > 0
    assert rest.post("/cache/clear").json()["cleared"] == "all"
    assert rest.get("/cache/stats").json()["cache_size"] == 0


def test_rest_defaults_make_a_prompt_alone_enough(rest):
    """{"prompt": ...} alone works: max_new_tokens 64, KV cache and prefix cache on by default."""
    response = rest.post("/generate", json={"prompt": "Say hi.", "system_prompt": long_system_prompt()})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["cache_enabled"] and result["prefix_cache_enabled"] and 1 <= result["timings"]["new_tokens"] <= 64


def test_rest_partial_hit_reuses_the_shared_system_prompt(rest):
    """A new question after the same long system prompt reuses the prefix: a partial hit."""
    system = long_system_prompt()
    rest.post("/generate", json=body(system_prompt=system, max_new_tokens=2)).raise_for_status()
    second = rest.post("/generate", json=body(system_prompt=system, prompt="Which book should I read next?", max_new_tokens=2)).json()
    assert second["cache_status"] == "partial"
    assert 0 < second["timings"]["prefix_tokens_saved"] < second["timings"]["prompt_tokens"]


def _big(chars: int) -> bytes:
    return json.dumps(body(prompt="a" * chars)).encode()


# (name, raw body or JSON-able value, expected status, a phrase the message must contain)
BAD_BODIES = [
    ("empty prompt", body(prompt=""), 422, "prompt"),
    ("whitespace prompt", body(prompt=" \n\t "), 422, "whitespace"),
    ("prompt not a string", body(prompt=123), 422, "valid string"),
    ("prompt is null", body(prompt=None), 422, "prompt"),
    ("missing prompt", {k: v for k, v in body().items() if k != "prompt"}, 422, "prompt: this field is required"),
    ("unknown field", body(stream=True), 422, "unknown field"),
    ("negative max_new_tokens", body(max_new_tokens=-5), 422, "max_new_tokens"),
    ("zero max_new_tokens", body(max_new_tokens=0), 422, "greater than or equal to 1"),
    ("enormous max_new_tokens", body(max_new_tokens=10**12), 422, "less than or equal to"),
    ("max_new_tokens as a string", body(max_new_tokens="8"), 422, "valid integer"),
    ("max_new_tokens as a float", body(max_new_tokens=8.5), 422, "valid integer"),
    ("use_cache as a string", body(use_cache="yes"), 422, "use_cache"),
    ("negative temperature", body(temperature=-0.5), 422, "temperature"),
    ("NaN temperature", b'{"prompt": "hi", "max_new_tokens": 4, "use_cache": true, "use_prefix_cache": true, "temperature": NaN}', 422, "finite number"),
    ("infinite top_p", b'{"prompt": "hi", "max_new_tokens": 4, "use_cache": true, "use_prefix_cache": true, "top_p": Infinity}', 422, "top_p"),
    ("NaN repetition_penalty", b'{"prompt": "hi", "max_new_tokens": 4, "repetition_penalty": NaN}', 422, "repetition_penalty: Input should be a finite number"),
    ("infinite repetition_penalty", b'{"prompt": "hi", "max_new_tokens": 4, "repetition_penalty": Infinity}', 422, "repetition_penalty"),
    ("negative repetition_penalty", body(repetition_penalty=-1.2), 422, "repetition_penalty: Input should be greater than or equal to 1"),
    ("huge repetition_penalty", body(repetition_penalty=1e308), 422, "repetition_penalty: Input should be less than or equal to 2"),
    ("repetition_penalty as a string", body(repetition_penalty="1.2"), 422, "repetition_penalty: Input should be a valid number"),
    ("repetition_penalty as a boolean", body(repetition_penalty=True), 422, "repetition_penalty: Input should be a valid number"),
    ("negative no_repeat_ngram_size", body(no_repeat_ngram_size=-3), 422, "no_repeat_ngram_size: Input should be greater than or equal to 0"),
    ("huge no_repeat_ngram_size", body(no_repeat_ngram_size=2**62), 422, "no_repeat_ngram_size: Input should be less than or equal to 16"),
    ("no_repeat_ngram_size as a float", body(no_repeat_ngram_size=3.0), 422, "no_repeat_ngram_size: Input should be a valid integer"),
    ("no_repeat_ngram_size as a boolean", body(no_repeat_ngram_size=True), 422, "no_repeat_ngram_size: Input should be a valid integer"),
    ("NaN frequency_penalty", b'{"prompt": "hi", "max_new_tokens": 4, "frequency_penalty": NaN}', 422, "frequency_penalty: Input should be a finite number"),
    ("huge presence_penalty", body(presence_penalty=1e9), 422, "presence_penalty: Input should be less than or equal to 2"),
    ("prefix cache without KV cache", body(use_cache=False, use_prefix_cache=True), 400, "needs use_cache=True"),
    ("prompt beyond the context window", body(prompt="x " * 9000), 400, "context window"),
    ("prompt over the character cap", _big(40_000), 422, "at most 32000 characters"),
    ("megabytes of text", _big(3 * 1024 * 1024), 413, "over the limit"),
    ("invalid UTF-8", b'{"prompt": "caf\xe9 \xff", "max_new_tokens": 4, "use_cache": true, "use_prefix_cache": true}', 422, "UTF-8"),
    ("NUL control character", body(prompt="hello\x00world"), 422, "control character U+0000"),
    ("escape control character", body(prompt="hi \x1b[31m red"), 422, "control character U+001B"),
    ("lone surrogate escape", b'{"prompt": "\\ud800", "max_new_tokens": 4, "use_cache": true, "use_prefix_cache": true}', 422, "JSON"),
    ("malformed JSON", b'{"prompt": "hi", ', 422, "not valid JSON"),
    ("empty body", b"", 422, "not valid JSON"),
    ("JSON array", b"[1, 2, 3]", 422, "object"),
    ("JSON string", b'"just a prompt"', 422, "object"),
]


@pytest.mark.parametrize("raw, status, phrase", [case[1:] for case in BAD_BODIES], ids=[case[0] for case in BAD_BODIES])
def test_rest_bad_body_is_a_readable_4xx_and_the_app_keeps_serving(rest, raw, status, phrase):
    """Hostile or malformed bodies get the right 4xx with a message naming the problem, never a 500 or a trace."""
    content = raw if isinstance(raw, bytes) else json.dumps(raw).encode()
    response = rest.post("/generate", content=content, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text[:500]
    detail = response.json()["detail"]
    assert isinstance(detail, str) and phrase in detail, detail[:500]
    assert "Traceback" not in response.text and 'File "' not in response.text
    assert len(response.content) < 4096, "the error echoes the input back"
    assert rest.post("/generate", json=VALID).status_code == 200


def test_rest_body_over_the_cap_is_refused_even_without_content_length(app_server):
    """A chunked upload cannot slip past the body cap by omitting Content-Length."""

    def chunks():
        yield b'{"prompt": "'
        for _ in range(MAX_BODY_BYTES // 65536 + 2):
            yield b"a" * 65536
        yield b'"}'

    response = httpx.post(app_server.url + "/generate", content=chunks(), headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 413 and "over the limit" in response.json()["detail"]


JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-(10**15), 10**15), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20), st.lists(st.integers(), max_size=3))
FUZZ_BODY = st.fixed_dictionaries(
    {},
    optional={
        "prompt": st.one_of(st.text(max_size=60), JSON_VALUES),
        "system_prompt": st.one_of(st.text(max_size=60), JSON_VALUES),
        "max_new_tokens": st.one_of(st.integers(-3, 3), JSON_VALUES),
        "use_cache": JSON_VALUES,
        "use_prefix_cache": JSON_VALUES,
        "temperature": st.one_of(st.floats(-1, 3), JSON_VALUES),
        "top_p": st.one_of(st.floats(-1, 2), JSON_VALUES),
        "seed": JSON_VALUES,
        "repetition_penalty": st.one_of(st.floats(0, 3), JSON_VALUES),
        "no_repeat_ngram_size": st.one_of(st.integers(-2, 20), JSON_VALUES),
        "extra": JSON_VALUES,
    },
)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(payload=FUZZ_BODY)
def test_rest_fuzzed_bodies_never_get_a_500(rest, payload):
    """Property: whatever the body, the answer is 200 or a 4xx with a string detail (max_new_tokens <= 3 keeps it fast)."""
    response = rest.post("/generate", content=json.dumps(payload, allow_nan=False).encode(), headers={"content-type": "application/json"})
    assert response.status_code < 500, response.text[:500]
    if response.status_code == 200:
        assert not math.isnan(response.json()["latency_ms"])
    else:
        assert 400 <= response.status_code < 500 and isinstance(response.json()["detail"], str)


def test_repetition_control_reaches_the_sampler_from_rest_and_gradio_client(rest, client):
    """no_repeat_ngram_size=1 bans every token already generated: a reply with no repeated token, where plain greedy repeats."""
    request = body(prompt="List the days of the week, one per line.", max_new_tokens=24)
    plain = rest.post("/generate", json=request).json()["token_ids"]
    assert len(set(plain)) < len(plain), "plain greedy repeated no token: the test cannot tell the ban from no ban"
    banned = rest.post("/generate", json=request | {"no_repeat_ngram_size": 1}).json()["token_ids"]
    assert len(set(banned)) == len(banned) and banned[0] == plain[0]
    through_client = client.predict(request["prompt"], None, 24, api_name="/generate", no_repeat_ngram_size=1)["token_ids"]
    assert through_client == banned


def test_health_says_which_model_and_mode(rest):
    """The page and scripts can tell which model, device, weight format, decode step state and cache mode are in use."""
    health = rest.get("/health").json()
    assert health["ready"] and health["model"] and health["device"] == "cpu" and health["cache_mode"] == "shared"
    assert health["kv_dtype"] == "float32"  # --kv-dtype auto: the fp32 model's own; the page's status line shows it
    assert health["weights"] == "int4 weights (Q4_1 blocks from the GGUF), prefill through the int4 decode step"  # auto on a CPU
    assert health["decode"] == {"state": "off", "description": "eager (KVCI_COMPILE=off)", "compile_seconds": None, "reason": "KVCI_COMPILE=off",
                                "elapsed_s": None, "expected_s": None, "inductor_cache": None}
    schema = rest.get("/openapi.json").json()  # the REST routes are documented (at /docs)
    assert {"/generate", "/cache/stats", "/cache/clear"} <= set(schema["paths"])
    assert "prompt" in schema["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
