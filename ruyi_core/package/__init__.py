"""Per-tier packages (checkpoint, model card, evaluation, lineage, SHA256SUMS), the registry in the store
(one package per tier and an index per family, at the keys package/keys.py lays out) and the promotion gate."""
from ruyi_core.package.build import build_package, verify_package
from ruyi_core.package.registry import (
    cache_root, check_publishable, families, fetch, gate, lineage_entries, promote, promoted_family, publish,
    read_index, resolve,
)

__all__ = ["build_package", "cache_root", "check_publishable", "families", "fetch", "gate", "lineage_entries",
           "promote", "promoted_family", "publish", "read_index", "resolve", "verify_package"]
