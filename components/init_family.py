from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def init_family(spec_yaml: str, plan: Input[Dataset], family: Output[Model]):
    """Build the family from the spec's base (branch blocks copied from the trunk)."""
    import json
    from pathlib import Path

    from ruyi_core.stages import init_family, open_run

    with open_run(spec_yaml) as (spec, store):
        (pretrain,) = [d["uri"] for d in plan.metadata["datasets"] if d["kind"] == "pretrain"]
        result = init_family(spec, store, plan.metadata["run_id"], pretrain)
        family.metadata.update(result)
        Path(family.path).write_text(json.dumps(result))
