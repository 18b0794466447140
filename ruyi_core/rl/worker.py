"""GRPO as a launched worker, as training is: one process per device under torchrun (TRL's trainer shards the
generation batch over them), the same error protocol and the same death with its parent.

    torchrun --nproc-per-node N -m ruyi_core.rl.worker --spec SPEC --tier DIR --out DIR --prompts JSONL \\
        --heldout JSON [--heldout-text JSON] [--sft JSONL] --trainable JSON

Rank 0 writes the trained policy, rewards.jsonl / .png and result.json (the held-out rewards) to --out. On a
cluster (a TrainJob) the inputs come as one artifact, `--inputs URI` (tier/, prompts.jsonl, heldout.json,
heldout_text.json, sft.jsonl), and rank 0 publishes --out as the artifact `--publish URI`.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m ruyi_core.rl.worker")
    ap.add_argument("--spec", required=True, help="the run spec: a YAML file, or the spec itself as JSON")
    ap.add_argument("--tier", type=Path, help="the exported tier to train")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--prompts", type=Path, help="training prompts, JSONL {prompt, answer}")
    ap.add_argument("--heldout", type=Path, help="held-out prompts, a JSON list")
    ap.add_argument("--heldout-text", type=Path,
                    help="held-out texts, a JSON list: their loss before and after GRPO (GRPO's cost on plain text)")
    ap.add_argument("--sft", type=Path, help="SFT chat turns, JSONL {messages}: what rl.method sft trains on")
    ap.add_argument("--inputs", help="instead of the above: an artifact with tier/, prompts.jsonl, heldout.json, "
                                     "heldout_text.json and sft.jsonl")
    ap.add_argument("--publish", help="rank 0 uploads --out as this artifact")
    ap.add_argument("--trainable", required=True, help="JSON list of the parameter-name prefixes that train")
    args = ap.parse_args(argv)
    if args.inputs is None and None in (args.tier, args.prompts, args.heldout):
        ap.error("pass --tier, --prompts and --heldout, or --inputs")
    return args


# An --inputs artifact's layout, and the worker's options for its parts (--heldout_text as --heldout-text).
INPUTS = {"tier": "tier", "prompts": "prompts.jsonl", "heldout": "heldout.json", "heldout_text": "heldout_text.json",
          "sft": "sft.jsonl"}


def run(args: argparse.Namespace) -> None:
    import tempfile

    import torch

    from ruyi_core.rl.grpo import run_grpo
    from ruyi_core.runtime import for_spec
    from ruyi_core.spec import spec_from_arg

    spec = spec_from_arg(args.spec)
    rank = int(os.environ.get("RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if args.inputs:
        _fetch_inputs(spec, args)
    prompts = _jsonl(args.prompts)
    heldout = json.loads(args.heldout.read_text())
    texts = json.loads(args.heldout_text.read_text()) if args.heldout_text and args.heldout_text.is_file() else []
    turns = _jsonl(args.sft) if args.sft and args.sft.is_file() else []
    with tempfile.TemporaryDirectory(prefix="ruyi-grpo-rank-") as scratch:
        out = args.out if rank == 0 else Path(scratch)  # one writer
        res = run_grpo(args.tier, out, prompts, heldout, json.loads(args.trainable), spec.rl,
                       log=_print if rank == 0 else (lambda m: None), runtime=for_spec(spec), heldout_texts=texts,
                       sft_turns=turns)
    if rank == 0:
        (args.out / "result.json").write_text(json.dumps(res))
        if args.publish:
            from ruyi_core.store import ArtifactStore

            ArtifactStore.from_spec(spec.store).put_artifact(
                args.publish, args.out, stage="grpo_policy", spec_hash=spec.fingerprint(),
                inputs=[args.inputs] if args.inputs else [])


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fetch_inputs(spec, args: argparse.Namespace) -> None:
    """Every process of a node reads the --inputs artifact; each downloads its own copy (a pod's scratch)."""
    from ruyi_core.store import ArtifactStore

    local = args.out.parent / f"grpo-inputs-{os.environ.get('LOCAL_RANK', 0)}"
    ArtifactStore.from_spec(spec.store).get_artifact(args.inputs, local)
    for name, rel in INPUTS.items():
        setattr(args, name, local / rel)


def _print(line: str) -> None:
    print(line, flush=True)  # a pipe to the launcher: no block buffering


def main(argv=None) -> None:
    from ruyi_core.launch import worker_main

    args = parse_args(argv)
    worker_main(lambda: run(args))


if __name__ == "__main__":
    main()
