from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def train(spec_yaml: str, stage: str, family: Input[Model], packed: Input[Dataset], trained: Output[Model]):
    """Joint multi-exit CPT or SFT on megatron-core (torchrun here, or a TrainJob on GPU node pools)."""
    import json
    from pathlib import Path

    from ruyi_core.stages import open_run, train

    with open_run(spec_yaml) as (spec, store):
        result = train(spec, store, stage, family.metadata["run_id"], family.metadata["uri"],
                       list(packed.metadata["datasets"]))
        trained.metadata.update(result)
        Path(trained.path).write_text(json.dumps(result))
