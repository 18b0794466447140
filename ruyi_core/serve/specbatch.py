"""Self-speculative decoding for concurrent requests: one batch (left-padded, as decode.generate batches), every
row drafting through the shallower tier and verified by the target tier in one pass per round. The trunk's
keys, values and output serve both tiers, as in decode.speculative.

Rows accept different numbers of drafts; the caches stay rectangular because every row keeps the drafts all
rows accepted plus its target token after them. That token is the target's own pick at that position, so each row's
output is the target's greedy output (as batched decoding gives it: equal to one by one up to float rounding in
near-ties); a row that accepted more only re-drafts what it had."""
from __future__ import annotations

from collections.abc import Callable

import torch

from ruyi_core.serve.decode import KV, SpecStats, Tier, causal_mask, shared_depth


class _Batch:
    """The rows still decoding: their caches (trunk, draft's own blocks, target's own blocks) and positions."""

    def __init__(self, prompts: list[list[int]], device):
        n = max(len(p) for p in prompts)
        self.ids = torch.tensor([[0] * (n - len(p)) + p for p in prompts], device=device)
        self.valid = torch.tensor([[False] * (n - len(p)) + [True] * len(p) for p in prompts], device=device)
        self.pos = (self.valid.long().cumsum(-1) - 1).clamp(min=0)
        self.last = self.pos[:, -1:]  # the position of each row's last column
        self.live = list(range(len(prompts)))  # batch row -> prompt index
        self.caches = (KV(), KV(), KV())

    def extend(self, q: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Positions and mask for `q` new columns."""
        self.valid = torch.cat([self.valid, torch.ones(len(self.live), q, dtype=torch.bool,
                                                       device=self.valid.device)], 1)
        pos = self.last + 1 + torch.arange(q, device=self.valid.device)[None]
        self.last = pos[:, -1:]
        return pos, self.valid

    def crop(self, columns: int) -> None:
        self.last = self.last - (self.valid.shape[1] - columns)
        self.valid = self.valid[:, :columns]
        for c in self.caches:
            c.crop(columns)

    def keep(self, rows: list[int]) -> None:
        index = torch.tensor(rows, device=self.valid.device)
        self.valid, self.last = self.valid[index], self.last[index]
        self.live = [self.live[r] for r in rows]
        for c in self.caches:
            c.select(index)


@torch.no_grad()
def speculative_batch(draft_model, target_model, prompts: list[list[int]], max_new_tokens: list[int],
                      eos: set[int], k: int = 4, stats: SpecStats | None = None,
                      on_token: Callable[[int, int], bool | None] = lambda i, t: None, skip: int = 0,
                      min_confidence: float = 0.0) -> list[list[int]]:
    """The target tier's greedy answers to many prompts at once, drafted `k` tokens a round by a shallower tier
    (decode.speculative's `skip` and `min_confidence`: a round stops once every row drafted a token it
    doubts). on_token(prompt index, token) gets each token as it is kept; a true return stops that prompt."""
    d, t = Tier(draft_model), Tier(target_model)
    s = shared_depth(draft_model, target_model)
    if s < 0 or not 0 <= skip < len(d.layers) - s:
        raise ValueError("the draft must share the target's trunk and keep at least one block of its own")
    trunk, d_own, t_own = t.layers[:s], d.layers[s:len(d.layers) - skip], t.layers[s:]
    stats = stats if stats is not None else SpecStats()
    b = _Batch(prompts, next(target_model.parameters()).device)
    sc, dc, tc = b.caches
    dtype = target_model.dtype
    mask = causal_mask(b.valid, b.valid.shape[1], dtype)
    hs = t.run(trunk, t.embed(b.ids), sc, b.pos, mask)
    d.run(d_own, hs, dc, b.pos, mask)
    x = t.logits(t.run(t_own, hs, tc, b.pos, mask)[:, -1]).argmax(-1)
    out: list[list[int]] = [[] for _ in prompts]

    def emit(row: int, tokens: list[int]) -> bool:
        """Keeps a row's tokens until it ends (a stop, EOS, its budget); whether it goes on."""
        i = b.live[row]
        for tok in tokens:
            out[i].append(tok)
            if on_token(i, tok) or tok in eos or len(out[i]) >= max_new_tokens[i]:
                return False
        return True

    going = [r for r in range(len(b.live)) if emit(r, [int(x[r])])]
    while going:
        if len(going) < len(b.live):
            x = x[torch.tensor(going, device=x.device)]
            b.keep(going)
        budget = max(max_new_tokens[i] - len(out[i]) for i in b.live)
        x, going = _round(b, (d, t), (trunk, d_own, t_own), x, min(k, budget), min_confidence, eos, stats, emit)
    return out


def _round(b: _Batch, tiers: tuple[Tier, Tier], blocks: tuple, x: torch.Tensor, k: int, min_confidence: float,
           eos: set[int], stats: SpecStats, emit: Callable[[int, list[int]], bool]) -> tuple[torch.Tensor, list[int]]:
    """One round for every row: draft up to `k`, verify in one pass, keep the drafts every row accepted and each
    row's target token after them. Returns the rows' next tokens and the rows that go on."""
    (d, t), (trunk, d_own, t_own), (sc, dc, tc) = tiers, blocks, b.caches
    dtype, start = t.model.dtype, b.valid.shape[1]
    states, drafts, cur = [], [], x
    doubted = torch.zeros(len(b.live), dtype=torch.bool, device=x.device)
    for _ in range(k):
        pos, valid = b.extend(1)
        h = t.run(trunk, t.embed(cur[:, None]), sc, pos, causal_mask(valid, 1, dtype))
        states.append(h)
        logits = d.logits(d.run(d_own, h, dc, pos, causal_mask(valid, 1, dtype))[:, -1])
        cur = logits.argmax(-1)
        drafts.append(cur)
        doubted |= torch.softmax(logits, -1).gather(-1, cur[:, None])[:, 0] < min_confidence
        doubted |= torch.isin(cur, torch.tensor(sorted(eos), device=cur.device, dtype=cur.dtype))
        if bool(doubted.all()):
            break
    m = len(drafts)
    pos, valid = b.extend(1)
    states.append(t.run(trunk, t.embed(cur[:, None]), sc, pos, causal_mask(valid, 1, dtype)))
    columns = b.last - m + torch.arange(m + 1, device=x.device)[None]
    preds = t.logits(t.run(t_own, torch.cat(states, 1), tc, columns, causal_mask(valid, m + 1, dtype))).argmax(-1)
    drafted = torch.stack(drafts, 1)
    accepted = (drafted == preds[:, :m]).long().cumprod(1).sum(1)  # per row: the drafts it would pick itself
    a = int(accepted.min())
    stats.rounds, stats.drafted, stats.accepted = (stats.rounds + 1, stats.drafted + m * len(b.live),
                                                   stats.accepted + int(accepted.sum()))
    b.crop(start + a + 1)
    if a == m:  # the draft's own blocks have not seen the last draft yet
        d.run(d_own, states[-1], dc, b.last, causal_mask(b.valid, 1, dtype))
    nxt = preds[:, a]
    return nxt, [r for r in range(len(b.live)) if emit(r, drafted[r, :a].tolist() + [int(nxt[r])])]
