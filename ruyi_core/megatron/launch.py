"""Launching the trainer: check the parallel layout, run a module under torchrun (or a Kubeflow Trainer v2
TrainJob) and turn a failed child into one line. The training stage itself is ruyi_core.stages.train."""
from __future__ import annotations

import os
import subprocess
import sys
from collections import deque

from ruyi_core.errors import RuyiError
from ruyi_core.spec import RunSpec


def validate_layout(spec: RunSpec, family_cfg: dict, stage: str) -> None:
    """Stops a bad TP/PP/DP layout with one line before any process starts: the spec's own checks, now against
    the fetched family's config (a base only the store had was not checked when the spec was loaded)."""
    from ruyi_core.spec.checks import layout_problems

    problems = layout_problems(spec, family_cfg)
    if problems:
        raise RuyiError(problems[0])
    if family_cfg.get("shared_heads"):
        raise RuyiError("family.shared_heads: the megatron trainer gives every exit its own head; "
                        "train a family with shared_heads: false")


def _print(line: str) -> None:
    print(line, flush=True)  # our stdout is a pipe when a pipeline step runs us: no block buffering


def run_child(cmd: list[str], log, env: dict | None = None) -> None:
    """Streams a child's output into `log`. A failure becomes one line: the child's own `error:` line (a user
    error), or an internal error pointing at the traceback the log now holds."""
    tail: deque[str] = deque(maxlen=40)
    errs, bugs = [], []  # the workers' own one-line verdicts, however long torchrun's report after them is
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        tail.append(line)
        verdict = line.split("]: ", 1)[-1] if line.startswith("[rank") else line  # torchrun's rank prefix
        if verdict.startswith("error:"):
            errs.append(verdict)
        elif verdict.startswith("internal error:"):
            bugs.append(verdict)
        if not any(w in line for w in ("Warning", "warnings.warn", "warn(")):
            log(line)
    if proc.wait() != 0:
        if errs:
            raise RuyiError(errs[-1][len("error:"):].strip())
        what = (bugs[-1][len("internal error:"):].strip() if bugs
                else f"exit {proc.returncode}: {tail[-1] if tail else ''}")
        module = cmd[len(cmd) - 1 - cmd[::-1].index("-m") + 1] if "-m" in cmd else cmd[0]
        raise RuntimeError(f"internal error in {module} ({what}): its traceback is in the log")


def die_with_parent() -> None:
    """torchrun starts its workers in their own session, so killing a runner's process group (or torchrun itself,
    with SIGKILL) would leave them training and uploading. Ask the kernel to stop this process when its parent
    goes (Linux prctl PR_SET_PDEATHSIG); elsewhere a no-op."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(1)


def torchrun(nproc: int, module: str, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(_free_port()), "-m", module, *args]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
