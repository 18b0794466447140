"""Decoding over a family's tiers, each a plain decoder (a transformers Qwen3/Qwen2 causal LM) whose leading
blocks are the very modules the other tiers use: one trunk in memory (see tiers.py).

- `generate`: batched greedy or sampled decoding of one tier with a KV cache, token by token through a
  callback (streaming). Unpadded single sequences take exactly transformers' path (no mask at prefill,
  causal SDPA), so a tier answers exactly as its package does in vanilla transformers.
- `speculative`: self-speculative greedy decoding. A shallow tier drafts `k` tokens; the target tier checks
  them in one pass. The shared trunk runs once per token for both: its keys and values and its output (the
  state at the depth where the tiers part) serve the draft and the target, so verifying costs only the
  target's own blocks. The output is the target's own greedy output.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


class KV:
    """Keys and values per block, appended as tokens are processed: the `update` transformers' attention
    calls on its `past_key_values`. A cache belongs to one set of blocks (a tier's own, or the trunk)."""

    def __init__(self):
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, cache_kwargs=None):
        if layer_idx in self.kv:
            pk, pv = self.kv[layer_idx]
            k, v = torch.cat([pk, k], dim=-2), torch.cat([pv, v], dim=-2)
        self.kv[layer_idx] = (k, v)
        return k, v

    def crop(self, n: int) -> None:
        self.kv = {i: (k[..., :n, :], v[..., :n, :]) for i, (k, v) in self.kv.items()}

    def select(self, rows: torch.Tensor) -> None:
        """Keep these batch rows (finished sequences leave the batch)."""
        self.kv = {i: (k[rows], v[rows]) for i, (k, v) in self.kv.items()}


@dataclass
class Tier:
    """A tier as decoding sees it: the parts of a transformers causal LM."""

    model: torch.nn.Module

    @property
    def layers(self) -> list[torch.nn.Module]:
        return list(self.model.model.layers)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.model.embed_tokens(ids)

    def run(self, layers, h, cache: KV, pos: torch.Tensor, mask) -> torch.Tensor:
        pe = self.model.model.rotary_emb(h, pos)
        for layer in layers:
            out = layer(h, attention_mask=mask, position_ids=pos, past_key_values=cache, position_embeddings=pe)
            h = out[0] if isinstance(out, tuple) else out
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.model.norm(h)).float()


def causal_mask(valid: torch.Tensor, q: int, dtype) -> torch.Tensor | None:
    """Additive [B, 1, q, n] mask for q new queries at the end of n positions, `valid` [B, n] marking real
    (not padding) keys. None where causal SDPA (or no mask, q = 1) is exactly right: no padding and either a
    single query or no past, which is what transformers passes too."""
    n = valid.shape[1]
    if bool(valid.all()) and (q == 1 or q == n):
        return None
    causal = torch.ones(q, n, dtype=torch.bool, device=valid.device).tril(n - q)
    allowed = causal[None, None] & valid[:, None, None, :]
    allowed |= ~allowed.any(-1, keepdim=True)  # a padding query that sees nothing: any finite row will do
    return torch.zeros(allowed.shape, dtype=dtype, device=valid.device).masked_fill(~allowed,
                                                                                     torch.finfo(dtype).min)


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: list[int], eos: set[int], *,
             temperature: float = 0.0, seed: int | None = None,
             on_token: Callable[[int, int], bool | None] = lambda i, t: None,
             confidence: list[list[float]] | None = None) -> list[list[int]]:
    """Decode every prompt (left-padded into one batch) until EOS or its token budget; each new token is
    reported as on_token(prompt index, token id) as soon as it exists, and a true return stops that prompt
    (a stop string, a client gone). Returns the new tokens per prompt (EOS included when produced);
    `confidence`, when given, receives per prompt the probability the tier gave each token it chose."""
    tier = Tier(model)
    device = next(model.parameters()).device
    n = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (n - len(p)) + p for p in prompts], device=device)
    valid = torch.tensor([[False] * (n - len(p)) + [True] * len(p) for p in prompts], device=device)
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None and temperature > 0 else None
    cache, live = KV(), list(range(len(prompts)))  # live: batch row -> prompt index
    out: list[list[int]] = [[] for _ in prompts]
    if confidence is not None:
        confidence[:] = [[] for _ in prompts]

    def step(h):
        logits = tier.logits(h[:, -1])
        picked = _pick(logits, temperature, gen)
        probs = torch.softmax(logits, -1).gather(-1, picked[:, None])[:, 0].tolist() if confidence is not None else None
        return picked, probs

    h = tier.run(tier.layers, tier.embed(ids), cache, pos, causal_mask(valid, n, tier.model.dtype))
    nxt, probs = step(h)
    while True:
        keep = []
        for row, i in enumerate(live):
            t = int(nxt[row])
            out[i].append(t)
            if probs is not None:
                confidence[i].append(probs[row])
            if not on_token(i, t) and t not in eos and len(out[i]) < max_new_tokens[i]:
                keep.append(row)
        if not keep:
            return out
        if len(keep) < len(live):
            rows = torch.tensor(keep, device=device)
            cache.select(rows)
            valid, pos, nxt = valid[rows], pos[rows], nxt[rows]
            live = [live[r] for r in keep]
        valid = torch.cat([valid, torch.ones(len(live), 1, dtype=torch.bool, device=device)], dim=1)
        pos = pos[:, -1:] + 1
        h = tier.run(tier.layers, tier.embed(nxt[:, None]), cache, pos, causal_mask(valid, 1, tier.model.dtype))
        nxt, probs = step(h)


def shared_depth(a, b) -> int:
    """How many leading blocks two tiers share (the same module objects); -1 when not even their embeddings
    are shared (two separate models)."""
    if a.model.embed_tokens is not b.model.embed_tokens:
        return -1
    n = 0
    for x, y in zip(a.model.layers, b.model.layers):
        if x is not y:
            break
        n += 1
    return n


def verify(t: Tier, own: list, cache: KV, states: torch.Tensor, at: int,
           drafts: list[int]) -> tuple[int, list[int], list[float]]:
    """A target tier checks drafted tokens in one pass: its own blocks (`own`, on `cache`) read `states`, the
    trunk's output for positions `at`, `at + 1`, ..., whose last len(drafts) + 1 are the position before the
    first draft and the drafts'. Returns how many drafts it accepts (each is what it would pick itself), its own
    greedy token after each of those len(drafts) + 1 positions, and the probability it gives each."""
    q = states.shape[1]
    valid = torch.ones(1, at + q, dtype=torch.bool, device=states.device)
    pos = torch.arange(at, at + q, device=states.device)[None]
    h = t.run(own, states, cache, pos, causal_mask(valid, q, t.model.dtype))
    logits = t.logits(h[:, q - len(drafts) - 1:])[0]
    picked = logits.argmax(-1)
    probs = torch.softmax(logits, -1).gather(-1, picked[:, None])[:, 0].tolist()
    preds = picked.tolist()
    a = 0
    while a < len(drafts) and drafts[a] == preds[a]:
        a += 1
    return a, preds, probs


@dataclass
class SpecStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@torch.no_grad()
def speculative(draft_model, target_model, prompt: list[int], max_new_tokens: int, eos: set[int], k: int = 4,
                stats: SpecStats | None = None, on_token: Callable[[int], bool | None] = lambda t: None,
                skip: int = 0, min_confidence: float = 0.0) -> list[int]:
    """The target tier's greedy output for one prompt, drafted up to `k` tokens at a time by a shallower tier
    that shares its first blocks (see the module doc). on_token(token) gets each token as it is accepted; a true
    return stops decoding. `skip`: the draft leaves out its last blocks (a cheaper draft, as LayerSkip and DEL
    do: DaE's added blocks start as identities); `min_confidence`: a round stops drafting after a token the
    draft gives less probability than this (a draft it doubts is mostly rejected)."""
    d, t = Tier(draft_model), Tier(target_model)
    s = shared_depth(draft_model, target_model)
    if s < 0:
        raise ValueError("the draft and target tiers share no trunk: load them as one family")
    if not 0 <= skip < len(d.layers) - s:
        raise ValueError(f"skip {skip}: the draft has {len(d.layers) - s} blocks of its own; keep at least one")
    trunk, d_own, t_own = t.layers[:s], d.layers[s:len(d.layers) - skip], t.layers[s:]
    stats = stats if stats is not None else SpecStats()
    device = next(target_model.parameters()).device
    sc, dc, tc = KV(), KV(), KV()  # the trunk's cache serves both tiers
    ids = torch.tensor([prompt], device=device)
    pos = torch.arange(len(prompt), device=device)[None]
    hs = t.run(trunk, t.embed(ids), sc, pos, None)
    d.run(d_own, hs, dc, pos, None)
    x = int(t.logits(t.run(t_own, hs, tc, pos, None)[:, -1]).argmax(-1))
    n, out = len(prompt), [x]
    stopped = bool(on_token(x))

    def trunk_step(tok: int, at: int) -> torch.Tensor:
        return t.run(trunk, t.embed(torch.tensor([[tok]], device=device)), sc, torch.tensor([[at]], device=device),
                     None)

    while not stopped and x not in eos and len(out) < max_new_tokens:
        states, drafts, cur = [], [], x
        for j in range(min(k, max_new_tokens - len(out))):
            h = trunk_step(cur, n + j)
            states.append(h)
            logits = d.logits(d.run(d_own, h, dc, torch.tensor([[n + j]], device=device), None)[:, -1])
            cur = int(logits.argmax(-1))
            drafts.append(cur)
            if cur in eos or (min_confidence > 0 and float(torch.softmax(logits, -1)[0, cur]) < min_confidence):
                break
        m = len(drafts)
        states.append(trunk_step(drafts[-1], n + m))
        a, preds, _ = verify(t, t_own, tc, torch.cat(states, dim=1), n, drafts)
        stats.rounds, stats.drafted, stats.accepted = stats.rounds + 1, stats.drafted + m, stats.accepted + a
        sc.crop(n + a + 1)
        tc.crop(n + a + 1)
        if a == m:  # the draft's own blocks have not seen its last token yet
            d.run(d_own, states[-1], dc, torch.tensor([[n + m]], device=device), None)
        else:
            dc.crop(n + a + 1)
        n += a + 1
        for tok in drafts[:a] + [preds[a]]:
            if stopped or x in eos or len(out) >= max_new_tokens:
                break
            x = tok
            out.append(tok)
            stopped = bool(on_token(tok))
    return out


@dataclass
class Read:
    """One sequence as a tier has read it (the prompt and its answer but the answer's last token), kept for a
    deeper tier that shares the reader's first `depth` blocks: those blocks' keys and values, and their output
    (the state where the two tiers part) at every position read."""
    model: torch.nn.Module
    depth: int
    kv: KV
    states: torch.Tensor  # [1, positions read, hidden]

    @property
    def length(self) -> int:
        return self.states.shape[1]

    def crop(self, length: int) -> Read:
        """What was read of the first `length` positions only."""
        self.kv.crop(length)
        return Read(self.model, self.depth, self.kv, self.states[:, :length])


@dataclass
class Continued:
    """A tier's greedy answer, decoded on from what a shallower tier read (`continue_reading`)."""
    tokens: list[int]
    confidence: list[float]  # the probability the tier gave each of its tokens
    read: Read  # what this tier read, kept at the depth asked for
    accepted: int  # draft tokens taken as they were
    block_tokens: int  # blocks run times the positions they read


def first_read(model, tokens: list[int]) -> Read:
    """Tokens as no block has read them yet (a prompt, or a prompt and a draft but its last token): their
    embeddings, the state before block 0."""
    t = Tier(model)
    return Read(model, 0, KV(), t.embed(torch.tensor([tokens], device=next(model.parameters()).device)))


@torch.no_grad()
def continue_reading(model, read: Read, draft: list[int], max_new_tokens: int, eos: set[int],
                     keep: int) -> Continued:
    """The greedy answer of `model` (a tier that shares `read`'s first `read.depth` blocks) to the prompt that
    `read` holds with `draft` after it (a shallower tier's answer; `read` has read all of it but its last
    token): the trunk's keys and values for the prompt and draft are reused, the tier's own blocks check the
    draft in one pass (`verify`) and decoding goes on from the first token the tier would not have produced.
    With no draft (and a `first_read`), plain greedy decoding. What this tier reads is kept at depth `keep`
    (at least `read.depth`); `read` itself is used up."""
    t = Tier(model)
    s = read.depth
    if shared_depth(read.model, model) < s or keep < s:
        raise ValueError("the tier does not share the reader's trunk (load them as one family), or keep < depth")
    trunk, mid, top = t.layers[:s], t.layers[s:keep], t.layers[keep:]
    mid_kv, top_kv, device = KV(), KV(), read.states.device
    cost = 0

    def read_token(tok: int, at: int) -> torch.Tensor:
        """One token through the trunk, on the reused cache: its state where the tiers part."""
        nonlocal cost
        cost += len(trunk)
        return t.run(trunk, t.embed(torch.tensor([[tok]], device=device)), read.kv, torch.tensor([[at]], device=device),
                     None)

    states = read.states
    if draft:  # the draft's last token, not yet read
        states = torch.cat([states, read_token(draft[-1], read.length)], dim=1)
    kept = t.run(mid, states, mid_kv, torch.arange(states.shape[1], device=device)[None], None)
    a, preds, probs = verify(t, top, top_kv, kept, 0, draft)
    cost += (len(mid) + len(top)) * states.shape[1]
    out, conf = [], []
    for tok, p in zip(draft[:a] + [preds[a]], probs):
        if (out and out[-1] in eos) or len(out) >= max_new_tokens:
            break
        out.append(tok)
        conf.append(p)
    n = states.shape[1] - len(draft) + len(out) - 1  # positions read: the prompt and the answer but its last
    read.kv.crop(n)
    mid_kv.crop(n)
    top_kv.crop(n)
    kept = [kept[:, :n]]
    while out[-1] not in eos and len(out) < max_new_tokens:
        pos = torch.tensor([[n]], device=device)
        kept.append(t.run(mid, read_token(out[-1], n), mid_kv, pos, None))
        cost += len(mid) + len(top)
        logits = t.logits(t.run(top, kept[-1], top_kv, pos, None)[:, -1])
        x = int(logits.argmax(-1))
        out.append(x)
        conf.append(float(torch.softmax(logits, -1)[0, x]))
        n += 1
    kv = KV()
    kv.kv = {**read.kv.kv, **mid_kv.kv}
    return Continued(out, conf, Read(model, keep, kv, torch.cat(kept, dim=1)), a, cost)
