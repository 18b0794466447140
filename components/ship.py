from typing import List

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def package_tier(spec_yaml: str, plan: Input[Dataset], tier_model: Input[Model], family: Input[Model],
                 package: Output[Model]):
    """Evaluate one exported tier (lm-eval benchmarks, speed, memory) and publish its package to the registry."""
    from ruyi_core.stages import RunPlan, open_run, package_tier

    with open_run(spec_yaml) as (spec, store):
        package_tier(spec, store, RunPlan.model_validate(plan.metadata), tier_model.metadata["uri"],
                     family.metadata["uri"]).emit(package)


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def promote(spec_yaml: str, plan: Input[Dataset], packages: Input[List[Model]], promotion: Output[Artifact]):
    """The promotion gate: each tier of this version is promoted only if no benchmark is worse than the promoted
    version's beyond the spec's tolerance; the registry index records both outcomes."""
    from ruyi_core.stages import Package, RunPlan, emit, open_run, promote

    with open_run(spec_yaml) as (spec, store):
        result = promote(spec, store, RunPlan.model_validate(plan.metadata), [Package.of(p.metadata) for p in packages])
        emit(result, promotion)
