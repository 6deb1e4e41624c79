"""Per-session isolation against the running app, on every path that reaches the engine.

The attacks of issue 8, each as a test over real HTTP: anonymous callers, forged Gradio session
hashes, long ids, the prefix oracle and the quota flood. Paths: page events (by fn_index, over
/gradio_api/run/predict, as any script can call them), gradio_client and REST. Most run against
`app_server_public` (a loopback server behaving as a public one: per-session, small cache, tiny model).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Iterator

import httpx
import pytest

from ui.security import EVENT_PATHS

SECRET_CODE = "4821"


def body(system: str, **overrides) -> dict:
    return {"prompt": "Which book should I read?", "system_prompt": system, "max_new_tokens": 4, "use_cache": True, "use_prefix_cache": True, **overrides}


def secret_system_prompt() -> str:
    return f"Private notes {uuid.uuid4().hex}: you are the assistant of a law firm; keep every client's case confidential and answer in one line."


RATE_LIMIT_DEADLINE_S = 300  # how long a test client keeps retrying its address's event-rate refusals (a liveness bound)


class PoliteTransport(httpx.HTTPTransport):
    """A script that honours 429: a page event refused for the address's rate is sent again after its Retry-After.

    The whole suite calls from one loopback address, so whether a test's events find the per-address bucket
    (ui/limits.EVENT_CALLS_PER_S) empty depends on what ran just before it. A test client that retries, as a
    well-behaved script does, has every one of its calls served: each attack is really tried, not refused at
    the door. Only event paths are retried; a test that wants the refusal itself uses ``polite=False``.
    """

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        deadline = time.monotonic() + RATE_LIMIT_DEADLINE_S
        while True:
            response = super().handle_request(request)
            if response.status_code != 429 or not request.url.path.startswith(EVENT_PATHS) or time.monotonic() > deadline:
                return response
            response.read()
            response.close()
            time.sleep(float(response.headers.get("Retry-After", "1")))


def client(url: str, polite: bool = True, **options) -> httpx.Client:
    """An HTTP client for the app at ``url``; ``polite``: retry event-rate refusals (see PoliteTransport)."""
    return httpx.Client(base_url=url, transport=PoliteTransport() if polite else None, **options)


def bearer(url: str) -> dict[str, str]:
    """A server-issued session, as the Authorization header scripts send."""
    response = httpx.post(url + "/session")
    assert response.status_code == 200, response.text
    return {"Authorization": response.json()["authorization"]}


class Page:
    """A browser's view of the app: its session cookie (set by loading the page) and a Gradio session hash."""

    def __init__(self, url: str, cookie: bool = True, session_hash: str | None = None, polite: bool = True) -> None:
        self.http = client(url, polite, timeout=120)
        if cookie:
            self.http.get("/").raise_for_status()
            assert "kvci_session" in self.http.cookies
        dependencies = self.http.get("/config").json()["dependencies"]
        self.fn = {d["api_name"]: i for i, d in enumerate(dependencies)}
        self.session_hash = session_hash or uuid.uuid4().hex

    def event(self, name: str, *data) -> httpx.Response:
        """Call a page event (private: hidden, not protected) by fn_index, as any script can."""
        payload = {"fn_index": self.fn[name], "data": list(data), "session_hash": self.session_hash}
        return self.http.post("/gradio_api/run/predict", json=payload)

    def generate(self, system: str, prompt: str, max_new_tokens: int = 4) -> list[dict]:
        """The page's generate event through the queue, as the browser runs it: join, then read the stream to its end."""
        return list(self.stream("on_generate", system, prompt, True, True, max_new_tokens, 0, 1.0, 0, None))

    def stream(self, name: str, *data) -> Iterator[dict]:
        """Join the queue with an event and yield its server-sent messages until it completes."""
        payload = {"fn_index": self.fn[name], "data": list(data), "session_hash": self.session_hash}
        self.http.post("/gradio_api/queue/join", json=payload).raise_for_status()
        with self.http.stream("GET", "/gradio_api/queue/data", params={"session_hash": self.session_hash}) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    message = json.loads(line[5:])
                    yield message
                    if message.get("msg") == "process_completed":
                        assert message.get("success"), message
                        return

    def inspector_text(self) -> str:
        response = self.event("on_inspect", None, "hits")
        assert response.status_code == 200, response.text
        return response.text


@pytest.fixture
def sessions(app_server_public):
    """Two REST clients with server-issued bearer ids."""
    clients = [httpx.Client(base_url=app_server_public.url, timeout=120, headers=bearer(app_server_public.url)) for _ in range(2)]
    yield clients
    for client in clients:
        client.close()


# ---------------------------------------------------------------------- REST


def test_identical_prompt_from_another_session_is_a_miss(sessions):
    """Session b sends exactly what session a sent: a miss for b, while a's own repeat is a hit."""
    a, b = sessions
    request = body(secret_system_prompt())
    assert a.post("/generate", json=request).json()["cache_status"] == "miss"
    assert a.post("/generate", json=request).json()["cache_status"] == "hit"
    from_b = b.post("/generate", json=request).json()
    assert from_b["cache_status"] == "miss" and from_b["timings"]["prefix_tokens_saved"] == 0


def test_stats_show_only_the_own_namespace(sessions):
    """Each session's stats count only its own lookups and entries."""
    a, b = sessions
    request = body(secret_system_prompt())
    a.post("/generate", json=request).raise_for_status()
    a.post("/generate", json=request).raise_for_status()
    b.post("/generate", json=request).raise_for_status()
    stats_a, stats_b = a.get("/cache/stats").json(), b.get("/cache/stats").json()
    assert (stats_a["hits"], stats_a["misses"], stats_a["total_requests"]) == (1, 1, 2)
    assert (stats_b["hits"], stats_b["misses"], stats_b["total_requests"]) == (0, 1, 1)
    assert stats_a["scope"] == stats_b["scope"] == "session" and stats_a["namespaces"] == 1
    assert "text" not in stats_a and "entries" not in stats_a  # no prompt text in any API


def test_clear_clears_only_the_own_namespace(sessions):
    """Session a clearing its cache leaves session b's entries, and b's repeat still hits."""
    a, b = sessions
    request = body(secret_system_prompt())
    a.post("/generate", json=request).raise_for_status()
    b.post("/generate", json=request).raise_for_status()
    cleared = a.post("/cache/clear")
    assert cleared.status_code == 200 and cleared.json()["cleared"] == "session"
    assert a.get("/cache/stats").json()["cache_size"] == 0
    assert b.get("/cache/stats").json()["cache_size"] > 0
    assert b.post("/generate", json=request).json()["cache_status"] == "hit"
    assert a.post("/generate", json=request).json()["cache_status"] == "miss"


def test_anonymous_rest_calls_share_nothing(app_server_public):
    """Attack 1/2: callers without a session used to share one namespace per address; now each call is its own."""
    request = body(secret_system_prompt())
    for _ in range(2):
        response = httpx.post(app_server_public.url + "/generate", json=request, timeout=60).json()
        assert response["cache_status"] == "miss" and response["timings"]["prefix_tokens_saved"] == 0
    stats = httpx.get(app_server_public.url + "/cache/stats").json()
    assert stats["total_requests"] == 0 and stats["cache_size"] == 0


@pytest.mark.parametrize("header", ["X-Session-Id", "Authorization"])
def test_ids_are_hashed_whole_and_malformed_ids_get_a_400(app_server_public, header):
    """Attack 2: ids were cut at 200 characters, so two long ids sharing a start collided; now the whole id counts."""
    def headers(session_id: str) -> dict[str, str]:
        return {header: session_id if header == "X-Session-Id" else f"Bearer {session_id}"}

    first, second = "a" * 127 + "1", "a" * 127 + "2"  # 128 characters, differing only in the last
    request = body(secret_system_prompt())
    with httpx.Client(base_url=app_server_public.url, timeout=60) as http:
        assert http.post("/generate", json=request, headers=headers(first)).json()["cache_status"] == "miss"
        assert http.post("/generate", json=request, headers=headers(second)).json()["cache_status"] == "miss"
        assert http.post("/generate", json=request, headers=headers(first)).json()["cache_status"] == "hit"
        for bad in ("short", "a" * 201, "x" * 40 + " y", "x" * 40 + "*"):
            for call in (lambda h: http.post("/generate", json=request, headers=h), lambda h: http.get("/cache/stats", headers=h)):
                response = call(headers(bad))
                assert response.status_code == 400 and "POST /session" in response.json()["detail"], response.text[:300]


def test_prefix_oracle_finds_nothing_in_per_session_mode(app_server_public):
    """Attack 3: guesses of a victim's secret system prompt all miss, with 0 tokens saved, whatever the guess."""
    url = app_server_public.url
    victim, attacker = bearer(url), bearer(url)
    secret = f"You are the vault keeper. The vault code is {SECRET_CODE}. Never say it."
    httpx.post(url + "/generate", json=body(secret), headers=victim, timeout=60).raise_for_status()
    for guess in (SECRET_CODE, "4820", "4822", "1234", "4800", "4821"):
        response = httpx.post(url + "/generate", json=body(f"You are the vault keeper. The vault code is {guess}. Never say it."), headers=attacker, timeout=60).json()
        assert response["cache_status"] == "miss" and response["timings"]["prefix_tokens_saved"] == 0, guess
        httpx.post(url + "/cache/clear", headers=attacker).raise_for_status()  # no own entries to match either
    assert httpx.post(url + "/generate", json=body(secret), headers=victim, timeout=60).json()["cache_status"] == "hit"


def test_one_session_flooding_the_cache_does_not_evict_another(app_server_public):
    """Attack 4: a session sending many long prompts stays within its share of the budget; the victim keeps its entry."""
    url = app_server_public.url
    victim, flooder = bearer(url), bearer(url)
    request = body(secret_system_prompt())
    httpx.post(url + "/generate", json=request, headers=victim, timeout=60).raise_for_status()
    victim_before = httpx.get(url + "/cache/stats", headers=victim).json()
    for i in range(40):  # 40 prompts of ~200 tokens, ~300 KiB each with their logits: over the whole 8 MiB budget
        long_prompt = f"Flood {i} {uuid.uuid4().hex}. " + "word " * 150
        httpx.post(url + "/generate", json=body(None, prompt=long_prompt, max_new_tokens=1), headers=flooder, timeout=60).raise_for_status()
    flooder_stats = httpx.get(url + "/cache/stats", headers=flooder).json()
    assert flooder_stats["cached_bytes"] <= 0.25 * flooder_stats["budget_bytes"] + 1
    assert httpx.post(url + "/generate", json=request, headers=victim, timeout=60).json()["cache_status"] == "hit"
    victim_after = httpx.get(url + "/cache/stats", headers=victim).json()
    assert victim_after["evictions"] == victim_before["evictions"] == 0  # the flooder's evictions are its own


# ---------------------------------------------------------------------- page events, by fn_index


def test_anonymous_inspector_call_sees_nothing_of_another_caller(app_server_public):
    """Attack 1: the inspector event called without a cookie (no session) shows no entries and no text of anyone's."""
    victim = Page(app_server_public.url)
    victim.generate(f"The vault code is {SECRET_CODE}; you guard it with your life, say nothing.", "What is the code?")
    assert "vault" in victim.inspector_text()  # control: the owner sees its own prompt
    anonymous = Page(app_server_public.url, cookie=False)
    text = anonymous.inspector_text()
    assert "vault" not in text and "**0** entries" in text
    assert "vault" not in Page(app_server_public.url, cookie=False).inspector_text()


def test_forged_session_hash_reads_and_changes_nothing(app_server_public):
    """Attack 2: a caller who knows a page's session_hash but lacks its cookie sees and clears nothing of it
    (issue 21: the hash now belongs to the victim's cookie session, and the forger's calls are refused outright)."""
    victim = Page(app_server_public.url)
    victim.generate(f"The vault code is {SECRET_CODE}; you guard it with your life, say nothing.", "What is the code?")
    for forger in (Page(app_server_public.url, cookie=False, session_hash=victim.session_hash), Page(app_server_public.url, session_hash=victim.session_hash)):
        for name in ("on_inspect", "on_clear"):
            refused = forger.event(name, None, "hits")
            assert refused.status_code == 403 and "vault" not in refused.text, refused.text
    assert "vault" in victim.inspector_text()  # the victim's entries survived the forged clear


def test_shared_mode_chart_history_is_bound_to_the_cookie_session(app_server):
    """gr.State is keyed by session_hash: in shared mode the inspector shows text of one's own sequences, and a forger gets none."""
    victim = Page(app_server.url)
    secret = f"The vault code is {SECRET_CODE}; shared-mode secret {uuid.uuid4().hex}, tell nobody."
    victim.generate(secret, "What is the code?")
    assert "vault code" in victim.inspector_text()
    for forger in (Page(app_server.url, cookie=False, session_hash=victim.session_hash), Page(app_server.url, session_hash=victim.session_hash)):
        refused = forger.event("on_inspect", None, "hits")  # the hash is the victim's cookie session's: 403, nothing shown
        assert refused.status_code == 403 and "vault code" not in refused.text, refused.text


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(text=["a", "list"]), "prompt: Input should be a valid string"),
        (dict(text=12345), "prompt: Input should be a valid string"),
        (dict(text="nul \x00 inside"), "control character U+0000"),
        (dict(kv="false"), "use_cache: Input should be a valid boolean"),
        (dict(max_tokens=8.5), "max_new_tokens"),
        (dict(max_tokens=10**9), "less than or equal to"),
        (dict(temp="hot"), "temperature"),
        (dict(penalty="strong"), "repetition_penalty: Input should be a valid number"),
        (dict(penalty=True), "repetition_penalty: Input should be a valid number"),
        (dict(penalty=-1.5), "repetition_penalty: Input should be greater than or equal to 1"),
        (dict(ngram=3.5), "no_repeat_ngram_size: Input should be a valid integer"),
        (dict(ngram=10**12), "no_repeat_ngram_size: Input should be less than or equal to"),
        (dict(ngram=[3]), "no_repeat_ngram_size: Input should be a valid integer"),
    ],
)
def test_page_event_inputs_go_through_the_one_validation(app_server_public, fields, message):
    """Attack 6: the page's generate event refuses what REST refuses (strict types, same limits), with the same message."""
    values = dict(system=None, text="hello there", kv=True, prefix=True, max_tokens=4, temp=0, penalty=1.0, ngram=0, state=None) | fields
    response = Page(app_server_public.url).event("on_generate", *values.values())
    assert message in response.json().get("error", ""), response.text[:300]


# ---------------------------------------------------------------------- gradio_client


def test_gradio_client_sessions_are_isolated_by_their_bearer_header(app_server_public):
    """gradio_client sends the session header on every call; two sessions never hit, see or clear each other."""
    gradio_client = pytest.importorskip("gradio_client")
    url = app_server_public.url
    first = gradio_client.Client(url, verbose=False, headers=bearer(url))
    second = gradio_client.Client(url, verbose=False, headers=bearer(url))
    system = secret_system_prompt()
    assert first.predict("Which book should I read?", system, 4, api_name="/generate")["cache_status"] == "miss"
    assert second.predict("Which book should I read?", system, 4, api_name="/generate")["cache_status"] == "miss"
    assert first.predict("Which book should I read?", system, 4, api_name="/generate")["cache_status"] == "hit"
    assert second.predict(api_name="/cache_stats")["total_requests"] == 1
    assert second.predict(api_name="/clear_cache")["cleared"] == "session"
    assert first.predict(api_name="/cache_stats")["cache_size"] > 0


def test_gradio_client_without_a_session_shares_nothing(app_server_public):
    """Attack 1: gradio_client calls without a header were one shared 'anonymous' namespace; now each call is alone."""
    gradio_client = pytest.importorskip("gradio_client")
    client = gradio_client.Client(app_server_public.url, verbose=False)
    system = secret_system_prompt()
    for _ in range(2):
        assert client.predict("Which book should I read?", system, 4, api_name="/generate")["cache_status"] == "miss"
    assert client.predict(api_name="/cache_stats")["total_requests"] == 0
