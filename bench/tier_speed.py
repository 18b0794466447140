"""Per-tier speed on the CPU with the KV cache: prefill and decode tokens/s, and each tier's decode speed over
the full model's beside the ideal ratio from layer counts. Each run is the eval stage's measurement
(ruyi_core.eval.speed); tiers are measured interleaved, round by round, and reported as medians, so machine
noise hits every tier alike.

    python bench/tier_speed.py --spec specs/tiny.yaml [--rounds 5] [--out bench/results/tier_speed.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from ruyi_core.demo import tokenizer_texts
from ruyi_core.eval.speed import prefill_and_decode, random_prompt
from ruyi_core.family.io import init_family
from ruyi_core.spec import load_spec


def measure(model, exit_point: int, prompt_len: int, new_tokens: int, vocab: int) -> tuple[float, float]:
    """(prefill, decode) tokens/s of one run."""
    prefill, decode = prefill_and_decode(model, random_prompt(prompt_len, vocab, 0, torch.device("cpu")),
                                         new_tokens, exit_point)
    return prompt_len / prefill, new_tokens / decode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="specs/tiny.yaml")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 = least noisy)")
    ap.add_argument("--out", default="bench/results/tier_speed.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    fam, _ = init_family(load_spec(a.spec).family, tokenizer_texts())
    fam.eval()
    cfg = fam.config
    tiers = sorted(cfg.tiers.items(), key=lambda kv: kv[1])
    samples = {t: ([], []) for t, _ in tiers}
    for t, p in tiers:  # warm-up
        measure(fam, p, 16, 4, cfg.vocab_size)
    for _ in range(a.rounds):
        for t, p in tiers:
            pf, dc = measure(fam, p, a.prompt_len, a.new_tokens, cfg.vocab_size)
            samples[t][0].append(pf)
            samples[t][1].append(dc)
    full_tier, full_p = tiers[-1]
    full_decode = statistics.median(samples[full_tier][1])
    rows = []
    for t, p in tiers:
        decode = statistics.median(samples[t][1])
        rows.append({"tier": t, "exit_point": p, "depth": p + 1, "parameters": fam.tier_parameter_count(p),
                     "prefill_tok_s": round(statistics.median(samples[t][0]), 1), "decode_tok_s": round(decode, 1),
                     "decode_vs_full": round(decode / full_decode, 2),
                     "ideal_vs_full": round((full_p + 1) / (p + 1), 2)})
    head = f"{'tier':<7}{'exit':>5}{'depth':>6}{'params':>10}{'prefill/s':>11}{'decode/s':>10}{'x full':>8}{'ideal':>7}"
    print(head)
    for r in rows:
        print(f"{r['tier']:<7}{r['exit_point']:>5}{r['depth']:>6}{r['parameters'] / 1e6:>9.2f}M"
              f"{r['prefill_tok_s']:>11.0f}{r['decode_tok_s']:>10.0f}{r['decode_vs_full']:>8.2f}{r['ideal_vs_full']:>7.2f}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"spec": a.spec, "rounds": a.rounds, "prompt_len": a.prompt_len,
                               "new_tokens": a.new_tokens, "threads": a.threads, "tiers": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
