"""Page inputs that hand the handler exactly what the client sent, so ``ui.schemas.parse_body`` checks it.

Gradio's Textbox turns any payload into text (``str([1, 2])``) and its Slider rounds and compares
before the handler runs; a hostile caller of a page event (private events stay callable over HTTP
by fn_index) could then pass a list as a prompt. These templates render as the stock components
(``is_template``) but leave the value alone: the one validation path sees the real type.
"""

from __future__ import annotations

from typing import Any

import gradio as gr


class RawTextbox(gr.Textbox):
    """A Textbox whose handler receives the payload as sent (None, str, or whatever a script sent)."""

    is_template = True

    def preprocess(self, payload: Any) -> Any:
        return payload


class RawSlider(gr.Slider):
    """A Slider whose handler receives the payload as sent; bounds are checked by the validation."""

    is_template = True

    def preprocess(self, payload: Any) -> Any:
        return payload
