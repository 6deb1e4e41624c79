"""The playground panel: a prompt, Generate and Verify, the output, its figures, and the session's charts.

Builds its components and wires its own events; the work is the service's (``ui/service.py``) and
the figures are ``ui/charts.py``'s. Laid out in two rows so that a phone, where every row becomes
one column, shows the Output right under Generate: [prompt, buttons | output, figures], then
[settings, examples | token highlights, explanation], then the charts (the latest request's batch
sizes under the decode panel) and the verdict line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from backends import BackendInfo
from engine import GenerationResult
from engine.sampling import NO_REPEAT_NGRAM_MAX, REPETITION_PENALTY_MAX, REPETITION_PENALTY_MIN
from ui import charts
from ui.components import RawSlider, RawTextbox
from ui.limits import MAX_NEW_TOKENS, PAGE_MAX_NEW_TOKENS, PAGE_NO_REPEAT_NGRAM_SIZE, PAGE_REPETITION_PENALTY, SESSION_STATE_TTL_S
from ui.page_context import PRIVATE, QUICK, PageContext, ui_errors
from ui.scenarios import load_examples
from ui.schemas import parse_body

PREFIX_INFO = "reuse KV across requests"
PREFIX_NEEDS_KV = "off: with no KV cache there is nothing to reuse"


@dataclass
class Playground:
    """The handles other panels need: the session's history, what gates the run buttons, and the events after which the cache changed."""

    history: gr.State
    system_prompt: gr.Textbox
    pin_button: gr.Button  # pins the system prompt; the inspector wires it, as its answer is the inspector's
    unpin_button: gr.Button
    run_buttons: list[gr.Button]  # enabled only while requests can run (ui/page.py)
    run_reason: gr.Markdown  # why they are not, beside them
    toggles: list[gr.Checkbox]  # KV cache, prefix cache
    timing_note: gr.Markdown
    cache_changed: list[Any]  # events (Generate, Verify) after which the inspector refreshes


@dataclass
class _Inputs:
    system_prompt: gr.Textbox
    prompt: gr.Textbox
    use_cache: gr.Checkbox
    use_prefix_cache: gr.Checkbox
    sliders: list[gr.Slider]  # max new tokens, temperature, repetition penalty, no-repeat n-gram size


def build_playground(ctx: PageContext) -> Playground:
    """The panel; call inside ``gr.Blocks``."""
    history = gr.State(charts.SessionHistory(), time_to_live=SESSION_STATE_TTL_S)  # keyed by a client-sent hash: handlers bind it to the server's session
    with gr.Row(equal_height=False, elem_id="kv-main"):
        with gr.Column(scale=5, min_width=300):
            system_prompt = RawTextbox(label="System prompt", lines=3, placeholder="Optional. A long one shared by several requests is what the prefix cache saves.", elem_id="kv-system")
            prompt = RawTextbox(label="Prompt", lines=2, placeholder="Ask something…", elem_id="kv-prompt")
            with gr.Row():
                generate_button = gr.Button("Generate", variant="primary", elem_id="kv-generate", interactive=False)
                verify_button = gr.Button("Verify: rerun reusing nothing and compare bit for bit", elem_id="kv-verify", interactive=False)
            run_reason = gr.Markdown("⏳ Loading the model: Generate turns on when it is ready.", elem_id="kv-run-reason")
        with gr.Column(scale=4, min_width=300):
            output = gr.Textbox(label="Output", lines=5, interactive=False, elem_id="kv-output")
            figures = gr.HTML(charts.empty_figures_html(), elem_id="kv-figures")
    with gr.Row(equal_height=False, elem_id="kv-details"):
        with gr.Column(scale=5, min_width=300):
            inputs = _settings(system_prompt, prompt)
            with gr.Row():
                pin_button = gr.Button("Pin this system prompt", size="sm", elem_id="kv-pin", interactive=False)
                unpin_button = gr.Button("Unpin", size="sm", variant="secondary", elem_id="kv-unpin", interactive=False)
            gr.Examples(load_examples(), inputs=[system_prompt, prompt], label="Examples")
        with gr.Column(scale=4, min_width=300):
            tokens = gr.HighlightedText(label="Prompt tokens: cached (green) vs computed (orange)", color_map=charts.TOKEN_COLORS, show_legend=True, combine_adjacent=False, elem_id="kv-tokens")
            explanation = gr.HTML("", elem_id="kv-explanation")
    timing_note = gr.Markdown(elem_id="kv-timing-note")
    with gr.Row(equal_height=True, elem_id="kv-charts"):
        with gr.Column(min_width=300, elem_id="kv-decode-charts"):  # the batch sizes sit under the decode panel, on a phone too
            latency_plot = gr.Plot(charts.latency_figure([]), show_label=False, elem_id="kv-latency-plot")
            batch_plot = gr.Plot(charts.batch_figure([]), show_label=False, visible=False, elem_id="kv-batch-plot")
        hits_plot = gr.Plot(charts.hit_history_figure([]), show_label=False, elem_id="kv-hits-plot", min_width=300)
    verdict = gr.HTML("", elem_id="kv-verdict")
    reset_button = gr.Button("Reset chart history", size="sm", variant="secondary", elem_id="kv-reset")

    results = [output, figures, tokens, explanation, latency_plot, hits_plot, batch_plot, verdict, history]
    events = _wire_runs(ctx, inputs, history, generate_button, verify_button, results)
    reset_button.click(_reset_charts(ctx), inputs=history, outputs=[latency_plot, hits_plot, batch_plot, figures, tokens, explanation, verdict, history], **QUICK)
    inputs.use_cache.change(lambda kv: prefix_update(ctx.service.backend_info(), kv), inputs=inputs.use_cache, outputs=inputs.use_prefix_cache, **QUICK)
    return Playground(history, system_prompt, pin_button, unpin_button, [generate_button, verify_button, pin_button, unpin_button], run_reason, [inputs.use_cache, inputs.use_prefix_cache], timing_note, events)


def prefix_update(info: BackendInfo, use_cache: Any) -> Any:
    """The prefix checkbox after the KV checkbox changed: off and locked without a KV cache, back on with it.

    Turning the KV cache back on turns the prefix cache back on: a box left silently unticked made
    every later request miss.
    """
    reason = info.reason_unavailable("prefix_cache_off")
    if reason:
        return gr.Checkbox(value=True, interactive=False, info=reason)
    if use_cache is True:
        return gr.Checkbox(value=True, interactive=True, info=PREFIX_INFO)
    return gr.Checkbox(value=False, interactive=False, info=PREFIX_NEEDS_KV)


# ---------------------------------------------------------------------- helpers


def _settings(system_prompt: gr.Textbox, prompt: gr.Textbox) -> _Inputs:
    with gr.Row():
        use_cache = gr.Checkbox(value=True, label="KV cache", info="reuse keys/values while decoding", elem_id="kv-use-cache")
        use_prefix_cache = gr.Checkbox(value=True, label="Prefix cache", info=PREFIX_INFO, elem_id="kv-use-prefix")
    with gr.Row():
        max_new_tokens = RawSlider(1, MAX_NEW_TOKENS, value=PAGE_MAX_NEW_TOKENS, step=1, label="Max new tokens", elem_id="kv-max-new-tokens")
        temperature = RawSlider(0.0, 2.0, value=0.0, step=0.05, label="Temperature", info="0 is greedy")
    with gr.Row():  # repetition control: the page's default is measured by benchmark/repetition_bench.py
        repetition_penalty = RawSlider(
            REPETITION_PENALTY_MIN, REPETITION_PENALTY_MAX, value=PAGE_REPETITION_PENALTY, step=0.05, label="Repetition penalty",
            info="1 is off; above 1 discounts tokens the reply already used", elem_id="kv-repetition-penalty",
        )
        no_repeat_ngram_size = RawSlider(
            0, NO_REPEAT_NGRAM_MAX, value=PAGE_NO_REPEAT_NGRAM_SIZE, step=1, label="No repeat n-gram size",
            info="0 is off; n: never the same n tokens twice", elem_id="kv-no-repeat-ngram",
        )
    return _Inputs(system_prompt, prompt, use_cache, use_prefix_cache, [max_new_tokens, temperature, repetition_penalty, no_repeat_ngram_size])


def _wire_runs(ctx: PageContext, inputs: _Inputs, history: gr.State, generate_button: gr.Button, verify_button: gr.Button, results: list) -> list:
    """Generate and Verify: stream the text, then draw the request's figures and the session's charts."""
    service = ctx.service
    hidden_note = (
        "(not shown: it came from another session, such as another tab or an API call)" if service.settings.is_local
        else "(not shown: the shared cache holds other visitors' prompts)"
    )

    def run(verify: bool):
        async def on_generate(system: Any, text: Any, kv: Any, prefix: Any, max_tokens: Any, temp: Any, penalty: Any, ngram: Any, state: charts.SessionHistory, request: gr.Request):
            session = ctx.session_of(request)
            state = state.owned_by(session.key)
            with ui_errors():
                body = parse_body({**_page_fields(text, system, max_tokens, kv, prefix, temp, penalty, ngram), "verify": verify})
                job = service.stream(session, **body.engine_kwargs())
            produced, result = "", None
            with ui_errors():
                async for item in job.aiter():  # a page that goes away closes this: the job stops
                    if isinstance(item, GenerationResult):
                        result = item
                    else:
                        produced += item
                        yield produced, *[gr.skip()] * (len(results) - 1)
            state.add(result)  # the one history object of this page: concurrent events add to it in place
            yield (
                result.text, charts.figures_html(result), charts.token_highlights(result, service.backend.decode),
                charts.explanation_html(result, hidden_note), *_charts(state), charts.verdict_html(state.records), state,
            )

        on_generate.__name__ = "on_verify" if verify else "on_generate"  # the event's name in the page's config
        return on_generate

    run_inputs = [inputs.system_prompt, inputs.prompt, inputs.use_cache, inputs.use_prefix_cache, *inputs.sliders, history]
    return [
        button.click(run(verify), inputs=run_inputs, outputs=results, show_progress_on=results[0], trigger_mode="once", **PRIVATE)
        for button, verify in ((generate_button, False), (verify_button, True))
    ]


def _reset_charts(ctx: PageContext):
    def on_reset(state: charts.SessionHistory, request: gr.Request) -> tuple:
        state = state.owned_by(ctx.session_of(request).key)
        state.reset_charts()
        return *_charts(state), charts.empty_figures_html(), None, "", "", state

    return on_reset


def _charts(state: charts.SessionHistory) -> tuple[Any, Any, Any]:
    """The session's charts; the batch sizes only after a request with decode steps (never after a remote's: it has none)."""
    records = state.records
    return charts.latency_figure(records), charts.hit_history_figure(records), gr.Plot(charts.batch_figure(records), visible=charts.has_batches(records))


def _page_fields(prompt: Any, system_prompt: Any, max_new_tokens: Any, use_cache: Any, use_prefix_cache: Any, temperature: Any, repetition_penalty: Any, no_repeat_ngram_size: Any) -> dict:
    """A page event's inputs as a request body for ``parse_body``: values as sent, but for the page's own forms.

    The page sends None for a cleared box and may send a whole slider value as a float (48.0); both
    are mapped, nothing else is: a list, a number or NUL as the prompt, or "false" as a flag, fail.
    """
    return dict(
        prompt="" if prompt is None else prompt,
        system_prompt=None if system_prompt in (None, "") else system_prompt,
        max_new_tokens=_slider_int(max_new_tokens),
        use_cache=use_cache,
        use_prefix_cache=use_prefix_cache,
        temperature=temperature,
        repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=_slider_int(no_repeat_ngram_size),
    )


def _slider_int(value: Any) -> Any:
    """A whole slider value sent as a float (48.0) as the int it is; anything else as sent, for the validation to judge."""
    return int(value) if isinstance(value, float) and value.is_integer() else value
