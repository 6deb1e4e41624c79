"""ui/service.py and its parts (ui/admission.py, ui/isolation.py) on the tiny engine: namespaces, what a session may see and clear, errors through the pool."""

from __future__ import annotations

import threading
import time

import pytest

from engine.scheduler import Until

from ui.service import Busy, EngineService, NotReady
from ui.sessions import Session
from ui.settings import AppSettings

SYSTEM = "You are a terse assistant. Reply with one word."


def make_service(engine, **settings) -> EngineService:
    service = EngineService(AppSettings(**settings), loader=lambda *args, **kwargs: engine)
    service.start_loading()
    assert service.wait_ready(timeout=30)
    return service


def who(name: str, address: str = "address:unknown") -> Session:
    """A named session, as ui.sessions resolves a bearer id or a page cookie."""
    return Session(key=name, client="session:" + name, anonymous=False, address=address)


def ask(service: EngineService, session: str, prompt: str, **kwargs):
    return service.generate(who(session), prompt=prompt, system_prompt=SYSTEM, max_new_tokens=3, **kwargs)


@pytest.mark.parametrize(
    "settings, same_namespace",
    [
        (dict(cache_mode="shared"), True),
        (dict(cache_mode="per-session"), False),
    ],
)
def test_namespaces_follow_the_cache_mode(tiny_engine, settings, same_namespace):
    """Shared mode: one namespace for all; per-session: one per session, stable for a session."""
    service = make_service(tiny_engine, **settings)
    assert (service.namespace_for(who("alice")) == service.namespace_for(who("bob"))) is same_namespace
    assert service.namespace_for(who("alice")) == service.namespace_for(who("alice"))


def test_per_session_sessions_do_not_hit_each_other(tiny_engine):
    """The same prompt from a second session is a miss; the first session's repeat is a hit."""
    service = make_service(tiny_engine, cache_mode="per-session")
    assert ask(service, "alice", "Tell me a secret plan").cache_status == "miss"
    assert ask(service, "bob", "Tell me a secret plan").cache_status == "miss"
    assert ask(service, "alice", "Tell me a secret plan").cache_status == "hit"


def test_shared_mode_inspector_shows_text_only_of_own_tokens(tiny_engine):
    """Shared cache: alice's inspector shows sizes of bob's entries but never their text."""
    service = make_service(tiny_engine, cache_mode="shared")
    mine = ask(service, "alice", "My own question about apples")
    ask(service, "bob", "Bob's confidential question about zebras")
    own = [tuple(mine.prompt_token_ids) + tuple(mine.token_ids)]
    rows = service.entries(who("alice"), own)
    previews = [row["preview"] for row in rows]
    assert any("apples" in p for p in previews)
    assert not any("zebras" in p for p in previews)
    assert "(another session's tokens)" in previews
    assert sum(row["tokens"] for row in rows) == tiny_engine.cache.stats()["cached_tokens"]


def test_per_session_inspector_lists_only_own_entries(tiny_engine):
    """Per-session cache: the inspector's rows are the session's own namespace only."""
    service = make_service(tiny_engine, cache_mode="per-session")
    ask(service, "alice", "Alice asks about apples")
    ask(service, "bob", "Bob asks about zebras")
    rows = service.entries(who("alice"))
    assert rows and all("zebras" not in row["preview"] for row in rows)
    assert any("apples" in row["preview"] for row in rows)


@pytest.mark.parametrize(
    "cache_mode, alice_sees, bob_sees",
    [
        ("per-session", 2, 1),  # each session its own requests only
        ("shared", 3, 3),  # everyone's, as the tree shows them
    ],
)
def test_running_table_lists_what_the_inspector_may_show(tiny_engine, monkeypatch, cache_mode, alice_sees, bob_sees):
    """The inspector's "Running now" follows the tree's rule (Isolation.inspected): per-session only the caller's own
    requests, shared everyone's; rows carry no namespace; requests reusing the same cached prefix carry one id."""
    service = make_service(tiny_engine, cache_mode=cache_mode)
    for name in ("alice", "bob"):
        ask(service, name, "Warm the system prompt")  # the cached prefix the running requests reuse
    asks = (("alice", "Apples?"), ("alice", "Bananas?"), ("bob", "Cherries?"))  # unlike from the first token: each reuses the system prompt alone
    gate = _park_decoding(tiny_engine, monkeypatch)
    jobs = _parked(tiny_engine, [service.stream(who(name), prompt=prompt, system_prompt=SYSTEM, max_new_tokens=4) for name, prompt in asks])
    try:
        alice, bob = service.running(who("alice")), service.running(who("bob"))
        assert (len(alice), len(bob)) == (alice_sees, bob_sees)
        assert all("namespace" not in row and row["phase"] == "decode" and row["reused_tokens"] > 0 for row in alice + bob)
        prefixes = {row["shared_prefix"] for row in alice}
        assert len(prefixes) == 1 and None not in prefixes  # one cached system prompt per namespace, shared mode: one for all
        assert len(service.running(who("carol"))) == (0 if cache_mode == "per-session" else 3)
    finally:
        gate.set()
        results = [job.result() for job in jobs]
    assert all(len(r.batch_sizes) == len(r.token_ids) - 1 for r in results)


def _park_decoding(engine, monkeypatch) -> threading.Event:
    """From now on each request waits after its first token, before its first decode step, until the returned event is set."""
    gate, decode = threading.Event(), engine._decode_n_tokens

    def parked(run, token, model_cache):
        yield Until(gate)
        return (yield from decode(run, token, model_cache))

    monkeypatch.setattr(engine, "_decode_n_tokens", parked)
    return gate


def _parked(engine, jobs: list) -> list:
    """``jobs``, once each is parked after its first token (``_park_decoding``)."""
    deadline = time.monotonic() + 60  # a liveness bound; the wait ends as soon as every job is parked
    while len([row for row in engine.running() if row["phase"] == "decode"]) < len(jobs):
        assert time.monotonic() < deadline, engine.running()
        time.sleep(0.01)
    return jobs


@pytest.mark.parametrize(
    "settings, cleared, alice_left, bob_left",
    [
        (dict(cache_mode="shared", host="127.0.0.1"), "all", False, False),  # local shared: the owner clears it all
        (dict(cache_mode="per-session", host="127.0.0.1"), "session", False, True),
        (dict(cache_mode="shared", host="0.0.0.0", allow_shared_public=True), "nothing", True, True),  # public shared: nobody wipes everyone's
        (dict(cache_mode="shared", host="127.0.0.1", on_space=True, allow_shared_public=True), "nothing", True, True),
    ],
)
def test_clear_only_clears_what_the_session_may(tiny_engine, settings, cleared, alice_left, bob_left):
    """clear_cache from one session clears its own namespace, unless the app runs locally in shared mode."""
    service = make_service(tiny_engine, **settings)
    ask(service, "alice", "Alice asks about apples")
    ask(service, "bob", "Bob asks about zebras")
    assert service.clear(who("alice"))["cleared"] == cleared
    assert bool(service.entries(who("alice"))) is alice_left
    assert bool(service.entries(who("bob"))) is bob_left


def test_bad_input_raises_value_error_before_queueing(tiny_engine):
    """The engine's ValueError reaches the caller (the UI turns it into gr.Error); the pool slot is not taken."""
    service = make_service(tiny_engine, concurrency=1, max_queue=1)
    with pytest.raises(ValueError, match="non-empty"):
        service.stream(who(""), prompt="   ")
    with pytest.raises(ValueError, match="context window"):
        list(service.stream(who(""), prompt="x " * 2000, max_new_tokens=4))  # too long: raised by the worker, re-raised here
    assert ask(service, "alice", "still serving").text is not None


def test_not_ready_and_busy_are_distinct_errors(tiny_engine):
    """Before the model loads: NotReady. With every slot taken: Busy (REST answers 503 for both)."""
    waiting = EngineService(AppSettings(concurrency=1, max_queue=1), loader=lambda *a, **k: tiny_engine)
    with pytest.raises(NotReady):
        waiting.stream(who(""), prompt="hi")
    service = make_service(tiny_engine, concurrency=1, max_queue=1)
    streams = [service.stream(who(""), prompt=f"question {i} " * 3, max_new_tokens=2) for i in range(2)]
    with pytest.raises(Busy):
        service.stream(who(""), prompt="one too many")
    for stream in streams:
        list(stream)
    assert ask(service, "alice", "room again").text is not None


def test_a_model_that_cannot_load_is_reported_not_fatal():
    """No bundled model and no hub (a Space without network, say): /health and the page say why; requests get NotReady."""

    def no_model(*args, **kwargs):
        raise ValueError("the bundled model is missing and the hub is unreachable")

    service = EngineService(AppSettings(), loader=no_model)
    service.start_loading()
    assert service.wait_ready(timeout=30) is False
    status = service.status()
    assert not status["ready"] and "hub is unreachable" in status["error"]
    with pytest.raises(NotReady, match="hub is unreachable"):
        service.stream(who(""), prompt="hi")


def test_waiting_jobs_are_served_round_robin_across_clients():
    """One client's burst does not delay another client's next job behind the whole burst."""
    from ui.admission import FairQueue, Job

    queue = FairQueue()
    jobs = [Job(who(client), "ns", {}, on_cancel=lambda job: None, on_end=lambda job: None) for client in ("a", "a", "a", "b", "c")]
    for job in jobs:
        queue.put(job)
    assert queue.remove(jobs[1])  # a cancelled waiting job leaves the queue at once
    assert [queue.get().client for _ in range(4)] == ["session:" + c for c in ("a", "b", "c", "a")]


def test_session_ids_resolve_whole_and_cookies_must_be_signed():
    """ui/sessions.py: bearer and X-Session-Id name the same session; ids are hashed whole; unsigned cookies are nobody's."""
    from ui.sessions import BadSession, SessionIssuer

    issuer = SessionIssuer(secure_cookie=False, secret=b"k" * 32)
    token = issuer.new_id()
    by_bearer = issuer.resolve({"authorization": f"Bearer {token}"}, {}, "10.0.0.1")
    by_header = issuer.resolve({"x-session-id": token}, {}, "10.0.0.2")
    assert (by_bearer.key, by_bearer.client) == (by_header.key, by_header.client) and not by_bearer.anonymous
    assert (by_bearer.address, by_header.address) == ("address:10.0.0.1", "address:10.0.0.2")
    assert issuer.resolve({"x-session-id": "a" * 127 + "1"}, {}, None) != issuer.resolve({"x-session-id": "a" * 127 + "2"}, {}, None)
    with pytest.raises(BadSession, match="32 to 128 characters"):
        issuer.resolve({"x-session-id": "a" * 129}, {}, None)
    cookie = issuer.new_cookie().split(";")[0].split("=", 1)[1]
    assert not issuer.resolve({}, {"kvci_session": cookie}, None).anonymous
    forged = issuer.resolve({}, {"kvci_session": cookie[:-1] + ("0" if cookie[-1] != "0" else "1")}, "10.0.0.1")
    assert forged.anonymous and forged.address == "address:10.0.0.1"
    assert issuer.resolve({"x-forwarded-for": "1.2.3.4"}, {}, "10.0.0.1").address == "address:10.0.0.1"  # no --trust-proxy


@pytest.mark.parametrize(
    "hops, forwarded, address",
    [
        (1, "203.0.113.9", "203.0.113.9"),  # one proxy: the entry it appended
        (1, "6.6.6.6, 203.0.113.9", "203.0.113.9"),  # what the client sent itself (left) is ignored
        (2, "6.6.6.6, 203.0.113.9, 10.0.0.5", "203.0.113.9"),  # two proxies: the outer one's entry
        (2, "203.0.113.9", "10.0.0.1"),  # fewer entries than proxies: not through them, the peer counts
        (1, "", "10.0.0.1"),
        (1, "6.6.6.6, ", "10.0.0.1"),  # an empty entry where the proxy's should be: the peer, never the client's claim
        (1, " , ,", "10.0.0.1"),
        (1, "x" * 10_000, "x" * 10_000),  # odd text is only a dict key, never parsed or logged
    ],
)
def test_forwarded_addresses_are_read_from_the_right(hops, forwarded, address):
    """Attack: rotating a self-written X-Forwarded-For entry made every request a new address, past the per-address limits."""
    from ui.sessions import SessionIssuer

    issuer = SessionIssuer(secure_cookie=False, trust_proxy=True, proxy_hops=hops)
    assert issuer.resolve({"x-forwarded-for": forwarded}, {}, "10.0.0.1").address == "address:" + address


def test_one_address_cannot_fill_the_queue_with_fresh_sessions(tiny_engine):
    """Attack: ids are free to mint, so one machine with many sessions took every queue place; its address is counted too."""
    service = make_service(tiny_engine, concurrency=1, max_queue=8, public=True, cache_mode="per-session", max_inflight_per_address=3)
    streams = [service.stream(who(f"minted-{i}", "address:198.51.100.7"), prompt=f"question {i} " * 3, max_new_tokens=2) for i in range(3)]
    with pytest.raises(Busy, match="your address may have 3"):
        service.stream(who("minted-3", "address:198.51.100.7"), prompt="one too many")
    with pytest.raises(Busy, match="your address"):
        service.stream(Session(key="anon", client="anonymous@address:198.51.100.7", anonymous=True, address="address:198.51.100.7"), prompt="nor anonymously")
    other = service.stream(who("elsewhere", "address:203.0.113.9"), prompt="another machine", max_new_tokens=2)
    for stream in (*streams, other):
        list(stream)
    assert service.inflight == 0
    assert ask(service, "minted-3", "room again").text is not None
