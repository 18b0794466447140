"""Speed and size of one model (a packaged tier, or one exit of the family): what a deployment target cares about.

Prefill: one forward pass over a `speed_prompt_tokens` prompt that fills a fresh KV cache (only the last position's
logits are computed, as in generation). Decode: `speed_new_tokens` greedy steps of one token each on that cache,
timed without the prefill. A hand-written loop rather than `generate`: it always runs exactly that many steps (no
end-of-sequence can stop it early) and its clock covers decode steps only. Each figure is the median of a few
repeats after one warm-up run.
"""
from __future__ import annotations

import re
import statistics
import time
from pathlib import Path

import torch

from ruyi_core.family.io import dir_bytes

REPEATS = 3
_MIB = 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


class _PeakMemory:
    """Peak memory of the workload inside the block, in MiB (None where it cannot be measured).

    CUDA: torch.cuda.max_memory_allocated after a reset (weights, activations and KV cache).
    CPU (Linux): the same quantity approximated as the model's weight bytes (for a family, every exit's) plus
    the growth of the process's resident set: writing 5 to /proc/self/clear_refs resets the kernel's high-water
    mark (VmHWM), read back afterwards, so no sampling thread can miss a short peak. A lower bound: memory the
    allocator kept from earlier work in this process is reused without growing the resident set.
    """

    def __init__(self, model, device: torch.device):
        self.model, self.device, self.mib, self.base_kib = model, device, None, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.base_kib = _rss_kib("VmRSS")
        except OSError:  # not Linux, or the kernel refuses: report None rather than a wrong number
            pass
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.mib = torch.cuda.max_memory_allocated(self.device) / _MIB
        elif self.base_kib is not None:
            weights = sum(t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers()))
            self.mib = (weights + max(_rss_kib("VmHWM") - self.base_kib, 0) * 1024) / _MIB
        return False


@torch.inference_mode()
def _run_once(model, prompt: torch.Tensor, new_tokens: int, exit_kw: dict) -> tuple[float, float]:
    """(prefill seconds, decode seconds) for one prompt: a fresh cache, then greedy one-token steps."""
    dev = prompt.device
    _sync(dev)
    t0 = time.perf_counter()
    out = model(prompt, use_cache=True, logits_to_keep=1, **exit_kw)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(dev)
    t1 = time.perf_counter()
    cache = out.past_key_values
    for _ in range(new_tokens):
        out = model(nxt, past_key_values=cache, use_cache=True, **exit_kw)
        cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(dev)
    return t1 - t0, time.perf_counter() - t1


def measure(model, tokenizer, spec, exit_point: int | None = None, path: str | Path | None = None) -> dict:
    """{"parameters", "prefill_tokens_per_s", "decode_tokens_per_s", "peak_memory_mib", "prompt_tokens",
    "new_tokens", "device", ["bytes_on_disk" when `path` (a packaged tier's directory) is given]}.

    `parameters` counts what a standalone export of the exit holds (for a family, not the whole family).
    """
    ev = spec.eval
    model.eval()
    exit_kw = {} if exit_point is None else {"exit_point": exit_point}
    dev = next(model.parameters()).device
    # A fixed pseudo-random prompt: speed does not depend on the text, only on its length.
    g = torch.Generator().manual_seed(ev.seed)
    prompt = torch.randint(0, min(len(tokenizer), model.config.vocab_size), (1, ev.speed_prompt_tokens),
                           generator=g).to(dev)
    with _PeakMemory(model, dev) as mem:
        _run_once(model, prompt, ev.speed_new_tokens, exit_kw)  # warm-up: allocator, kernels, caches
        runs = [_run_once(model, prompt, ev.speed_new_tokens, exit_kw) for _ in range(REPEATS)]
    prefill = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    params = (model.tier_parameter_count(exit_point) if exit_point is not None
              else sum(p.numel() for p in model.parameters()))
    out = {"parameters": params, "prefill_tokens_per_s": ev.speed_prompt_tokens / prefill,
           "decode_tokens_per_s": ev.speed_new_tokens / decode, "peak_memory_mib": mem.mib,
           "prompt_tokens": ev.speed_prompt_tokens, "new_tokens": ev.speed_new_tokens, "device": str(dev)}
    if path is not None:
        out["bytes_on_disk"] = dir_bytes(Path(path))
    return out
