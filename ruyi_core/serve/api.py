"""The OpenAI-compatible HTTP API over a served family (FastAPI): /v1/models, /v1/completions and
/v1/chat/completions, with server-sent-event streaming, and an open /health. Models are `<family>:<tier>`;
sampling defaults to the package's generation config (greedy), as vLLM does. Errors are OpenAI's JSON shape
with a 4xx status. The routes only parse, call the engine (engine.py) and shape its answers (respond.py)."""
from __future__ import annotations

import asyncio
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ruyi_core.serve.engine import Engine
from ruyi_core.serve.guard import Guard
from ruyi_core.serve.handoff import STATE_PATH, TRUNK_PATH, decode, state_bytes_per_token
from ruyi_core.serve.protocol import (ApiError, ChatCompletionRequest, CompletionRequest, Continuation,
                                      SamplingRequest, StreamOptions, error_body)
from ruyi_core.serve.respond import Reply, stream, whole
from ruyi_core.serve.split import SPLIT_PATH, Busy, Session
from ruyi_core.serve.tiers import ServedFamily
from ruyi_core.serve.upstream import PATH, Upstream

BYTES_PER_TOKEN = 32  # the body bound per context token: past any prompt that fits, even as escaped JSON
MIN_BODY = 1 << 20


def create_app(family: ServedFamily, max_batch: int = 8, default_max_tokens: int = 256,
               draft: str | None = None, draft_tokens: int = 4, auto_threshold: float | None = None,
               api_key: str | None = None, max_body_bytes: int | None = None,
               upstream: Upstream | None = None, draft_skip: int = 0, draft_min_p: float = 0.0) -> FastAPI:
    """The app over one engine (see Engine for `draft` and `auto_threshold`). `api_key`: /v1 answers only
    requests bearing it. `max_body_bytes`: the largest request body read (default: 32 bytes per token of
    the longest context, at least 1 MiB). `upstream`, `draft_skip`, `draft_min_p`: see Engine."""
    engine = Engine(family, max_batch, default_max_tokens, draft, draft_tokens, auto_threshold, upstream,
                    draft_skip, draft_min_p)
    app = FastAPI(title=f"ruyi serve: {family.name}")
    app.state.engine = engine
    app.router.on_shutdown.append(engine.close)
    bound = max_body_bytes or max(MIN_BODY, BYTES_PER_TOKEN * engine.longest_context)
    shallowest = family.tiers[next(iter(family.tiers))]
    # a state hand-off: the whole trunk of the shallowest tier for a full context, and the ids
    state = bound + engine.longest_context * state_bytes_per_token(shallowest, len(shallowest.model.layers))
    split = bound + engine.longest_context * state_bytes_per_token(shallowest, 0, kv=False)
    app.add_middleware(Guard, api_key=api_key, max_body=bound,
                       larger={"/v1" + STATE_PATH: state, "/v1" + SPLIT_PATH: split})
    _errors(app)
    _routes(app, engine)
    return app


def _errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(error_body(exc.status, exc.message, exc.param, exc.code), exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        err = exc.errors()[0]
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            return JSONResponse(error_body(400, "the request body is not valid JSON", None, "invalid_request"), 400)
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        return JSONResponse(error_body(400, f"{'.'.join(loc) or 'body'}: {msg}", loc[0] if loc else None,
                                       "invalid_request"), 400)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):  # unknown paths and methods
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), exc.status_code, headers=exc.headers)


def _routes(app: FastAPI, engine: Engine) -> None:
    name, created = engine.family.name, int(time.time())

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": f"{name}:{t}", "object": "model", "created": created,
                                            "owned_by": "ruyi", "root": name} for t in engine.names]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        engine.tier_of(req.model)  # an unknown model is refused before its prompt is tokenized
        return await _answer(engine, req, request, await engine.prompt_ids(req.prompt), req.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        engine.tier_of(req.model)
        ids = await engine.chat_ids([{"role": m.role, "content": m.text} for m in req.messages])
        return await _answer(engine, req, request, ids, req.max_completion_tokens or req.max_tokens, chat=True)

    @app.post("/v1" + PATH)
    async def continuation(req: Continuation):
        """A hand-off from a server of shallower tiers (upstream.py): the answer's token ids and tier."""
        return await _continue(engine, req, None, "tokens")

    @app.post("/v1" + STATE_PATH)
    async def continuation_state(request: Request):
        """A trunk-state hand-off (handoff.py): checked whole before any tensor is made."""
        req, got = await _handoff(engine, request, kv=True)
        how = "state" if got.read is not None else f"tokens: {got.mismatch}"
        return await _continue(engine, req, got.read, how)

    @app.post("/v1" + SPLIT_PATH)
    async def split_open(request: Request):
        """A split hand-off (split.py): the states of the prompt and draft where the servers part."""
        req, got = await _handoff(engine, request, kv=False)
        if got.read is None:
            return {**await _continue(engine, req, None, f"tokens: {got.mismatch}"), "done": True}
        _check(engine, req)
        tier = next(iter(engine.family.tiers))
        try:
            sid, session, new = await asyncio.to_thread(engine.sessions.open, tier, engine.family.tiers[tier],
                                                        req.model_dump(), got.read, engine.family.eos)
        except Busy as e:
            raise ApiError(503, f"busy: {e}; hand over tokens (POST /v1{PATH}) or retry", None, "busy") from None
        return await _split_progress(engine, sid, session, new)

    @app.post("/v1" + SPLIT_PATH + "/{sid}")
    async def split_step(sid: str, request: Request):
        """One token of a split session: the state of the answer's last token in, the next token out."""
        try:
            session = await asyncio.to_thread(engine.sessions.step, sid, await request.body())
        except KeyError:
            raise ApiError(404, "no such split session (finished, or idle too long): hand the request over "
                                "again", "session", "session_not_found") from None
        except ValueError as e:
            raise ApiError(400, f"malformed split step: {e}", "state") from None
        return await _split_progress(engine, None if session.done else sid, session, 1)

    @app.get("/v1" + TRUNK_PATH)
    async def trunk():
        """What a server of shallower tiers needs to hand over state: this server's digest chain (of its
        shallowest tier), the dtype of its states and its seconds per block-token."""
        shallowest = next(iter(engine.family.tiers))
        model = engine.family.tiers[shallowest]
        chain, (read_s, step_s) = await asyncio.to_thread(lambda: (engine.chain(shallowest),
                                                                   engine.block_seconds()))
        return {"digests": chain, "dtype": str(model.dtype).removeprefix("torch."), "block_token_s": read_s,
                "block_step_s": step_s}


async def _handoff(engine: Engine, request: Request, kv: bool):
    """A state or split hand-off's request and what it holds, checked whole before any tensor is made."""
    shallowest = next(iter(engine.family.tiers))
    try:
        got = await asyncio.to_thread(decode, await request.body(), engine.family.tiers[shallowest],
                                      engine.chain(shallowest), kv)
        return Continuation(**got.request), got
    except (ValueError, TypeError) as e:  # pydantic's ValidationError and JSON errors are ValueErrors
        raise ApiError(400, f"malformed {'state' if kv else 'split'} hand-off: {str(e).splitlines()[0]}",
                       "state") from None


async def _split_progress(engine: Engine, sid: str | None, session: Session, new: int) -> dict:
    """A split session's new tokens and the position of the state it needs next; once done, the answer (handed
    on as tokens when this server's tier was unsure and deeper tiers are here or further up)."""
    if sid is not None:
        return {"done": False, "session": sid, "tokens": session.tokens[-new:], "at": session.at}
    further = len(engine.family.tiers) > 1 or engine.upstream is not None
    if further and min(session.confidence) < engine.auto_threshold:
        req = Continuation(**{**session.request, "draft": session.tokens})
        return {**await _continue(engine, req, None, "split"), "done": True}
    return {"done": True, "tier": session.tier, "tokens": session.tokens, "computed_at": "local",
            "network_bytes": 0, "fallback": None, "handoff": "split"}


def _check(engine: Engine, req: Continuation) -> None:
    if engine.tier_of(req.model) != "auto":
        raise ApiError(400, f"hand-offs continue {engine.family.name}:auto, not {req.model}", "model")
    vocab = engine.family.tiers[engine.family.deepest].config.vocab_size
    if not all(0 <= t < vocab for t in [*req.prompt, *req.draft]) or len(req.draft) > req.max_tokens:
        raise ApiError(400, f"prompt and draft are token ids below {vocab}, the draft at most max_tokens long",
                       "draft")


async def _continue(engine: Engine, req: Continuation, read, handoff: str) -> dict:
    _check(engine, req)
    job = engine.submit(req.model, req.prompt, req.max_tokens, 0.0, None, draft=req.draft, read=read)[0]
    tokens = await engine.tokens(job)
    return {"tier": job.answered_by, "tokens": tokens, "computed_at": job.computed_at,
            "network_bytes": job.network_bytes, "fallback": job.fallback,
            "handoff": handoff + (f", then {job.handoff}" if job.handoff else "")}


async def _answer(engine: Engine, req: SamplingRequest, request: Request, ids: list[int], max_tokens: int | None,
                  chat: bool):
    jobs = engine.submit(req.model, ids, max_tokens, req.temperature, req.seed, req.n)
    answered = jobs[0]
    where = (lambda: {"computed_at": answered.computed_at, "network_bytes": answered.network_bytes,
                      "fallback": answered.fallback, "handoff": answered.handoff}
             ) if answered.tier == "auto" else dict
    reply = Reply(req.model, chat, req.n, len(ids),
                  lambda: answered.answered_by and f"{engine.family.name}:{answered.answered_by}", where)
    pieces = engine.pieces(jobs, req.stops, request.is_disconnected)
    if req.stream:
        return StreamingResponse(stream(reply, pieces, req.stream_options or StreamOptions()),
                                 media_type="text/event-stream")
    return await whole(reply, pieces)
