"""What a run measures about itself: the peak memory of a piece of work and the version of the code doing it.

Peak resident memory on Linux comes from the kernel's high-water mark (VmHWM), which writing 5 to
/proc/self/clear_refs restarts: read back afterwards, no sampling thread can miss a short peak.
"""
from __future__ import annotations

import re
import resource
import subprocess
from pathlib import Path

_MIB = 2**20


def _status_kib(field: str) -> int | None:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM), or None where there is none (not Linux)."""
    try:
        hit = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(hit.group(1)) if hit else None


def reset_peak() -> bool:
    """Restart this process's peak resident-set count, so that a later peak is the coming work's own; False where
    the kernel refuses (not Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mib() -> float:
    """Peak resident memory since `reset_peak` of this process, or of its largest finished child (a trainer under
    torchrun, a conversion), whichever is larger. Children are counted over the process's life."""
    own = _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024, 1)


class PeakMemory:
    """Peak memory of the work inside the block, in MiB; None where it cannot be measured.

    On a CUDA `device`: `mib` is torch's peak allocation there (reset at entry). Elsewhere (Linux): `grown_mib`
    is how far the resident set's peak rose above its size at entry. A lower bound: memory the allocator kept
    from earlier work in this process is reused without growing the resident set.
    """

    def __init__(self, device=None):
        self.device, self.mib, self.grown_mib, self._base_kib = device, None, None, None

    def _cuda(self) -> bool:
        return getattr(self.device, "type", None) == "cuda"

    def __enter__(self):
        if self._cuda():
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
        elif reset_peak():
            self._base_kib = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        if self._cuda():
            import torch

            self.mib = torch.cuda.max_memory_allocated(self.device) / _MIB
        elif self._base_kib is not None and (peak := _status_kib("VmHWM")) is not None:
            self.grown_mib = max(peak - self._base_kib, 0) * 1024 / _MIB
        return False


def git_commit() -> str | None:
    """The short commit hash of the checkout this code runs from; None outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def code_version() -> str:
    """ruyi_core's version, plus the git commit when the code runs from a checkout."""
    from ruyi_core import __version__

    sha = git_commit()
    return f"{__version__}+g{sha}" if sha else __version__
