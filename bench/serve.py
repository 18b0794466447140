"""Serving a family, measured in one run: per tier and for `auto`, requests/s, generated tokens/s and p50/p99
latency under N concurrent OpenAI-API clients, with held-out quality (the demo world's arithmetic, fact and
two-hop questions); then self-speculative decoding of the deepest tier (identical tokens checked on every
prompt) against the same tier decoding alone, per draft tier and draft length; then the same for batches of
concurrent requests (--clients prompts at once) with the fastest policy, against batched greedy decoding.

    python bench/serve.py --family DIR | --registry FAMILY [--version V] [--clients 8] [--requests 48] [--prompts 100]
                          [--out bench/results/serve.json] [--batched-only]

With --registry, the store comes from the RUYI_S3_* environment (the local server: source .ruyi/s3/s3.env).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import threading
import time
from pathlib import Path

import torch

from ruyi_core.demo import world
from ruyi_core.eval.tasks import contains_results, exact_match_results, gold_answer
from ruyi_core.serve.decode import SpecStats, generate, speculative
from ruyi_core.serve.specbatch import speculative_batch


def questions(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(set, question, gold) from the demo world's held-out generative sets."""
    sets = world.eval_sets(seed, n)
    out = [("arithmetic", r["question"], gold_answer(r["answer"])) for r in sets["arithmetic"]]
    out += [(name, r["question"], str(r["answer"])) for name in ("facts_qa", "two_hop") for r in sets[name]]
    return out


def correct(kind: str, text: str, gold: str) -> bool:
    """Scored as the pipeline's benchmarks score: exact match for arithmetic, the answer as a phrase otherwise."""
    score = exact_match_results if kind == "arithmetic" else contains_results
    return bool(next(iter(score({"target": gold}, [text]).values())))


def start_server(served, **kw):
    import uvicorn

    from ruyi_core.serve.api import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(served, **kw), host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=srv.run, daemon=True).start()
    while not srv.started:
        time.sleep(0.05)
    return srv, f"http://127.0.0.1:{port}/v1"


async def load(url: str, model: str, qs, clients: int, max_tokens: int) -> dict:
    from openai import AsyncOpenAI

    todo, lat, toks, right = list(enumerate(qs)), [], 0, 0
    lock = asyncio.Lock()

    async def worker():
        nonlocal toks, right
        while True:
            async with lock:
                if not todo:
                    return
                _, (kind, q, gold) = todo.pop()
            t0 = time.perf_counter()
            r = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}],
                                                     max_tokens=max_tokens, temperature=0)
            lat.append(time.perf_counter() - t0)
            toks += r.usage.completion_tokens
            right += correct(kind, r.choices[0].message.content, gold)

    async with AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    lat.sort()
    return {"model": model, "requests_per_s": round(len(qs) / wall, 2), "tokens_per_s": round(toks / wall, 1),
            "p50_s": round(statistics.median(lat), 3), "p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3),
            "quality": round(right / len(qs), 3)}


def ceiling(served, draft: str, k: int, skip: int) -> float:
    """route.speculation_ceiling for this family's tiers."""
    from ruyi_core.serve.decode import shared_depth
    from ruyi_core.serve.route import speculation_ceiling

    t, d = served.tiers[served.deepest], served.tiers[draft]
    return speculation_ceiling(k, served.depth(draft) - skip, served.depth(served.deepest), shared_depth(d, t))


def variants(served) -> list[tuple]:
    """(draft tier, k, skip, min confidence): every shallower tier at several k; the shallowest also leaving out
    its own blocks but one (DaE's added blocks), and stopping a round at a doubted token at several k."""
    from ruyi_core.serve.decode import shared_depth

    out = [(d, k, 0, 0.0) for d in list(served.tiers)[:-1] for k in (4, 8, 12)]
    first = next(iter(served.tiers))
    own = served.depth(first) - max(shared_depth(served.tiers[first], served.tiers[served.deepest]), 0)
    out += [(first, k, skip, 0.0) for skip in range(1, own) for k in (8, 12)]
    out += [(first, 12, skip, 0.5) for skip in (0, own - 1) if own > 1 or skip == 0]
    out += [(first, k, own - 1, 0.3) for k in (6, 8, 10) if own > 1]  # the cheapest draft, stopped when unsure
    return out


def speculative_rows(served, prompts: list[list[int]], max_new: int) -> list[dict]:
    """The deepest tier alone and self-speculative with every variant, interleaved prompt by prompt (the order
    rotated each prompt), so the machine's drift hits every variant alike."""
    target = served.tiers[served.deepest]
    stats = {None: None, **{v: SpecStats() for v in variants(served)}}
    secs, same, names = dict.fromkeys(stats, 0.0), dict.fromkeys(stats, 0), list(stats)
    ref = [generate(target, [p], [max_new], served.eos)[0] for p in prompts]  # untimed: the tokens to match
    for j, p in enumerate(prompts):
        for v in names[j % len(names):] + names[: j % len(names)]:
            t0 = time.perf_counter()
            if v is None:
                got = generate(target, [p], [max_new], served.eos)[0]
            else:
                draft, k, skip, conf = v
                got = speculative(served.tiers[draft], target, p, max_new, served.eos, k=k, stats=stats[v],
                                  skip=skip, min_confidence=conf)
            secs[v] += time.perf_counter() - t0
            same[v] += got == ref[j]
    base = secs[None]
    return [{"draft": v and v[0], "k": v and v[1], "skip": v and v[2], "min_confidence": v and v[3],
             "seconds": round(secs[v], 2), "speedup": round(base / secs[v], 3),
             "ceiling": round(ceiling(served, *v[:2], v[2]), 2) if v else None,
             "acceptance": round(stats[v].acceptance, 3) if v else None,
             "identical": same[v] == len(prompts), "identical_prompts": same[v]} for v in names]


def batched_rows(served, prompts: list[list[int]], max_new: int, batch: int, policy: dict) -> dict:
    """The deepest tier decoding `batch` prompts at once, greedily and self-speculatively with `policy`, the two
    interleaved batch by batch (the order alternating)."""
    target, draft = served.tiers[served.deepest], served.tiers[policy["draft"]]
    secs, same, stats, tokens = {"greedy": 0.0, "speculative": 0.0}, 0, SpecStats(), 0
    for j in range(0, len(prompts), batch):
        chunk, got = prompts[j:j + batch], {}
        for name in (("greedy", "speculative") if j // batch % 2 == 0 else ("speculative", "greedy")):
            t0 = time.perf_counter()
            if name == "greedy":
                got[name] = generate(target, chunk, [max_new] * len(chunk), served.eos)
            else:
                got[name] = speculative_batch(draft, target, chunk, [max_new] * len(chunk), served.eos,
                                              k=policy["k"], stats=stats, skip=policy["skip"],
                                              min_confidence=policy["min_confidence"])
            secs[name] += time.perf_counter() - t0
        same += sum(a == b for a, b in zip(got["greedy"], got["speculative"]))
        tokens += sum(len(t) for t in got["greedy"])
    return {**policy, "batch": batch, "tokens": tokens, "seconds": {k: round(v, 2) for k, v in secs.items()},
            "speedup": round(secs["greedy"] / secs["speculative"], 3), "acceptance": round(stats.acceptance, 3),
            "identical_prompts": same, "prompts": len(prompts)}


def main() -> None:
    from ruyi_core.serve.cli import load_served

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", type=Path)
    ap.add_argument("--registry")
    ap.add_argument("--version", help="with --registry: this version (default: the promoted packages)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=48, help="held-out questions per model")
    ap.add_argument("--prompts", type=int, default=100, help="prompts for the speculative comparison")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", default="bench/results/serve.json")
    ap.add_argument("--speculative-only", action="store_true", help="skip the concurrent-clients part")
    ap.add_argument("--batched-only", action="store_true",
                    help="only the batched comparison, with the drafting policy of the family's calibration")
    a = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    served = load_served(a.family, a.registry, a.version, None, print)
    qs = questions(a.requests)[: a.requests]
    srv, url = start_server(served, max_batch=a.clients)
    rows = []
    for model in [] if a.speculative_only or a.batched_only else [*served.tiers, "auto"]:
        rows.append(asyncio.run(load(url, f"{served.name}:{model}", qs, a.clients, a.max_tokens)))
        r = rows[-1]
        print(f"{r['model']:<22} {r['requests_per_s']:7.2f} req/s {r['tokens_per_s']:8.1f} tok/s  "
              f"p50 {r['p50_s']:6.3f} s"
              f"  p99 {r['p99_s']:6.3f} s  quality {r['quality']:.3f}")
    srv.should_exit = True
    tok = served.tokenizer
    chats = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for _, q, _ in questions(a.prompts)][: a.prompts]
    prompts = [tok(c)["input_ids"] for c in chats]
    spec = [] if a.batched_only else speculative_rows(served, prompts, a.max_tokens)
    for r in spec:
        print(f"speculative {served.deepest} draft={r['draft']} k={r['k']} skip={r['skip']} "
              f"min_p={r['min_confidence']}: {r['seconds']:.2f} s, speedup {r['speedup']:.2f}x (ceiling "
              f"{r['ceiling']}), acceptance {r['acceptance']}, identical {r['identical']}")
    if spec:
        best = max((r for r in spec if r["draft"]), key=lambda r: r["speedup"])
        policy = {k: best[k] for k in ("draft", "k", "skip", "min_confidence")}
    else:
        d = (served.routing or {}).get("draft") or {"tier": next(iter(served.tiers)), "tokens": 8, "skip": 0,
                                                    "min_p": 0.0}
        policy = {"draft": d["tier"], "k": d["tokens"], "skip": d["skip"], "min_confidence": d["min_p"]}
    batched = batched_rows(served, prompts, a.max_tokens, a.clients, policy)
    print(f"speculative {served.deepest} in batches of {a.clients}, draft={policy['draft']} k={policy['k']} "
          f"skip={policy['skip']} min_p={policy['min_confidence']}: greedy {batched['seconds']['greedy']:.2f} s, "
          f"speculative {batched['seconds']['speculative']:.2f} s, speedup {batched['speedup']:.2f}x, acceptance "
          f"{batched['acceptance']}, identical {batched['identical_prompts']}/{batched['prompts']}")
    out = {"family": served.name, "tiers": {t: served.depth(t) for t in served.tiers}, "clients": a.clients,
           "requests": len(qs), "max_tokens": a.max_tokens, "threads": torch.get_num_threads(), "serve": rows,
           "speculative": spec, "batched": batched}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
