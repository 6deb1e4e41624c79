"""What every panel and tab of the page shares: the context it is built with, and how errors reach the visitor.

No components here; ``ui/page.py`` composes the panels, each in its own module.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import gradio as gr

from ui.planner import Planner
from ui.security import UploadBudget
from ui.service import Busy, EngineService, NotReady
from ui.sessions import Session, SessionIssuer

PRIVATE = dict(api_visibility="private")
QUICK = dict(api_visibility="private", queue=False)  # no model work: never waits behind a generation


@dataclass(frozen=True)
class PageContext:
    """What every panel needs: the served engine, where sessions come from, the planner and uploads."""

    service: EngineService
    issuer: SessionIssuer
    planner: Planner
    uploads: UploadBudget

    def session_of(self, request: gr.Request | None) -> Session:
        """The caller's session from its headers and cookies (never from Gradio's session_hash)."""
        with ui_errors():
            return self.issuer.resolve_request(request)


@contextmanager
def ui_errors() -> Iterator[None]:
    """Turn the caller's bad input (and a busy or loading server) into a gr.Error with the message."""
    try:
        yield
    except (ValueError, NotReady, Busy) as exc:
        raise gr.Error(str(exc)) from None
