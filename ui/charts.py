"""What the page draws from results: per-request history rows, plotly figures, token highlights, tables.

Pure functions of engine results and cache rows; they build no Gradio components and run no model
(``decode`` is passed in). Hit, partial, miss and "no KV cache" always have the same colours. Every
figure renders from every state (no records, an empty or one-node tree) with the same kind of
traces and axes as when it is full: Plotly's in-place update throws when a figure switches between
a cartesian placeholder and an icicle, and a throw there stops the page from updating.
"""

from __future__ import annotations

import html
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from cache.budget_plan import ReplayRow, format_bytes
from engine import GenerationResult
from ui.limits import MAX_CHART_RECORDS

# "no-kv" is the page's own status for a request run without a KV cache (the engine reports "off",
# as for the prefix cache off): it costs every decode step, not the prefill, and gets its own colour.
STATUS_COLORS = {"hit": "#16a34a", "partial": "#f59e0b", "miss": "#dc2626", "skipped": "#a8a29e", "off": "#6366f1", "no-kv": "#db2777"}
STATUS_TEXT = {
    "hit": "hit: the whole prompt came from the cache",
    "partial": "partial hit: a prefix came from the cache",
    "miss": "miss: nothing reusable was cached",
    "skipped": "skipped: the prompt is too short to cache",
    "off": "prefix cache off: the whole prompt was prefilled",
    "no-kv": "no KV cache: every decode step re-ran the whole sequence (and nothing was reused)",
}
STATUS_BADGE = {"no-kv": "no KV cache", "off": "prefix off"}  # the badge's words where they are not the status itself
TOKEN_COLORS = {"cached": "#bbf7d0", "computed": "#fed7aa"}
MAX_HIGHLIGHTED_TOKENS = 1200  # a longer prompt shows its start; the page stays light
_DECODE_COLOR = "#cbd5e1"
_BATCH_COLOR = "#2563eb"
RUNNING_COLUMNS = ["prefix", "cached", "phase", "batch", "new", "prompt", "running"]  # "Running now": short, what a phone shows first on the left
TREE_COLOURS = ("hits", "recency")  # what the tree view's colour shows: a node's hits, or the time since its last use
_LOCKED, _PINNED = "#dc2626", "#7c3aed"  # tree view outlines: held by a running request, pinned
_LAYOUT = dict(template="plotly_white", height=340, margin=dict(l=50, r=20, t=50, b=40), legend=dict(orientation="h", y=-0.18))


@dataclass(frozen=True)
class RequestRecord:
    """One request in a browser session's chart history."""

    index: int
    label: str  # "playground", or the scenario and phase
    cache_status: str
    use_cache: bool
    use_prefix_cache: bool
    ttft_ms: float
    wall_ttft_ms: float
    decode_ms: float
    total_ms: float
    prompt_tokens: int
    reused_tokens: int
    new_tokens: int
    batch_sizes: tuple[int, ...] = ()  # how many requests each decode step ran for (tokens 2..n); none from a remote

    @classmethod
    def of(cls, result: GenerationResult, index: int, label: str = "playground") -> "RequestRecord":
        t = result.timings
        return cls(
            index=index,
            label=label,
            cache_status=result.cache_status,
            use_cache=result.use_cache,
            use_prefix_cache=result.use_prefix_cache,
            ttft_ms=t["ttft_ms"],
            wall_ttft_ms=t["wall_ttft_ms"],
            decode_ms=t["decode_ms"],
            total_ms=t["total_ms"],
            prompt_tokens=int(t["prompt_tokens"]),
            reused_tokens=reused_tokens(result),
            new_tokens=int(t["new_tokens"]),
            batch_sizes=tuple(result.batch_sizes),
        )

    @property
    def status(self) -> str:
        """The status the page shows: ``no-kv`` for a run without a KV cache, else the engine's."""
        return cache_status_of(self.use_cache, self.cache_status)

    @property
    def decode_ms_per_token(self) -> float:
        """Decode time per step after the first token (0 when only one token was made)."""
        steps = self.new_tokens - 1
        return self.decode_ms / steps if steps > 0 else 0.0

    @property
    def settings_text(self) -> str:
        return f"KV cache {'on' if self.use_cache else 'off'}, prefix cache {'on' if self.use_prefix_cache else 'off'}"


@dataclass
class SessionHistory:
    """One page session's requests, kept in ``gr.State`` and bound to the session that made them.

    Gradio keys ``gr.State`` by the client-sent ``session_hash``, which anyone can copy, so the
    history records its ``owner`` (the server-issued session key) and :meth:`owned_by` hands a
    caller someone else's history never: a stranger gets a fresh one.
    """

    owner: str | None = None
    records: list[RequestRecord] = field(default_factory=list)
    # Token sequences this session sent and received: the cache paths whose text it may see.
    sequences: list[tuple[int, ...]] = field(default_factory=list)
    max_sequences: int = 64
    max_records: int = MAX_CHART_RECORDS
    added: int = 0  # requests ever added: numbers the records even after old ones are dropped

    def owned_by(self, session_key: str) -> "SessionHistory":
        """This history when it belongs to ``session_key`` (or to nobody yet), else a fresh one for it."""
        if self.owner is None:
            self.owner = session_key
        return self if self.owner == session_key else SessionHistory(owner=session_key)

    def add(self, result: GenerationResult, label: str = "playground", own_sequence: bool = True) -> RequestRecord:
        self.added += 1
        record = RequestRecord.of(result, index=self.added, label=label)
        self.records.append(record)
        del self.records[: -self.max_records]
        if own_sequence:
            self.sequences.append(tuple(result.prompt_token_ids) + tuple(result.token_ids))
            del self.sequences[: -self.max_sequences]
        return record

    def reset_charts(self) -> None:
        self.records.clear()
        self.added = 0


def reused_tokens(result: GenerationResult) -> int:
    """Prompt tokens whose KV came from the cache (the whole prompt on an exact hit)."""
    return int(result.timings["prefix_tokens_saved"])


def cache_status_of(use_cache: bool, cache_status: str) -> str:
    """The page's status of a request: ``no-kv`` without a KV cache, else the engine's ``cache_status``."""
    return cache_status if use_cache else "no-kv"


def latency_figure(records: Sequence[RequestRecord]) -> go.Figure:
    """Two panels per request: time to first token (log scale, coloured by status) above decode time per token.

    They get their own panels because they answer different questions: the prefix cache changes the
    first (often by 100x or more, hence the log scale), the KV cache the second. The newest request
    that reused a prefix is annotated with its ratio to the miss it is compared with (:func:`baseline`).
    """
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.14, row_heights=[0.6, 0.4],
                        subplot_titles=("Time to first token (ms, log scale)", "Decode: ms per new token"))
    for status, color in STATUS_COLORS.items():
        rows = [r for r in records if r.status == status]
        if not rows:
            continue
        x = [_x(r) for r in rows]
        fig.add_bar(
            x=x, y=[_ttft_bar(r) for r in rows], name=STATUS_BADGE.get(status, status), legendgroup=status, marker_color=color,
            customdata=[[r.label, r.settings_text, r.wall_ttft_ms, r.prompt_tokens, r.reused_tokens] for r in rows],
            hovertemplate="%{x} %{customdata[0]}<br>TTFT %{y:.1f} ms (wall %{customdata[2]:.1f} ms)"
            "<br>%{customdata[1]}<br>prompt %{customdata[3]} tokens, %{customdata[4]} from cache<extra>" + status + "</extra>",
            row=1, col=1,
        )
        fig.add_bar(
            x=x, y=[r.decode_ms_per_token for r in rows], name=status, legendgroup=status, showlegend=False, marker_color=color,
            customdata=[[r.new_tokens, r.decode_ms, r.settings_text, _line(batch_phrase(r.batch_sizes))] for r in rows],
            hovertemplate="%{x}: %{y:.1f} ms per token (%{customdata[0]} tokens, decode %{customdata[1]:.0f} ms)<br>%{customdata[2]}%{customdata[3]}<extra>" + status + "</extra>",
            row=2, col=1,
        )
    fig.update_yaxes(type="log", dtick=1, title_text="ms", range=_decades([_ttft_bar(r) for r in records]), row=1, col=1)  # ticks at powers of ten only
    fig.update_yaxes(title_text="ms / token", rangemode="tozero", row=2, col=1)
    _annotate_saving(fig, records)
    fig.update_layout(barmode="group", bargap=0.25, **{**_LAYOUT, "height": 420, "margin": dict(l=55, r=15, t=40, b=40)})
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=[_x(r) for r in records])  # request order
    return _placeholder(_narrow_bars(fig, len(records)), records)


def hit_history_figure(records: Sequence[RequestRecord]) -> go.Figure:
    """Two panels: each request's share of the prompt reused (bars by status) above the running hit rate.

    The running rate counts the requests the cache looked up (hit, partial, miss); a partial is a hit.
    """
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.14, row_heights=[0.6, 0.4],
                        subplot_titles=("% of the prompt from the cache", "Running hit rate (%)"))
    x = [_x(r) for r in records]
    fig.add_bar(
        x=x, y=[100 * r.reused_tokens / r.prompt_tokens if r.prompt_tokens else 0 for r in records],
        marker_color=[STATUS_COLORS.get(r.status, _DECODE_COLOR) for r in records],
        text=[STATUS_BADGE.get(r.status, r.status) for r in records], textposition="outside", cliponaxis=False,
        name="prompt reused", showlegend=False,  # each bar is labelled with its status
        customdata=[[r.reused_tokens, r.prompt_tokens, r.settings_text] for r in records],
        hovertemplate="%{x}: %{text}, %{customdata[0]} of %{customdata[1]} prompt tokens reused<br>%{customdata[2]}<extra></extra>",
        row=1, col=1,
    )
    fig.add_scatter(
        x=x, y=running_hit_rate(records), mode="lines+markers", name="running hit rate", showlegend=False,
        line=dict(color="#2563eb", width=2), connectgaps=True, hovertemplate="%{x}: hit rate %{y:.0f}%<extra></extra>", row=2, col=1,
    )
    fig.update_yaxes(range=[0, 118], title_text="%", row=1, col=1)
    fig.update_yaxes(range=[0, 105], title_text="%", row=2, col=1)
    fig.update_layout(**{**_LAYOUT, "height": 420, "margin": dict(l=55, r=15, t=40, b=40)})
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=x)
    return _placeholder(_narrow_bars(fig, len(records)), records)


def running_hit_rate(records: Sequence[RequestRecord]) -> list[float | None]:
    """After each request: % of the looked-up requests so far that reused a prefix (None before the first lookup)."""
    looked_up = hits = 0
    rates: list[float | None] = []
    for r in records:
        if r.status in ("hit", "partial", "miss"):  # the ones the cache counts
            looked_up += 1
            hits += r.status != "miss"
        rates.append(100 * hits / looked_up if looked_up else None)
    return rates


def baseline(records: Sequence[RequestRecord], record: RequestRecord) -> RequestRecord | None:
    """The earlier request ``record`` is compared with: the one that reused nothing (a miss, or the
    prefix cache off) with the KV cache on and the prompt length nearest to ``record``'s, newest
    first among equals. None when there is none: then the page claims no ratio."""
    earlier = [r for r in records if r.index < record.index and r.use_cache and r.reused_tokens == 0 and r.status in ("miss", "off", "skipped")]
    return min(reversed(earlier), key=lambda r: abs(r.prompt_tokens - record.prompt_tokens), default=None)


def verdict(records: Sequence[RequestRecord]) -> str:
    """One line about the newest request: what it reused and how much sooner its first token came, or
    what running without a KV cache cost per token; then, where its decode steps ran with other
    requests', the batches they ran in (:func:`batch_phrase`). Empty before the first request."""
    if not records:
        return ""
    line = _saving(records)
    batches = batch_phrase(records[-1].batch_sizes)
    return f"{line} {batches[:1].upper()}{batches[1:]}." if batches else line


def batch_phrase(batch_sizes: Sequence[int]) -> str:
    """"decoded in batches of 1–4 (mean 2.6)": the batches a request's decode steps ran in; empty when each ran alone, or there were none."""
    if max(batch_sizes, default=0) <= 1:
        return ""
    low, high = min(batch_sizes), max(batch_sizes)
    if low == high:
        return f"decoded in batches of {high}"
    mean = math.floor(100 * sum(batch_sizes) / len(batch_sizes)) / 100  # rounded down: 3.99, never "4" for steps of 1 and 4
    return f"decoded in batches of {low}–{high} (mean {mean:g})"


def has_batches(records: Sequence[RequestRecord]) -> bool:
    """Whether :func:`batch_figure` has anything to draw: the newest request made tokens in decode steps.

    Not after a remote backend's request (a serving engine does not say how it batched), a one-token
    request, or one without a KV cache (it re-runs the sequence alone at every step): the page hides the chart then.
    """
    return bool(records and records[-1].batch_sizes)


def batch_figure(records: Sequence[RequestRecord]) -> go.Figure:
    """The newest request's decode steps, one bar per token it made in one (tokens 2..n): how many requests that step ran for.

    The engine runs the decode steps of every running request as one batched call
    (``engine/scheduler.py``), so a request's step is shared with whoever decodes at that moment;
    this is why its decode time per token (the panel above) moves with the load while its own work
    does not. Always a bar chart, empty before a request with decode steps (see :func:`has_batches`).
    """
    last = records[-1] if has_batches(records) else None
    sizes = list(last.batch_sizes) if last else []
    fig = go.Figure(go.Bar(
        x=list(range(2, len(sizes) + 2)), y=sizes, marker_color=_BATCH_COLOR, name="batch size", showlegend=False,
        hovertemplate="token %{x}: its decode step ran for %{y} requests<extra></extra>",
    ))
    title = f"Requests in each decode step of {_x(last)}" if last else "Requests in each decode step"
    fig.update_layout(title=dict(text=title, x=0.5, font=dict(size=16)), bargap=0.15, **{**_LAYOUT, "height": 230, "margin": dict(l=55, r=15, t=40, b=40)})
    fig.update_xaxes(title_text="token", title_standoff=4, range=[1.5, len(sizes) + 1.5] if sizes else None)  # token 1 came from the prefill
    fig.update_yaxes(title_text="batch", range=[0, max(sizes, default=1) + 0.5], dtick=1 if max(sizes, default=1) <= 8 else None)
    return _placeholder(fig, sizes, "No decode steps yet: press Generate")


def verdict_html(records: Sequence[RequestRecord]) -> str:
    text = verdict(records)
    return f'<div class="kv-verdict">{html.escape(text)}</div>' if text else ""


def scenario_figure(off: Sequence[RequestRecord], on: Sequence[RequestRecord], title: str) -> go.Figure:
    """The same requests side by side: TTFT with the prefix cache off, then on."""
    fig = go.Figure()
    for name, rows, color in (("prefix cache off", off, STATUS_COLORS["off"]), ("prefix cache on", on, STATUS_COLORS["hit"])):
        fig.add_bar(
            x=[f"Q{i + 1}" for i in range(len(rows))],
            y=[r.ttft_ms for r in rows],
            name=name,
            marker_color=color,
            text=[r.cache_status for r in rows],
            textposition="outside",
            customdata=[[r.total_ms, r.reused_tokens, r.prompt_tokens] for r in rows],
            hovertemplate="%{x}: TTFT %{y:.1f} ms, total %{customdata[0]:.0f} ms<br>%{customdata[1]} of %{customdata[2]} prompt tokens reused<extra>" + name + "</extra>",
        )
    highest = max((r.ttft_ms for r in [*off, *on]), default=0)
    fig.update_layout(title=title, barmode="group", yaxis=dict(title="TTFT (ms)", range=[0, 1.18 * highest or 1]), **_LAYOUT)
    return _placeholder(fig, list(off) + list(on), "No run yet: pick a scenario and press Run")


def scenario_summary(off: Sequence[RequestRecord], on: Sequence[RequestRecord]) -> str:
    """A markdown line of totals: TTFT and wall time, off vs on."""
    if not off or not on:
        return ""
    ttft_off, ttft_on = sum(r.ttft_ms for r in off), sum(r.ttft_ms for r in on)
    total_off, total_on = sum(r.total_ms for r in off), sum(r.total_ms for r in on)
    saved = sum(r.reused_tokens for r in on)
    return (
        f"**{len(on)} requests.** TTFT summed: {ttft_off:,.0f} ms off → {ttft_on:,.0f} ms on "
        f"({_change(ttft_off, ttft_on)}); total time {total_off:,.0f} ms → {total_on:,.0f} ms ({_change(total_off, total_on)}); "
        f"{saved:,} prompt tokens reused instead of recomputed."
    )


def figures_html(result: GenerationResult) -> str:
    """The request's figures as a row of cards, and its status badge with one line of what it means."""
    t = result.timings
    status = cache_status_of(result.use_cache, result.cache_status)
    cards = [
        ("TTFT (model)", f"{t['ttft_ms']:,.1f} ms", "tokenize + prefill"),
        ("TTFT (wall)", f"{t['wall_ttft_ms']:,.1f} ms", "as a user waits"),
        ("Decode", f"{t['decode_ms']:,.0f} ms", f"{t['decode_tokens_per_sec']:,.1f} tokens/s"),
        ("Prompt", f"{int(t['prompt_tokens']):,} tokens", f"{int(t['prefill_tokens']):,} prefilled"),
        ("From cache", f"{reused_tokens(result):,} tokens", f"{int(t['new_tokens'])} new tokens"),
    ]
    body = "".join(
        f'<div class="kv-card"><div class="kv-card-label">{html.escape(label)}</div>'
        f'<div class="kv-card-value">{html.escape(value)}</div><div class="kv-card-note">{html.escape(note)}</div></div>'
        for label, value, note in cards
    )
    words = STATUS_BADGE.get(status, status)
    badge = f'<span class="kv-badge kv-badge-{html.escape(status)}" style="background:{STATUS_COLORS.get(status, _DECODE_COLOR)}">{html.escape(words)}</span>'
    return f'<div class="kv-figures">{body}</div><div class="kv-status">{badge} {html.escape(STATUS_TEXT.get(status, status))}</div>'


def empty_figures_html() -> str:
    return '<div class="kv-status kv-muted">Generate to see this request\'s timings and cache status.</div>'


def token_highlights(result: GenerationResult, decode: Callable[[Sequence[int]], str], keep: int = 12) -> list[tuple[str, str | None]]:
    """The prompt's tokens, each labelled ``cached`` or ``computed`` (special tokens show as ◇).

    A long cached run shows its first and last ``keep`` tokens around one "… N more cached tokens …"
    span (labelled cached), so the computed tokens, which come last, stay in view.
    """
    cached = reused_tokens(result)
    ids = result.prompt_token_ids

    def spans(start: int, stop: int) -> list[tuple[str, str | None]]:
        return [(decode([ids[i]]) or "◇", "cached" if i < cached else "computed") for i in range(start, min(stop, len(ids)))]

    if cached > 3 * keep:
        shown = spans(0, keep) + [(f" … {cached - 2 * keep:,} more cached tokens … ", "cached")] + spans(cached - keep, cached)
        start = cached
    else:
        shown, start = [], 0
    shown += spans(start, start + MAX_HIGHLIGHTED_TOKENS)
    if len(ids) > start + MAX_HIGHLIGHTED_TOKENS:
        shown.append((f" … and {len(ids) - start - MAX_HIGHLIGHTED_TOKENS:,} more tokens", None))
    return shown


def explanation_html(result: GenerationResult, hidden_note: str = "(not shown: the shared cache holds others' prompts)") -> str:
    """Why the prefix cache reused what it did (``cache_explanation``), under the token highlights.

    Every piece of text is escaped: the decoded context is the user's own prompt (and, in their own
    namespace, their own cached tokens), which may hold anything. ``hidden_note`` stands in for the
    cached side where the service withholds it (the page words it for its own cache mode).
    """
    e = result.cache_explanation
    if not e:
        return ""
    lines = [f'<b>Why:</b> <code>{html.escape(e["reason"])}</code> · {html.escape(e["message"])}']
    if result.verification:
        v = result.verification
        mark = "✔ verified identical" if v["identical"] else f"✘ first difference at token {v['first_difference']}"
        lines.insert(0, f'<b class="kv-verify-{"ok" if v["identical"] else "bad"}">{mark}</b> · {html.escape(v["message"])}')
    if "diverged_at" in e:
        cached = e.get("cached_after")
        cached_text = html.escape(hidden_note) if cached is None else f"<mark>{html.escape(cached)}</mark>"
        lines.append(
            f'…{html.escape(e["before"])}<span class="kv-diverge">⟂</span> your prompt: <mark>{html.escape(e["prompt_after"])}</mark>'
            f" · cached: {cached_text}"
        )
        lines.append(f'<i>{html.escape(e["hint"])}</i>')
    if e.get("evicted"):
        at = time.strftime("%H:%M:%S", time.localtime(e["evicted"]["at"]))
        lines.append(f'This {e["evicted"]["length"]}-token prefix was cached and evicted at {at} ({html.escape(e["evicted"]["cause"])}).')
    return '<div class="kv-explain">' + "<br>".join(lines) + "</div>"


def inspector_frame(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """The cache inspector's table, newest first."""
    columns = ["start", "tokens", "KiB", "hits", "last used", "logits", "locked", "pinned", "preview"]
    frame = pd.DataFrame(
        [
            {
                "start": r["start"],
                "tokens": r["tokens"],
                "KiB": round(r["bytes"] / 1024, 1),
                "hits": r["hits"],
                "last used": _clock_time(r["last_used"]),
                "logits": "yes" if r["logits"] else "",
                "locked": "yes" if r["locked"] else "",
                "pinned": "yes" if r.get("pinned") else "",
                "preview": r["preview"],
                "_t": r["last_used"],
            }
            for r in rows
        ],
        columns=columns + ["_t"],
    )
    return frame.sort_values("_t", ascending=False, kind="stable").drop(columns="_t").reset_index(drop=True)


def running_frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The inspector's "Running now" table, from ``EngineService.running`` rows: one row per request,
    the requests that reuse the same cached prefix together, under the same letter.

    A letter (A, B, ...) stands for one ``shared_prefix`` id, in the order its first request started;
    it names a prefix within this one view only. Requests that reused nothing come last, with no letter.
    """
    letters = _prefix_letters(rows)
    rank = {prefix: i for i, prefix in enumerate(letters)}
    order = sorted(rows, key=lambda r: rank.get(r["shared_prefix"], len(rank)))  # stable: oldest first within a group
    return pd.DataFrame(
        [
            {
                "prefix": letters.get(r["shared_prefix"], "–"),
                "cached": r["reused_tokens"],
                "phase": r["phase"],
                "batch": r["batch_size"] or "–",  # 0: no decode step yet
                "new": f"{r['new_tokens']}/{r['max_new_tokens']}",
                "prompt": r["prompt_tokens"],
                "running": f"{r['started_s_ago']:,.1f} s",
            }
            for r in order
        ],
        columns=RUNNING_COLUMNS,
    )


def running_summary(rows: Sequence[dict[str, Any]], unavailable: str | None = None) -> str:
    """The line above the "Running now" table: how many requests run, and which of them share a cached prefix.

    ``unavailable`` is the backend's reason where it cannot say what runs (a remote server): then that, and no table.
    """
    if unavailable:
        return f"**Running now:** not shown here: {unavailable}."
    if not rows:
        return "**Running now:** nothing. Requests show here while they prefill or decode (press Refresh)."
    letters = _prefix_letters(rows)
    groups = [(letter, [r for r in rows if r["shared_prefix"] == prefix]) for prefix, letter in letters.items()]
    parts = [
        f"**{letter}**: {len(mine)} requests reuse the same cached {mine[0]['reused_tokens']:,}-token prefix" if len(mine) > 1
        else f"**{letter}**: 1 request reuses a cached {mine[0]['reused_tokens']:,}-token prefix"
        for letter, mine in groups
    ]
    alone = sum(r["shared_prefix"] is None for r in rows)
    if alone:
        parts.append(f"{alone} reused nothing")
    return f"**Running now: {_count(len(rows), 'request')}** · " + " · ".join(parts)


def tree_figure(rows: Sequence[dict[str, Any]], colour: str = "hits", now: float | None = None) -> go.Figure:
    """The cache inspector's tree view: an icicle of the radix tree, from ``EngineService.entries`` rows.

    Each node's own width is its edge's tokens (a subtree spans its descendants too); ``colour``
    (one of ``TREE_COLOURS``) is its hits, or its recency: seconds since its last use at ``now``
    (default: the wall clock), darkest for the newest. Locked nodes are outlined red, pinned ones
    violet (a locked outline wins), and both are marked in the label, whatever the colour. The
    hover text is the row's ``preview``, so it follows the table's rule exactly: another
    session's tokens show as the placeholder, never as text; it also gives the last use's age.
    The root's hover sums the namespace. An empty cache is an icicle of the root alone, so the
    figure keeps its kind from every state to every other. Clicking a node zooms into its subtree.

    Raises:
        ValueError: ``colour`` is not one of ``TREE_COLOURS``.
    """
    if colour not in TREE_COLOURS:
        raise ValueError(f"colour: pick one of {', '.join(TREE_COLOURS)}")
    now = time.time() if now is None else now
    ages = [max(now - r["last_used"], 0.0) if r["last_used"] else None for r in rows]
    oldest = max((a for a in ages if a is not None), default=0.0)
    points = _tree_points(rows, ages, colour, oldest)
    most_hits = max((r["hits"] for r in rows), default=0)
    scale = dict(colorscale="Blues", cmin=0, cmax=max(most_hits, 1), colorbar=dict(title="hits", thickness=14)) if colour == "hits" else dict(
        colorscale="Blues", reversescale=True, cmin=0, cmax=max(oldest, 1.0), colorbar=dict(title="seconds since<br>last use", thickness=14)
    )
    fig = go.Figure(
        go.Icicle(
            ids=points["ids"], parents=points["parents"], labels=points["labels"], values=points["values"],
            branchvalues="remainder",  # a node's value is its own edge; its bar also spans its children
            customdata=points["custom"], hovertemplate=points["hover"],
            marker=dict(colors=points["colours"], showscale=bool(rows), line=dict(color=points["outline"], width=points["width"]), **scale),
            tiling=dict(orientation="v"), root=dict(color="#f1f5f9"), maxdepth=6,
        )
    )
    title = {"hits": "colour: hits", "recency": "colour: time since last use, darkest newest"}[colour]
    fig.update_layout(template="plotly_white", height=420 if rows else 220, margin=dict(l=10, r=10, t=40, b=10), title=f"Radix tree (width: tokens, {title}; click to zoom)")
    return fig


def plan_figure(rows: Sequence[ReplayRow], title: str) -> go.Figure:
    """The planner's chart: token hit rate vs budget, one line per policy, in the unit that fits the
    budgets (KiB, MiB or GiB, log axis), each policy's knee starred and labelled, an unbounded cache
    dashed with its peak. No rows: the axes with a hint, as before a first replay."""
    fig = go.Figure()
    finite = [r.budget_bytes for r in rows if r.budget_bytes]
    unit, scale = _byte_unit(max(finite, default=1 << 30))
    for policy in dict.fromkeys(r.policy for r in rows):
        mine = [r for r in rows if r.policy == policy and r.budget_bytes is not None]
        fig.add_scatter(
            x=[r.budget_bytes / scale for r in mine], y=[100 * r.token_hit_rate for r in mine], mode="lines+markers", name=policy,
            customdata=[[r.budget, 100 * r.request_hit_rate, r.evictions, format_bytes(r.peak_bytes)] for r in mine],
            hovertemplate="%{customdata[0]}: %{y:.1f}% of prompt tokens reused, %{customdata[1]:.1f}% of requests hit, "
            "%{customdata[2]:,} evictions, peak %{customdata[3]}<extra>" + policy + "</extra>",
        )
    _mark_knees(fig, rows, scale)
    unbounded = next((r for r in rows if r.budget_bytes is None), None)
    if unbounded is not None:
        fig.add_hline(y=100 * unbounded.token_hit_rate, line_dash="dash", annotation_text=f"unbounded (peak {format_bytes(unbounded.peak_bytes)})")
    fig.update_layout(title=title, xaxis_title=f"memory budget ({unit}, log scale)", yaxis_title="prompt tokens reused (%)", xaxis_type="log",
                      yaxis_range=[0, 105], legend_title="policy", **{**_LAYOUT, "height": 380})
    return _placeholder(fig, rows, "No plan yet: pick a sample trace or upload one, then press Replay")


def _mark_knees(fig: go.Figure, rows: Sequence[ReplayRow], scale: int) -> None:
    """Star each policy's knee; policies whose knees fall on one point share one label ("lru, lfu knee: 3 MiB")."""
    points: dict[tuple[int, float], list[ReplayRow]] = {}
    for r in rows:
        if r.knee and r.budget_bytes is not None:
            points.setdefault((r.budget_bytes, r.token_hit_rate), []).append(r)
    for (size, rate), knees in points.items():
        names = ", ".join(k.policy for k in knees)
        fig.add_scatter(x=[size / scale], y=[100 * rate], mode="markers", marker=dict(symbol="star", size=16, color="#111827"),
                        name=f"{names} knee", hovertemplate=f"{names}: knee at {knees[0].budget}<extra></extra>", showlegend=False)
        fig.add_annotation(x=math.log10(size / scale), y=100 * rate, text=f"{names} knee: {knees[0].budget}", showarrow=True, arrowhead=2, ax=30, ay=30)


def plan_table(rows: Sequence[ReplayRow]) -> list[list[Any]]:
    """The planner's table rows: rates as percentages, the peak in the unit that fits it."""
    return [
        [r.policy, r.budget, r.requests, f"{r.request_hit_rate:.1%}", f"{r.token_hit_rate:.1%}", r.prompt_tokens, r.reused_tokens,
         format_bytes(r.peak_bytes), r.evictions, round(r.prefill_s_saved, 2), "knee" if r.knee else ""]
        for r in rows
    ]


def stats_markdown(stats: dict[str, Any]) -> str:
    scope = "this session's namespace" if stats.get("scope") == "session" else "the shared cache"
    return (
        f"**{stats['cache_size']}** entries, **{stats['cached_tokens']:,}** tokens, "
        f"**{stats['cached_bytes'] / 2**20:,.1f} MiB** of {stats['budget_bytes'] / 2**20:,.0f} MiB · "
        f"hits **{stats['hits']}**, partial **{stats['partial_hits']}**, misses **{stats['misses']}** "
        f"(hit rate {100 * stats['hit_rate']:.0f}%) · {stats['tokens_saved']:,} tokens saved · "
        f"{stats['evictions']} evictions · {stats.get('pins', 0)} pinned ({stats.get('pinned_bytes', 0) / 2**20:,.1f} of "
        f"{stats.get('pin_budget_bytes', 0) / 2**20:,.1f} MiB pin budget) · showing {scope} (mode: {stats['cache_mode']})"
    )


# ---------------------------------------------------------------------- helpers


_NODE_HOVER = (
    "%{customdata[0]}<br>%{customdata[1]} tokens · %{customdata[2]} KiB · %{customdata[3]} hits"
    "<br>last used %{customdata[4]} (%{customdata[8]}) · logits %{customdata[5]} · locked %{customdata[6]} · pinned %{customdata[7]}<extra></extra>"
)


def _tree_points(rows: Sequence[dict[str, Any]], ages: Sequence[float | None], colour: str, oldest: float) -> dict[str, list]:
    """The icicle's per-point lists: the root (the whole namespace), then one point per row."""
    tokens, kib = sum(r["tokens"] for r in rows), round(sum(r["bytes"] for r in rows) / 1024, 1)
    root_label = "cache" if rows else "The cache is empty: press Generate"
    root_hover = f"the whole namespace: {len(rows)} nodes, {tokens:,} tokens, {kib:,} KiB<extra></extra>" if rows else "nothing cached yet<extra></extra>"
    points: dict[str, list] = dict(
        ids=["root"], parents=[""], labels=[root_label], values=[0 if rows else 1], outline=["#ffffff"], width=[1], custom=[[""] * 9], hover=[root_hover],
        colours=[0.0 if colour == "hits" else oldest],  # the root bar: no hits, as old as the oldest node
    )
    for r, age in zip(rows, ages):
        points["ids"].append(f"n{r['id']}")
        points["parents"].append("root" if r["parent"] is None else f"n{r['parent']}")
        points["labels"].append(("🔒 " if r["locked"] else "") + ("📌 " if r.get("pinned") else "") + _short(r["preview"]))
        points["values"].append(r["tokens"])
        points["colours"].append(r["hits"] if colour == "hits" else oldest if age is None else round(age, 1))
        points["outline"].append(_LOCKED if r["locked"] else _PINNED if r.get("pinned") else "#ffffff")
        points["width"].append(3 if r["locked"] or r.get("pinned") else 1)
        points["hover"].append(_NODE_HOVER)
        points["custom"].append([
            html.escape(r["preview"]), r["tokens"], round(r["bytes"] / 1024, 1), r["hits"], _clock_time(r["last_used"]),
            "yes" if r["logits"] else "no", "yes" if r["locked"] else "no", "yes" if r.get("pinned") else "no", _age(age),
        ])
    return points


def _saving(records: Sequence[RequestRecord]) -> str:
    """The verdict's first sentence: what the newest request reused and what that saved, or what no KV cache cost."""
    last = records[-1]
    if last.status == "no-kv":
        kv = next((r for r in reversed(records[:-1]) if r.use_cache and r.decode_ms_per_token > 0), None)
        steps = max(last.new_tokens - 1, 0)
        slower = f", {last.decode_ms_per_token / kv.decode_ms_per_token:,.1f}× slower per token than {_x(kv)} with the KV cache" if kv and last.decode_ms_per_token else ""
        return f"No KV cache: every one of the {steps} decode steps re-ran the whole sequence{slower}."
    if last.reused_tokens == 0:
        why = {"off": "the prefix cache was off", "skipped": "the prompt is too short to cache"}.get(last.status, "nothing reusable was cached")
        return f"This request reused none of its {last.prompt_tokens} prompt tokens ({why}): its first token took {last.ttft_ms:,.0f} ms."
    line = f"This request reused {last.reused_tokens} of {last.prompt_tokens} prompt tokens"
    base = baseline(records, last)
    if base is None or last.ttft_ms <= 0:
        return line + f": first token in {last.ttft_ms:,.1f} ms (no earlier miss to compare with)."
    return line + f": first token {_ratio(base.ttft_ms, last.ttft_ms)} sooner than {_x(base)}, a {base.prompt_tokens}-token miss ({last.ttft_ms:,.1f} ms vs {base.ttft_ms:,.0f} ms)."


def _prefix_letters(rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    """A letter per ``shared_prefix`` id (A, B, ..., Z, A2, ...), in the order of the requests (oldest first)."""
    ids = dict.fromkeys(r["shared_prefix"] for r in rows if r["shared_prefix"] is not None)
    return {prefix: chr(ord("A") + i % 26) + (str(i // 26 + 1) if i >= 26 else "") for i, prefix in enumerate(ids)}


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _line(text: str) -> str:
    """``text`` as a hover's next line (nothing when empty)."""
    return f"<br>{text}" if text else ""


def _byte_unit(largest: int) -> tuple[str, int]:
    """The unit a chart of sizes up to ``largest`` bytes reads best in, and its size in bytes."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20)):
        if largest >= scale:
            return unit, scale
    return "KiB", 1 << 10


def _ttft_bar(record: RequestRecord) -> float:
    """A request's TTFT bar on the log axis, at least 0.01 ms (a log axis cannot draw 0)."""
    return max(record.ttft_ms, 0.01)


def _decades(values: Sequence[float]) -> list[int] | None:
    """A log axis's range (log10) over whole powers of ten around ``values``: with ticks at powers of ten only,
    bars that all fall inside one decade (400 and 969 ms) had no tick at all. None (autorange) without values."""
    if not values:
        return None
    low = math.floor(math.log10(min(values)))
    return [low, max(math.ceil(math.log10(max(values))), low + 1)]


def _x(record: RequestRecord) -> str:
    return f"#{record.index}"


def _clock_time(t: float) -> str:
    """A node's last use as the inspector shows it (empty when never used)."""
    return time.strftime("%H:%M:%S", time.localtime(t)) if t else ""


def _age(seconds: float | None) -> str:
    """How long ago a node was last used, for the tree view's hover."""
    if seconds is None:
        return "never"
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    return f"{seconds / 60:.0f} min ago" if seconds < 5400 else f"{seconds / 3600:.1f} h ago"


def _short(preview: str, limit: int = 24) -> str:
    """A node's label: the start of its preview (the hover shows all of it)."""
    return html.escape(preview if len(preview) <= limit else preview[: limit - 1] + "…")


def _ratio(before: float, after: float) -> str:
    """How many times ``after`` is below ``before``: "770×", "2.4×"."""
    times = before / after
    return f"{times:,.0f}×" if times >= 10 else f"{times:.1f}×"


def _annotate_saving(fig: go.Figure, records: Sequence[RequestRecord]) -> None:
    """Mark the newest request that reused a prefix with its first-token ratio to its baseline miss."""
    last = next((r for r in reversed(records) if r.reused_tokens > 0 and r.use_cache), None)
    base = baseline(records, last) if last else None
    if last is None or base is None or last.ttft_ms <= 0:
        return
    fig.add_annotation(
        x=_x(last), y=math.log10(_ttft_bar(last)), row=1, col=1,  # a log axis places annotations by log10
        text=f"{STATUS_BADGE.get(last.status, last.status)}: {last.ttft_ms:,.1f} ms,<br>{_ratio(base.ttft_ms, last.ttft_ms)} below {_x(base)}",
        showarrow=True, arrowhead=2, ax=0, ay=-38, font=dict(size=11), bgcolor="rgba(255,255,255,0.85)",
    )


def _change(before: float, after: float) -> str:
    if before <= 0:
        return "n/a"
    return f"{100 * (after - before) / before:+.0f}%"


def _narrow_bars(fig: go.Figure, count: int, min_slots: int = 8) -> go.Figure:
    """Keep a few bars from filling the whole width: reserve room for ``min_slots`` categories."""
    if 0 < count < min_slots:
        fig.update_xaxes(range=[-0.5, min_slots - 0.5])
    return fig


def _placeholder(fig: go.Figure, records: Sequence[Any], message: str = "No requests yet: press Generate") -> go.Figure:
    if not records:
        fig.add_annotation(text=message, showarrow=False, font=dict(size=14, color="#64748b"), xref="paper", yref="paper", x=0.5, y=0.5)
        fig.update_xaxes(visible=False)
        fig.update_yaxes(visible=False)
    return fig
