"""The "Scenarios" tab: one click runs a bundled scenario with the prefix cache off, then on, and charts both.

Builds its components and wires its own events; the runs are ``ui/scenarios.py``'s. A scenario's
requests stay out of the playground's charts (32 bars there would bury the visitor's own), and one
warm-up request runs first and is not charted, so the first phase does not pay for a cold start.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from ui import charts
from ui.page_context import PRIVATE, QUICK, PageContext, ui_errors
from ui.scenarios import Scenario, load_scenarios, run_scenario
from ui.schemas import parse_body

INTRO = (
    "One click runs a scenario twice, with the prefix cache **off** and then **on** (KV cache on in both), "
    "and charts the difference. Each run starts from a cold cache of its own, dropped afterwards; one "
    "warm-up request runs first and is not charted, so the \"off\" phase does not pay for a cold start."
)


def build_scenarios_tab(ctx: PageContext) -> gr.Button:
    """The tab; call inside ``gr.Tabs()``. Returns its run button, which the page enables only when requests can run."""
    scenarios = load_scenarios()
    first = next(iter(scenarios.values()))
    with gr.Tab("Scenarios", elem_id="kv-scenarios-tab"):
        gr.Markdown(INTRO)
        with gr.Row():
            name = gr.Dropdown(list(scenarios), value=first.name, label="Scenario", scale=3, elem_id="kv-scenario")
            run_button = gr.Button("Run off vs on", variant="primary", scale=1, elem_id="kv-scenario-run", interactive=False)
            verify = gr.Checkbox(False, label="Verify every request", info="each also runs reusing nothing and is compared bit for bit", scale=1)
        about = gr.Markdown(first.description)
        progress = gr.Markdown(elem_id="kv-scenario-progress")
        plot = gr.Plot(charts.scenario_figure([], [], "Prefix cache off vs on"), show_label=False, elem_id="kv-scenario-plot")
    name.change(lambda chosen: scenarios[chosen].description if chosen in scenarios else "", inputs=name, outputs=about, **QUICK)
    run_button.click(_runner(ctx, scenarios), inputs=[name, verify], outputs=[progress, plot], show_progress_on=progress, trigger_mode="once", **PRIVATE)
    return run_button


def _runner(ctx: PageContext, scenarios: dict[str, Scenario]):
    service = ctx.service

    async def on_run(name: Any, verify: Any, request: gr.Request):
        session = ctx.session_of(request)
        if not isinstance(name, str) or name not in scenarios:
            raise gr.Error(f"unknown scenario; pick one of: {', '.join(scenarios)}")
        scenario = scenarios[name]
        off: list[charts.RequestRecord] = []
        on: list[charts.RequestRecord] = []
        total, checks = 2 * len(scenario.prompts), []
        with ui_errors():
            verify = parse_body({"prompt": name, "verify": verify}).verify  # the one validation: a real bool
            yield "Warming up (one request, not charted)…", gr.skip()
            await service.stream(session, prompt=scenario.message(scenario.prompts[0]), system_prompt=scenario.system_prompt, max_new_tokens=2, use_cache=True, use_prefix_cache=False).aresult()
            async for step in run_scenario(service, scenario, session, verify=verify):
                phase = off if step.phase == "off" else on
                phase.append(charts.RequestRecord.of(step.result, index=len(off) + len(on) + 1, label=f"{name}, prefix cache {step.phase}"))
                checks += [step.result.verification["identical"]] if step.result.verification else []
                done = len(off) + len(on)
                head = f"Ran {done} of {total} requests." if done == total else f"Running: {done} of {total} requests done (prefix cache {step.phase}, question {step.index + 1})…"
                verified = f"\n\nVerified against a run reusing nothing: **{sum(checks)} of {len(checks)} identical**." if checks else ""
                yield f"{head}\n\n{charts.scenario_summary(off, on)}{verified}", charts.scenario_figure(off, on, f"{name}: TTFT, prefix cache off vs on")

    return on_run
