"""What the page says about the backend it measures: which one, what it can and cannot report.

Markdown only, from ``backends.BackendInfo`` and the service's stats; no HTTP and no engine here.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from backends import BackendInfo

_NAMES = {"vllm": "vLLM", "sglang": "SGLang", "llama-server": "llama.cpp llama-server", "kvci": "kv-cache-inference (this project's /v1)", "openai": "an OpenAI-compatible server"}


def backend_markdown(info: BackendInfo) -> str:
    """One paragraph: the remote's URL, model and kind, and each thing it cannot do, with the reason."""
    if info.kind == "local":
        return ""
    missing = [f"{name.replace('_', ' ')}: {c.note}" for name, c in info.capabilities.items() if not c.available]
    lines = [
        f"**Measuring a remote server:** {_NAMES.get(info.kind, info.kind)} at `{info.url}`, model `{info.model}`. "
        "Times are measured **client-side** by this app from the stream (network included); cached tokens are what the server reports."
    ]
    if missing:
        lines.append("Not available here: " + "; ".join(missing) + ".")
    return "\n\n".join(lines)


def timing_note(info: BackendInfo) -> str:
    """The line above the charts."""
    if info.timings == "client":
        return f"Times in these charts were measured client-side (this app's clock around the {_NAMES.get(info.kind, info.kind)} stream): TTFT includes the network and the server's queue."
    return ""


def remote_stats_markdown(stats: dict[str, Any]) -> str:
    """Cache stats of a remote: this app's counts of what the server reported, and the server's own figures."""
    line = (
        f"hits **{stats['hits']}**, partial **{stats['partial_hits']}**, misses **{stats['misses']}** "
        f"(hit rate {100 * stats['hit_rate']:.0f}%) · {stats['tokens_saved']:,} tokens saved · source: {stats['source']}"
    )
    if stats.get("unreported"):
        line += f" · {stats['unreported']} answers said nothing about cached tokens"
    server = stats.get("server")
    if server:
        figures = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in server.items() if k != "source" and v is not None)
        line += f"\n\nServer-wide ({server['source']}): {figures}"
    return line + "\n\nThe server's cache entries are not visible from here."


def toggle_updates(info: BackendInfo) -> tuple[Any, Any]:
    """The KV cache and prefix cache checkboxes for the page's status poll: disabled, with the reason, where the
    backend cannot turn them off; otherwise left as the visitor set them (the poll runs while they may be clicking)."""
    updates = []
    for name in ("kv_cache_off", "prefix_cache_off"):
        reason = info.reason_unavailable(name)
        updates.append(gr.Checkbox(value=True, interactive=False, info=reason) if reason else gr.skip())
    return tuple(updates)
