"""The OpenAI-compatible HTTP API over a served family (FastAPI): /v1/models, /v1/completions and
/v1/chat/completions, with server-sent-event streaming. Models are `<family>:<tier>`; sampling defaults to
the package's generation config (greedy), as vLLM does. Errors are OpenAI's JSON shape with a 4xx status."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ruyi_core.serve.batcher import DONE, Batcher, Job
from ruyi_core.serve.tiers import ServedFamily


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (user, logit_bias, ...)
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None


class CompletionRequest(_Request):
    prompt: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "not_found_error" if status == 404 else "invalid_request_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    if err.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    return f"{'.'.join(loc) or 'body'}: {err.get('msg')}", (loc[0] if loc else None)


def create_app(family: ServedFamily, max_batch: int = 8, default_max_tokens: int = 256,
               draft: str | None = None, draft_tokens: int = 4, auto_threshold: float | None = None) -> FastAPI:
    """`draft`: greedy requests to deeper tiers are decoded self-speculatively with this tier drafting
    `draft_tokens` at a time (one request at a time; same tokens, fewer passes through the deep blocks).
    `FAMILY:auto` routes each request (route.py) at `auto_threshold` (default: the family's calibrated
    operating point, else 0.5)."""
    from ruyi_core.serve.decode import SpecStats, generate, speculative
    from ruyi_core.serve.route import answer

    app = FastAPI(title=f"ruyi serve: {family.name}")
    tok = family.tokenizer
    app.state.spec_stats = SpecStats()

    routing = family.routing or {}
    threshold = auto_threshold if auto_threshold is not None else routing.get("operating_point", {}).get(
        "threshold", 0.5)
    app.state.auto_threshold = threshold

    def run(tier, jobs, on_token):
        if tier == "auto":  # a batch escalates together, tier by tier
            for i, (j, a) in enumerate(zip(jobs, answer(family, [j.prompt for j in jobs],
                                                         [j.max_new_tokens for j in jobs], threshold))):
                j.answered_by = a.tier
                for t in a.tokens:
                    if on_token(i, t):
                        break
            return
        model, temperature = family.tiers[tier], jobs[0].temperature
        for j in jobs:
            j.answered_by = tier
        if draft is None or temperature > 0 or family.depth(tier) <= family.depth(draft):
            generate(model, [j.prompt for j in jobs], [j.max_new_tokens for j in jobs], family.eos,
                     temperature=temperature, seed=jobs[0].seed, on_token=on_token)
            return
        for i, j in enumerate(jobs):
            speculative(family.tiers[draft], model, j.prompt, j.max_new_tokens, family.eos, k=draft_tokens,
                        stats=app.state.spec_stats, on_token=lambda t, i=i: on_token(i, t))

    batcher = Batcher(run, max_batch)
    app.state.family, app.state.batcher = family, batcher
    app.router.on_shutdown.append(batcher.close)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        msg, param = _validation_message(exc)
        return _error(400, msg, param, "invalid_request")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": f"{family.name}:{t}", "object": "model", "created": created,
                                            "owned_by": "ruyi", "root": family.name} for t in names]}

    names = [*family.tiers, *(["auto"] if len(family.tiers) > 1 else [])]

    def tier_of(model: str) -> str:
        fam, _, tier = model.partition(":")
        if fam != family.name or tier not in names:
            have = ", ".join(f"{family.name}:{t}" for t in names)
            raise ApiError(404, f"the model {model!r} does not exist: this server has {have}", "model",
                           "model_not_found")
        return tier

    def job(req: _Request, ids: list[int], max_tokens: int | None) -> Job:
        tier = tier_of(req.model)
        limit = min(m.config.max_position_embeddings for t, m in family.tiers.items() if tier in (t, "auto"))
        max_new = max_tokens or min(default_max_tokens, max(limit - len(ids), 1))
        if len(ids) + max_new > limit:
            raise ApiError(400, f"this model's maximum context length is {limit} tokens; the request has "
                                f"{len(ids)} prompt tokens and asks for {max_new} more: shorten the prompt or "
                                "lower max_tokens", "max_tokens", "context_length_exceeded")
        temperature = req.temperature if req.temperature is not None else 0.0
        return batcher.submit(Job(tier, ids, max_new, temperature, req.seed, asyncio.get_running_loop()))

    async def tokens(j: Job, request: Request, stops: list[str]):
        """(text so far, finish reason or None) after each token; stops the job on a stop string or when
        the client goes away."""
        got: list[int] = []
        while (item := await j.out.get()) is not DONE:
            if isinstance(item, Exception):
                raise item
            got.append(item)
            text = tok.decode(got, skip_special_tokens=True)
            cut = min((text.find(s) for s in stops if s in text), default=-1)
            if cut >= 0:
                j.stop.set()
                yield text[:cut], "stop", len(got)
                await _drain(j)
                return
            if await request.is_disconnected():
                j.stop.set()
            yield text, None, len(got)
        finish = "stop" if got and got[-1] in family.eos else "length"
        yield tok.decode(got, skip_special_tokens=True), finish, len(got)

    async def respond(req: _Request, request: Request, ids: list[int], max_tokens: int | None, chat: bool):
        j = job(req, ids, max_tokens)
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        base = {"id": rid, "created": int(time.time()), "model": req.model}
        if req.stream:
            return StreamingResponse(_stream(base, tokens(j, request, stops), chat), media_type="text/event-stream")
        text, finish, n = "", "length", 0
        async for text, finish, n in tokens(j, request, stops):
            pass
        base["system_fingerprint"] = f"{family.name}:{j.answered_by}"  # the tier that answered
        usage = {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                  if chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
        return {**base, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                "usage": usage}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await respond(req, request, tok(req.prompt)["input_ids"], req.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        msgs = [m.model_dump() for m in req.messages]
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return await respond(req, request, tok(text)["input_ids"], req.max_completion_tokens or req.max_tokens,
                             chat=True)

    return app


async def _drain(j: Job) -> None:
    while (await j.out.get()) is not DONE:
        pass


async def _stream(base: dict, parts, chat: bool):
    """Server-sent events in OpenAI's chunk format, then `data: [DONE]`."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    sent = ""

    def chunk(delta: str, finish: str | None, first: bool = False) -> str:
        if chat:
            d = ({"role": "assistant"} if first else {}) | ({"content": delta} if delta or first else {})
            choice = {"index": 0, "delta": d, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish}
        return f"data: {json.dumps({**base, 'object': obj, 'choices': [choice]})}\n\n"

    yield chunk("", None, first=True)
    try:
        async for text, finish, _ in parts:
            if text.endswith("\ufffd") and finish is None:
                continue  # half of a multi-byte character: wait for the rest
            delta, sent = text[len(sent):], text
            if delta or finish:
                yield chunk(delta, finish)
    except Exception as e:  # noqa: BLE001 - the status line is gone already: say it in the stream
        yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
    yield "data: [DONE]\n\n"
