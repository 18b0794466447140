"""Split computation per token between two servers of one family (`--handoff split`): the lower server keeps
running the blocks both servers hold, bit for bit, and sends each token's state where they part; the upstream
runs only the blocks above. Nothing of the trunk crosses the link but one hidden state per position: for the
prompt and draft once (`POST /v1/ruyi/split`, handoff.py's format without keys and values), then one per token
(`POST /v1/ruyi/split/{session}`), each answered with the upstream's next token.

The upstream keeps a session per request (its own blocks' keys and values), in a bounded table: a full table is
a 503 (the lower server then hands over tokens), a session idle for `idle_s` is dropped, an unknown one is a
404, and a step is checked whole (its position, its byte count) before a tensor is made: a 400. A session's id
is random, so one client cannot step another's. When the upstream's tier is unsure at the end and it has deeper
tiers (here or further up), its answer is their draft, handed on as tokens (it holds none of the trunk)."""
from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ruyi_core.serve.decode import KV, Read, Tier, verify

SPLIT_PATH = "/ruyi/split"
STEP_HEADER_LIMIT = 256


class Busy(Exception):
    """The session table is full."""


@dataclass
class Session:
    """One request's upper half: the blocks above the split, their keys and values, the answer so far."""
    tier: str
    request: dict  # model, prompt, draft, max_tokens
    tier_model: torch.nn.Module
    depth: int
    eos: set[int]
    kv: KV = field(default_factory=KV)
    tokens: list[int] = field(default_factory=list)
    confidence: list[float] = field(default_factory=list)
    at: int = 0  # the position of the next state: the prompt and the answer but its last token
    used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def done(self) -> bool:
        return bool(self.tokens) and (self.tokens[-1] in self.eos or len(self.tokens) >= self.request["max_tokens"])

    @property
    def own(self) -> list:
        return Tier(self.tier_model).layers[self.depth:]


class Sessions:
    def __init__(self, limit: int = 32, idle_s: float = 30.0):
        self.limit, self.idle_s = limit, idle_s
        self._table: dict[str, Session] = {}
        self._lock = threading.Lock()

    def _admit(self, s: Session) -> str:
        with self._lock:
            now = time.monotonic()
            for sid in [k for k, v in self._table.items() if now - v.used > self.idle_s]:
                del self._table[sid]
            if len(self._table) >= self.limit:
                raise Busy(f"{self.limit} split sessions are open")
            sid = secrets.token_hex(16)
            self._table[sid] = s
            return sid

    def end(self, sid: str) -> None:
        with self._lock:
            self._table.pop(sid, None)

    @torch.no_grad()
    def open(self, tier: str, model, request: dict, read: Read, eos: set[int]) -> tuple[str | None, Session, int]:
        """A session for a split hand-off whose `read` holds the states of the prompt and the whole draft at
        its depth: `model`'s blocks above check the draft in one pass and pick the next token, as
        decode.continue_reading does. Returns (session id, or None when already done; the session; how many of
        its tokens are new)."""
        s = Session(tier, request, model, read.depth, eos)
        sid = self._admit(s)  # before any compute: a full table refuses at no cost
        try:
            t, draft = Tier(model), request["draft"]
            a, preds, probs = verify(t, s.own, s.kv, read.states, 0, draft)
            for tok, p in zip(draft[:a] + [preds[a]], probs):
                if s.done:
                    break
                s.tokens.append(tok)
                s.confidence.append(p)
            s.at = read.length - len(draft) + len(s.tokens) - 1
            s.kv.crop(s.at)
        finally:
            if not s.tokens or s.done:
                self.end(sid)
        return (None if s.done else sid), s, len(s.tokens)

    @torch.no_grad()
    def step(self, sid: str, body: bytes) -> Session:
        """The session's next token from the state its lower server sends for the answer's last token. Raises
        KeyError (a 404) for an unknown session and ValueError (a 400) for a malformed step."""
        with self._lock:
            s = self._table.get(sid)
        if s is None:
            raise KeyError(sid)
        if not s.lock.acquire(blocking=False):
            raise ValueError("a step of this session is already being computed")
        try:
            state = self._parse(s, body)
            t = Tier(s.tier_model)
            pos = torch.tensor([[s.at]], device=state.device)
            logits = t.logits(t.run(s.own, state, s.kv, pos, None)[:, -1])
            x = int(logits.argmax(-1))
            s.tokens.append(x)
            s.confidence.append(float(torch.softmax(logits, -1)[0, x]))
            s.at, s.used = s.at + 1, time.monotonic()
        finally:
            s.lock.release()
        if s.done:
            self.end(sid)
        return s

    @staticmethod
    def _parse(s: Session, body: bytes) -> torch.Tensor:
        end = body.find(b"\n", 0, STEP_HEADER_LIMIT)
        head = json.loads(body[:end]) if end > 0 else None
        if not isinstance(head, dict) or head.get("at") != s.at:
            raise ValueError(f"a split step is one JSON line {{\"at\": {s.at}}} (the position this session "
                             "expects), then the state")
        model = s.tier_model
        size = model.config.hidden_size * model.dtype.itemsize
        if len(body) - end - 1 != size:
            raise ValueError(f"a split step's state takes {size} bytes, not {len(body) - end - 1}")
        raw = torch.frombuffer(bytearray(body[end + 1:]), dtype=torch.uint8)
        return raw.view(model.dtype).reshape(1, 1, -1).to(next(model.parameters()).device)


def encode_step(at: int, state: torch.Tensor) -> bytes:
    raw = state.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
    return json.dumps({"at": at}).encode() + b"\n" + raw


def trunk_step(model, read: Read) -> Callable[[int, int], torch.Tensor]:
    """A split hand-off's lower half: one token at a position through `model`'s first `read.depth` blocks, on
    `read`'s keys and values cut to the positions before it (the upstream may have rejected part of the draft)."""
    t, device = Tier(model), read.states.device

    @torch.no_grad()
    def step(token: int, at: int) -> torch.Tensor:
        read.kv.crop(at)
        return t.run(t.layers[:read.depth], t.embed(torch.tensor([[token]], device=device)), read.kv,
                     torch.tensor([[at]], device=device), None)

    return step
