"""Per-session prefix caching against the running app: sessions never hit, see or clear each other's entries.

Cross-request prefix caching is a timing side channel; in per-session mode each REST client
(X-Session-Id, else its address) and each gradio_client session gets its own namespace.
"""

from __future__ import annotations

import uuid

import httpx
import pytest


def body(system: str, **overrides) -> dict:
    return {"prompt": "Which book should I read?", "system_prompt": system, "max_new_tokens": 4, "use_cache": True, "use_prefix_cache": True, **overrides}


def secret_system_prompt() -> str:
    return f"Private notes {uuid.uuid4().hex}: you are the assistant of a law firm; keep every client's case confidential and answer in one line."


@pytest.fixture
def sessions(app_server_per_session):
    """Two REST clients that name their sessions with X-Session-Id."""
    clients = [httpx.Client(base_url=app_server_per_session.url, timeout=120, headers={"X-Session-Id": f"{name}-{uuid.uuid4().hex}"}) for name in "ab"]
    yield clients
    for client in clients:
        client.close()


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


def test_gradio_client_sessions_are_isolated_too(app_server_per_session):
    """Two gradio_client sessions (two session hashes): the second identical prompt is a miss; stats and clear are per session."""
    gradio_client = pytest.importorskip("gradio_client")
    first = gradio_client.Client(app_server_per_session.url, verbose=False)
    second = gradio_client.Client(app_server_per_session.url, verbose=False)
    system = secret_system_prompt()
    assert first.predict("Which book should I read?", system, 4, api_name="/generate")["cache_status"] == "miss"
    assert second.predict("Which book should I read?", system, 4, api_name="/generate")["cache_status"] == "miss"
    assert first.predict("Which book should I read?", system, 4, api_name="/generate")["cache_status"] == "hit"
    assert second.predict(api_name="/cache_stats")["total_requests"] == 1
    assert second.predict(api_name="/clear_cache")["cleared"] == "session"
    assert first.predict(api_name="/cache_stats")["cache_size"] > 0
