"""An artifact's manifest: its files (path, size, sha256), what built it, and when. What the artifact IS is its
files (content_sha256); when and where it was built (the timestamps, build time and memory) are the manifest's
metadata, so two builds of the same bytes are the same artifact."""
from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict

MANIFEST = "manifest.json"


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str  # relative to the artifact prefix, '/'-separated
    size: int
    sha256: str


class InputRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    uri: str
    content_sha256: str = ""  # the input's Manifest.content_sha256 when this artifact was built from it
    manifest_sha256: str = ""  # what manifests written before content tokens recorded: the input's Manifest.sha256

    def matches(self, m: Manifest) -> bool:
        """Whether `m` is still the input this reference was made from."""
        if self.content_sha256:
            return m.content_sha256() == self.content_sha256
        return m.sha256() == self.manifest_sha256

    def recorded(self) -> str:
        return self.content_sha256 or self.manifest_sha256


class Manifest(BaseModel):
    # extra="allow": a manifest written by a newer version still parses and hashes to the same value
    model_config = ConfigDict(extra="allow")
    uri: str
    stage: str
    spec_hash: str
    identity: str = ""  # the producing stage's identity (stage, code version, spec slice, inputs); see stages
    build_seconds: float | None = None  # wall time of the stage that built it
    build_peak_mib: float | None = None  # its peak resident memory (largest process, the stage's children included)
    code_version: str
    created_at: str
    completed_at: str
    files: list[FileEntry] = []
    inputs: list[InputRef] = []
    metadata: dict[str, Any] = {}

    def canonical_json(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False).encode()

    def sha256(self) -> str:
        """The whole manifest's hash, timestamps included: only to check references that older manifests made."""
        return hashlib.sha256(self.canonical_json()).hexdigest()

    def content_sha256(self) -> str:
        """The artifact's content token: its file entries (path, size, sha256), nothing about when or where it
        was built. What refers to an artifact (an input reference, a stage's identity, a package's weights)
        records this, so a bit-identical rebuild is the same artifact."""
        entries = sorted((f.path, f.size, f.sha256) for f in self.files)
        return hashlib.sha256(json.dumps(entries, separators=(",", ":")).encode()).hexdigest()

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def same_build(self, identity: str, content: tuple) -> bool:
        """Whether this manifest is what a writer of `identity` (its stage's identity, '' for none) and
        `content` (see _content) would write: the same stage identity, or without one the same content."""
        return (bool(identity) and self.identity == identity) or self._content() == content

    def _content(self) -> tuple:
        return self.stage, self.spec_hash, self.identity, self.files, self.inputs, self.metadata
