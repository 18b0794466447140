"""A split deployment's hand-offs, measured side by side in one run: a server of the family's shallower tiers
hands every `auto` request to a server of its deepest tier over simulated links, in each mode (tokens, state,
split, auto), against asking the deepest tier's server directly. Per link and mode: latency per request (mean
and p90), bytes on the wire, the modes `auto` chose, and whether every answer equals the deepest tier's own.

    python bench/handoff.py --family DIR | --registry FAMILY [--version V] [--requests 30] [--max-tokens 24]
                            [--busy-upstream-ms 3] [--out bench/results/handoff.json]

A link is simulated on loopback: after each real exchange (a hand-off, each token of a split one, the trunk's
description) the lower server waits the round trip and the exchange's bytes over the link's bandwidth, as a real
link would add. The threshold is above 1, so every
request crosses to the upstream: this measures the hand-off, not routing. With --busy-upstream-ms, the two faster
links again with an upstream whose every block call first waits that long (an accelerator busy with other
requests), the case split computation is for.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

from serve import questions, start_server

from ruyi_core.serve.upstream import Upstream

LINKS = {"1 Gbit/s, 1 ms": (1000.0, 0.001), "50 Mbit/s, 20 ms": (50.0, 0.020), "5 Mbit/s, 80 ms": (5.0, 0.080)}


class SimulatedLink(Upstream):
    """An upstream behind a link of `link_mbps` and `rtt` seconds: each exchange waits what its bytes would take."""

    def __init__(self, url: str, mode: str, link_mbps: float, rtt: float):
        super().__init__(url, timeout=120, mode=mode, link_mbps=link_mbps)
        self.rtt = rtt

    def _call(self, path, body=None, kind="application/json", conn=None):
        got = super()._call(path, body, kind, conn)
        time.sleep(self.rtt + (len(body or b"") + len(got)) * 8 / (self.link_mbps * 1e6))
        return got


async def run(url: str, model: str, prompts: list[str], max_tokens: int) -> list[dict]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)
    out = []
    for p in prompts:  # one at a time: latency, not throughput
        start = time.perf_counter()
        r = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": p}],
                                                 max_tokens=max_tokens)
        extra = r.usage.model_extra or {}
        out.append({"s": time.perf_counter() - start, "text": r.choices[0].message.content,
                    "bytes": extra.get("network_bytes") or 0, "handoff": extra.get("handoff"),
                    "tier": r.system_fingerprint})
    await client.close()
    return out


def summary(rows: list[dict], want: list[str]) -> dict:
    s = sorted(r["s"] for r in rows)
    modes = [str(r["handoff"] or "-").split(":")[0] for r in rows]
    return {"latency_ms": round(1000 * statistics.mean(s), 1), "p90_ms": round(1000 * s[int(0.9 * (len(s) - 1))], 1),
            "bytes": round(statistics.mean(r["bytes"] for r in rows)),
            "modes": {m: round(modes.count(m) / len(rows), 3) for m in sorted(set(modes))},
            "exact": all(r["text"] == w for r, w in zip(rows, want))}


def busy(served, ms: float) -> None:
    """Every block call of `served` waits `ms` first (each shared block once)."""
    layers = {id(layer): layer for model in served.tiers.values() for layer in model.model.layers}
    for layer in layers.values():
        layer.register_forward_pre_hook(lambda *_: time.sleep(ms / 1000))


def compare(results: dict, lower, up: str, links: dict, prompts, want, max_tokens: int, suffix: str = "") -> None:
    """Every mode over every link, a fresh lower server each (its cost model asks the upstream anew)."""
    for link, (mbps, rtt) in links.items():
        for mode in ("tokens", "state", "split", "auto"):
            srv, url = start_server(lower, auto_threshold=1.01, upstream=SimulatedLink(up, mode, mbps, rtt))
            results[f"{link}{suffix}: {mode}"] = summary(asyncio.run(run(url, f"{lower.name}:auto", prompts,
                                                                         max_tokens)), want)
            srv.should_exit = True
        fixed = {m: results[f"{link}{suffix}: {m}"]["latency_ms"] for m in ("tokens", "state", "split")}
        best = min(fixed, key=fixed.get)
        results[f"{link}{suffix}: auto"]["fastest_fixed"] = best


def load(args):
    """(the shallower tiers, the deepest), each loaded alone as its server would load it."""
    from ruyi_core.serve.cli import load_served

    tiers = list(load_served(args.family, args.registry, args.version, None, print).tiers)
    return (load_served(args.family, args.registry, args.version, None, print, tiers[:-1]),
            load_served(args.family, args.registry, args.version, None, print, tiers[-1:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", type=Path)
    ap.add_argument("--registry")
    ap.add_argument("--version", help="with --registry: this version (default: the promoted packages)")
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--busy-upstream-ms", type=float, default=0.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if (args.family is None) == (args.registry is None):
        ap.error("give --family DIR or --registry FAMILY")
    lower, upper = load(args)
    prompts = [q for _, q, _ in questions(args.requests)][:args.requests]
    _, up = start_server(upper)
    cloud = asyncio.run(run(up, f"{upper.name}:{upper.deepest}", prompts, args.max_tokens))
    want = [r["text"] for r in cloud]
    results = {"deepest alone": summary(cloud, want)}
    compare(results, lower, up, LINKS, prompts, want, args.max_tokens)
    if args.busy_upstream_ms:
        busy(upper, args.busy_upstream_ms)
        _, up = start_server(upper)  # a new engine: it measures its (now slower) blocks again
        compare(results, lower, up, dict(list(LINKS.items())[:2]), prompts, want, args.max_tokens,
                f", upstream +{args.busy_upstream_ms:g} ms a block")
    width = max(map(len, results)) + 2
    print(f"{'':<{width}}{'latency ms':>12}{'p90 ms':>10}{'bytes':>10}{'exact':>7}  modes")
    for name, r in results.items():
        modes = ", ".join(f"{m} {v:.0%}" for m, v in r["modes"].items())
        print(f"{name:<{width}}{r['latency_ms']:>12.1f}{r['p90_ms']:>10.1f}{r['bytes']:>10}{str(r['exact']):>7}  "
              f"{modes}" + (f" (fastest fixed: {r['fastest_fixed']})" if "fastest_fixed" in r else ""))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
