"""DaE stage 2, SVD compression: the whitened factors match the DESIGN formula, the theoretical loss is the
realised one, rank allocation keeps its budget, and compressing a real transformers model is exact about
parameters and exports as a vanilla checkpoint."""
import copy
import itertools
import json

import numpy as np
import pytest
import torch
from torch import nn
from transformers import Qwen3Config, Qwen3ForCausalLM

from ruyi_core.dae.svd import (CompressionReport, LowRankLinear, allocate_ranks, calibrate, collect_gram, compress,
                               materialize, max_rank, truncation_losses, whitened_factors)

pytestmark = pytest.mark.slow  # real training, generation or pipeline runs: minutes in all

PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def anisotropic(n_in: int, tokens: int, seed: int, spread: float = 3.0) -> np.ndarray:
    """X [in, tokens], correlated features with eigenvalue scales spanning 10^spread."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n_in, n_in)))
    scales = np.logspace(0, -spread, n_in)
    return (Q * scales) @ rng.standard_normal((n_in, tokens))


def reference(W: np.ndarray, X: np.ndarray, r: int) -> np.ndarray:
    """DESIGN §3 in float64 numpy: X X^T = Us Ss Us^T; SVD of W Us sqrt(Ss); W' = Uw_r Sw_r Vw_r^T Ss^-1/2 Us^T."""
    ss, Us = np.linalg.eigh(X @ X.T)
    Uw, Sw, Vt = np.linalg.svd(W @ Us @ np.diag(np.sqrt(ss)), full_matrices=False)
    return Uw[:, :r] @ np.diag(Sw[:r]) @ Vt[:r] @ np.diag(1 / np.sqrt(ss)) @ Us.T


def gram(X: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(X @ X.T)


def test_whitened_factors_match_reference_formula():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((48, 32))
    X = anisotropic(32, 400, seed=1)
    for r in (1, 7, 16, 32):
        A, B = whitened_factors(torch.tensor(W, dtype=torch.float32), gram(X), r)
        assert A.dtype == B.dtype == torch.float32 and A.shape == (48, r) and B.shape == (r, 32)
        ref = reference(W, X, r)
        got = (A.double() @ B.double()).numpy()
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-5, r
    # float64 in, float64 out, and then far tighter
    A, B = whitened_factors(torch.from_numpy(W), gram(X), 9)
    assert np.linalg.norm((A @ B).numpy() - reference(W, X, 9)) / np.linalg.norm(W) < 1e-9


def test_theoretical_loss_is_the_realised_error():
    rng = np.random.default_rng(2)
    W = torch.tensor(rng.standard_normal((40, 24)), dtype=torch.float32)
    X = anisotropic(24, 300, seed=3)
    S = gram(X)
    losses = truncation_losses(W, S)
    assert losses.dtype == torch.float64 and losses.shape == (25,)
    assert torch.all(losses[:-1] >= losses[1:]) and losses[-1] == 0
    Xt, Wd = torch.from_numpy(X), W.double()
    assert torch.isclose(losses[0], torch.linalg.norm(Wd @ Xt), rtol=1e-10)
    for r in (0, 1, 5, 12, 20):
        A, B = whitened_factors(W, S, r)
        realised = torch.linalg.norm(Wd @ Xt - A.double() @ (B.double() @ Xt))
        assert abs(realised - losses[r]) / losses[r] < 1e-4, r


def test_whitening_beats_plain_svd_on_anisotropic_activations():
    rng = np.random.default_rng(4)
    W = torch.tensor(rng.standard_normal((64, 64)))
    X = torch.from_numpy(anisotropic(64, 500, seed=5, spread=2.0))
    U, s, Vh = torch.linalg.svd(W)
    for r in (8, 16, 32):
        plain = torch.linalg.norm((W - U[:, :r] * s[:r] @ Vh[:r]) @ X)
        A, B = whitened_factors(W, X @ X.T, r)
        white = torch.linalg.norm((W - A @ B) @ X)
        assert white < 0.7 * plain, (r, white, plain)


def with_spectrum(m: int, n: int, sv: np.ndarray, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((m, m)))
    V, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return torch.from_numpy(U[:, : len(sv)] @ np.diag(sv) @ V[:, : len(sv)].T)


def test_allocate_ranks_budget_optimality_and_spectrum():
    k = 24
    fast = with_spectrum(24, 24, 0.6 ** np.arange(k), 0)  # fast decay: a few ranks capture it
    slow = with_spectrum(24, 24, 1 / (1 + 0.05 * np.arange(k)), 1)  # slow decay: needs many ranks
    head = with_spectrum(40, 16, np.linspace(2, 1, 16), 2)
    S24, S16 = torch.eye(24, dtype=torch.float64), torch.eye(16, dtype=torch.float64)
    shapes = {"a.q": (24, 24), "b.q": (24, 24), "head": (40, 16)}
    losses = {"a.q": truncation_losses(fast, S24), "b.q": truncation_losses(slow, S24),
              "head": truncation_losses(head, S16)}
    groups = {"a.q": "q", "b.q": "q", "head": "head"}
    for ratio in (0.05, 0.2, 0.4, 0.6, 0.9):
        ranks = allocate_ranks(shapes, losses, groups, ratio)
        cost = {n: ranks[n] * sum(shapes[n]) for n in shapes}
        dense = {n: shapes[n][0] * shapes[n][1] for n in shapes}
        for g, members in (("q", ["a.q", "b.q"]), ("head", ["head"])):
            assert sum(cost[n] for n in members) <= (1 - ratio) * sum(dense[n] for n in members), (ratio, g)
        assert 1 - sum(cost.values()) / sum(dense.values()) >= ratio
        assert all(cost[n] < dense[n] and ranks[n] <= max_rank(*shapes[n]) for n in shapes), ranks
        if 0.2 <= ratio <= 0.6:
            assert ranks["b.q"] > ranks["a.q"], (ratio, ranks)

        # brute force: no pair of q ranks within budget has a smaller summed squared normalised loss
        def objective(ra, rb):
            return float((losses["a.q"][ra] / losses["a.q"][0]) ** 2 + (losses["b.q"][rb] / losses["b.q"][0]) ** 2)
        budget = (1 - ratio) * 2 * 24 * 24
        best = min(objective(ra, rb) for ra, rb in itertools.product(range(max_rank(24, 24) + 1), repeat=2)
                   if (ra + rb) * 48 <= budget)
        assert objective(ranks["a.q"], ranks["b.q"]) <= best + 1e-12, ratio

    # a tiny ratio: the cap r (m + n) < m n binds and the matrix still shrinks
    assert allocate_ranks({"x": (24, 24)}, {"x": losses["b.q"]}, {"x": "x"}, 0.01) == {"x": max_rank(24, 24)}
    # an all-zero matrix buys nothing
    zero = truncation_losses(torch.zeros(24, 24, dtype=torch.float64), S24)
    assert allocate_ranks({"z": (24, 24)}, {"z": zero}, {"z": "z"}, 0.3) == {"z": 0}


def test_collect_gram_skips_padding():
    torch.manual_seed(0)
    model = nn.ModuleDict({"emb": nn.Embedding(50, 6), "proj": nn.Linear(6, 5)})
    ids = torch.randint(0, 50, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, :3] = 0
    mask[2, :6] = 0

    def forward(m, batch):
        return m["proj"](m["emb"](batch["input_ids"]))

    S = collect_gram(model, ["proj"], [{"input_ids": ids, "attention_mask": mask}], forward=forward)["proj"]
    x = model["emb"](ids)[mask.bool()].detach().double()
    torch.testing.assert_close(S, x.T @ x)


def tiny_qwen3() -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # weights well away from the near-zero init so errors cannot hide
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def calib(vocab: int, n: int = 4, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (3, 16), generator=g)
        mask = torch.ones_like(ids)
        mask[0, :5] = 0  # left padding
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def test_compress_qwen3_counts_materialize_and_export(tmp_path):
    model = tiny_qwen3()
    names = [f"model.layers.{i}.{p}" for i in (0, 1) for p in PROJ] + ["lm_head"]  # 2 blocks: groups of 2
    groups = {n: n.rsplit(".", 1)[-1] for n in names}
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in names}
    dense_total = sum(p.numel() for p in model.parameters())
    ids = calib(96, n=1, seed=9)[0]
    with torch.no_grad():
        before = model(**ids).logits

    report = compress(model, names, groups, calib(96), ratio=0.4)
    assert isinstance(report, CompressionReport)
    assert sum(p.numel() for p in model.parameters()) == dense_total - report.removed_params
    assert report.removed_fraction >= 0.4 and report.removed_params > 0
    assert report.dense_params == sum(m * k for m, k in shapes.values())
    for row in report.matrices:
        mod = model.get_submodule(row.name)
        assert isinstance(mod, LowRankLinear) and mod.rank == row.rank and tuple(row.shape) == shapes[row.name]
        bias = 0 if mod.up.bias is None else mod.up.bias.numel()
        assert sum(p.numel() for p in mod.parameters()) == row.rank * (mod.in_features + mod.out_features) + bias
        assert row.factored_params < row.dense_params and row.tokens == 4 * (3 * 16 - 5)
    json.dumps(report.to_dict())
    assert set(report.groups()) == set(groups.values())

    with torch.no_grad():
        factored = model(**ids).logits
    # random weights have flat spectra, so only "changed, finite, every layer kept some signal" is meaningful
    assert torch.isfinite(factored).all() and (factored - before).abs().max() > 1e-3
    assert all(0 < row.relative_loss < 1 and row.rank > 0 for row in report.matrices)

    dense = materialize(model)
    assert not any(isinstance(m, LowRankLinear) for m in dense.modules())
    for n in names:
        assert tuple(dense.get_submodule(n).weight.shape) == shapes[n]
    with torch.no_grad():
        again = dense(**ids).logits
    assert (again - factored).abs().max() <= 1e-5

    dense.save_pretrained(tmp_path)
    loaded = Qwen3ForCausalLM.from_pretrained(tmp_path).eval()
    assert {k: tuple(v.shape) for k, v in loaded.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in dense.state_dict().items()}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**ids).logits, again, rtol=0, atol=1e-6)


def test_one_calibration_serves_every_ratio():
    """A sweep calibrates once: compressing copies of the model from that Calibration gives exactly what
    compressing each from the calibration batches gives."""
    model = tiny_qwen3()
    names = [f"model.layers.{i}.{p}" for i in (0, 1) for p in PROJ] + ["lm_head"]
    groups = {n: n.rsplit(".", 1)[-1] for n in names}
    cal = calibrate(model, names, calib(96))
    for ratio in (0.3, 0.6):
        a, b = copy.deepcopy(model), copy.deepcopy(model)
        assert compress(a, names, groups, cal, ratio) == compress(b, names, groups, calib(96), ratio)
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ValueError, match="no Gram for"):
        compress(copy.deepcopy(model), ["lm_head"], {"lm_head": "h"}, calibrate(model, names[:1], calib(96)), 0.4)


def test_low_rank_linear_from_factors():
    A, B, b = torch.randn(7, 3), torch.randn(3, 5), torch.randn(7)
    mod = LowRankLinear.from_factors(A, B, b)
    x = torch.randn(2, 5)
    torch.testing.assert_close(mod(x), x @ (A @ B).T + b)
    assert mod.rank == 3 and mod.down.bias is None and sum(p.numel() for p in mod.parameters()) == 3 * 12 + 7


@pytest.mark.parametrize("ratio", [0, 1, 1.5, -0.1])
def test_bad_ratio(ratio):
    model = tiny_qwen3()
    with pytest.raises(ValueError, match="ratio"):
        compress(model, ["lm_head"], {"lm_head": "head"}, calib(96, n=1), ratio=ratio)
    with pytest.raises(ValueError, match="ratio"):
        allocate_ranks({"x": (4, 4)}, {"x": torch.ones(5)}, {"x": "x"}, ratio)


def test_bad_names():
    model = tiny_qwen3()
    with pytest.raises(ValueError, match="model.layers.7.mlp.up_proj"):
        compress(model, ["model.layers.7.mlp.up_proj"], {"model.layers.7.mlp.up_proj": "up"}, calib(96), 0.4)
    with pytest.raises(ValueError, match="model.layers.0.mlp'"):
        collect_gram(model, ["model.layers.0.mlp"], calib(96))
    with pytest.raises(ValueError, match="lm_head"):
        compress(model, ["lm_head"], {}, calib(96), 0.4)  # no group for it
    tied = nn.ModuleDict({"emb": nn.Embedding(10, 4), "head": nn.Linear(4, 10, bias=False)})
    tied["head"].weight = tied["emb"].weight
    with pytest.raises(ValueError, match="shared"):
        collect_gram(tied, ["head"], [])
