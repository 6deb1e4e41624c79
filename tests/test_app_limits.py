"""Bounded work and local safety against the running app: the guard, size limits, cancellation, per-session limits, memory.

The attacks of issue 8 that are not about reading others' data: cross-site requests to a local
server, DNS rebinding, wrong methods, a 14 MB page event, tiny temperatures, abandoned work that
kept running, one client taking every slot, and bookkeeping that grew with every session id.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from pathlib import Path

import httpx
import pytest

from conftest import launch_app, stop_app
from test_app_isolation import Page, bearer, body, secret_system_prompt
from ui.limits import MAX_BODY_BYTES

STORY = "Tell me a very long story about a dragon."  # greedy, the bundled model decodes it for many seconds
LONG = 300  # new tokens: ~20 s of decoding for the bundled model on 2 cores, far longer than any check below


def inflight(url: str) -> int:
    return httpx.get(url + "/health", timeout=10).json()["inflight"]


def wait_inflight(url: str, expected: int, within_s: float) -> float:
    """Seconds until /health shows ``expected`` requests in flight; fails after ``within_s``."""
    start = time.monotonic()
    while time.monotonic() - start < within_s:
        if inflight(url) == expected:
            return time.monotonic() - start
        time.sleep(0.05)
    pytest.fail(f"{inflight(url)} requests still in flight after {within_s} s (expected {expected})")


# ---------------------------------------------------------------------- the guard (ui/security.py)


@pytest.mark.parametrize(
    "headers, content, status",
    [
        ({"Origin": "https://evil.example", "Content-Type": "text/plain"}, b'{"x": 1}', 403),  # a page on another site
        ({"Origin": "null", "Content-Type": "application/json"}, b"{}", 403),  # a sandboxed frame or a file
        ({"Content-Type": "text/plain"}, b"anything", 415),
        ({"Content-Type": "application/x-www-form-urlencoded"}, b"a=1", 415),
    ],
)
def test_cross_site_and_non_json_posts_are_refused(app_server, headers, content, status):
    """Attack 7: a web page could POST /cache/clear to a local server with text/plain and get 200."""
    response = httpx.post(app_server.url + "/cache/clear", headers=headers, content=content)
    assert response.status_code == status, response.text
    assert "access-control-allow-origin" not in response.headers


def test_scripts_and_the_own_page_still_post(app_server):
    """curl sends no Origin (and here no body): allowed. The page's own origin with JSON: allowed."""
    assert httpx.post(app_server.url + "/cache/clear").status_code == 200
    same_origin = httpx.post(app_server.url + "/cache/clear", headers={"Origin": app_server.url, "Content-Type": "application/json"}, content=b"{}")
    assert same_origin.status_code == 200


@pytest.mark.parametrize("host, status", [("evil.example", 421), ("evil.example:7860", 421), ("127.0.0.1.evil.example", 421), ("localhost:{port}", 200), ("127.0.0.1:{port}", 200), ("[::1]:{port}", 200)])
def test_a_loopback_server_checks_the_host_header(app_server, host, status):
    """Attack 7: DNS rebinding. A loopback server answers only to loopback names."""
    port = app_server.url.rsplit(":", 1)[1]
    response = httpx.get(app_server.url + "/health", headers={"Host": host.format(port=port)})
    assert response.status_code == status, response.text


@pytest.mark.parametrize("method, path", [("GET", "/generate"), ("PUT", "/generate"), ("DELETE", "/cache/clear"), ("GET", "/cache/clear"), ("POST", "/cache/stats"), ("GET", "/session"), ("POST", "/health")])
def test_wrong_methods_on_rest_routes_get_405(app_server, method, path):
    """Gradio is mounted at "/", so a wrong method used to fall through to it; now it is a 405 with Allow."""
    response = httpx.request(method, app_server.url + path)
    assert response.status_code == 405 and response.headers["allow"], response.text


def test_no_cors_headers_for_other_origins(app_server):
    """Routes other than the page let no other origin read them: no Access-Control-Allow-* at all."""
    for method, path in (("GET", "/cache/stats"), ("GET", "/health"), ("OPTIONS", "/gradio_api/run/predict"), ("GET", "/config")):
        response = httpx.request(method, app_server.url + path, headers={"Origin": "http://localhost:9999", "Access-Control-Request-Method": "POST"})
        assert not any(name.startswith("access-control-allow") for name in response.headers), (path, response.headers)


@pytest.mark.parametrize("path", ["/gradio_api/queue/join", "/gradio_api/run/predict", "/generate"])
def test_a_14_mb_body_is_refused_fast_and_the_app_keeps_serving(app_server_public, path):
    """Attack 5: a 14 MB page event was tokenized for 7 s holding the tokenizer lock; now any body over the cap is a 413."""
    big = b'{"fn_index": 0, "data": ["' + b"a" * 14_000_000 + b'"], "session_hash": "x"}'
    start = time.monotonic()
    response = httpx.post(app_server_public.url + path, content=big, headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 413 and time.monotonic() - start < 3, response.text[:200]

    def chunks():  # no Content-Length: the cap counts what arrives
        for _ in range(MAX_BODY_BYTES // 65536 + 2):
            yield b"a" * 65536

    assert httpx.post(app_server_public.url + path, content=chunks(), headers={"Content-Type": "application/json"}, timeout=60).status_code == 413
    assert httpx.post(app_server_public.url + "/generate", json=body("short system prompt", max_new_tokens=1), timeout=60).status_code == 200


@pytest.mark.parametrize("temperature, top_p", [(1e-38, 1.0), (1e-38, 1e-46), (0.5, 1e-46), (1e-300, 0.5)])
def test_tiny_temperatures_and_top_p_are_answered(app_server_public, temperature, top_p):
    """Attack 6: temperature 1e-38 and top_p 1e-46 gave a 500 (inf / inf in the softmax); now they sample like greedy."""
    request = body("You answer in one word.", temperature=temperature, top_p=top_p, seed=1)
    response = httpx.post(app_server_public.url + "/generate", json=request, timeout=60)
    assert response.status_code == 200, response.text
    greedy = httpx.post(app_server_public.url + "/generate", json=body("You answer in one word."), timeout=60).json()
    if temperature < 1e-30:
        assert response.json()["token_ids"] == greedy["token_ids"]


def test_prompts_over_max_prompt_tokens_are_refused(app_server_public):
    """Attack 5: one 8k-token prompt prefilled for 60 s; a public server caps prompts (here 256 tokens) with a 400."""
    response = httpx.post(app_server_public.url + "/generate", json=body(None, prompt="word " * 600), timeout=60)
    assert response.status_code == 400 and "256" in response.json()["detail"], response.text


# ---------------------------------------------------------------------- cancellation and per-session limits (bundled model: slow decode)


def test_a_dropped_rest_request_frees_its_slot_within_a_second(app_server_per_session):
    """Attack 5: a client that hangs up used to leave its generation running to the end."""
    url = app_server_per_session.url
    # The page test's prompt: greedy, it decodes far past the client's 2 s (a random system prompt
    # can end in EOS within 2 s, and then there is nothing to drop).
    request = {"prompt": STORY, "max_new_tokens": LONG, "use_cache": True, "use_prefix_cache": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/generate", json=request, timeout=httpx.Timeout(10, read=2.0))
    assert wait_inflight(url, 0, within_s=1.5) < 1.5


def test_a_dropped_page_stream_frees_its_slot_within_a_second(app_server_per_session):
    """Attack 5: a page closed mid-stream (13 s of decoding left) stops at the next token."""
    url = app_server_per_session.url
    page = Page(url)
    for message in page.stream("on_generate", None, STORY, True, True, LONG, 0, 1.0, 0, None):
        if message.get("msg") == "process_generating":
            break  # leaving the with-block closes the event stream, as a closed tab does
    page.http.close()
    assert wait_inflight(url, 0, within_s=1.5) < 1.5


def test_gradio_client_job_cancel_stops_the_request(app_server_per_session):
    """Attack 5: job.cancel() from gradio_client used to leave the request running."""
    gradio_client = pytest.importorskip("gradio_client")
    url = app_server_per_session.url
    client = gradio_client.Client(url, verbose=False, headers=bearer(url))
    job = client.submit(STORY, None, LONG, api_name="/generate")
    wait_inflight(url, 1, within_s=30)
    time.sleep(0.5)
    job.cancel()
    assert wait_inflight(url, 0, within_s=2.0) < 2.0


def test_one_session_gets_at_most_two_requests_in_flight_then_503_with_retry_after(app_server_per_session):
    """Attack 5: one client took every worker slot; now its third concurrent request is refused with Retry-After."""
    url = app_server_per_session.url
    headers = bearer(url)
    request = {"prompt": STORY, "max_new_tokens": LONG, "use_cache": True, "use_prefix_cache": True}  # decodes past the 6 s hang-up

    def hold() -> None:  # a request that hangs up after 6 s: its job is cancelled then
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/generate", json=request, headers=headers, timeout=httpx.Timeout(10, read=6))

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for thread in threads:
        thread.start()
    wait_inflight(url, 2, within_s=10)
    third = httpx.post(url + "/generate", json=request, headers=headers, timeout=30)
    assert third.status_code == 503 and int(third.headers["retry-after"]) > 0 and "this session" in third.json()["detail"]
    other = httpx.post(url + "/generate", json=body(secret_system_prompt(), max_new_tokens=1), headers=bearer(url), timeout=60)
    assert other.status_code == 200  # another session is served meanwhile
    for thread in threads:
        thread.join()
    wait_inflight(url, 0, within_s=2.0)


def test_minted_sessions_and_forged_forwarding_do_not_get_past_the_address_limit(app_server_behind_proxy):
    """Attack: POST /session is free, so one machine minted ids and filled the whole queue; rotating
    the X-Forwarded-For entry it writes itself made it a new address at every request. Now all its
    sessions count against its address (the entry our proxy appended), and other machines are served."""
    url = app_server_behind_proxy.url
    request = {"prompt": STORY, "max_new_tokens": LONG, "use_cache": True, "use_prefix_cache": True}

    def via_proxy(client_ip: str) -> dict[str, str]:  # what the proxy forwards: the client's own claim, then the address it saw
        return {"X-Forwarded-For": f"{uuid.uuid4().int % 256}.1.2.3, {client_ip}"}

    def hold(headers: dict[str, str]) -> None:  # hangs up after 6 s: its job is cancelled then
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/generate", json=request, headers=headers, timeout=httpx.Timeout(10, read=6))

    attacker = "198.51.100.7"
    threads = [threading.Thread(target=hold, args=({**bearer(url), **via_proxy(attacker)},)) for _ in range(3)]
    for thread in threads:
        thread.start()
    wait_inflight(url, 3, within_s=10)
    for headers in ({**bearer(url), **via_proxy(attacker)}, via_proxy(attacker)):  # a fourth fresh session, and no session at all
        refused = httpx.post(url + "/generate", json=request, headers=headers, timeout=30)
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) > 0, refused.text
        assert "your address may have 3 requests" in refused.json()["detail"], refused.text
    other = httpx.post(url + "/generate", json=body(secret_system_prompt(), max_new_tokens=1), headers={**bearer(url), **via_proxy("203.0.113.9")}, timeout=60)
    assert other.status_code == 200, other.text  # another machine is served (after the held jobs hang up)
    for thread in threads:
        thread.join()
    wait_inflight(url, 0, within_s=2.0)


@pytest.mark.parametrize("forwarded", [",,", "6.6.6.6,", "<script>, ::1", "9" * 8_000])  # httpx sends no value with edge spaces
def test_odd_forwarded_headers_are_answered_and_the_app_keeps_serving(app_server_behind_proxy, forwarded):
    """Attack: empty, markup and 8 KB X-Forwarded-For values, anonymous: a clear answer (never a 500), and the server goes on."""
    url = app_server_behind_proxy.url
    response = httpx.post(url + "/generate", json=body(secret_system_prompt(), max_new_tokens=1), headers={"X-Forwarded-For": forwarded}, timeout=60)
    assert response.status_code in (200, 400, 431, 503), response.text
    assert httpx.get(url + "/health", timeout=10).json()["ready"]


# ---------------------------------------------------------------------- memory


def rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


SESSIONS = 2000
RSS_GROWTH_BOUND_MIB = 120


def test_rss_settles_after_2000_sessions(app_server_public):
    """Attack 5: 2,000 session ids added ~700 MiB; now namespaces, counters and page state are freed or bounded."""
    url = app_server_public.url
    pid = app_server_public.process.pid
    page = Page(url, cookie=False, polite=False)  # its new hashes may be refused (429), and that is allowed

    def one(i: int) -> None:
        headers = {"X-Session-Id": f"rss-{i:06d}-{uuid.uuid4().hex}"}
        response = httpx.post(url + "/generate", json=body(f"Session {i}: you are a terse assistant; answer in one word only.", max_new_tokens=1), headers=headers, timeout=60)
        assert response.status_code == 200, response.text
        if i % 4 == 0:  # a page session too: gr.State per session_hash
            assert page.event("on_inspect", None, "hits").status_code in (200, 429)  # 429: past the address's rate of new page sessions
            page.session_hash = uuid.uuid4().hex

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(100)))  # warm up allocators and caches
    before = rss_mib(pid)
    start = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(100, 100 + SESSIONS)))
    elapsed = time.monotonic() - start
    time.sleep(3)  # past the 2 s namespace idle time
    httpx.post(url + "/generate", json=body("One more request to let idle namespaces go.", max_new_tokens=1), headers=bearer(url), timeout=60)
    after = rss_mib(pid)
    print(f"RSS {before:.0f} -> {after:.0f} MiB after {SESSIONS} sessions in {elapsed:.1f} s")
    assert after - before < RSS_GROWTH_BOUND_MIB, f"RSS grew {after - before:.0f} MiB ({before:.0f} -> {after:.0f})"


# ---------------------------------------------------------------------- a model that cannot load


def test_an_app_whose_model_cannot_load_refuses_every_route_with_503_the_reason_and_retry_after(tmp_path):
    """A broken model folder: the process keeps serving; REST, /v1 and the page's events all say why (503
    with Retry-After on HTTP, the reason in a gr.Error on the page), and /health reports the error."""
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    server = launch_app(tmp_path, "--model", str(broken), expect_load_error=True)
    try:
        url = server.url
        health = httpx.get(url + "/health").json()
        assert not health["ready"] and "could not be loaded" in health["error"], health
        calls = [
            ("POST", "/generate", body("Hello there.")),
            ("GET", "/cache/stats", None),
            ("POST", "/cache/clear", None),
            ("POST", "/cache/warm", {"system_prompt": "You are terse."}),
            ("POST", "/cache/unpin", {"system_prompt": "You are terse."}),
            ("POST", "/cache/save", None),
            ("POST", "/v1/chat/completions", {"model": "any", "messages": [{"role": "user", "content": "Hi"}]}),
        ]
        for method, path, json_body in calls:
            response = httpx.request(method, url + path, json=json_body, timeout=30)
            assert response.status_code == 503, (path, response.status_code, response.text)
            assert int(response.headers["retry-after"]) > 0, path
            assert "could not be loaded" in response.text, (path, response.text)
        page = Page(url)
        inspected = page.event("on_inspect", None, "hits")  # the inspector's text says why
        assert inspected.status_code == 200 and inspected.json()["data"][0].startswith("The model could not be loaded"), inspected.text
        cleared = page.event("on_clear", None, "hits")  # a gr.Error with the reason
        assert "could not be loaded" in cleared.json().get("error", ""), cleared.text
        assert httpx.get(url + "/health").json()["error"] == health["error"] and server.process.poll() is None
    finally:
        stop_app(server)


# ---------------------------------------------------------------------- the disk: uploads, deep links, plan files


TRACE_LINE = '{"timestamp": 0, "input_length": 1000, "output_length": 10, "hash_ids": [0, 1]}\n'


def upload(url: str, data: bytes, address: str | None = None) -> httpx.Response:
    """The page's file upload (multipart to /gradio_api/upload), from ``address`` behind the app's proxy."""
    headers = {"X-Forwarded-For": address} if address else {}
    return httpx.post(url + "/gradio_api/upload", files={"files": ("trace.jsonl", data)}, headers=headers, timeout=60)


def test_uploads_past_an_address_share_get_429_and_other_addresses_still_upload(app_server_behind_proxy):
    """Attack: a script posting 2 MiB uploads in a loop filled the disk (Gradio keeps every upload).
    Now one address may upload a sixteenth of the 512 MiB budget within the time uploads are kept."""
    url, flooder = app_server_behind_proxy.url, f"10.7.{uuid.uuid4().int % 250}.1"
    accepted, refused = 0, None
    for i in range(20):
        response = upload(url, (uuid.uuid4().hex.encode() * (1 << 16))[: (2 << 20) - (16 << 10)], flooder)  # 2 MiB less 16 KiB (a file is charged 8 KiB beside its bytes), each one distinct
        if response.status_code != 200:
            refused = response
            break
        accepted += 1
    assert refused is not None and refused.status_code == 429, (accepted, refused and refused.text)
    assert accepted == 16 and int(refused.headers["retry-after"]) > 0 and "its share" in refused.json()["detail"], refused.text
    assert upload(url, b'{"hash_ids": [1]}\n', f"10.8.{uuid.uuid4().int % 250}.1").status_code == 200  # another address
    assert httpx.get(url + "/health").json()["ready"]


def test_upload_progress_keeps_nothing_per_upload_id(app_server_public):
    """Attack: Gradio kept an entry per upload_id, never freed, for each id an upload named and each id anyone
    asked /gradio_api/upload_progress about (after a 3 s wait): a loop of GETs with long random ids grew the
    memory without bound. Now the guard drops upload_id from uploads and answers the progress route 404 at once."""
    url = app_server_public.url
    upload_id = uuid.uuid4().hex
    done = httpx.post(url + "/gradio_api/upload", params={"upload_id": upload_id}, files={"files": ("trace.jsonl", b'{"hash_ids": [1]}\n')}, timeout=60)
    assert done.status_code == 200, done.text
    for asked in (upload_id, "x" * 4000):
        start = time.monotonic()
        progress = httpx.get(url + "/gradio_api/upload_progress", params={"upload_id": asked}, timeout=10)
        assert progress.status_code == 404 and "upload progress" in progress.json()["detail"], progress.text
        assert time.monotonic() - start < 1.0  # refused by the guard, not after Gradio's 3 s wait


def test_odd_uploads_and_paths_go_through_the_same_budget_and_refusals(app_server_behind_proxy):
    """Attacks on the new refusals: a chunked upload with no Content-Length (held chunk by chunk, counted
    by the budget), a trailing slash on the upload, deep-link and progress paths, anonymous page callers."""
    url, address = app_server_behind_proxy.url, f"10.6.{uuid.uuid4().int % 250}.1"
    boundary = "kvci-odd"
    part = uuid.uuid4().hex.encode() * (1 << 15)  # 1 MiB

    def chunked():
        yield f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"t.jsonl\"\r\n\r\n".encode()
        for i in range(0, len(part), 64 << 10):
            yield part[i : i + (64 << 10)]
        yield f"\r\n--{boundary}--\r\n".encode()

    headers = {"X-Forwarded-For": address, "Content-Type": f"multipart/form-data; boundary={boundary}"}
    statuses = [httpx.post(url + "/gradio_api/upload", content=chunked(), headers=headers, timeout=60).status_code for _ in range(32)]
    assert statuses == [200] * 31 + [429], statuses  # 31 uploads of 1 MiB and their framing fit the address's 32 MiB share
    slash = httpx.post(url + "/gradio_api/upload/", files={"files": ("t.jsonl", part)}, headers={"X-Forwarded-For": address}, timeout=30)
    assert slash.status_code == 429, slash.text  # the same budget (and body cap), with or without the slash
    for path in ("/gradio_api/deep_link/", "/gradio_api/upload_progress/"):
        refused = httpx.get(url + path, params={"session_hash": "x", "upload_id": "x"}, timeout=10)
        assert refused.status_code == 404, (path, refused.text)
    assert httpx.get(url + "/health", timeout=10).json()["ready"]


def test_uploads_stay_within_the_budget_and_go_after_the_kept_time_and_deep_links_write_nothing(tmp_path, tiny_model_folder):
    """A 6 MiB budget, uploads kept 3 s: 1 MiB uploads from three addresses fill it (429 past an address's share,
    503 past everyone's); the disk never holds more; the files are deleted and the budget frees up again.
    The page's plan files: only the newest plan's stay in the planner's folder. Deep links: 404, no file."""
    gradio_dir = tmp_path / "gradio"
    server = launch_app(
        tmp_path, "--public", "--trust-proxy", "--model", str(tiny_model_folder), "--upload-budget-mb", "6", "--upload-kept-min", "0.05",
        env_extra={"GRADIO_TEMP_DIR": str(gradio_dir), "TMPDIR": str(tmp_path)},
    )
    try:
        url = server.url

        def on_disk() -> int:
            return sum(f.stat().st_size for f in gradio_dir.rglob("*") if f.is_file())

        def one_mib(address: str) -> httpx.Response:
            return upload(url, uuid.uuid4().hex.encode() * (1 << 15), address)  # 1 MiB, distinct

        statuses, paths = [], []
        for address in ("10.1.0.1", "10.1.0.1", "10.1.0.1", "10.1.0.2", "10.1.0.2", "10.1.0.3", "10.1.0.3"):
            response = one_mib(address)
            statuses.append(response.status_code)
            if response.status_code == 200:
                paths += response.json()
            else:
                assert int(response.headers["retry-after"]) > 0, response.text
            assert on_disk() <= 6 << 20
        assert statuses == [200, 200, 429, 200, 200, 200, 503], statuses
        assert len(paths) == 5 and all(Path(p).is_file() and Path(p).is_relative_to(gradio_dir) for p in paths)

        deadline = time.monotonic() + 30
        while any(Path(p).exists() for p in paths) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not any(Path(p).exists() for p in paths), "uploads were not deleted after the kept time"
        deadline = time.monotonic() + 30
        while (response := one_mib("10.1.0.3")).status_code != 200 and time.monotonic() < deadline:
            time.sleep(1)  # the budget forgets an upload a few seconds after the file went
        assert response.status_code == 200, response.text

        page = Page(url)
        page.event("on_inspect", None, "hits").raise_for_status()  # the session now has page state
        deep = page.http.get("/gradio_api/deep_link", params={"session_hash": page.session_hash})
        assert deep.status_code == 404 and not (gradio_dir / "deep_links").exists(), deep.text

        trace = page.http.post("/gradio_api/upload", files={"files": ("trace.jsonl", (TRACE_LINE * 4).encode())}).json()[0]  # the page's own upload: only its session may use it
        file_data = {"path": trace, "orig_name": "trace.jsonl", "meta": {"_type": "gradio.FileData"}}
        assert page.event("_on_upload", file_data).status_code == 200  # the upload box: the bytes go to the page's state
        for _ in range(2):
            messages = list(page.stream("on_plan", "my upload", None, "llama-3.1-8b", "bf16", "auto", ["lru"], 512))  # succeeds, or the stream asserts
            assert messages[-1]["output"]["data"][0].startswith("**Llama-3.1-8B**"), messages[-1]
        planner_folders = list(tmp_path.glob("kvci-plans-*"))
        assert len(planner_folders) == 1 and len(list(planner_folders[0].iterdir())) == 1  # the newest plan's files only
        assert server.process.poll() is None
    finally:
        stop_app(server)


def test_upload_budget_counts_per_address_and_in_all_and_forgets_after_the_window():
    """The budget with a fake clock: an address's share, everyone's total, Retry-After, and forgetting."""
    from ui.security import UploadBudget

    now = [0.0]
    budget = UploadBudget(total=100_000, kept_s=30, per_address=40_000, clock=lambda: now[0])
    assert budget.delete_cache() == (10, 30) and budget.window_s == 45
    assert budget.admit("a", 40_000) is None
    status, reason, headers = budget.admit("a", 1)  # past a's share (a small upload counts 4 KiB)
    assert status == 429 and headers["Retry-After"] == "45" and "its share" in reason and "in 45 s" in reason
    now[0] = 20.0
    assert budget.admit("b", 40_000) is None
    status, _, headers = budget.admit("c", 40_000)  # past everyone's: 120,000 > 100,000
    assert status == 503 and headers["Retry-After"] == "25"  # when a's upload at t=0 is forgotten
    now[0] = 45.0
    assert budget.admit("c", 40_000) is None and budget.admit("a", 20_000) is None  # a's first upload is forgotten: 100,000
    assert budget.admit("d", 1)[0] == 503  # refused, and counted nowhere
    now[0] = 200.0
    assert budget.admit("d", 40_000) is None and budget._bytes == {"d": 40_000} and budget._sum == 40_000


# ---------------------------------------------------------------------- memory: bodies held at once


SLOW_UPLOADS = 200


def test_many_slow_uploads_at_once_do_not_hold_more_than_the_body_memory_budget(app_server_behind_proxy):
    """Attack: 200 connections, each from its own address, declare a 2 MiB upload, send all of it but the
    last byte and wait. The guard held every body read so far: 400 MiB. Now bodies in memory are bounded
    (128 MiB in all): most are refused at once with 503, RSS stays bounded, and other requests still pass."""
    url, pid = app_server_behind_proxy.url, app_server_behind_proxy.process.pid
    port = int(url.rsplit(":", 1)[1])
    boundary = "kvci-slow"
    data = os.urandom((2 << 20) - 4096)
    body = f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"t.jsonl\"\r\n\r\n".encode() + data + f"\r\n--{boundary}--\r\n".encode()
    before = rss_mib(pid)
    sockets, refused = [], 0
    try:
        for i in range(SLOW_UPLOADS):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            head = (f"POST /gradio_api/upload HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Forwarded-For: 10.9.{i // 200}.{i % 200 + 1}\r\n"
                    f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n")
            sock.sendall(head.encode())
            sock.setblocking(False)
            try:
                sock.sendall(body[:-1])  # all but the last byte, then wait
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                pass  # refused, or the server stopped reading: either way nothing more is sent
            sockets.append(sock)
        time.sleep(2)
        held = rss_mib(pid) - before
        for sock in sockets:
            sock.setblocking(True)
            sock.settimeout(0.2)
            try:
                refused += sock.recv(200).startswith(b"HTTP/1.1 503")
            except (socket.timeout, ConnectionResetError):
                pass
        assert httpx.get(url + "/health", timeout=10).json()["ready"]
        assert upload(url, b'{"hash_ids": [1]}\n', "10.8.250.1").status_code in (200, 503)  # answered, not hung
        print(f"RSS +{held:.0f} MiB with {SLOW_UPLOADS} slow uploads; {refused} refused at once")
        assert held < 200, f"{held:.0f} MiB held by {SLOW_UPLOADS} slow 2 MiB uploads"
        assert refused >= SLOW_UPLOADS // 2
    finally:
        for sock in sockets:
            sock.close()


def test_the_guard_gives_a_body_back_when_its_request_ends_however_it_ends():
    """BodyBudget through the Guard itself (ASGI, no server): a finished request, a client that went away
    mid-body and a route that raised all give their bytes back; one address past its share gets 503."""
    import asyncio

    from ui.security import BodyBudget, Guard, UploadBudget
    from ui.sessions import SessionIssuer

    async def route(scope, receive, send):
        if scope["path"] == "/boom":
            raise RuntimeError("the route failed")
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    bodies = BodyBudget(total=1_000, per_address=600)
    guard = Guard(route, check_host=False, issuer=SessionIssuer(False), routes=lambda: [], uploads=UploadBudget(10**9, 60), bodies=bodies)

    async def call(path: str, length: int, messages: list[dict]) -> int:
        scope = {"type": "http", "method": "POST", "path": path, "headers": [(b"content-type", b"application/json"), (b"content-length", str(length).encode())], "client": ("10.0.0.1", 1), "query_string": b""}
        sent = []

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        try:
            await guard(scope, receive, send)
        except RuntimeError:
            return 500
        return next(m["status"] for m in sent if m["type"] == "http.response.start")

    async def scenario() -> None:
        assert await call("/ok", 500, [{"type": "http.request", "body": b"x" * 500, "more_body": False}]) == 200
        assert await call("/gone", 500, [{"type": "http.request", "body": b"x" * 100, "more_body": True}, {"type": "http.disconnect"}]) == 200
        assert await call("/boom", 500, [{"type": "http.request", "body": b"x" * 500, "more_body": False}]) == 500
        assert bodies.held == 0 and not bodies._by_address
        assert await call("/ok", 700, []) == 503  # over the address's 600

    asyncio.run(scenario())
