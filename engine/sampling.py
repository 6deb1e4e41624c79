"""Choosing the next token from logits: greedy by default, temperature / top-p sampling on request.

Knows nothing about models or caches; works on one ``[vocab]`` float tensor at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# The bounds of user-set sampling values, one set for every entry point (REST schema and engine).
TEMPERATURE_MAX = 2.0  # 0 is greedy; above 2 the samples are noise
TOP_P_MIN_EXCLUSIVE, TOP_P_MAX = 0.0, 1.0
SEED_MAX = 2**63 - 1


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy (argmax)
    top_p: float = 1.0  # nucleus mass kept when sampling
    seed: int | None = None  # None: a fresh random stream per request

    @classmethod
    def checked(cls, temperature: float, top_p: float, seed: int | None) -> "SamplingParams":
        """Validate user input; raise ``ValueError`` saying what is allowed."""
        if not _is_number(temperature) or not 0 <= temperature <= TEMPERATURE_MAX:
            raise ValueError(f"temperature must be a number from 0 (greedy) to {TEMPERATURE_MAX}, got {temperature!r}")
        if not _is_number(top_p) or not TOP_P_MIN_EXCLUSIVE < top_p <= TOP_P_MAX:
            raise ValueError(f"top_p must be a number in ({TOP_P_MIN_EXCLUSIVE:g}, {TOP_P_MAX:g}], got {top_p!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX):
            raise ValueError(f"seed must be an integer from 0 to {SEED_MAX} or None, got {seed!r}")
        return cls(float(temperature), float(top_p), seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def make_generator(self) -> torch.Generator | None:
        """A per-request CPU generator, so concurrent requests never share random state."""
        if self.greedy:
            return None
        generator = torch.Generator(device="cpu")
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        return generator


def sample_next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick a token id from ``logits`` ``[vocab]``."""
    if params.greedy:
        return int(torch.argmax(logits).item())
    logits = logits.float().cpu()
    # Shift so the largest logit is 0 before dividing: a tiny temperature then sends the others to
    # -inf (probability 0) instead of overflowing the largest to inf (inf - inf is NaN in softmax).
    scaled = (logits - logits.max()) / params.temperature
    probs = torch.nan_to_num(torch.softmax(scaled, dim=-1), nan=0.0)
    if not probs.sum() > 0:  # NaN logits from the model: fall back to greedy rather than fail
        return int(torch.argmax(torch.nan_to_num(logits, nan=-math.inf)).item())
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest set whose mass reaches top_p (always at least the most likely token).
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        outside[0] = False  # a top_p below the first token's mass (1e-46) still keeps that token
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
