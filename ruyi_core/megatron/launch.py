"""Training stages (CPT, SFT) as pipeline stages: check the parallel layout, convert the family to a megatron
checkpoint, run the trainer (a local torchrun, or a Kubeflow Trainer v2 TrainJob), convert the result back.

Every input and checkpoint lives in the store, so a stage killed anywhere resumes from its latest complete
checkpoint when run again, on either launcher.
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections import deque
from pathlib import Path

from ruyi_core.errors import RuyiError
from ruyi_core.spec import RunSpec


def validate_layout(spec: RunSpec, family_cfg: dict, stage: str) -> None:
    """Stops a bad TP/PP/DP layout with one line before any process starts."""
    par, st = spec.train.parallel, spec.train_stage(stage)
    heads, groups = family_cfg["num_attention_heads"], family_cfg["num_key_value_heads"]
    layers, vocab = family_cfg["num_hidden_layers"], family_cfg["vocab_size"]
    if heads % par.tp or groups % par.tp:
        raise RuyiError(f"train.parallel.tp = {par.tp} must divide the {heads} attention heads and {groups} KV "
                        f"heads: pick a divisor of {groups}")
    if vocab % par.tp:
        raise RuyiError(f"train.parallel.tp = {par.tp} must divide the vocabulary ({vocab})")
    if layers % par.pp:
        raise RuyiError(f"train.parallel.pp = {par.pp} must divide the {layers} layers")
    if st.global_batch_size % (st.micro_batch_size * par.dp):
        raise RuyiError(f"train.{stage}.global_batch_size = {st.global_batch_size} must be a multiple of "
                        f"micro_batch_size x dp = {st.micro_batch_size * par.dp}")
    if spec.train.launcher == "local":
        if par.nodes != 1:
            raise RuyiError("train.parallel.nodes > 1 needs train.launcher: trainjob")
    else:
        per_node = spec.train.trainjob.gpus_per_node or 1
        if par.world_size != par.nodes * per_node:
            raise RuyiError(f"world size tp x pp x dp = {par.world_size} does not match nodes x gpus_per_node = "
                            f"{par.nodes * per_node}: adjust train.parallel.dp")
    if family_cfg.get("shared_heads"):
        raise RuyiError("family.shared_heads: the megatron trainer gives every exit its own head; "
                        "train a family with shared_heads: false")


def _print(line: str) -> None:
    print(line, flush=True)  # our stdout is a pipe when a pipeline step runs us: no block buffering


def _run(cmd: list[str], log, env: dict | None = None) -> None:
    """Streams a child's output; a failure becomes one line (the child's own `error:` line when it has one)."""
    tail: deque[str] = deque(maxlen=40)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        tail.append(line)
        if not any(w in line for w in ("Warning", "warnings.warn", "warn(")):
            log(line)
    if proc.wait() != 0:
        errs = [t for t in tail if t.startswith("error:")]
        raise RuyiError(errs[-1][len("error:"):].strip() if errs else
                        f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}): {tail[-1] if tail else ''}")


def torchrun(nproc: int, module: str, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(_free_port()), "-m", module, *args]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_stage(spec: RunSpec, store, stage: str, run_id: str, family_uri: str, data_uri: str,
                work: Path, log=_print, replay_uri: str | None = None) -> dict:
    """Trains the family at `family_uri` on the packed dataset at `data_uri` (SFT stages with `replay` also on
    pretraining windows from `replay_uri`); returns the trained family's artifact (an HF family with per-exit
    loss logs and curves)."""
    import json

    key = f"runs/{run_id}/{stage}"
    uri = store.uri(key)
    if (m := store.read_manifest(uri)) is not None:
        return {"uri": uri, "run_id": run_id, **m.metadata}
    fam_dir = work / "family"
    store.get_artifact(family_uri, fam_dir)
    validate_layout(spec, json.loads((fam_dir / "config.json").read_text()), stage)

    init_uri = store.uri(f"{key}/init")
    if not store.has_artifact(init_uri):
        _run([sys.executable, "-m", "ruyi_core.megatron.ckpt", "from-hf", "--family", str(fam_dir),
              "--out", str(work / "init")], log)
        store.put_artifact(f"{key}/init", work / "init", stage=f"{stage}_init", spec_hash=spec.fingerprint(),
                           inputs=[family_uri])
    args = ["--stage", stage, "--spec", spec.model_dump_json(), "--family", family_uri, "--init", init_uri,
            "--data", data_uri, "--ckpt-prefix", f"{key}/checkpoints", "--resume",
            "--log-every", str(max(1, spec.train_stage(stage).steps // 10))]
    if spec.train_stage(stage).replay:
        if replay_uri is None:
            raise RuyiError(f"{stage}: replay {spec.train_stage(stage).replay} needs a packed pretraining dataset")
        args += ["--replay", replay_uri]
    if spec.train.launcher == "local":
        _run(torchrun(spec.train.parallel.world_size, "ruyi_core.megatron.trainer", [*args, "--out", str(work / "run")]),
             log)
    else:
        from ruyi_core.megatron.trainjob import run_trainjob

        # --out is the pod's scratch volume, shared by the ranks of a node.
        run_trainjob(spec, stage, f"{run_id}-{stage}", [*args, "--out", "/scratch/run"], log=log)

    last = sorted(store.list_artifacts(f"{key}/checkpoints"))[-1]
    final = work / "final"
    store.get_artifact(last, final)
    _run([sys.executable, "-m", "ruyi_core.megatron.ckpt", "to-hf", "--ckpt", str(final), "--family", str(fam_dir),
          "--out", str(work / "trained")], log)
    history = [json.loads(line) for line in (final / f"{stage}_losses.jsonl").read_text().splitlines()]
    for f in (f"{stage}_losses.jsonl", f"{stage}_losses.png"):
        (work / "trained" / f).write_bytes((final / f).read_bytes())
    meta = {"stage": stage, "steps": len(history), "exit_points": history[-1]["exit_points"],
            "first_exit_losses": history[0]["exits"], "final_exit_losses": history[-1]["exits"]}
    store.put_artifact(key, work / "trained", stage=stage, spec_hash=spec.fingerprint(),
                       inputs=[u for u in (family_uri, data_uri, replay_uri, last) if u], metadata=meta)
    return {"uri": uri, "run_id": run_id, **meta}
