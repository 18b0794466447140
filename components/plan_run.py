from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def plan_run(spec_yaml: str, datasets: Input[Dataset], plan: Output[Dataset]) -> bool:
    """The data-fingerprint gate: returns False when the run for this spec and data already finished (its
    report and its packages are in the store), which stops an unchanged scheduled run; a run whose package was
    removed since goes again and rebuilds it. `plan` carries the run id, the model version and the validated
    datasets on to the stages after the gate."""
    from ruyi_core.stages import RawDataset, emit, open_run, plan_run, run_finished

    with open_run(spec_yaml) as (spec, store):
        result = plan_run(spec, [RawDataset.of(d) for d in datasets.metadata["datasets"]])
        done = run_finished(spec, store, result)
    emit(result, plan)
    return not done
