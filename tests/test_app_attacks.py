"""The attacks of issue 21 against the running app, each over real HTTP, each failing before its fix.

File reads by a client-given path, page streams read or cancelled by a stranger holding the Gradio
``session_hash``, 500s from odd headers, slow clients, cheap queue joins. Most run against
``app_server_public`` (a loopback server behaving as a public one: per-session, the tiny model).
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from test_app_isolation import client

TRACE = '{"prompt": "%s"}\n'


class Visitor:
    """A browser: its session cookie (set by loading the page), its Gradio session hash, the page's events by fn_index."""

    def __init__(self, url: str, cookie: bool = True, session_hash: str | None = None, headers: dict | None = None) -> None:
        self.http = client(url, timeout=60, headers=headers or {})
        if cookie:
            self.http.get("/").raise_for_status()
        self.config = self.http.get("/config").json()
        self.fn = {d["api_name"]: i for i, d in enumerate(self.config["dependencies"])}
        self.session_hash = session_hash or uuid.uuid4().hex

    def join(self, name: str, *data, session_hash: str | None = None) -> httpx.Response:
        payload = {"fn_index": self.fn[name], "data": list(data), "session_hash": session_hash or self.session_hash}
        return self.http.post("/gradio_api/queue/join", json=payload)

    def messages(self, session_hash: str | None = None, limit_s: float = 60) -> list[dict]:
        """The queue's server-sent messages for a session hash, up to the first completed event (or the stream's end)."""
        seen, deadline = [], time.monotonic() + limit_s
        with self.http.stream("GET", "/gradio_api/queue/data", params={"session_hash": session_hash or self.session_hash}) as response:
            if response.status_code != 200:
                response.read()
                return [{"msg": "refused", "status": response.status_code, "text": response.text}]
            for line in response.iter_lines():
                if line.startswith("data:"):
                    seen.append(json.loads(line[5:]))
                    if seen[-1].get("msg") in ("process_completed", "close_stream") or time.monotonic() > deadline:
                        break
        return seen

    def upload(self, data: bytes, name: str = "trace.jsonl") -> str:
        response = self.http.post("/gradio_api/upload", files={"files": (name, data)})
        assert response.status_code == 200, response.text
        return response.json()[0]

    def file_events(self) -> list[tuple[int, int, int, bool]]:
        """Every page event with a file input: (fn_index, its number of inputs, the file input's position, queued)."""
        kinds = {c["id"]: c.get("type") for c in self.config["components"]}
        found = []
        for i, dependency in enumerate(self.config["dependencies"]):
            for position, component in enumerate(dependency["inputs"]):
                if kinds.get(component) in ("file", "uploadbutton", "files", "image", "audio", "video", "model3d"):
                    found.append((i, len(dependency["inputs"]), position, dependency.get("queue") is not False))
        assert found, "the page has no file input: the planner's upload was expected"
        return found

    def send_file(self, value) -> list[httpx.Response]:
        """``value`` as the file input of every page event that takes one (others None), as any script can send it."""
        answers = []
        for fn_index, n_inputs, position, queued in self.file_events():
            data = [None] * n_inputs
            data[position] = value
            payload = {"fn_index": fn_index, "data": data, "session_hash": self.session_hash}
            answers.append(self.http.post("/gradio_api/queue/join" if queued else "/gradio_api/run/predict", json=payload))
        return answers


def generate_args(prompt, system_prompt=None, max_new_tokens: int = 4) -> list:
    """The gradio_client /generate event's inputs, every one given (its page-free twin of the page's generate)."""
    return [prompt, system_prompt, max_new_tokens, True, True, 0.0, 1.0, None, False, 1.0, 0, 0.0, 0.0]


def file_data(path: str, **extra) -> dict:
    """What the page sends for an uploaded file: Gradio's FileData, here with any path."""
    return {"path": path, "url": None, "orig_name": Path(path).name, "size": None, "mime_type": None, "is_stream": False, "meta": {"_type": "gradio.FileData"}, **extra}


def gradio_temp_files_holding(marker: bytes) -> list[Path]:
    """Files in Gradio's upload/cache folder whose bytes hold ``marker``: what a read by path would have copied there."""
    folder = Path(os.environ.get("GRADIO_TEMP_DIR") or Path(os.environ.get("TMPDIR", "/tmp")) / "gradio")
    found = []
    for path in folder.rglob("*") if folder.exists() else []:
        try:
            if path.is_file() and path.stat().st_size < 1 << 20 and marker in path.read_bytes():
                found.append(path)
        except OSError:
            continue
    return found


# ---------------------------------------------------------------------- finding 1: no file by a client-given path


def outside_trace(tmp_path: Path) -> tuple[Path, bytes]:
    marker = f"AWS_SECRET={uuid.uuid4().hex}".encode()
    secret = tmp_path / "secrets" / "outside.jsonl"
    secret.parent.mkdir()
    secret.write_bytes((TRACE % marker.decode()).encode() * 4)
    return secret, marker


def test_no_page_event_opens_a_file_by_a_client_given_path(app_server_public, tmp_path):
    """Attack (finding 1): the planner's FileData ``path`` named any server file; the app opened it, copied it into
    Gradio's cache and named its keys in the error. Now only a file this session uploaded is accepted."""
    secret, marker = outside_trace(tmp_path)
    visitor = Visitor(app_server_public.url)
    for variant in (file_data(str(secret)), file_data(f"{secret.parent}/../secrets/{secret.name}"), file_data(str(secret), url=f"/gradio_api/file={secret}")):
        for answer in visitor.send_file(variant):
            assert answer.status_code in (400, 403), (answer.status_code, answer.text)
            assert marker.decode() not in answer.text and str(secret) not in answer.text
    time.sleep(0.5)
    assert not gradio_temp_files_holding(marker)
    assert httpx.get(app_server_public.url + "/health").json()["ready"]


@pytest.mark.parametrize("route", ["queue/join", "run/predict", "call/generate", "run/generate", "component_server"])
def test_no_route_takes_a_file_path_in_any_field(app_server_public, tmp_path, route):
    """Attack (finding 1): Gradio copies a FileData found in ANY input (a textbox, an API string) into its cache
    before the handler runs: the GGUF and libtorch were copied that way. Every Gradio POST route refuses it first."""
    secret, marker = outside_trace(tmp_path)
    visitor = Visitor(app_server_public.url)
    smuggled = [file_data(str(secret)), {"nested": [file_data(str(secret))]}, file_data("http://127.0.0.1:9/x")]
    for value in smuggled:
        if route == "queue/join":
            response = visitor.join("generate", *generate_args(value))
        elif route == "run/predict":
            response = visitor.http.post("/gradio_api/run/predict", json={"fn_index": visitor.fn["cache_stats"], "data": [value], "session_hash": visitor.session_hash})
        elif route == "component_server":
            response = visitor.http.post("/gradio_api/component_server", json={"session_hash": visitor.session_hash, "component_id": 1, "fn_name": "x", "data": value})
        else:
            response = visitor.http.post(f"/gradio_api/{route}", json={"data": [value]})
        assert response.status_code in (400, 403), (route, response.status_code, response.text)
        assert "uploaded" in response.json()["detail"], response.text
    time.sleep(0.5)
    assert not gradio_temp_files_holding(marker)


def test_only_the_uploading_session_may_use_its_upload(app_server_public):
    """The planner still takes a trace the page uploaded (the path Gradio's upload route answered, for this
    cookie session); another visitor holding that path is refused, so an upload is not a shared file."""
    trace = (TRACE % f"mine {uuid.uuid4().hex}").encode() * 8
    owner, stranger = Visitor(app_server_public.url), Visitor(app_server_public.url)
    path = owner.upload(trace)
    assert all(answer.status_code == 200 for answer in owner.send_file(file_data(path)))
    for other in (stranger, Visitor(app_server_public.url, cookie=False)):
        for refused in other.send_file(file_data(path)):
            assert refused.status_code == 403 and "uploaded" in refused.json()["detail"], refused.text
        served = other.http.get(f"/gradio_api/file={path}")
        assert served.status_code == 403 and trace not in served.content, served.status_code  # nor served back to another
    assert owner.http.get(f"/gradio_api/file={path}").content == trace


# ---------------------------------------------------------------------- finding 2: page streams bound to the cookie session


def test_a_stranger_with_the_session_hash_cannot_read_join_or_cancel(app_server_public):
    """Attack (finding 2): polling queue/data with another visitor's session_hash got their process_completed (their
    system prompt rebuilt from the token highlights), and /cancel with it cancelled their job. Now the hash belongs
    to the cookie session that first used it: a stranger gets 403 everywhere, and the owner's stream completes."""
    url = app_server_public.url
    owner = Visitor(url)
    secret = f"Secret {uuid.uuid4().hex}"
    joined = owner.join("generate", *generate_args("Say hi", secret, 8))
    assert joined.status_code == 200, joined.text
    event_id = joined.json()["event_id"]
    for stranger in (Visitor(url, session_hash=owner.session_hash), Visitor(url, cookie=False, session_hash=owner.session_hash)):
        assert stranger.messages()[0] == {"msg": "refused", "status": 403, "text": stranger.messages()[0]["text"]}
        cancel = stranger.http.post("/gradio_api/cancel", json={"session_hash": owner.session_hash, "fn_index": owner.fn["generate"], "event_id": event_id})
        assert cancel.status_code == 403, cancel.text
        cancel = stranger.http.post("/gradio_api/cancel", json={"session_hash": stranger.session_hash + "x", "fn_index": owner.fn["generate"], "event_id": event_id})
        assert cancel.status_code == 403, cancel.text  # the event id alone is no key either
        assert stranger.join("on_inspect", None, "hits").status_code == 403
        assert stranger.http.get(f"/gradio_api/heartbeat/{owner.session_hash}").status_code == 403
    messages = owner.messages()
    assert messages[-1]["msg"] == "process_completed" and messages[-1]["success"], messages[-1:]


def test_an_unknown_session_hash_is_a_404_without_a_traceback(app_server_public):
    """Attack (finding 9): GET queue/data?session_hash=nope logged a 7 KB traceback per call. Now a 404, one short log line."""
    before = len(app_server_public.log_path.read_bytes())
    for _ in range(20):
        response = httpx.get(app_server_public.url + "/gradio_api/queue/data", params={"session_hash": "nope" + "x" * 5000}, timeout=10)
        assert response.status_code == 404, response.text
    time.sleep(0.5)
    logged = app_server_public.log_path.read_bytes()[before:]
    assert b"Traceback" not in logged and len(logged) < 20 * 400, logged[-2000:]


# ---------------------------------------------------------------------- finding 9: no 500 on any header, cookie or Origin


def raw_request(url: str, request: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes to the app and return what it answers (the status line first)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


@pytest.mark.parametrize("header", [b"Cookie: kvci_session=\xe9.x", b"Cookie: kvci_session=\xe9\xe9\xe9", b"Origin: http://[", b"Origin: http://[::1", b"Origin: \xff\xfe", b"Authorization: Bearer \xe9" + b"a" * 40, b"X-Session-Id: \xe9"])
@pytest.mark.parametrize("method, path", [("GET", "/"), ("GET", "/health"), ("POST", "/generate"), ("POST", "/gradio_api/queue/join"), ("GET", "/gradio_api/queue/data?session_hash=x")])
def test_odd_headers_are_never_a_500(app_server_public, header, method, path):
    """Attack (finding 9): a non-ASCII session cookie gave a 500 on every route, and ``Origin: http://[`` another."""
    body = b'{"prompt": "hi", "max_new_tokens": 1}' if method == "POST" else b""
    host = urlsplit(app_server_public.url).netloc.encode()
    request = b"%s %s HTTP/1.1\r\nHost: %s\r\n%s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (method.encode(), path.encode(), host, header, len(body), body)
    status = raw_request(app_server_public.url, request).split(b" ", 2)[1]
    assert status.isdigit() and int(status) < 500, (header, status)
    assert httpx.get(app_server_public.url + "/health").json()["ready"]


def test_a_huge_tree_colour_is_refused_and_not_logged_whole(app_server_public):
    """Attack (finding 9): a 200 KB tree-colour value was logged whole at every call."""
    visitor = Visitor(app_server_public.url)
    before = len(app_server_public.log_path.read_bytes())
    colour = "z" * 200_000
    response = visitor.http.post("/gradio_api/run/predict", json={"fn_index": visitor.fn["on_inspect"], "data": [None, colour], "session_hash": visitor.session_hash})
    assert response.status_code < 500 and colour not in response.text
    time.sleep(0.5)
    logged = app_server_public.log_path.read_bytes()[before:]
    assert len(logged) < 4000, (len(logged), logged[:500])


# ---------------------------------------------------------------------- finding 11: read deadlines, over raw sockets


def test_headers_sent_one_line_at_a_time_lose_the_connection(app_server_public):
    """Attack (finding 11): a header line every 5 s kept a connection open past 60 s. Now the headers must be
    complete within 10 s of the connection opening."""
    parts = urlsplit(app_server_public.url)
    start = time.monotonic()
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: %s\r\n" % parts.netloc.encode())
        closed_after = None
        for i in range(15):
            time.sleep(2)
            try:
                sock.sendall(b"X-Slow-%d: x\r\n" % i)
                sock.settimeout(0.01)
                if sock.recv(1) == b"":
                    closed_after = time.monotonic() - start
                    break
            except socket.timeout:
                continue
            except OSError:
                closed_after = time.monotonic() - start
                break
    assert closed_after is not None and closed_after < 16, closed_after
    assert httpx.get(app_server_public.url + "/health").json()["ready"]


def test_a_body_sent_one_byte_at_a_time_gets_a_408(app_server_public):
    """Attack (finding 11): a slow body held its connection past 25 s. Now the whole body is due within 10 s
    plus its length at 64 KiB/s, else 408 and the connection ends."""
    parts = urlsplit(app_server_public.url)
    body = b'{"prompt": "hi", "max_new_tokens": 1}'
    start = time.monotonic()
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (parts.netloc.encode(), len(body)))
        answer = b""
        for byte in body:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            sock.settimeout(2)
            try:
                answer += sock.recv(4096)
            except socket.timeout:
                continue
            if answer:
                break
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.monotonic() - start < 16


# ---------------------------------------------------------------------- finding 13: small things


@pytest.mark.parametrize("stream", ["yes", 1, "true", None])
def test_v1_stream_takes_only_booleans(app_server_public, stream):
    """Finding 13: ``"stream": "yes"`` was read as true."""
    response = httpx.post(app_server_public.url + "/v1/completions", json={"model": served_model(app_server_public.url), "prompt": "hi", "max_tokens": 1, "stream": stream}, timeout=60)
    assert response.status_code in (400, 422) and "stream" in response.text, response.text


def test_ranged_file_responses_do_not_echo_the_cookie(app_server_public):
    """Finding 13: Gradio's ranged ``file=`` answer echoed the request's headers, the session cookie included."""
    visitor = Visitor(app_server_public.url)
    path = visitor.upload(b'{"prompt": "range"}\n' * 64)
    response = visitor.http.get(f"/gradio_api/file={path}", headers={"Range": "bytes=0-9"})
    assert "cookie" not in {k.lower() for k in response.headers} and "kvci_session" not in str(response.headers), response.headers


# ---------------------------------------------------------------------- finding 3: salts inside the session's quota


def bearer_client(url: str) -> httpx.Client:
    session = httpx.post(url + "/session").json()
    return httpx.Client(base_url=url, timeout=120, headers={"Authorization": session["authorization"]})


def served_model(url: str) -> str:
    return httpx.get(url + "/v1/models").json()["data"][0]["id"]


def completion(client: httpx.Client, prompt: str, salt: str | None = None) -> int:
    """One /v1 completion of one token; the prompt tokens it found cached."""
    body = {"model": served_model(str(client.base_url).rstrip("/")), "prompt": prompt, "max_tokens": 1, "temperature": 0, **({"cache_salt": salt} if salt else {})}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)


def test_cache_salts_stay_inside_the_session_quota_and_its_clear(app_server_public):
    """Attack (finding 3): 16 /v1 calls of one session, each with another cache_salt, filled 4.6x its 25% quota and
    evicted everyone else; /cache/clear never reached the salted namespaces. Now a salted namespace is
    ``<session>/salt-<hash>``, charged to the session: the flood evicts only its own entries, and its clear
    reaches them all."""
    url = app_server_public.url
    victim, flooder = bearer_client(url), bearer_client(url)
    victim_prompt = f"Victim {uuid.uuid4().hex}: " + "a long shared preamble about gardens and rivers " * 12
    completion(victim, victim_prompt)
    assert completion(victim, victim_prompt) > 0
    flood = "Flood %d " + uuid.uuid4().hex + ": " + "another long preamble about engines and bridges " * 12
    for i in range(48):  # ~48 x 200 KiB of logits and KV: past the whole 8 MiB pool, let alone a 2 MiB quota
        completion(flooder, flood % i, salt=f"salt-{i}")
    assert completion(victim, victim_prompt) > 0, "the flooder's salted entries evicted the victim's"
    assert completion(flooder, flood % 47, salt="salt-47") > 0
    assert flooder.post("/cache/clear").status_code == 200
    assert completion(flooder, flood % 47, salt="salt-47") == 0, "the session's clear did not reach its salted namespace"


# ---------------------------------------------------------------------- finding 7: uploads charged per file


def test_an_upload_of_a_thousand_tiny_files_is_refused(app_server_public):
    """Attack (finding 7): one multipart upload of 1,000 one-byte files cost 2,000 inodes and 7.9 MiB of disk and
    was charged 4 KiB. Now an upload holds at most 4 files, and each is charged 8 KiB beside its bytes."""
    files = [("files", (f"t{i}.jsonl", b"x")) for i in range(1000)]
    response = httpx.post(app_server_public.url + "/gradio_api/upload", files=files, timeout=60)
    assert response.status_code == 413 and "files per upload" in response.json()["detail"], response.text
    assert httpx.post(app_server_public.url + "/gradio_api/upload", files=files[:4], timeout=60).status_code == 200


def test_upload_budget_charges_each_file():
    """Unit: four one-byte files are charged four folders and files, not one 4 KiB minimum."""
    from ui.security import UploadBudget

    budget = UploadBudget(total=10**9, kept_s=30, per_address=40_000)
    assert budget.admit("a", 4, files=4) is None and budget._bytes["a"] == 4 + 4 * 8192
    assert budget.admit("a", 1, files=5)[0] == 413 and budget._bytes["a"] == 4 + 4 * 8192  # refused, counted nowhere


# ---------------------------------------------------------------------- finding 10: a closed gradio_client stream


def test_a_closed_gradio_client_stream_cancels_its_generation(app_server_per_session):
    """Attack (finding 10): gradio_client's /generate (a coroutine event, not a generator) kept running 10.8 s after
    its event stream was closed; REST, /v1 and page events stop within a second. Now the stream's reader leaving
    cancels its session's running events, as Gradio's own /cancel does."""
    url = app_server_per_session.url
    visitor = Visitor(url, cookie=False, headers={"Authorization": httpx.post(url + "/session").json()["authorization"]})
    story = "Tell me a very long story about a lighthouse keeper and the sea, with many chapters."
    assert visitor.join("generate", *generate_args(story, None, 512)).status_code == 200
    with visitor.http.stream("GET", "/gradio_api/queue/data", params={"session_hash": visitor.session_hash}) as response:
        for line in response.iter_lines():
            if '"process_starts"' in line:
                assert httpx.get(url + "/health").json()["inflight"] == 1  # running, while its reader still reads
                break
        start = time.monotonic()  # leaving the block closes the stream (the response is not read to its end)
    visitor.http.close()
    while httpx.get(url + "/health").json()["inflight"] and time.monotonic() - start < 10:
        time.sleep(0.05)
    # Cancelled the moment the stream closes (measured: the job's cancel 1 ms after the disconnect); the engine's
    # cleanup after its last step took 2-4 s more on this 2-core host under load. Uncancelled, 512 tokens take 15 s and more.
    assert time.monotonic() - start < 6.0, "the generation kept running after its stream closed"


# ---------------------------------------------------------------------- finding 4: fairness per address, queueing reported


def test_a_newcomer_from_another_address_goes_before_an_address_with_many_sessions(app_server_behind_proxy):
    """Attack (finding 4): 8 sessions of one address looping long requests kept a 4-token request from another
    address waiting 54-82 s (0.27 s idle), and its wall_ttft_ms said ~2 ms. Now the next job comes from the address
    served least recently (then its session served least recently), and the wait is reported as queue_ms, inside
    wall_ttft_ms. Behind the simulated proxy: one worker, 3 requests in flight per address."""
    from concurrent.futures import ThreadPoolExecutor

    url = app_server_behind_proxy.url
    flooder, newcomer = f"10.41.{uuid.uuid4().int % 250}.1", f"10.42.{uuid.uuid4().int % 250}.1"
    ended: dict[str, float] = {}

    def ask(name: str, address: str, tokens: int) -> dict:
        headers = {"X-Forwarded-For": address, "Authorization": httpx.post(url + "/session").json()["authorization"]}
        body = {"prompt": f"Tell a long story about lighthouses, number {name}.", "max_new_tokens": tokens, "temperature": 0}
        response = httpx.post(url + "/generate", json=body, headers=headers, timeout=180)
        ended[name] = time.monotonic()
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(4) as pool:
        long_ones = []
        for i in range(3):  # three sessions of one address: one runs, two wait
            long_ones.append(pool.submit(ask, f"a{i}", flooder, 96))
            time.sleep(0.4)
        deadline = time.monotonic() + 60
        while httpx.get(url + "/health").json()["inflight"] < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        short = pool.submit(ask, "b", newcomer, 4).result()
        [f.result() for f in long_ones]
    assert ended["b"] < ended["a1"] and ended["b"] < ended["a2"], ended  # before the flooder's queued sessions
    timings = short["timings"]
    assert timings["queue_ms"] > 100 and timings["wall_ttft_ms"] >= timings["queue_ms"], timings


# ---------------------------------------------------------------------- finding 8: cheap joins, bounded memory


def rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_sixteen_thousand_cheap_joins_with_fresh_hashes_stay_within_300_mib(tmp_path, tiny_model_folder):
    """Attack (finding 8): 8,000 queue/join calls to a no-model event with fresh session hashes took RSS from 2.4 to
    3.7 GiB, 16,000 to 4.1 GiB, and past Gradio's 10,000 states pushed out other visitors' page state. Now new
    hashes and event calls are rate limited per address (429): 16,000 joins grow RSS by less than 300 MiB."""
    from conftest import launch_app, stop_app

    server = launch_app(tmp_path, "--public", "--model", str(tiny_model_folder))
    try:
        visitor = Visitor(server.url, cookie=False)
        fn = visitor.fn["cache_stats"]
        before, statuses = rss_mib(server.process.pid), {}
        with httpx.Client(base_url=server.url, timeout=30) as http:
            for i in range(16_000):
                status = http.post("/gradio_api/queue/join", json={"fn_index": fn, "data": [], "session_hash": uuid.uuid4().hex}).status_code
                statuses[status] = statuses.get(status, 0) + 1
        time.sleep(2)
        after = rss_mib(server.process.pid)
        print(f"RSS {before:.0f} -> {after:.0f} MiB after 16,000 joins: {statuses}")
        assert statuses.get(429, 0) > 15_000 and set(statuses) <= {200, 429}, statuses
        assert after - before < 300, f"RSS grew {after - before:.0f} MiB"
        assert httpx.get(server.url + "/health").json()["ready"]
    finally:
        stop_app(server)


# ---------------------------------------------------------------------- finding 5: pins per session, refusals of one's own bytes


def test_pins_are_shared_per_session_and_a_refusal_names_only_the_callers_bytes(app_server_public):
    """Attack (finding 5): a few sessions could take the whole pin budget for 24 h, and the refusal told any visitor
    the exact bytes other sessions pinned. Now each session pins within its own share (so a second session still
    pins after the first is refused), and the refusal speaks only of the caller's pins."""
    url = app_server_public.url
    other, greedy, late = bearer_client(url), bearer_client(url), bearer_client(url)

    def pin(client: httpx.Client, words: int) -> httpx.Response:
        return client.post("/cache/warm", json={"system_prompt": f"Pinned {uuid.uuid4().hex}: " + "keep this context " * words, "pin": True})

    theirs = pin(other, 60)
    assert theirs.status_code == 200 and theirs.json()["pinned"], theirs.text
    their_bytes = theirs.json()["pinned_bytes"]
    refused = None
    for _ in range(40):
        answer = pin(greedy, 5)
        if answer.status_code != 200:
            refused = answer
            break
    assert refused is not None and refused.status_code in (400, 403, 409), "one session pinned without limit"
    detail = refused.json()["detail"]
    assert "your" in detail and f"{their_bytes:,}" not in detail and str(their_bytes) not in detail, detail
    assert pin(late, 5).status_code == 200, "one session's pins took everyone's budget"


def test_the_plans_folder_goes_at_exit(tmp_path, tiny_model_folder):
    """Finding 13: every start left an empty ``kvci-plans-*`` folder in the temp directory. Now a clean exit removes it."""
    from conftest import launch_app, stop_app

    temp = tmp_path / "tmp"
    temp.mkdir()
    server = launch_app(tmp_path, "--public", "--model", str(tiny_model_folder), env_extra={"TMPDIR": str(temp), "GRADIO_TEMP_DIR": str(temp / "gradio")})
    assert list(temp.glob("kvci-plans-*")), "the planner made no folder: the test no longer sees what it checks"
    stop_app(server)
    assert server.process.returncode == 0 and not list(temp.glob("kvci-plans-*"))
