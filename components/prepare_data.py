from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def prepare_data(spec_yaml: str, plan: Input[Dataset], family: Input[Model], packed: Output[Dataset]):
    """Tokenize and pack every validated corpus into megatron indexed datasets (one store artifact each)."""
    import json
    from pathlib import Path

    from ruyi_core.stages import RunPlan, open_run, prepare_data

    with open_run(spec_yaml) as (spec, store):
        results = [prepare_data(spec, store, d.kind, d.uri, family.metadata["uri"]).model_dump(mode="json")
                   for d in RunPlan.model_validate(plan.metadata).datasets]
        packed.metadata["datasets"] = results
        Path(packed.path).write_text(json.dumps(results))
