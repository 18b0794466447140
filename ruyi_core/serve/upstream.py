"""A split deployment's hand-off: a server of shallower tiers (`ruyi serve --tiers end --upstream URL`) sends an
`auto` request its own tiers were unsure of to a server of deeper tiers, tokens only: the prompt's ids and the
draft (the answer up to its first unsure token). The upstream continues from the draft as one process does
(route.escalate) and answers with its answering tier's tokens. The route is `POST /v1/ruyi/continue`."""
from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass

PATH = "/ruyi/continue"


@dataclass
class Handed:
    """The upstream's answer."""
    tier: str
    tokens: list[int]
    computed_at: str  # the URL of the server that computed it
    network_bytes: int  # this hand-off's request and answer, and every hand-off further up
    fallback: str | None  # why the upstream answered although unsure (its own upstream did not answer)


class Unreachable(Exception):
    """The upstream did not answer in time, or not well: the lower tier answers itself."""


class Upstream:
    def __init__(self, url: str, timeout: float = 10.0, api_key: str | None = None):
        """`url`: the upstream's /v1 base URL (http://HOST:PORT/v1; `/v1` is added when missing); `timeout`: the
        seconds a hand-off may wait to connect, and then for the answer, before the lower tier answers itself."""
        self.url = url.rstrip("/") if url.rstrip("/").endswith("/v1") else url.rstrip("/") + "/v1"
        self.timeout = timeout
        self.headers = {"content-type": "application/json",
                        **({"authorization": f"Bearer {api_key}"} if api_key else {})}

    def ask(self, model: str, prompt: list[int], draft: list[int], max_tokens: int) -> Handed:
        body = json.dumps({"model": model, "prompt": prompt, "draft": draft, "max_tokens": max_tokens}).encode()
        req = urllib.request.Request(self.url + PATH, data=body, headers=self.headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                content = r.read()
            got = json.loads(content)
            where = self.url if got["computed_at"] == "local" else str(got["computed_at"])
            return Handed(str(got["tier"]), [int(t) for t in got["tokens"]], where,
                          len(body) + len(content) + int(got["network_bytes"]), got.get("fallback"))
        except (OSError, ValueError, KeyError, TypeError) as e:  # URLError, HTTPError, timeouts are OSErrors
            raise Unreachable(f"upstream {self.url} did not answer ({type(e).__name__}: {e})") from None
