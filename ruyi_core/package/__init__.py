"""Per-tier packages (checkpoint, model card, evaluation, lineage, SHA256SUMS), the registry in the store
(models/<family>/<version>/<tier>/ and models/<family>/index.json) and the promotion gate."""
from ruyi_core.package.build import build_package, verify_package
from ruyi_core.package.registry import (
    cache_root, check_publishable, families, fetch, gate, lineage_entries, promote, publish, read_index, resolve,
)

__all__ = ["build_package", "cache_root", "check_publishable", "families", "fetch", "gate", "lineage_entries", "promote", "publish",
           "read_index", "resolve", "verify_package"]
