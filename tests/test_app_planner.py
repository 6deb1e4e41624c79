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
