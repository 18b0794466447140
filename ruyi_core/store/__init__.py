"""The artifact store: artifacts (a prefix of files plus a manifest written last) in any S3 — MinIO in
production, SeaweedFS (`ruyi store serve`) locally — over the minio SDK, streamed and hash-verified."""
from ruyi_core.store.artifact import ArtifactStore, code_version
from ruyi_core.store.manifest import FileEntry, InputRef, Manifest
from ruyi_core.store.client import IntegrityError, StoreError, TransferStats
from ruyi_core.store.lineage import lineage
from ruyi_core.store.server import LocalServer, serve, stop

__all__ = ["ArtifactStore", "FileEntry", "InputRef", "IntegrityError", "LocalServer", "Manifest", "StoreError",
           "TransferStats", "code_version", "lineage", "serve", "stop"]
