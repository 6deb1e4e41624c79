"""Choosing the next token from logits: greedy by default, temperature / top-p sampling on request,
and repetition control (a repetition penalty, OpenAI's frequency and presence penalties, an n-gram
ban) over the tokens the request generated.

Knows nothing about models or caches; works on one ``[vocab]`` float tensor at a time. The
per-request state (the random stream, the token history the penalties read) is a :class:`Sampler`.

Repetition control reads only the tokens this request generated, never the prompt: CTRL's
penalty (Keskar et al. 2019) discounts "previously generated tokens", and a prompt's words (a
document to quote, the question's own terms, the chat template's newlines) are words an answer
needs. transformers and vLLM also count the prompt; ``/v1`` documents the difference. Because
the history is the request's own output, a prefix-cache hit cannot change what is penalised:
cached and uncached runs stay token-identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# The bounds of user-set sampling values, one set for every entry point (REST schema and engine).
TEMPERATURE_MAX = 2.0  # 0 is greedy; above 2 the samples are noise
TOP_P_MIN_EXCLUSIVE, TOP_P_MAX = 0.0, 1.0
SEED_MAX = 2**63 - 1
REPETITION_PENALTY_MIN, REPETITION_PENALTY_MAX = 1.0, 2.0  # 1 is off; below 1 would reward loops
NO_REPEAT_NGRAM_MAX = 16  # 0 is off; a ban on longer n-grams never fires in a 512-token reply
OPENAI_PENALTY_MIN, OPENAI_PENALTY_MAX = -2.0, 2.0  # frequency_penalty and presence_penalty, as OpenAI bounds them


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy (argmax)
    top_p: float = 1.0  # nucleus mass kept when sampling
    seed: int | None = None  # None: a fresh random stream per request
    repetition_penalty: float = 1.0  # CTRL: divide a generated token's positive logit, multiply its negative one
    no_repeat_ngram_size: int = 0  # n > 0: never generate the same n tokens twice
    frequency_penalty: float = 0.0  # OpenAI: subtracted from a token's logit once per time the reply generated it
    presence_penalty: float = 0.0  # OpenAI: subtracted once from the logit of any token the reply generated

    @classmethod
    def checked(
        cls, temperature: float, top_p: float, seed: int | None, repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
        frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
    ) -> "SamplingParams":
        """Validate user input; raise ``ValueError`` saying what is allowed."""
        if not _is_number(temperature) or not 0 <= temperature <= TEMPERATURE_MAX:
            raise ValueError(f"temperature must be a number from 0 (greedy) to {TEMPERATURE_MAX}, got {temperature!r}")
        if not _is_number(top_p) or not TOP_P_MIN_EXCLUSIVE < top_p <= TOP_P_MAX:
            raise ValueError(f"top_p must be a number in ({TOP_P_MIN_EXCLUSIVE:g}, {TOP_P_MAX:g}], got {top_p!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX):
            raise ValueError(f"seed must be an integer from 0 to {SEED_MAX} or None, got {seed!r}")
        if not _is_number(repetition_penalty) or not REPETITION_PENALTY_MIN <= repetition_penalty <= REPETITION_PENALTY_MAX:
            raise ValueError(
                f"repetition_penalty must be a number from {REPETITION_PENALTY_MIN:g} (off) to {REPETITION_PENALTY_MAX:g}, got {repetition_penalty!r}"
            )
        if isinstance(no_repeat_ngram_size, bool) or not isinstance(no_repeat_ngram_size, int) or not 0 <= no_repeat_ngram_size <= NO_REPEAT_NGRAM_MAX:
            raise ValueError(f"no_repeat_ngram_size must be an integer from 0 (off) to {NO_REPEAT_NGRAM_MAX}, got {no_repeat_ngram_size!r}")
        for name, value in (("frequency_penalty", frequency_penalty), ("presence_penalty", presence_penalty)):
            if not _is_number(value) or not OPENAI_PENALTY_MIN <= value <= OPENAI_PENALTY_MAX:
                raise ValueError(f"{name} must be a number from {OPENAI_PENALTY_MIN:g} to {OPENAI_PENALTY_MAX:g} (0 is off), got {value!r}")
        return cls(float(temperature), float(top_p), seed, float(repetition_penalty), no_repeat_ngram_size, float(frequency_penalty), float(presence_penalty))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def controls_repetition(self) -> bool:
        return self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

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


class Sampler:
    """One request's sampling: ``sampler(logits) -> token``, remembering each token it picks.

    The history is kept incrementally so that a step costs the same at token 500 as at token 5:
    a ``[vocab]`` count of each token generated so far (each penalty is one vectorised
    operation), and an index from each (n-1)-token context to the tokens that followed it (the
    ban is one dictionary lookup). Nothing is rescanned. The logits passed in are never modified:
    the engine stores them in the prefix cache and compares them in ``verify``.
    """

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator = params.make_generator()
        self.history: list[int] = []
        self._counts: torch.Tensor | None = None  # [vocab] float32, on the logits' device: times generated so far
        self._followers: dict[tuple[int, ...], set[int]] = {}  # (n-1)-token context -> tokens seen after it

    def __call__(self, logits: torch.Tensor) -> int:
        """Pick the next token from ``logits`` ``[vocab]`` and add it to the history."""
        if self.params.controls_repetition:
            logits = self._controlled(logits)
        token = sample_next_token(logits, self.params, self.generator)
        self._observe(token)
        return token

    def banned(self) -> set[int]:
        """Tokens that would repeat an n-gram of the history (``no_repeat_ngram_size``), as transformers bans them."""
        n = self.params.no_repeat_ngram_size
        if n == 0 or len(self.history) < n - 1:
            return set()
        return self._followers.get(tuple(self.history[len(self.history) - n + 1 :]), set())

    def _controlled(self, logits: torch.Tensor) -> torch.Tensor:
        """A float32 copy of ``logits`` with the penalties and the ban applied."""
        logits = logits.float().clone()
        if self._counts is None:
            self._counts = torch.zeros(logits.shape[-1], dtype=torch.float32, device=logits.device)
        seen = self._counts > 0
        p = self.params
        if p.repetition_penalty != 1.0:  # CTRL's, as transformers applies it
            logits = torch.where(seen, torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty), logits)
        if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:  # OpenAI's, as vLLM applies them
            logits = logits - p.frequency_penalty * self._counts - p.presence_penalty * seen.float()
        banned = self.banned()
        if banned:  # a few tokens: a reply is far shorter than the vocabulary, so most stay possible
            logits[torch.tensor(sorted(banned), device=logits.device)] = -math.inf
        return logits

    def _observe(self, token: int) -> None:
        self.history.append(token)
        if self._counts is not None:
            self._counts[token] += 1
        n = self.params.no_repeat_ngram_size
        if n and len(self.history) >= n:
            *context, last = self.history[-n:]
            self._followers.setdefault(tuple(context), set()).add(last)


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
