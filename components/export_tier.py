from kfp import dsl
from kfp.dsl import Input, Model, Output

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def export_tier(spec_yaml: str, tier: str, family: Input[Model], tier_model: Output[Model]):
    """One tier as a standalone Qwen3 checkpoint in the store. The run id travels in the family's metadata
    (kfp 2.17's local runner substitutes the loop item for upstream parameters inside a ParallelFor)."""
    import json
    from pathlib import Path

    from ruyi_core.stages import export_tier, open_run

    with open_run(spec_yaml) as (spec, store):
        result = export_tier(spec, store, family.metadata["run_id"], family.metadata["uri"], tier,
                             family.metadata.get("compressed"))
        tier_model.metadata.update(result)
        Path(tier_model.path).write_text(json.dumps(result))
