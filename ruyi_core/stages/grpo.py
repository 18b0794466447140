"""GRPO as a pipeline stage, on the spec's `rl.tier` (the DaE tier, after its training, when DaE is on)."""
from __future__ import annotations

import json
from pathlib import Path

from pydantic import ConfigDict

from ruyi_core.spec import RunSpec
from ruyi_core.stages.contract import Artifact, Stage, StageRun, run_stage
from ruyi_core.stages.data import corpus_records
from ruyi_core.stages.family import load_for_tier
from ruyi_core.store import ArtifactStore


class Grpo(Artifact):
    model_config = ConfigDict(extra="allow")  # plus run_grpo's measurements (rewards before / after, ...)
    tier: str


GRPO = Stage("grpo", Grpo, ("rl", "data.rl_heldout", "data.heldout", "data.seed"))


def grpo(spec: RunSpec, store: ArtifactStore, family: str, rl_raw: str, sft_raw: str | None = None) -> Grpo:
    """GRPO (TRL) on the exported tier with only its own parameters trainable, merged back into the family. It runs
    as training does, on the training launcher: torchrun here, or a TrainJob on the cluster; one worker per GPU
    the `grpo` step is given (one on the CPU). `rl.method: sft` (GRPO's control) trains the same parameters for
    the same steps by SFT on `sft_raw`'s turns instead."""
    if spec.rl.method == "sft" and sft_raw is None:
        raise ValueError("rl.method sft trains on the SFT corpus: pass its dataset")

    def build(run: StageRun) -> dict:
        from ruyi_core.dae.expand import merge_tier, tier_own_prefixes
        from ruyi_core.family.convert import export_tier
        from ruyi_core.family.io import save_family
        from ruyi_core.rl.worker import INPUTS

        tier = spec.rl.tier
        fam, tok = load_for_tier(run, "rl", tier, stored=True)
        given = run.work / "grpo-inputs"  # laid out as the worker's --inputs artifact
        export_tier(fam, tier, given / INPUTS["tier"], tok)
        own = tier_own_prefixes(fam.config, tier)
        del fam  # not held while the workers train: read again for the merge
        _write_prompts(run, given)
        policy = run.work / "policy"
        _train_policy(run, given, policy, ["--spec", spec.model_dump_json(), "--trainable", json.dumps(own)])
        res = json.loads((policy / "result.json").read_text())
        fam, tok = load_for_tier(run, "rl", tier, stored=True)
        merge_tier(fam, tier, _policy_state(policy), own)
        save_family(fam, tok, run.out)
        for f in ("rewards.jsonl", "rewards.png"):
            if (policy / f).is_file():
                (run.out / f).write_bytes((policy / f).read_bytes())
        return {"tier": tier, **{k: v for k, v in res.items() if isinstance(v, (int, float, str)) and k != "path"}}

    inputs = {"family": family, "rl": rl_raw} | ({"sft": sft_raw} if spec.rl.method == "sft" else {})
    return run_stage(GRPO, spec, store, build, inputs=inputs)


def _write_prompts(run: StageRun, given: Path) -> None:
    """The worker's prompts and held-out sets (and the SFT turns its control trains on), beside the exported tier."""
    from ruyi_core.eval.heldout import heldout_prompts, heldout_texts
    from ruyi_core.rl.worker import INPUTS

    with (given / INPUTS["prompts"]).open("w") as f:
        for rec in corpus_records(run, "rl"):
            f.write(json.dumps(rec) + "\n")
    (given / INPUTS["heldout"]).write_text(json.dumps(heldout_prompts(run.spec, run.work, run.store)))
    (given / INPUTS["heldout_text"]).write_text(json.dumps(heldout_texts(run.spec, run.work, run.store)))
    if run.spec.rl.method == "sft":
        with (given / INPUTS["sft"]).open("w") as f:
            for rec in corpus_records(run, "sft"):
                f.write(json.dumps({"messages": rec["messages"]}) + "\n")


def _train_policy(run: StageRun, given: Path, policy: Path, args: list[str]) -> None:
    """The GRPO workers: torchrun here, or a TrainJob whose inputs and policy travel through the store (deleted
    once the stage's output is stored)."""
    from ruyi_core.launch import run_child, torchrun
    from ruyi_core.rl.worker import INPUTS

    spec, store = run.spec, run.store
    if spec.train.launcher == "local":
        workers = max(1, spec.pipeline.resources_for("grpo").gpus)
        parts = [a for n, rel in INPUTS.items() for a in (f"--{n.replace('_', '-')}", str(given / rel))]
        run_child(torchrun(workers, "ruyi_core.rl.worker", [*args, "--out", str(policy), *parts],
                           run.work / "torchrun"), run.log)
        return
    from ruyi_core.megatron.trainjob import grpo_workers, run_trainjob

    sent, got = store.uri(f"{run.key}/inputs"), store.uri(f"{run.key}/policy")
    store.put_artifact(sent, given, stage="grpo_inputs", spec_hash="", inputs=list(run.inputs.values()))
    run.scratch += [sent, got]
    run_trainjob(spec, "grpo", f"{spec.family.name}-grpo-{run.key.rsplit('/', 1)[-1][:8]}",
                 [*args, "--inputs", sent, "--publish", got, "--out", "/scratch/grpo"],
                 workers=grpo_workers(spec), log=run.log)
    store.get_artifact(got, policy)


def _policy_state(policy: Path) -> dict:
    from safetensors.torch import load_file

    state = {}
    for f in sorted(policy.glob("*.safetensors")):
        state.update(load_file(f))
    return state
