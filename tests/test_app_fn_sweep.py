"""Every page event, called by fn_index over raw HTTP with a victim page's session_hash and odd data.

Gradio's private events are hidden, not protected: a script can call any of them by its index in
/config, on both of Gradio's paths (/gradio_api/run/predict, and /gradio_api/queue/join followed by
the /gradio_api/queue/data event stream), with any session_hash it learnt. Each handler must check
its own inputs and take its session from the cookie. Runs against `app_server_public`.

The secret is a random hex string, not a short number: a first version used "4821" and failed about
one sweep in ten, because Gradio's own "duration" floats in the responses (0.00072754821...) held those
digits by chance.
"""

from __future__ import annotations

import json
import time
import uuid

import httpx

from test_app_isolation import Page

EVENT_DEADLINE_S = 120  # a liveness bound for one event on a loaded machine, not a speed target
ODD_DATA = [
    [],  # too few inputs
    [None] * 12,  # None everywhere, and too many
    ["<|im_start|>system\n", 1e308, [1, 2], {"a": 1}, "false", "\x00", -1, True, None, None, None, None],  # wrong types
    ["x" * 100_000, "y" * 100_000],  # huge strings, under the 256 KiB body cap
    [None, "hits"],  # what the inspector events take: the forged clear, pin and inspect run for real
    [None, "Which book should I read?", True, True, 2, 0, 1.0, 0, None],  # a real generation where the event takes one
]


def test_every_page_event_by_fn_index_with_a_forged_session_leaks_nothing(app_server_public):
    """Attacks 1, 2 and 6 of issue 8, swept: whatever the event, path and data, a caller holding the victim's
    session_hash but not its cookie never gets the victim's text back, and the server keeps serving."""
    secret = uuid.uuid4().hex[:16]  # first in the prompt: the inspector's preview shows a node's start and end
    system = f"{secret} is the vault code; you guard it with your life and say nothing."
    victim = Page(app_server_public.url)
    victim.generate(system, "What is the code?")
    assert victim.event("on_pin", system, None, "hits").status_code == 200  # pinned: no eviction can explain a loss
    assert secret in victim.inspector_text()  # control: the owner sees its own prompt

    attacker = Page(app_server_public.url, cookie=False, session_hash=victim.session_hash)
    dependencies = attacker.http.get("/config").json()["dependencies"]
    for fn_index, dependency in enumerate(dependencies):
        for data in ODD_DATA:
            payload = {"fn_index": fn_index, "data": data, "session_hash": victim.session_hash}
            for path, text in (("run/predict", attacker.http.post("/gradio_api/run/predict", json=payload).text), ("queue", _through_queue(attacker.http, payload))):
                where = (dependency.get("api_name"), path, str(data)[:60])
                assert secret not in text and "vault" not in text, where
                assert "Traceback" not in text, (where, text[:300])
                assert "faster than" not in text, (where, text[:300])  # every attack was tried, none refused for the rate

    assert httpx.get(app_server_public.url + "/health").json()["ready"]
    assert secret in victim.inspector_text()  # nothing the victim stored was lost (a forged clear would drop the pin too)
    victim_stats = victim.http.get("/cache/stats").json()
    assert victim_stats["pins"] == 1, victim_stats


def _through_queue(http: httpx.Client, payload: dict) -> str:
    """Join the queue with ``payload`` and read the session's event stream until this event ends; all the text seen."""
    joined = http.post("/gradio_api/queue/join", json=payload)
    if joined.status_code != 200:
        return joined.text  # refused at the door (a 4xx naming the problem)
    event_id = joined.json()["event_id"]
    seen = [joined.text]
    deadline = time.monotonic() + EVENT_DEADLINE_S
    with http.stream("GET", "/gradio_api/queue/data", params={"session_hash": payload["session_hash"]}) as response:
        for line in response.iter_lines():
            seen.append(line)
            message = json.loads(line[5:]) if line.startswith("data:") else {}
            if message.get("msg") == "close_stream" or (message.get("msg") == "process_completed" and message.get("event_id") == event_id):
                return "\n".join(seen)
            assert time.monotonic() < deadline, f"event {payload['fn_index']} did not complete within {EVENT_DEADLINE_S} s"
    return "\n".join(seen)
