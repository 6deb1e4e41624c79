"""A real third-party engine: llama.cpp's llama-server, measured through this app's remote backend.

llama-server runs the bundled SmolLM2 GGUF on a free loopback port; ``python app.py --backend``
fronts it (the kind detected, not named). Everything goes over real HTTP and real event streams:
text streamed through our /v1 equals llama-server's own greedy text, a repeat reports the reused
prompt tokens from ``timings.cache_n``, "prefix cache off" is ``cache_prompt: false``, and clearing
erases llama-server's slots so the repeat after it is computed again.

The binary is built once per machine by ``python3 dev.py llama-server`` (``dev.py test`` does it
too) from llama-cpp-python's sdist into the model cache folder; ``KVCI_LLAMA_SERVER=/path`` points
at another build. Without one, every test here is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from engine import loading
from tests.conftest import REPO_ROOT, AppServer, _free_port, launch_app, stop_app

sys.path.insert(0, str(REPO_ROOT))
import dev  # noqa: E402  (standard library only: where dev.py builds llama-server)

LLAMA_SERVER_START_TIMEOUT_S = 120
# 2,048 tokens of context. One thread: on the busy 2-core test machine -t 2 decoded 0.6-1.2 tokens/s
# (its threads wait for each other at every op) and -t 1 9-10. One slot, so that what a request can
# reuse does not depend on llama-server's choice of slot. The slots endpoint, and --slot-save-path
# (added per run), without which llama-server answers 501 to every slot action, erase included.
LLAMA_SERVER_FLAGS = ("-c", "2048", "-t", "1", "-np", "1", "--slots", "--no-webui", "--host", "127.0.0.1")


def llama_server_binary() -> Path:
    """KVCI_LLAMA_SERVER, else dev.py's build; skip with the reason where there is neither."""
    override = os.environ.get("KVCI_LLAMA_SERVER")
    if override:
        if not os.access(override, os.X_OK):
            pytest.skip(f"KVCI_LLAMA_SERVER={override} is not an executable file")
        return Path(override)
    binary = dev.llama_server_binary()
    if binary is None:
        pytest.skip(dev.llama_server_not_built_reason())
    return binary


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """llama-server with the bundled GGUF on loopback, up until /health answers 200; stopped at the end."""
    binary = llama_server_binary()
    gguf = loading.bundled_gguf_path()
    if gguf is None:
        pytest.fail(f"the bundled model is not installed: {loading.INSTALL_HINT}")
    port = _free_port()
    folder = tmp_path_factory.mktemp("llama-server")
    log_path = folder / "llama-server.log"
    command = [str(binary), "-m", str(gguf), "--port", str(port), "--slot-save-path", str(folder), *LLAMA_SERVER_FLAGS]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    server = AppServer(f"http://127.0.0.1:{port}", process, log_path)
    try:
        deadline = time.monotonic() + LLAMA_SERVER_START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"llama-server exited with {process.returncode}:\n{server.log_tail()}")
            try:
                if httpx.get(server.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama-server was not healthy after {LLAMA_SERVER_START_TIMEOUT_S} s:\n{server.log_tail()}")
            time.sleep(0.3)
        yield server
    finally:
        stop_app(server)


@pytest.fixture(scope="module")
def fronted(tmp_path_factory, llama_server):
    """The app under test, measuring llama-server through its /v1 API."""
    server = launch_app(tmp_path_factory.mktemp("fronted-llama"), "--backend", llama_server.url + "/v1")
    yield server
    stop_app(server)


def system_prompt(tag: str) -> str:
    return f"Case {tag}. You are a careful assistant for a bookshop. " + "Answer briefly, politely and only about books. " * 4


def generate(url: str, **body) -> dict:
    response = httpx.post(url + "/generate", json={"max_new_tokens": 8, **body}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_health_names_llama_server(fronted, llama_server):
    """Detected from /v1/models (owned_by "llamacpp"): what it can do, times measured client-side."""
    backend = httpx.get(fronted.url + "/health").json()["backend"]
    assert backend["kind"] == "llama-server" and backend["url"] == llama_server.url and backend["timings"] == "client"
    capabilities = backend["capabilities"]
    assert [capabilities[name]["available"] for name in ("kv_cache_off", "prefix_cache_off", "cached_tokens", "clear")] == [False, True, True, True]


def test_text_streams_through_our_v1_and_equals_llama_servers_own(fronted, llama_server):
    """Our /v1 streams llama-server's greedy text in several deltas, the same text it gives directly.

    Compared hit with hit: llama-server's own README warns that logits are not bit-for-bit the same
    for a prompt computed whole and one reused from the cache, and here a miss said "novels" where
    the hit said "novel". So the direct call runs twice and the second (a hit) is the reference.
    """
    messages = [{"role": "system", "content": system_prompt("stream")}, {"role": "user", "content": "Name one novel."}]
    body = {"messages": messages, "max_tokens": 12, "temperature": 0}
    for _ in range(2):
        direct = httpx.post(llama_server.url + "/v1/chat/completions", json=body, timeout=120).json()["choices"][0]["message"]["content"]
    model = httpx.get(fronted.url + "/v1/models").json()["data"][0]["id"]
    deltas, usage = [], None
    with httpx.stream("POST", fronted.url + "/v1/chat/completions", json={**body, "model": model, "stream": True, "stream_options": {"include_usage": True}}, timeout=120) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[len("data: ") :])
                deltas += [c["delta"].get("content") or "" for c in chunk.get("choices") or []]
                usage = chunk.get("usage") or usage
    assert len([d for d in deltas if d]) > 1 and "".join(deltas) == direct
    assert usage["completion_tokens"] > 1 and usage["prompt_tokens_details"]["cached_tokens"] >= usage["prompt_tokens"] - 1  # the direct call cached it


def test_a_repeat_reports_the_reused_prompt_tokens(fronted):
    """First request computes the prompt; the repeat reuses all of it but the last token (timings.cache_n)."""
    system = system_prompt("repeat")
    first = generate(fronted.url, prompt="Recommend a short classic.", system_prompt=system)
    second = generate(fronted.url, prompt="Recommend a short classic.", system_prompt=system)
    assert first["timings"]["prompt_tokens"] == second["timings"]["prompt_tokens"] > 40  # texts may differ: see the test above
    assert first["timings"]["prefix_tokens_saved"] < 10  # at most the chat template's opening, left by the last request
    assert second["cache_status"] == "hit" and second["timings"]["prefix_tokens_saved"] >= second["timings"]["prompt_tokens"] - 1
    assert second["timings"]["prefill_tokens"] <= 1 and second["timings"]["wall_ttft_ms"] > 0


def test_prefix_cache_off_is_cache_prompt_false(fronted):
    """"Prefix cache off" sends cache_prompt: false: the prompt is computed again, nothing reported as saved."""
    system = system_prompt("off")
    generate(fronted.url, prompt="Hi", system_prompt=system)
    off = generate(fronted.url, prompt="Hi", system_prompt=system, use_prefix_cache=False)
    assert off["cache_status"] == "off" and off["timings"]["prefix_tokens_saved"] == 0
    assert httpx.post(fronted.url + "/generate", json={"prompt": "Hi", "use_cache": False, "use_prefix_cache": False}, timeout=60).status_code == 400


def test_clear_erases_the_slots_and_the_repeat_is_computed_again(fronted, llama_server):
    """Clearing through the app erases every llama-server slot; our counts restart and the repeat misses."""
    system = system_prompt("clear")
    generate(fronted.url, prompt="Hi", system_prompt=system)
    assert generate(fronted.url, prompt="Hi", system_prompt=system)["cache_status"] == "hit"
    assert httpx.get(fronted.url + "/cache/stats").json()["hits"] >= 1
    cleared = httpx.post(fronted.url + "/cache/clear").json()
    assert cleared["cleared"] == "all" and "erased llama-server's slots" in cleared["message"], cleared
    assert all(slot.get("n_ctx") for slot in httpx.get(llama_server.url + "/slots").json())
    assert httpx.get(fronted.url + "/cache/stats").json()["total_requests"] == 0
    again = generate(fronted.url, prompt="Hi", system_prompt=system)
    assert again["cache_status"] != "hit" and again["timings"]["prefix_tokens_saved"] < 10, again["timings"]
