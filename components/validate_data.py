from kfp import dsl
from kfp.dsl import HTML, Dataset, Output

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def validate_data(spec_yaml: str, kind: str, dataset: Output[Dataset], gate_docs: Output[HTML]):
    """The data gate (great-expectations) for one corpus kind; only a passing corpus reaches datasets/."""
    import shutil
    import tempfile
    from pathlib import Path

    from ruyi_core.stages import open_run, validate_data

    with open_run(spec_yaml) as (spec, store), tempfile.TemporaryDirectory(prefix="ruyi-gate-docs-") as tmp:
        docs = Path(tmp)  # the site is built here; only its index page becomes the task's output
        validate_data(spec, store, kind, docs_dir=docs).emit(dataset)
        index = next(docs.rglob("index.html"), None)
        if index:
            shutil.copy(index, gate_docs.path)
        else:
            Path(gate_docs.path).write_text("<p>no Data Docs</p>")
