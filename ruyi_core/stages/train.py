"""Training stages (CPT, SFT, and DaE's CPT and SFT of the expanded tier): run the trainer (a local torchrun, or a
Kubeflow Trainer v2 TrainJob) on the family; one local rank reads and writes the HF family itself, other layouts
convert it to a megatron checkpoint and the result back.

Every input and checkpoint lives in the store under the stage's key, so a stage killed anywhere resumes from its
latest complete checkpoint when run again, on either launcher.
"""
from __future__ import annotations

import json
import sys

from ruyi_core.errors import RuyiError
from ruyi_core.launch import run_child, torchrun
from ruyi_core.spec import TRAINING_STAGES, RunSpec, training_kind, training_stages
from ruyi_core.stages.contract import Artifact, Stage, StageRun, _print, run_stage
from ruyi_core.stages.data import PackedDataset
from ruyi_core.store import ArtifactStore


class Trained(Artifact):
    stage: str
    steps: int
    exit_points: list[int]
    first_exit_losses: list[float]
    final_exit_losses: list[float]


# The parallel layout and precision are in the identity (they change the arithmetic); the launcher is not.
# cpt 2: the text stream is reshuffled by document every epoch; sft 3: SFT windows hold whole conversations,
# repacked every epoch (megatron/data.py); dae_cpt 3, dae_sft 4: the loss history holds the tier's exit only (an
# older checkpoint's would not resume).
_VERSIONS = {"cpt": 2, "sft": 3, "dae_cpt": 3, "dae_sft": 4}
TRAIN = {name: Stage(name, Trained, (settings, *(("dae.tier",) if name in training_stages("dae") else ()),
                                     "train.parallel", "train.precision"), version=_VERSIONS[name])
         for name, settings in TRAINING_STAGES.items()}


def training_data(spec: RunSpec, stage: str, packed: list[PackedDataset]) -> tuple[str, str | None]:
    """(data, replay) URIs for a training stage: its kind's packed dataset, and pretraining text for replay."""
    kind = training_kind(stage)
    by_kind = {p.kind: p.uri for p in packed}
    return by_kind[kind], by_kind["pretrain"] if spec.train_stage(stage).replay else None


def train(spec: RunSpec, store: ArtifactStore, stage: str, family: str, data: str, replay: str | None = None,
          log=_print) -> Trained:
    """Joint multi-exit training of the family at `family` on the packed dataset `data` (SFT stages with `replay`
    also on pretraining windows from `replay`); the result is an HF family with per-exit loss logs and curves."""
    if stage not in TRAIN:
        raise RuyiError(f"unknown training stage {stage!r}: one of {', '.join(TRAIN)}")
    if spec.train_stage(stage).replay and replay is None:
        raise RuyiError(f"{stage}: replay {spec.train_stage(stage).replay} needs a packed pretraining dataset")
    replay = replay if spec.train_stage(stage).replay else None

    def build(run: StageRun) -> dict:
        return _train(run, stage)

    return run_stage(TRAIN[stage], spec, store, build, inputs={"family": family, "data": data, "replay": replay},
                     log=log)


def _starting_checkpoint(run: StageRun, fam_dir, stage: str) -> str:
    """The family as a megatron checkpoint, the trainer's --init: a local folder for a local trainer; for a
    TrainJob, an artifact under the stage's key (kept across re-runs until the stage's output is stored)."""
    local, init = run.work / "init", f"{run.key}/init"
    if run.spec.train.launcher != "local" and run.store.has_artifact(init):
        run.scratch.append(init)
        return run.store.uri(init)
    run_child([sys.executable, "-m", "ruyi_core.megatron.ckpt", "from-hf", "--family", str(fam_dir),
               "--out", str(local)], run.log)
    if run.spec.train.launcher == "local":
        return str(local)
    run.store.put_artifact(init, local, stage=f"{stage}_init", spec_hash="", inputs=[run.inputs["family"]])
    run.scratch.append(init)
    return run.store.uri(init)


def _train(run: StageRun, stage: str) -> dict:
    from ruyi_core.megatron.ckpt import DONE
    from ruyi_core.megatron.launch import validate_layout
    from ruyi_core.megatron.storage import stored_checkpoints

    spec, store, st = run.spec, run.store, run.spec.train_stage(stage)
    fam_dir = run.fetch("family")
    validate_layout(spec, json.loads((fam_dir / "config.json").read_text()), stage)
    # One local rank reads and writes the HF family itself; otherwise converter processes on both sides.
    one_rank = spec.train.launcher == "local" and spec.train.parallel.world_size == 1
    init = ["--init-hf", str(fam_dir), "--export", str(run.out)] if one_rank else [
        "--init", _starting_checkpoint(run, fam_dir, stage)]
    args = ["--stage", stage, "--spec", spec.model_dump_json(), "--family", run.inputs["family"], *init,
            "--data", run.inputs["data"], "--ckpt-prefix", f"{run.key}/checkpoints",
            "--resume", "--log-every", str(max(1, st.steps // 10))]
    if "replay" in run.inputs:
        args += ["--replay", run.inputs["replay"]]
    if spec.train.launcher == "local":
        run_child(torchrun(spec.train.parallel.world_size, "ruyi_core.megatron.trainer",
                           [*args, "--out", str(run.work / "run")], run.work / "torchrun"), run.log)
    else:
        from ruyi_core.megatron.trainjob import run_trainjob

        # --out is the pod's scratch volume, shared by the ranks of a node; the job is named for this artifact.
        run_trainjob(spec, stage, f"{spec.family.name}-{stage}-{run.key.rsplit('/', 1)[-1][:8]}",
                     [*args, "--out", "/scratch/run"], log=run.log)
    stored = stored_checkpoints(store, f"{run.key}/checkpoints")
    final = run.work / "run" / "checkpoints" / stored[-1].rsplit("/", 1)[-1]
    if not (final / DONE).is_file():  # trained elsewhere (a TrainJob), or resumed from the store
        final = run.work / "final"
        store.get_artifact(stored[-1], final)
    if not one_rank:
        run_child([sys.executable, "-m", "ruyi_core.megatron.ckpt", "to-hf", "--ckpt", str(final), "--family",
                   str(fam_dir), "--out", str(run.out)], run.log)
    history = [json.loads(line) for line in (final / f"{stage}_losses.jsonl").read_text().splitlines()]
    for f in (f"{stage}_losses.jsonl", f"{stage}_losses.png"):
        (run.out / f).write_bytes((final / f).read_bytes())
    if st.keep_checkpoints:
        run.lineage.append(stored[-1])
    else:  # the spec keeps none once the output is stored
        run.scratch.extend(stored)
    return {"stage": stage, "steps": len(history), "exit_points": history[-1]["exit_points"],
            "first_exit_losses": history[0]["exits"], "final_exit_losses": history[-1]["exits"]}
