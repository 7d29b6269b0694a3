"""The OpenAI wire format: request bodies (pydantic), their checks, and error bodies.

`CompletionRequest` and `ChatRequest` accept the fields of OpenAI's `/v1/completions` and
`/v1/chat/completions`, plus three that vLLM also takes (`top_k`, `ignore_eos`, `return_token_ids`);
unknown fields are ignored. Fields are typed strictly as JSON types: `true` is no integer and `"5"` no
number (pydantic's lax mode would read them as 1 and 5). Text must be valid Unicode: `check_text`
refuses a lone surrogate (`"\\ud800"` in JSON). `sampling_params` turns a request into the engine's
`SamplingParams` or raises `APIError` (HTTP 400) naming the bad parameter. Errors are sent as OpenAI
sends them: `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr

from .engine import SamplingParams

MAX_STOPS = 4  # as OpenAI
MAX_SEED = 2**63


class APIError(Exception):
    """An error answered with an OpenAI-style JSON body and `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def check_text(text: str, param: str) -> bytes:
    """`text` as UTF-8, or a 400 naming its first lone surrogate (which UTF-8 cannot encode)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad(f"{param} is not valid Unicode text: a lone surrogate U+{ord(text[exc.start]):04X} at character {exc.start}",
                  param) from None


# JSON types, strictly (see the module docstring)
Int, Float, Bool, Str = StrictInt, StrictFloat, StrictBool, StrictStr


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Str | None = None
    temperature: Float | None = None
    top_p: Float | None = None
    top_k: Int | None = None
    n: Int = 1
    stream: Bool = False
    stream_options: dict[str, Any] | None = None
    stop: Str | list[Str] | None = None
    seed: Int | None = None
    presence_penalty: Float | None = None
    frequency_penalty: Float | None = None
    logit_bias: dict[str, Float] | None = None
    user: Str | None = None
    ignore_eos: Bool = False
    return_token_ids: Bool = False


class CompletionRequest(_Request):
    prompt: Str | list[Int] | list[Str] | list[list[Int]]
    max_tokens: Int | None = 16
    echo: Bool = False
    logprobs: Int | None = None
    best_of: Int | None = None
    suffix: Str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Str
    content: Str | list[dict[str, Any]] | None = None


class ChatRequest(_Request):
    messages: list[ChatMessage]
    max_tokens: Int | None = None
    max_completion_tokens: Int | None = None
    logprobs: Bool | None = None
    top_logprobs: Int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


def sampling_params(req: _Request, max_tokens: int, max_n: int) -> SamplingParams:
    """Check the decoding fields shared by both endpoints; `max_tokens` is already resolved."""
    temperature = 1.0 if req.temperature is None else req.temperature
    if not (math.isfinite(temperature) and 0 <= temperature <= 2):
        raise bad(f"temperature must be between 0 and 2 (0: greedy), got {req.temperature}", "temperature")
    if req.top_p is not None and not (math.isfinite(req.top_p) and 0 < req.top_p <= 1):
        raise bad(f"top_p must be in (0, 1], got {req.top_p}", "top_p")
    if req.top_k is not None and req.top_k < -1:
        raise bad(f"top_k must be >= 0 (0 or -1: no limit), got {req.top_k}", "top_k")
    if max_tokens < 1:
        raise bad(f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
    if not 1 <= req.n <= max_n:
        raise bad(f"n must be between 1 and {max_n} (the server's --max-batch-size), got {req.n}", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise bad(f"{name} is not supported by this server", name)
    if req.logit_bias:
        raise bad("logit_bias is not supported by this server", "logit_bias")
    if req.seed is not None and not -MAX_SEED <= req.seed < MAX_SEED:
        raise bad(f"seed must fit in 64 bits, got {req.seed}", "seed")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOPS or any(not s for s in stops):
        raise bad(f"stop must be up to {MAX_STOPS} non-empty strings, got {req.stop!r}", "stop")
    for s in stops:
        check_text(s, "stop")
    top_k = req.top_k if req.top_k and req.top_k > 0 else None
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=req.top_p, top_k=top_k,
                          seed=None if req.seed is None else req.seed % MAX_SEED, stop=stops, ignore_eos=req.ignore_eos)


def check_completion_only(req: CompletionRequest) -> None:
    if req.logprobs is not None:
        raise bad("logprobs is not supported by this server", "logprobs")
    if req.best_of is not None and req.best_of != req.n:
        raise bad("best_of other than n is not supported by this server", "best_of")
    if req.suffix:
        raise bad("suffix is not supported by this server", "suffix")


def check_chat_only(req: ChatRequest) -> None:
    if req.logprobs or req.top_logprobs:
        raise bad("logprobs is not supported by this server", "logprobs")
    if req.tools:
        raise bad("tools are not supported by this server", "tools")
    if req.response_format and req.response_format.get("type") not in (None, "text"):
        raise bad("only response_format {\"type\": \"text\"} is supported", "response_format")
    if not req.messages:
        raise bad("messages must hold at least one message", "messages")


ROLES: dict[str, Literal["system", "user", "assistant"]] = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def chat_messages(req: ChatRequest) -> list[dict[str, str]]:
    """The conversation as `{"role", "content"}` dicts of text for the chat template."""
    out = []
    for i, m in enumerate(req.messages):
        role = ROLES.get(m.role)
        if role is None:
            raise bad(f"messages[{i}].role {m.role!r} is not supported (system, developer, user, assistant)", f"messages[{i}].role")
        content = m.content
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
                parts.append(part["text"])
            content = "".join(parts)
        check_text(content or "", f"messages[{i}].content")
        out.append({"role": role, "content": content or ""})
    return out
