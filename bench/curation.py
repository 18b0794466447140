"""The curation data plane at growing size: peak memory of one shard's task and of the merge as the corpus grows
shard by shard, and throughput with 1, 2 and 4 shard tasks at once, each a process of its own, as the pipeline's
fan-out runs them (here without the store, so what is measured is the curation itself).

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
    from ruyi_core.data.curate import deduplicate, filter_shard

    with tempfile.TemporaryDirectory() as work:
        if args[0] == "shard":
            filter_shard([args[1]], "pretrain", spec(), index(), Path(work), Path(args[2]))
        else:
            deduplicate([Path(a) for a in args[1:]], spec(), Path(work))
    print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run(args: list[str]) -> float:
    out = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def curate_all(files: list[Path], out: Path, parallel: int) -> tuple[float, float, float]:
    """Every shard's task, `parallel` at a time, then the merge: (wall s, max shard-task peak MiB, merge peak)."""
    start, peaks, pending, running = time.perf_counter(), [], list(enumerate(files)), []
    while pending or running:
        while pending and len(running) < parallel:
            i, f = pending.pop(0)
            running.append(subprocess.Popen([sys.executable, __file__, "--worker", "shard", str(f),
                                             str(out / f"s{i:03d}")], stdout=subprocess.PIPE, text=True))
        p = running.pop(0)
        stdout, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"a shard task failed ({p.returncode})")
        peaks.append(json.loads(stdout.strip().splitlines()[-1])["peak_mib"])
    merge = run(["merge", *(str(out / f"s{i:03d}") for i in range(len(files)))])
    return time.perf_counter() - start, max(peaks), merge


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
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
