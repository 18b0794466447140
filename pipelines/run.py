"""Compile the pipeline, or run it locally with KFP's SubprocessRunner (same components, same code)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import time
from pathlib import Path

from ruyi_core.errors import RuyiError
from ruyi_core.spec import RunSpec, load_spec
from ruyi_core.stages.contract import ERROR_DIR_ENV


def compile_pipeline(spec_path: str | Path, out: str | Path) -> Path:
    from kfp import compiler

    from pipelines.dag import build_pipeline

    spec_path, out = Path(spec_path), Path(out)
    spec = load_spec(spec_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(spec, spec.model_dump_json(), cluster=True), str(out))
    return out


class _TaskLog(io.TextIOBase):
    """Tees the local runner's chatty output to a log file and shows one line per task event."""

    _event = re.compile(r"(Executing task|Task .* finished with status|Task .* cache hit|Pipeline .* finished)")
    # the trainer's progress lines, and each stage's "reused" / "built" line
    _progress = re.compile(r"\[\w+\] (step \d+/\d+|reused s3://|built s3://)")
    _ansi = re.compile(r"\x1b\[[0-9;]*m")

    def __init__(self, log, show):
        self.log, self.show, self.events, self._showing = log, show, [], False

    def write(self, s: str) -> int:
        self.log.write(s)
        if self._showing:  # `show` printed to the redirected stdout: it belongs in the log only
            return len(s)
        self._showing = True
        try:
            self._events(s)
        finally:
            self._showing = False
        return len(s)

    def _events(self, s: str) -> None:
        for line in s.splitlines():
            clean = self._ansi.sub("", line).strip()
            if self._event.search(clean) and "INFO" in clean:
                msg = clean.split(" - INFO - ", 1)[-1]
                self.events.append(msg)
                self.show(msg)
            elif self._progress.search(clean):
                self.show("  " + clean[self._progress.search(clean).start():])

    def flush(self) -> None:
        self.log.flush()


def run_local(spec_path: str | Path, root: str | Path = ".ruyi/kfp", show=None) -> dict:
    """Run the whole pipeline locally. Returns the report's store URI (a run whose data did not change stops at
    the gate and points at the report it already has), the run log and the task events.
    `show` receives one line per task event and training progress (default: printed to the real stdout)."""
    import sys

    from kfp import local

    from pipelines.dag import build_pipeline
    from ruyi_core.stages import REPORT
    from ruyi_core.store import ArtifactStore

    real_stdout = sys.stdout
    show = show or (lambda m: print(m, file=real_stdout, flush=True))
    spec_path, root = Path(spec_path), Path(root).resolve()
    spec = load_spec(spec_path)
    store = ArtifactStore.from_spec(spec.store, env=os.environ)  # fail fast, one line, on a bad store/credentials
    root.mkdir(parents=True, exist_ok=True)
    errors = root / "errors"
    errors.mkdir(exist_ok=True)
    for f in errors.glob("*.txt"):
        f.unlink()
    log_path = root / f"run-{time.strftime('%Y%m%d-%H%M%S')}.log"
    os.environ[ERROR_DIR_ENV] = str(errors)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), enable_caching=True,
               raise_on_error=True)
    pipeline = build_pipeline(spec, spec.model_dump_json(), cluster=False)
    with open(log_path, "w") as log:
        tee = _TaskLog(log, show)
        try:
            with contextlib.redirect_stdout(tee), contextlib.redirect_stderr(tee):
                task = pipeline()
        except RuntimeError as e:
            msgs = [f.read_text().strip() for f in sorted(errors.glob("*.txt"))]
            if msgs:
                raise RuyiError("; ".join(msgs) + f" (full log: {log_path})") from None
            # no stage reported a user error: a bug or an unexpected failure, whose traceback is in the log
            raise RuntimeError(f"a pipeline task failed ({e}); its traceback is in {log_path}") from None
    report_uri = store.uri(REPORT.root.format(run_id=task.output.metadata["run_id"]))
    return {"report_uri": report_uri, "log": str(log_path),
            "events": tee.events, "executed": sum(1 for e in tee.events if e.startswith("Task ") and "finished with status" in e)}


def fetch_report(spec: RunSpec, report_uri: str, dest: Path) -> dict:
    """Download the report artifact; returns the tier rows, the promotion outcome and the local HTML path."""
    from ruyi_core.store import ArtifactStore

    store = ArtifactStore.from_spec(spec.store, env=os.environ)
    store.get_artifact(report_uri, dest)
    return {"tiers": json.loads((dest / "tiers.json").read_text()),
            "promotion": json.loads((dest / "promotion.json").read_text()), "html": dest / "report.html",
            "markdown": dest / "report.md"}
