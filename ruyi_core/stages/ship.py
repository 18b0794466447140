"""The end of a run: evaluate and package each exported tier, promote (or keep) the new version, and report.

package_tier runs once per tier (in parallel on a cluster); promote runs once per run and is the only writer of
the family's registry index. A package lives at models/<family>/<version>/<tier>: the version follows the weights,
so new evaluation settings re-package the same version, and other weights under a taken version are refused.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from ruyi_core.errors import RuyiError
from ruyi_core.spec import RunSpec
from ruyi_core.stages.contract import Artifact, Stage, StageRun, manifest_of, run_stage
from ruyi_core.stages.data import RunPlan
from ruyi_core.store import ArtifactStore


class Package(Artifact):
    family: str
    version: str
    tier: str
    run_id: str
    export_uri: str
    weights: str  # the exported tier's manifest sha256: what a version may never change
    average: float | None = None


class Promotion(BaseModel):
    family: str
    version: str
    run_id: str
    tiers: dict[str, dict[str, Any]]
    promoted: dict[str, str]
    packages: list[Package]


PACKAGE = Stage("package", Package, ("eval", "package.targets"), root="models/{family}/{version}/{tier}",
                named=True)


def _scores(evaluation: dict) -> dict[str, float]:
    return {b: r["value"] for b, r in evaluation["benchmarks"].items()}


def package_tier(spec: RunSpec, store: ArtifactStore, plan: RunPlan, export: str, family: str) -> Package:
    """Benchmarks, speed and memory of the exported tier (a plain checkpoint, exactly what ships), the same
    benchmarks on the family at that exit for comparison, and the package in models/<family>/<version>/<tier>."""
    row = manifest_of(store, export).metadata
    params = {"version": plan.version, "tier": row["tier"], "run_id": plan.run_id}
    return run_stage(PACKAGE, spec, store, lambda run: _package(run, plan, row), inputs={"export": export,
                     "family": family}, params=params)


def _package(run: StageRun, plan: RunPlan, row: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ruyi_core.eval import evaluate, measure
    from ruyi_core.family.io import load_family
    from ruyi_core.package import build_package, check_publishable, lineage_entries, verify_package

    spec, store, tier, family = run.spec, run.store, row["tier"], run.spec.family.name
    weights = run.manifest("export").sha256()
    check_publishable(store, family, plan.version, tier, weights)
    model = AutoModelForCausalLM.from_pretrained(run.fetch("export"), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(run.fetch("export"))
    evaluation = evaluate(model, tok, spec, run.work, store)
    evaluation["speed"] = measure(model, tok, spec, path=run.fetch("export"))
    evaluation["parameters"] = int(row["parameters"])  # a factored tier's own count (the dense one is larger)
    evaluation["bytes_on_disk"] = int(row["weight_bytes"])
    del model
    fam, ftok = load_family(run.fetch("family"))
    if tier not in fam.config.tiers:
        raise RuyiError(f"tier {tier!r} is not in the family at {run.inputs['family']}: export from the same family")
    evaluation["family"] = _scores(evaluate(fam, ftok, spec, run.work, store, exit_point=fam.config.tiers[tier]))
    del fam
    pkg = build_package(run.fetch("export"), run.work / "package", family=family, version=plan.version, tier=tier,
                        target=spec.package.targets.get(tier, tier), evaluation=evaluation,
                        lineage=lineage_entries(store, run.inputs["export"]), run_id=plan.run_id,
                        spec_hash=spec.fingerprint())
    if problems := verify_package(pkg):
        raise RuyiError(f"{pkg} is not an intact package ({problems[0]}): rebuild it")
    for f in pkg.iterdir():
        f.rename(run.out / f.name)
    return {"family": family, "version": plan.version, "tier": tier, "run_id": plan.run_id,
            "export_uri": run.inputs["export"], "weights": weights, "average": evaluation.get("average")}


def promote(spec: RunSpec, store: ArtifactStore, plan: RunPlan, packages: list[Package]) -> Promotion:
    """Gate every tier of this run's version against the promoted one and record the outcome in the registry."""
    from ruyi_core.package import promote as record

    family, candidates = spec.family.name, {}
    with tempfile.TemporaryDirectory(prefix="ruyi-promote-") as d:
        for p in packages:
            store.get_file(f"{p.uri}/eval.json", Path(d) / "eval.json")
            candidates[p.tier] = {"uri": p.uri, "evaluation": json.loads((Path(d) / "eval.json").read_text())}
    index = record(store, family, plan.version, plan.run_id, candidates, spec.package)
    entry = next(v for v in index["versions"] if v["version"] == plan.version)
    return Promotion(family=family, version=plan.version, run_id=plan.run_id, tiers=entry["tiers"],
                     promoted=index["promoted"], packages=packages)
