"""Packing speed: tokens/s of `prepare_corpus` (tokenize + SFT masks + megatron .bin/.idx writing + hashing)
beside raw `tokenizers` batch encoding of the same texts (pretrain: the texts; sft: the chat-template
renderings), measured in interleaved rounds and reported as medians and their ratio.

    python bench/data_prep.py [--rounds 5] [--repeat 4] [--out bench/results/data_prep.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from ruyi_core.demo import tokenizer_texts
from ruyi_core.demo import world
from ruyi_core.data.pack import prepare_corpus
from ruyi_core.family.tokenizer import build_tokenizer


def raw_encode(tok, texts: list[str]) -> int:
    enc = tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    return sum(len(e.ids) for e in enc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=4, help="corpus = demo records repeated this many times")
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--out", default="bench/results/data_prep.json")
    a = ap.parse_args()
    tok = build_tokenizer(a.vocab, tokenizer_texts())
    corpora = {
        "pretrain": world.pretrain_records(4000) * a.repeat,
        "sft": world.sft_records(1500) * a.repeat,
    }
    texts = {
        "pretrain": [r["text"] for r in corpora["pretrain"]],
        "sft": [tok.apply_chat_template(r["messages"], tokenize=False) for r in corpora["sft"]],
    }
    samples = {k: {"prepare": [], "raw": []} for k in corpora}
    tokens = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, recs in corpora.items():  # warm-up: imports, template compilation, page cache
            prepare_corpus(recs[:200], kind, tok, Path(tmp) / kind, progress=False)
            raw_encode(tok, texts[kind][:200])
        for _ in range(a.rounds):
            for kind, recs in corpora.items():
                t0 = time.perf_counter()
                res = prepare_corpus(recs, kind, tok, Path(tmp) / kind, shard_tokens=10**9, progress=False)
                samples[kind]["prepare"].append(res.n_tokens / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                n = raw_encode(tok, texts[kind])
                samples[kind]["raw"].append(n / (time.perf_counter() - t0))
                tokens[kind] = {"packed": res.n_tokens, "raw": n, "docs": res.n_docs}
    rows = {}
    for kind, s in samples.items():
        prep, raw = statistics.median(s["prepare"]), statistics.median(s["raw"])
        rows[kind] = {"prepare_tok_s": round(prep), "raw_encode_tok_s": round(raw),
                      "ratio_prepare_over_raw": round(prep / raw, 3), **tokens[kind]}
        print(f"{kind:9s} prepare {prep / 1e3:8.0f}K tok/s   raw encode_batch {raw / 1e3:8.0f}K tok/s   "
              f"ratio {prep / raw:.2f}   ({tokens[kind]['docs']} docs, {tokens[kind]['packed']} tokens)")
    out = {"rows": rows, "rounds": a.rounds, "repeat": a.repeat, "vocab": a.vocab, "cpus": os.cpu_count(),
           "python": platform.python_version(), "note": "packed tokens include one EOS per document"}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
