"""Speed and size of one model (a packaged tier, or one exit of the family): what a deployment target cares about.

Prefill: one forward pass over a `speed_prompt_tokens` prompt that fills a fresh KV cache (only the last position's
logits are computed, as in generation). Decode: `speed_new_tokens` greedy steps of one token each on that cache,
timed without the prefill. A hand-written loop rather than `generate`: it always runs exactly that many steps (no
end-of-sequence can stop it early) and its clock covers decode steps only. Each figure is the median of a few
repeats after one warm-up run.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from ruyi_core.family.io import dir_bytes
from ruyi_core.measure import PeakMemory

REPEATS = 3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_prompt(n_tokens: int, vocab: int, seed: int, device: torch.device) -> torch.Tensor:
    """A fixed pseudo-random prompt of one row: speed does not depend on the text, only on its length."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, n_tokens), generator=g).to(device)


@torch.inference_mode()
def prefill_and_decode(model, prompt: torch.Tensor, new_tokens: int, exit_point: int | None = None
                       ) -> tuple[float, float]:
    """(prefill seconds, decode seconds) for one prompt: a fresh cache, then greedy one-token steps."""
    exit_kw = {} if exit_point is None else {"exit_point": exit_point}
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


def _peak_mib(mem: PeakMemory, model) -> float | None:
    """On CUDA torch's peak allocation (weights, activations and KV cache); on the CPU the same quantity
    approximated as the model's weight bytes (for a family, every exit's) plus the resident set's growth."""
    if mem.mib is not None or mem.grown_mib is None:
        return mem.mib
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return weights / 2**20 + mem.grown_mib


def measure(model, tokenizer, spec, exit_point: int | None = None, path: str | Path | None = None) -> dict:
    """{"parameters", "prefill_tokens_per_s", "decode_tokens_per_s", "peak_memory_mib", "prompt_tokens",
    "new_tokens", "device", ["bytes_on_disk" when `path` (a packaged tier's directory) is given]}.

    `parameters` counts what a standalone export of the exit holds (for a family, not the whole family).
    """
    ev = spec.eval
    model.eval()
    dev = next(model.parameters()).device
    x = random_prompt(ev.speed_prompt_tokens, min(len(tokenizer), model.config.vocab_size), ev.seed, dev)
    with PeakMemory(dev) as mem:
        prefill_and_decode(model, x, ev.speed_new_tokens, exit_point)  # warm-up: allocator, kernels, caches
        runs = [prefill_and_decode(model, x, ev.speed_new_tokens, exit_point) for _ in range(REPEATS)]
    prefill = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    params = (model.tier_parameter_count(exit_point) if exit_point is not None
              else sum(p.numel() for p in model.parameters()))
    out = {"parameters": params, "prefill_tokens_per_s": ev.speed_prompt_tokens / prefill,
           "decode_tokens_per_s": ev.speed_new_tokens / decode, "peak_memory_mib": _peak_mib(mem, model),
           "prompt_tokens": ev.speed_prompt_tokens, "new_tokens": ev.speed_new_tokens, "device": str(dev)}
    if path is not None:
        out["bytes_on_disk"] = dir_bytes(Path(path))
    return out
