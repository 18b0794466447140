from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def plan_packs(spec_yaml: str, plan: Input[Dataset]) -> List[str]:
    """Every shard of every curated corpus, each as JSON: the fan-out of pack_shard."""
    from ruyi_core.stages import RunPlan, open_run, plan_packs

    with open_run(spec_yaml) as (spec, store):
        return [p.model_dump_json() for p in plan_packs(store, RunPlan.model_validate(plan.metadata))]


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def pack_shard(spec_yaml: str, piece: str, family: Input[Model], packed: Output[Dataset]):
    """Tokenize and pack one curated shard with the family's tokenizer (a megatron indexed dataset)."""
    from ruyi_core.stages import PackPiece, open_run, pack_shard

    with open_run(spec_yaml) as (spec, store):
        pack_shard(spec, store, PackPiece.model_validate_json(piece), family.metadata["uri"]).emit(packed)


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def prepare_data(spec_yaml: str, parts: Input[List[Dataset]], packed: Output[Dataset]):
    """One packed dataset per corpus kind, its parts the packed shards: what the training stages read."""
    import json
    from pathlib import Path

    from ruyi_core.stages import PackedShard, open_run, prepare_all

    with open_run(spec_yaml) as (spec, store):
        results = [d.model_dump(mode="json") for d in prepare_all(spec, store, [PackedShard.of(p.metadata)
                                                                                 for p in parts])]
        packed.metadata["datasets"] = results
        Path(packed.path).write_text(json.dumps(results))
