"""Peak memory of the data gate and of packing on a large corpus (default 1 GiB of JSONL): each phase runs in
its own process and reports its peak resident memory (ruyi_core.measure) and wall time, next to a baseline process
that only imports the same modules and loads the tokenizer. Memory that grew with the corpus would show as
peak minus baseline growing with --mb; run it at two sizes to see the slope.

    python bench/gate_memory.py [--mb 1024] [--doc-chars 2000] [--out bench/results/gate_memory.json]

The corpus is generated (seeded, unique documents of random words), written to a temporary folder and removed
afterwards; the packed dataset too.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PHASES = {
    # every phase imports what the largest one needs, so peak - baseline is the corpus's share
    "baseline": "pass",
    "validate": "res = gate_or_raise(validate_corpus([corpus], 'pretrain'))",
    "validate+prepare": ("res = gate_or_raise(validate_corpus([corpus], 'pretrain'))\n"
                         "prepare_corpus(res.iter_records(), 'pretrain', tok, out, total=res.n_records, "
                         "progress=False)"),
}
CHILD = """
import json, sys, time
from pathlib import Path
from transformers import AutoTokenizer
from ruyi_core.data.pack import prepare_corpus
from ruyi_core.data.validate import gate_or_raise, validate_corpus
from ruyi_core.measure import peak_rss_mib
corpus, out = Path(sys.argv[1]), Path(sys.argv[2])
tok = AutoTokenizer.from_pretrained(sys.argv[3])
t0 = time.perf_counter()
{body}
print(json.dumps({{"seconds": round(time.perf_counter() - t0, 1),
                  "peak_rss_mib": round(peak_rss_mib())}}))
"""


def write_corpus(path: Path, mb: int, doc_chars: int, seed: int = 0) -> int:
    """Unique documents of random lowercase words until the file holds `mb` MiB; returns the count."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, n)) for n in rng.integers(2, 10, 20_000)]
    target, n = mb * 2**20, 0
    with path.open("w", encoding="utf-8") as f:
        while f.tell() < target:
            idx = rng.integers(0, len(words), doc_chars // 6)
            text = " ".join(words[i] for i in idx)
            f.write(json.dumps({"text": text, "source": "web", "lang": "en"}) + "\n")
            n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=1024, help="corpus size in MiB")
    ap.add_argument("--doc-chars", type=int, default=2000, help="mean characters per document")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--out", default="bench/results/gate_memory.json")
    a = ap.parse_args()
    from ruyi_core.demo import tokenizer_texts
    from ruyi_core.family.tokenizer import build_tokenizer

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_tokenizer(a.vocab, tokenizer_texts()).save_pretrained(tmp / "tok")
        t0 = time.perf_counter()
        n_docs = write_corpus(tmp / "corpus.jsonl", a.mb, a.doc_chars)
        size = (tmp / "corpus.jsonl").stat().st_size
        print(f"corpus: {size / 2**20:.0f} MiB, {n_docs:,} documents (written in {time.perf_counter() - t0:.0f} s)")
        for name, body in PHASES.items():
            out = subprocess.run([sys.executable, "-c", CHILD.format(body=body), str(tmp / "corpus.jsonl"),
                                  str(tmp / "packed"), str(tmp / "tok")], capture_output=True, text=True,
                                 env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if out.returncode:
                sys.exit(f"{name} failed: {out.stderr.strip().splitlines()[-1]}")
            rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{name:18s} peak RSS {rows[name]['peak_rss_mib']:6d} MiB   {rows[name]['seconds']:7.1f} s")
    base = rows["baseline"]["peak_rss_mib"]
    for name in ("validate", "validate+prepare"):
        rows[name]["above_baseline_mib"] = rows[name]["peak_rss_mib"] - base
    print(f"above baseline: validate {rows['validate']['above_baseline_mib']} MiB, validate+prepare "
          f"{rows['validate+prepare']['above_baseline_mib']} MiB for a {size / 2**20:.0f} MiB corpus")
    result = {"corpus_mib": round(size / 2**20), "documents": n_docs, "doc_chars": a.doc_chars, "phases": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
