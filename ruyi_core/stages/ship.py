"""The end of a run: evaluate and package each exported tier, promote (or keep) the new version, and report.

package_tier runs once per tier (in parallel on a cluster); promote runs once per run and is the only writer of
the family's registry index. A package lives at its registry key (package/keys.py): the version follows the
weights, so new evaluation settings re-package the same version, and other weights under a taken version are
refused.
"""
from __future__ import annotations

import gc
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from ruyi_core.errors import RuyiError
from ruyi_core.package import keys
from ruyi_core.spec import RunSpec
from ruyi_core.stages.contract import Artifact, Stage, StageRun, manifest_of, overwrite, run_stage
from ruyi_core.stages.data import RunPlan
from ruyi_core.store import ArtifactStore


class Package(Artifact):
    family: str
    version: str
    tier: str
    run_id: str
    export_uri: str
    weights: str  # the exported tier's content token (Manifest.content_sha256): what a version may never change
    average: float | None = None


class Promotion(BaseModel):
    family: str
    version: str
    run_id: str
    tiers: dict[str, dict[str, Any]]
    promoted: dict[str, str]
    packages: list[Package]


PACKAGE = Stage("package", Package, ("eval", "package.targets"), root=keys.PACKAGE, named=True)


def _scores(evaluation: dict) -> dict[str, float]:
    return {b: r["value"] for b, r in evaluation["benchmarks"].items()}


def package_tier(spec: RunSpec, store: ArtifactStore, plan: RunPlan, export: str, family: str) -> Package:
    """Benchmarks, speed and memory of the exported tier (a plain checkpoint, exactly what ships), the same
    benchmarks on the family at that exit for comparison (reused when the weights are the same), and the package
    at its registry key."""
    row = manifest_of(store, export).metadata
    params = {"version": plan.version, "tier": row["tier"], "run_id": plan.run_id}
    return run_stage(PACKAGE, spec, store, lambda run: _package(run, plan, row), inputs={"export": export,
                     "family": family}, params=params)


def _package(run: StageRun, plan: RunPlan, row: dict) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ruyi_core.eval import evaluate, measure
    from ruyi_core.eval.harness import use_vllm
    from ruyi_core.package import build_package, check_publishable, lineage_entries
    from ruyi_core.runtime import for_spec

    spec, store, tier, family = run.spec, run.store, row["tier"], run.spec.family.name

    def say(msg: str) -> None:  # progress lines, tagged for the pipeline's log
        run.log(f"[package] {tier}: {msg}")

    weights = run.manifest("export").content_sha256()
    check_publishable(store, family, plan.version, tier, weights)
    rt = for_spec(spec)
    tok = AutoTokenizer.from_pretrained(run.fetch("export"))
    vllm = use_vllm(rt)
    if vllm:
        say("benchmarks through lm-eval's vLLM backend")
    model = None if vllm else rt.load(AutoModelForCausalLM, run.fetch("export"))
    evaluation = evaluate(model, tok, spec, run.work, store, log=say, path=run.fetch("export"), runtime=rt)
    if model is None:  # what the speed measurement runs
        model = rt.load(AutoModelForCausalLM, run.fetch("export"))
    started = time.perf_counter()
    speed = evaluation["speed"] = measure(model, tok, spec, path=run.fetch("export"))
    say(f"speed: prefill {speed['prefill_tokens_per_s']:,.0f} tok/s, decode {speed['decode_tokens_per_s']:,.0f} "
        f"tok/s in {time.perf_counter() - started:.1f} s")
    evaluation["parameters"] = int(row["parameters"])  # a factored tier's own count (the dense one is larger)
    evaluation["bytes_on_disk"] = int(row["weight_bytes"])
    del model
    gc.collect()  # the harness's wrappers refer to the model in cycles: freed now, before the family's tier loads
    evaluation.update(_family_comparison(run, tier, evaluation, say))
    pkg = build_package(run.fetch("export"), run.work / "package", family=family, version=plan.version, tier=tier,
                        target=spec.package.targets.get(tier, tier), evaluation=evaluation,
                        lineage=lineage_entries(store, run.inputs["export"]), run_id=plan.run_id,
                        spec_hash=spec.fingerprint(), exit_point=spec.family.tiers[tier])
    for f in pkg.iterdir():
        f.rename(run.out / f.name)
    return {"family": family, "version": plan.version, "tier": tier, "run_id": plan.run_id,
            "export_uri": run.inputs["export"], "weights": weights, "average": evaluation.get("average")}


def _family_comparison(run: StageRun, tier: str, evaluation: dict, say) -> dict:
    """{"family": the benchmarks' scores on the family at the tier's exit, "family_same_weights"}. A plain export
    holds exactly that exit's weights, so the family scores what the package scores: its scores are reused, not
    computed a second time (and the family is never loaded: its tensors are compared one at a time). Only a tier
    whose weights differ (SVD-compressed) is evaluated on the family too."""
    from ruyi_core.eval import evaluate
    from ruyi_core.family.config import RuyiConfig
    from ruyi_core.family.io import load_tier, load_tokenizer
    from ruyi_core.runtime import for_spec

    cfg = RuyiConfig.from_pretrained(run.fetch("family"))
    if tier not in cfg.tiers:
        raise RuyiError(f"tier {tier!r} is not in the family at {run.inputs['family']}: export from the same family")
    p = cfg.tiers[tier]
    if same_weights(run.fetch("export"), run.fetch("family"), p):
        say(f"the family at exit {p} has the same weights as the package: its scores are the package's")
        return {"family": _scores(evaluation), "family_same_weights": True}
    say(f"the package's weights differ from the family's at exit {p}: evaluating the family there too")
    # the family at exit p is its dense tier there (the same logits): only that tier is loaded
    model = load_tier(run.fetch("family"), p, for_spec(run.spec))
    scores = evaluate(model, load_tokenizer(run.fetch("family")), run.spec, run.work, run.store,
                      log=lambda m: say(f"family {m}"))
    return {"family": _scores(scores), "family_same_weights": False}


def same_weights(export_dir: Path, family_dir: Path, exit_point: int) -> bool:
    """Whether the checkpoint in `export_dir` (its top-level safetensors; factored/ is a compressed form) holds
    exactly the tensors the saved family's exit exports to, name for name, bit for bit (one tensor in memory
    at a time)."""
    import torch

    from ruyi_core.family import names
    from ruyi_core.family.config import RuyiConfig
    from ruyi_core.family.tensors import TensorFiles

    family, export = TensorFiles(family_dir), TensorFiles(export_dir)
    want = names.convert({k: k for k in family}, RuyiConfig.from_pretrained(family_dir), "family", "tier",
                         exit_point)  # tier name -> family name
    if set(export) != set(want):
        return False
    for k in export:
        a, b = export[k], family[want[k]]
        if a.dtype != b.dtype or not torch.equal(a, b):
            return False
    return True


def promote(spec: RunSpec, store: ArtifactStore, plan: RunPlan, packages: list[Package]) -> Promotion:
    """Gate every tier of this run's version against the promoted one and record the outcome in the registry."""
    from ruyi_core.package import promote as record
    from ruyi_core.package.registry import version_entry

    family, candidates = spec.family.name, {}
    with tempfile.TemporaryDirectory(prefix="ruyi-promote-") as d:
        for p in packages:
            store.get_file(f"{p.uri}/eval.json", Path(d) / "eval.json")
            candidates[p.tier] = {"uri": p.uri, "evaluation": json.loads((Path(d) / "eval.json").read_text())}
    index = record(store, family, plan.version, plan.run_id, candidates, spec.package)
    _write_deploy(spec, store, index)
    entry = version_entry(index, plan.version)
    return Promotion(family=family, version=plan.version, run_id=plan.run_id, tiers=entry["tiers"],
                     promoted=index["promoted"], packages=packages)


def _write_deploy(spec: RunSpec, store: ArtifactStore, index: dict) -> None:
    """KServe services for what is promoted now (beside the family's index; `ruyi models deploy` prints the
    same)."""
    from ruyi_core.package.deploy import family_manifests, to_yaml

    gpu = any(r.gpus for r in spec.pipeline.resources.values())
    text = to_yaml(family_manifests(index, store=spec.store, image=spec.pipeline.image,
                                    s3_secret=spec.pipeline.s3_secret, namespace=spec.train.trainjob.namespace,
                                    gpu=gpu))
    overwrite(store, keys.deploy_key(spec.family.name), text)
