"""Is the family graded on every seed? The whole demo pipeline once per training seed (the base's random weights,
each training stage's data order), then every published tier's benchmarks as mean ± spread over the seeds, and
per benchmark whether each deeper tier beats the shallower one by more than twice the spread, and, paired by
seed (a seed moves its whole family together), whether it beats it on every seed by a mean gain larger than the
range of the per-seed gains.

    python bench/seeds.py [--spec specs/tiny.yaml] [--seeds 0 1 2] [--json PATH]

Each seed is one family (`<name>-seed<N>`) in the spec's store, except the spec's own seed, which runs the spec as
it is (after `make demo` its stages are already in the store); the data and its held-out sets are the same for
every seed. Not part of `make test`: on 2 CPU cores each seed takes one `make demo` (about 15 minutes). Needs
the store's environment (`set -a; . .ruyi/s3/s3.env; set +a`, or `make store` first).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

LOWER_IS_BETTER = {"perplexity"}


def run_seed(spec_path: Path, seed: int, work: Path) -> tuple[str, dict]:
    """Runs the pipeline for one seed; returns its family name and the spec it ran."""
    data = yaml.safe_load(spec_path.read_text())
    if seed != data["family"].get("seed", 0):  # the spec's own seed runs as it is: a finished demo is reused
        data["family"] = {**data["family"], "name": f"{data['family']['name']}-seed{seed}", "seed": seed}
        train = data.setdefault("train", {})
        for stage in ("cpt", "sft"):
            train[stage] = {**train.get(stage, {}), "seed": 1234 + seed}
    return run_spec(data, work / f"seed{seed}.yaml", f"seed {seed}"), data


def run_spec(data: dict, path: Path, label: str) -> str:
    """Writes the spec to `path`, runs the whole pipeline on it locally and returns its family name."""
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    print(f"== {label}: {data['family']['name']}", flush=True)
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "pipeline", "run", "--local", "--spec", str(path)])
    if r.returncode != 0:
        sys.exit(f"{label}: the pipeline failed (rc {r.returncode})")
    return data["family"]["name"]


def store_for(spec_path: Path):
    """The spec's store (its credentials from the environment)."""
    from ruyi_core.spec import load_spec
    from ruyi_core.store import ArtifactStore

    return ArtifactStore.from_spec(load_spec(spec_path).store)


def scores(spec_path: Path, family: str) -> dict[str, dict[str, float]]:
    """{tier: {benchmark: value}} of the family's newest version."""
    from ruyi_core.package import read_index

    newest = read_index(store_for(spec_path), family)["versions"][-1]
    return {tier: t["metrics"] for tier, t in newest["tiers"].items()}


def summarise(runs: list[dict[str, dict[str, float]]], tiers: list[str], formats: dict[str, str]) -> dict:
    """Per benchmark and tier: mean, spread (half the range over seeds); per step of depth: graded or not."""
    out = {}
    for bench, fmt in formats.items():
        per_tier = {t: [r[t][bench] for r in runs if bench in r.get(t, {})] for t in tiers}
        stats = {t: {"mean": statistics.fmean(v), "spread": (max(v) - min(v)) / 2, "values": v}
                 for t, v in per_tier.items() if v}
        steps = []
        for lo, hi in zip(tiers, tiers[1:]):
            if lo not in stats or hi not in stats:
                continue
            gain = stats[lo]["mean"] - stats[hi]["mean"] if fmt in LOWER_IS_BETTER else \
                stats[hi]["mean"] - stats[lo]["mean"]
            noise = 2 * max(stats[lo]["spread"], stats[hi]["spread"])
            # paired: the seed moves every tier of its family together, so each seed's own gain is compared
            diffs = [a - b if fmt in LOWER_IS_BETTER else b - a
                     for a, b in zip(stats[lo]["values"], stats[hi]["values"])]
            seeds_ok = all(d > 0 for d in diffs)
            paired_noise = max(diffs) - min(diffs)  # twice the spread of the per-seed gains
            steps.append({"from": lo, "to": hi, "gain": gain, "noise": noise, "per_seed_gain": diffs,
                          "graded": gain > noise and seeds_ok, "inverted": gain < -noise,
                          "graded_paired": seeds_ok and statistics.fmean(diffs) > paired_noise})
        out[bench] = {"format": fmt, "tiers": stats, "steps": steps}
    return out


def show(summary: dict, tiers: list[str]) -> None:
    print(f"\n{'benchmark':<22}" + "".join(f"{t:>20}" for t in tiers) + "   graded by depth")
    for bench, s in summary.items():
        cells = "".join(f"{s['tiers'][t]['mean']:>12.4f} ±{s['tiers'][t]['spread']:<7.4f}" if t in s["tiers"]
                        else f"{'—':>20}" for t in tiers)
        verdict = ", ".join(f"{st['from']}→{st['to']} "
                            f"{'yes' if st['graded'] else 'INVERTED' if st['inverted'] else 'no'}"
                            f" ({st['gain']:+.4f} vs noise {st['noise']:.4f}; paired "
                            f"{'yes' if st['graded_paired'] else 'no'})" for st in s["steps"])
        print(f"{bench:<22}{cells}   {verdict}")


def chart(summary: dict, tiers: list[str], path: Path) -> None:
    """One panel per benchmark: each tier's mean over the seeds as a bar, its spread as the error bar."""
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from ruyi_core.plots import png

    names = list(summary)
    fig = Figure(figsize=(2.2 * len(names), 2.8), dpi=100)
    FigureCanvasAgg(fig)
    for i, bench in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        stats = summary[bench]["tiers"]
        shown = [t for t in tiers if t in stats]
        ax.bar(shown, [stats[t]["mean"] for t in shown], yerr=[stats[t]["spread"] for t in shown], capsize=3,
               color="#4c78a8")
        better = "lower" if summary[bench]["format"] in LOWER_IS_BETTER else "higher"
        ax.set_title(f"{bench}\n({better} is better)", fontsize=8)
        ax.tick_params(labelsize=7)
    png(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", type=Path, default=Path("specs/tiny.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path, default=Path("bench/results/seeds.png"))
    args = ap.parse_args()
    from ruyi_core.spec import load_spec

    spec = load_spec(args.spec)
    tiers = sorted(spec.family.tiers, key=spec.family.tiers.get)
    formats = {n: b.format for n, b in spec.eval.benchmarks.items()}
    runs = []
    with tempfile.TemporaryDirectory(prefix="ruyi-seeds-") as tmp:
        for seed in args.seeds:
            family, _ = run_seed(args.spec, seed, Path(tmp))
            runs.append(scores(args.spec, family))
    summary = summarise(runs, tiers, formats)
    print(f"\n{len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}): mean ± spread (half the range)")
    show(summary, tiers)
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    chart(summary, tiers, args.plot)
    print(f"chart: {args.plot}")
    if args.json:
        args.json.write_text(json.dumps({"seeds": args.seeds, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
