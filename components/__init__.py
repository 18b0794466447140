"""KFP v2 lightweight components, one per step of the stage table (ruyi_core/stages/table.py). Each parses its
inputs, calls one ruyi_core stage and writes small outputs (metadata and store URIs); large artifacts live in
the object store.

The image set here is a default; the pipeline sets each task's image from the spec."""
from components.dae import dae_expand, svd_compress
from components.data_pack import pack_shard, plan_packs, prepare_data
from components.data_shards import curate_shard, merge_data, plan_shards
from components.export_tier import export_tier
from components.grpo import grpo
from components.init_family import init_family
from components.plan_run import plan_run
from components.report import report
from components.route import calibrate_routing
from components.ship import package_tier, promote
from components.train import train

__all__ = ["plan_shards", "curate_shard", "merge_data", "plan_run", "init_family", "plan_packs", "pack_shard",
           "prepare_data", "train", "dae_expand", "grpo", "svd_compress", "export_tier", "package_tier", "promote",
           "calibrate_routing", "report"]
