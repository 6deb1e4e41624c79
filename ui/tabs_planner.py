"""The "Planner" tab: replay a workload trace (a bundled sample or an upload) across budgets and eviction policies.

Builds its components and wires its own event; the plan itself is ``ui/planner.py``'s (one
validation, one bounded runner, fair turns) and the figures are ``ui/charts.py``'s. A sample is
picked by name from ``assets/traces/`` (a Space visitor has no copy of them); no path the client
names is ever opened, and an upload arrives as bytes.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from cache.budget_plan import DEFAULT_MODEL_CONFIG, KV_DTYPE_BYTES, model_config_names
from cache.replay import rows_csv
from cache.traces import DEFAULT_BLOCK_SIZE
from ui import charts
from ui.limits import PLAN_MAX_REQUESTS, PLAN_MAX_TRACE_BYTES, PLAN_TIME_LIMIT_S
from ui.page_context import PageContext
from ui.planner import TABLE_COLUMNS, PlanResult, gradio_call

TRACES = Path(__file__).resolve().parent.parent / "assets" / "traces"
UPLOAD = "my upload"  # the dropdown's choice for the file in the upload box
INTRO = (
    "Should prefix caching be on, and how much memory should it get? Pick a sample workload or upload your own as JSON Lines "
    "(OpenAI chat requests `{\"messages\": [...], \"output\": \"...\"}`, prompts `{\"prompt\": \"...\"}`, "
    "token ids, or a [Mooncake](https://github.com/kvcache-ai/Mooncake) block trace) and replay it through "
    "the prefix cache for the model you serve, at each budget and eviction policy. "
    f"Limits: {PLAN_MAX_TRACE_BYTES // (1024 * 1024)} MiB, {PLAN_MAX_REQUESTS:,} requests, {PLAN_TIME_LIMIT_S:g} s."
)


def sample_traces() -> dict[str, Path]:
    """The bundled traces by name: the only files the tab ever reads."""
    return {path.stem.replace("_", " "): path for path in sorted(TRACES.glob("*.jsonl"))}


def build_plan_tab(ctx: PageContext) -> None:
    """The tab; call inside ``gr.Tabs()``. Its event is private: scripts use ``/plan``."""
    samples = sample_traces()
    with gr.Tab("Planner", elem_id="kv-plan-tab"):
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=2, min_width=260):
                source = gr.Dropdown([*samples, UPLOAD], value=next(iter(samples), UPLOAD), label="Workload", info="a bundled sample, or your upload below", elem_id="kv-plan-source")
                # An upload button, not gr.File: gr.File's progress bar polls /gradio_api/upload_progress, which the guard refuses
                trace_button = gr.UploadButton("Upload a trace (.jsonl)", file_types=[".jsonl", ".json", ".txt"], type="binary", size="sm", elem_id="kv-plan-trace")
                uploaded = gr.Markdown("No upload yet.", elem_id="kv-plan-uploaded")
                trace_bytes = gr.State(None)  # the upload, at most PLAN_MAX_TRACE_BYTES (the guard caps the body)
            with gr.Column(scale=3, min_width=260):
                with gr.Row():
                    model = gr.Dropdown(model_config_names(), value=DEFAULT_MODEL_CONFIG, label="Model config")
                    kv_dtype = gr.Dropdown(list(KV_DTYPE_BYTES), value="bf16", label="KV dtype")
                    block_size = gr.Number(DEFAULT_BLOCK_SIZE, precision=0, label="Block size (block traces)")
                with gr.Row():
                    budgets = gr.Textbox("auto", label="Budgets", info="e.g. 256MiB,1GiB,4GiB,inf, or auto")
                    policies = gr.CheckboxGroup(["lru", "lfu", "fifo", "mru"], value=["lru", "lfu"], label="Eviction policies")
                run_button = gr.Button("Replay", variant="primary", elem_id="kv-plan-run")
        summary = gr.Markdown(elem_id="kv-plan-summary")
        chart = gr.Plot(charts.plan_figure([], ""), show_label=False, elem_id="kv-plan-chart")
        table = gr.DataFrame(headers=TABLE_COLUMNS, interactive=False, label="One row per policy × budget", elem_id="kv-plan-table")
        with gr.Row():
            csv_file = gr.File(label="Download CSV", interactive=False, elem_id="kv-plan-csv")
            json_file = gr.File(label="Download JSON", interactive=False, elem_id="kv-plan-json")
    trace_button.upload(_on_upload, inputs=trace_button, outputs=[trace_bytes, uploaded, source], api_visibility="private", queue=False)  # an upload is what the visitor means to replay
    outputs = [summary, chart, table, csv_file, json_file]
    run_button.click(
        _on_plan(ctx, samples, len(outputs)), inputs=[source, trace_bytes, model, kv_dtype, budgets, policies, block_size], outputs=outputs,
        api_visibility="private", concurrency_limit=1, trigger_mode="once",
    )


def _on_upload(data: Any) -> tuple[Any, str, str]:
    """Keep the uploaded bytes for Replay (too large a file is refused here, with its size) and say what arrived."""
    if not isinstance(data, bytes):
        return None, "No upload yet.", gr.skip()
    if len(data) > PLAN_MAX_TRACE_BYTES:
        raise gr.Error(f"the trace is {len(data):,} bytes, more than the {PLAN_MAX_TRACE_BYTES // 1024:,} KiB allowed; send a shorter one")
    lines = data.count(b"\n") + (not data.endswith(b"\n"))
    return data, f"Uploaded: {len(data) / 1024:,.1f} KiB, {lines:,} lines. Press Replay.", UPLOAD


def _on_plan(ctx: PageContext, samples: dict[str, Path], n_outputs: int) -> Callable:
    files = Path(tempfile.mkdtemp(prefix="kvci-plans-"))  # this page's CSV and JSON, the newest plan's only
    atexit.register(shutil.rmtree, files, ignore_errors=True)  # a clean exit (SIGTERM, Ctrl-C) leaves no folder behind

    def on_plan(chosen: Any, data: Any, model_name: Any, dtype: Any, budget_text: Any, picked: Any, block: Any, request: gr.Request, progress=gr.Progress()):
        trace = samples[chosen].read_bytes() if chosen in samples else data
        if chosen == UPLOAD and not isinstance(data, bytes):
            gr.Warning("Upload a JSONL trace first, or pick a sample workload.")  # a hint, not an error on every panel
            return (gr.skip(),) * n_outputs

        def fields() -> dict:
            if not isinstance(trace, bytes):
                raise ValueError("pick a sample workload or upload a JSONL trace")
            policies = ",".join(picked) if isinstance(picked, list) and all(isinstance(c, str) for c in picked) else picked
            block_size = int(block) if isinstance(block, float) and block.is_integer() else block  # the page's number box
            # UnicodeDecodeError is a ValueError: a trace that is not UTF-8 text is refused with the reason
            return dict(trace=trace.decode("utf-8"), model=model_name, kv_dtype=dtype, budgets=budget_text, policies=policies, block_size=block_size)

        progress(0, desc="reading the trace")
        result = gradio_call(ctx.planner, fields, ctx.issuer.request_address(request), lambda done, total: progress(done / total, desc=f"replay {done} of {total}"))
        return (*_shown(result), *_written(result, files))

    return on_plan


def _shown(result: PlanResult) -> tuple[str, Any, list]:
    return result.summary(), charts.plan_figure(result.rows, f"{result.model.name}: prompt tokens reused vs budget"), charts.plan_table(result.rows)


def _written(result: PlanResult, files: Path) -> tuple[str, str]:
    """The plan's CSV and JSON, in a fresh folder; the last plan's go (Gradio copied them to its cache as that event ended)."""
    for earlier in files.iterdir():
        shutil.rmtree(earlier, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(dir=files))
    (folder / "plan.csv").write_text(rows_csv(result.rows))
    (folder / "plan.json").write_text(json.dumps(result.to_dict(), indent=2))
    return str(folder / "plan.csv"), str(folder / "plan.json")
