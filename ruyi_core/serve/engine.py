"""The serving engine: what the HTTP routes call. It names the models, builds prompts, checks a request against
the context, hands its answers to the batcher (batcher.py) and turns their tokens into text as they come:
decoding a batch of one tier (decode.generate), self-speculatively through a shallower tier
(decode.speculative), or routed over the tiers (`auto`, route.py)."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from ruyi_core.family.tensors import digests
from ruyi_core.serve.batcher import DONE, Batcher, Job
from ruyi_core.serve.decode import SpecStats, generate, speculative
from ruyi_core.serve.detok import Detokenizer, StopStrings
from ruyi_core.serve.handoff import common_depth, measure_block, state_bytes_per_token
from ruyi_core.serve.protocol import ApiError
from ruyi_core.serve.route import escalate
from ruyi_core.serve.specbatch import speculative_batch
from ruyi_core.serve.split import Sessions, trunk_step
from ruyi_core.serve.tiers import ServedFamily
from ruyi_core.serve.upstream import REFRESH_S, Unreachable, Upstream


@dataclass
class Piece:
    """New text of one answer (the request's `index`-th), with its finish reason once it is done."""
    index: int
    text: str
    finish: str | None
    tokens: int  # the answer's tokens so far


class _Answer:
    """One answer's text as its tokens come: detokenized, cut at stop strings."""

    def __init__(self, job: Job, tokenizer, stops: list[str]):
        self.job, self.detok, self.stops = job, Detokenizer(tokenizer), StopStrings(stops)
        self.tokens, self.last, self.done = 0, None, False

    def token(self, t: int) -> Piece | None:
        self.tokens, self.last = self.tokens + 1, t
        text, stopped = self.stops.push(self.detok.push(t))
        if stopped:
            self.job.stop.set()
            return self._end(text, "stop")
        return Piece(self.job.index, text, None, self.tokens) if text else None

    def end(self, eos: set[int]) -> Piece:
        text, stopped = self.stops.push(self.detok.flush())
        if stopped:
            return self._end(text, "stop")
        return self._end(text + self.stops.flush(), "stop" if self.last in eos else "length")

    def _end(self, text: str, finish: str) -> Piece:
        self.done = True
        return Piece(self.job.index, text, finish, self.tokens)


class Engine:
    def __init__(self, family: ServedFamily, max_batch: int = 8, default_max_tokens: int = 256,
                 draft: str | None = None, draft_tokens: int = 4, auto_threshold: float | None = None,
                 upstream: Upstream | None = None, draft_skip: int = 0, draft_min_p: float = 0.0):
        """`draft`: greedy requests to deeper tiers are decoded self-speculatively with this tier drafting
        `draft_tokens` at a time (concurrent requests as one batch; same tokens, fewer passes through the deep
        blocks).
        `FAMILY:auto` routes each request (route.py) at `auto_threshold` (default: the family's calibrated
        operating point, else 0.5). `upstream`: a server of deeper tiers that `auto` hands on to when this
        server's deepest tier is unsure (upstream.py). `draft_skip`, `draft_min_p`: the draft leaves out its last
        blocks, and a round stops at a token it doubts (decode.speculative)."""
        self.family, self.tok = family, family.tokenizer
        self.default_max_tokens, self.draft, self.draft_tokens = default_max_tokens, draft, draft_tokens
        self.draft_skip, self.draft_min_p = draft_skip, draft_min_p
        point = (family.routing or {}).get("operating_point", {})
        self.auto_threshold = auto_threshold if auto_threshold is not None else point.get("threshold", 0.5)
        self.spec_stats, self.upstream = SpecStats(), upstream
        self._chains: dict[str, list[str]] = {}
        self._block_s: tuple[float, float, float] | None = None  # when measured, and the two speeds
        self.sessions = Sessions()
        self.names = [*family.tiers, "auto"]
        self.batcher = Batcher(self._run, max_batch)

    def close(self) -> None:
        self.batcher.close()

    @property
    def longest_context(self) -> int:
        return max(m.config.max_position_embeddings for m in self.family.tiers.values())

    def tier_of(self, model: str) -> str:
        fam, _, tier = model.partition(":")
        if fam != self.family.name or tier not in self.names:
            have = ", ".join(f"{self.family.name}:{t}" for t in self.names)
            raise ApiError(404, f"the model {model!r} does not exist: this server has {have}", "model",
                           "model_not_found")
        return tier

    async def prompt_ids(self, text: str) -> list[int]:
        """Off the event loop: a long prompt must not stall the other requests' streams."""
        return await asyncio.to_thread(lambda: self.tok(text)["input_ids"])

    async def chat_ids(self, messages: list[dict]) -> list[int]:
        return await self.prompt_ids(self.tok.apply_chat_template(messages, add_generation_prompt=True,
                                                                  tokenize=False))

    def submit(self, model: str, ids: list[int], max_tokens: int | None, temperature: float | None,
               seed: int | None, n: int = 1, draft: list[int] | None = None, read=None) -> list[Job]:
        """`n` answers to one prompt, queued for decoding; a seeded request's answers are seeded seed, seed + 1,
        ... (n different answers, each reproducible). `draft`: an `auto` request handed over with its draft (and
        `read`, what the lower server read of it, in a state hand-off)."""
        tier = self.tier_of(model)
        temperature = temperature or 0.0
        if tier == "auto" and temperature > 0:
            raise ApiError(400, f"{model} routes greedy answers (temperature 0): to sample, ask a tier "
                                f"({', '.join(f'{self.family.name}:{t}' for t in self.family.tiers)})",
                           "temperature")
        limit = min(m.config.max_position_embeddings for t, m in self.family.tiers.items() if tier in (t, "auto"))
        max_new = max_tokens or min(self.default_max_tokens, max(limit - len(ids), 1))
        if len(ids) + max_new > limit:
            raise ApiError(400, f"this model's maximum context length is {limit} tokens; the request has "
                                f"{len(ids)} prompt tokens and asks for {max_new} more: shorten the prompt or "
                                "lower max_tokens", "max_tokens", "context_length_exceeded")
        out, loop = asyncio.Queue(), asyncio.get_running_loop()
        return [self.batcher.submit(Job(tier, ids, max_new, temperature, None if seed is None else seed + i, loop,
                                        out, index=i, draft=draft, read=read)) for i in range(n)]

    async def tokens(self, job: Job) -> list[int]:
        """One answer's token ids, once it is done (a hand-off's answer: the ids, not text)."""
        got = []
        while (item := (await job.out.get())[1]) is not DONE:
            if isinstance(item, Exception):
                raise item
            got.append(item)
        return got

    async def pieces(self, jobs: list[Job], stops: list[str],
                     gone: Callable[[], Awaitable[bool]] | None = None) -> AsyncIterator[Piece]:
        """The answers' text as it is made, piece by piece, until every answer is done; when the client is
        `gone` (or stops reading), their decoding stops."""
        answers = [_Answer(j, self.tok, stops) for j in jobs]
        out = jobs[0].out
        try:
            while not all(a.done for a in answers):
                i, item = await out.get()
                a = answers[i]
                if isinstance(item, Exception):
                    raise item
                if a.done:  # tokens decoded after a stop string, before the batch saw the stop
                    continue
                piece = a.end(self.family.eos) if item is DONE else a.token(item)
                if piece is not None:
                    yield piece
                if gone is not None and await gone():
                    return
        finally:
            for j in jobs:
                j.stop.set()

    def _auto(self, j: Job) -> list[int]:
        """One `auto` answer: this server's tiers, then the upstream's when they are unsure. An upstream that
        does not answer in time leaves this server's answer, flagged."""
        depth = self._hand_depth()
        a = escalate(self.family, j.prompt, j.max_new_tokens, self.auto_threshold, j.draft, j.read, depth)
        j.answered_by = a.tier
        if self.upstream is None or a.confidence >= self.auto_threshold:
            return a.tokens
        read = a.read if a.read is not None and a.read.depth == depth and depth > 0 else None
        deep = self.family.tiers[self.family.deepest]
        mode = "tokens" if read is None else self.upstream.choose(
            depth, read.length + 1, j.max_new_tokens - len(a.draft) + 1,
            {"state": state_bytes_per_token(deep, depth), "split": state_bytes_per_token(deep, depth, kv=False)},
            self.block_seconds()[1])
        model = f"{self.family.name}:auto"
        digest = self.chain(self.family.deepest)[depth] if mode != "tokens" else None
        try:
            if mode == "split":
                got = self.upstream.split(model, j.prompt, a.draft, j.max_new_tokens, read, digest,
                                          trunk_step(deep, read))
            else:
                got = self.upstream.ask(model, j.prompt, a.draft, j.max_new_tokens,
                                        read if mode == "state" else None, digest)
        except Unreachable as e:
            j.fallback = str(e)
            return a.tokens
        j.answered_by, j.computed_at, j.network_bytes, j.fallback, j.handoff = (
            got.tier, got.computed_at, got.network_bytes, got.fallback, got.handoff)
        return got.tokens

    def chain(self, tier: str) -> list[str]:
        """A tier's digest chain (family.tensors.digests): its package's record, else computed once."""
        if tier not in self._chains:
            self._chains[tier] = self.family.chains.get(tier) or digests(self.family.tiers[tier])
        return self._chains[tier]

    def _hand_depth(self) -> int:
        """How many leading blocks this server's deepest tier shares, bit for bit, with the upstream's shallowest
        (0: hand over tokens only)."""
        if self.upstream is None or self.upstream.mode == "tokens" or (trunk := self.upstream.trunk()) is None:
            return 0
        model = self.family.tiers[self.family.deepest]
        if trunk["dtype"] != str(model.dtype).removeprefix("torch."):
            return 0
        return max(common_depth(self.chain(self.family.deepest), trunk["digests"]), 0)

    def block_seconds(self) -> tuple[float, float]:
        """Seconds the shallowest tier's first block takes per position reading a prompt, and per decoded token
        (the cost model's compute: the upstream's, and this server's own), measured again every REFRESH_S: the
        load on this server changes them."""
        now = time.monotonic()
        if self._block_s is None or now - self._block_s[0] > REFRESH_S:
            model = self.family.tiers[next(iter(self.family.tiers))]
            self._block_s = (now, measure_block(model), measure_block(model, positions=1))
        return self._block_s[1:]

    def _run(self, tier: str, jobs: list[Job], on_token: Callable[[int, int], bool]) -> None:
        """Decodes one batch (same tier and sampling), on the batcher's thread."""
        fam = self.family
        if tier == "auto":  # one request at a time: a deeper tier continues from the shallower one's state
            for i, j in enumerate(jobs):
                for t in self._auto(j):
                    if on_token(i, t):
                        break
            return
        for j in jobs:
            j.answered_by = tier
        model, temperature = fam.tiers[tier], jobs[0].temperature
        if self.draft is None or temperature > 0 or fam.depth(tier) <= fam.depth(self.draft):
            generate(model, [j.prompt for j in jobs], [j.max_new_tokens for j in jobs], fam.eos,
                     temperature=temperature, seed=jobs[0].seed, on_token=on_token)
            return
        policy = dict(k=self.draft_tokens, stats=self.spec_stats, skip=self.draft_skip, min_confidence=self.draft_min_p)
        if len(jobs) > 1:  # concurrent requests: drafted and verified as one batch
            speculative_batch(fam.tiers[self.draft], model, [j.prompt for j in jobs], [j.max_new_tokens for j in jobs],
                              fam.eos, on_token=on_token, **policy)
            return
        speculative(fam.tiers[self.draft], model, jobs[0].prompt, jobs[0].max_new_tokens, fam.eos,
                    on_token=lambda t: on_token(0, t), **policy)
