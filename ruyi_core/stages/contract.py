"""The stage contract: what every pipeline stage does around its own work, written once.

A stage declares its name, a code version, the spec fields that determine its output and a typed result. From
those, its parameters and its inputs' content tokens (Manifest.content_sha256: their files, not when they were
built), the contract derives the stage's identity and its store key, reuses a complete artifact with that
identity, or gives the stage a work folder, uploads what the stage wrote there (manifest last) and returns the
typed result. Operational settings (images, resources, timeouts, retries, poll intervals) are in no stage's
fields, so changing them rebuilds nothing.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

from ruyi_core.errors import RuyiError
from ruyi_core.launch import stop_with_runner
from ruyi_core.measure import peak_rss_mib, reset_peak
from ruyi_core.spec import RunSpec, parse_spec_yaml
from ruyi_core.store import ArtifactStore, Manifest

ERROR_DIR_ENV = "RUYI_ERROR_DIR"  # a failed stage's one-line error goes here for the local runner to show
USER_ERROR, INTERNAL_ERROR = ".error.txt", ".internal.txt"  # the two kinds of file there, after the task's pid


class Artifact(BaseModel):
    """A stage's typed result: the artifact's URI and its manifest metadata (the rest of the fields)."""

    model_config = ConfigDict(extra="forbid")
    uri: str

    def metadata(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"uri"})

    @classmethod
    def of(cls, metadata: Mapping[str, Any]):
        """From an orchestrator's artifact metadata (which may add keys, and turns ints into floats)."""
        if cls.model_config.get("extra") == "allow":
            return cls.model_validate(dict(metadata))
        return cls.model_validate({k: v for k, v in metadata.items() if k in cls.model_fields})

    def emit(self, output) -> None:
        """Write this result to a KFP output artifact (anything with `.metadata` and `.path`)."""
        emit(self, output)

    def read_text(self, store: ArtifactStore, name: str) -> str:
        """One of the artifact's files, verified against its stored sha256 on the way."""
        with tempfile.TemporaryDirectory(prefix="ruyi-read-") as d:
            store.get_file(f"{self.uri}/{name}", Path(d) / "file")
            return (Path(d) / "file").read_text()


def emit(result: BaseModel, output) -> None:
    data = result.model_dump(mode="json")
    output.metadata.update(data)
    Path(output.path).write_text(json.dumps(data))


R = TypeVar("R", bound=Artifact)


@dataclass(frozen=True)
class Stage(Generic[R]):
    """A stage's declaration. `root` is the key's folder, formatted with the family name, the stage name and the
    parameters; the key is `<root>/<identity>` unless `named`, when it is `root` itself (a registry package, a
    run's report): then a complete artifact there is reused only if its recorded identity matches."""

    name: str
    result: type[R]
    fields: tuple[str, ...] = ()
    version: int = 1
    root: str = "stages/{family}/{stage}"
    named: bool = False

    def identity(self, spec: RunSpec, input_shas: Mapping[str, Any], params: Mapping[str, Any]) -> str:
        doc = {"stage": self.name, "version": self.version, "spec": spec_slice(spec, self.fields),
               "inputs": input_shas, "params": params}
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()

    def key(self, spec: RunSpec, params: Mapping[str, Any], identity: str) -> str:
        root = self.root.format(family=spec.family.name, stage=self.name, **params)
        return root if self.named else f"{root}/{identity[:16]}"


def spec_slice(spec: RunSpec, fields: Sequence[str]) -> dict[str, Any]:
    """The named (dotted) fields of the spec, as JSON values."""
    data, out = spec.model_dump(mode="json"), {}
    for f in fields:
        node = data
        for part in f.split("."):
            if not isinstance(node, dict) or part not in node:
                raise KeyError(f"stage field {f!r} is not in the spec")
            node = node[part]
        out[f] = node
    return out


def slice_hash(spec: RunSpec, fields: Sequence[str], *extra: str) -> str:
    text = json.dumps(spec_slice(spec, fields), sort_keys=True) + "\0" + "\0".join(extra)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class StageRun:
    """What a stage's build function gets: the spec, the store, its input URIs, a work folder and `out`, the
    folder whose files become the artifact. `key` is the artifact's store key (checkpoints nest under it)."""

    spec: RunSpec
    store: ArtifactStore
    inputs: dict[str, str]
    work: Path
    key: str
    log: Callable[[str], None]
    lineage: list[str] = field(default_factory=list)  # more inputs to record (not part of the identity)
    # Store artifacts the stage needs only until its output is complete (a trainer's starting checkpoint, the
    # checkpoints a spec does not keep): deleted once the output's manifest is written.
    scratch: list[str] = field(default_factory=list)

    @property
    def out(self) -> Path:
        return self.work / "out"

    def fetch(self, name: str) -> Path:
        """Download input `name` into the work folder (once) and return its folder."""
        dest = self.work / "inputs" / name
        if not dest.is_dir():
            self.store.get_artifact(self.inputs[name], dest)
        return dest

    def manifest(self, name: str) -> Manifest:
        return manifest_of(self.store, self.inputs[name])


def _print(line: str) -> None:
    print(line, flush=True)  # our stdout is a pipe when a pipeline step runs us: no block buffering


def run_stage(stage: Stage[R], spec: RunSpec, store: ArtifactStore, build: Callable[[StageRun], Mapping | None], *,
              inputs: Mapping[str, str | None] = (), params: Mapping[str, Any] | None = None,
              log: Callable[[str], None] = _print) -> R:
    """Reuse the stage's artifact when a complete one with this identity exists; otherwise run `build` (which
    fills `run.out` and returns the metadata) and publish its output. Logs "reused" or "built" with the URI."""
    inputs = {k: store.normalize_uri(v) for k, v in dict(inputs).items() if v}
    params = dict(params or {})
    shas = {k: manifest_of(store, u).content_sha256() for k, u in inputs.items()}
    identity = stage.identity(spec, shas, params)
    key = stage.key(spec, params, identity)
    uri = store.uri(key)
    if (m := store.read_manifest(uri)) is not None and m.identity == identity:
        log(f"[{stage.name}] reused {uri}")
        return stage.result(uri=uri, **m.metadata)
    started = time.perf_counter()
    reset_peak()
    with workdir(stage.name) as work:
        run = StageRun(spec, store, inputs, work, key, log)
        run.out.mkdir()
        try:
            meta = stage.result(uri=uri, **(build(run) or {})).metadata()
        except Exception:
            # another run building this identity at the same time finished first, and may have removed what this
            # build still needed (the checkpoints a spec does not keep): its artifact is this stage's output
            if (m := store.read_manifest(uri)) is not None and m.identity == identity:
                log(f"[{stage.name}] reused {uri} (another run stored it while this one was building)")
                return stage.result(uri=uri, **m.metadata)
            raise
        seconds, peak = round(time.perf_counter() - started, 1), peak_rss_mib()
        # another run that built the same identity at the same time may have stored its output first: then that
        # is the artifact, and its metadata the result
        stored = store.put_artifact(key, run.out, stage=stage.name, spec_hash=slice_hash(spec, stage.fields),
                                    identity=identity, inputs=[*inputs.values(), *run.lineage], metadata=meta,
                                    build_seconds=seconds, build_peak_mib=peak)
        for uri_ in run.scratch:
            store.delete_artifact(uri_)
    log(f"[{stage.name}] built {uri} in {seconds:.1f} s, peak {peak:,.0f} MiB")
    return stage.result(uri=uri, **stored.metadata)


def manifest_of(store: ArtifactStore, uri: str) -> Manifest:
    m = store.read_manifest(uri)
    if m is None:
        raise RuyiError(f"{uri} is not a complete artifact (no manifest): re-run the stage that makes it")
    return m


def overwrite(store: ArtifactStore, key: str, text: str) -> None:
    """A small derived object (deploy manifests, routing) rewritten from what its writer knows now; when another
    writer changes it in between, theirs stays: both wrote what their state said."""
    got = store.read_object(key)
    store.write_object_if(key, text.encode(), got[1] if got else None)


WORK_PREFIX = "ruyi-work-"  # + pid + stage: a work folder names the process that owns it


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_workdirs(tmp: Path | None = None) -> int:
    """Remove the work folders of processes that are gone (a killed run cannot clean up after itself);
    returns how many. A reused pid keeps its folder until the next sweep after that process ends."""
    n = 0
    for d in Path(tmp or tempfile.gettempdir()).glob(f"{WORK_PREFIX}*"):
        pid = d.name[len(WORK_PREFIX):].partition("-")[0]
        if d.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
            n += 1
    return n


@contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    sweep_workdirs()
    d = Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{os.getpid()}-{prefix}-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextmanager
def open_run(spec_yaml: str) -> Iterator[tuple[RunSpec, ArtifactStore]]:
    """What every component does: the spec from its YAML text and the store from spec + environment.
    An error inside is also written, as one line, to $RUYI_ERROR_DIR for the local runner to show: a user error's
    message, or an internal error's type and first line (its traceback stays in the task's log)."""
    stop_with_runner()  # a local run's task stops when `ruyi pipeline run` is killed
    try:
        spec = parse_spec_yaml(spec_yaml)
        yield spec, ArtifactStore.from_spec(spec.store, env=os.environ)
    except Exception as e:
        if os.environ.get(ERROR_DIR_ENV):
            if isinstance(e, RuyiError):
                line, kind = str(e), USER_ERROR
            else:
                line, kind = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}", INTERNAL_ERROR
            (Path(os.environ[ERROR_DIR_ENV]) / f"{os.getpid()}{kind}").write_text(line)
        raise
