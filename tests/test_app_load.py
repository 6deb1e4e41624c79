"""Bounded load on loopback: 64 requests from 8 threads, REST and gradio_client mixed, shared and unique prefixes.

Greedy decoding makes every text checkable: under load, each text must equal the same request
run alone, and the cache's counters must add up.
"""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

THREADS = 8
REQUESTS = 64
MAX_NEW_TOKENS = 4


def distinct_requests() -> list[dict]:
    """8 requests: 4 share a long system prompt (partial hits, then hits), 4 have unique ones (a miss, then hits)."""
    shared = f"Load test {uuid.uuid4().hex}. You are a museum guide; answer visitors' questions in one short, friendly sentence."
    questions = ["Where is the café?", "When do you close?", "Can I take photos?", "Are dogs allowed?"]
    requests = [dict(prompt=q, system_prompt=shared) for q in questions]
    requests += [dict(prompt=f"Give me one word that rhymes with {word}.", system_prompt=f"Unique {uuid.uuid4().hex}: you are a poet who answers in a single word.") for word in ("cat", "tree", "light", "stone")]
    return [dict(r, max_new_tokens=MAX_NEW_TOKENS, use_cache=True, use_prefix_cache=True) for r in requests]


def test_64_mixed_requests_from_8_threads_match_the_same_requests_run_alone(app_server):
    """Zero errors, every text equal to its solo run, and hits + partial_hits + misses == total_requests."""
    gradio_client = pytest.importorskip("gradio_client")
    requests = distinct_requests()
    with httpx.Client(base_url=app_server.url, timeout=300) as rest:
        alone = []
        for request in requests:  # the reference: one at a time, no prefix cache
            response = rest.post("/generate", json=dict(request, use_prefix_cache=False))
            assert response.status_code == 200, response.text
            alone.append(response.json()["text"])
        assert rest.post("/cache/clear").status_code == 200  # local shared mode: counters start at zero

        local = threading.local()

        def send(i: int) -> tuple[int, str]:
            request = requests[i % len(requests)]
            if i % 2:  # odd: gradio_client (one client per thread), even: REST
                if not hasattr(local, "client"):
                    local.client = gradio_client.Client(app_server.url, verbose=False)
                args = (request["prompt"], request["system_prompt"], MAX_NEW_TOKENS, True, True)
                return i, local.client.predict(*args, api_name="/generate")["text"]
            response = httpx.post(app_server.url + "/generate", json=request, timeout=300)
            assert response.status_code == 200, response.text
            return i, response.json()["text"]

        with ThreadPoolExecutor(THREADS) as pool:
            results = list(pool.map(send, range(REQUESTS)))

        mismatches = [(i, text, alone[i % len(requests)]) for i, text in results if text != alone[i % len(requests)]]
        assert not mismatches, mismatches[:5]
        stats = rest.get("/cache/stats").json()
    assert stats["hits"] + stats["partial_hits"] + stats["misses"] == stats["total_requests"] == REQUESTS
    assert stats["hits"] >= REQUESTS - 2 * len(requests)  # every distinct request is cached after its first run
