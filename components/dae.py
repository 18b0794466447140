from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def dae_expand(spec_yaml: str, family: Input[Model], expanded: Output[Model]):
    """DaE Stable Block Expansion of the spec's tier (zero-residual random blocks)."""
    import json
    from pathlib import Path

    from ruyi_core.dae.stage import dae_expand
    from ruyi_core.stages import open_run

    with open_run(spec_yaml) as (spec, store):
        result = dae_expand(spec, store, family.metadata["run_id"], family.metadata["uri"])
        expanded.metadata.update(result)
        Path(expanded.path).write_text(json.dumps(result))


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def grpo(spec_yaml: str, family: Input[Model], plan: Input[Dataset], policy: Output[Model]):
    """GRPO (TRL) on one tier, only its own parameters trainable, merged back into the family."""
    import json
    from pathlib import Path

    from ruyi_core.dae.stage import grpo
    from ruyi_core.stages import open_run

    with open_run(spec_yaml) as (spec, store):
        (rl,) = [d["uri"] for d in plan.metadata["datasets"] if d["kind"] == "rl"]
        result = grpo(spec, store, family.metadata["run_id"], family.metadata["uri"], rl)
        policy.metadata.update(result)
        Path(policy.path).write_text(json.dumps(result))


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def svd_compress(spec_yaml: str, family: Input[Model], packed: Input[Dataset], expanded: Input[Model],
                 compressed: Output[Model]):
    """SVD compression of the DaE tier's added blocks and head; passes the family on with the result."""
    import json
    from pathlib import Path

    from ruyi_core.dae.stage import svd_compress
    from ruyi_core.stages import open_run

    with open_run(spec_yaml) as (spec, store):
        (pretrain,) = [d["uri"] for d in packed.metadata["datasets"] if d["kind"] == "pretrain"]
        result = svd_compress(spec, store, family.metadata["run_id"], family.metadata["uri"], pretrain,
                              expanded.metadata["uri"])
        # Downstream tasks take the family from here: its URI, and the compressed tier beside it.
        compressed.metadata.update({"uri": family.metadata["uri"], "run_id": family.metadata["run_id"],
                                    "compressed": result})
        Path(compressed.path).write_text(json.dumps(result))
