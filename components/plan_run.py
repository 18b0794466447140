from typing import List, NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def plan_run(spec_yaml: str, datasets: Input[List[Dataset]], plan: Output[Dataset]) -> NamedTuple(
        "Plan", run_id=str, fresh=bool):
    """The run id, derived from the spec and the validated data; `fresh` is False when that run already
    finished (its report is in the store): the data-fingerprint gate that stops an unchanged scheduled run.
    `plan` carries the validated datasets on to the stages after the gate."""
    import json
    from collections import namedtuple
    from pathlib import Path

    from ruyi_core.stages import open_run, plan_run

    with open_run(spec_yaml) as (spec, store):
        raws = [{k: d.metadata[k] for k in ("kind", "uri", "fingerprint")} for d in datasets]
        run_id = plan_run(spec, [r["fingerprint"] for r in raws])
        done = store.has_artifact(store.uri(f"runs/{run_id}/report"))
    plan.metadata.update({"run_id": run_id, "datasets": raws})
    Path(plan.path).write_text(json.dumps(raws))
    return namedtuple("Plan", ["run_id", "fresh"])(run_id, not done)
