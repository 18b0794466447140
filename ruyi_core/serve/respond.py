"""OpenAI responses from the engine's pieces (engine.Piece): a whole completion, or its server-sent-event stream.
Chat and plain completions differ only in their objects' shapes."""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

from ruyi_core.serve.engine import Piece
from ruyi_core.serve.protocol import (ChatChoice, ChatCompletion, ChatCompletionChunk, ChatMessage, ChunkChoice,
                                      Completion, CompletionChoice, Delta, StreamOptions, Usage)


@dataclass
class Reply:
    """What one response's objects share."""
    model: str
    chat: bool
    n: int
    prompt_tokens: int
    fingerprint: Callable[[], str | None]  # FAMILY:TIER once the answering tier is known
    where: Callable[[], dict] = dict  # `auto`: Usage's computed_at, network_bytes and fallback, once known
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.id = self.id or f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"

    def usage(self, completion_tokens: int) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=self.prompt_tokens + completion_tokens, **self.where())

    def head(self) -> dict:
        return {"id": self.id, "created": self.created, "model": self.model, "system_fingerprint": self.fingerprint()}


async def whole(reply: Reply, pieces: AsyncGenerator[Piece, None]) -> ChatCompletion | Completion:
    texts, finish, tokens = [[] for _ in range(reply.n)], ["length"] * reply.n, [0] * reply.n
    async with aclosing(pieces):
        async for p in pieces:
            texts[p.index].append(p.text)
            tokens[p.index] = p.tokens
            if p.finish:
                finish[p.index] = p.finish
    usage = reply.usage(sum(tokens))
    if reply.chat:
        return ChatCompletion(**reply.head(), usage=usage, choices=[
            ChatChoice(index=i, message=ChatMessage(content="".join(t)), finish_reason=f)
            for i, (t, f) in enumerate(zip(texts, finish))])
    return Completion(**reply.head(), usage=usage, choices=[
        CompletionChoice(index=i, text="".join(t), finish_reason=f) for i, (t, f) in enumerate(zip(texts, finish))])


async def stream(reply: Reply, pieces: AsyncGenerator[Piece, None], options: StreamOptions) -> AsyncIterator[str]:
    """Chunks as server-sent events: for chat, a first one per answer with the role; a piece per chunk, the
    last one of each answer with its finish reason; with `include_usage`, a last chunk with the usage and no
    choices (`continuous_usage_stats`: every chunk with the usage so far); then `data: [DONE]`. An error
    mid-stream (the status line is sent already) is an event too."""
    tokens = [0] * reply.n
    if reply.chat:
        for i in range(reply.n):
            yield _event(_chunk(reply, [ChunkChoice(index=i, delta=Delta(role="assistant", content=""))]))
    try:
        async with aclosing(pieces):  # a client gone mid-stream closes this: its answers stop decoding
            async for p in pieces:
                tokens[p.index] = p.tokens
                usage = reply.usage(sum(tokens)) if options.continuous_usage_stats else None
                yield _event(_chunk(reply, [_choice(reply.chat, p)], usage))
        if options.include_usage:
            yield _event(_chunk(reply, [], reply.usage(sum(tokens))))
    except Exception as e:  # noqa: BLE001 - reported to the client, the server lives on
        yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
    yield "data: [DONE]\n\n"


def _choice(chat: bool, p: Piece) -> ChunkChoice | CompletionChoice:
    if chat:
        return ChunkChoice(index=p.index, delta=Delta(content=p.text or None), finish_reason=p.finish)
    return CompletionChoice(index=p.index, text=p.text, finish_reason=p.finish)


def _chunk(reply: Reply, choices: list, usage: Usage | None = None) -> ChatCompletionChunk | Completion:
    kind = ChatCompletionChunk if reply.chat else Completion
    return kind(**reply.head(), choices=choices, usage=usage)


def _event(obj) -> str:
    return f"data: {obj.model_dump_json()}\n\n"
