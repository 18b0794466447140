from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Input

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def plan_run(spec_yaml: str, datasets: Input[List[Dataset]]) -> str:
    """The run id: derived from the spec and the validated data, so an unchanged re-run is the same run."""
    from ruyi_core.spec import parse_spec_yaml
    from ruyi_core.stages import plan_run

    return plan_run(parse_spec_yaml(spec_yaml), [d.metadata["fingerprint"] for d in datasets])
