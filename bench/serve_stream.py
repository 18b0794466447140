"""A long streamed answer's cost per token at its start and at its end, measured side by side in one run: a
2,000-token answer streamed over the OpenAI API (the `openai` client; each chunk's arrival and, from vLLM's
`continuous_usage_stats`, how many tokens it carries); the same tier decoding alone in-process (the model's own
share, attention over a longer context included); the server's own path with the model left out (the answer's
tokens through the engine into server-sent events); and the answer's text made incrementally (serve/detok.py)
against decoding the whole answer again per token. For each: ms per token over the first and the last 200
tokens, and their ratio.

    python bench/serve_stream.py [--family DIR --tier TIER] [--tokens 2000] [--window 200] [--rounds 5]
                                 [--out bench/results/serve_stream.json]

Without --family: the `micro` preset family with random weights and a context of --tokens + 64. EOS is
ignored, so every answer runs to --tokens. Each variant runs once per round, interleaved; per window the
median gap between tokens (a pause of the shared machine's is not the code's), then the fastest round."""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import torch

from ruyi_core.serve.decode import generate
from ruyi_core.serve.detok import Detokenizer


def served_micro(context: int):
    """The micro family (random weights, `context` positions) served from a folder, as `ruyi serve --family`
    does."""
    import tempfile

    from ruyi_core.demo import tokenizer_texts
    from ruyi_core.family.convert import build_preset_base, family_from_base
    from ruyi_core.family.io import save_family
    from ruyi_core.runtime import Runtime
    from ruyi_core.serve.tiers import from_family

    base, tok = build_preset_base("micro", tokenizer_texts(), seed=0)
    base.config.max_position_embeddings = context  # rope is computed per position: any length works
    d = Path(tempfile.mkdtemp()) / "micro"
    save_family(family_from_base(base, [0, 3]).eval(), tok, d)
    return from_family(d, Runtime(torch.device("cpu"), torch.float32), name="micro")


def windows(stamps: list[tuple[int, float]], window: int) -> tuple[float, float]:
    """ms per token in the first and the last `window` tokens, from (tokens so far, time) stamps: a chunk
    of k tokens after a gap g counts as k tokens of g / k each."""
    per = []
    for (n0, t0), (n1, t1) in zip(stamps, stamps[1:]):
        per += [(t1 - t0) / (n1 - n0)] * (n1 - n0)
    return statistics.median(per[:window]) * 1e3, statistics.median(per[-window:]) * 1e3


def streamed(url: str, model: str, prompt: str, n: int) -> list[tuple[int, float]]:
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    out = client.completions.create(model=model, prompt=prompt, max_tokens=n, stream=True,
                                    stream_options={"include_usage": True, "continuous_usage_stats": True})
    stamps = []
    for c in out:
        if c.choices and c.usage.completion_tokens > (stamps[-1][0] if stamps else 0):
            stamps.append((c.usage.completion_tokens, time.perf_counter()))
    return stamps


def decoded_alone(served, tier: str, ids: list[int], n: int) -> tuple[list[tuple[int, float]], list[int]]:
    stamps = []
    out = generate(served.tiers[tier], [ids], [n], served.eos,
                   on_token=lambda i, t: stamps.append((len(stamps) + 1, time.perf_counter())))
    return stamps, out[0]


def serving_path(served, tier: str, tokens: list[int]) -> list[tuple[int, float]]:
    """The server's own work per token, the model left out: the answer's tokens, queued at once as the decoder
    would queue them, through the engine (text, stop strings) and into server-sent events."""
    from ruyi_core.serve.batcher import DONE, Job
    from ruyi_core.serve.engine import Engine
    from ruyi_core.serve.protocol import StreamOptions
    from ruyi_core.serve.respond import Reply, stream

    async def run():
        job = Job(tier, [], len(tokens), 0.0, None, asyncio.get_running_loop())
        for t in [*tokens, DONE]:
            job.out.put_nowait((0, t))
        stamps = []
        events = stream(Reply(tier, False, 1, 0, lambda: None), engine.pieces([job], []),
                        StreamOptions(continuous_usage_stats=True))
        async for e in events:
            chunk = json.loads(e[6:]) if e.startswith("data: {") else {}
            if chunk.get("choices"):
                stamps.append((chunk["usage"]["completion_tokens"], time.perf_counter()))
        return [s for s, prev in zip(stamps, [(0, 0.0), *stamps]) if s[0] > prev[0]]

    engine = Engine(served)
    try:
        return asyncio.run(run())
    finally:
        engine.close()


def detokenized(tok, tokens: list[int], incremental: bool) -> list[tuple[int, float]]:
    stamps, d = [], Detokenizer(tok)
    for i, t in enumerate(tokens):
        if incremental:
            d.push(t)
        else:
            tok.decode(tokens[:i + 1], skip_special_tokens=True)
        stamps.append((i + 1, time.perf_counter()))
    return stamps


def measure(served, url: str, tier: str, a) -> dict[str, list[tuple[float, float]]]:
    prompt = "Where does Ada live?"
    ids = served.tokenizer(prompt)["input_ids"]
    model = f"{served.name}:{tier}"
    streamed(url, model, prompt, 2 * a.window)  # warm-up: first calls are slower
    rows: dict[str, list[tuple[float, float]]] = {"streamed": [], "decode_alone": [], "serving_path": [],
                                                  "detok_incremental": [], "detok_full_redecode": []}
    for _ in range(a.rounds):
        rows["streamed"].append(windows(streamed(url, model, prompt, a.tokens), a.window))
        stamps, tokens = decoded_alone(served, tier, ids, a.tokens)
        rows["decode_alone"].append(windows(stamps, a.window))
        rows["serving_path"].append(windows(serving_path(served, tier, tokens), a.window))
        rows["detok_incremental"].append(windows(detokenized(served.tokenizer, tokens, True), a.window))
        rows["detok_full_redecode"].append(windows(detokenized(served.tokenizer, tokens, False), a.window))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", type=Path)
    ap.add_argument("--tier")
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--window", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="bench/results/serve_stream.json")
    a = ap.parse_args()
    from serve import start_server  # bench/serve.py, beside this file

    if a.family is not None:
        from ruyi_core.serve.cli import load_served

        served = load_served(a.family, None, None, None, print)
    else:
        served = served_micro(a.tokens + 64)
    served.eos = set()  # every answer runs to --tokens
    tier = a.tier or served.deepest
    srv, url = start_server(served)
    rows = measure(served, url, tier, a)
    srv.should_exit = True
    out = {"family": served.name, "tier": tier, "tokens": a.tokens, "window": a.window, "rounds": a.rounds,
           "threads": torch.get_num_threads()}
    for name, rs in rows.items():
        first, last = min(r[0] for r in rs), min(r[1] for r in rs)
        out[name] = {"first_ms_per_token": round(first, 4), "last_ms_per_token": round(last, 4),
                     "last_over_first": round(last / first, 3)}
        print(f"{name:<20} first {a.window}: {first:8.4f} ms/token   last {a.window}: {last:8.4f} ms/token   "
              f"last/first {last / first:6.3f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
