"""Shared fixtures: a tiny random Llama (fast, CPU) and the real bundled SmolLM2, both behind an Engine.

The tiny model uses the bundled model's tokenizer (so the chat template is the real one) with
random weights from a seeded config: generation is gibberish but deterministic, which is all the
equivalence tests need.
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engine import Engine, EngineConfig
from engine import loading

# No background compiling of the decode step in the suite (engines, and the app servers launch_app
# starts): tests/test_compiled.py compiles where it means to.
os.environ.setdefault("KVCI_COMPILE", "off")

# Where the engine-level tests put their models: cpu here and in CI; `KVCI_TEST_DEVICE=cuda` runs the
# same tests (tests/test_engine.py, test_fast_decode.py, test_quant.py, ...) on a GPU.
TEST_DEVICE = os.environ.get("KVCI_TEST_DEVICE", "cpu")

TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)


@pytest.fixture(scope="session")
def bundled_folder():
    """The bundled GGUF converted to safetensors (converted once per machine, then reused)."""
    gguf = loading.bundled_gguf_path()
    if gguf is None:
        pytest.fail(f"the bundled model is not installed: {loading.INSTALL_HINT}")
    return loading.convert_gguf(gguf, EngineConfig().resolved_model_cache_dir())


@pytest.fixture(scope="session")
def tokenizer(bundled_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(bundled_folder))


def make_tiny_model(tokenizer, seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{**TINY_CONFIG, **overrides},
    )
    return LlamaForCausalLM(config).to(TEST_DEVICE).eval()


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    return make_tiny_model(tokenizer)


@pytest.fixture
def tiny_engine(tiny_model, tokenizer):
    """A fresh engine (empty prefix cache) around the shared tiny model."""
    return Engine(tiny_model, tokenizer, EngineConfig(min_cached_tokens=4, chunk_tokens=4), name="tiny-llama")


@pytest.fixture(scope="session")
def smol_engine_shared():
    return Engine.from_pretrained(device=TEST_DEVICE, weights="fp32")  # other formats: tests/test_quant.py


@pytest.fixture
def smol_engine(smol_engine_shared):
    """The real bundled model with an emptied prefix cache."""
    smol_engine_shared.cache.clear()
    return smol_engine_shared


# ====================================================================== app fixtures (app.py, ui/)
# The app runs as `python app.py` in a subprocess on a free loopback port, once per test session
# per cache mode, and the tests talk to it over HTTP like any client would.

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
APP_START_TIMEOUT_S = 240  # imports and model load on a busy 2-core machine


@dataclass
class AppServer:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_app(log_dir: Path, *flags: str, env_extra: dict[str, str] | None = None, expect_load_error: bool = False) -> AppServer:
    """Start `python app.py` on a free port and wait until /health says the model is loaded (or, with
    ``expect_load_error``, that it could not be)."""
    port = _free_port()
    log_path = log_dir / f"app-{port}.log"
    env = {k: v for k, v in os.environ.items() if k not in ("SPACE_ID", "GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT") and not k.startswith("KVCI_")}
    env["GRADIO_ANALYTICS_ENABLED"] = "False"
    env["KVCI_COMPILE"] = os.environ["KVCI_COMPILE"]  # the suite's setting (off unless asked): no app server compiles in the background
    env.update(env_extra or {})
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port), *flags],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = AppServer(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + APP_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"app.py exited with {process.returncode}:\n{server.log_tail()}")
        try:
            health = httpx.get(server.url + "/health", timeout=5).json()
            if health["ready"] or (expect_load_error and health["error"]):
                return server
            if health["error"]:
                stop_app(server)
                pytest.fail(f"the app could not load its model: {health['error']}")
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_app(server)
    pytest.fail(f"app.py was not ready after {APP_START_TIMEOUT_S} s:\n{server.log_tail()}")


def stop_app(server: AppServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=8)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(timeout=15)


@pytest.fixture(scope="session")
def app_server(tmp_path_factory, bundled_folder):
    """The app in its local default: shared prefix cache, clearing allowed."""
    server = launch_app(tmp_path_factory.mktemp("app-shared"))
    yield server
    stop_app(server)


@pytest.fixture(scope="session")
def app_server_per_session(tmp_path_factory, bundled_folder):
    """The app with one prefix-cache namespace per session, as on a public host."""
    server = launch_app(tmp_path_factory.mktemp("app-per-session"), "--cache-mode", "per-session")
    yield server
    stop_app(server)


@pytest.fixture(scope="session")
def app_server_behind_proxy(tmp_path_factory, bundled_folder):
    """The bundled model served as on a public host behind one proxy of ours (--trust-proxy): one
    worker and at most 3 requests in flight per address, whatever its sessions."""
    server = launch_app(tmp_path_factory.mktemp("app-proxy"), "--public", "--trust-proxy", "--concurrency", "1", "--max-inflight-per-address", "3")
    yield server
    stop_app(server)


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory, tokenizer):
    """The tiny random Llama saved as a model folder, so an app can load it with --model in a second."""
    folder = tmp_path_factory.mktemp("tiny-model")
    make_tiny_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


PUBLIC_MAX_PROMPT_TOKENS = 256


@pytest.fixture(scope="session")
def app_server_public(tmp_path_factory, tiny_model_folder):
    """The app as on a public host (--public on loopback): per-session, an 8 MiB cache budget (about
    40 cached prompts: each stores ~200 KiB of last logits), short prompts only, namespaces
    forgotten after 2 s idle, the tiny model (fast, deterministic)."""
    server = launch_app(
        tmp_path_factory.mktemp("app-public"),
        "--public",
        "--model", str(tiny_model_folder),
        "--cache-budget-mb", "8",
        "--max-prompt-tokens", str(PUBLIC_MAX_PROMPT_TOKENS),
        env_extra={"KVCI_NAMESPACE_IDLE_S": "2", "KVCI_MIN_CACHED_TOKENS": "8"},
    )
    yield server
    stop_app(server)


@pytest.fixture
def rest(app_server):
    with httpx.Client(base_url=app_server.url, timeout=120) as client:
        yield client
