"""What the page draws from results: per-request history rows, plotly figures, token highlights, tables.

Pure functions of engine results and cache rows; they build no Gradio components and run no model
(``decode`` is passed in). Hit, partial and miss always have the same colours.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import pandas as pd
import plotly.graph_objects as go

from engine import GenerationResult
from ui.limits import MAX_CHART_RECORDS

STATUS_COLORS = {"hit": "#16a34a", "partial": "#f59e0b", "miss": "#dc2626", "skipped": "#a8a29e", "off": "#6366f1"}
STATUS_TEXT = {
    "hit": "hit: the whole prompt came from the cache",
    "partial": "partial hit: a prefix came from the cache",
    "miss": "miss: nothing reusable was cached",
    "skipped": "skipped: the prompt is too short to cache",
    "off": "prefix cache off",
}
TOKEN_COLORS = {"cached": "#bbf7d0", "computed": "#fed7aa"}
MAX_HIGHLIGHTED_TOKENS = 1200  # a longer prompt shows its start; the page stays light
_DECODE_COLOR = "#cbd5e1"
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
        )

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


def latency_figure(records: Sequence[RequestRecord]) -> go.Figure:
    """Per-request stacked bars: TTFT (coloured by cache status) under decode time."""
    fig = go.Figure()
    for status, color in STATUS_COLORS.items():
        rows = [r for r in records if r.cache_status == status]
        if not rows:
            continue
        fig.add_bar(
            x=[_x(r) for r in rows],
            y=[r.ttft_ms for r in rows],
            name=f"TTFT ({status})",
            marker_color=color,
            customdata=[[r.label, r.settings_text, r.wall_ttft_ms, r.prompt_tokens, r.reused_tokens] for r in rows],
            hovertemplate="%{x} %{customdata[0]}<br>TTFT %{y:.1f} ms (wall %{customdata[2]:.1f} ms)"
            "<br>%{customdata[1]}<br>prompt %{customdata[3]} tokens, %{customdata[4]} from cache<extra>" + status + "</extra>",
        )
    if records:
        fig.add_bar(
            x=[_x(r) for r in records],
            y=[r.decode_ms for r in records],
            name="decode",
            marker_color=_DECODE_COLOR,
            customdata=[[r.new_tokens, r.settings_text] for r in records],
            hovertemplate="%{x}: decode %{y:.1f} ms for %{customdata[0]} tokens<br>%{customdata[1]}<extra>decode</extra>",
        )
    fig.update_layout(title="Time to first token vs decode, per request", barmode="stack", yaxis_title="milliseconds", **_LAYOUT)
    fig.update_xaxes(categoryorder="array", categoryarray=[_x(r) for r in records])  # request order, not trace order
    return _placeholder(_narrow_bars(fig, len(records)), records)


def hit_history_figure(records: Sequence[RequestRecord]) -> go.Figure:
    """Per request: share of the prompt reused (coloured hit/partial/miss), and the running hit rate."""
    fig = go.Figure()
    if records:
        fig.add_bar(
            x=[_x(r) for r in records],
            y=[100 * r.reused_tokens / r.prompt_tokens if r.prompt_tokens else 0 for r in records],
            marker_color=[STATUS_COLORS.get(r.cache_status, _DECODE_COLOR) for r in records],
            text=[r.cache_status for r in records],
            textposition="outside",
            name="prompt reused",
            showlegend=False,  # each bar is labelled with its status; a single legend colour would mislead
            customdata=[[r.reused_tokens, r.prompt_tokens, r.settings_text] for r in records],
            hovertemplate="%{x}: %{text}, %{customdata[0]} of %{customdata[1]} prompt tokens reused<br>%{customdata[2]}<extra></extra>",
        )
        looked_up = hits = 0
        rate_x, rate_y = [], []
        for r in records:
            if r.cache_status in ("hit", "partial", "miss"):  # the ones the cache counts
                looked_up += 1
                hits += r.cache_status != "miss"
            rate_x.append(_x(r))
            rate_y.append(100 * hits / looked_up if looked_up else None)
        fig.add_scatter(x=rate_x, y=rate_y, mode="lines+markers", name="running hit rate", line=dict(color="#2563eb", width=2), connectgaps=True, hovertemplate="%{x}: hit rate %{y:.0f}%<extra></extra>")
    fig.update_layout(title="Prefix-cache hits, per request", yaxis=dict(title="% of prompt from cache", range=[0, 115]), **_LAYOUT)
    return _placeholder(_narrow_bars(fig, len(records)), records)


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
    """The request's figures as a row of cards."""
    t = result.timings
    status = result.cache_status
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
    badge = f'<span class="kv-badge" style="background:{STATUS_COLORS.get(status, _DECODE_COLOR)}">{html.escape(status)}</span>'
    return f'<div class="kv-figures">{body}</div><div class="kv-status">{badge} {html.escape(STATUS_TEXT.get(status, status))}</div>'


def empty_figures_html() -> str:
    return '<div class="kv-status kv-muted">Generate to see this request\'s timings and cache status.</div>'


def token_highlights(result: GenerationResult, decode: Callable[[Sequence[int]], str]) -> list[tuple[str, str | None]]:
    """The prompt's tokens, each labelled ``cached`` or ``computed`` (special tokens show as ◇)."""
    cached = reused_tokens(result)
    ids = result.prompt_token_ids
    spans: list[tuple[str, str | None]] = [
        (decode([token]) or "◇", "cached" if i < cached else "computed") for i, token in enumerate(ids[:MAX_HIGHLIGHTED_TOKENS])
    ]
    if len(ids) > MAX_HIGHLIGHTED_TOKENS:
        spans.append((f" … and {len(ids) - MAX_HIGHLIGHTED_TOKENS:,} more tokens", None))
    return spans


def explanation_html(result: GenerationResult) -> str:
    """Why the prefix cache reused what it did (``cache_explanation``), under the token highlights.

    Every piece of text is escaped: the decoded context is the user's own prompt (and, in their own
    namespace, their own cached tokens), which may hold anything.
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
        cached_text = "(not shown: the shared cache holds others' prompts)" if cached is None else f"<mark>{html.escape(cached)}</mark>"
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


def tree_figure(rows: Sequence[dict[str, Any]], colour: str = "hits", now: float | None = None) -> go.Figure:
    """The cache inspector's tree view: an icicle of the radix tree, from ``EngineService.entries`` rows.

    Each node's own width is its edge's tokens (a subtree spans its descendants too); ``colour``
    (one of ``TREE_COLOURS``) is its hits, or its recency: seconds since its last use at ``now``
    (default: the wall clock), darkest for the newest. Locked nodes are outlined red, pinned ones
    violet (a locked outline wins), and both are marked in the label, whatever the colour. The
    hover text is the row's ``preview``, so it follows the table's rule exactly: another
    session's tokens show as the placeholder, never as text; it also gives the last use's age.
    Clicking a node zooms into its subtree; clicking the top bar zooms back out.

    Raises:
        ValueError: ``colour`` is not one of ``TREE_COLOURS``.
    """
    if colour not in TREE_COLOURS:
        raise ValueError(f"colour: pick one of {', '.join(TREE_COLOURS)}")
    fig = go.Figure()
    if not rows:
        return _placeholder(fig, rows, "The cache is empty: press Generate").update_layout(template="plotly_white", height=220)
    now = time.time() if now is None else now
    ages = [max(now - r["last_used"], 0.0) if r["last_used"] else None for r in rows]
    oldest = max((a for a in ages if a is not None), default=0.0)
    total = ["the whole namespace", sum(r["tokens"] for r in rows), round(sum(r["bytes"] for r in rows) / 1024, 1), "", "", "", "", "", ""]
    ids, parents, labels, values, outline, width, custom = ["root"], [""], ["cache"], [0], ["#ffffff"], [1], [total]
    colours = [0.0 if colour == "hits" else oldest]  # the root bar: no hits, as old as the oldest node
    for r, age in zip(rows, ages):
        marks = ("🔒 " if r["locked"] else "") + ("📌 " if r.get("pinned") else "")
        ids.append(f"n{r['id']}")
        parents.append("root" if r["parent"] is None else f"n{r['parent']}")
        labels.append(f"{marks}{_short(r['preview'])}")
        values.append(r["tokens"])
        colours.append(r["hits"] if colour == "hits" else oldest if age is None else round(age, 1))
        outline.append(_LOCKED if r["locked"] else _PINNED if r.get("pinned") else "#ffffff")
        width.append(3 if r["locked"] or r.get("pinned") else 1)
        custom.append([
            html.escape(r["preview"]),
            r["tokens"],
            round(r["bytes"] / 1024, 1),
            r["hits"],
            _clock_time(r["last_used"]),
            "yes" if r["logits"] else "no",
            "yes" if r["locked"] else "no",
            "yes" if r.get("pinned") else "no",
            _age(age),
        ])
    scale = dict(colorscale="Blues", cmin=0, colorbar=dict(title="hits")) if colour == "hits" else dict(
        colorscale="Blues", reversescale=True, cmin=0, cmax=max(oldest, 1.0), colorbar=dict(title="seconds since<br>last use")
    )
    fig.add_trace(
        go.Icicle(
            ids=ids,
            parents=parents,
            labels=labels,
            values=values,
            branchvalues="remainder",  # a node's value is its own edge; its bar also spans its children
            customdata=custom,
            marker=dict(colors=colours, showscale=True, line=dict(color=outline, width=width), **scale),
            hovertemplate=(
                "%{customdata[0]}<br>%{customdata[1]} tokens · %{customdata[2]} KiB · %{customdata[3]} hits"
                "<br>last used %{customdata[4]} (%{customdata[8]}) · logits %{customdata[5]} · locked %{customdata[6]} · pinned %{customdata[7]}<extra></extra>"
            ),
            tiling=dict(orientation="v"),
            root=dict(color="#f1f5f9"),
            maxdepth=6,
        )
    )
    title = {"hits": "colour: hits", "recency": "colour: time since last use, darkest newest"}[colour]
    fig.update_layout(template="plotly_white", height=420, margin=dict(l=10, r=10, t=40, b=10), title=f"Radix tree (width: tokens, {title}; click to zoom)")
    return fig


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
