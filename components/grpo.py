from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def grpo(spec_yaml: str, family: Input[Model], plan: Input[Dataset], policy: Output[Model]):
    """GRPO (TRL) on one tier, only its own parameters trainable, merged back into the family."""
    from ruyi_core.stages import RunPlan, grpo, open_run

    with open_run(spec_yaml) as (spec, store):
        datasets = RunPlan.model_validate(plan.metadata)
        sft = datasets.dataset("sft").uri if spec.rl.method == "sft" else None  # GRPO's control trains on it
        grpo(spec, store, family.metadata["uri"], datasets.dataset("rl").uri, sft).emit(policy)
