from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def train(spec_yaml: str, stage: str, family: Input[Model], packed: Input[Dataset], trained: Output[Model]):
    """Joint multi-exit CPT or SFT on megatron-core (torchrun here, or a TrainJob on GPU node pools)."""
    from ruyi_core.stages import PackedDataset, open_run, train, training_data

    with open_run(spec_yaml) as (spec, store):
        data, replay = training_data(spec, stage, [PackedDataset.of(d) for d in packed.metadata["datasets"]])
        train(spec, store, stage, family.metadata["uri"], data, replay).emit(trained)
