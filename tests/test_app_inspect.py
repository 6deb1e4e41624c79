"""Seeing inside the cache over real HTTP: the miss explanation and the verify oracle, on every door, attacked.

Runs against `app_server_public` (per-session, tiny model) and the local shared app.
"""

from __future__ import annotations

import json
import uuid

import httpx
import pytest
from gradio_client import Client

from test_app_isolation import Page, bearer, body, secret_system_prompt


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


def test_verify_over_rest_and_gradio_client(app_server_public):
    """verify=true on REST and gradio_client: the reply carries a verification, identical on a healthy cache."""
    url, headers = app_server_public.url, bearer(app_server_public.url)
    system = secret_system_prompt()
    rest = httpx.post(url + "/generate", json=body(system, verify=True), headers=headers, timeout=120).json()
    assert rest["verification"]["identical"] and rest["verification"]["max_abs_logit_diff"] < 1e-3
    client = Client(url + "/", headers=headers, verbose=False)
    hit = client.predict("Which book should I read?", system, 4, True, True, 0.0, 1.0, None, True, api_name="/generate")
    assert hit["cache_status"] == "hit" and hit["verification"]["identical"]
    plain = httpx.post(url + "/generate", json=body(system), headers=headers, timeout=120).json()
    assert plain["verification"] is None


def test_tree_view_shows_only_the_own_text(app_server):
    """Shared mode over HTTP: the inspector's tree figure hovers the owner's text for the owner, the placeholder for anyone else."""
    owner = Page(app_server.url)
    secret = f"The tree view secret is {uuid.uuid4().hex[:8]}; never repeat it."
    owner.generate(secret, "What is the secret?")

    def tree(page: Page) -> dict:
        response = page.event("on_inspect", None, "hits")
        assert response.status_code == 200, response.text
        stats, table, plot = response.json()["data"]
        return json.loads(plot["plot"])["data"][0]

    mine, theirs = tree(owner), tree(Page(app_server.url))
    assert mine["type"] == "icicle" and "tree view secret" in json.dumps(mine)
    assert set(theirs["ids"]) & set(mine["ids"]) - {"root"}  # the stranger sees the shared nodes' shape ...
    assert "tree view secret" not in json.dumps(theirs) and "another session" in json.dumps(theirs)  # ... never their text


@pytest.mark.parametrize("value", ["true", 1, None, [True]])
def test_verify_must_be_a_real_bool(app_server_public, value):
    """verify goes through the one validation: anything but true/false is a 422 naming the field."""
    response = httpx.post(app_server_public.url + "/generate", json=body("x" * 30, verify=value), headers=bearer(app_server_public.url), timeout=60)
    assert response.status_code == 422 and "verify" in response.json()["detail"]


def test_verify_counts_twice_against_the_session_limit():
    """A verified request is two requests' work: it takes two of a session's in-flight places."""
    from ui.service import Job
    from ui.sessions import Session

    noop = lambda job: None  # noqa: E731
    session = Session(key="c", client="session:c", anonymous=False)
    assert Job(session, "ns", {"verify": True}, noop, noop).cost == 2 and Job(session, "ns", {}, noop, noop).cost == 1
