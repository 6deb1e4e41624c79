"""Pin, unpin and warm over real HTTP: REST /cache/warm and /cache/unpin, gradio_client /warm_cache and
/unpin_cache, the page's Pin and Unpin events, then hits; and the attacks.

Runs against `app_server_public` (per-session, tiny model, 8 MiB), the local shared app, and apps of
its own started with --warm-file.
"""

from __future__ import annotations

import json
import re
import time
import uuid

import httpx
import pytest
from gradio_client import Client

from conftest import launch_app, stop_app
from test_app_isolation import Page, bearer, body, secret_system_prompt


def reused_of(url: str, tokens: int) -> int:
    """What a request reuses of a warmed prefix: all of it where the app prefills through the decode step (the
    int4 default), else its whole chunks (engine/prefill.py); /health says which."""
    align = httpx.get(url + "/health").json()["prefill"]["reuse_align"]
    return tokens // align * align


def test_rest_warm_then_a_request_with_that_system_prompt_is_a_partial_hit(app_server_public):
    """POST /cache/warm pins a system prompt in the session's namespace; the next request reuses all of it; stats show the pin."""
    url, headers = app_server_public.url, bearer(app_server_public.url)
    system = secret_system_prompt()
    warmed = httpx.post(url + "/cache/warm", json={"system_prompt": system, "pin": True, "ttl_s": 600}, headers=headers, timeout=120)
    assert warmed.status_code == 200, warmed.text
    done = warmed.json()
    assert done["pinned"] and done["prefilled"] == done["tokens"] and 0 < done["expires_in_s"] <= 600
    reply = httpx.post(url + "/generate", json=body(system), headers=headers, timeout=120).json()
    assert reply["cache_status"] == "partial" and reply["cache_explanation"]["reused_tokens"] == reused_of(url, done["tokens"])
    stats = httpx.get(url + "/cache/stats", headers=headers).json()
    assert stats["pins"] == 1 and stats["pinned_bytes"] > 0 and stats["pin_budget_bytes"] > stats["pinned_bytes"]
    other = httpx.get(url + "/cache/stats", headers=bearer(url)).json()
    assert other["pins"] == 0  # a pin is the session's own


def test_gradio_client_warm_messages_then_exact_hit(app_server_public):
    """gradio_client /warm_cache with [system, user] messages: the same request afterwards is an exact hit."""
    url, headers = app_server_public.url, bearer(app_server_public.url)
    system = secret_system_prompt()
    client = Client(url + "/", headers=headers, verbose=False)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Which book should I read?"}]
    done = client.predict(None, messages, True, None, api_name="/warm_cache")
    assert done["pinned"] and done["expires_in_s"] > 0  # per-session: a pin always has a TTL
    assert httpx.post(url + "/generate", json=body(system), headers=headers, timeout=120).json()["cache_status"] == "hit"


def test_anonymous_callers_cannot_pin(app_server_public):
    """No session: a pin would die with the single-use namespace, so it is refused (403) on REST and gradio_client."""
    url = app_server_public.url
    response = httpx.post(url + "/cache/warm", json={"system_prompt": secret_system_prompt(), "pin": True}, timeout=120)
    assert response.status_code == 403 and "anonymous" in response.json()["detail"]
    with pytest.raises(Exception, match="anonymous"):
        Client(url + "/", verbose=False).predict(secret_system_prompt(), None, True, None, api_name="/warm_cache")


def test_pin_over_the_session_budget_is_refused(app_server_public):
    """Per-session: pins count against the session's own pin budget (25% of its quota); beyond it a 400 says so."""
    url, headers = app_server_public.url, bearer(app_server_public.url)
    refused = None
    for i in range(40):
        response = httpx.post(url + "/cache/warm", json={"system_prompt": secret_system_prompt() * 4, "pin": True}, headers=headers, timeout=120)
        if response.status_code != 200:
            refused = response
            break
    assert refused is not None and refused.status_code == 400 and "pin refused" in refused.json()["detail"] and "your pins hold" in refused.json()["detail"], refused and refused.text


def test_cross_site_warm_is_refused(app_server_public):
    """A browser on another site cannot make the page's session pin: the Guard refuses the Origin (403)."""
    url = app_server_public.url
    response = httpx.post(url + "/cache/warm", json={"system_prompt": "x" * 40}, headers={**bearer(url), "Origin": "https://evil.example"})
    assert response.status_code == 403 and "cross-site" in response.json()["detail"]


@pytest.mark.parametrize(
    "payload, field",
    [
        ({}, "exactly one"),
        ({"system_prompt": "x" * 40, "messages": [{"role": "user", "content": "hi"}]}, "exactly one"),
        ({"system_prompt": "x" * 40, "pin": "true"}, "pin"),
        ({"system_prompt": "x" * 40, "pin": True, "ttl_s": 10**9}, "ttl_s"),
        ({"system_prompt": "x" * 40, "pin": True, "ttl_s": -1}, "ttl_s"),
        ({"system_prompt": "x" * 40, "ttl_s": 5}, "ttl_s applies to a pin"),
        ({"messages": [{"role": "tool", "content": "hi"}]}, "role"),
        ({"system_prompt": "a\x00b"}, "control character"),
        ({"system_prompt": "x" * 40, "namespace": "session-abc"}, "unknown field"),
    ],
)
def test_bad_warm_bodies_are_422_naming_the_field(app_server_public, payload, field):
    """The one validation path (parse_body with WarmBody): each bad body is a 422 saying what is wrong."""
    response = httpx.post(app_server_public.url + "/cache/warm", json=payload, headers=bearer(app_server_public.url), timeout=60)
    assert response.status_code == 422 and field in response.json()["detail"], response.text


def test_local_shared_pin_without_ttl_and_inspector_marks_it(app_server):
    """Local shared mode: a pin may last for good; the inspector's entries mark the pinned path."""
    url, headers = app_server.url, bearer(app_server.url)
    done = httpx.post(url + "/cache/warm", json={"system_prompt": secret_system_prompt(), "pin": True}, headers=headers, timeout=120).json()
    assert done["pinned"] and done["expires_in_s"] is None
    httpx.post(url + "/cache/clear", headers=headers).raise_for_status()  # leave the shared app clean for other tests


def test_a_pin_survives_a_flood_and_an_expired_one_does_not(app_server_public):
    """Issue 13's test over HTTP: the session floods its own share of the cache (evicting everything else in it);
    its pinned system prompt is still reused whole, while a pin whose TTL ran out was evicted like any entry."""
    url, headers = app_server_public.url, bearer(app_server_public.url)
    kept, expiring = secret_system_prompt(), secret_system_prompt()
    pins = {system: httpx.post(url + "/cache/warm", json={"system_prompt": system, "pin": True, **ttl}, headers=headers, timeout=120).json() for system, ttl in ((kept, {}), (expiring, {"ttl_s": 0.5}))}
    assert all(done["pinned"] for done in pins.values()), pins
    for _ in range(100):  # the TTL runs out with no hit; stats expire pins when read
        if httpx.get(url + "/cache/stats", headers=headers).json()["pins"] == 1:
            break
        time.sleep(0.1)
    for i in range(16):  # ~300 KiB each with their logits: well over the session's 2 MiB share of the 8 MiB
        flood = f"Flood {i} {uuid.uuid4().hex}. " + "word " * 150
        httpx.post(url + "/generate", json=body(None, prompt=flood, max_new_tokens=1), headers=headers, timeout=60).raise_for_status()
    stats = httpx.get(url + "/cache/stats", headers=headers).json()
    assert stats["pins"] == 1 and stats["evictions"] > 0 and stats["cached_bytes"] <= 0.25 * stats["budget_bytes"] + 1
    reply = httpx.post(url + "/generate", json=body(kept), headers=headers, timeout=120).json()
    assert reply["cache_status"] == "partial" and reply["cache_explanation"]["reused_tokens"] == reused_of(url, pins[kept]["tokens"])
    reply = httpx.post(url + "/generate", json=body(expiring), headers=headers, timeout=120).json()
    assert reply["cache_explanation"]["reused_tokens"] < pins[expiring]["tokens"]  # only what it shares with the kept pin


# ---------------------------------------------------------------------- unpin


def test_rest_unpin_drops_the_own_pin_and_keeps_the_entry(app_server_public):
    """POST /cache/unpin with the warm's body drops the pin (stats and inspector agree); the entry stays and still hits."""
    url, headers = app_server_public.url, bearer(app_server_public.url)
    system = secret_system_prompt()
    httpx.post(url + "/cache/warm", json={"system_prompt": system, "pin": True}, headers=headers, timeout=120).raise_for_status()
    assert httpx.get(url + "/cache/stats", headers=headers).json()["pins"] == 1
    unpinned = httpx.post(url + "/cache/unpin", json={"system_prompt": system}, headers=headers, timeout=60)
    assert unpinned.status_code == 200 and unpinned.json()["unpinned"] is True, unpinned.text
    stats = httpx.get(url + "/cache/stats", headers=headers).json()
    assert stats["pins"] == 0 and stats["pinned_bytes"] == 0 and stats["cache_size"] > 0
    again = httpx.post(url + "/cache/unpin", json={"system_prompt": system}, headers=headers, timeout=60)
    assert again.status_code == 404 and again.json()["unpinned"] is False and "Nothing to unpin" in again.json()["message"]
    assert httpx.post(url + "/generate", json=body(system), headers=headers, timeout=120).json()["cache_status"] == "partial"


def test_session_b_cannot_unpin_session_a_pin(app_server_public):
    """Attack: b sends a's exact unpin body; b's own namespace has no such pin (404), and a's pin stays."""
    url, a, b = app_server_public.url, bearer(app_server_public.url), bearer(app_server_public.url)
    system = secret_system_prompt()
    httpx.post(url + "/cache/warm", json={"system_prompt": system, "pin": True}, headers=a, timeout=120).raise_for_status()
    response = httpx.post(url + "/cache/unpin", json={"system_prompt": system}, headers=b, timeout=60)
    assert response.status_code == 404 and response.json()["unpinned"] is False, response.text
    assert httpx.get(url + "/cache/stats", headers=a).json()["pins"] == 1
    client_b = Client(url + "/", headers=b, verbose=False)
    assert client_b.predict(system, None, api_name="/unpin_cache")["unpinned"] is False
    assert httpx.get(url + "/cache/stats", headers=a).json()["pins"] == 1


def test_anonymous_callers_cannot_unpin(app_server_public):
    """No session: nothing of anyone's to unpin; refused (403) on REST and gradio_client, as pinning is."""
    url = app_server_public.url
    response = httpx.post(url + "/cache/unpin", json={"system_prompt": secret_system_prompt()}, timeout=60)
    assert response.status_code == 403 and "anonymous" in response.json()["detail"]
    with pytest.raises(Exception, match="anonymous"):
        Client(url + "/", verbose=False).predict(secret_system_prompt(), None, api_name="/unpin_cache")


def test_gradio_client_unpin_messages(app_server_public):
    """gradio_client /unpin_cache takes the same messages as /warm_cache and drops that pin."""
    url, headers = app_server_public.url, bearer(app_server_public.url)
    client = Client(url + "/", headers=headers, verbose=False)
    messages = [{"role": "system", "content": secret_system_prompt()}, {"role": "user", "content": "Which book should I read?"}]
    client.predict(None, messages, True, None, api_name="/warm_cache")
    done = client.predict(None, messages, api_name="/unpin_cache")
    assert done["unpinned"] is True and done["tokens"] > 0
    assert client.predict(api_name="/cache_stats")["pins"] == 0


@pytest.mark.parametrize(
    "payload, field",
    [
        ({}, "exactly one"),
        ({"system_prompt": "x" * 40, "pin": True}, "unknown field"),
        ({"system_prompt": "x" * 40, "ttl_s": 5}, "unknown field"),
        ({"messages": []}, "messages"),
        ({"system_prompt": ["x"]}, "system_prompt"),
    ],
)
def test_bad_unpin_bodies_are_422_naming_the_field(app_server_public, payload, field):
    """The one validation path (parse_body with UnpinBody): the warm's body without pin and ttl_s."""
    response = httpx.post(app_server_public.url + "/cache/unpin", json=payload, headers=bearer(app_server_public.url), timeout=60)
    assert response.status_code == 422 and field in response.json()["detail"], response.text


def test_page_pin_and_unpin_events_follow_the_cookie_session(app_server_public):
    """The page's Pin and Unpin events (private, called by fn_index): the cookie's session pins and unpins; a
    caller with the page's session_hash but no cookie is refused (the hash belongs to the cookie's session: ui/security.py)."""
    page = Page(app_server_public.url)
    system = secret_system_prompt()
    pinned = page.event("on_pin", system, None, "hits")
    assert pinned.status_code == 200 and " 1 pinned (" in pinned.text, pinned.text[:300]  # the stats the event returns
    forger = Page(app_server_public.url, cookie=False, session_hash=page.session_hash)
    forged = forger.event("on_unpin", system, None, "hits")
    assert forged.status_code == 403, forged.text[:300]
    assert " 1 pinned (" in page.inspector_text()
    unpinned = page.event("on_unpin", system, None, "hits")
    assert unpinned.status_code == 200 and " 0 pinned (" in unpinned.text, unpinned.text[:300]


# ---------------------------------------------------------------------- --warm-file

WARM_SYSTEM = ("You answer questions about the opening hours of a small public library in three words or fewer, always politely. "
               "Never mention prices, never give directions, and never guess a time you were not told.")  # over one 32-token chunk
WARM_MESSAGES = [{"role": "system", "content": "You recommend one classic novel per question and say nothing else at all, ever."}, {"role": "user", "content": "Which book should I read?"}]


@pytest.fixture(scope="module")
def warm_file_app(tmp_path_factory, tiny_model_folder):
    """The tiny model in local shared mode, started with a warm file: two good entries and one too short to cache."""
    folder = tmp_path_factory.mktemp("warm-file")
    path = folder / "warm.json"
    path.write_text(json.dumps([WARM_SYSTEM, {"messages": WARM_MESSAGES, "ttl_s": 600}, "Too short."]))
    server = launch_app(folder, "--model", str(tiny_model_folder), "--warm-file", str(path))
    yield server
    stop_app(server)


def test_warm_file_pins_at_start_and_a_request_reuses_them(warm_file_app):
    """--warm-file: the pins exist when /health says ready (stats, progress, inspector); a request with the pinned
    system prompt is a partial hit reusing exactly the pinned tokens, the pinned messages an exact hit; the short entry is a log line."""
    url = warm_file_app.url
    progress = "\n".join(httpx.get(url + "/health").json()["progress"])
    pinned_tokens = [int(n) for n in re.findall(r"Pinned warm-file entry \d: (\d+) tokens", progress)]
    assert len(pinned_tokens) == 2 and "entry 2 not pinned: this warms" in progress, progress
    stats = httpx.get(url + "/cache/stats").json()
    assert stats["pins"] == 2 and stats["pinned_bytes"] > 0
    assert " 2 pinned (" in Page(url).inspector_text()
    reply = httpx.post(url + "/generate", json={**body(WARM_SYSTEM), "prompt": "When do you open on Sunday?"}, timeout=120).json()
    assert reply["cache_status"] == "partial" and reply["cache_explanation"]["reused_tokens"] == reused_of(url, pinned_tokens[0])
    assert httpx.post(url + "/generate", json=body(WARM_MESSAGES[0]["content"]), timeout=120).json()["cache_status"] == "hit"


@pytest.mark.parametrize("text, reason", [("[\"unclosed", "not used (Unterminated string"), ('{"system_prompt": "a dict"}', "not used (the file must hold a JSON list)")])
def test_a_malformed_warm_file_is_refused_with_a_log_line_and_the_app_starts_cold(tmp_path, tiny_model_folder, text, reason):
    """A warm file that is not a JSON list does not stop the app: /health and the log say why, and nothing is pinned."""
    path = tmp_path / "warm.json"
    path.write_text(text)
    server = launch_app(tmp_path, "--model", str(tiny_model_folder), "--warm-file", str(path))
    try:
        progress = "\n".join(httpx.get(server.url + "/health").json()["progress"])
        assert f"--warm-file {path}: {reason}" in progress, progress
        assert f"--warm-file {path}: {reason}" in server.log_tail(20_000)
        assert httpx.get(server.url + "/cache/stats").json()["pins"] == 0
    finally:
        stop_app(server)
