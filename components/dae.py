from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def dae_expand(spec_yaml: str, family: Input[Model], expanded: Output[Model]):
    """DaE Stable Block Expansion of the spec's tier (zero-residual random blocks)."""
    from ruyi_core.stages import dae_expand, open_run

    with open_run(spec_yaml) as (spec, store):
        dae_expand(spec, store, family.metadata["uri"]).emit(expanded)


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def grpo(spec_yaml: str, family: Input[Model], plan: Input[Dataset], policy: Output[Model]):
    """GRPO (TRL) on one tier, only its own parameters trainable, merged back into the family."""
    from ruyi_core.stages import RunPlan, grpo, open_run

    with open_run(spec_yaml) as (spec, store):
        rl = RunPlan.model_validate(plan.metadata).dataset("rl").uri
        grpo(spec, store, family.metadata["uri"], rl).emit(policy)


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def svd_compress(spec_yaml: str, family: Input[Model], packed: Input[Dataset], expanded: Input[Model],
                 compressed: Output[Model]):
    """SVD compression of the DaE tier's added blocks and head; passes the family on with the result."""
    import json
    from pathlib import Path

    from ruyi_core.stages import open_run, svd_compress

    with open_run(spec_yaml) as (spec, store):
        (pretrain,) = [d["uri"] for d in packed.metadata["datasets"] if d["kind"] == "pretrain"]
        result = svd_compress(spec, store, family.metadata["uri"], pretrain, expanded.metadata["uri"])
        # Downstream tasks take the family from here: its URI, and the compressed tier beside it.
        compressed.metadata.update({"uri": family.metadata["uri"], "compressed": result.model_dump(mode="json")})
        Path(compressed.path).write_text(json.dumps(dict(compressed.metadata)))
