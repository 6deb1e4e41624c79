"""The correctness oracle: does a cached run give what a run reusing nothing gives, bit for bit?

``Engine`` runs a request with ``verify=True`` twice: as asked (KV cache, prefix cache), then computed
afresh, reusing nothing from the prefix cache. The exactness contract (``engine/prefill.py``) says the
two are the same bits: :func:`compare` says whether the tokens are identical and how far apart the
first token's float32 logits are (0 when the contract holds); a corrupted pool slot, a wrong position
or a stale entry shows up as a different token or a nonzero difference. (A run with no KV cache at all
gives the same bits too, tests/test_exact.py; it costs one decode step per earlier token at every step,
too slow for a button.) Knows nothing of the request flow: it compares what it is given.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch


def compare(
    cached_tokens: Sequence[int],
    cached_logits: torch.Tensor,
    baseline_tokens: Sequence[int],
    baseline_logits: torch.Tensor,
    decode: Callable[[Sequence[int]], str],
) -> dict[str, Any]:
    """The ``verification`` of a result.

    Args:
        cached_tokens, baseline_tokens: The generated token ids of the two runs.
        cached_logits, baseline_logits: float32 ``[vocab]`` logits of each run's first new token.
        decode: Token ids to text (for the first differing token).

    Returns:
        ``identical``, ``max_abs_logit_diff``, ``first_difference`` (index or None), the two tokens
        there (id and text), and a ``message`` for the page.
    """
    diff = float((cached_logits.float().cpu() - baseline_logits.float().cpu()).abs().max())
    first = next((i for i, (a, b) in enumerate(zip(cached_tokens, baseline_tokens)) if a != b), None)
    if first is None and len(cached_tokens) != len(baseline_tokens):
        first = min(len(cached_tokens), len(baseline_tokens))
    out: dict[str, Any] = {
        "identical": first is None,
        "max_abs_logit_diff": diff,
        "first_difference": first,
        "baseline_tokens": len(baseline_tokens),
    }
    if first is None:
        same_bits = "bit for bit" if diff == 0 else f"but first-token logits differ by up to {diff:.3g}"
        out["message"] = f"verified identical: {len(cached_tokens)} tokens equal a run that reused nothing, {same_bits}"
        return out
    ours = cached_tokens[first] if first < len(cached_tokens) else None
    theirs = baseline_tokens[first] if first < len(baseline_tokens) else None
    out.update(
        cached_token={"id": ours, "text": decode([ours]) if ours is not None else None},
        baseline_token={"id": theirs, "text": decode([theirs]) if theirs is not None else None},
    )
    out["message"] = (
        f"differs at token {first}: the cached run gave {out['cached_token']['text']!r}, a run that reused nothing "
        f"{out['baseline_token']['text']!r}; first-token logits differ by up to {diff:.3g}"
    )
    return out
