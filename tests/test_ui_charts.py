"""ui/charts.py and ui/scenarios.py on the tiny engine: figures, token highlights, inspector table, scenario runs."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from cache.budget_plan import ReplayRow
from ui import charts
from ui.scenarios import load_examples, load_scenarios, run_scenario
from ui.service import EngineService
from ui.sessions import Session
from ui.settings import AppSettings

OWNER = Session(key="owner", client="session:owner", anonymous=False)
SYSTEM = (  # over two of the prefill's 32-token chunks: a partial hit reuses whole chunks
    "You are a terse assistant for the public library of a small seaside town. You know its opening hours, "
    "its maps, its reading rooms and its catalogue. Reply with one short sentence, and never more."
)


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
    """TTFT (log axis) and decode per token sit in two panels, one trace per status in each; the hit is
    annotated with its ratio to the miss; the hit chart has bars above and the running hit rate below."""
    history = three_requests(service)
    assert [r.cache_status for r in history.records] == ["miss", "hit", "partial"]
    assert history.records[1].reused_tokens == history.records[1].prompt_tokens  # an exact hit reuses it all
    latency = charts.latency_figure(history.records)
    ttft = [t for t in latency.data if t.yaxis == "y"]
    decode = [t for t in latency.data if t.yaxis == "y2"]
    assert [t.name for t in ttft] == ["hit", "partial", "miss"] and len(decode) == 3
    assert {t.marker.color for t in ttft} == {charts.STATUS_COLORS[s] for s in ("hit", "partial", "miss")}
    assert latency.layout.yaxis.type == "log" and latency.layout.yaxis2.type != "log"
    assert "prefix cache on" in ttft[0].customdata[0][1]  # cache settings in the hover
    note = [a.text for a in latency.layout.annotations if "below #1" in a.text]
    assert note and note[0].startswith("partial")  # the newest request that reused a prefix, against the miss
    hits = charts.hit_history_figure(history.records)
    assert list(hits.data[0].text) == ["miss", "hit", "partial"] and hits.data[0].yaxis == "y"
    assert hits.data[1].yaxis == "y2" and list(hits.data[1].y) == [0.0, 50.0, pytest.approx(200 / 3)]  # running hit rate, %


def test_verdict_says_what_each_request_saved(service):
    """The line under the charts: a miss's first-token time, a hit's reuse and ratio to the miss, no KV cache's cost per token."""
    history = three_requests(service)
    first, second = history.records[:2]
    assert charts.verdict(history.records[:1]) == f"This request reused none of its {first.prompt_tokens} prompt tokens (nothing reusable was cached): its first token took {first.ttft_ms:,.0f} ms."
    hit = charts.verdict(history.records[:2])
    assert hit.startswith(f"This request reused {second.prompt_tokens} of {second.prompt_tokens} prompt tokens: first token ") and "sooner than #1" in hit
    history.add(service.generate(OWNER, prompt="When do you open?", system_prompt=SYSTEM, max_new_tokens=4, use_cache=False, use_prefix_cache=False))
    assert history.records[-1].status == "no-kv"
    assert charts.verdict(history.records).startswith("No KV cache: every one of the 3 decode steps re-ran the whole sequence, ")
    assert "slower per token than #" in charts.verdict(history.records)
    assert charts.verdict([]) == "" and charts.verdict_html([]) == ""


def test_empty_history_draws_placeholders(service):
    """Before any request the charts say what to do instead of drawing empty axes."""
    for figure in (charts.latency_figure([]), charts.hit_history_figure([])):
        assert any("Generate" in a.text for a in figure.layout.annotations)


def test_token_highlights_mark_the_cached_prefix(service):
    """Cached tokens come first and number prefix_tokens_saved; the rest are computed."""
    three_requests(service)
    result = service.generate(OWNER, prompt="Where are the reading rooms?", system_prompt=SYSTEM, max_new_tokens=2)
    spans = charts.token_highlights(result, service.engine.decode, keep=1000)
    labels = [label for _, label in spans]
    saved = result.timings["prefix_tokens_saved"]
    assert result.cache_status == "partial" and 0 < saved < len(labels)
    assert labels == ["cached"] * saved + ["computed"] * (len(labels) - saved)
    assert "".join(text for text, _ in spans).count("reading rooms?") == 1


def test_token_highlights_fold_a_long_cached_run_and_keep_every_computed_token(service):
    """A long cached prefix shows its ends around one "… N more cached tokens …" span, so the computed tokens stay in view."""
    three_requests(service)
    result = service.generate(OWNER, prompt="Where are the reading rooms?", system_prompt=SYSTEM, max_new_tokens=2)
    saved, total = result.timings["prefix_tokens_saved"], result.timings["prompt_tokens"]
    spans = charts.token_highlights(result, service.engine.decode, keep=4)
    assert [label for _, label in spans] == ["cached"] * 9 + ["computed"] * (total - saved)
    assert spans[4][0] == f" … {saved - 8:,} more cached tokens … "


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
    assert "the whole namespace: 3 nodes, 32 tokens" in trace.hovertemplate[0]  # the root sums the namespace, no empty fields


@pytest.mark.parametrize("rows", [[], [_row(0, None, 20, "You are terse.")]], ids=["empty", "one node"])
def test_tree_figure_is_an_icicle_in_every_state(rows):
    """An empty cache and a one-node tree draw an icicle too: Plotly throws when a figure changes kind in place, and the page froze."""
    trace = charts.tree_figure(rows).data[0]
    assert trace.type == "icicle" and list(trace.ids) == ["root"] + [f"n{r['id']}" for r in rows]
    assert (trace.labels[0] == "The cache is empty: press Generate") == (not rows)
    assert not charts.tree_figure(rows).layout.annotations


def _plan_row(policy: str, budget_mib: float | None, rate: float, knee: bool = False) -> ReplayRow:
    size = None if budget_mib is None else int(budget_mib * 2**20)
    return ReplayRow(policy, "inf" if size is None else f"{budget_mib:g}MiB", size, 10, rate, rate, 1000, int(1000 * rate), 3 * 2**20, 0, 0.5, knee)


def test_plan_figure_fits_its_units_and_marks_the_knee():
    """MiB-scale budgets are charted in MiB (not "0.001" GiB); each knee is starred and named; the table gives the peak in MiB."""
    rows = [_plan_row("lru", 1, 0.2), _plan_row("lru", 4, 0.6, knee=True), _plan_row("lru", 16, 0.62), _plan_row("lru", None, 0.62)]
    fig = charts.plan_figure(rows, "plan")
    assert fig.layout.xaxis.title.text == "memory budget (MiB, log scale)" and list(fig.data[0].x) == [1, 4, 16]
    assert fig.data[1].marker.symbol == "star" and list(fig.data[1].x) == [4]
    assert any(a.text == "lru knee: 4MiB" for a in fig.layout.annotations)
    both = charts.plan_figure(rows + [_plan_row("lfu", 4, 0.6, knee=True)], "plan")
    assert [a.text for a in both.layout.annotations if "knee" in a.text] == ["lru, lfu knee: 4MiB"]  # one label where two knees meet
    assert charts.plan_table(rows)[0][7] == "3 MiB" and charts.plan_table(rows)[1][-1] == "knee"
    assert charts.plan_figure([_plan_row("lru", 2048, 0.5)], "plan").layout.xaxis.title.text.startswith("memory budget (GiB")
    assert any("Replay" in a.text for a in charts.plan_figure([], "").layout.annotations)  # before a first plan: a hint


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
    assert "customdata[8]" in trace.hovertemplate[1] and not any("recency" in h for h in trace.hovertemplate)
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


def _record(index: int, batch_sizes: tuple[int, ...] = (), status: str = "miss", reused: int = 0) -> charts.RequestRecord:
    """A history record as the page keeps it, without running a model."""
    return charts.RequestRecord(index=index, label="playground", cache_status=status, use_cache=True, use_prefix_cache=True, ttft_ms=100.0 / index,
                                wall_ttft_ms=110.0, decode_ms=40.0 * len(batch_sizes), total_ms=500.0, prompt_tokens=40, reused_tokens=reused,
                                new_tokens=len(batch_sizes) + 1, batch_sizes=batch_sizes)


@pytest.mark.parametrize("ttfts, decades", [((400.0, 969.0), (2, 3)), ((0.0, 1000.0), (-2, 3)), ((1000.0,), (3, 4))])
def test_ttft_axis_spans_whole_decades(ttfts, decades):
    """The log TTFT axis ticks at powers of ten only: two requests inside one decade (400 and 969 ms) drew no tick at all."""
    records = [dataclasses.replace(_record(i + 1), ttft_ms=t) for i, t in enumerate(ttfts)]
    assert tuple(charts.latency_figure(records).layout.yaxis.range) == decades


@pytest.mark.parametrize(
    "batch_sizes, phrase",
    [
        ((), ""),  # no decode step (one token, no KV cache, a remote)
        ((1, 1, 1), ""),  # every step ran alone: nothing to say
        ((4, 4), "decoded in batches of 4"),
        ((1, 2, 3, 4), "decoded in batches of 1–4 (mean 2.5)"),
        ((1,) + (4,) * 99, "decoded in batches of 1–4 (mean 3.97)"),  # rounded down: never a mean equal to the largest batch
    ],
)
def test_batch_phrase_names_the_batches_only_when_shared(batch_sizes, phrase):
    """The verdict's words for continuous batching: the range and mean of the batches a request's decode steps ran in."""
    assert charts.batch_phrase(batch_sizes) == phrase


def test_batch_panel_draws_the_newest_requests_steps_and_the_verdict_names_them():
    """One bar per decode step of the newest request, at the token it made (2..n), as tall as its batch; the verdict and
    the decode panel's hover say the range and mean."""
    records = [_record(1, (1, 1)), _record(2, (1, 2, 3, 4, 4, 1), status="partial", reused=32)]
    assert charts.has_batches(records)
    bars = charts.batch_figure(records)
    assert list(bars.data[0].x) == [2, 3, 4, 5, 6, 7] and list(bars.data[0].y) == [1, 2, 3, 4, 4, 1]
    assert "#2" in bars.layout.title.text and not bars.layout.annotations  # drawn, no placeholder
    assert charts.verdict(records).endswith(" Decoded in batches of 1–4 (mean 2.5).")
    decode = [t for t in charts.latency_figure(records).data if t.yaxis == "y2"]
    assert any("decoded in batches of 1–4" in c[3] for t in decode for c in t.customdata)


@pytest.mark.parametrize("newest", [_record(2), _record(2, (1, 1, 1))], ids=["no batch sizes (remote)", "decoded alone"])
def test_batch_panel_without_batches(newest):
    """A remote's request has no batch sizes: nothing to draw (the page hides the chart), no words, no error. A request
    decoded alone draws its bars at 1 and the verdict says nothing of batches."""
    records = [_record(1, (2, 2)), newest]
    assert charts.has_batches(records) is bool(newest.batch_sizes)
    figure = charts.batch_figure(records)
    assert figure.data[0].type == "bar" and list(figure.data[0].y) == list(newest.batch_sizes)  # one kind of trace in every state
    assert bool(figure.layout.annotations) is (not newest.batch_sizes)  # the placeholder only where nothing is drawn
    assert "batches" not in charts.verdict(records)
    assert not charts.has_batches([]) and charts.batch_figure([]).layout.annotations


def test_records_keep_the_engines_batch_sizes(service):
    """A request's batch sizes reach its record: one per decode step (tokens 2..n), 1 for requests run one after another."""
    history = three_requests(service)
    assert all(r.batch_sizes == (1,) * (r.new_tokens - 1) for r in history.records)


def _running_row(prefix: str | None, reused: int, phase: str = "decode", age: float = 1.0) -> dict:
    return {"phase": phase, "prompt_tokens": 400, "new_tokens": 3 if phase == "decode" else 0, "max_new_tokens": 64, "reused_tokens": reused,
            "shared_prefix": prefix, "batch_size": 4 if phase == "decode" else 0, "started_s_ago": age}


def test_running_table_groups_requests_by_the_cached_prefix_they_reuse():
    """Requests reusing the same cached prefix share a letter and sit together, in the order their first one started;
    those that reused nothing come last; the line above says how many reuse which prefix."""
    rows = [_running_row("aa", 376, age=9), _running_row(None, 0, "prefill", age=8), _running_row("bb", 64, age=7), _running_row("aa", 376, age=6), _running_row("aa", 376, age=5)]
    frame = charts.running_frame(rows)
    assert list(frame.columns) == charts.RUNNING_COLUMNS
    assert list(frame["prefix"]) == ["A", "A", "A", "B", "–"] and list(frame["cached"]) == [376, 376, 376, 64, 0]
    assert list(frame["running"])[:3] == ["9.0 s", "6.0 s", "5.0 s"] and frame["new"][0] == "3/64"
    assert list(frame["batch"]) == [4, 4, 4, 4, "–"]  # no decode step yet: no batch
    summary = charts.running_summary(rows)
    assert summary.startswith("**Running now: 5 requests**")
    assert "**A**: 3 requests reuse the same cached 376-token prefix" in summary and "**B**: 1 request reuses a cached 64-token prefix" in summary
    assert summary.endswith("1 reused nothing")
    assert charts.running_frame([]).empty and "nothing" in charts.running_summary([])
    assert charts.running_summary([], "a server does not say") == "**Running now:** not shown here: a server does not say."  # a remote backend
