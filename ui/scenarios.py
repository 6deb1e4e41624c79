"""Scenarios from ``assets/scenarios.json``: a few related requests, run with the prefix cache off, then on.

Each run uses a cold namespace of its own (under the session's), dropped at the end, so the "on"
phase starts from an empty cache and runs are comparable. The KV cache is on in both phases: the
comparison isolates what cross-request prefix caching adds. A run closed while a request still runs
drops the namespace at once and again when that request has ended, so nothing the request stores
late brings the namespace back.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import anyio

from engine import GenerationResult
from ui.service import EngineService, Job
from ui.sessions import Session

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SCENARIOS_PATH = ASSETS / "scenarios.json"
EXAMPLES_PATH = ASSETS / "examples.json"
LATE_DROP_WAIT_S = 600.0  # how long a closed run waits for its cancelled request to end before it stops waiting


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    system_prompt: str | None
    prompt_prefix: str  # the shared start of every user message (a document, a common instruction)
    prompts: tuple[str, ...]
    conversation: bool  # True: each prompt is the next turn, with the earlier turns as history
    max_new_tokens: int

    def message(self, prompt: str) -> str:
        return f"{self.prompt_prefix}{prompt}"


@dataclass(frozen=True)
class ScenarioStep:
    phase: str  # "off" or "on"
    index: int  # which of the scenario's prompts
    result: GenerationResult


def load_scenarios(path: Path = SCENARIOS_PATH) -> dict[str, Scenario]:
    """Scenarios by name, in file order."""
    data = json.loads(path.read_text(encoding="utf-8"))
    scenarios = {}
    for item in data["scenarios"]:
        scenario = Scenario(
            name=item["name"],
            description=item["description"],
            system_prompt=item.get("system_prompt"),
            prompt_prefix=item.get("prompt_prefix", ""),
            prompts=tuple(item["prompts"]),
            conversation=bool(item.get("conversation", False)),
            max_new_tokens=int(item.get("max_new_tokens", 24)),
        )
        assert scenario.prompts, f"scenario {scenario.name!r} has no prompts"
        scenarios[scenario.name] = scenario
    return scenarios


def load_examples(path: Path = EXAMPLES_PATH) -> list[list[str]]:
    """Playground examples as ``[system_prompt, prompt]`` pairs."""
    return [list(pair) for pair in json.loads(path.read_text(encoding="utf-8"))["examples"]]


async def run_scenario(service: EngineService, scenario: Scenario, session: Session, max_new_tokens: int | None = None, verify: bool = False) -> AsyncIterator[ScenarioStep]:
    """Yield each request's result: every prompt with the prefix cache off, then every prompt with it on.

    Closing the iteration (a page that went away) cancels the request that is running.

    Args:
        session: Whose run it is; it uses a cold scratch namespace under the session's own.
        max_new_tokens: Overrides the scenario's own setting.
        verify: Verify every request (each also runs reusing nothing from the prefix cache, compared bit for bit: ``result.verification``).
    """
    scratch = service.scratch_namespace(service.namespace_for(session))
    ended = threading.Event()  # set once the request in flight has ended (its inserts done or abandoned)
    ended.set()
    try:
        for phase, prefix_cache in (("off", False), ("on", True)):
            history: list[dict[str, str]] = []
            for index, prompt in enumerate(scenario.prompts):
                message = scenario.message(prompt)
                ended = threading.Event()
                job = service.stream(
                    session,
                    scratch,
                    prompt=message,
                    system_prompt=scenario.system_prompt,
                    history=history if scenario.conversation else None,
                    max_new_tokens=max_new_tokens or scenario.max_new_tokens,
                    use_cache=True,
                    use_prefix_cache=prefix_cache,
                    **({"verify": True} if verify else {}),
                )
                result = await _result(job, ended)
                yield ScenarioStep(phase, index, result)
                if scenario.conversation:
                    history += [{"role": "user", "content": message}, {"role": "assistant", "content": result.text}]
    finally:
        service.drop_namespace(scratch)  # now; the cache refuses the inserts of a request that looked up before this
        if not ended.is_set():  # the cancelled request may not have looked up yet: drop again once it has ended
            threading.Thread(target=_drop_when_ended, args=(service, scratch, ended), daemon=True, name="scenario-drop").start()


async def _result(job: Job, ended: threading.Event) -> GenerationResult:
    """``job.aresult()``, setting ``ended`` when the job has ended, even after the awaiting task was cancelled."""

    def wait() -> GenerationResult:
        try:
            return job.result()
        finally:
            ended.set()

    try:
        return await anyio.to_thread.run_sync(wait, abandon_on_cancel=True)
    finally:
        job.cancel()


def _drop_when_ended(service: EngineService, namespace: str, ended: threading.Event) -> None:
    if ended.wait(LATE_DROP_WAIT_S):
        service.drop_namespace(namespace)
