"""DaE stage 2, SVD compression (SVD-LLM v2 style), generic over any nn.Module.

For each chosen nn.Linear with weight W (out x in) and calibration inputs X (in x tokens), let the Gram matrix
S = X X^T = Us Ss Us^T. The whitened SVD  W Us sqrt(Ss) = Uw Sw Vw^T  truncated to rank r gives
W' = Uw_r Sw_r Vw_r^T sqrt(Ss)^-1 Us^T, the rank-r matrix minimising ||W X - W' X||_F, and that error is exactly
sqrt(sum of the discarded Sw^2) (the "theoretical truncation loss"). Ranks come from `allocate_ranks`; each
Linear is replaced by a `LowRankLinear` holding the two factors; `materialize` turns them back into dense
Linears (e.g. to export a vanilla checkpoint).
"""
from __future__ import annotations

import heapq
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from fractions import Fraction

import torch
from torch import nn

from ruyi_core.errors import RuyiError

# Eigenvalues of S below EPS * max eigenvalue are clamped up to it: S is singular when a layer saw fewer
# tokens than in_features or has dead inputs, and sqrt(Ss)^-1 would blow up. The clamp gives the well-defined
# limit (in null directions W' keeps W projected on the kept left subspace) and only overestimates the loss.
EPS = 1e-8


class CompressionError(RuyiError, ValueError):
    """Bad compression input (ratio, module names, groups, calibration). A ValueError too, for callers."""


class LowRankLinear(nn.Module):
    """y = up(down(x)): `down` in -> rank (no bias), `up` rank -> out (carries the original bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if not 0 <= rank <= min(in_features, out_features):
            raise CompressionError(f"rank must be in [0, {min(in_features, out_features)}], got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        with warnings.catch_warnings():  # rank 0 (an all-zero weight) makes empty factors; that is fine
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
            self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None,
                     take: bool = False) -> LowRankLinear:
        """A: [out, r] (up.weight), B: [r, in] (down.weight); the tensors are copied, or with `take` (fresh
        factors no one else holds) used as they are."""
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != B.shape[0]:
            raise CompressionError(f"factors must be [out, r] and [r, in], got {tuple(A.shape)}, {tuple(B.shape)}")
        # Built on the meta device so no random init is spent on weights we overwrite at once.
        mod = cls(B.shape[1], A.shape[0], A.shape[1], bias=bias is not None, device="meta", dtype=A.dtype)
        mod.up.weight = nn.Parameter(A.detach() if take else A.detach().clone())
        mod.down.weight = nn.Parameter((B.detach() if take else B.detach().clone()).to(A))
        if bias is not None:
            mod.up.bias = nn.Parameter(bias.detach().clone().to(A))
        return mod

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


# ---------------------------------------------------------------------------------------------- calibration

def _resolve(model: nn.Module, names: list[str]) -> dict[str, nn.Linear]:
    """The named Linears, checked: present, an nn.Linear, not shared with any other module or parameter
    (compressing a tied head would silently change whatever else uses that weight)."""
    if not names:
        raise CompressionError("names: no modules to compress")
    if len(set(names)) != len(names):
        raise CompressionError(f"names: duplicates in {names}")
    out = {}
    for n in names:
        try:
            mod = model.get_submodule(n) if n else None
        except AttributeError:
            mod = None
        if not isinstance(mod, nn.Linear):
            what = "is not an nn.Linear" if mod is not None else "is not a module of the model"
            raise CompressionError(f"names: {n!r} {what}")
        out[n] = mod
    aliases: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(m), []).append(n)
    owners: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(n)
    for n, mod in out.items():
        others = [a for a in aliases[id(mod)] if a != n]
        others += [p for p in owners[id(mod.weight)] if p != f"{n}.weight"]
        if others:
            raise CompressionError(f"names: {n!r} is shared with {others}; untie it before compressing")
    return out


def _collect(model: nn.Module, names: list[str], batches: Iterable, forward: Callable | None):
    mods = _resolve(model, names)
    forward = forward or (lambda m, b: m(**b))
    grams = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=m.weight.device)
             for n, m in mods.items()}
    tokens = dict.fromkeys(names, 0)
    current: dict = {"mask": None}  # the running batch's attention mask, read by the hooks of this call only

    def hook_for(n: str):
        def hook(mod, args, kwargs, output):
            x = args[0] if args else kwargs["input"]
            mask = current["mask"]
            # Drop padding when the input is laid out [batch, seq, in] like the mask; any other layout
            # (e.g. a head applied to the last position only) counts every row it sees.
            if isinstance(mask, torch.Tensor) and mask.dim() == 2 and tuple(x.shape[:-1]) == tuple(mask.shape):
                x = x[mask.to(x.device) != 0]
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            grams[n].addmm_(x.T, x)
            tokens[n] += x.shape[0]
        return hook

    handles = [mods[n].register_forward_hook(hook_for(n), with_kwargs=True) for n in names]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                current["mask"] = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                forward(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return mods, grams, tokens


def collect_gram(model: nn.Module, names: list[str], batches: Iterable[dict],
                 forward: Callable | None = None) -> dict[str, torch.Tensor]:
    """float64 S = sum over tokens of x x^T of each named Linear's input, over all `batches`.

    `forward(model, batch)` defaults to `model(**batch)`; the model runs in eval mode under no_grad (its mode
    is restored). Tokens where the batch's 2-D "attention_mask" is 0 are skipped whenever the Linear's input
    is shaped [batch, seq, in]; every call of a module counts (a module used twice per forward counts twice).
    """
    return _collect(model, names, batches, forward)[1]


# ------------------------------------------------------------------------------------------ factorisation

ROWS = 8192  # rows of W in float64 at a time: a vocabulary-sized head is never copied whole


def _whitened_spectrum(W: torch.Tensor, S: torch.Tensor, eps: float):
    """Sw (descending) and the right singular vectors Vh of M = W Us sqrt(Ss), with Us and s = sqrt(Ss), from
    the in x in Gram M^T M = s Us^T (W^T W) Us s (float64, W^T W summed over row blocks of W). Uw = M Vh^T / Sw
    is never formed: for a head of vocabulary x hidden, M and Uw would be float64 copies of it."""
    if W.dim() != 2 or tuple(S.shape) != (W.shape[1], W.shape[1]):
        raise CompressionError(f"S must be [in, in] for W {tuple(W.shape)}, got {tuple(S.shape)}")
    S = S.to(torch.float64)
    evals, Us = torch.linalg.eigh((S + S.T) / 2)  # symmetrise: accumulated sums drift by rounding
    top = evals.max()
    if not top > 0:
        raise CompressionError("S has no positive eigenvalue: the layer saw no non-zero calibration input")
    s = evals.clamp_min(eps * top).sqrt()  # sqrt(Ss), guarded (see EPS)
    wtw = torch.zeros(W.shape[1], W.shape[1], dtype=torch.float64, device=W.device)
    for rows in W.split(ROWS):
        r64 = rows.to(torch.float64)
        wtw.addmm_(r64.T, r64)
    us_s = Us * s
    g = us_s.T @ wtw @ us_s
    ev, V = torch.linalg.eigh((g + g.T) / 2)
    return ev.flip(0).clamp_min(0).sqrt(), V.flip(1).T, Us, s


def whitened_factors(W: torch.Tensor, S: torch.Tensor, rank: int,
                     eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-`rank` factors A [out, r], B [r, in] with A @ B = Uw_r Sw_r Vw_r^T sqrt(Ss)^-1 Us^T, in W's dtype.

    sqrt(Sw_r) goes to each side, so both factors have the same scale (kinder to bf16 and to fine-tuning):
    A = Uw_r sqrt(Sw_r) = W Us s Vw_r / sqrt(Sw_r), made a block of W's rows at a time.
    Eigenvalues of S below eps * max are clamped to it (see EPS)."""
    Sw, Vh, Us, s = _whitened_spectrum(W, S, eps)
    if not 0 <= rank <= Sw.numel():
        raise CompressionError(f"rank must be in [0, {Sw.numel()}], got {rank}")
    root = Sw[:rank].sqrt()
    right = (Us * s) @ Vh[:rank].T / torch.where(root > 0, root, torch.ones_like(root))  # a zero Sw: a zero column
    dtype = W.dtype if W.is_floating_point() else torch.float32
    A = torch.empty(W.shape[0], rank, dtype=dtype, device=W.device)
    for rows, out in zip(W.split(ROWS), A.split(ROWS)):
        out.copy_(rows.to(torch.float64) @ right)
    B = ((root[:, None] * Vh[:rank]) / s) @ Us.T
    return A, B.to(dtype)


def truncation_losses(W: torch.Tensor, S: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """float64 [min(out, in) + 1]: entry r is ||W X - W'_r X||_F = sqrt(sum_{i >= r} Sw_i^2); entry 0 is
    ||W X||_F, the last is 0."""
    Sw = _whitened_spectrum(W, S, eps)[0][:min(W.shape)]
    tail = (Sw ** 2).flip(0).cumsum(0).flip(0)  # summed from the smallest up: accurate small tails
    return torch.cat([tail, tail.new_zeros(1)]).clamp_min(0).sqrt()


# ------------------------------------------------------------------------------------------ rank allocation

def _check_ratio(ratio: float) -> None:
    if not (isinstance(ratio, (int, float)) and 0 < ratio < 1):
        raise CompressionError(f"ratio must be in (0, 1) (the fraction of parameters to remove), got {ratio!r}")


def max_rank(out_features: int, in_features: int) -> int:
    """Largest r whose factors are strictly smaller than the dense matrix: r (m + n) < m n."""
    return (out_features * in_features - 1) // (out_features + in_features)


def allocate_ranks(shapes: dict[str, tuple[int, int]], losses: dict[str, torch.Tensor],
                   groups: dict[str, str], ratio: float) -> dict[str, int]:
    """Ranks per matrix so that each group keeps at most (1 - ratio) of its dense parameters.

    Rule: in each group, budget = floor((1 - ratio) * sum m n) parameters (exact rational arithmetic, so the
    realised removed fraction, per group and overall, is >= ratio); rank r of an m x n matrix costs r (m + n).
    Each matrix's loss curve is normalised by its own rank-0 loss ||W X||_F (scale-free across blocks), and
    the ranks minimise the group's sum of squared normalised losses, sum_i (L_i(r_i) / L_i(0))^2: the
    summed relative output energy lost. Squared, because each such curve is convex in r (its decrements are
    the sorted Sw_i^2), so greedily buying the step with the largest loss reduction per parameter is exact
    when the group's matrices share a shape (the DaE case: all q_proj of the new blocks) and within one step
    of optimal otherwise. (The unsquared norm is concave for flat spectra, e.g. freshly initialised blocks,
    and would push the optimum to all-or-nothing ranks.) Ranks are capped at `max_rank`, so every factored
    matrix is smaller than its dense form; steps that reduce nothing are not bought, so an all-zero matrix
    gets rank 0.
    """
    _check_ratio(ratio)
    for n in shapes:
        if n not in losses or n not in groups:
            raise CompressionError(f"{n!r} has a shape but no {'loss curve' if n not in losses else 'group'}")
        m, k = shapes[n]
        if losses[n].numel() != min(m, k) + 1:
            raise CompressionError(f"{n!r}: loss curve has {losses[n].numel()} entries, expected {min(m, k) + 1}")
    members: dict[str, list[str]] = {}
    for n in shapes:
        members.setdefault(groups[n], []).append(n)
    keep = 1 - Fraction(ratio)  # the float's exact value: the guarantee holds with no rounding slack
    ranks: dict[str, int] = {}
    for names in members.values():
        budget = math.floor(keep * sum(m * k for m, k in (shapes[n] for n in names)))
        ranks.update(_greedy(names, shapes, losses, budget))
    return ranks


def _greedy(names, shapes, losses, budget: int) -> dict[str, int]:
    gains, caps, costs = {}, {}, {}
    for n in names:
        sq = losses[n].detach().to(torch.float64).cpu() ** 2
        gains[n] = ((sq[:-1] - sq[1:]) / sq[0]).clamp_min(0).tolist() if sq[0] > 0 else [0.0] * (len(sq) - 1)
        caps[n], costs[n] = max_rank(*shapes[n]), sum(shapes[n])
    ranks = dict.fromkeys(names, 0)
    heap = [(-gains[n][0] / costs[n], i, n) for i, n in enumerate(names) if caps[n] > 0]
    heapq.heapify(heap)
    while heap:
        neg, i, n = heapq.heappop(heap)
        if neg >= 0 or costs[n] > budget:  # nothing left to gain, or unaffordable (every later step costs as much)
            continue
        ranks[n] += 1
        budget -= costs[n]
        if ranks[n] < caps[n]:
            heapq.heappush(heap, (-gains[n][ranks[n]] / costs[n], i, n))
    return ranks


# ------------------------------------------------------------------------------------------ compress / report

@dataclass
class MatrixReport:
    name: str
    group: str
    shape: tuple[int, int]  # (out, in)
    rank: int
    dense_params: int  # weights only: a bias is kept as is, so it is neither dense nor factored cost
    factored_params: int
    loss: float  # theoretical ||W X - W' X||_F at `rank` on the calibration set
    relative_loss: float  # loss / ||W X||_F
    tokens: int  # calibration tokens the layer saw


@dataclass
class CompressionReport:
    ratio: float
    matrices: list[MatrixReport] = field(default_factory=list)

    @property
    def dense_params(self) -> int:
        return sum(m.dense_params for m in self.matrices)

    @property
    def factored_params(self) -> int:
        return sum(m.factored_params for m in self.matrices)

    @property
    def removed_params(self) -> int:
        return self.dense_params - self.factored_params

    @property
    def removed_fraction(self) -> float:
        return self.removed_params / self.dense_params

    def groups(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for m in self.matrices:
            g = out.setdefault(m.group, {"matrices": 0, "dense_params": 0, "factored_params": 0})
            g["matrices"] += 1
            g["dense_params"] += m.dense_params
            g["factored_params"] += m.factored_params
        for g in out.values():
            g["removed_fraction"] = 1 - g["factored_params"] / g["dense_params"]
        return out

    def to_dict(self) -> dict:
        return {"ratio": self.ratio, "dense_params": self.dense_params, "factored_params": self.factored_params,
                "removed_params": self.removed_params, "removed_fraction": self.removed_fraction,
                "groups": self.groups(),
                "matrices": [{**asdict(m), "shape": list(m.shape)} for m in self.matrices]}


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


@dataclass
class Calibration:
    """What compression takes from the calibration data, whatever the ratio: each named Linear's input Gram, the
    tokens it saw and its truncation losses. `calibrate` once, then `compress` copies of the same model at
    several ratios (a sweep) without running the calibration batches and the loss SVDs again."""

    grams: dict[str, torch.Tensor]
    tokens: dict[str, int]
    losses: dict[str, torch.Tensor]


def calibrate(model: nn.Module, names: list[str], batches: Iterable[dict], forward: Callable | None = None,
              eps: float = EPS) -> Calibration:
    """The Grams of `batches` (see `collect_gram`) and each Linear's `truncation_losses` for `compress`."""
    mods, grams, tokens = _collect(model, names, batches, forward)
    for n in names:
        if tokens[n] == 0 or not grams[n].abs().max() > 0:
            raise CompressionError(f"{n!r} saw no non-zero calibration input: is it on the forward path?")
    return Calibration(grams, tokens, {n: truncation_losses(mods[n].weight.detach(), grams[n], eps) for n in names})


def compress(model: nn.Module, names: list[str], groups: dict[str, str], batches: Iterable[dict] | Calibration,
             ratio: float, forward: Callable | None = None, eps: float = EPS) -> CompressionReport:
    """Replace each named nn.Linear of `model` in place by a LowRankLinear (ranks by `allocate_ranks` over
    `groups`, factors by `whitened_factors` from the Grams of `batches`, see `collect_gram`). The factors
    keep the Linear's dtype, device and requires_grad. Removes >= `ratio` of the named weights' parameters.
    `batches` may be a `Calibration` of this model's (unchanged) weights instead, shared by several calls."""
    _check_ratio(ratio)
    missing = [n for n in names if n not in groups]
    if missing:
        raise CompressionError(f"groups: no group for {missing}")
    cal = batches if isinstance(batches, Calibration) else calibrate(model, names, batches, forward, eps)
    if missing := [n for n in names if n not in cal.grams]:
        raise CompressionError(f"the calibration has no Gram for {missing}")
    mods = _resolve(model, names)
    shapes = {n: tuple(mods[n].weight.shape) for n in names}
    ranks = allocate_ranks(shapes, cal.losses, {n: groups[n] for n in names}, ratio)
    report = CompressionReport(ratio=ratio)
    with torch.no_grad():
        for n in names:  # popped: each dense Linear is freed once its factors replace it
            lin, r, (m, k), losses = mods.pop(n), ranks[n], shapes[n], cal.losses[n]
            A, B = whitened_factors(lin.weight.detach(), cal.grams[n], r, eps)
            new = LowRankLinear.from_factors(A, B, None if lin.bias is None else lin.bias.detach(), take=True)
            new.requires_grad_(lin.weight.requires_grad)
            _set_submodule(model, n, new)
            total = float(losses[0])
            report.matrices.append(MatrixReport(
                name=n, group=groups[n], shape=(m, k), rank=r, dense_params=m * k, factored_params=r * (m + k),
                loss=float(losses[r]), relative_loss=float(losses[r]) / total if total > 0 else 0.0,
                tokens=cal.tokens[n]))
    return report


def materialize(model: nn.Module) -> nn.Module:
    """Replace every LowRankLinear by a dense nn.Linear with weight A @ B (product in float64, then the
    factors' dtype); returns the model (or the new Linear if `model` itself is a LowRankLinear)."""
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    for name, lr in targets:
        up, down = lr.up, lr.down
        dense = nn.Linear(lr.in_features, lr.out_features, bias=up.bias is not None, device="meta",
                          dtype=up.weight.dtype)
        W = torch.empty(lr.out_features, lr.in_features, dtype=up.weight.dtype, device=up.weight.device)
        with torch.no_grad():  # by row blocks: a vocabulary-sized head is never whole in float64
            down64 = down.weight.to(torch.float64)
            for rows, a in zip(W.split(ROWS), up.weight.split(ROWS)):
                rows.copy_(a.to(torch.float64) @ down64)
        dense.weight = nn.Parameter(W, requires_grad=up.weight.requires_grad)
        if up.bias is not None:
            dense.bias = nn.Parameter(up.bias.detach().clone(), requires_grad=up.bias.requires_grad)
        if not name:
            return dense
        _set_submodule(model, name, dense)
    return model
