"""The end of a run: evaluate and package each exported tier, then promote (or keep) the new version.

package_tier runs once per tier (in parallel on a cluster); promote runs once per run and is the only writer of
the family's registry index.
"""
from __future__ import annotations

from ruyi_core.errors import RuyiError
from ruyi_core.spec import RunSpec
from ruyi_core.stages import manifest_of, workdir
from ruyi_core.store import ArtifactStore


def version_of(spec: RunSpec, run_id: str) -> str:
    """`package.version`, else the run id's hash: the same run always publishes the same version."""
    return spec.package.version or run_id.removeprefix(f"{spec.family.name}-")


def _scores(evaluation: dict) -> dict[str, float]:
    return {b: r["value"] for b, r in evaluation["benchmarks"].items()}


def package_tier(spec: RunSpec, store: ArtifactStore, run_id: str, tier_uri: str, family_uri: str) -> dict:
    """Benchmarks, speed and memory of the exported tier (a plain checkpoint, exactly what ships), the same
    benchmarks on the family at that exit for comparison, and the package in models/<family>/<version>/<tier>."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ruyi_core.eval import evaluate, measure
    from ruyi_core.family.io import load_family
    from ruyi_core.package import build_package, lineage_entries, publish
    from ruyi_core.store import model_prefix

    row = manifest_of(store, tier_uri).metadata
    tier, family, version = row["tier"], spec.family.name, version_of(spec, run_id)
    uri = store.uri(model_prefix(family, version, tier))
    if (m := store.read_manifest(uri)) is not None and m.metadata.get("run_id") == run_id:
        return {"uri": uri, "export_uri": tier_uri, **m.metadata}
    with workdir("package") as work:
        store.get_artifact(tier_uri, work / "tier")
        model = AutoModelForCausalLM.from_pretrained(work / "tier", dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(work / "tier")
        evaluation = evaluate(model, tok, spec, work, store)
        evaluation["speed"] = measure(model, tok, spec, path=work / "tier")
        evaluation["parameters"] = int(row["parameters"])  # a factored tier's own count (the dense one is larger)
        evaluation["bytes_on_disk"] = int(row["weight_bytes"])
        del model
        store.get_artifact(family_uri, work / "family")
        fam, ftok = load_family(work / "family")
        if tier not in fam.config.tiers:
            raise RuyiError(f"tier {tier!r} is not in the family at {family_uri}: export from the same family")
        evaluation["family"] = _scores(evaluate(fam, ftok, spec, work, store, exit_point=fam.config.tiers[tier]))
        del fam
        pkg = build_package(work / "tier", work / "package", family=family, version=version, tier=tier,
                            target=spec.package.targets.get(tier, tier), evaluation=evaluation,
                            lineage=lineage_entries(store, tier_uri), run_id=run_id, spec_hash=spec.fingerprint())
        uri = publish(store, pkg, family, version, tier, run_id=run_id, spec_hash=spec.fingerprint(),
                      inputs=[tier_uri, family_uri])
    return {"uri": uri, "export_uri": tier_uri, **manifest_of(store, uri).metadata}


def promote(spec: RunSpec, store: ArtifactStore, run_id: str, packages: list[dict]) -> dict:
    """Gate every tier of this run's version against the promoted one and record the outcome in the registry."""
    import json
    import tempfile
    from pathlib import Path

    from ruyi_core.package import promote as record

    family, version = spec.family.name, version_of(spec, run_id)
    candidates = {}
    with tempfile.TemporaryDirectory(prefix="ruyi-promote-") as d:
        for p in packages:
            store.get_file(f"{p['uri']}/eval.json", Path(d) / "eval.json")
            candidates[p["tier"]] = {"uri": p["uri"], "evaluation": json.loads((Path(d) / "eval.json").read_text())}
    index = record(store, family, version, run_id, candidates, spec.package)
    entry = next(v for v in index["versions"] if v["version"] == version)
    return {"family": family, "version": version, "run_id": run_id, "tiers": entry["tiers"],
            "promoted": index["promoted"], "packages": packages}
