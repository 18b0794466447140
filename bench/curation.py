"""The data plane at growing size: peak memory of one shard's curation task and of the merge as the corpus grows
shard by shard, and throughput with 1, 2 and 4 shard tasks at once, each a process of its own, as the pipeline's
fan-out runs them, for curation (curate_shard, then merge_data) and for packing (pack_shard); here without the
store, so what is measured is the work itself.

    python bench/curation.py [--records 8000] [--shards 1 2 4 8] [--parallel 1 2 4] [--json PATH]

Shards hold the same number of English-like synthetic records (about 0.5 kB each, 5% exact and 5% near
duplicates), curated with every step on: language ID, Gopher quality, decontamination, exact and MinHash dedup.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the of and to a in that is was he for it with as his on be at by had not are but from or have an they "
         "which one you were her all she there would their we him been has when who will more no if out so said "
         "river mountain garden market winter letter window kitchen captain village harbour lantern orchard meadow "
         "bridge candle sailor shepherd morning evening silver golden quiet distant narrow ancient").split()


def write_shard(path: Path, n: int, seed: int) -> int:
    """n records, 5% exact copies and 5% one-word edits of earlier ones; returns the file's bytes."""
    rng, texts = random.Random(seed), []
    for _ in range(n):
        r = rng.random()
        if texts and r < 0.05:
            texts.append(rng.choice(texts))
        elif texts and r < 0.10:
            words = rng.choice(texts).split()
            words[rng.randrange(len(words))] = rng.choice(WORDS)
            texts.append(" ".join(words))
        else:
            texts.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(70, 110))) + ".")
    path.write_text("".join(json.dumps({"text": t, "source": "web", "lang": "en"}) + "\n" for t in texts))
    return path.stat().st_size


def spec():
    from ruyi_core.spec.sections import CurationSpec

    return CurationSpec(languages=["en"])


def index():
    from ruyi_core.data.curate import decontamination_index

    return decontamination_index({"bench": ["the quick brown fox jumps over the lazy dog " * 3]}, 13)


def worker(args: list[str]) -> None:
    """One task: `shard FILE OUT` filters a shard; `merge OUT...` deduplicates across the filtered shards. Prints
    its peak RSS in MiB."""
    from ruyi_core.data.curate import RECORDS, deduplicate, filter_shard, surviving

    with tempfile.TemporaryDirectory() as work:
        if args[0] == "shard":
            filter_shard([args[1]], "pretrain", spec(), index(), Path(work), Path(args[2]))
        elif args[0] == "pack":  # `pack CURATED TOKENIZER OUT`: pack_shard's work on a curated shard
            from transformers import AutoTokenizer

            from ruyi_core.data.pack import prepare_corpus

            assert (Path(args[1]) / RECORDS).is_file()
            prepare_corpus(surviving(Path(args[1]), set()), "pretrain", AutoTokenizer.from_pretrained(args[2]),
                           Path(args[3]), 50_000_000, progress=False)
        else:
            deduplicate([Path(a) for a in args[1:]], spec(), Path(work))
    print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run(args: list[str]) -> float:
    out = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def fan_out(tasks: list[list[str]], parallel: int) -> list[float]:
    """Each task's worker process, `parallel` at a time; their peaks (MiB)."""
    peaks, pending, running = [], list(tasks), []
    while pending or running:
        while pending and len(running) < parallel:
            running.append(subprocess.Popen([sys.executable, __file__, "--worker", *pending.pop(0)],
                                            stdout=subprocess.PIPE, text=True))
        p = running.pop(0)
        stdout, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"a shard task failed ({p.returncode})")
        peaks.append(json.loads(stdout.strip().splitlines()[-1])["peak_mib"])
    return peaks


def curate_all(files: list[Path], out: Path, parallel: int) -> tuple[float, float, float]:
    """Every shard's task, `parallel` at a time, then the merge: (wall s, max shard-task peak MiB, merge peak)."""
    start = time.perf_counter()
    peaks = fan_out([["shard", str(f), str(out / f"s{i:03d}")] for i, f in enumerate(files)], parallel)
    merge = run(["merge", *(str(out / f"s{i:03d}") for i in range(len(files)))])
    return time.perf_counter() - start, max(peaks), merge


def pack_all(curated: list[Path], tok: Path, out: Path, parallel: int) -> tuple[float, float]:
    """Every curated shard packed, `parallel` tasks at a time: (wall s, max task peak MiB)."""
    start = time.perf_counter()
    peaks = fan_out([["pack", str(c), str(tok), str(out / f"p{i:03d}")] for i, c in enumerate(curated)], parallel)
    return time.perf_counter() - start, max(peaks)


def tokenizer(files: list[Path], out: Path) -> Path:
    from ruyi_core.family.tokenizer import build_tokenizer

    texts = [json.loads(line)["text"] for line in files[0].read_text().splitlines()[:500]]
    build_tokenizer(4096, texts).save_pretrained(out)
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=8000, help="records per shard")
    ap.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--parallel", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--json")
    a = ap.parse_args()
    result = {"cpus": os.cpu_count(), "records_per_shard": a.records, "growth": [], "parallel": []}
    with tempfile.TemporaryDirectory() as tmp:
        files = [Path(tmp) / f"shard{i:03d}.jsonl" for i in range(max(a.shards))]
        mb = [write_shard(f, a.records, i) / 1e6 for i, f in enumerate(files)]
        print(f"{a.records:,} records a shard, {mb[0]:.1f} MB; {os.cpu_count()} CPUs\n")
        print(f"{'shards':>6} {'corpus MB':>9} {'shard task peak MiB':>19} {'merge peak MiB':>14} {'wall s':>7}")
        for n in a.shards:
            wall, shard_peak, merge_peak = curate_all(files[:n], Path(tmp) / f"grow{n}", 1)
            result["growth"].append({"shards": n, "mb": sum(mb[:n]), "shard_peak_mib": shard_peak,
                                     "merge_peak_mib": merge_peak, "wall_s": wall})
            print(f"{n:>6} {sum(mb[:n]):>9.1f} {shard_peak:>19.0f} {merge_peak:>14.0f} {wall:>7.1f}")
        n = min(4, len(files))
        print(f"\n{n} shards, tasks at once: wall time and throughput (side by side, one run)")
        base = None
        for p in a.parallel:
            wall, _, _ = curate_all(files[:n], Path(tmp) / f"par{p}", p)
            base = base or wall
            result["parallel"].append({"tasks": p, "wall_s": wall, "mb_per_s": sum(mb[:n]) / wall})
            print(f"  {p} at once: {wall:6.1f} s  {sum(mb[:n]) / wall:5.2f} MB/s  speedup {base / wall:4.2f}x")
        tok, curated = tokenizer(files, Path(tmp) / "tok"), [Path(tmp) / f"par1/s{i:03d}" for i in range(n)]
        print(f"\n{n} curated shards packed, tasks at once: wall time, throughput (of the raw MB) and peak")
        base, result["pack"] = None, []
        for p in a.parallel:
            wall, peak = pack_all(curated, tok, Path(tmp) / f"pack{p}", p)
            base = base or wall
            result["pack"].append({"tasks": p, "wall_s": wall, "mb_per_s": sum(mb[:n]) / wall, "peak_mib": peak})
            print(f"  {p} at once: {wall:6.1f} s  {sum(mb[:n]) / wall:5.2f} MB/s  speedup {base / wall:4.2f}x  "
                  f"task peak {peak:.0f} MiB")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
