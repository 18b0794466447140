"""Family stages: build the family from the spec's base (init_family) and export one tier (export_tier); and the
family as the stages that work on one tier (DaE, GRPO) load it."""
from __future__ import annotations

import shutil
from typing import TYPE_CHECKING

from ruyi_core.errors import RuyiError
from ruyi_core.spec import RunSpec
from ruyi_core.stages.contract import Artifact, Stage, StageRun, run_stage
from ruyi_core.stages.data import corpus_records
from ruyi_core.store import ArtifactStore

if TYPE_CHECKING:
    from ruyi_core.stages.dae import Compressed


class Family(Artifact):
    exit_points: list[int]
    tiers: dict[str, int]
    parameters: int
    vocab_size: int


class TierExport(Artifact):
    tier: str
    exit_point: int
    depth: int
    parameters: int
    weight_bytes: int
    sample: str
    compressed: str | None = None  # how, when the tier ships SVD-compressed weights


INIT = Stage("init_family", Family, ("family",))
EXPORT = Stage("export_tier", TierExport, root="stages/{family}/{stage}/{tier}")


def load_for_tier(run: StageRun, section: str, tier: str, stored: bool = False):
    """The input family, in the spec's runtime, or (`stored`: for work that only moves tensors) as it was saved;
    `tier` (the spec's `section.tier`) must be one of its tiers."""
    from ruyi_core.family.io import load_family
    from ruyi_core.runtime import for_spec

    fam, tok = load_family(run.fetch("family"), for_spec(run.spec), stored_dtype=stored)
    if tier not in fam.config.tiers:
        raise RuyiError(f"{section}.tier: unknown tier {tier!r}; this family has {', '.join(fam.config.tiers)}")
    return fam, tok


def _summary(fam) -> dict:
    return {"exit_points": fam.config.early_exit_points, "tiers": fam.config.tiers,
            "parameters": fam.num_parameters(), "vocab_size": fam.config.vocab_size}


def init_family(spec: RunSpec, store: ArtifactStore, pretrain: str) -> Family:
    """The family from the spec's base (a preset's tokenizer is trained on the validated pretraining data), or,
    with `family.warm_start`, the promoted family of that name as it left joint training. Its URI is an input,
    so a newly promoted version makes a new initial family."""
    warm = {}
    if spec.family.warm_start:
        from ruyi_core.package import promoted_family

        warm = {"warm_start": promoted_family(store, spec.family.warm_start)}

    def build(run: StageRun) -> dict:
        from ruyi_core.family.io import init_family as make, load_family, save_family

        if warm:
            fam, tok = load_family(run.fetch("warm_start"), stored_dtype=True)
            if list(fam.config.early_exit_points) != spec.family.exit_points:
                raise RuyiError(f"family.warm_start: {spec.family.warm_start} has exits "
                                f"{list(fam.config.early_exit_points)}, this spec {spec.family.exit_points}: "
                                "warm-start a family of the same shape")
            run.log(f"[init_family] warm start from {run.inputs['warm_start']}")
            save_family(fam, tok, run.out)
            return _summary(fam)
        records = corpus_records(run, "pretrain")
        fam_spec = spec.family
        if fam_spec.base.startswith("s3://"):  # a base in the store: fetched (and verified) into the work folder
            run.log(f"[init_family] fetching base {fam_spec.base}")
            run.store.get_folder(fam_spec.base, run.work / "base")
            fam_spec = fam_spec.model_copy(update={"base": str(run.work / "base")})
        fam, tok = make(fam_spec, texts=(r["text"] for r in records))
        save_family(fam, tok, run.out)
        return _summary(fam)

    return run_stage(INIT, spec, store, build, inputs={"pretrain": pretrain, **warm})


def export_tier(spec: RunSpec, store: ArtifactStore, family: str, tier: str,
                compressed: Compressed | None = None) -> TierExport:
    """One tier as a standalone Qwen3 checkpoint, with its summary row in the manifest's metadata. The DaE tier,
    when `compressed` (svd_compress's result) names it, ships the compressed weights: the materialised plain
    checkpoint plus the factored form under factored/."""
    compressed = compressed if compressed is not None and compressed.tier == tier else None

    def build(run: StageRun) -> dict:
        if compressed:
            return _export_compressed(run, tier)
        from ruyi_core.family.io import export_tiers, load_family

        fam, tok = load_family(run.fetch("family"), stored_dtype=True)  # a bf16 family: half the fp32 bytes
        if tier not in fam.config.tiers:
            raise RuyiError(f"unknown tier {tier!r}: this family has {', '.join(fam.config.tiers)}")
        (row,) = export_tiers(fam, tok, run.work / "tiers", [tier])
        row.pop("path")
        shutil.copytree(run.work / "tiers" / tier, run.out, dirs_exist_ok=True)
        return row

    inputs = {"family": family, "compressed": compressed.uri if compressed else None}
    return run_stage(EXPORT, spec, store, build, inputs=inputs, params={"tier": tier})


def _export_compressed(run: StageRun, tier: str) -> dict:
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    from ruyi_core.family.io import dir_bytes, greedy_sample
    from ruyi_core.runtime import for_spec
    from ruyi_core.stages.dae import SVD_RESULT, SvdResult

    src = run.fetch("compressed")
    svd = SvdResult.model_validate_json((src / SVD_RESULT).read_text())
    shutil.copytree(src / "materialized", run.out, dirs_exist_ok=True)
    shutil.copytree(src / "factored", run.out / "factored")
    model = for_spec(run.spec).load(Qwen3ForCausalLM, run.out)
    return {"tier": tier, "exit_point": svd.exit_point, "depth": model.config.num_hidden_layers,
            "parameters": svd.factored_parameters, "weight_bytes": dir_bytes(run.out / "factored", "*.safetensors"),
            "compressed": f"SVD {svd.ratio:.0%} of the added parameters",
            "sample": greedy_sample(model, AutoTokenizer.from_pretrained(run.out))}
