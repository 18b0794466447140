from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def dae_expand(spec_yaml: str, family: Input[Model], expanded: Output[Model]):
    """DaE Stable Block Expansion of the spec's tier (zero-residual random blocks)."""
    from ruyi_core.stages import dae_expand, open_run

    with open_run(spec_yaml) as (spec, store):
        dae_expand(spec, store, family.metadata["uri"]).emit(expanded)


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def svd_compress(spec_yaml: str, family: Input[Model], packed: Input[Dataset], expanded: Input[Model],
                 compressed: Output[Model], svd: Output[Metrics]):
    """SVD compression of the DaE tier's added blocks and head: the compressed tier, and what was measured."""
    import json
    from pathlib import Path

    from ruyi_core.stages import open_run, svd_compress

    with open_run(spec_yaml) as (spec, store):
        (pretrain,) = [d["uri"] for d in packed.metadata["datasets"] if d["kind"] == "pretrain"]
        result = svd_compress(spec, store, family.metadata["uri"], pretrain, expanded.metadata["uri"])
        result.emit(compressed)
        for k, v in result.read_result(store).model_dump().items():
            if isinstance(v, (int, float)):  # the scalars; the ranks and the sweep stay in svd_result.json
                svd.log_metric(k, v)
        # The local runner only caches a Metrics output whose metadata is also in its file.
        Path(svd.path).write_text(json.dumps(svd.metadata))
