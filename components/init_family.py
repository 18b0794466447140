from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def init_family(spec_yaml: str, plan: Input[Dataset], family: Output[Model]):
    """Build the family from the spec's base (branch blocks copied from the trunk)."""
    from ruyi_core.stages import RunPlan, init_family, open_run

    with open_run(spec_yaml) as (spec, store):
        init_family(spec, store, RunPlan.model_validate(plan.metadata).dataset("pretrain").uri).emit(family)
