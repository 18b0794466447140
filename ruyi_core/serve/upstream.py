"""A split deployment's hand-off: a server of shallower tiers (`ruyi serve --tiers end --upstream URL`) sends an
`auto` request its own tiers were unsure of to a server of deeper tiers: the prompt's ids and the draft (the
answer up to its first unsure token), and, in the modes that share the trunk both servers hold bit for bit,
either what its tiers read of them there (`state`, handoff.py) or the states where the servers part, token by
token, while it keeps running the trunk itself (`split`, split.py). The upstream continues from the draft as one
process does (route.escalate) and answers with its answering tier's tokens. Routes: `POST /v1/ruyi/continue`
(tokens), `POST /v1/ruyi/continue-state` (state), `POST /v1/ruyi/split[/{session}]` (split), `GET /v1/ruyi/trunk`
(the upstream's digest chain and block speeds).

`auto` mode picks per request from a cost model (`choose`): each mode's time on top of what all three share,
from the link (`link_mbps`, and the round trip measured when the trunk is read), the upstream's measured
seconds per block-token (reading a prompt, and decoding) and this server's per decoded token."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from http.client import HTTPConnection, HTTPException, HTTPSConnection
from typing import Literal
from urllib.parse import urlsplit

import torch

from ruyi_core.serve.decode import Read
from ruyi_core.serve.handoff import STATE_PATH, TRUNK_PATH, encode
from ruyi_core.serve.split import SPLIT_PATH, encode_step

PATH = "/ruyi/continue"
RETRY_S = 30.0  # after the upstream's trunk could not be read, tokens only for this long
REFRESH_S = 30.0  # the upstream's speeds and round trip are asked again this often: its load changes
Mode = Literal["tokens", "state", "split", "auto"]
OCTETS = "application/octet-stream"


@dataclass
class Handed:
    """The upstream's answer."""
    tier: str
    tokens: list[int]
    computed_at: str  # the URL of the server that computed it
    network_bytes: int  # this hand-off's requests and answers, and every hand-off further up
    fallback: str | None  # why the upstream answered although unsure (its own upstream did not answer)
    handoff: str  # "tokens", "state", "split", or why a state was not used


class Unreachable(Exception):
    """The upstream did not answer in time, or not well: the lower tier answers itself."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class Upstream:
    def __init__(self, url: str, timeout: float = 10.0, api_key: str | None = None, mode: Mode = "auto",
                 link_mbps: float = 100.0):
        """`url`: the upstream's /v1 base URL (http://HOST:PORT/v1; `/v1` is added when missing); `timeout`: the
        seconds a hand-off may wait to connect, and then for the answer, before the lower tier answers itself;
        `mode`: tokens, state, split, or auto (the cheapest by the cost model, for a link of `link_mbps`)."""
        self.url = url.rstrip("/") if url.rstrip("/").endswith("/v1") else url.rstrip("/") + "/v1"
        self.timeout, self.mode, self.link_mbps = timeout, mode, link_mbps
        self.auth = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._trunk: dict | None = None
        self._failed_at, self._asked_at = -RETRY_S, 0.0
        self._answered = [0, 0]  # answers handed on, and their tokens past the draft: the decode ahead, estimated

    def _call(self, path: str, body: bytes | None = None, kind: str = "application/json",
              conn: HTTPConnection | None = None) -> bytes:
        """One exchange with the upstream (a GET without a body), on `conn` when given: a split hand-off's
        exchanges share one connection, as a new one per token would add a round trip each. Every hand-off goes
        through here."""
        headers = {**({"content-type": kind} if body is not None else {}), **self.auth}
        try:
            if conn is None:
                with urllib.request.urlopen(urllib.request.Request(self.url + path, data=body, headers=headers),
                                            timeout=self.timeout) as r:
                    return r.read()
            conn.request("GET" if body is None else "POST", urlsplit(self.url).path + path, body, headers)
            r = conn.getresponse()
            content = r.read()
            if r.status >= 400:
                raise Unreachable(f"upstream {self.url} did not answer (HTTP {r.status}: {content[:200]!r})",
                                  r.status)
            return content
        # URLError, HTTPError and timeouts are OSErrors; an upstream killed while answering leaves a cut response
        # (http.client's IncompleteRead) or none at all (RemoteDisconnected)
        except (OSError, HTTPException) as e:
            raise Unreachable(f"upstream {self.url} did not answer ({type(e).__name__}: {e})",
                              e.code if isinstance(e, urllib.error.HTTPError) else None) from None

    def _connect(self) -> HTTPConnection:
        u = urlsplit(self.url)
        return (HTTPSConnection if u.scheme == "https" else HTTPConnection)(u.hostname, u.port, timeout=self.timeout)

    def trunk(self) -> dict | None:
        """The upstream's digest chain (of its shallowest tier), seconds per block-token reading a prompt and
        decoding, and the round trip of an exchange (the best of three asks), asked again every REFRESH_S (a busy
        upstream is slower); None when it cannot say (down, or a server without state hand-offs): tokens then. A
        failed ask is not repeated for RETRY_S, so an upstream that is down costs each request one timeout, not
        two."""
        now = time.monotonic()
        stale = self._trunk is None or now - self._asked_at > REFRESH_S
        if stale and now - self._failed_at > RETRY_S:
            try:
                got, rtt = json.loads(self._call(TRUNK_PATH)), []
                for _ in range(3):
                    start = time.perf_counter()
                    self._call(TRUNK_PATH)
                    rtt.append(time.perf_counter() - start)
                self._trunk = {"digests": [str(d) for d in got["digests"]], "dtype": str(got["dtype"]),
                               "block_token_s": float(got["block_token_s"]), "block_step_s": float(got["block_step_s"]),
                               "rtt_s": min(rtt)}
                self._asked_at = time.monotonic()
            except (Unreachable, ValueError, KeyError, TypeError):
                self._trunk, self._failed_at = None, time.monotonic()
        return self._trunk

    def costs(self, depth: int, positions: int, budget: int, per_position: dict[str, int],
              step_s: float) -> dict[str, float]:
        """Each mode's seconds on top of what all three share (one exchange, the ids, the upstream's blocks
        above the trunk) for a hand-off of `positions` read through `depth` shared blocks, `budget` tokens left to
        decode: tokens re-reads the positions and decodes the trunk upstream; state sends `per_position["state"]`
        bytes a position and decodes the trunk upstream; split sends `per_position["split"]` a position, then one
        exchange a token while this server runs the trunk (`step_s` a block)."""
        trunk = self.trunk()
        if trunk is None or depth < 1:
            return {"tokens": 0.0}
        byte_s = 8 / (self.link_mbps * 1e6)
        count, total = self._answered
        ahead = min(budget, total / count if count else budget / 2)
        upstream_decode = ahead * depth * trunk["block_step_s"]
        return {"tokens": positions * depth * trunk["block_token_s"] + upstream_decode,
                "state": positions * per_position["state"] * byte_s + upstream_decode,
                "split": positions * per_position["split"] * byte_s
                + ahead * (trunk["rtt_s"] + per_position["split"] * byte_s + depth * step_s)}

    def choose(self, depth: int, *args) -> str:
        """The mode of one hand-off (see `costs`): the fixed one, or auto's cheapest; tokens when the servers
        share no block or the upstream cannot say."""
        if self.mode != "auto":
            return self.mode if depth > 0 else "tokens"
        costs = self.costs(depth, *args)
        return min(costs, key=costs.get)

    def ask(self, model: str, prompt: list[int], draft: list[int], max_tokens: int, state=None,
            digest: str | None = None) -> Handed:
        """The upstream's answer; `state` (a decode.Read at a depth whose digest is `digest`): a state hand-off."""
        request = {"model": model, "prompt": prompt, "draft": draft, "max_tokens": max_tokens}
        if state is None:
            body, path, kind = json.dumps(request).encode(), PATH, "application/json"
        else:
            body, path, kind = encode(request, state, digest), STATE_PATH, OCTETS
        content = self._call(path, body, kind)
        return self._handed(json.loads(content) if content else None, len(body) + len(content), len(draft))

    def split(self, model: str, prompt: list[int], draft: list[int], max_tokens: int, read: Read, digest: str,
              trunk_step: Callable[[int, int], torch.Tensor]) -> Handed:
        """The upstream's answer, computed split per token (split.py): `read` is what this server read of the
        prompt and draft but its last token at the depth whose digest is `digest`; `trunk_step(token, at)`
        runs a token at a position through this server's shared blocks (on `read`'s keys and values, cut to
        `at` positions) and returns its state there. A full session table upstream: tokens instead."""
        request = {"model": model, "prompt": prompt, "draft": draft, "max_tokens": max_tokens}
        whole = Read(read.model, read.depth, read.kv, torch.cat([read.states, trunk_step(draft[-1], read.length)], 1))
        body = encode(request, whole, digest, kv=False)
        conn = self._connect()
        try:
            try:
                content = self._call(SPLIT_PATH, body, OCTETS, conn)
            except Unreachable as e:
                if e.status != 503:
                    raise
                got = self.ask(model, prompt, draft, max_tokens)
                got.handoff = f"tokens: the upstream's split sessions are full, then {got.handoff}"
                return got
            sent, got, tokens = len(body) + len(content), self._json(content), []
            while not got.get("done"):
                tokens += [int(t) for t in got["tokens"]]
                body = encode_step(int(got["at"]), trunk_step(tokens[-1], int(got["at"])))
                content = self._call(f"{SPLIT_PATH}/{got['session']}", body, OCTETS, conn)
                sent, got = sent + len(body) + len(content), self._json(content)
        finally:
            conn.close()
        return self._handed(got, sent, len(draft))

    def _json(self, content: bytes) -> dict:
        try:
            got = json.loads(content)
            if isinstance(got, dict):
                return got
        except ValueError:
            pass
        raise Unreachable(f"upstream {self.url} answered a hand-off with something else than a JSON object")

    def _handed(self, got: dict | None, sent: int, drafted: int) -> Handed:
        try:
            where = self.url if got["computed_at"] == "local" else str(got["computed_at"])
            out = Handed(str(got["tier"]), [int(t) for t in got["tokens"]], where, sent + int(got["network_bytes"]),
                         got.get("fallback"), str(got.get("handoff", "tokens")))
        except (KeyError, TypeError, ValueError) as e:
            raise Unreachable(f"upstream {self.url} answered a hand-off without {e}") from None
        self._answered = [self._answered[0] + 1, self._answered[1] + max(len(out.tokens) - drafted, 0)]
        return out
