"""Launching workers: a module under torchrun (one process per device), a failed child turned into one line, a
worker that dies with its parent, and the workers' own error protocol (one `error:` line for what the user can
fix, a traceback and one `internal error:` line for a bug). Used by training (ruyi_core.megatron) and GRPO."""
from __future__ import annotations

import os
import subprocess
import sys
import traceback
from collections import deque
from collections.abc import Callable
from pathlib import Path

from ruyi_core.errors import RuyiError


def run_child(cmd: list[str], log, env: dict | None = None) -> None:
    """Streams a child's output into `log`. A failure becomes one line: the child's own `error:` line (a user
    error), or an internal error pointing at the traceback the log now holds."""
    tail: deque[str] = deque(maxlen=40)
    errs, bugs = [], []  # the workers' own one-line verdicts, however long torchrun's report after them is
    # through this module's trampoline: the child (torchrun, which does not ask for it) dies with this process
    proc = subprocess.Popen([sys.executable, "-m", "ruyi_core.launch", *cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})
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


RUNNER_PID_ENV = "RUYI_RUNNER_PID"  # the local pipeline runner's pid, which its tasks stop with


def stop_with_runner() -> None:
    """A local task's process sits under KFP's shell, not under `ruyi pipeline run`, so the kernel cannot tie it
    to the runner: watch the runner (its pid and start time, so a recycled pid does not count) and stop this
    process when it is gone. The task's own children (run_child) then die with it. No-op without a runner."""
    import signal
    import threading
    import time

    pid = int(os.environ.get(RUNNER_PID_ENV) or 0)
    born = _start_time(pid) if pid else None
    if born is None:
        return

    def watch() -> None:
        while _start_time(pid) == born:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)  # as if killed with the runner: the next stage sweeps the work folder

    threading.Thread(target=watch, name="stop-with-runner", daemon=True).start()


def _start_time(pid: int) -> str | None:
    try:  # /proc/<pid>/stat: the fields after the command's closing parenthesis; start time is the 22nd field
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def torchrun(nproc: int, module: str, args: list[str], log_dir: Path) -> list[str]:
    """`log_dir`: torchrun's own folder, in the caller's work folder (by default it leaves a `torchelastic_*`
    folder in the temp dir per launch)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(_free_port()), "--log-dir", str(log_dir), "-m", module, *args]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_main(body: Callable[[], None], cleanup: Callable[[], None] | None = None) -> None:
    """A torchrun worker's main: dies with its parent, runs `body`, and reports as run_child expects."""
    die_with_parent()  # a killed runner leaves no worker behind
    # The kernel clears the request in a fork's child, and megatron's checkpoint save forks its writers (the
    # torch_dist strategy always does): ask again in every child, or a writer killed mid-save outlives the run.
    # The hook is process-wide, which is right here: this process is the worker, and every fork of it should go.
    os.register_at_fork(after_in_child=die_with_parent)
    code = 0
    try:
        body()
    except RuyiError as e:  # the user can fix it: one line, no traceback
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = 2
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as e:  # a bug: the whole traceback for the run log, then one line naming it
        # (BaseException: torch.distributed.checkpoint's CheckpointException is not an Exception)
        traceback.print_exc()
        first = (str(e).strip().splitlines() or [""])[0]
        print(f"internal error: {type(e).__name__}: {first}", file=sys.stderr, flush=True)
        code = 1
    finally:
        if cleanup is not None:
            cleanup()
    if code:
        # A run that failed midway can leave a C++ thread joinable (a checkpoint reader's, the process group's):
        # the interpreter's teardown then aborts ("terminate called without an active exception", SIGABRT) and
        # the exit code that says whose error it was is lost. Nothing is left to tear down that matters.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":  # run_child's trampoline: the kernel's request survives exec
    die_with_parent()
    os.execv(sys.argv[1], sys.argv[1:])
