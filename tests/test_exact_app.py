"""The exactness contract as a visitor meets it: the app with its default compile, Verify on 50 prompts in a row over REST.

Verify runs the request, then the same request reusing nothing from the prefix cache, and compares
tokens and first-token logits. Requests sent while the decode step compiles wait for it
(engine/compiled.py), so every one of them must say identical, with a difference of exactly 0.
"""

from __future__ import annotations

import httpx

from tests.conftest import launch_app, stop_app

SYSTEM = "You answer questions about lighthouses, briefly, in one sentence. " * 4


def test_verify_says_identical_for_50_prompts_while_compiling_and_after(tmp_path_factory, bundled_folder):
    """50 verified requests (hits, partial hits, misses) from the moment the app is ready: all identical, bit for bit."""
    server = launch_app(tmp_path_factory.mktemp("app-compiling"), env_extra={"KVCI_COMPILE": "auto"})
    try:
        with httpx.Client(base_url=server.url, timeout=900) as client:
            states, statuses = [client.get("/health").json()["decode"]["state"]], set()
            for i in range(50):
                body = {"prompt": f"Question {i % 10}: how tall is lighthouse number {i % 10}?", "system_prompt": SYSTEM, "max_new_tokens": 4, "verify": True}
                response = client.post("/generate", json=body)
                assert response.status_code == 200, response.text
                result = response.json()
                verification = result["verification"]
                assert verification["identical"] and verification["max_abs_logit_diff"] == 0, (i, result["cache_status"], verification)
                statuses.add(result["cache_status"])
                states.append(client.get("/health").json()["decode"]["state"])
    finally:
        stop_app(server)
    assert states[-1] == "compiled", states
    assert {"miss", "hit", "partial"} <= statuses, statuses
