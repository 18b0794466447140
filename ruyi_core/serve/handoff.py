"""Trunk-state hand-offs between servers of one family: a server of shallower tiers sends the upstream what its
own tiers have already read of a request, the keys and values of the blocks both servers hold, and their
output (the state where the two servers' tiers part), so the upstream does not read the prompt and draft again.

Exact only between bit-identical blocks: each side names its leading blocks by a digest chain over their
tensors (family.tensors.digests; a package records its chain at packaging), the upstream publishes its own
(GET /v1/ruyi/trunk) with its dtype, and the state covers the longest common prefix. The upstream checks the
digest, dtype, every shape and the byte count before it allocates a tensor (`decode`); anything else is a 400
and nothing is read. A state whose digest differs from the upstream's (its packages changed since) is dropped
for the tokens, and the answer says so.

Wire format: one JSON line (the request and the state's header), then the tensors' raw bytes, keys and values
block by block, then the states."""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

import torch

from ruyi_core.serve.decode import KV, Read, Tier

STATE_PATH = "/ruyi/continue-state"
TRUNK_PATH = "/ruyi/trunk"
HEADER_LIMIT = 1 << 20  # the JSON line: ids of a prompt and draft that fit any context
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def common_depth(mine: list[str], theirs: list[str]) -> int:
    """How many leading blocks two digest chains share (-1: not even the embedding)."""
    n = -1
    for i, (a, b) in enumerate(zip(mine, theirs)):
        if a != b:
            break
        n = i
    return n


def _layout(model, depth: int, length: int, kv: bool = True) -> list[tuple[int, ...]]:
    """The shapes a state of `length` positions at `depth` has for this model: (k, v) per block (unless not
    `kv`: a split hand-off sends the states alone), then states."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    pair = (1, cfg.num_key_value_heads, length, head_dim)
    return [pair] * (2 * depth * kv) + [(1, length, cfg.hidden_size)]


def state_bytes_per_token(model, depth: int, kv: bool = True) -> int:
    """Bytes a state at `depth` takes per position, in the model's dtype (without `kv`: the states alone)."""
    return sum(math.prod(s) for s in _layout(model, depth, 1, kv)) * model.dtype.itemsize


def encode(request: dict, read: Read, digest: str, kv: bool = True) -> bytes:
    """A hand-off with `read` (what this server's tiers read, at its depth) as its state; without `kv`, the
    states alone (a split hand-off, split.py)."""
    tensors = [t for i in range(read.depth * kv) for t in read.kv.kv[i]] + [read.states]
    header = {**request, "state": {"depth": read.depth, "length": read.length, "digest": digest,
                                   "dtype": str(read.states.dtype).removeprefix("torch.")}}
    return json.dumps(header).encode() + b"\n" + b"".join(
        t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes() for t in tensors)


@dataclass
class Handoff:
    request: dict  # model, prompt, draft, max_tokens
    read: Read | None  # None: the state does not fit this server's trunk; `mismatch` says why
    mismatch: str | None = None


def decode(body: bytes, model, chain: list[str], kv: bool = True) -> Handoff:
    """A hand-off for `model` (this server's shallowest tier, whose digest chain is `chain`). Raises ValueError
    (a 400) on anything malformed, before allocating a tensor. Without `kv`: a split hand-off's states alone,
    for the prompt and the whole draft (the lower server has read its last token too)."""
    end = body.find(b"\n", 0, HEADER_LIMIT)
    if end < 0:
        raise ValueError("a state hand-off starts with one JSON line of at most 1 MiB")
    head = json.loads(body[:end])
    state = head.pop("state", None) if isinstance(head, dict) else None
    if not isinstance(state, dict):
        raise ValueError("the hand-off's JSON line has no `state` object")
    depth, length, dtype = state.get("depth"), state.get("length"), DTYPES.get(state.get("dtype"))
    if not isinstance(depth, int) or not 0 < depth <= len(model.model.layers) or not isinstance(length, int) \
            or length < 1 or dtype is None:
        raise ValueError(f"state depth {depth!r}, length {length!r} or dtype {state.get('dtype')!r} is not one "
                         f"this server's trunk ({len(model.model.layers)} blocks, {model.dtype}) can hold")
    expected = len(head.get("prompt", [])) + len(head.get("draft", [])) - kv
    if length != expected:
        raise ValueError(f"the state covers {length} positions; the prompt and draft{' but its last token' * kv}"
                         f" are {expected}")
    shapes = _layout(model, depth, length, kv)
    sizes = [math.prod(s) * dtype.itemsize for s in shapes]
    if len(body) - end - 1 != sum(sizes):
        raise ValueError(f"the state's tensors take {len(body) - end - 1} bytes; its header promises {sum(sizes)}")
    if dtype != model.dtype or state.get("digest") != chain[depth]:
        return Handoff(head, None, "the sender's trunk is not bit-identical to this server's: read the tokens")
    tensors, at = [], end + 1
    device = next(model.parameters()).device
    for shape, size in zip(shapes, sizes):
        raw = torch.frombuffer(bytearray(body[at:at + size]), dtype=torch.uint8)
        tensors.append(raw.view(dtype).reshape(shape).to(device))
        at += size
    cache = KV()
    cache.kv = {i: (tensors[2 * i], tensors[2 * i + 1]) for i in range(depth * kv)}
    return Handoff(head, Read(model, depth, cache, tensors[-1]))


@torch.no_grad()
def measure_block(model, positions: int = 64, repeats: int = 3) -> float:
    """Seconds per position of the model's first block reading a prompt (the best of a few runs); with one
    position, what a block costs per decoded token."""
    t = Tier(model)
    device = next(model.parameters()).device
    h = torch.randn(1, positions, model.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(
        device, model.dtype)
    pos = torch.arange(positions, device=device)[None]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        t.run(t.layers[:1], h, KV(), pos, None)
        best = min(best, time.perf_counter() - start)
    return best / positions
