"""The app as a Hugging Face Space starts it: `python app.py` with SPACE_ID set, no dev.py, what requirements.txt and packages.txt install.

A fresh `pip install -r requirements.txt` takes minutes, too slow for the suite; instead the
test checks that every third-party module the app imports is pinned there, and starts the app
the Space's way in this environment.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import httpx

from tests.conftest import REPO_ROOT, launch_app, stop_app

APP_PACKAGES = ("app.py", "ui", "engine", "cache", "backends")  # what `python app.py` imports (benchmark/ and tests/ are not served)


def test_packages_txt_installs_the_compiler_the_decode_step_needs():
    """A Space installs packages.txt with apt: without g++ the compiled decode step falls back to eager."""
    assert "g++" in (REPO_ROOT / "packages.txt").read_text().split()


def test_every_module_the_app_imports_is_installed_by_requirements():
    """A fresh Space venv has only what requirements.txt installs (its pins and what they require): an import
    outside that fails at start, on the Space only."""
    pinned = _installed_by({re.split(r"[=<>\[ ;#]", line, maxsplit=1)[0].strip() for line in (REPO_ROOT / "requirements.txt").read_text().splitlines() if line.strip() and not line.startswith("#")})
    distributions = importlib.metadata.packages_distributions()
    local = {p.stem for p in REPO_ROOT.iterdir()} | {"tests"}
    missing = {}
    for path in _app_sources():
        for module in _imported_top_level(path):
            if module in sys.stdlib_module_names or module in local:
                continue
            names = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
            if not names & pinned:
                missing[module] = str(path.relative_to(REPO_ROOT))
    assert not missing, f"imported by the app but not in requirements.txt: {missing}"
    assert "dev" not in {m for path in _app_sources() for m in _imported_top_level(path)}  # a Space runs no dev.py


def test_app_starts_as_a_space_starts_it(tmp_path):
    """SPACE_ID set, `python app.py`: the model loads, the page answers with its title, and a Space's default is per-session."""
    server = launch_app(tmp_path, env_extra={"SPACE_ID": "someone/kv-cache-inference"})
    try:
        health = httpx.get(server.url + "/health", timeout=30).json()
        assert health["ready"] and health["cache_mode"] == "per-session"
        page = httpx.get(server.url + "/", timeout=30)
        assert page.status_code == 200 and "KV cache &amp; prefix cache, measured" in page.text or "KV cache & prefix cache, measured" in page.text
    finally:
        stop_app(server)


def _installed_by(pins: set[str]) -> set[str]:
    """The distributions ``pip install`` of ``pins`` brings, normalised: the pins and their requirements (no extras), transitively."""
    seen: set[str] = set()
    todo = list(pins)
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [re.split(r"[=<>!~\[ ;(]", r, maxsplit=1)[0] for r in requires if "extra ==" not in r]
    return seen


def _app_sources() -> list[Path]:
    sources = []
    for name in APP_PACKAGES:
        path = REPO_ROOT / name
        sources += [path] if path.is_file() else sorted(path.rglob("*.py"))
    return sources


def _imported_top_level(path: Path) -> set[str]:
    """Top-level modules imported anywhere in the file (function-level imports too: they run on the Space as well)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names
