"""Compile the pipeline, or run it locally with KFP's SubprocessRunner (same components, same code)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

from ruyi_core.codeversion import code_version
from ruyi_core.errors import RuyiError
from ruyi_core.launch import RUNNER_PID_ENV
from ruyi_core.spec import RunSpec, load_spec
from ruyi_core.stages import STEPS
from ruyi_core.stages.contract import ERROR_DIR_ENV, INTERNAL_ERROR, USER_ERROR, workdir

_STAGE_TAGS = "|".join(sorted(s.name for s in STEPS))


def compile_pipeline(spec_path: str | Path, out: str | Path) -> Path:
    spec_path, out = Path(spec_path), Path(out)
    spec = load_spec(spec_path)  # a bad spec is refused before kfp is imported

    from kfp import compiler

    from pipelines.dag import build_pipeline

    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(spec, spec.model_dump_json(), cluster=True), str(out))
    return out


class _TaskLog(io.TextIOBase):
    """Tees the local runner's chatty output to a log file and shows one line per task event and progress line."""

    _event = re.compile(r"(Executing task|Task .* finished with status|Task .* cache hit|Pipeline .* finished)")
    # Progress: lines that our code tags with a stage's name, "[grpo] step 3/30 ...", "[package] end: ...",
    # "[cpt] reused s3://..." (at the start of the line, or after a launcher's "[default0]:" prefix); not other
    # libraries' tagged lines ("[transformers] ...").
    _progress = re.compile(rf"(?:^|\]:)(\[(?:{_STAGE_TAGS})\] \S.*)")
    ansi = re.compile(r"\x1b\[[0-9;]*m")

    def __init__(self, log, show):
        self.log, self.show, self.events, self._showing, self._partial = log, show, [], False, ""

    def write(self, s: str) -> int:
        self.log.write(s)
        if self._showing:  # `show` printed to the redirected stdout: it belongs in the log only
            return len(s)
        # Writes arrive in arbitrary chunks (a task's output is read from a pipe): a line is judged only once
        # it is complete, so a progress line is never shown cut in two or without its tag.
        lines = (self._partial + s).splitlines(keepends=True)
        self._partial = lines.pop() if lines and not lines[-1].endswith(("\n", "\r")) else ""
        self._lines(lines)
        return len(s)

    def finish(self) -> None:
        """Judge the last line, when the output did not end with a newline."""
        rest, self._partial = self._partial, ""
        self._lines([rest] if rest else [])

    def _lines(self, lines: list[str]) -> None:
        self._showing = True
        try:
            for line in lines:
                self._line(self.ansi.sub("", line).strip())
        finally:
            self._showing = False

    def _line(self, clean: str) -> None:
        if self._event.search(clean) and "INFO" in clean:
            msg = clean.split(" - INFO - ", 1)[-1]
            self.events.append(msg)
            self.show(msg)
        elif m := self._progress.search(clean):
            self.show("  " + m.group(1))

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
    if spec.family.warm_start:  # refused here, not in init_family after the data stages ran
        from ruyi_core.package.registry import promoted_family

        promoted_family(store, spec.family.warm_start)
    root.mkdir(parents=True, exist_ok=True)
    log_path = root / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"  # concurrent runs: one log each
    # The tasks' temp dir, removed with the run (or swept once a killed run's process is gone): KFP's per-task
    # scripts, torch's folders and the tasks' own scratch never reach the user's temp dir.
    with workdir("pipeline") as tmp, _environ(TMPDIR=str(tmp), **{ERROR_DIR_ENV: str(tmp / "errors"),
                                                                RUNNER_PID_ENV: str(os.getpid())}):
        (tmp / "errors").mkdir()
        # KFP keys a cached task on its inputs, not on the library that runs it: one cache per version of the code,
        # so an upgraded stage runs again instead of being served what the old one made.
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root),
                   workspace_root=str(tmp / "workspace"), enable_caching=True, raise_on_error=True,
                   cache_root=str(task_cache(root)))
        pipeline = build_pipeline(spec, spec.model_dump_json(), cluster=False)
        with open(log_path, "w") as log:
            tee = _TaskLog(log, show)
            try:
                with contextlib.redirect_stdout(tee), contextlib.redirect_stderr(tee):
                    try:
                        task = pipeline()
                    finally:
                        tee.finish()
            except RuntimeError as e:
                raise _failure(tmp / "errors", e, log_path) from None
    report_uri = store.uri(REPORT.root.format(run_id=task.output.metadata["run_id"]))
    executed = sum(1 for e in tee.events if e.startswith("Task ") and "finished with status" in e)
    return {"report_uri": report_uri, "log": str(log_path), "events": tee.events, "executed": executed}


def task_cache(root: Path) -> Path:
    """The local runner's task cache under `root` for this version of the library, components and pipeline."""
    import components
    import ruyi_core

    code = [Path(m.__file__).parent for m in (ruyi_core, components)] + [Path(__file__).parent]
    return Path(root) / ".kfp_cache" / code_version(*code)


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """The tasks inherit this process's environment: set `values` for the run, then put back what was there."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _failure(errors: Path, e: RuntimeError, log_path: Path) -> Exception:
    """One line for a failed run: the failing stages' user errors, else the cause a stage reported for its
    internal error, else KFP's own message (without its colour codes)."""
    kfp_says = _TaskLog.ansi.sub("", str(e)).strip()
    if users := [f.read_text().strip() for f in sorted(errors.glob(f"*{USER_ERROR}"))]:
        return RuyiError("; ".join(users) + f" (full log: {log_path})")
    # not a user error: a bug or an unexpected failure, whose traceback is in the log
    causes = [f.read_text().strip() for f in sorted(errors.glob(f"*{INTERNAL_ERROR}"))]
    task = f"task {m.group(1)}" if (m := re.search(r"Inner task failed: (.+?)\.?$", kfp_says)) else "a task"
    return RuntimeError(f"{task} failed: {'; '.join(causes) or kfp_says} (its traceback is in {log_path})")


def fetch_report(spec: RunSpec, report_uri: str, dest: Path) -> dict:
    """Download the report artifact; returns the tier rows, the promotion outcome and the local HTML path."""
    from ruyi_core.store import ArtifactStore

    store = ArtifactStore.from_spec(spec.store, env=os.environ)
    store.get_artifact(report_uri, dest)
    return {"tiers": json.loads((dest / "tiers.json").read_text()),
            "promotion": json.loads((dest / "promotion.json").read_text()), "html": dest / "report.html",
            "markdown": dest / "report.md"}
