"""The OpenAI-compatible API on the app's port: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``.

An OpenAI request is checked here for its own shape (roles, ``n``, ``stream_options``, fields
OpenAI has and we do not), then mapped onto the one validation every door uses
(``ui.schemas.parse_body`` with ``ConversationBody``: the same limits as REST and the page) and
run through the same service (session, admission, fairness, cancellation). Nothing here decides
a rule that REST decides differently.

- **Sessions**: ``Authorization: Bearer <session id>`` is how the openai client sends its
  ``api_key``, so an id from ``POST /session`` is the key; no key (``api_key=""``) is anonymous.
- **Messages**: system (and developer) messages before the first turn become the system prompt;
  the turns before the last become the history; the last message must be the user's.
- **cache_salt** (vLLM's field): a prefix-cache namespace of the caller's own session.
- **Repetition control**: ``repetition_penalty`` and ``no_repeat_ngram_size`` as extra body fields
  (vLLM and SGLang take the first; our penalty counts only the reply's tokens, theirs the prompt's
  too), beside OpenAI's own ``frequency_penalty`` and ``presence_penalty`` (over the reply's tokens, as vLLM).
- **Responses** have OpenAI's shapes; ``usage.prompt_tokens_details.cached_tokens`` is the number
  of prompt tokens reused from the prefix cache; our cache status and timings are under ``"kvci"``.
- **Errors**: ``{"error": {"message", "type", "param", "code"}}`` with a 4xx (429 busy, 503 loading).
- **Streaming**: server-sent events; the usage chunk last when asked for, then ``data: [DONE]``.
  A client that disconnects, streaming or not, cancels its generation.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine import GenerationResult
from ui.limits import MAX_NEW_TOKENS, MAX_PROMPT_CHARS, RETRY_AFTER
from ui.schemas import BadRequest, ConversationBody, describe, parse_body
from ui.service import Busy, EngineService, Job, NotReady
from ui.sessions import ID_RULE, BadSession, SessionIssuer

EXTRA_KEY = "kvci"  # our cache status and timings, beside OpenAI's fields
OWNED_BY = "kv-cache-inference"
# Our field names in validation messages, as the client named them.
_CLIENT_NAMES = {"max_new_tokens": "max_tokens", "system_prompt": "messages", "history": "messages", "prompt": "prompt"}


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(None, max_length=256)

    def text(self) -> str:
        if self.content is None:
            raise ValueError(f"a {self.role} message needs content (tool calls are not supported)")
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = Field(False, strict=True)


class _Common(BaseModel):
    """Fields both endpoints take. Unknown fields are refused; a few OpenAI fields pass at their neutral value."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=512)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = 1.0  # OpenAI's default
    top_p: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = Field(False, strict=True)  # "yes", 1 or "true" are refused, not read as true
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    n: int = 1
    cache_salt: str | None = Field(None, min_length=1, max_length=256)
    # vLLM's and SGLang's extra sampling fields, checked (strictly, with their bounds) by ConversationBody. Our
    # repetition_penalty counts only the reply's tokens (engine/sampling.py); theirs counts the prompt's too.
    repetition_penalty: float = Field(1.0, strict=True)
    no_repeat_ngram_size: int = Field(0, strict=True)
    frequency_penalty: float = Field(0.0, strict=True)
    presence_penalty: float = Field(0.0, strict=True)
    logprobs: Literal[False] | None = None


class ChatBody(_Common):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionBody(_Common):
    prompt: str | list[str]


class ApiError(Exception):
    """An OpenAI error: status, message, type, param, code."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type_, param, code, headers

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), status_code=self.status, headers=self.headers)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error body."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def add_openai_routes(api: FastAPI, service: EngineService, issuer: SessionIssuer) -> None:
    """Add the /v1 routes to the REST app, behind its Guard (host, origin, JSON, body cap, methods).

    Added on the app itself, not as an included router: the Guard reads ``api.routes`` for the
    methods each path allows, and an included router's routes are not listed there.
    """
    router = api

    @router.get("/v1/models", tags=["OpenAI-compatible"])
    def list_models() -> JSONResponse:
        """The one model this app serves."""
        return JSONResponse({"object": "list", "data": [_model_card(service)] if service.ready else []})

    @router.post("/v1/chat/completions", openapi_extra=_schema(ChatBody), tags=["OpenAI-compatible"])
    async def chat_completions(request: Request):
        """OpenAI's chat completions: messages, max_tokens, temperature, top_p, seed, stop, stream, cache_salt."""
        return await _serve(service, issuer, request, ChatBody, "chat.completion")

    @router.post("/v1/completions", openapi_extra=_schema(CompletionBody), tags=["OpenAI-compatible"])
    async def completions(request: Request):
        """OpenAI's (legacy) completions: a raw prompt, no chat template."""
        return await _serve(service, issuer, request, CompletionBody, "text_completion")


# ---------------------------------------------------------------------- one request


async def _serve(service: EngineService, issuer: SessionIssuer, request: Request, schema: type[_Common], kind: str):
    try:
        body = _parse(await request.body(), schema)
        _check_model(service, body.model)
        try:
            engine_body = parse_body(_engine_fields(body), ConversationBody)
        except BadRequest as exc:
            raise ApiError(400, _client_names(str(exc))) from None
        try:
            session = issuer.resolve_request(request)
        except BadSession as exc:
            raise ApiError(401, f"the api_key is a session id: {ID_RULE} ({exc})", code="invalid_api_key") from None
        job = _start(service, session, engine_body, body.cache_salt)
        reply = _Reply(kind, _served_model(service), include_usage=bool(body.stream_options and body.stream_options.include_usage))
        if body.stream:
            items = job.aiter()
            first = await _first(items, job)  # a prompt too long for the context fails here, before the 200
            return StreamingResponse(_events(reply, job, first, items), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        result = await _finish(job, request)
    except ApiError as exc:
        return exc.response()
    if result is None:
        return ApiError(499, "the client closed the request", code="client_closed").response()  # nobody reads it: the work stopped
    return JSONResponse(reply.whole(result))


def _parse(raw: bytes, schema: type[_Common]) -> _Common:
    try:
        body = schema.model_validate_json(raw)
    except ValidationError as exc:
        unknown = [str(e["loc"][0]) for e in exc.errors() if e["type"] == "extra_forbidden" and len(e["loc"]) == 1]
        if unknown:
            raise ApiError(400, f"Unrecognized request argument supplied: {', '.join(unknown)}", param=unknown[0]) from None
        raise ApiError(400, describe(exc, allowed=schema.model_fields), param=_first_param(exc)) from None
    if body.n != 1:
        raise ApiError(400, f"n must be 1: this server returns one choice per request (got n={body.n})", param="n")
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options is only allowed when stream is true", param="stream_options")
    if body.max_tokens is not None and body.max_completion_tokens is not None and body.max_tokens != body.max_completion_tokens:
        raise ApiError(400, "max_tokens and max_completion_tokens differ; send one of them", param="max_completion_tokens")
    return body


def _engine_fields(body: _Common) -> dict[str, Any]:
    """The OpenAI request as ``ConversationBody`` fields; raises ApiError for what has no mapping."""
    fields: dict[str, Any] = {
        "max_new_tokens": next((n for n in (body.max_completion_tokens, body.max_tokens) if n is not None), MAX_NEW_TOKENS),
        "repetition_penalty": body.repetition_penalty,
        "no_repeat_ngram_size": body.no_repeat_ngram_size,
        "frequency_penalty": body.frequency_penalty,
        "presence_penalty": body.presence_penalty,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "seed": body.seed,
        "stop": [body.stop] if isinstance(body.stop, str) else list(body.stop or []),
    }
    if isinstance(body, CompletionBody):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, f"prompt must be one string (or a list of one): this server returns one choice per request (got {len(prompts)})", param="prompt")
        return fields | {"prompt": prompts[0], "raw": True}
    try:
        return fields | _conversation(body.messages)
    except ValueError as exc:
        raise ApiError(400, str(exc), param="messages") from None


def _conversation(messages: list[ChatMessage]) -> dict[str, Any]:
    """System (and developer) messages first, then turns ending with the user's: system_prompt, history, prompt."""
    leading = 0
    while leading < len(messages) and messages[leading].role in ("system", "developer"):
        leading += 1
    turns = messages[leading:]
    if any(m.role in ("system", "developer") for m in turns):
        raise ValueError("system and developer messages must come before the conversation's first user or assistant message")
    if not turns or turns[-1].role != "user":
        raise ValueError("the last message must be the user's")
    system = "\n\n".join(m.text() for m in messages[:leading])
    if len(system) > MAX_PROMPT_CHARS:
        raise ValueError(f"the system messages are {len(system)} characters together, more than {MAX_PROMPT_CHARS}")
    return {
        "system_prompt": system or None,
        "history": [{"role": m.role, "content": m.text()} for m in turns[:-1]],
        "prompt": turns[-1].text(),
    }


def _start(service: EngineService, session: Any, body: ConversationBody, cache_salt: str | None) -> Job:
    try:
        return service.stream(session, cache_salt=cache_salt, **body.engine_kwargs())
    except NotReady as exc:
        raise ApiError(503, str(exc), type_="server_error", code="model_loading", headers=RETRY_AFTER) from None
    except Busy as exc:
        raise ApiError(429, str(exc), type_="rate_limit_error", code="rate_limit_exceeded", headers=RETRY_AFTER) from None
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None


async def _first(items: AsyncIterator[str | GenerationResult], job: Job) -> str | GenerationResult:
    try:
        return await items.__anext__()
    except (ValueError, NotReady) as exc:
        job.cancel()
        raise _job_error(exc) from None


async def _finish(job: Job, request: Request) -> GenerationResult | None:
    try:
        return await job.aresult_unless(request.is_disconnected)
    except (ValueError, NotReady) as exc:
        raise _job_error(exc) from None


def _job_error(exc: Exception) -> ApiError:
    """A job's error: the caller's input (400), or a backend that stopped answering (503)."""
    if isinstance(exc, NotReady):
        return ApiError(503, str(exc), type_="server_error", code="backend_unavailable", headers=RETRY_AFTER)
    return ApiError(400, str(exc))


async def _events(reply: "_Reply", job: Job, first: str | GenerationResult, items: AsyncIterator[str | GenerationResult]) -> AsyncIterator[bytes]:
    """The SSE body. A disconnect cancels this generator, and the finally cancels the job."""
    try:
        yield _sse(reply.chunk(role=True))
        item = first
        while True:
            if isinstance(item, GenerationResult):
                for chunk in reply.closing(item):
                    yield _sse(chunk)
                break
            if item:
                yield _sse(reply.chunk(text=item))
            try:
                item = await items.__anext__()
            except StopAsyncIteration:
                break
            except Exception as exc:  # the headers are sent: the error goes in the stream
                yield _sse(error_body(str(exc) if isinstance(exc, ValueError) else "the generation failed", "invalid_request_error" if isinstance(exc, ValueError) else "server_error"))
                break
        yield b"data: [DONE]\n\n"
    finally:
        job.cancel()  # no-op after a normal end


class _Reply:
    """OpenAI's response shapes for one request (chat or text completion, whole or in chunks)."""

    def __init__(self, kind: str, model: str, include_usage: bool) -> None:
        self.kind, self.model, self.include_usage = kind, model, include_usage
        self.id = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    @property
    def chat(self) -> bool:
        return self.kind == "chat.completion"

    def whole(self, result: GenerationResult) -> dict[str, Any]:
        finish = _finish_reason(result)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text, "refusal": None}, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": finish}
        return {**self._head(self.kind), "choices": [choice], "usage": usage(result), EXTRA_KEY: extra(result)}

    def chunk(self, text: str = "", role: bool = False, finish: str | None = None) -> dict[str, Any]:
        if self.chat:
            delta = ({"role": "assistant", "content": ""} if role else {"content": text}) if finish is None else {}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {**self._head(self.kind + ".chunk" if self.chat else self.kind), "choices": [choice], **({"usage": None} if self.include_usage else {})}

    def closing(self, result: GenerationResult) -> list[dict[str, Any]]:
        """The finish chunk, then (when asked for) the usage chunk; our extras on the last of them."""
        chunks = [self.chunk(finish=_finish_reason(result))]
        if self.include_usage:
            chunks.append({**self._head(self.kind + ".chunk" if self.chat else self.kind), "choices": [], "usage": usage(result)})
        chunks[-1][EXTRA_KEY] = extra(result)
        return chunks

    def _head(self, object_: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model, "system_fingerprint": None}


def usage(result: GenerationResult) -> dict[str, Any]:
    """OpenAI's usage: cached_tokens is the prompt tokens reused from the prefix cache (0 on a miss)."""
    prompt, completion = int(result.timings["prompt_tokens"]), int(result.timings["new_tokens"])
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": int(result.timings["prefix_tokens_saved"])},
    }


def extra(result: GenerationResult) -> dict[str, Any]:
    """Our fields beside OpenAI's: cache status, timings, and why the prefix cache reused what it did."""
    return {"cache_status": result.cache_status, "timings": dict(result.timings), "cache_explanation": result.cache_explanation}


# ---------------------------------------------------------------------- helpers


def _finish_reason(result: GenerationResult) -> str:
    return "length" if result.finish_reason == "length" else "stop"  # "eos" and our stop strings are both "stop"


def _served_model(service: EngineService) -> str:
    return service.backend_info().model or "unknown"


def _model_card(service: EngineService) -> dict[str, Any]:
    return {"id": _served_model(service), "object": "model", "created": 0, "owned_by": OWNED_BY}


def _check_model(service: EngineService, model: str) -> None:
    if not service.ready:
        raise ApiError(503, service.not_ready_reason(), type_="server_error", code="model_loading", headers=RETRY_AFTER)
    served = _served_model(service)
    if model != served:
        raise ApiError(404, f"The model `{model[:100]}` does not exist. This server serves `{served}` (GET /v1/models).", param="model", code="model_not_found")


def _client_names(message: str) -> str:
    for ours, theirs in _CLIENT_NAMES.items():
        message = message.replace(f"{ours}:", f"{theirs}:")
    return message


def _first_param(exc: ValidationError) -> str | None:
    errors = exc.errors()
    return str(errors[0]["loc"][0]) if errors and errors[0]["loc"] else None


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _schema(model: type[BaseModel]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}
