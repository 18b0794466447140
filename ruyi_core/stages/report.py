"""The run's report (Markdown, HTML with charts and the lineage picture), kept in the store at runs/<run-id>/report:
the data-fingerprint gate looks there to know that a run already finished."""
from __future__ import annotations

import json

from ruyi_core.spec import RunSpec
from ruyi_core.stages.contract import Artifact, Stage, StageRun, manifest_of, overwrite, run_stage
from ruyi_core.stages.data import PackedDataset, RunPlan
from ruyi_core.stages.ship import Promotion
from ruyi_core.store import ArtifactStore, lineage


class Report(Artifact):
    run_id: str
    tiers: list[str]


REPORT = Stage("report", Report, ("eval", "package"), version=2, root="runs/{run_id}/report", named=True)
# The figure each stage's artifact may carry, shown in the report.
PICTURES = {"cpt": "cpt_losses.png", "sft": "sft_losses.png", "dae_cpt": "dae_cpt_losses.png",
            "dae_sft": "dae_sft_losses.png", "grpo": "rewards.png", "svd_compress": "sweep.png"}


def report(spec: RunSpec, store: ArtifactStore, plan: RunPlan, promotion: Promotion,
           datasets: list[PackedDataset]) -> Report:
    """`promotion` is the promote stage's result: this version's packages and the gate's decision per tier."""
    inputs = {**{f"package/{p.tier}": p.uri for p in promotion.packages},
              **{f"dataset/{d.kind}": d.uri for d in datasets}}
    params = {"run_id": plan.run_id, "promotion": promotion.model_dump(mode="json", exclude={"packages"})}
    return run_stage(REPORT, spec, store, lambda run: _report(run, plan, promotion, datasets), inputs=inputs,
                     params=params)


def _report(run: StageRun, plan: RunPlan, promotion: Promotion, datasets: list[PackedDataset]) -> dict:
    from ruyi_core.report import render

    store, tiers = run.store, []
    for p in promotion.packages:
        # Rows come from the manifests: typed, whatever the orchestrator did to the metadata on the way.
        store.get_file(f"{p.uri}/eval.json", run.work / f"eval-{p.tier}.json")
        ev = json.loads((run.work / f"eval-{p.tier}.json").read_text())
        tiers.append({"uri": p.uri, **manifest_of(store, p.export_uri).metadata, "evaluation": ev,
                      "gate": promotion.tiers.get(p.tier)})
    tiers.sort(key=lambda r: r["exit_point"])
    rows = [{"uri": d.uri, **manifest_of(store, d.uri).metadata} for d in datasets]
    seen, chain = set(), []
    for start in [t["uri"] for t in tiers] + [d["uri"] for d in rows]:
        for m in lineage(store, start):
            if m.uri not in seen:
                seen.add(m.uri)
                chain.append(m)
    figures = {}
    for m in chain:
        name = PICTURES.get(m.stage)
        if name and any(f.path == name for f in m.files):
            store.get_file(f"{m.uri}/{name}", run.work / f"{m.stage}.png")
            figures[m.stage] = (run.work / f"{m.stage}.png").read_bytes()
    promo = promotion.model_dump(mode="json")
    routing = _calibrate(run, promotion)
    md, page, png = render(plan.run_id, tiers, rows, chain, figures, promo, routing)
    (run.out / "report.md").write_text(md)
    (run.out / "report.html").write_text(page)
    (run.out / "lineage.png").write_bytes(png)
    (run.out / "tiers.json").write_text(json.dumps(tiers, indent=2))
    (run.out / "promotion.json").write_text(json.dumps(promo, indent=2))
    return {"run_id": plan.run_id, "tiers": [t["tier"] for t in tiers]}


def _calibrate(run: StageRun, promotion: Promotion) -> dict | None:
    """`auto` routing over this version's packages, on the generative benchmarks' first questions; kept in the
    report and beside the version's packages (models/<family>/<version>/routing.json, which `ruyi serve` reads)."""
    from ruyi_core.eval.tasks import GENERATIVE, contains_results, exact_match_results, load_records
    from ruyi_core.runtime import for_spec
    from ruyi_core.serve.route import calibrate
    from ruyi_core.serve.tiers import from_packages

    spec, n = run.spec, run.spec.package.routing_questions
    benches = {k: b for k, b in spec.eval.benchmarks.items() if b.format in GENERATIVE}
    if not n or not benches or len(promotion.packages) < 2:
        return None
    dirs = {}
    for p in promotion.packages:
        run.store.get_artifact(p.uri, run.work / "routing" / p.tier)
        dirs[p.tier] = run.work / "routing" / p.tier
    served = from_packages(promotion.family, dirs, for_spec(spec))
    tok, questions = served.tokenizer, []
    for name, bench in sorted(benches.items()):
        score = exact_match_results if bench.format == "exact_match" else contains_results
        for rec in load_records(name, bench, spec, tok, run.work, run.store)[:n]:
            questions.append((tok(rec["prompt"])["input_ids"],
                              lambda text, rec=rec, score=score: bool(next(iter(score(rec, [text]).values())))))
    routing = calibrate(served, questions, max_new_tokens=spec.eval.max_new_tokens,
                        tolerance=spec.package.routing_tolerance)
    text = json.dumps(routing, indent=2)
    (run.out / "routing.json").write_text(text)
    overwrite(run.store, f"models/{promotion.family}/{promotion.version}/routing.json", text)
    op = routing["operating_point"]
    run.log(f"[report] routing: threshold {op['threshold']:.4f}, quality {op['quality']:.3f} at "
            f"{op['compute']:.0%} compute (deepest tier alone {list(routing['tier_quality'].values())[-1]:.3f})")
    return routing
