"""The OpenAI wire format: request models (strict: unknown fields and wrong types are a 400 naming
the field), the error body, and the response objects' shapes.

Fields OpenAI defines that this server does not implement are declared so that a request using them
is refused with a message naming the field, rather than silently ignored; their no-op values (a
penalty of 0, `echo: false`, ...) are accepted, since clients send them by default.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from exaone.core.errors import ExaoneError

MAX_N = 128
MAX_LOGPROBS = 20


class ApiError(ExaoneError):
    """An error answered to an HTTP client: status, OpenAI error type, and the field it is about."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class FunctionDef(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class FunctionCall(_Strict):
    name: str
    arguments: str | dict[str, Any]


class MessageToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ContentPart(_Strict):
    type: str
    text: str | None = None
    image_url: Any = None
    input_audio: Any = None
    file: Any = None


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    refusal: str | None = None


class _Sampling(_Strict):
    """What both endpoints share."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    seed: int | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str | int] | None = None
    stop_token_ids: list[int] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False
    # OpenAI fields without an implementation here: only their no-op values pass (check_unsupported).
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None


_NO_OP = {  # field -> the values that mean "off" and so are accepted
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "best_of": (None, 1),
    "echo": (False,),
    "suffix": (None, ""),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "web_search_options": (None,),
    "reasoning_effort": (None,),
    "store": (None, False),
    "service_tier": (None, "auto", "default"),
    "metadata": (None, {}),
}


def check_unsupported(req: BaseModel):
    """A 400 naming the first field set to something this server does not do."""
    for name, ok in _NO_OP.items():
        if name in type(req).model_fields and getattr(req, name) not in ok:
            raise bad_request(f"'{name}' is not supported by this server (got {getattr(req, name)!r})", name)
    fmt = getattr(req, "response_format", None)
    if fmt is not None and fmt != {"type": "text"}:
        raise bad_request(
            '\'response_format\' is not supported by this server (only {"type": "text"}: no guided decoding)',
            "response_format",
        )


def parse_request(body: bytes, model: type[BaseModel]) -> BaseModel:
    """JSON bytes -> a request model; malformed JSON, a non-object, unknown fields or wrong types
    are a 400 naming the field."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON ({e})") from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, not {type(data).__name__}")
    try:
        req = model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None
    check_unsupported(req)
    return req


def validation_error(e: ValidationError) -> ApiError:
    err = e.errors(include_url=False)[0]
    loc = [str(x) for x in err["loc"]]
    # A union's failed branch names its type as a loc element ("str", "list[int]"): drop those.
    loc = [x for x in loc if not (x[:1].islower() and ("[" in x or x in _TYPE_NAMES))] or loc
    where = ".".join(loc)
    if err["type"] == "extra_forbidden":
        return bad_request(f"unknown field '{where}' (not part of this API)", where)
    if err["type"] == "missing":
        return bad_request(f"missing required field '{where}'", where)
    got = err.get("input")
    shown = (
        json.dumps(got)[:80] if isinstance(got, (int, float, str, bool, type(None))) else type(got).__name__
    )
    return bad_request(f"field '{where}': {err['msg']} (got {shown})", where)


_TYPE_NAMES = {"str", "int", "float", "bool", "dict", "list", "literal", "none", "function-after"}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def sse(obj: dict | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()
