"""The backend seam (backends/): the app measuring a remote OpenAI-compatible server, end to end.

A second instance of this app (the tiny model) is the remote; the app under test runs with
``--backend <its URL>`` and loads no model. Real HTTP and real event streams on both hops: the
same greedy text as the remote's own local engine, cached tokens on a repeat, clearing through
the backend, and what a remote cannot do refused with the reason.
"""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import launch_app, stop_app

openai = pytest.importorskip("openai")


def system_prompt(tag: str) -> str:
    return f"Case {tag}. You are a careful assistant for a bookshop. " + "Answer briefly, politely and only about books. " * 4


@pytest.fixture(scope="module")
def remote(tmp_path_factory, tiny_model_folder):
    """The remote: this app, local engine, the tiny model, shared cache."""
    server = launch_app(tmp_path_factory.mktemp("remote"), "--model", str(tiny_model_folder))
    yield server
    stop_app(server)


@pytest.fixture(scope="module")
def remote_key(remote) -> str:
    return httpx.post(remote.url + "/session").json()["session_id"]


@pytest.fixture(scope="module")
def fronted(tmp_path_factory, remote, remote_key):
    """The app under test, measuring the remote through its /v1 API (kind detected, not named)."""
    server = launch_app(tmp_path_factory.mktemp("fronted"), "--backend", remote.url + "/v1", env_extra={"KVCI_BACKEND_API_KEY": remote_key})
    yield server
    stop_app(server)


def generate(url: str, **body) -> dict:
    response = httpx.post(url + "/generate", json={"max_new_tokens": 8, **body}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_health_names_the_remote_backend(fronted, remote):
    """/health says which backend is measured, what it can report, and that times are the client's."""
    health = httpx.get(fronted.url + "/health").json()
    backend = health["backend"]
    assert backend["kind"] == "kvci" and backend["url"] == remote.url and backend["timings"] == "client"
    assert backend["model"] == httpx.get(remote.url + "/v1/models").json()["data"][0]["id"]
    assert backend["capabilities"]["kv_cache_off"]["available"] is False
    assert backend["capabilities"]["prefix_cache_off"]["available"] is True


def test_remote_greedy_text_equals_the_local_engine_and_a_repeat_is_cached(fronted, remote):
    """Through the backend: the remote's own greedy text; the repeat reports the reused prompt tokens."""
    system = system_prompt("equal")
    local = generate(remote.url, prompt="Name one novel.", system_prompt=system, use_prefix_cache=False)
    first = generate(fronted.url, prompt="Name one novel.", system_prompt=system)
    second = generate(fronted.url, prompt="Name one novel.", system_prompt=system)
    assert first["text"] == local["text"] == second["text"]
    assert first["cache_status"] == "miss" and first["timings"]["prefix_tokens_saved"] == 0
    assert second["cache_status"] == "hit" and second["timings"]["prefix_tokens_saved"] == second["timings"]["prompt_tokens"] == local["timings"]["prompt_tokens"]
    assert second["timings"]["wall_ttft_ms"] > 0 and second["timings"]["total_ms"] >= second["timings"]["wall_ttft_ms"]


def test_prefix_cache_off_on_the_remote_uses_a_fresh_salt(fronted):
    """"Prefix cache off" on a remote that takes cache_salt: a fresh salt per request, so nothing hits."""
    system = system_prompt("off")
    generate(fronted.url, prompt="Hi", system_prompt=system)
    off = generate(fronted.url, prompt="Hi", system_prompt=system, use_prefix_cache=False)
    assert off["cache_status"] == "off" and off["timings"]["prefix_tokens_saved"] == 0


def test_kv_cache_off_is_refused_with_the_reason(fronted):
    """The KV cache is local-only: a remote request without it is a 400 that says so."""
    response = httpx.post(fronted.url + "/generate", json={"prompt": "Hi", "use_cache": False, "use_prefix_cache": False}, timeout=60)
    assert response.status_code == 400 and "local-only" in response.json()["detail"]


def test_openai_client_through_two_hops_and_streaming(fronted, remote):
    """The /v1 API of the fronting app serves the remote's text, streamed and not."""
    model = httpx.get(fronted.url + "/v1/models").json()["data"][0]["id"]
    key = httpx.post(fronted.url + "/session").json()["session_id"]  # the openai client insists on a key
    with openai.OpenAI(base_url=fronted.url + "/v1", api_key=key, max_retries=0, timeout=120) as client:
        messages = [{"role": "system", "content": system_prompt("hops")}, {"role": "user", "content": "Hello"}]
        whole = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0)
        chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == chunks[-1].usage.prompt_tokens > 0


def test_stats_and_clear_go_through_the_backend(fronted, remote):
    """Stats count what the remote reported; clearing the fronting app clears the remote (local, shared mode)."""
    system = system_prompt("clear")
    generate(fronted.url, prompt="Hi", system_prompt=system)
    generate(fronted.url, prompt="Hi", system_prompt=system)
    stats = httpx.get(fronted.url + "/cache/stats").json()
    assert stats["hits"] >= 1 and stats["server"]["source"] == "GET /cache/stats"
    assert httpx.get(remote.url + "/cache/stats").json()["cache_size"] > 0
    cleared = httpx.post(fronted.url + "/cache/clear").json()
    assert cleared["cleared"] == "all", cleared
    assert httpx.get(remote.url + "/cache/stats").json()["cache_size"] == 0
    assert generate(fronted.url, prompt="Hi", system_prompt=system)["cache_status"] == "miss"


def test_repetition_penalty_is_forwarded_and_the_ngram_ban_refused(fronted, remote):
    """A remote applies repetition_penalty itself (our /v1 takes the field); no_repeat_ngram_size has no OpenAI field: a 400 naming it.

    (The tiny random remote does not repeat itself, so the penalty leaves its text as it is: this checks the field's way, not its effect.)
    """
    system = system_prompt("penalty")
    local = generate(remote.url, prompt="Name one novel.", system_prompt=system, repetition_penalty=1.5, max_new_tokens=12, use_prefix_cache=False)
    assert generate(fronted.url, prompt="Name one novel.", system_prompt=system, repetition_penalty=1.5, max_new_tokens=12)["text"] == local["text"]
    refused = httpx.post(fronted.url + "/generate", json={"prompt": "Hi", "no_repeat_ngram_size": 3}, timeout=60)
    assert refused.status_code == 400 and "no_repeat_ngram_size" in refused.json()["detail"]


# ---------------------------------------------------------------------- per-engine parsing, on bodies from the engines' own docs and code

from backends import CAPABILITY_NAMES  # noqa: E402
from backends.remote import ADAPTERS, RemoteBackend, detect_kind, prometheus_values  # noqa: E402


class _Answer:
    def __init__(self, status_code: int, text: str) -> None:
        self.status_code, self.text = status_code, text


# vllm/entrypoints/openai/protocol.py: UsageInfo.prompt_tokens_details defaults to None, so with
# --enable-prompt-tokens-details a miss may come without it; ModelCard.owned_by = "vllm".
VLLM_USAGE_HIT = {"prompt_tokens": 1000, "total_tokens": 1005, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 992}}
VLLM_USAGE_MISS = {"prompt_tokens": 1000, "total_tokens": 1005, "completion_tokens": 5, "prompt_tokens_details": None}
# vllm/v1/metrics/loggers.py declares Counter("vllm:prefix_cache_queries") and ("vllm:prefix_cache_hits"),
# in tokens, labelled model_name and engine; prometheus_client exposes a counter with "_total".
VLLM_METRICS = """# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="Qwen/Qwen3-0.6B"} 2040.0
vllm:prefix_cache_queries_total{engine="1",model_name="Qwen/Qwen3-0.6B"} 960.0
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="Qwen/Qwen3-0.6B"} 2000.0
vllm:prefix_cache_hits_total{engine="1",model_name="Qwen/Qwen3-0.6B"} 400.0
"""
# SGLang docs, references/production_metrics.md, "Here is an example of the metrics" (excerpt).
SGLANG_METRICS = """# HELP sglang:token_usage The token usage
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.28
# HELP sglang:cache_hit_rate The cache hit rate
# TYPE sglang:cache_hit_rate gauge
sglang:cache_hit_rate{model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.007507552643049313
"""
# llama.cpp tools/server/README.md (the copy vendored in llama-cpp-python 0.3.36), "Timings and context usage".
LLAMA_SERVER_LAST_CHUNK = {
    "choices": [],
    "created": 1757141666,
    "id": "chatcmpl-ecQULm0WqPrftUqjPZO1CFYeDjGZNbDu",
    "timings": {
        "cache_n": 236, "prompt_n": 1, "prompt_ms": 30.958, "prompt_per_token_ms": 30.958, "prompt_per_second": 32.301828283480845,
        "predicted_n": 35, "predicted_ms": 661.064, "predicted_per_token_ms": 18.887542857142858, "predicted_per_second": 52.94494935437416,
    },
}
# The same README: GET /v1/models ("owned_by": "llamacpp") and the standard usage object it also sends.
LLAMA_SERVER_MODELS = {"object": "list", "data": [{"id": "../models/Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf", "object": "model", "created": 1735142223, "owned_by": "llamacpp"}]}
LLAMA_SERVER_USAGE = {"usage": {"completion_tokens": 48, "prompt_tokens": 44, "total_tokens": 92, "prompt_tokens_details": {"cached_tokens": 0}}}


def test_vllm_usage_cached_tokens_and_omitted_details_mean_zero():
    """vLLM: cached_tokens where sent; details left out (its default None) read as 0, not as unknown."""
    vllm = ADAPTERS["vllm"]()
    assert vllm.usage({"usage": VLLM_USAGE_HIT}).cached_tokens == 992
    assert vllm.usage({"usage": VLLM_USAGE_MISS}).cached_tokens == 0
    assert ADAPTERS["openai"]().usage({"usage": VLLM_USAGE_MISS}).cached_tokens is None  # a generic server: unknown


def test_vllm_prometheus_counters_summed_over_engines():
    """vLLM's prefix-cache counters from /metrics, summed over data-parallel engines."""
    values = prometheus_values(VLLM_METRICS)
    assert values["vllm:prefix_cache_queries_total"] == 3000.0 and values["vllm:prefix_cache_hits_total"] == 2400.0


def test_sglang_cache_hit_rate_gauge():
    """SGLang's documented /metrics example: the cache hit rate gauge."""
    assert prometheus_values(SGLANG_METRICS)["sglang:cache_hit_rate"] == pytest.approx(0.007507552643049313)


def test_llama_server_timings_give_cached_and_prompt_tokens():
    """llama-server: cache_n is the reused prompt tokens, cache_n + prompt_n the prompt; usage's 0 is overridden by timings."""
    adapter = ADAPTERS["llama-server"]()
    usage = adapter.usage(LLAMA_SERVER_LAST_CHUNK)
    assert (usage.cached_tokens, usage.prompt_tokens) == (236, 237)
    assert adapter.usage(LLAMA_SERVER_USAGE).cached_tokens == 0
    assert adapter.request_fields("ns", prefix_cache=False) == {"cache_prompt": False}


@pytest.mark.parametrize(
    "models, probes, kind",
    [
        (LLAMA_SERVER_MODELS, {}, "llama-server"),
        ({"data": [{"id": "m", "owned_by": "vllm"}]}, {}, "vllm"),
        ({"data": [{"id": "m", "owned_by": "sglang"}]}, {}, "sglang"),
        ({"data": [{"id": "m", "owned_by": "kv-cache-inference"}]}, {}, "kvci"),
        ({"data": [{"id": "m", "owned_by": "someone"}]}, {"/metrics": VLLM_METRICS}, "vllm"),
        ({"data": [{"id": "m", "owned_by": "someone"}]}, {"/metrics": SGLANG_METRICS}, "sglang"),
        ({"data": [{"id": "m", "owned_by": "someone"}]}, {"/props": '{"default_generation_settings": {}}'}, "llama-server"),
        ({"data": [{"id": "m", "owned_by": "openai"}]}, {}, "openai"),
    ],
)
def test_detect_the_engine_from_what_it_serves(models, probes, kind):
    """owned_by in /v1/models first (vllm, sglang, llamacpp, ours), then /props and /metrics."""
    assert detect_kind(models, lambda path: _Answer(200, probes[path]) if path in probes else None) == kind


def test_salts_and_capabilities_per_engine():
    """Prefix cache off: a fresh salt (vLLM, ours), cache_prompt false (llama-server), else disabled with a reason."""
    vllm, sglang = ADAPTERS["vllm"](), ADAPTERS["sglang"]()
    assert vllm.request_fields("ns", True) == vllm.request_fields("ns", True) and "cache_salt" in vllm.request_fields("ns", True)
    assert vllm.request_fields("ns", False) != vllm.request_fields("ns", False)
    assert sglang.request_fields("ns", False) == {} and not sglang.capabilities()["prefix_cache_off"].available
    for adapter in ADAPTERS.values():
        caps = adapter().capabilities()
        assert not caps["kv_cache_off"].available and not caps["running"].available  # a server shows no running requests: the inspector says why
        assert all(c.note for c in caps.values()) and set(caps) == set(CAPABILITY_NAMES)
    assert RemoteBackend("http://127.0.0.1:9").running(lambda namespace: True) == []
