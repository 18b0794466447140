"""Pipeline stages as plain functions: a spec and input artifact URIs in, a typed result out, every one through
the stage contract (contract.py). Components (components/) are thin wrappers around these; the CLI and tests
call them directly too. The stage table (table.py) lists them in the order the pipeline runs them.

Identity follows the weights: the model version hashes the validated data and the fields of the stages that
determine the weights; the run id (where the report lives, and what the data-fingerprint gate checks) adds the
fields of the stages after them. Fields of no stage (images, resources, timeouts, retries, poll intervals, the
store's transfer settings, the launcher) change neither.
"""
from ruyi_core.stages.contract import (
    Artifact, Stage, StageRun, emit, manifest_of, open_run, run_stage, workdir,
)
from ruyi_core.stages.dae import EXPAND, SVD, Compressed, Expanded, SvdResult, dae_expand, svd_compress
from ruyi_core.stages.data import KINDS, PackedDataset, RawDataset, RunPlan, plan_run
from ruyi_core.stages.family import EXPORT, INIT, Family, TierExport, export_tier, init_family
from ruyi_core.stages.pack import (
    PACK, PREPARE, PackedShard, PackPiece, pack_all, pack_shard, plan_packs, prepare_all, prepare_data,
)
from ruyi_core.stages.grpo import GRPO, Grpo, grpo
from ruyi_core.stages.report import REPORT, Report, report, run_finished
from ruyi_core.stages.route import ROUTE, Routing, calibrate_routing
from ruyi_core.stages.shards import (
    CURATE, MERGE, CuratedShard, Shard, curate_shard, gate_and_curate, merge_all, merge_data, plan_shards,
)
from ruyi_core.stages.ship import PACKAGE, Package, Promotion, package_tier, promote
from ruyi_core.stages.table import REPORT_FIELDS, STEPS, WEIGHT_FIELDS, WEIGHT_STAGES, WEIGHT_VERSIONS, Step, steps
from ruyi_core.stages.train import TRAIN, Trained, train, training_data

__all__ = [
    "Artifact", "CURATE", "PACK", "PackedShard", "PackPiece", "Compressed", "CuratedShard", "MERGE", "Shard", "EXPAND", "EXPORT", "Expanded", "Family", "GRPO", "Grpo", "INIT", "KINDS", "PACKAGE",
    "PREPARE", "PackedDataset", "Package", "Promotion", "REPORT", "REPORT_FIELDS", "ROUTE", "RawDataset", "Report",
    "Routing", "RunPlan", "STEPS", "SVD", "Stage", "StageRun", "Step", "SvdResult", "TRAIN", "TierExport", "Trained",
    "WEIGHT_FIELDS", "WEIGHT_STAGES", "WEIGHT_VERSIONS",
    "calibrate_routing", "curate_shard", "dae_expand", "emit", "export_tier", "gate_and_curate", "grpo", "init_family", "manifest_of", "merge_all", "merge_data", "open_run",
    "pack_all", "pack_shard", "package_tier", "plan_packs", "plan_run", "prepare_all", "plan_shards", "prepare_data", "promote", "report", "run_finished", "run_stage", "steps",
    "svd_compress", "train", "training_data", "workdir",
]
