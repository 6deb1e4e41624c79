"""Request bodies, validated with pydantic, and readable messages for what is wrong with them.

:func:`parse_body` is the one validation of a generation request, whichever door it came in by:
the page's events, gradio_client and REST all call it, with strict types (a prompt is a str, a
flag a real bool, max_new_tokens an int) and the limits of ``ui.limits`` and ``engine.sampling``.
"""

from __future__ import annotations

import unicodedata
from typing import Any, Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from engine.sampling import NO_REPEAT_NGRAM_MAX, OPENAI_PENALTY_MAX, OPENAI_PENALTY_MIN, REPETITION_PENALTY_MAX, REPETITION_PENALTY_MIN, SEED_MAX, TEMPERATURE_MAX, TOP_P_MAX, TOP_P_MIN_EXCLUSIVE
from ui.limits import DEFAULT_MAX_NEW_TOKENS, MAX_HISTORY_TURNS, MAX_NEW_TOKENS, MAX_PIN_TTL_S, MAX_PROMPT_CHARS, MAX_STOP_CHARS, MAX_STOP_STRINGS
_ALLOWED_CONTROLS = frozenset("\t\n\r")


class GenerateBody(BaseModel):
    """``POST /generate``: one request to the engine. Unknown fields are refused (422); ``{"prompt": "hi"}`` is enough."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="the user's message")
    system_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS, description="optional system message")
    max_new_tokens: int = Field(DEFAULT_MAX_NEW_TOKENS, ge=1, le=MAX_NEW_TOKENS, description="tokens to generate at most")
    use_cache: bool = Field(True, description="KV cache during decoding")
    use_prefix_cache: bool = Field(True, description="reuse KV across requests (needs use_cache)")
    temperature: float = Field(0.0, ge=0.0, le=TEMPERATURE_MAX, allow_inf_nan=False, description="0 is greedy")
    top_p: float = Field(1.0, gt=TOP_P_MIN_EXCLUSIVE, le=TOP_P_MAX, allow_inf_nan=False, description="nucleus sampling mass")
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="seed for repeatable sampling")
    repetition_penalty: float = Field(
        1.0, ge=REPETITION_PENALTY_MIN, le=REPETITION_PENALTY_MAX, allow_inf_nan=False,
        description="1 is off; above 1 discounts tokens the reply already generated (CTRL; the prompt is not penalised)",
    )
    no_repeat_ngram_size: int = Field(0, ge=0, le=NO_REPEAT_NGRAM_MAX, description="0 is off; n never generates the same n tokens twice")
    frequency_penalty: float = Field(0.0, ge=OPENAI_PENALTY_MIN, le=OPENAI_PENALTY_MAX, allow_inf_nan=False, description="OpenAI's: minus this per time a token was generated")
    presence_penalty: float = Field(0.0, ge=OPENAI_PENALTY_MIN, le=OPENAI_PENALTY_MAX, allow_inf_nan=False, description="OpenAI's: minus this for any token generated")
    verify: bool = Field(False, description="also run reusing nothing from the prefix cache and compare tokens and first-token logits bit for bit (counts as two requests)")

    @field_validator("prompt")
    @classmethod
    def _prompt_has_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be only whitespace")
        return _printable(value)

    @field_validator("system_prompt")
    @classmethod
    def _system_prompt_printable(cls, value: str | None) -> str | None:
        return None if value is None else _printable(value)

    def engine_kwargs(self) -> dict:
        """The engine's arguments; fields at their neutral value are left out, so a remote backend never sees what it need not do."""
        neutral = {"verify": False, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "frequency_penalty": 0.0, "presence_penalty": 0.0}  # only a local engine verifies
        return self.model_dump(exclude={name for name, value in neutral.items() if getattr(self, name) == value})


class Turn(BaseModel):
    """One earlier turn of a conversation."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["user", "assistant"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)

    @field_validator("content")
    @classmethod
    def _content_printable(cls, value: str) -> str:
        return _printable(value)


class ConversationBody(GenerateBody):
    """What ``/v1`` hands the service: a :class:`GenerateBody` (same fields, same limits) plus the
    earlier turns, raw text (``/v1/completions``: no chat template) and stop strings. Built by
    ``ui.openai_api`` from an OpenAI request, never sent by a client as such."""

    history: list[Turn] = Field(default_factory=list, max_length=MAX_HISTORY_TURNS)
    raw: bool = False
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: list[str]) -> list[str]:
        for text in value:
            if not 1 <= len(text) <= MAX_STOP_CHARS:
                raise ValueError(f"each stop string must have 1 to {MAX_STOP_CHARS} characters")
            _printable(text)
        return value


class Message(BaseModel):
    """One message of a conversation to warm."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)

    @field_validator("content")
    @classmethod
    def _content_printable(cls, value: str) -> str:
        return _printable(value)


class PromptSource(BaseModel):
    """What to warm or unpin: exactly one of a system prompt and a list of messages (``engine/warm.py`` tokenizes it)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    system_prompt: str | None = Field(None, min_length=1, max_length=MAX_PROMPT_CHARS, description="a system prompt to prefill")
    messages: list[Message] | None = Field(None, min_length=1, max_length=MAX_HISTORY_TURNS + 2, description="messages to prefill, in order")

    @field_validator("system_prompt")
    @classmethod
    def _system_prompt_printable(cls, value: str | None) -> str | None:
        return None if value is None else _printable(value)

    @model_validator(mode="after")
    def _one_source(self) -> "PromptSource":
        if (self.system_prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of system_prompt and messages")
        return self

    def message_dicts(self) -> list[dict[str, str]]:
        if self.messages is None:
            return [{"role": "system", "content": self.system_prompt}]
        return [m.model_dump() for m in self.messages]


class SaveBody(BaseModel):
    """``POST /cache/save``: no fields (an empty body or ``{}``); anything else is refused, as everywhere."""

    model_config = ConfigDict(extra="forbid", strict=True)


class WarmBody(PromptSource):
    """``POST /cache/warm``: prefill a system prompt, or a list of messages, into the caller's namespace; maybe pin it.

    Exactly one of ``system_prompt`` and ``messages``. ``ttl_s`` applies to a pin only; a pin
    without one lasts until evicted by nothing (a local server) or ``MAX_PIN_TTL_S`` (per-session).
    """

    pin: bool = Field(False, description="exempt the prefilled entry from eviction, within the pin budget")
    ttl_s: float | None = Field(None, gt=0, le=MAX_PIN_TTL_S, allow_inf_nan=False, description=f"seconds a pin lasts without a hit (at most {MAX_PIN_TTL_S})")

    @model_validator(mode="after")
    def _ttl_needs_pin(self) -> "WarmBody":
        if self.ttl_s is not None and not self.pin:
            raise ValueError("ttl_s applies to a pin: set pin to true or drop ttl_s")
        return self


class UnpinBody(PromptSource):
    """``POST /cache/unpin``: drop the pin of a system prompt or messages (the same body as a warm, without ``pin``
    and ``ttl_s``) in the caller's own namespace; the entry stays cached, evictable again."""


class BadRequest(ValueError):
    """A request body that does not validate; the message says what is wrong (REST answers 422)."""


def parse_body(raw: bytes | dict, schema: type[BaseModel] = GenerateBody) -> Any:
    """Validate a REST body (raw JSON bytes) or the arguments of a page / gradio_client / ``/v1`` call (a dict).

    ``schema`` is :class:`GenerateBody`, :class:`ConversationBody` for ``/v1`` (the same fields and limits, and more),
    :class:`WarmBody` for ``/cache/warm``, :class:`UnpinBody` for ``/cache/unpin``, or :class:`SaveBody` for ``/cache/save``.

    Raises:
        BadRequest: with :func:`describe`'s message.
    """
    try:
        if isinstance(raw, dict):
            return schema.model_validate(raw)
        return schema.model_validate_json(raw)
    except ValidationError as exc:
        raise BadRequest(describe(exc, None if issubclass(schema, GenerateBody) else schema.model_fields)) from None


def describe(error: ValidationError, allowed: Iterable[str] | None = None) -> str:
    """One line per problem, ``field: what is wrong``, without echoing the (maybe huge) input.

    ``allowed`` names the fields an unknown one is refused in favour of (default: ``GenerateBody``'s).
    """
    lines = []
    for item in error.errors(include_url=False, include_input=False, include_context=False):
        where = ".".join(str(part) for part in item["loc"]) or "body"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "missing":
            message = "this field is required"
        elif item["type"] == "extra_forbidden":
            message = "unknown field (allowed: " + ", ".join(GenerateBody.model_fields if allowed is None else allowed) + ")"
        elif item["type"] == "json_invalid":
            message = f"the body is not valid JSON in UTF-8 ({message})"
        lines.append(f"{where}: {message}")
    return "; ".join(lines)


def _printable(value: str) -> str:
    for position, char in enumerate(value):
        if char in _ALLOWED_CONTROLS:
            continue
        category = unicodedata.category(char)
        if category == "Cc":
            raise ValueError(f"control character U+{ord(char):04X} at position {position} is not allowed (only tab and newlines are)")
        if category == "Cs":
            raise ValueError(f"unpaired surrogate U+{ord(char):04X} at position {position} is not valid text")
    return value
