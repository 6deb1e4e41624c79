"""The compiled decode step (engine/compiled.py): same tokens as eager, swapped in while serving, eager on any failure."""

from __future__ import annotations

import shutil
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from engine import Engine, EngineConfig, compiled, quant
from tests.conftest import make_tiny_model
from tests.test_exact import walk_every_path

COMPILE_TIMEOUT_S = 1200  # a cold compile on a loaded 2-core machine; the inductor cache makes later runs fast


def test_compiled_step_decodes_the_eager_tokens_and_keeps_the_equivalence(tokenizer, monkeypatch):
    """A real compile (tiny int4 model): checked, swapped in, the same greedy tokens as eager, cached = uncached on every path,
    with the one graph the check built (no request, miss or hit, compiles another: that cost a second compile at the first request)."""
    model = quant.apply_format(make_tiny_model(tokenizer, seed=2, hidden_size=128), "int4")
    eager = Engine(model, tokenizer, EngineConfig(min_cached_tokens=4, chunk_tokens=8), name="tiny-eager")
    expected = eager.generate("What is machine learning?", max_new_tokens=16, use_prefix_cache=False).token_ids
    engine = Engine(model, tokenizer, EngineConfig(min_cached_tokens=4, chunk_tokens=8), name="tiny-compiled")
    engine.compiler.start()
    assert engine.info()["decode_compile"]["state"] in ("compiling", "compiled")
    assert engine.compiler.wait(COMPILE_TIMEOUT_S), "compiling did not end"
    status = engine.info()["decode_compile"]
    assert status["state"] == "compiled", status
    assert status["description"].startswith("compiled in ") and status["compile_seconds"] > 0
    assert any(Path(status["inductor_cache"]).iterdir())  # the app's cache folder (or one chosen by TORCHINDUCTOR_CACHE_DIR), kept for a restart
    assert engine.decoder.step is not engine.decoder.forward_batch
    assert engine.decoder.rows_invariant, "the compiled int4 step batches: its rows checked bit for bit against each request alone"
    # dynamo's own patch, not monkeypatch: undoing a monkeypatch deleted the setting, and a later compile in the
    # same process (tests/test_exact.py's bundled engine) then failed with "error_on_recompile does not exist".
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert engine.generate("What is machine learning?", max_new_tokens=16, use_prefix_cache=False).token_ids == expected
        walk_every_path(engine)
        with ThreadPoolExecutor(3) as pool:  # requests decode from several threads at once: the same tokens each
            runs = list(pool.map(lambda _: engine.generate("What is machine learning?", max_new_tokens=16, use_prefix_cache=False).token_ids, range(3)))
    assert runs == [expected] * 3


def _tiny_engine(tokenizer) -> Engine:
    return Engine(make_tiny_model(tokenizer), tokenizer, EngineConfig(min_cached_tokens=4), name="tiny")


def test_no_cpp_compiler_leaves_the_step_eager_with_the_reason(tokenizer, monkeypatch, caplog):
    """Without g++ (a bare Space image) the state says so at once, one log line, and requests decode eagerly."""
    monkeypatch.setattr(shutil, "which", lambda name: None)
    engine = _tiny_engine(tokenizer)
    with caplog.at_level("WARNING", logger="kvci.compile"):
        engine.compiler.start()
    assert engine.info()["decode_compile"]["state"] == "eager"
    assert engine.compiler.describe() == "eager (compile failed: no C++ compiler (install g++, e.g. packages.txt on a Space))"
    assert len([r for r in caplog.records if r.name == "kvci.compile"]) == 1
    assert engine.decoder.step == engine.decoder.forward_batch
    assert engine.generate("Hello there", max_new_tokens=4).finish_reason in ("eos", "length")


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param(lambda fn, **kw: (_ for _ in ()).throw(RuntimeError("inductor exploded\nsecond line")), id="compile-raises"),
        pytest.param(lambda fn, **kw: lambda tokens, pos, k, v: fn(tokens, pos, k, v).roll(1, dims=-1), id="different-tokens"),
    ],
)
def test_a_failed_or_wrong_compile_leaves_the_step_eager(tokenizer, monkeypatch, broken):
    """An inductor error, or a graph that decodes other tokens than eager on the check prompt: eager stays, never an error."""
    monkeypatch.setattr(torch, "compile", broken)
    engine = _tiny_engine(tokenizer)
    engine.compiler.start()
    assert engine.compiler.wait(60)
    status = engine.info()["decode_compile"]
    assert status["state"] == "eager" and status["description"].startswith("eager (compile failed: "), status
    assert "\n" not in status["reason"]
    assert engine.decoder.step == engine.decoder.forward_batch
    assert engine.generate("Hello there", max_new_tokens=4).token_ids


def test_compile_setting_and_what_is_not_compiled(tiny_model, tokenizer):
    """KVCI_COMPILE is auto or off; an engine not started stays 'off'; transformers' own step is never compiled."""
    with pytest.raises(ValueError, match="compile"):
        EngineConfig(compile="always")
    assert EngineConfig.from_env({"KVCI_COMPILE": "off"}).compile == "off"
    engine = Engine(tiny_model, tokenizer, EngineConfig(min_cached_tokens=4))
    assert engine.info()["decode_compile"]["state"] == "off" and not engine.compiler.wait(0)
    slow = Engine(tiny_model, tokenizer, EngineConfig(decode="transformers"))
    slow.compiler.start()
    assert slow.compiler.status()["state"] == "eager" and "transformers" in slow.compiler.reason
    assert compiled.unavailable(engine.decoder) in (None, "no C++ compiler (install g++, e.g. packages.txt on a Space)")


def test_the_vector_isa_check_ahead_of_the_compile_is_best_effort(monkeypatch, caplog):
    """check_vector_isa fills inductor's answer ahead of its need, and a failing (or moved) inductor function only logs."""
    from torch._inductor import cpu_vec_isa

    compiled.check_vector_isa()
    assert cpu_vec_isa.valid_vec_isa_list.cache_info().currsize == 1  # the compile will find the answer ready

    def broken():
        raise RuntimeError("probe exploded")

    monkeypatch.setattr(cpu_vec_isa, "valid_vec_isa_list", broken)
    with caplog.at_level("DEBUG", logger="kvci.compile"):
        compiled.check_vector_isa()  # no exception
    assert "probe exploded" in caplog.text
