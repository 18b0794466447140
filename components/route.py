from kfp import dsl
from kfp.dsl import Artifact, Input, Output

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def calibrate_routing(spec_yaml: str, promotion: Input[Artifact], routing: Output[Artifact]):
    """Calibrate `auto` routing over this version's packages and publish it beside them in the registry."""
    from ruyi_core.stages import Promotion, calibrate_routing, open_run

    with open_run(spec_yaml) as (spec, store):
        calibrate_routing(spec, store, Promotion.model_validate(promotion.metadata)).emit(routing)
