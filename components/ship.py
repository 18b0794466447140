from typing import List

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def package_tier(spec_yaml: str, tier_model: Input[Model], family: Input[Model], package: Output[Model]):
    """Evaluate one exported tier (lm-eval benchmarks, speed, memory) and publish its package to the registry."""
    import json
    from pathlib import Path

    from ruyi_core.ship import package_tier
    from ruyi_core.stages import open_run

    with open_run(spec_yaml) as (spec, store):
        result = package_tier(spec, store, family.metadata["run_id"], tier_model.metadata["uri"],
                              family.metadata["uri"])
        package.metadata.update(result)
        Path(package.path).write_text(json.dumps(result))


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def promote(spec_yaml: str, plan: Input[Dataset], packages: Input[List[Model]], promotion: Output[Artifact]):
    """The promotion gate: each tier of this version is promoted only if no benchmark is worse than the promoted
    version's beyond the spec's tolerance; the registry index records both outcomes."""
    import json
    from pathlib import Path

    from ruyi_core.ship import promote
    from ruyi_core.stages import open_run

    with open_run(spec_yaml) as (spec, store):
        result = promote(spec, store, plan.metadata["run_id"], [dict(p.metadata) for p in packages])
        promotion.metadata.update(result)
        Path(promotion.path).write_text(json.dumps(result))
