from typing import List

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Output

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def plan_shards(spec_yaml: str) -> List[str]:
    """Every training corpus's shards (one per file), each as JSON: the fan-out of curate_shard."""
    from ruyi_core.stages import open_run, plan_shards

    with open_run(spec_yaml) as (spec, store):
        return [s.model_dump_json() for s in plan_shards(spec, store)]


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def curate_shard(spec_yaml: str, shard: str, curated: Output[Dataset], gate_docs: Output[HTML]):
    """The data gate (great-expectations) on one shard, then curation's filters and dedup signatures (datatrove)."""
    import tempfile
    from pathlib import Path

    from ruyi_core.data.curation_docs import one_page
    from ruyi_core.stages import Shard, curate_shard, open_run

    with open_run(spec_yaml) as (spec, store), tempfile.TemporaryDirectory(prefix="ruyi-gate-docs-") as tmp:
        docs = Path(tmp)  # the site is built here; its validation pages become the task's one page
        try:
            curate_shard(spec, store, Shard.model_validate_json(shard), docs_dir=docs).emit(curated)
        finally:  # a failed gate's evidence too
            Path(gate_docs.path).write_text(one_page(docs))


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def merge_data(spec_yaml: str, shards: Input[List[Dataset]], datasets: Output[Dataset], curation: Output[HTML]):
    """Deduplication across each corpus's shards; one dataset per corpus kind, for the run plan, and Data Docs of
    what curation removed, per corpus and per shard."""
    import json
    import tempfile
    from pathlib import Path

    from ruyi_core.data.curation_docs import corpus_docs, one_page
    from ruyi_core.stages import CuratedShard, merge_all, open_run

    with open_run(spec_yaml) as (spec, store), tempfile.TemporaryDirectory(prefix="ruyi-curation-docs-") as tmp:
        merged = merge_all(spec, store, [CuratedShard.of(s.metadata) for s in shards])
        datasets.metadata["datasets"] = [d.model_dump(mode="json") for d in merged]
        Path(datasets.path).write_text(json.dumps(datasets.metadata["datasets"]))
        corpus_docs({d.kind: json.loads(d.read_text(store, "gate_summary.json")) for d in merged}, Path(tmp))
        Path(curation.path).write_text(one_page(Path(tmp)))
