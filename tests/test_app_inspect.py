"""Seeing inside the cache over real HTTP: the miss explanation and the verify oracle, on every door, attacked.

Runs against `app_server_public` (per-session, tiny model) and the local shared app.
"""

from __future__ import annotations

import httpx
from gradio_client import Client

from test_app_isolation import bearer, body, secret_system_prompt


def test_rest_and_gradio_client_carry_the_explanation(app_server_public):
    """POST /generate and gradio_client /generate both return cache_explanation; a repeat explains a hit."""
    url, headers = app_server_public.url, bearer(app_server_public.url)
    system = secret_system_prompt()
    first = httpx.post(url + "/generate", json=body(system), headers=headers, timeout=120).json()
    assert first["cache_explanation"]["reason"] == "cold"
    client = Client(url + "/", headers=headers, verbose=False)
    again = client.predict("Which book should I read?", system, 4, api_name="/generate")
    assert again["cache_status"] == "hit" and again["cache_explanation"]["reason"] == "hit"
    edited = httpx.post(url + "/generate", json=body(system.replace("law firm", "bank")), headers=headers, timeout=120).json()
    e = edited["cache_explanation"]
    assert (e["reason"], e["where"]) == ("diverged", "system") and "law" in e["cached_after"]  # the session's own text


def test_explanation_never_looks_in_another_sessions_namespace(app_server_public):
    """Per-session: B sends A's secret system prompt with one digit changed; B's explanation is cold and names nothing of A's."""
    url = app_server_public.url
    secret = secret_system_prompt() + " The door code is 5151."
    a, b = bearer(url), bearer(url)
    httpx.post(url + "/generate", json=body(secret), headers=a, timeout=120).raise_for_status()
    e = httpx.post(url + "/generate", json=body(secret.replace("5151", "5152")), headers=b, timeout=120).json()["cache_explanation"]
    assert e["reason"] == "cold" and e["matched_tokens"] == 0 and "5151" not in repr(e)
    anonymous = httpx.post(url + "/generate", json=body(secret), timeout=120).json()["cache_explanation"]  # no session at all
    assert anonymous["reason"] == "cold" and "5151" not in repr(anonymous)


def test_shared_mode_explanation_hides_the_cached_side(app_server):
    """Shared (local) mode: the divergence is reported, but not what the cached sequence says after it."""
    url = app_server.url
    secret = secret_system_prompt() + " The door code is 8080."
    httpx.post(url + "/generate", json=body(secret), headers=bearer(url), timeout=120).raise_for_status()
    e = httpx.post(url + "/generate", json=body(secret.replace("8080", "9090")), headers=bearer(url), timeout=120).json()["cache_explanation"]
    assert e["reason"] == "diverged" and e["cached_after"] is None and e["nearest_cached_tokens"] is None
    assert "8080" not in repr(e)
