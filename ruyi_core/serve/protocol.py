"""The OpenAI API's requests and responses (the parts this server speaks), as pydantic models; errors in
OpenAI's JSON shape. Requests ignore fields they do not use (clients send `user`, `logit_bias`, ...)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

MAX_N = 128  # OpenAI's own bound on `n`


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's: a wrong API key is an `invalid_request_error` too, told apart by its status and code."""
    kind = "not_found_error" if status == 404 else "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _In(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_In):
    include_usage: bool = False  # a last chunk with the usage and no choices
    continuous_usage_stats: bool = False  # vLLM's: every chunk with the usage so far


class SamplingRequest(_In):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)  # None: the package's generation config (greedy)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # answer i samples with seed + i

    @field_validator("n")
    @classmethod
    def _n_needs_sampling(cls, n: int, info: ValidationInfo) -> int:
        if n > 1 and not info.data.get("temperature"):
            raise ValueError(f"n={n} asks for {n} answers, but greedy decoding (temperature 0, the default) gives "
                             "one answer n times: set a temperature above 0 to sample them, or n=1")
        return n

    @field_validator("stop")
    @classmethod
    def _stops_not_empty(cls, stop):
        if stop == "" or (isinstance(stop, list) and "" in stop):
            raise ValueError("a stop string is empty: it would end every answer before it starts")
        return stop

    @field_validator("stream_options")
    @classmethod
    def _options_need_stream(cls, options, info: ValidationInfo):
        if options is not None and not info.data.get("stream"):
            raise ValueError("stream_options goes with stream=true")
        return options

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(SamplingRequest):
    prompt: str


class TextPart(_In):
    type: Literal["text"]
    text: str


class Message(_In):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]  # a list of parts is one text, as OpenAI joins them

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # `auto` in a split deployment: where the answer was computed ("local", or an upstream's URL), the bytes its
    # hand-offs moved, and why this server answered although unsure (its upstream did not answer)
    computed_at: str | None = None
    network_bytes: int | None = None
    fallback: str | None = None
    handoff: str | None = None  # "tokens", "state", or why a state hand-off fell back to tokens


class Continuation(_In):
    """A hand-off (upstream.py): an `auto` request a server of shallower tiers was unsure of, tokens only."""
    model: str
    prompt: list[int] = Field(min_length=1)
    draft: list[int] = Field(min_length=1)
    max_tokens: int = Field(ge=1)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    """A completion, and each chunk of a streamed one (OpenAI uses the one object for both)."""
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None  # FAMILY:TIER, the tier that answered (`auto` routes)
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChunkChoice]
    usage: Usage | None = None
