"""The OpenAI request bodies the server accepts, as strict pydantic models: an unknown field, a value of the
wrong type or out of range is refused with a 400 whose OpenAI error body names the field (`ApiError`,
`validation_error`). Fields of the OpenAI API the server does not implement are accepted only at their
neutral values (penalties 0, echo false, no logit bias, best_of = n), so a client that sends its defaults
works and one that asks for more is told which field.

Beyond the OpenAI fields, `top_k` (as vLLM takes it: 0 or -1 is off).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_STOPS = 16
MAX_LOGPROBS = 20  # the most alternatives a token lists (SlotConfig.top_logprobs)
SEED_LIMIT = 2 ** 64


class ApiError(Exception):
    """An error answered with the OpenAI error body: status, message, the field it names (param), code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def validation_error(e: ValidationError | Any) -> ApiError:
    """The first problem of a pydantic validation as a 400 naming its field (dotted path in the body)."""
    err = e.errors()[0]
    param = ".".join(str(p) for p in err["loc"] if p != "body") or None
    detail = str(err["msg"]).removeprefix("Value error, ")
    if param is None:  # a check across fields: its message starts with the field it names
        return ApiError(400, detail, detail.split(":")[0] if ":" in detail else None)
    if err["type"] == "extra_forbidden":
        detail = "unknown field"
    elif err["type"] == "missing":
        detail = "field required"
    return ApiError(400, f"{param}: {detail}", param)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Strict):
    include_usage: bool = False


def _stops(v: Any) -> tuple[str, ...]:
    stops = (v,) if isinstance(v, str) else v
    if stops is None:
        return ()
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ValueError("expected a string or a list of strings")
    if len(stops) > MAX_STOPS or any(not s for s in stops):
        raise ValueError(f"expected at most {MAX_STOPS} non-empty strings")
    return tuple(stops)


class Sampling(Strict):
    """The fields completions and chat share."""

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    stop: Any = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted, unused

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, v):
        return _stops(v)

    @model_validator(mode="after")
    def _consistent(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only with stream true")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ValueError(f"{name}: not supported (only 0)")
        if self.logit_bias:
            raise ValueError("logit_bias: not supported (only empty)")
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        return tuple(self.stop or ())


class CompletionRequest(Sampling):
    """POST /v1/completions. prompt: a string, a list of strings, a list of token ids or a list of lists of
    token ids (each one prompt). max_tokens: 16 when not given (OpenAI's default)."""

    prompt: Any
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, v):
        ints = lambda x: isinstance(x, list) and x and all(type(t) is int for t in x)  # noqa: E731
        if isinstance(v, str) or (isinstance(v, list) and v and (all(isinstance(p, str) for p in v) or ints(v)
                                                                 or all(ints(p) for p in v))):
            return v
        raise ValueError("expected a string, a list of strings, a list of token ids or a list of lists of token "
                         "ids (none empty)")

    @model_validator(mode="after")
    def _neutral(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of: only best_of = n is supported")
        if self.echo:
            raise ValueError("echo: not supported (only false)")
        if self.suffix:
            raise ValueError("suffix: not supported (only empty)")
        return self

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompts, as texts or as token id lists."""
        v = self.prompt
        if isinstance(v, str):
            return [v]
        return [v] if type(v[0]) is int else list(v)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(Sampling):
    """POST /v1/chat/completions. max_tokens (or max_completion_tokens): the rest of the model's positions when
    not given."""

    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _one_limit(self):
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("max_completion_tokens: give it or max_tokens, not both")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: only with logprobs true")
        return self

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
