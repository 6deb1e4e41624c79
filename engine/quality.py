"""Quality of a weight format against fp32: teacher-forced top-1 agreement and mean NLL on a fixed text.

The text is the scenarios' own prose (``assets/scenarios.json``, 1,346 tokens, at most 2,000), fed
through the engine's decode step in one pass (``FastDecoder.hidden``: the same code and, for int8
and int4, the same quantized linears that decode every new token; not the float32 prefill); at every
position we keep the argmax and the negative log-likelihood of the true next token. A format
passes when its argmax agrees with fp32's at >= 90% of positions and its mean NLL is within 2% of
fp32's. The model attends over KV stored at the engine's ``--kv-dtype``, so the same measure
scores a KV storage precision (``benchmark/kv_dtype_bench.py``). Used by ``tests/test_quant.py``
and the decode benchmark.

Equivalence is not measured here: every cache path gives the same bits (engine/prefill.py, tests/test_exact.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.fast_llama import FastDecoder
from engine.kv import new_model_cache

SCENARIOS = Path(__file__).resolve().parent.parent / "assets" / "scenarios.json"
QUALITY_TOKENS = 2000
MIN_TOP1_AGREEMENT = 0.90
MAX_NLL_RATIO = 1.02


@dataclass(frozen=True)
class TeacherForced:
    """Per position ``t`` of a text, predicting token ``t + 1``: the argmax and the true token's NLL."""

    top1: torch.Tensor  # [T - 1] long
    nll: torch.Tensor  # [T - 1] float32

    def against(self, reference: "TeacherForced") -> dict[str, float]:
        """Top-1 agreement with ``reference`` and the mean NLLs (and their ratio)."""
        agreement = (self.top1 == reference.top1).float().mean().item()
        nll, ref_nll = self.nll.mean().item(), reference.nll.mean().item()
        return {"top1_agreement": agreement, "mean_nll": nll, "fp32_mean_nll": ref_nll, "nll_ratio": nll / ref_nll}


def quality_token_ids(tokenizer, tokens: int = QUALITY_TOKENS) -> list[int]:
    """The scenarios' text as the page sends it (each system prompt, then each prompt after its prefix), at most ``tokens`` ids.

    With SmolLM2's tokenizer that is all of it: 1,346 tokens.
    """
    pieces: list[str] = []
    for scenario in json.loads(SCENARIOS.read_text())["scenarios"]:
        pieces.append(scenario.get("system_prompt", ""))
        pieces += [scenario.get("prompt_prefix", "") + prompt for prompt in scenario.get("prompts", [])]
    ids = list(tokenizer("\n\n".join(p for p in pieces if p)).input_ids)
    return ids[:tokens]


@torch.inference_mode()
def teacher_forced(engine, token_ids: list[int], chunk: int = 256) -> TeacherForced:
    """Run ``token_ids`` through ``engine``'s decode path in one pass; the lm_head in chunks so the logits never all exist at once.

    Attention reads KV stored at the engine's KV dtype (``--kv-dtype``), as its requests do.
    """
    model, decoder, kv_dtype = engine.model, engine.decoder, engine.pool.dtype
    ids = torch.tensor([token_ids], device=engine.device)
    if isinstance(decoder, FastDecoder):
        hidden, head = decoder.hidden(ids, torch.arange(len(token_ids), device=engine.device), *decoder.new_kv(len(token_ids), kv_dtype))[0, :-1], decoder.lm_head
    else:  # transformers' step: its own forward
        cache = new_model_cache(model.config, len(token_ids), kv_dtype)
        hidden, head = model.model(input_ids=ids, cache=cache, use_cache=True).last_hidden_state[0, :-1], model.lm_head  # [T - 1, hidden]
    targets = ids[0, 1:]
    top1, nll = [], []
    for start in range(0, hidden.shape[0], chunk):
        logits = head(hidden[start : start + chunk]).float()  # [chunk, vocab]
        top1.append(logits.argmax(-1))
        nll.append(torch.nn.functional.cross_entropy(logits, targets[start : start + chunk], reduction="none"))
    return TeacherForced(torch.cat(top1).cpu(), torch.cat(nll).cpu())


def passes(scores: dict[str, float]) -> bool:
    return scores["top1_agreement"] >= MIN_TOP1_AGREEMENT and scores["nll_ratio"] <= MAX_NLL_RATIO
