"""The real-size rehearsal: the whole pipeline, locally, on a family made from a randomly initialised base with
Qwen3-0.6B's exact architecture (28 layers, hidden 1024, 16 / 8 heads of 128, vocabulary 151,936, tied
embeddings), stored as sharded bf16 safetensors under `bases/` in the artifact store, a few steps per stage
(specs/rehearsal.yaml). Prints each stage's wall time and peak memory beside the bytes of the largest model it
handles, and the plan's prediction for the training stages.

    make rehearsal          # starts the local store when RUYI_S3_ENDPOINT is unset
    python bench/rehearsal.py [--spec specs/rehearsal.yaml] [--json PATH]

Not part of `make test`: on 2 CPU cores it takes tens of minutes and ~16 GiB of memory.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from ruyi_core.spec import TRAINING_STAGES

BUILT = re.compile(r"\[(\w+)\] built (\S+) in ([\d.]+) s, peak ([\d,.]+) MiB")


def make_base(spec, store) -> None:
    """The random Qwen3-0.6B-shaped base, bf16, in 300 MB shards, with a tokenizer trained on the demo world
    (the vocabulary stays the architecture's 151,936; the tokenizer uses the first few thousand ids)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from ruyi_core.family.architectures import QWEN3
    from ruyi_core.demo import tokenizer_texts
    from ruyi_core.family.tokenizer import build_tokenizer

    base = spec.family.base
    prefix = store.split(base)[1]
    if store.read_object(f"{prefix}/config.json") is not None:
        print(f"base {base} is in the store", flush=True)
        return
    arch = QWEN3["Qwen3-0.6B"]
    tok = build_tokenizer(4096, tokenizer_texts())
    keep = {k: v for k, v in arch.items() if k not in ("rope_theta", "model_type", "torch_dtype")}
    cfg = Qwen3Config(**keep, rope_parameters={"rope_type": "default", "rope_theta": arch["rope_theta"]},
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(cfg).to(torch.bfloat16)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d, max_shard_size="300MB")
        tok.save_pretrained(d)
        del model
        for f in sorted(Path(d).iterdir()):  # plain objects, as `mc cp -r` leaves them
            store.put_file(f, f"{prefix}/{f.name}")
    print(f"base {base}: random Qwen3-0.6B architecture, bf16, uploaded", flush=True)


def run_pipeline(spec_path: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "pipelines.cli", "pipeline", "run", "--local", "--spec", str(spec_path)]
    rows = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
        for line in p.stdout:
            print(line, end="", flush=True)
            if m := BUILT.search(line):
                rows.append({"stage": m[1], "uri": m[2], "seconds": float(m[3]),
                             "peak_mib": float(m[4].replace(",", ""))})
    if p.returncode:
        sys.exit(f"rehearsal: the pipeline failed (exit {p.returncode}); its log is named above")
    return rows


TRAINING = {"grpo", *TRAINING_STAGES}


def model_sizes(spec, store) -> dict[str, dict]:
    """Per stage: the largest model it holds, in GiB of the dtype it holds it in (a family as saved is bf16; models
    the CPU computes with are fp32), and for the training stages the plan's memory."""
    from ruyi_core.plan import plan_run

    def store_config(base: str) -> dict:
        got = store.read_object(store.split(base)[1].rstrip("/") + "/config.json")
        return json.loads(got[0])

    dev, a, plans = plan_run(spec, "cpu", store_config=store_config)
    exits, gib = spec.family.exit_points, 2**-30
    fam = a.family(exits, spec.family.shared_heads)
    p_dae = spec.family.tiers[spec.dae.tier]
    added = a.tier(p_dae, spec.dae.blocks) - a.tier(p_dae) if spec.dae.enabled else 0
    deepest, end_tier = a.tier(exits[-1]), a.tier(p_dae, spec.dae.blocks if spec.dae.enabled else 0)
    held = {"init_family": (fam, 2, "family, bf16"), "dae_expand": (fam, 4, "family, fp32"),
            "svd_compress": max((fam + added, 2, "family, bf16"), (end_tier, 4, "the end tier, fp32"),
                                key=lambda m: m[0] * m[1]),
            "export_tier": (fam + added, 2, "family, bf16"), "package": (deepest, 4, "deepest tier, fp32"),
            "report": (deepest, 4, "deepest tier, fp32")}
    out = {s: {"model_gib": n * b * gib, "held": what} for s, (n, b, what) in held.items()}
    for p in (p for p in plans if p.stage in TRAINING):
        out[p.stage] = {"model_gib": p.parameters * 4 * gib, "held": "trained, fp32", "plan_gib": p.total * gib}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", type=Path, default=Path("specs/rehearsal.yaml"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from ruyi_core.spec import load_spec
    from ruyi_core.store import ArtifactStore

    spec = load_spec(args.spec)
    store = ArtifactStore.from_spec(spec.store)
    make_base(spec, store)
    rows = run_pipeline(args.spec)
    sizes = model_sizes(spec, store)
    print(f"\n{'stage':<14} {'wall s':>8} {'peak GiB':>9} {'model GiB':>10} {'limit GiB':>10} {'plan GiB':>9}  (model: the "
          "largest model the stage holds; limit: 1.5 x model + 1 GiB, for stages that do not train; plan: "
          "`ruyi plan --gpu cpu`, for those that do)")
    for r in rows:
        peak = r["peak_mib"] / 1024
        if r["stage"] not in sizes:  # data stages: no model
            print(f"{r['stage']:<14} {r['seconds']:>8.1f} {peak:>9.2f}")
            continue
        s = sizes[r["stage"]]
        r |= {"model_gib": round(s["model_gib"], 2), "held": s["held"]}
        if r["stage"] in TRAINING:
            r["plan_gib"] = round(s["plan_gib"], 2)
            cols = f"{'-':>10} {r['plan_gib']:>9.2f}"
        else:
            r["limit_gib"] = round(1.5 * s["model_gib"] + 1, 2)
            r["within_limit"] = peak <= r["limit_gib"]
            cols = f"{r['limit_gib']:>10.2f} {'-':>9}" + ("" if r["within_limit"] else "  OVER")
        print(f"{r['stage']:<14} {r['seconds']:>8.1f} {peak:>9.2f} {r['model_gib']:>10.2f} {cols}  ({s['held']})")
    print(f"total wall {sum(r['seconds'] for r in rows):.0f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
