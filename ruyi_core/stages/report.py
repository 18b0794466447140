"""The run's report (Markdown, HTML with charts and the lineage picture), kept in the store at runs/<run-id>/report:
the data-fingerprint gate looks there, and at the packages the run published, to know that a run already
finished. It only reads: the packages, the promotion's outcome, the routing calibration and what the stages
behind them measured."""
from __future__ import annotations

import hashlib
import json

from ruyi_core.report import Measured, render
from ruyi_core.spec import RunSpec
from ruyi_core.stages.contract import Artifact, Stage, StageRun, manifest_of, run_stage
from ruyi_core.stages.data import PackedDataset, RunPlan
from ruyi_core.stages.route import Routing
from ruyi_core.stages.ship import Promotion
from ruyi_core.store import ArtifactStore, Manifest, lineage


class Report(Artifact):
    run_id: str
    tiers: list[str]
    ablations_sha: str = ""  # the ablations it shows (a report from before they were recorded shows none)


# version 3: the routing calibration is an input (calibrate_routing's), not computed here
REPORT = Stage("report", Report, ("eval", "package"), version=3, root="runs/{run_id}/report", named=True)


def run_finished(spec: RunSpec, store: ArtifactStore, plan: RunPlan) -> bool:
    """Whether the run for this plan already finished and what it published is still whole: its report is in the
    store and every package the registry's index names for its version is complete. A package removed since (a
    failed `ruyi models verify` quarantines it) makes the run go again, which rebuilds what is missing (every
    other stage is reused) and publishes it again."""
    from ruyi_core.package.registry import absent_packages, read_index

    made = store.read_manifest(store.uri(REPORT.root.format(run_id=plan.run_id)))
    if made is None:
        return False
    shown = made.metadata.get("ablations_sha") or _ablations_sha({})  # a report from before ablations: none
    if shown != _ablations_sha(_ablations(spec, store, plan)):
        return False  # ablations recorded since: the report is rendered again (every other stage is reused)
    index = read_index(store, spec.family.name, missing_ok=True)
    return index is not None and any(v["version"] == plan.version for v in index["versions"]) \
        and not absent_packages(store, index, plan.version)


def report(spec: RunSpec, store: ArtifactStore, plan: RunPlan, promotion: Promotion, routing: Routing,
           datasets: list[PackedDataset]) -> Report:
    """`promotion` is the promote stage's result: this version's packages and the gate's decision per tier;
    `routing` is calibrate_routing's."""
    inputs = {**{f"package/{p.tier}": p.uri for p in promotion.packages}, "routing": routing.uri,
              **{f"dataset/{d.kind}": d.uri for d in datasets}}
    ablations = _ablations(spec, store, plan)
    params = {"run_id": plan.run_id, "promotion": promotion.model_dump(mode="json", exclude={"packages"}),
              **({"ablations": ablations} if ablations else {})}  # none: the identity reports had before
    return run_stage(REPORT, spec, store, lambda run: _report(run, plan, promotion, routing, datasets, ablations),
                     inputs=inputs, params=params)


def _ablations(spec: RunSpec, store: ArtifactStore, plan: RunPlan) -> dict:
    from ruyi_core.package.registry import read_ablations

    return read_ablations(store, spec.family.name, plan.version)


def _ablations_sha(ablations: dict) -> str:
    return hashlib.sha256(json.dumps(ablations, sort_keys=True).encode()).hexdigest()


def _report(run: StageRun, plan: RunPlan, promotion: Promotion, routing: Routing,
            datasets: list[PackedDataset], ablations: dict) -> dict:
    store, tiers = run.store, []
    for p in promotion.packages:
        # Rows come from the manifests: typed, whatever the orchestrator did to the metadata on the way.
        ev = json.loads(p.read_text(store, "eval.json"))
        tiers.append({"uri": p.uri, **manifest_of(store, p.export_uri).metadata, "evaluation": ev,
                      "gate": promotion.tiers.get(p.tier)})
    tiers.sort(key=lambda r: r["exit_point"])
    rows = [{"uri": d.uri, **manifest_of(store, d.uri).metadata} for d in datasets]
    seen, chain = set(), []
    for start in [t["uri"] for t in tiers] + [routing.uri] + [d["uri"] for d in rows]:
        for m in lineage(store, start):
            if m.uri not in seen:
                seen.add(m.uri)
                chain.append(m)
    promo = promotion.model_dump(mode="json")
    md, page, png = render(plan.run_id, tiers, rows, chain, promo, _measured(run, chain, routing, ablations))
    (run.out / "report.md").write_text(md)
    (run.out / "report.html").write_text(page)
    (run.out / "lineage.png").write_bytes(png)
    (run.out / "tiers.json").write_text(json.dumps(tiers, indent=2))
    (run.out / "promotion.json").write_text(json.dumps(promo, indent=2))
    return {"run_id": plan.run_id, "tiers": [t["tier"] for t in tiers], "ablations_sha": _ablations_sha(ablations)}


def _measured(run: StageRun, chain: list[Manifest], routing: Routing, ablations: dict) -> Measured:
    """What the stages behind this run measured, picked out of the chain by the stage table."""
    from ruyi_core.stages.dae import SVD
    from ruyi_core.stages.grpo import GRPO
    from ruyi_core.stages.table import STEPS, TRAINING

    by_stage = {m.stage: m for m in chain}
    figures = {}
    for s in STEPS:
        m = by_stage.get(s.name)
        if s.figure and m and any(f.path == s.figure for f in m.files):
            path = run.work / f"{s.name}.png"
            run.store.get_file(f"{m.uri}/{s.figure}", path)
            figures[s.caption] = path.read_bytes()
    svd = by_stage.get(SVD.name)
    return Measured(trained=[by_stage[n] for n in TRAINING if n in by_stage],
                    grpo=by_stage[GRPO.name].metadata if GRPO.name in by_stage else None,
                    svd=SVD.result(uri=svd.uri, **svd.metadata).read_result(run.store).model_dump() if svd else None,
                    routing=routing.read(run.store), figures=figures, ablations=ablations)
