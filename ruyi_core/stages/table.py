"""The stage table: every step of the pipeline, in the order it runs, and what each reader needs to know of it.
The DAG (pipelines/dag.py) wires these steps; the model version and the run id hash the fields and versions of
the stages declared here; the local runner shows their tagged log lines; the report shows their figures."""
from __future__ import annotations

from dataclasses import dataclass

from ruyi_core.spec import RunSpec
from ruyi_core.stages.contract import Stage, spec_slice
from ruyi_core.stages.dae import EXPAND, SVD
from ruyi_core.stages.family import EXPORT, INIT
from ruyi_core.stages.grpo import GRPO
from ruyi_core.stages.pack import PACK, PREPARE
from ruyi_core.stages.report import REPORT
from ruyi_core.stages.route import ROUTE
from ruyi_core.stages.shards import CURATE, MERGE
from ruyi_core.stages.ship import PACKAGE
from ruyi_core.stages.train import TRAIN


@dataclass(frozen=True)
class Step:
    """One task of the pipeline. `component`: its KFP component (components/) and its key in
    pipeline.resources; `stage`: what it runs through the stage contract, if anything (its name is the step's
    name and tags the step's log lines); `weights`: the stage's fields and version name the model version, not
    only the run; `when`: the spec flags that turn the step on (all of them); `figure`: the PNG its artifact may
    carry, shown in the report under `caption`."""

    component: str
    stage: Stage | None = None
    weights: bool = False
    when: tuple[str, ...] = ()
    figure: str | None = None
    caption: str = ""

    @property
    def name(self) -> str:
        return self.stage.name if self.stage else self.component

    def enabled(self, spec: RunSpec) -> bool:
        return all(spec_slice(spec, self.when).values())


def _training(stage: str, caption: str, when: tuple[str, ...] = ()) -> Step:
    return Step("train", TRAIN[stage], weights=True, when=when, figure=f"{stage}_losses.png",
                caption=f"{caption}: loss per exit")


STEPS = (
    Step("plan_shards"),  # every corpus's files, one shard each
    Step("curate_shard", CURATE, weights=True),  # once per shard: the data gate, then curation's filters
    Step("merge_data", MERGE, weights=True),  # once per corpus: deduplication across its shards
    Step("plan_run"),  # the data-fingerprint gate: an unchanged run stops here
    Step("init_family", INIT, weights=True),
    Step("plan_packs"),  # every curated corpus's shards
    Step("pack_shard", PACK, weights=True),  # once per shard: tokenize and pack with the family's tokenizer
    Step("prepare_data", PREPARE, weights=True),  # once per corpus: a dataset whose parts are its packed shards
    _training("cpt", "CPT"),
    _training("sft", "SFT"),
    Step("dae_expand", EXPAND, weights=True, when=("dae.enabled",)),
    _training("dae_cpt", "DaE CPT", ("dae.enabled",)),
    _training("dae_sft", "DaE SFT", ("dae.enabled",)),
    Step("grpo", GRPO, weights=True, when=("rl.enabled",), figure="rewards.png", caption="GRPO: reward per step"),
    # the DaE control (dae.expand false) adds nothing, so there is nothing to compress
    Step("svd_compress", SVD, weights=True, when=("dae.enabled", "dae.expand"), figure="sweep.png",
         caption="SVD sweep: held-out loss vs tier size"),
    Step("export_tier", EXPORT, weights=True),  # once per tier, as is package_tier
    Step("package_tier", PACKAGE),
    Step("promote"),
    Step("calibrate_routing", ROUTE),
    Step("report", REPORT),
)
TRAINING = tuple(s.name for s in STEPS if s.component == "train")


def steps(spec: RunSpec) -> tuple[Step, ...]:
    """The steps this spec runs, in order."""
    return tuple(s for s in STEPS if s.enabled(spec))


def _fields(*stages: Stage) -> tuple[str, ...]:
    return tuple(sorted({f for s in stages for f in s.fields}))


WEIGHT_STAGES = tuple(s.stage for s in STEPS if s.weights)
PIPELINE_SHAPE = tuple(sorted({w for s in STEPS for w in s.when}))  # which stages run at all
WEIGHT_FIELDS = tuple(sorted({*_fields(*WEIGHT_STAGES), *PIPELINE_SHAPE}))
REPORT_FIELDS = _fields(*(s.stage for s in STEPS if s.stage and not s.weights))
# A weight stage whose code changes what it computes bumps its version: that is a new model version too.
WEIGHT_VERSIONS = tuple(sorted({f"{s.name}:{s.version}" for s in WEIGHT_STAGES}))
