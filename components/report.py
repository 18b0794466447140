from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Output

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def report(spec_yaml: str, plan: Input[Dataset], promotion: Input[Artifact], packed: Input[Dataset],
           markdown: Output[Markdown], page: Output[HTML], metrics: Output[Metrics]) -> str:
    """Per-tier table (benchmarks, size, speed, promotion), charts, data summary and lineage picture; returns the
    report's store URI."""
    import json
    from pathlib import Path

    from ruyi_core.stages import open_run, report

    with open_run(spec_yaml) as (spec, store):
        result = report(spec, store, plan.metadata["run_id"], dict(promotion.metadata),
                        list(packed.metadata["datasets"]))
        Path(markdown.path).write_text(result["markdown"])
        Path(page.path).write_text(result["html"])
        for row in result["tiers"]:
            metrics.log_metric(f"{row['tier']}_parameters", row["parameters"])
            ev = row["evaluation"]
            for bench, r in ev["benchmarks"].items():
                metrics.log_metric(f"{row['tier']}_{bench}_{r['metric']}", r["value"])
            if ev.get("average") is not None:
                metrics.log_metric(f"{row['tier']}_average", ev["average"])
        # The local runner only caches a Metrics output whose metadata is also in its file.
        Path(metrics.path).write_text(json.dumps(metrics.metadata))
        return result["uri"]
