"""A split deployment's hand-off: a server of shallower tiers (`ruyi serve --tiers end --upstream URL`) sends an
`auto` request its own tiers were unsure of to a server of deeper tiers: the prompt's ids and the draft (the
answer up to its first unsure token), and in `state` mode what its tiers read of them in the trunk both servers
hold (handoff.py), so the upstream does not read it again. The upstream continues from the draft as one process
does (route.escalate) and answers with its answering tier's tokens. Routes: `POST /v1/ruyi/continue` (tokens),
`POST /v1/ruyi/continue-state` (state), `GET /v1/ruyi/trunk` (the upstream's digest chain and block speed).

`auto` mode picks per request from a cost model: the state's extra bytes over the link (`link_mbps`) against
the upstream re-reading those positions through the shared blocks (its measured seconds per block-token)."""
from __future__ import annotations

import json
from http.client import HTTPException
import time
import urllib.request
from dataclasses import dataclass
from typing import Literal

from ruyi_core.serve.handoff import STATE_PATH, TRUNK_PATH, encode

PATH = "/ruyi/continue"
RETRY_S = 30.0  # after the upstream's trunk could not be read, tokens only for this long
Mode = Literal["tokens", "state", "auto"]


@dataclass
class Handed:
    """The upstream's answer."""
    tier: str
    tokens: list[int]
    computed_at: str  # the URL of the server that computed it
    network_bytes: int  # this hand-off's request and answer, and every hand-off further up
    fallback: str | None  # why the upstream answered although unsure (its own upstream did not answer)
    handoff: str  # "tokens", "state", or why a state was not used


class Unreachable(Exception):
    """The upstream did not answer in time, or not well: the lower tier answers itself."""


class Upstream:
    def __init__(self, url: str, timeout: float = 10.0, api_key: str | None = None, mode: Mode = "auto",
                 link_mbps: float = 100.0):
        """`url`: the upstream's /v1 base URL (http://HOST:PORT/v1; `/v1` is added when missing); `timeout`: the
        seconds a hand-off may wait to connect, and then for the answer, before the lower tier answers itself;
        `mode`: tokens, state, or auto (the cheaper by the cost model, for a link of `link_mbps`)."""
        self.url = url.rstrip("/") if url.rstrip("/").endswith("/v1") else url.rstrip("/") + "/v1"
        self.timeout, self.mode, self.link_mbps = timeout, mode, link_mbps
        self.auth = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._trunk: dict | None = None
        self._failed_at = -RETRY_S

    def trunk(self) -> dict | None:
        """The upstream's digest chain (of its shallowest tier) and seconds per block-token, asked once; None
        when it cannot say (down, or a server without state hand-offs): tokens then. A failed ask is not
        repeated for RETRY_S, so an upstream that is down costs each request one timeout, not two."""
        if self._trunk is None and time.monotonic() - self._failed_at > RETRY_S:
            try:
                with urllib.request.urlopen(urllib.request.Request(self.url + TRUNK_PATH, headers=self.auth),
                                            timeout=self.timeout) as r:
                    got = json.loads(r.read())
                self._trunk = {"digests": [str(d) for d in got["digests"]], "dtype": str(got["dtype"]),
                               "block_token_s": float(got["block_token_s"])}
            except (OSError, HTTPException, ValueError, KeyError, TypeError):
                self._failed_at = time.monotonic()
        return self._trunk

    def wants_state(self, depth: int, positions: int, state_bytes: int) -> bool:
        """The cost model: send the state when moving its bytes over the link takes less time than the upstream
        re-reading these positions through `depth` blocks."""
        if self.mode != "auto":
            return self.mode == "state"
        trunk = self.trunk()
        if trunk is None:
            return False
        return state_bytes * 8 / (self.link_mbps * 1e6) < depth * positions * trunk["block_token_s"]

    def ask(self, model: str, prompt: list[int], draft: list[int], max_tokens: int, state=None,
            digest: str | None = None) -> Handed:
        """The upstream's answer; `state` (a decode.Read at a depth whose digest is `digest`): a state hand-off."""
        request = {"model": model, "prompt": prompt, "draft": draft, "max_tokens": max_tokens}
        if state is None:
            body, path, kind = json.dumps(request).encode(), PATH, "application/json"
        else:
            body, path, kind = encode(request, state, digest), STATE_PATH, "application/octet-stream"
        req = urllib.request.Request(self.url + path, data=body, headers={"content-type": kind, **self.auth})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                content = r.read()
            got = json.loads(content)
            where = self.url if got["computed_at"] == "local" else str(got["computed_at"])
            return Handed(str(got["tier"]), [int(t) for t in got["tokens"]], where,
                          len(body) + len(content) + int(got["network_bytes"]), got.get("fallback"),
                          str(got.get("handoff", "tokens")))
        # URLError, HTTPError and timeouts are OSErrors; an upstream killed while answering leaves a cut response
        # (http.client's IncompleteRead) or none at all (RemoteDisconnected)
        except (OSError, HTTPException, ValueError, KeyError, TypeError) as e:
            raise Unreachable(f"upstream {self.url} did not answer ({type(e).__name__}: {e})") from None
