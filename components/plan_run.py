from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def plan_run(spec_yaml: str, datasets: Input[List[Dataset]], plan: Output[Dataset]) -> bool:
    """The data-fingerprint gate: returns False when the run for this spec and data already finished (its
    report is in the store), which stops an unchanged scheduled run. `plan` carries the run id (derived from the
    spec and the validated data) and the datasets on to the stages after the gate."""
    import json
    from pathlib import Path

    from ruyi_core.stages import open_run, plan_run

    with open_run(spec_yaml) as (spec, store):
        raws = [{k: d.metadata[k] for k in ("kind", "uri", "fingerprint")} for d in datasets]
        run_id = plan_run(spec, [r["fingerprint"] for r in raws])
        done = store.has_artifact(store.uri(f"runs/{run_id}/report"))
    plan.metadata.update({"run_id": run_id, "datasets": raws})
    Path(plan.path).write_text(json.dumps(raws))
    return not done
