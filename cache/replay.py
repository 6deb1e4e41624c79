"""``python -m cache.replay``: replay a trace across budgets and policies, and report it as a table, JSON, CSV or a chart.

    python -m cache.replay TRACE [--model-config llama-3.1-8b] [--kv-dtype bf16] [--budgets 1GiB,4GiB,inf]
                                 [--policies lru,lfu] [--format table|json] [--html FILE] [--block-size 512]

The trace formats are ``cache/traces.py``'s; the replay's semantics, what a row counts and the knee
are ``cache/budget_plan.py``'s. This module reads the options, runs the plan and writes its outputs;
the app's planner tab (``ui/planner.py``) uses the same outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Sequence

from cache.budget_plan import (
    DEFAULT_MIN_TOKENS,
    DEFAULT_MODEL_CONFIG,
    DEFAULT_PREFILL_TOKENS_PER_S,
    KNEE_TOLERANCE,
    KV_DTYPE_BYTES,
    ROW_FIELDS,
    ReplayRow,
    ReplaySettings,
    format_bytes,
    load_model_size,
    model_config_names,
    parse_budgets,
    parse_policies,
    plan,
)
from cache.policies import POLICIES
from cache.traces import DEFAULT_BLOCK_SIZE, TextTokenizer, load_trace


# ---------------------------------------------------------------------- public API: reports


def table(rows: Sequence[ReplayRow], model: str = "", unit_note: str = "") -> str:
    """The rows as a fixed-width text table, then each policy's knee."""
    head = f"{'policy':<6} {'budget':>10} {'requests':>9} {'req hit':>8} {'tok hit':>8} {'prompt tok':>13} {'reused tok':>13} {'peak':>10} {'evictions':>10} {'prefill saved':>14}"
    lines = [f"# {model}{unit_note}".rstrip() if model or unit_note else None, head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.policy:<6} {r.budget:>10} {r.requests:>9,} {r.request_hit_rate:>8.1%} {r.token_hit_rate:>8.1%} {r.prompt_tokens:>13,} "
            f"{r.reused_tokens:>13,} {format_bytes(r.peak_bytes):>10} {r.evictions:>10,} {_seconds(r.prefill_s_saved):>14}"
            + ("  <- knee" if r.knee else "")
        )
    lines.append("")
    lines += [knee_sentence(rows, policy) for policy in dict.fromkeys(r.policy for r in rows)]
    return "\n".join(line for line in lines if line is not None)


def knee_sentence(rows: Sequence[ReplayRow], policy: str) -> str:
    knee = next((r for r in rows if r.policy == policy and r.knee), None)
    if knee is None:
        return f"{policy}: no budget saves within {KNEE_TOLERANCE:.0%} of an unbounded cache"
    return f"{policy}: knee at {knee.budget} (the smallest budget within {KNEE_TOLERANCE:.0%} of an unbounded cache's savings: {knee.token_hit_rate:.1%} of prompt tokens reused)"


def rows_csv(rows: Sequence[ReplayRow]) -> str:
    """The rows as CSV, the columns of :data:`ROW_FIELDS`."""
    import csv
    import io

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=ROW_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(r.to_dict() for r in rows)
    return out.getvalue()


def hit_rate_figure(rows: Sequence[ReplayRow], title: str = "Prefix-cache token hit rate vs memory budget"):
    """A plotly figure: token hit rate vs budget (log axis), one line per policy, unbounded as a dashed line."""
    import plotly.graph_objects as go  # only for a chart: the replay itself needs no plotly

    fig = go.Figure()
    for policy in dict.fromkeys(r.policy for r in rows):
        mine = [r for r in rows if r.policy == policy and r.budget_bytes is not None]
        fig.add_trace(
            go.Scatter(
                x=[r.budget_bytes / (1 << 30) for r in mine],
                y=[100 * r.token_hit_rate for r in mine],
                mode="lines+markers",
                name=policy,
                customdata=[[r.budget, 100 * r.request_hit_rate, r.evictions] for r in mine],
                hovertemplate="%{customdata[0]}: %{y:.1f}% of prompt tokens reused, %{customdata[1]:.1f}% of requests hit, %{customdata[2]:,} evictions<extra>" + policy + "</extra>",
            )
        )
    unbounded = next((r for r in rows if r.budget_bytes is None), None)
    if unbounded is not None:
        fig.add_hline(y=100 * unbounded.token_hit_rate, line_dash="dash", annotation_text=f"unbounded (peak {format_bytes(unbounded.peak_bytes)})")
    fig.update_layout(title=title, xaxis_title="memory budget (GiB, log scale)", yaxis_title="prompt tokens reused (%)", xaxis_type="log", yaxis_range=[0, 100], template="plotly_white", legend_title="policy")
    return fig


# ---------------------------------------------------------------------- the command line


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cache.replay``: 0 on success, 2 (with a message on stderr) for bad input; writes nothing partial."""
    args = _parser().parse_args(argv)
    try:
        model = load_model_size(args.model_config)
        settings = ReplaySettings.for_model(model, args.kv_dtype, min_tokens=args.min_tokens, prefill_tokens_per_s=args.prefill_tokens_per_s)
        budgets, policies = parse_budgets(args.budgets), parse_policies(args.policies)
        with open(args.trace, encoding="utf-8", errors="strict") as lines:
            trace = load_trace(lines, lambda: _load_tokenizer(args.tokenizer), args.block_size)
        rows = plan(trace, budgets, policies, settings)
    except (ValueError, OSError) as exc:  # TraceError, UnicodeDecodeError and a missing file among them
        print(f"error: {exc}", file=sys.stderr)
        return 2
    note = f" · {settings.kv_bytes_per_token:,} B of KV per token ({args.kv_dtype})" + (f" · blocks of {trace.unit_tokens} tokens" if trace.kind == "blocks" else "")
    if args.html:
        _write_atomically(args.html, hit_rate_figure(rows, f"{model.name}: prefix-cache token hit rate vs budget").to_html(include_plotlyjs=True, full_html=True))
    if args.format == "json":
        print(json.dumps([r.to_dict() for r in rows], indent=2))
    else:
        print(table(rows, model.name, note))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cache.replay", description=__doc__.splitlines()[0])
    parser.add_argument("trace", help="a JSONL trace: chat requests, prompts, token ids, or Mooncake blocks")
    parser.add_argument("--model-config", default=DEFAULT_MODEL_CONFIG, help=f"a shipped config ({', '.join(model_config_names())}), a JSON file or a folder with config.json")
    parser.add_argument("--kv-dtype", default="bf16", choices=list(KV_DTYPE_BYTES), help="the dtype KV is stored in (default bf16)")
    parser.add_argument("--budgets", default="auto", help="comma-separated sizes (512MiB,4GiB,inf); 'auto' sweeps from the unbounded peak down (default)")
    parser.add_argument("--policies", default="lru", help=f"comma-separated eviction policies: {', '.join(POLICIES)} (default lru)")
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="tokens per hash id in a block trace (default 512, Mooncake's)")
    parser.add_argument("--min-tokens", type=int, default=DEFAULT_MIN_TOKENS, help="the engine's min_cached_tokens (default 20)")
    parser.add_argument("--tokenizer", default="bundled", help="for text traces: 'bundled' (SmolLM2's) or a local tokenizer folder")
    parser.add_argument("--prefill-tokens-per-s", type=float, default=DEFAULT_PREFILL_TOKENS_PER_S, help=f"to turn reused tokens into time (default {DEFAULT_PREFILL_TOKENS_PER_S:g}: the bundled model on a 2-core CPU, measured)")
    parser.add_argument("--format", choices=["table", "json"], default="table", help="stdout: a table (default) or a JSON list of rows")
    parser.add_argument("--html", metavar="FILE", help="also write a plotly chart of hit rate vs budget, one line per policy")
    return parser


def _load_tokenizer(spec: str) -> TextTokenizer:
    from engine.chat_tokens import ChatTokenizer  # lazily: only text traces need a tokenizer (and torch)

    return ChatTokenizer.load(spec)


def _write_atomically(path: str, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (a temporary file in the same folder, renamed)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".replay-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# ---------------------------------------------------------------------- helpers


def _seconds(s: float) -> str:
    return f"{s:,.1f} s" if s < 3600 else f"{s / 3600:,.1f} h"


if __name__ == "__main__":
    sys.exit(main())
