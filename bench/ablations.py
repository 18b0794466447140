"""What each part of the recipe buys, against a control that gets the same compute without it. Each ablation is a
spec switch over the given spec (so a user can run it at scale), run as its own family `<name>-<ablation>`, and
compared tier by tier with the spec's own family (its newest version: run `make demo` or the spec first). The
comparisons are recorded with that version in the registry (models/<family>/<version>/ablations.json), and the
spec runs once more, reusing every stage, so that the run's report shows them.

    python bench/ablations.py [--spec specs/tiny.yaml] [--only familial_tax no_replay] [--json PATH]

- familial_tax: the same tokens, the same steps, but only the deepest exit in the loss (a single-exit model).
  The family's deepest tier should lose little against it (the Ruyi2 report: within a few percent).
- no_replay: SFT without the pretraining replay; the deep tiers' held-out text loss shows what replay protects.
- dae_control: DaE's steps (the same CPT and SFT steps, batches and learning rates) train the DaE tier's own
  block, norm and head without expanding it (`dae.expand: false`), so the family's DaE tier is compared with a
  tier that got the same extra compute. GRPO runs in both; only the family's tier is SVD-compressed (the
  control adds nothing to compress), which costs it a little.
- grpo_control: GRPO's steps on the same tier and parameters, as SFT on the SFT corpus's turns (`rl.method: sft`),
  so the tuned tier is compared with a tier that got the same extra steps; the held-out reward is GRPO's own
  measure (its stage's manifest), and every other tier must stay bit-identical in both.

familial_tax and no_replay switch off DaE and GRPO in the ablated run: they train only the smallest tier,
which neither comparison reads. Not part of `make test`: on 2 CPU cores each ablation is most of one
`make demo`. Needs the store's environment (`set -a; . .ruyi/s3/s3.env; set +a`).
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import yaml

from seeds import LOWER_IS_BETTER, run_spec, scores, store_for

OFF = {"dae": {"enabled": False}, "rl": {"enabled": False}}
# name -> what it measures, its spec switches (given the exit count), the tiers it compares (given the spec).
ABLATIONS = {
    "familial_tax": {"what": "the family's deepest exit vs a single-exit model on the same tokens",
                     "switch": lambda n: {"train": {s: {"loss": {"weights": [0.0] * (n - 1) + [1.0]}}
                                                       for s in ("cpt", "sft")}, **OFF},
                     "compare": lambda d, tiers: tiers[-1:]},
    "no_replay": {"what": "SFT with replay (the family) vs without (the ablation)",
                  "switch": lambda n: {"train": {"sft": {"replay": 0.0}}, **OFF},
                  "compare": lambda d, tiers: tiers[1:]},
    "dae_control": {"what": "the DaE tier expanded (the family) vs the same DaE steps without expansion",
                    "switch": lambda n: {"dae": {"expand": False}},
                    "compare": lambda d, tiers: [(d.get("dae") or {}).get("tier", "end")]},
    "grpo_control": {"what": "GRPO on its tier (the family) vs the same steps of SFT on the same parameters",
                     "switch": lambda n: {"rl": {"method": "sft"}},
                     "compare": lambda d, tiers: [(d.get("rl") or {}).get("tier", "end")]},
}
# The GRPO stage's own measures, compared beside the benchmarks (its manifest's metadata).
GRPO_MEASURES = {"heldout_reward_after": "held-out reward", "heldout_exact_greedy_after": "held-out exact (greedy)",
                 "heldout_text_loss_after": "held-out text loss"}


def merged(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merged(out.get(k) or {}, v) if isinstance(v, dict) else v
    return out


def ablated_spec(data: dict, name: str) -> dict:
    """The spec with the ablation's switches on, under the family name `<name>-<ablation>`."""
    out = merged(data, ABLATIONS[name]["switch"](len(data["family"]["exit_points"])))
    out["family"]["name"] = f"{data['family']['name']}-{name.replace('_', '-')}"
    return out


def run(spec_path: Path, name: str, work: Path) -> str:
    data = ablated_spec(yaml.safe_load(spec_path.read_text()), name)
    return run_spec(data, work / f"{name}.yaml", f"{name} ({ABLATIONS[name]['what']})")


def grpo_measures(spec_path: Path, family: str, tier: str) -> dict[str, float]:
    """The GRPO stage's held-out measures behind the newest version's `tier` package ({} without GRPO)."""
    from ruyi_core.package import read_index
    from ruyi_core.store import lineage

    store = store_for(spec_path)
    uri = read_index(store, family)["versions"][-1]["tiers"][tier]["uri"]
    grpo = next((m.metadata for m in lineage(store, uri) if m.stage == "grpo"), {})
    return {name: grpo[k] for k, name in GRPO_MEASURES.items() if grpo.get(k) is not None}


def compare(family: dict, ablated: dict, tiers: list[str], formats: dict[str, str]) -> list[dict]:
    """Per compared tier and benchmark: the family's value, the ablation's, and how much better the family is
    (relative, positive = the family is better)."""
    rows = []
    for tier in tiers:
        for bench, fmt in formats.items():
            a, b = family.get(tier, {}).get(bench), ablated.get(tier, {}).get(bench)
            if a is None or b is None:
                continue
            gain = (b - a) if fmt in LOWER_IS_BETTER else (a - b)
            rows.append({"tier": tier, "benchmark": bench, "family": a, "ablation": b,
                         "family_better_by": gain / abs(b) if b else 0.0})
    return rows


def record(spec_path: Path, family: str, results: dict, ablated: dict[str, str]) -> None:
    """Records each ablation with the family's newest version in the registry, then runs the spec again: every
    stage is reused and the run's report is rendered again, now with the ablations."""
    from ruyi_core.package import read_index
    from ruyi_core.package.registry import record_ablation

    store = store_for(spec_path)
    version = read_index(store, family)["versions"][-1]["version"]
    for name, rows in results.items():
        entry = {"what": ABLATIONS[name]["what"], "ablated_family": ablated[name], "rows": rows}
        record_ablation(store, family, version, name, entry)
    with tempfile.TemporaryDirectory(prefix="ruyi-ablations-") as tmp:
        run_spec(yaml.safe_load(spec_path.read_text()), Path(tmp) / "spec.yaml", f"{family}: the report again")
    print(f"recorded with {family} version {version}; the run's report shows them")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", type=Path, default=Path("specs/tiny.yaml"))
    ap.add_argument("--only", nargs="+", choices=list(ABLATIONS), default=list(ABLATIONS))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from ruyi_core.spec import load_spec

    spec = load_spec(args.spec)
    tiers = sorted(spec.family.tiers, key=spec.family.tiers.get)
    formats = {n: b.format for n, b in spec.eval.benchmarks.items()}
    base = scores(args.spec, spec.family.name)
    results, ablated_names = {}, {}
    with tempfile.TemporaryDirectory(prefix="ruyi-ablations-") as tmp:
        for name in args.only:
            compared = ABLATIONS[name]["compare"](yaml.safe_load(args.spec.read_text()), tiers)
            ablated = ablated_names[name] = run(args.spec, name, Path(tmp))
            results[name] = compare(base, scores(args.spec, ablated), compared, formats)
            if name == "grpo_control":
                fam, abl = ({t: grpo_measures(args.spec, f, t) for t in compared} for f in (spec.family.name, ablated))
                results[name] += compare(fam, abl, compared, {m: "perplexity" if "loss" in m else "accuracy"
                                                              for m in GRPO_MEASURES.values()})
    record(args.spec, spec.family.name, results, ablated_names)
    for name, rows in results.items():
        print(f"\n{name}: {ABLATIONS[name]['what']}")
        print(f"{'tier':<8}{'benchmark':<22}{'family':>12}{'ablation':>12}{'family better by':>18}")
        for r in rows:
            print(f"{r['tier']:<8}{r['benchmark']:<22}{r['family']:>12.4f}{r['ablation']:>12.4f}"
                  f"{r['family_better_by']:>+17.2%}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
