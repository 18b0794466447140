from kfp import dsl
from kfp.dsl import Input, Model, Output

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def export_tier(spec_yaml: str, tier: str, family: Input[Model], tier_model: Output[Model],
                compressed: Input[Model] = None):
    """One tier as a standalone Qwen3 checkpoint in the store (the DaE tier with its SVD-compressed weights when
    svd_compress's `compressed` tier is given)."""
    from ruyi_core.stages import Compressed, export_tier, open_run

    with open_run(spec_yaml) as (spec, store):
        export_tier(spec, store, family.metadata["uri"], tier,
                    Compressed.of(compressed.metadata) if compressed else None).emit(tier_model)
