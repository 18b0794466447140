from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Output

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def report(spec_yaml: str, plan: Input[Dataset], promotion: Input[Artifact], routing: Input[Artifact],
           packed: Input[Dataset], markdown: Output[Markdown], page: Output[HTML], metrics: Output[Metrics]) -> str:
    """Per-tier table (benchmarks, size, speed, promotion), routing, charts, data summary and lineage picture;
    returns the report's store URI."""
    import json
    from pathlib import Path

    from ruyi_core.stages import PackedDataset, Promotion, Routing, RunPlan, open_run, report

    with open_run(spec_yaml) as (spec, store):
        result = report(spec, store, RunPlan.model_validate(plan.metadata),
                        Promotion.model_validate(promotion.metadata), Routing.of(routing.metadata),
                        [PackedDataset.of(d) for d in packed.metadata["datasets"]])
        store.get_file(f"{result.uri}/report.md", markdown.path)
        store.get_file(f"{result.uri}/report.html", page.path)
        for row in json.loads(result.read_text(store, "tiers.json")):
            metrics.log_metric(f"{row['tier']}_parameters", row["parameters"])
            ev = row["evaluation"]
            for bench, r in ev["benchmarks"].items():
                metrics.log_metric(f"{row['tier']}_{bench}_{r['metric']}", r["value"])
            if ev.get("average") is not None:
                metrics.log_metric(f"{row['tier']}_average", ev["average"])
        # The local runner only caches a Metrics output whose metadata is also in its file.
        Path(metrics.path).write_text(json.dumps(metrics.metadata))
        return result.uri
