"""The prefill: the functions that compute every KV row the prefix cache stores, one per engine.

The numeric contract (docs/engine.md): the KV of a position, and the logits after a sequence, are a
pure function of the token ids up to it, whichever path computed them (a miss, a partial hit, an
exact hit, a conversation's next turn, alone or beside other requests, at any time in the process's
life). Kernels give the same bits for the same shapes on the same inputs, and not for other shapes: a
GEMM's summation order depends on how many rows it has, and attention's on how many keys. Two ways
keep a shape from depending on the path, and an engine uses one of them for its life:

**Through the decode step** (:func:`step_prefill_chunks`, ``prefill="auto"`` where the step's rows
are invariant: the int4 and int8 steps). Each prompt token is a row of the decode step, as a new
token is: the linears are checked to give every row the bits it gets alone, whatever the other rows
(``FastDecoder.check_rows_invariant``), and each row attends over its own positions with the call a
decode step makes (``engine.decode_attention``). So a position's KV is the same bits whether it was
prefilled in a chunk of 32, of 7, alone, or decoded as a reply: reuse may stop at any token, and a
reply's KV is stored as decoded. Chunks only bound how long a prompt holds up the others' steps.

**Through the float model** (:func:`prefill_chunks`, the fp32 and bf16 formats, whose GEMMs are not
row-invariant, and transformers' own step), in chunks aligned to absolute positions:

- positions are computed in chunks ``[kC, (k+1)C)`` of absolute positions (``C`` =
  :data:`CHUNK_TOKENS`). The last chunk of a sequence is padded to ``C`` rows with :data:`PAD_TOKEN`
  after the real ones, so every chunk is the same ``C``-row GEMM, and chunk ``k`` attends over
  ``(k+1)C`` keys under the causal mask. A row depends only on its own inputs within a GEMM of fixed
  shape, and a real row never attends to a pad (they come after it), so a padded row is bit for bit
  the row a full chunk computes;
- a pad's KV lands past the sequence's end: the cache's length is rewound to the real end, and the
  next write (a chunk, a decode step) overwrites it before anything reads it;
- a reuse ends at a chunk boundary (``PrefixCache.match_prefix(..., align=C)``): a prompt that
  shares part of chunk ``k`` with a cached one recomputes that chunk from ``kC``, up to ``C - 1``
  rows again, because the chunk is one GEMM; an exact hit (the whole prompt and the logits after it)
  reuses every row, each computed here for these very tokens;
- the logits after a sequence are those of its last real row, through the ``lm_head`` alone.

Here the decode step computes a request's new tokens with other kernels, so its KV is never stored:
before a reply's tokens go into the prefix cache they are prefilled again (``engine/history.py``).

Knows nothing of the prefix cache or of requests.
"""

from __future__ import annotations

from typing import Any, Generator, Sequence

import torch

from engine.scheduler import PAUSE

CHUNK_TOKENS = 32  # C, the default of EngineConfig.chunk_tokens: measured against 16 and 64 in benchmark/README.md ("The cost of exactness")
PREFILL_MODES = ("auto", "model")  # EngineConfig.prefill: through the decode step where its rows are invariant, or always the float model
PAD_TOKEN = 0  # any id the model embeds; its rows are never read


def capacity(tokens: int, chunk: int | None = CHUNK_TOKENS) -> int:
    """Room a model cache needs for ``tokens`` real positions: up to the end of their last chunk (its pads)."""
    return -(-tokens // chunk) * chunk if chunk else tokens


def prefill(model: Any, token_ids: Sequence[int], model_cache: Any, chunk: int | None = CHUNK_TOKENS) -> torch.Tensor:
    """Feed ``token_ids`` at the model cache's next positions, in aligned, padded chunks; the logits after the last one.

    Args:
        model: A causal LM taking ``input_ids``, ``cache`` and ``logits_to_keep`` (transformers 5).
        token_ids: At least one token. The cache's length must be a multiple of ``chunk`` (a chunk
            boundary: see the module's docstring).
        model_cache: The request's cache (``engine.kv.new_model_cache``); its length ends at
            ``start + len(token_ids)``, pads dropped.
        chunk: ``C``; None: the whole sequence in one call, unpadded (sliding-window models, which
            have no prefix cache and whose layers cannot drop pads).

    Returns:
        float32 ``[vocab]``: the logits of the last real position.
    """
    return run_to_end(prefill_chunks(model, token_ids, model_cache, chunk))


def run_to_end(flow: Generator[object, None, Any]) -> Any:
    """Run a prefill generator through its pauses (not as a scheduler's flow); its return value."""
    while True:
        try:
            next(flow)
        except StopIteration as done:
            return done.value


@torch.inference_mode()
def step_prefill_chunks(decoder: Any, token_ids: Sequence[int], model_cache: Any, chunk: int = CHUNK_TOKENS) -> Generator[object, None, torch.Tensor]:
    """Feed ``token_ids`` at the model cache's next positions through the decode step, ``chunk`` rows a call; the logits after the last one.

    Yields ``PAUSE`` between chunks, as :func:`prefill_chunks` does. Any start and any split give the
    same bits (see the module's docstring): the step's rows must be invariant (``decoder.rows_invariant``
    for up to ``chunk`` rows), which the engine checks before it prefills this way.
    """
    assert token_ids, "prefill needs at least one token"
    logits = None
    for at in range(0, len(token_ids), chunk):
        if at:
            yield PAUSE
        logits = decoder.step_rows([list(token_ids[at : at + chunk])], [model_cache])
    return logits[0]


@torch.inference_mode()
def prefill_chunks(model: Any, token_ids: Sequence[int], model_cache: Any, chunk: int | None = CHUNK_TOKENS) -> Generator[object, None, torch.Tensor]:
    """:func:`prefill` as a generator that yields ``PAUSE`` after each chunk but the last, and returns the logits.

    The scheduler (``engine.scheduler``) runs the other requests' decode steps at each pause, so a long
    prompt holds them up by one chunk at a time.
    """
    device = next(model.parameters()).device
    if not chunk:
        out = model(input_ids=torch.tensor([list(token_ids)], dtype=torch.long, device=device), cache=model_cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1].float()
    start = model_cache.get_seq_length()
    if start % chunk:
        raise AssertionError(f"prefill starts at {start}, not at a chunk boundary of {chunk}: reuse through reusable()")
    assert token_ids, "prefill needs at least one token"
    logits = None
    for at in range(0, len(token_ids), chunk):
        if at:
            yield PAUSE
        real = list(token_ids[at : at + chunk])
        ids = torch.tensor([real + [PAD_TOKEN] * (chunk - len(real))], dtype=torch.long, device=device)  # [1, C]
        last = torch.tensor([len(real) - 1], device=device)  # the last real row: the lm_head runs on it alone
        out = model(input_ids=ids, cache=model_cache, use_cache=True, logits_to_keep=last)
        rewind(model_cache, start + at + len(real))
        logits = out.logits[0, -1]
    return logits.float()


def rewind(model_cache: Any, length: int) -> None:
    """Set every layer's length back to ``length`` (dropping the pads); the buffers keep their bytes."""
    for layer in model_cache.layers:
        layer.rewind(length)
