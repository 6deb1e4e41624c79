"""The workload planner over real HTTP (ui/planner.py): REST POST /plan, gradio_client /plan, the upload cap, bad input.

Runs against the public-like app fixture (tiny model, per-session cache), as a visitor would.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from ui.limits import MAX_BODY_BYTES, PLAN_MAX_BODY_BYTES

TRACES = Path(__file__).resolve().parent.parent / "assets" / "traces"
BLOCK_TRACE = "\n".join(
    json.dumps({"timestamp": i, "input_length": len(ids) * 512 - 100, "output_length": 10, "hash_ids": ids})
    for i, ids in enumerate([[0, 1], [0, 1, 2], [0, 3], [0, 1], [7]])
)


@pytest.fixture(scope="module")
def rest(app_server_public):
    with httpx.Client(base_url=app_server_public.url, timeout=120) as client:
        yield client


def test_rest_plan_on_a_block_trace_matches_the_count_by_hand(rest):
    """POST /plan: rows per policy × budget; unbounded reuse is the by-hand count (2 + 1 + 1 blocks of 512)."""
    response = rest.post("/plan", json={"trace": BLOCK_TRACE, "model": "llama-3.1-8b", "budgets": "128MiB,inf", "policies": "lru,lfu"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["trace_kind"], body["requests"], body["kv_bytes_per_token"]) == ("blocks", 5, 128 * 1024)
    assert [(r["policy"], r["budget_bytes"]) for r in body["rows"]] == [("lru", 128 << 20), ("lru", None), ("lfu", 128 << 20), ("lfu", None)]
    assert body["rows"][1]["reused_tokens"] == 4 * 512 and body["knee"] == {"lru": "128 MiB", "lfu": "128 MiB"}


def test_rest_plan_on_a_chat_example_and_the_live_cache_is_untouched(rest):
    """A multi-turn chat trace is tokenized by the served engine's tokenizer; the replay never touches the live cache."""
    before = rest.get("/cache/stats").json()
    response = rest.post("/plan", json={"trace": (TRACES / "multi_turn_chat.jsonl").read_text(), "budgets": "1MiB,inf", "policies": "lru,fifo"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["trace_kind"] == "chat" and body["rows"][-1]["token_hit_rate"] > 0.5  # later turns reuse their history
    assert rest.get("/cache/stats").json() == before


@pytest.mark.parametrize(
    "payload, status, phrase",
    [
        ({"trace": '{"hash_ids": [1], "input_length": 5}\n{"hash_ids": "x", "input_length": 5}'}, 400, "line 2: hash_ids must be a list"),
        ({"trace": '{"token_ids": [1, 2, 3]}\n{oops'}, 400, "line 2: not valid JSON"),
        ({"trace": '{"hash_ids": [1], "input_length": -1}'}, 400, "must not be negative"),
        ({"trace": "\n\n"}, 400, "the trace is empty"),
        ({"trace": ""}, 422, "trace: String should have at least 1 character"),
        ({"trace": BLOCK_TRACE, "model": "/etc/passwd"}, 422, "model: unknown model config"),
        ({"trace": BLOCK_TRACE, "budgets": "lots"}, 422, "budgets: budget 'lots' is not a size"),
        ({"trace": BLOCK_TRACE, "budgets": ",".join(["1GiB"] * 13)}, 422, "at most 12 budgets"),
        ({"trace": BLOCK_TRACE, "policies": "random"}, 422, "unknown eviction policy"),
        ({"trace": BLOCK_TRACE, "path": "/etc/passwd"}, 422, "path: unknown field"),
        ({"trace": ["not", "text"]}, 422, "trace: Input should be a valid string"),
        ({"trace": "\n".join(['{"token_ids": [1]}'] * 20_001)}, 400, "more than 20,000 requests"),
    ],
)
def test_rest_plan_bad_input_is_a_4xx_with_a_message(rest, payload, status, phrase):
    """Every kind of bad input is refused with a readable message (never a 500, never the input echoed)."""
    response = rest.post("/plan", json=payload)
    assert response.status_code == status, response.text[:500]
    assert phrase in response.json()["detail"]
    assert len(response.content) < 4096


def test_rest_plan_size_caps_and_methods(app_server_public, rest):
    """The plan path takes bodies up to its own cap (over the generation cap); beyond it 413; JSON only; GET is 405."""
    big = "\n".join([json.dumps({"token_ids": list(range(i % 50, i % 50 + 30))}) for i in range(2500)])
    assert MAX_BODY_BYTES < len(big) < PLAN_MAX_BODY_BYTES
    response = rest.post("/plan", json={"trace": big, "budgets": "1MiB,inf"})
    assert response.status_code == 200, response.text[:300]
    assert rest.post("/generate", content=json.dumps({"prompt": big}), headers={"content-type": "application/json"}).status_code == 413
    huge = {"trace": "x" * (PLAN_MAX_BODY_BYTES + 1)}
    assert rest.post("/plan", json=huge).status_code == 413
    assert rest.post("/plan", content=BLOCK_TRACE, headers={"content-type": "text/plain"}).status_code == 415
    assert rest.get("/plan").status_code == 405


def test_page_upload_takes_a_trace_over_the_generation_cap(app_server_public):
    """The page's file upload (multipart, /gradio_api/upload) gets the plan cap: a 300 KiB trace passes, 3 MiB does not."""
    ok = httpx.post(app_server_public.url + "/gradio_api/upload", files={"files": ("trace.jsonl", b"{}\n" * 100_000)}, timeout=60)
    assert ok.status_code == 200, ok.text[:300]
    too_big = httpx.post(app_server_public.url + "/gradio_api/upload", files={"files": ("trace.jsonl", b"x" * (3 << 20))}, timeout=60)
    assert too_big.status_code == 413


def test_gradio_client_plan(app_server_public):
    """gradio_client /plan: the same rows as REST; bad input raises with the message."""
    gradio_client = pytest.importorskip("gradio_client")
    from gradio_client.exceptions import AppError

    client = gradio_client.Client(app_server_public.url, verbose=False)
    result = client.predict(BLOCK_TRACE, "llama-3.1-8b", "bf16", "128MiB,inf", "lru", 512, api_name="/plan")
    assert [r["reused_tokens"] for r in result["rows"]] == [4 * 512, 4 * 512]
    prompts = (TRACES / "shared_system_prompt.jsonl").read_text()
    assert client.predict(prompts, api_name="/plan")["trace_kind"] == "prompt"
    with pytest.raises(AppError, match="line 1: hash_ids must be a list"):
        client.predict('{"hash_ids": 5, "input_length": 3}', api_name="/plan")


# ---------------------------------------------------------------------- fair turns between callers


def test_turns_keep_a_refused_callers_place_and_let_places_lapse():
    """The line: empty lets anyone start; a refused caller goes first; the one who just ran waits behind; places lapse."""
    from ui.planner import Turns

    now = [0.0]
    turns = Turns(kept_s=30, clock=lambda: now[0], max_waiting=2)
    assert turns.may_start("a")
    turns.started("a")
    turns.wait("b")  # refused while a ran
    assert not turns.may_start("a") and turns.may_start("b")
    turns.wait("a")  # a loops: it joins behind b
    turns.started("b")
    assert turns.may_start("a") and not turns.may_start("c")
    turns.wait("c")  # the line is full (a, c): d is refused without a place
    turns.wait("d")
    now[0] = 29.0
    turns.wait("c")  # c tried again: its place is kept 30 s from now, a's lapses at 30
    now[0] = 30.5
    assert turns.may_start("c") and not turns.may_start("d")
    now[0] = 60.0
    assert turns.may_start("d")  # every place lapsed: anyone may start


def test_a_looping_caller_cannot_keep_the_planner_from_another():
    """Planner: while a's plan runs, b is refused and keeps its place; a, done and trying again at once, waits for b."""
    import threading

    from ui.planner import Planner, parse_plan
    from ui.service import Busy

    inside, release = threading.Event(), threading.Event()

    class SlowTokenizer:
        def prompt_ids(self, messages):
            inside.set()
            release.wait(30)
            return [1, 2, 3]

        def reply_ids(self, text):
            return [4]

    planner = Planner(lambda: SlowTokenizer())
    body = parse_plan({"trace": '{"prompt": "hello"}', "budgets": "inf"})
    worker = threading.Thread(target=planner.run, args=(body,), kwargs={"caller": "address:a"})
    worker.start()
    assert inside.wait(30)
    with pytest.raises(Busy, match="another workload plan is running; your place in line is kept"):
        planner.run(body, caller="address:b")
    release.set()
    worker.join(30)
    with pytest.raises(Busy, match="other callers are waiting"):
        planner.run(body, caller="address:a")
    assert planner.run(body, caller="address:b").requests == 1
    assert planner.run(body, caller="address:a").requests == 1  # a was refused after b: its turn came


def _long_block_trace(requests: int = 1500, blocks: int = 30) -> str:
    """A block trace that keeps the planner busy for seconds (~3 s here with auto budgets, two policies), under the 2 MiB cap."""
    return "\n".join(json.dumps({"timestamp": i, "input_length": blocks * 512, "output_length": 1, "hash_ids": [i % 7] + list(range(1000 + i % 97, 999 + i % 97 + blocks))}) for i in range(requests))


def test_plan_turns_over_http_between_two_addresses(app_server_behind_proxy):
    """Behind the simulated proxy, two addresses: b, refused while a's long plan runs, gets the next plan; a's
    immediate retry is a 503 with the reason and Retry-After; then a's turn comes. The planner keeps serving."""
    import threading
    import time

    def post(address: str, trace: str, budgets: str = "inf") -> httpx.Response:
        with httpx.Client(base_url=app_server_behind_proxy.url, timeout=180) as client:
            return client.post("/plan", json={"trace": trace, "budgets": budgets, "policies": "lru,lfu"}, headers={"X-Forwarded-For": address})

    def run_long() -> None:
        while (response := post("10.0.0.1", _long_block_trace(), "auto")).status_code == 503:  # b's tiny plan may have gone first
            time.sleep(0.05)
        long["response"] = response

    long: dict = {}
    worker = threading.Thread(target=run_long)
    worker.start()
    refused = None
    while worker.is_alive():  # b tries until a's plan holds the slot
        refused = post("10.0.0.2", BLOCK_TRACE)
        if refused.status_code == 503:
            break
        time.sleep(0.05)
    worker.join(180)
    assert long["response"].status_code == 200, long["response"].text
    assert refused is not None and refused.status_code == 503, "a's plan ended before b was refused: make the long trace longer"
    assert "another workload plan is running" in refused.json()["detail"] and refused.headers["retry-after"]
    again = post("10.0.0.1", BLOCK_TRACE)
    assert again.status_code == 503 and "other callers are waiting" in again.json()["detail"], again.text
    assert post("10.0.0.2", BLOCK_TRACE).status_code == 200
    assert post("10.0.0.1", BLOCK_TRACE).status_code == 200
