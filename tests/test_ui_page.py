"""ui/page.py and ui/playground.py without a browser: when the run buttons are gated and why, and the KV/prefix toggles."""

from __future__ import annotations

import pytest

from backends import BackendInfo, Capability
from ui import page, playground

READY = {"ready": True, "error": None, "decode": {"state": "compiled"}}


@pytest.mark.parametrize(
    "status, reason",
    [
        (READY, ""),
        ({"ready": True, "error": None, "decode": None}, ""),  # a remote backend: no decode step of ours
        ({"ready": True, "error": None, "decode": {"state": "eager"}}, ""),  # a failed compile: requests run eagerly
        ({"ready": False, "error": None}, "Loading the model: Generate turns on when it is ready."),
        ({"ready": False, "error": "no model found"}, "The model could not be loaded, so nothing can run: no model found"),
        ({"ready": True, "error": None, "decode": {"state": "compiling", "elapsed_s": 20.0, "expected_s": 62.0}},
         "Compiling the decode step: ~42 s left; requests wait for it so every answer is computed by one step."),
        ({"ready": True, "error": None, "decode": {"state": "compiling", "elapsed_s": 80.0, "expected_s": 62.0}},
         "Compiling the decode step: ~1 s left; requests wait for it so every answer is computed by one step."),
        ({"ready": True, "error": None, "decode": {"state": "compiling"}},  # an engine without the estimate yet
         "Compiling the decode step: about a minute; requests wait for it so every answer is computed by one step."),
    ],
    ids=["ready", "remote", "eager", "loading", "failed", "compiling", "overdue", "no estimate"],
)
def test_run_blocker_names_why_requests_cannot_run(status, reason):
    """The run buttons are disabled exactly while there is a reason, and the page shows it."""
    assert page.run_blocker(status) == reason


def test_prefix_toggle_follows_the_kv_toggle_both_ways():
    """KV off: prefix unticked and locked with the reason; KV on again: prefix ticked again (it was left unticked, so nothing hit)."""
    local = BackendInfo(kind="local", model="tiny")
    off = playground.prefix_update(local, False)
    assert off.value is False and off.interactive is False and off.info == playground.PREFIX_NEEDS_KV
    on = playground.prefix_update(local, True)
    assert on.value is True and on.interactive is True
    remote = BackendInfo(kind="vllm", model="m", capabilities={"prefix_cache_off": Capability(False, "vLLM cannot turn it off per request")})
    assert playground.prefix_update(remote, False).info == "vLLM cannot turn it off per request"


def test_a_scenario_run_ends_without_an_ellipsis_and_leaves_the_playground_charts_alone(tiny_engine):
    """The Scenarios tab's run: a warm-up first (not charted), every request off then on, a last line "Ran N of N requests."
    with no trailing "…", and no record added to the playground's history (32 bars buried the visitor's own)."""
    import asyncio

    from ui import tabs_scenarios
    from ui.page_context import PageContext
    from ui.planner import Planner
    from ui.scenarios import load_scenarios
    from ui.security import UploadBudget
    from ui.service import EngineService
    from ui.sessions import SessionIssuer
    from ui.settings import AppSettings

    service = EngineService(AppSettings(), loader=lambda *args, **kwargs: tiny_engine)
    service.start_loading()
    assert service.wait_ready(timeout=30)
    ctx = PageContext(service, SessionIssuer(secure_cookie=False), Planner(lambda: service.engine.chat), UploadBudget(2**20, 60))
    scenarios = load_scenarios()
    name = next(iter(scenarios))
    run = tabs_scenarios._runner(ctx, scenarios)

    async def collect():
        return [step async for step in run(name, False, None)]

    steps = asyncio.run(collect())
    total = 2 * len(scenarios[name].prompts)
    assert steps[0][0].startswith("Warming up") and len(steps) == 1 + total
    assert all("…" in text for text, _ in steps[1:-1])
    assert steps[-1][0].startswith(f"Ran {total} of {total} requests.\n\n") and "…" not in steps[-1][0].split("\n")[0]
    figure = steps[-1][1]
    assert [len(trace.y) for trace in figure.data] == [total // 2, total // 2]
