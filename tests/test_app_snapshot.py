"""A prefix cache that survives restarts, over real HTTP: app processes one after the other on one --cache-dir.

The first app (tiny model, local, shared) answers a few prompts and is stopped with SIGTERM, which
saves; each test copies that directory and starts its own app on it. Plus /cache/save's attacks.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import threading
import time

import httpx
import pytest

from cache.snapshot import MANIFEST
from conftest import launch_app, stop_app
from engine.snapshot import SAVE_DELAY_ENV
from test_app_isolation import bearer, body

SYSTEM = "You are the assistant of a small library; answer every question about books in one short line."
QUESTIONS = [f"Which book should I read about topic {i}?" for i in range(3)]


def ask(url: str, question: str, headers: dict | None = None) -> dict:
    response = httpx.post(url + "/generate", json={**body(SYSTEM), "prompt": question}, headers=headers, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def start(tmp_path_factory, tiny_model_folder, cache_dir, *flags: str, env: dict | None = None):
    return launch_app(tmp_path_factory.mktemp("app-snapshot"), "--model", str(tiny_model_folder), "--cache-dir", str(cache_dir), *flags, env_extra=env)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_model_folder):
    """A cache dir holding what the first app saved at SIGTERM, and the texts it answered."""
    cache_dir = tmp_path_factory.mktemp("cache-dir")
    server = start(tmp_path_factory, tiny_model_folder, cache_dir)
    try:
        texts = [ask(server.url, q)["text"] for q in QUESTIONS]
    finally:
        stop_app(server)  # SIGTERM: uvicorn's clean shutdown saves
    assert (cache_dir / MANIFEST).exists(), server.log_tail()
    return cache_dir, texts


@pytest.fixture
def cache_dir(saved, tmp_path):
    """A copy of the saved cache dir, this test's own."""
    return shutil.copytree(saved[0], tmp_path / "cache")


def test_after_a_restart_a_repeat_is_a_hit_with_0_prefill_and_the_same_text(tmp_path_factory, tiny_model_folder, saved, cache_dir):
    """The issue's test: stop the app, start another on the same dir, and the same request is an exact hit."""
    server = start(tmp_path_factory, tiny_model_folder, cache_dir)
    try:
        stats = httpx.get(server.url + "/cache/stats").json()
        assert stats["snapshot"]["restored_entries"] > 0 and stats["snapshot"]["restore_refused"] is None, server.log_tail()
        for question, text in zip(QUESTIONS, saved[1]):
            reply = ask(server.url, question)
            assert (reply["cache_status"], reply["timings"]["prefill_tokens"], reply["text"]) == ("hit", 0, text)
        assert any(line.startswith("Restored") for line in httpx.get(server.url + "/health").json()["progress"])
        saved_now = httpx.post(server.url + "/cache/save")  # local: curl may save
        assert saved_now.status_code == 200 and saved_now.json()["entries"] > 0, saved_now.text
        assert httpx.get(server.url + "/cache/stats").json()["snapshot"]["last_saved_at"] is not None
        cross_site = httpx.post(server.url + "/cache/save", headers={"Origin": "https://evil.example", "Content-Type": "application/json"}, content=b"{}")
        not_json = httpx.post(server.url + "/cache/save", headers={"Content-Type": "text/plain"}, content=b"{}")
        odd_field = httpx.post(server.url + "/cache/save", json={"path": "/etc"})
        assert (cross_site.status_code, not_json.status_code, odd_field.status_code) == (403, 415, 422)
    finally:
        stop_app(server)


def test_sigkill_during_a_save_loses_nothing_saved_before(tmp_path_factory, tiny_model_folder, saved, cache_dir):
    """A save held between its KV file and its manifest (test hook) is SIGKILLed: the next app restores the previous snapshot."""
    server = start(tmp_path_factory, tiny_model_folder, cache_dir, env={SAVE_DELAY_ENV: "60"})
    try:
        new_question = "Which book should I read about something never asked before?"
        ask(server.url, new_question)
        threading.Thread(target=save_until_killed, args=(server.url,), daemon=True).start()
        deadline = time.monotonic() + 60
        while not list(cache_dir.glob("kv-*.safetensors.tmp")):  # the save is in the middle: its KV file is written, not committed
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.1)
    finally:
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(timeout=15)
    after = start(tmp_path_factory, tiny_model_folder, cache_dir)
    try:
        for question, text in zip(QUESTIONS, saved[1]):
            reply = ask(after.url, question)
            assert (reply["cache_status"], reply["text"]) == ("hit", text)
        assert ask(after.url, new_question)["cache_status"] != "hit"  # never committed
    finally:
        stop_app(after)


def save_until_killed(url: str) -> None:
    try:
        httpx.post(url + "/cache/save", timeout=120)
    except httpx.HTTPError:  # the server is SIGKILLed mid-save: no answer is the point
        pass


@pytest.mark.parametrize(
    "damage, flags, env, reason",
    [
        (None, (), {"KVCI_WEIGHTS": "bf16"}, "differs in"),  # another weight format: another stamp
        ("truncate", (), {}, "cannot be read"),
        ("bad json", (), {}, "not readable JSON"),
    ],
)
def test_a_foreign_or_corrupt_snapshot_is_refused_in_one_line_and_the_app_starts_cold(tmp_path_factory, tiny_model_folder, cache_dir, damage, flags, env, reason):
    """Another stamp, a truncated safetensors file or a bad manifest: one clear log line, an empty cache, the app serves."""
    if damage == "truncate":
        kv = next(cache_dir.glob("kv-*.safetensors"))
        kv.write_bytes(kv.read_bytes()[:1000])
    elif damage == "bad json":
        (cache_dir / MANIFEST).write_text('{"format": 1, "nodes": [')
    server = start(tmp_path_factory, tiny_model_folder, cache_dir, *flags, env=env)
    try:
        lines = [line for line in server.log_tail(50000).splitlines() if "snapshot" in line and "refused" in line]
        assert len(lines) == 1 and reason in lines[0] and "starting cold" in lines[0], server.log_tail()
        stats = httpx.get(server.url + "/cache/stats").json()
        assert stats["cache_size"] == 0 and reason in stats["snapshot"]["restore_refused"]
        assert ask(server.url, QUESTIONS[0])["cache_status"] == "miss"
    finally:
        stop_app(server)


def test_the_budget_holds_after_restoring_into_a_smaller_one(tmp_path_factory, tiny_model_folder, cache_dir):
    """Each saved prompt holds ~200 KiB of logits: a 0.45 MiB budget restores what fits, drops the rest, and says so."""
    server = start(tmp_path_factory, tiny_model_folder, cache_dir, "--cache-budget-mb", "0.45")
    try:
        stats = httpx.get(server.url + "/cache/stats").json()
        assert 0 < stats["cached_bytes"] <= stats["budget_bytes"] and stats["snapshot"]["restored_entries"] > 0
        restored = " ".join(httpx.get(server.url + "/health").json()["progress"])
        dropped = re.search(r"\((\d+) dropped to fit the budget", restored)
        assert dropped and int(dropped.group(1)) > 0, restored
    finally:
        stop_app(server)


def test_per_session_mode_persists_only_the_shared_namespace_unless_asked(tmp_path_factory, tiny_model_folder, tmp_path):
    """Other sessions' prompts are theirs: not on disk by default; with --persist-session-caches a session finds its own after a restart, and only its own."""
    plain, persisted = tmp_path / "plain", tmp_path / "persisted"
    for cache_dir, flags in ((plain, ()), (persisted, ("--persist-session-caches",))):
        server = start(tmp_path_factory, tiny_model_folder, cache_dir, "--cache-mode", "per-session", *flags)
        try:
            alice = bearer(server.url)
            ask(server.url, QUESTIONS[0], alice)
        finally:
            stop_app(server)
        nodes = json.loads((cache_dir / MANIFEST).read_text())["nodes"]
        assert (len(nodes) > 0) == bool(flags)
    server = start(tmp_path_factory, tiny_model_folder, persisted, "--cache-mode", "per-session", "--persist-session-caches")
    try:
        assert ask(server.url, QUESTIONS[0], alice)["cache_status"] == "hit"
        assert ask(server.url, QUESTIONS[0], bearer(server.url))["cache_status"] == "miss"
        assert "restored_entries" not in httpx.get(server.url + "/cache/stats", headers=alice).json()["snapshot"]  # no sizes of others' caches
    finally:
        stop_app(server)


@pytest.mark.parametrize(
    "headers, content, status",
    [
        ({}, None, 403),  # anonymous
        ("session", None, 403),  # a visitor with a session
        ({"Origin": "https://evil.example", "Content-Type": "application/json"}, b"{}", 403),  # cross-site
        ({"Content-Type": "text/plain"}, b"{}", 415),  # not JSON
        ({"Content-Type": "application/json"}, b'{"path": "/etc"}', 422),  # fields it does not take
    ],
)
def test_cache_save_attacks_on_a_public_host_are_refused(app_server_public, headers, content, status):
    """Visitors of a public server cannot make it write to disk, whoever they are and however they ask."""
    url = app_server_public.url
    headers = bearer(url) if headers == "session" else headers
    response = httpx.post(url + "/cache/save", headers=headers, content=content)
    assert response.status_code == status, response.text
