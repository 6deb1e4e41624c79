"""The /v1 API (ui/openai_api.py) through the official openai package and raw HTTP event streams.

Runs against `python app.py` in shared mode (the `app_server` fixture, the bundled model), so the
same server answers REST, gradio_client and /v1: the tests check that /v1 is one more door to the
same engine, sessions and limits, with OpenAI's shapes.
"""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest

openai = pytest.importorskip("openai")


def system_prompt() -> str:
    """~80 tokens, unique per call: the first request with it is a miss."""
    return f"Session {uuid.uuid4().hex}. You are a careful assistant for a bookshop. " + "Answer briefly, politely and only about books. " * 6


@pytest.fixture(scope="module")
def session_id(app_server) -> str:
    return httpx.post(app_server.url + "/session").json()["session_id"]


@pytest.fixture(scope="module")
def client(app_server, session_id):
    with openai.OpenAI(base_url=app_server.url + "/v1", api_key=session_id, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def chat(system: str, question: str = "Name one famous novel.") -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def sse_events(response: httpx.Response) -> list:
    """The `data:` payloads of a real event stream, JSON-decoded ('[DONE]' kept as the string)."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


# ---------------------------------------------------------------------- responses


def test_models_lists_the_served_model(client, app_server):
    """GET /v1/models has OpenAI's list shape and names the model /health names."""
    models = client.models.list().data
    assert len(models) == 1 and models[0].object == "model"
    assert models[0].id == httpx.get(app_server.url + "/health").json()["model"]


def test_chat_repeat_reports_cached_tokens_and_equals_rest(client, model, app_server, session_id):
    """A repeated chat is an exact hit: cached_tokens = prompt_tokens, same greedy text as POST /generate."""
    system = system_prompt()
    first = client.chat.completions.create(model=model, messages=chat(system), max_tokens=6, temperature=0)
    second = client.chat.completions.create(model=model, messages=chat(system), max_tokens=6, temperature=0)
    assert first.object == "chat.completion" and first.id.startswith("chatcmpl-") and first.model == model
    assert first.choices[0].message.role == "assistant" and first.choices[0].finish_reason in ("stop", "length")
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens > 0
    assert second.usage.total_tokens == second.usage.prompt_tokens + second.usage.completion_tokens
    assert second.choices[0].message.content == first.choices[0].message.content
    extra = second.model_extra["kvci"]
    assert extra["cache_status"] == "hit" and extra["timings"]["prefill_tokens"] == 0
    assert extra["cache_explanation"]["reason"] == "hit"
    assert first.model_extra["kvci"]["cache_explanation"]["reason"] in ("cold", "diverged")

    rest = httpx.post(
        app_server.url + "/generate",
        json={"prompt": "Name one famous novel.", "system_prompt": system, "max_new_tokens": 6},
        headers={"Authorization": f"Bearer {session_id}"},
        timeout=120,
    ).json()
    assert rest["text"] == first.choices[0].message.content and rest["cache_status"] == "hit"


def test_multi_turn_messages_map_onto_history(client, model, app_server):
    """Earlier user/assistant turns are the engine's history: the same tokens as REST's multi-turn request."""
    system = system_prompt()
    messages = chat(system, "Hi") + [{"role": "assistant", "content": "Hello! Ask me about books."}, {"role": "user", "content": "Name a novel."}]
    single = client.chat.completions.create(model=model, messages=chat(system, "Name a novel."), max_tokens=4, temperature=0)
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0)
    assert reply.usage.prompt_tokens > single.usage.prompt_tokens  # the history is in the prompt
    assert reply.usage.prompt_tokens_details.cached_tokens > 0  # the system prompt of the earlier request


def test_streaming_chat_with_the_openai_client(client, model):
    """Streamed deltas join into the non-streamed text; the usage chunk comes last, with no choices."""
    system = system_prompt()
    whole = client.chat.completions.create(model=model, messages=chat(system), max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model=model, messages=chat(system), max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens_details.cached_tokens == chunks[-1].usage.prompt_tokens
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.usage is None for c in chunks[:-1])


def test_streaming_raw_event_stream_ends_with_done(app_server, model):
    """The wire format: `data: {...}` events, the usage chunk last when asked for, then `data: [DONE]`."""
    body = {"model": model, "messages": chat(system_prompt()), "max_tokens": 4, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", app_server.url + "/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["object"] == "chat.completion.chunk" and usage_chunk["choices"] == []
    assert set(usage_chunk["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details"}
    assert "timings" in usage_chunk["kvci"]
    assert len({e["id"] for e in events[:-1]}) == 1


def test_streaming_without_usage_sends_no_usage(app_server, model):
    """Without include_usage no chunk carries usage; our extras ride on the finish chunk."""
    body = {"model": model, "messages": chat(system_prompt()), "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", app_server.url + "/v1/chat/completions", json=body, timeout=120) as response:
        events = sse_events(response)
    assert events[-1] == "[DONE]" and all("usage" not in e for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length") and "kvci" in events[-2]


def test_completions_raw_prompt_with_stop(client, model):
    """/v1/completions feeds the prompt without the chat template; a stop string ends the text before it."""
    free = client.completions.create(model=model, prompt="The capital of France is", max_tokens=6, temperature=0)
    assert free.object == "text_completion" and free.choices[0].text
    cut_at = free.choices[0].text.strip()[:2][-1]
    stopped = client.completions.create(model=model, prompt="The capital of France is", max_tokens=6, temperature=0, stop=[cut_at])
    assert cut_at not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"
    assert free.choices[0].text.startswith(stopped.choices[0].text)
    streamed = client.completions.create(model=model, prompt="The capital of France is", max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == free.choices[0].text


def test_seeded_sampling_repeats(client, model):
    """temperature, top_p and seed reach the sampler: the same seed gives the same sample."""
    kwargs = dict(model=model, messages=chat(system_prompt()), max_tokens=6, temperature=1.2, top_p=0.95, seed=7, user="tester")
    assert client.chat.completions.create(**kwargs).choices[0].message.content == client.chat.completions.create(**kwargs).choices[0].message.content


def test_repetition_control_as_extra_body_fields(client, model, app_server):
    """repetition_penalty and no_repeat_ngram_size (vLLM-style extra fields) and OpenAI's frequency and presence penalties reach the sampler, as REST's do."""
    kwargs = dict(model=model, messages=[{"role": "user", "content": "List the days of the week, one per line."}], max_tokens=24, temperature=0)
    body = kwargs | {"extra_body": {"no_repeat_ngram_size": 1}}
    banned = client.chat.completions.create(**body).model_dump()
    rest = httpx.post(app_server.url + "/generate", json={"prompt": kwargs["messages"][0]["content"], "max_new_tokens": 24, "no_repeat_ngram_size": 1}, timeout=120).json()
    assert banned["choices"][0]["message"]["content"] == rest["text"] and len(set(rest["token_ids"])) == len(rest["token_ids"])
    penalised = client.chat.completions.create(**kwargs | {"extra_body": {"repetition_penalty": 1.3}}).choices[0].message.content
    assert penalised == httpx.post(app_server.url + "/generate", json={"prompt": kwargs["messages"][0]["content"], "max_new_tokens": 24, "repetition_penalty": 1.3}, timeout=120).json()["text"]
    openai_style = client.chat.completions.create(**kwargs, frequency_penalty=2.0, presence_penalty=2.0).choices[0].message.content
    rest = httpx.post(app_server.url + "/generate", json={"prompt": kwargs["messages"][0]["content"], "max_new_tokens": 24, "frequency_penalty": 2.0, "presence_penalty": 2.0}, timeout=120).json()
    plain = client.chat.completions.create(**kwargs).choices[0].message.content
    assert openai_style == rest["text"] != plain


# ---------------------------------------------------------------------- sessions and cache_salt


def test_cache_salt_isolates_within_and_across_sessions(app_server, model):
    """A salt is a namespace of the caller's own session: another salt, or the same salt from another session, misses."""
    system = system_prompt()
    a, b = (httpx.post(app_server.url + "/session").json()["session_id"] for _ in range(2))

    def cached(session: str, salt: str) -> int:
        with openai.OpenAI(base_url=app_server.url + "/v1", api_key=session, max_retries=0, timeout=120) as c:
            reply = c.chat.completions.create(model=model, messages=chat(system), max_tokens=1, temperature=0, extra_body={"cache_salt": salt})
        return reply.usage.prompt_tokens_details.cached_tokens

    assert cached(a, "salt-1") == 0
    assert cached(a, "salt-1") > 0  # its own namespace, reused
    assert cached(a, "salt-2") == 0  # another salt: another namespace
    assert cached(b, "salt-1") == 0  # the same salt from another session never reaches a's


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "overrides, status, phrase",
    [
        (dict(n=2), 400, "n must be 1"),
        (dict(max_tokens=10**6), 400, "max_tokens"),
        (dict(max_tokens=0), 400, "max_tokens"),
        (dict(temperature=5), 400, "temperature"),
        (dict(logit_bias={"1": 5}), 400, "Unrecognized request argument supplied: logit_bias"),
        (dict(presence_penalty=2.5), 400, "presence_penalty: Input should be less than or equal to 2"),
        (dict(frequency_penalty=-3), 400, "frequency_penalty: Input should be greater than or equal to -2"),
        (dict(frequency_penalty="0.5"), 400, "frequency_penalty"),
        (dict(presence_penalty=True), 400, "presence_penalty"),
        (dict(repetition_penalty=0.0), 400, "repetition_penalty: Input should be greater than or equal to 1"),
        (dict(repetition_penalty=3), 400, "repetition_penalty: Input should be less than or equal to 2"),
        (dict(repetition_penalty="1.1"), 400, "repetition_penalty"),
        (dict(repetition_penalty=True), 400, "repetition_penalty"),
        (dict(no_repeat_ngram_size=-1), 400, "no_repeat_ngram_size"),
        (dict(no_repeat_ngram_size=10**9), 400, "no_repeat_ngram_size: Input should be less than or equal to 16"),
        (dict(no_repeat_ngram_size=2.5), 400, "no_repeat_ngram_size"),
        (dict(stream_options={"include_usage": True}), 400, "only allowed when stream is true"),
        (dict(messages=[{"role": "assistant", "content": "hi"}]), 400, "last message must be the user's"),
        (dict(messages=[{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}]), 400, "must come before"),
        (dict(messages=[{"role": "tool", "content": "x"}]), 400, "role"),
        (dict(messages=[]), 400, "messages"),
        (dict(messages=[{"role": "user", "content": "hi\x00"}]), 400, "control character"),
        (dict(messages=[{"role": "user", "content": "x " * 9000}]), 400, "context window"),
        (dict(model="gpt-4o"), 404, "does not exist"),
        (dict(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ],
)
def test_bad_requests_get_openai_error_bodies(app_server, model, overrides, status, phrase):
    """Every bad request is a 4xx with OpenAI's error body naming the problem, never a 500."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **overrides}
    response = httpx.post(app_server.url + "/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and phrase in error["message"], error


def test_the_openai_client_raises_its_own_errors(client, model, app_server):
    """The openai package maps our errors to its exception classes, message included."""
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], n=2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    with openai.OpenAI(base_url=app_server.url + "/v1", api_key="EMPTY", max_retries=0) as bad_key:
        with pytest.raises(openai.AuthenticationError, match="session id"):
            bad_key.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])


def test_guard_refusals_on_v1_use_the_openai_error_body(app_server):
    """The request guard (content type, body cap) answers /v1 in OpenAI's shape too."""
    response = httpx.post(app_server.url + "/v1/chat/completions", content=b"hi", headers={"content-type": "text/plain"})
    assert response.status_code == 415 and "application/json" in response.json()["error"]["message"]
    response = httpx.post(app_server.url + "/v1/completions", content=b"{" + b" " * 300_000 + b"}", headers={"content-type": "application/json"})
    assert response.status_code == 413 and "over the limit" in response.json()["error"]["message"]
    assert httpx.post(app_server.url + "/v1/models").status_code == 405


# ---------------------------------------------------------------------- cancellation


def _wait_idle(url: str, timeout_s: float = 20) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if httpx.get(url + "/health").json()["inflight"] == 0:
            return True
        time.sleep(0.2)
    return False


def test_disconnect_cancels_streaming_and_not(app_server, model):
    """A client that goes away mid-generation frees its worker within moments, streaming or not."""
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me a very long story about a dragon."}], "max_tokens": 500, "temperature": 0}
    with httpx.stream("POST", app_server.url + "/v1/chat/completions", json=body | {"stream": True}, timeout=120) as response:
        lines = response.iter_lines()
        while not next(lines).startswith("data: "):
            pass
        assert httpx.get(app_server.url + "/health").json()["inflight"] == 1
    assert _wait_idle(app_server.url), "the streaming generation went on after the client left"

    with pytest.raises(httpx.ReadTimeout):
        httpx.post(app_server.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(120, read=2.0))
    assert _wait_idle(app_server.url), "the generation went on after the client left"
