"""ui/charts.py and ui/scenarios.py on the tiny engine: figures, token highlights, inspector table, scenario runs."""

from __future__ import annotations

import asyncio

import pytest

from ui import charts
from ui.scenarios import load_examples, load_scenarios, run_scenario
from ui.service import EngineService
from ui.sessions import Session
from ui.settings import AppSettings

OWNER = Session(key="owner", client="session:owner", anonymous=False)
SYSTEM = "You are a terse assistant for a library. Reply with one short sentence."


@pytest.fixture
def service(tiny_engine) -> EngineService:
    service = EngineService(AppSettings(), loader=lambda *args, **kwargs: tiny_engine)
    service.start_loading()
    assert service.wait_ready(timeout=30)
    return service


def three_requests(service: EngineService) -> charts.SessionHistory:
    """A miss, an exact hit and a partial hit, in a session history."""
    history = charts.SessionHistory()
    for prompt in ("When do you open?", "When do you open?", "Where are the maps?"):
        history.add(service.generate(OWNER, prompt=prompt, system_prompt=SYSTEM, max_new_tokens=3))
    return history


def test_history_records_and_figures_tell_hit_partial_and_miss_apart(service):
    """The latency chart has one TTFT trace per status plus decode; the hit chart labels every request."""
    history = three_requests(service)
    assert [r.cache_status for r in history.records] == ["miss", "hit", "partial"]
    assert history.records[1].reused_tokens == history.records[1].prompt_tokens  # an exact hit reuses it all
    latency = charts.latency_figure(history.records)
    names = [trace.name for trace in latency.data]
    assert names == ["TTFT (hit)", "TTFT (partial)", "TTFT (miss)", "decode"]
    assert {trace.marker.color for trace in latency.data[:3]} == {charts.STATUS_COLORS[s] for s in ("hit", "partial", "miss")}
    assert "prefix cache on" in latency.data[0].customdata[0][1]  # cache settings in the hover
    hits = charts.hit_history_figure(history.records)
    assert list(hits.data[0].text) == ["miss", "hit", "partial"]
    assert list(hits.data[1].y) == [0.0, 50.0, pytest.approx(200 / 3)]  # running hit rate, %


def test_empty_history_draws_placeholders(service):
    """Before any request the charts say what to do instead of drawing empty axes."""
    for figure in (charts.latency_figure([]), charts.hit_history_figure([])):
        assert figure.layout.annotations and "Generate" in figure.layout.annotations[0].text


def test_token_highlights_mark_the_cached_prefix(service):
    """Cached tokens come first and number prefix_tokens_saved; the rest are computed."""
    three_requests(service)
    result = service.generate(OWNER, prompt="Where are the maps kept?", system_prompt=SYSTEM, max_new_tokens=2)
    spans = charts.token_highlights(result, service.engine.decode)
    labels = [label for _, label in spans]
    saved = result.timings["prefix_tokens_saved"]
    assert result.cache_status == "partial" and 0 < saved < len(labels)
    assert labels == ["cached"] * saved + ["computed"] * (len(labels) - saved)
    assert "".join(text for text, _ in spans).count("maps") == 1


def test_inspector_frame_and_stats_text(service):
    """The inspector table has one row per cache node, newest first; the stats line names the scope."""
    history = three_requests(service)
    rows = service.entries(OWNER, history.sequences)
    frame = charts.inspector_frame(rows)
    assert list(frame.columns) == ["start", "tokens", "KiB", "hits", "last used", "logits", "locked", "pinned", "preview"]
    assert len(frame) == len(rows) == service.engine.cache.stats()["cache_size"]
    assert "shared cache" in charts.stats_markdown(service.stats(OWNER))
    assert charts.inspector_frame([]).empty


def test_scenario_runs_off_then_on_from_a_cold_cache_and_leaves_nothing(service):
    """Every bundled scenario: the off phase never touches the cache, the on phase reuses prefixes, the scratch namespace is dropped."""
    scenarios = load_scenarios()
    assert len(scenarios) >= 4 and load_examples()
    for scenario in scenarios.values():
        steps = asyncio.run(collect(run_scenario(service, scenario, OWNER, max_new_tokens=3)))
        n = len(scenario.prompts)
        assert [s.phase for s in steps] == ["off"] * n + ["on"] * n
        assert {s.result.cache_status for s in steps[:n]} == {"off"}
        on = [s.result.cache_status for s in steps[n:]]
        assert on[0] == "miss" and all(status in ("hit", "partial") for status in on[1:]), (scenario.name, on)
        assert [s.result.text for s in steps[:n]] == [s.result.text for s in steps[n:]]  # greedy: same answers
    assert service.engine.cache.stats()["namespaces"] == 0


async def collect(steps):
    return [step async for step in steps]


def _row(id: int, parent: int | None, tokens: int, preview: str, **flags) -> dict:
    return {"id": id, "parent": parent, "start": 0, "tokens": tokens, "bytes": 1024 * tokens, "hits": flags.get("hits", 0),
            "last_used": flags.get("last_used", 1.0), "logits": False, "locked": flags.get("locked", False), "pinned": flags.get("pinned", False), "preview": preview}


def test_tree_figure_draws_the_rows_shape_and_only_their_previews():
    """The icicle's ids/parents/values come from the rows; another session's node shows the placeholder, never text."""
    #   root ─ n0 "You are terse." (20) ─┬─ n1 "When do you open?" (5, locked)
    #                                    └─ n2 (another session's) (7, pinned)
    rows = [
        _row(0, None, 20, "You are terse.", hits=3),
        _row(1, 0, 5, "When do you open?", locked=True),
        _row(2, 0, 7, "(another session's tokens)", pinned=True),
    ]
    trace = charts.tree_figure(rows).data[0]
    assert list(trace.ids) == ["root", "n0", "n1", "n2"] and list(trace.parents) == ["", "root", "n0", "n0"]
    assert list(trace.values) == [0, 20, 5, 7] and trace.branchvalues == "remainder"
    assert list(trace.marker.colors) == [0, 3, 0, 0]  # colour: hits
    assert trace.labels[2].startswith("🔒") and trace.labels[3].startswith("📌")
    assert list(trace.marker.line.color)[2:] == [charts._LOCKED, charts._PINNED]
    shown = repr(trace.labels) + repr(trace.customdata)
    assert "another session" in trace.customdata[3][0] and "When do you open?" in shown
    assert charts.tree_figure([]).layout.annotations  # empty: a placeholder, not an empty chart


def test_tree_figure_colours_by_recency_and_keeps_the_marks():
    """Recency: colour is seconds since the last use (darkest newest), the hover gives the age; locks and pins stay marked."""
    now = 10_000.0
    rows = [
        _row(0, None, 20, "You are terse.", hits=3, last_used=now - 5),
        _row(1, 0, 5, "When do you open?", locked=True, last_used=now - 300),
        _row(2, 0, 7, "Where are you?", pinned=True, last_used=now - 7200),
        _row(3, 0, 2, "Never matched", last_used=0.0),
    ]
    trace = charts.tree_figure(rows, "recency", now=now).data[0]
    assert list(trace.marker.colors) == [7200, 5, 300, 7200, 7200]  # the root and a never-used node: as old as the oldest
    assert trace.marker.reversescale and trace.marker.cmax == 7200
    assert [c[8] for c in trace.customdata[1:]] == ["5 s ago", "5 min ago", "2.0 h ago", "never"]
    assert "customdata[8]" in trace.hovertemplate and "recency" not in trace.hovertemplate
    assert trace.labels[2].startswith("🔒") and trace.labels[3].startswith("📌")
    assert list(trace.marker.line.color)[2:4] == [charts._LOCKED, charts._PINNED]
    hits = charts.tree_figure(rows, "hits", now=now).data[0]
    assert list(hits.marker.colors) == [0, 3, 0, 0, 0] and hits.customdata[1][8] == "5 s ago"  # the age shows either way
    with pytest.raises(ValueError, match="pick one of hits, recency"):
        charts.tree_figure(rows, "size")


def test_tree_figure_from_service_rows_in_shared_mode(service):
    """Real rows: one node per cache entry under the root, and a stranger's rows carry no text of the owner's."""
    history = three_requests(service)
    rows = service.entries(OWNER, history.sequences)
    trace = charts.tree_figure(rows).data[0]
    assert len(trace.ids) == len(rows) + 1 and sum(trace.values) == service.engine.cache.stats()["cached_tokens"]
    assert "maps" in repr(trace.customdata)
    stranger = charts.tree_figure(service.entries(Session(key="other", client="session:other", anonymous=False))).data[0]
    assert "maps" not in repr(stranger.customdata) + repr(stranger.labels) and list(stranger.ids) == list(trace.ids)
