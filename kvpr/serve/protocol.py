"""The OpenAI API's request bodies as pydantic models, and the one-line errors the server returns.

Fields the API defines but kvpr does not implement are declared, so that a client sending their
neutral values is served and one asking for them gets a 400 naming the field; unknown fields are
refused too (a misspelt ``max_token`` would otherwise be ignored silently).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOPS = 4  # as OpenAI's API


class ApiError(Exception):
    """An error the client gets as ``{"error": {...}}`` with an HTTP status and one line of text."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


def validation_message(error: ValidationError | list[dict[str, Any]]) -> str:
    """pydantic's first complaint as one line: ``field.sub: what is wrong``."""
    errors = error.errors() if isinstance(error, ValidationError) else error
    if not errors:
        return "invalid request body"
    first = errors[0]
    location = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    if first.get("type") == "json_invalid":
        return f"request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
    if first.get("type") == "extra_forbidden":
        return f"unknown field '{location}': kvpr implements the fields of the OpenAI API only"
    message = str(first.get("msg", "invalid value")).splitlines()[0]
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{location or 'body'}: {message}{more}"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(extra="forbid")

    model: str
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool = False  # kvpr's (and vLLM's) extension: always generate max_tokens tokens

    @field_validator("stop")
    @classmethod
    def _check_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        if any(not stop for stop in stops):
            raise ValueError("a stop sequence is empty")
        return value

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def unsupported(self) -> list[tuple[str, str]]:
        """(field, why) for each field set to something kvpr does not implement."""
        found = []
        if self.presence_penalty or self.frequency_penalty:
            found.append(("presence_penalty", "presence and frequency penalties are not implemented: leave them 0"))
        if self.logit_bias:
            found.append(("logit_bias", "logit_bias is not implemented: leave it out"))
        if self.stream_options is not None and not self.stream:
            found.append(("stream_options", "stream_options needs stream: true"))
        return found


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: text (or token ids) continued."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompts as a list: strings, or token-id lists."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise ApiError(400, "prompt is empty: give a string, a list of strings or of token ids", param="prompt")
        if all(isinstance(item, int) for item in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]

    def unsupported(self) -> list[tuple[str, str]]:
        found = super().unsupported()
        if self.echo:
            found.append(("echo", "echo is not implemented: leave it false"))
        if self.suffix:
            found.append(("suffix", "suffix (insertion) is not implemented: leave it out"))
        if self.logprobs is not None:
            found.append(("logprobs", "logprobs are not implemented: leave them out"))
        if self.best_of is not None and self.best_of != self.n:
            found.append(("best_of", "best_of is not implemented: leave it out or equal to n"))
        return found


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str = "text"


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``: the messages in the model's chat template, answered."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def unsupported(self) -> list[tuple[str, str]]:
        found = super().unsupported()
        if self.logprobs or self.top_logprobs:
            found.append(("logprobs", "logprobs are not implemented: leave them out"))
        if self.response_format is not None and self.response_format.type != "text":
            found.append(("response_format", "only response_format type 'text' is implemented"))
        if self.tools or (self.tool_choice not in (None, "none")):
            found.append(("tools", "tool calls are not implemented: leave tools out"))
        return found
