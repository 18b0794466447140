"""DaE as pipeline stages: expand the chosen tier (then stages.train trains it on megatron, and stages.grpo may
train it further), then compress what was added."""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from pydantic import BaseModel

from ruyi_core.errors import RuyiError
from ruyi_core.spec import RunSpec
from ruyi_core.stages.contract import Artifact, Stage, StageRun, run_stage
from ruyi_core.stages.family import load_for_tier
from ruyi_core.store import ArtifactStore


class Expanded(Artifact):
    tier: str
    exit_point: int
    blocks: int
    init: str
    added_parameters: int
    heldout_loss_unexpanded: float


class SweepPoint(BaseModel):
    ratio: float
    removed_fraction: float  # of the added parameters
    heldout_loss: float
    relative_drop: float  # against the dense tier's held-out loss
    tier_parameters: int


class SvdResult(BaseModel):
    """What svd_compress measured, in its artifact as svd_result.json: the chosen ratio, the rank each compressed
    matrix keeps there, the held-out losses from before expansion to after compression, and the sweep."""

    tier: str
    exit_point: int
    ratio: float
    removed_fraction: float
    heldout_loss_unexpanded: float
    heldout_loss_dense: float
    heldout_loss_compressed: float
    relative_drop: float
    factored_parameters: int
    dense_parameters: int
    ranks: dict[str, int]
    sweep: list[SweepPoint]


SVD_RESULT = "svd_result.json"


class Compressed(Artifact):
    """The compressed tier (factored/, materialized/) and its SvdResult."""

    tier: str
    exit_point: int
    ratio: float

    def read_result(self, store: ArtifactStore) -> SvdResult:
        return SvdResult.model_validate_json(self.read_text(store, SVD_RESULT))


EXPAND = Stage("dae_expand", Expanded, ("dae.tier", "dae.expand", "dae.blocks", "dae.init", "dae.std",
                                        "family.seed", "data.heldout", "data.seed"))
# version 2: the measurements are in svd_result.json; the manifest names the tier
SVD = Stage("svd_compress", Compressed, ("dae.tier", "dae.svd_ratio", "dae.sweep", "dae.calib_samples",
                                         "data.seq_length", "data.heldout", "data.seed"), version=2)


def dae_expand(spec: RunSpec, store: ArtifactStore, family: str) -> Expanded:
    """Stable Block Expansion of `dae.tier` (zero-residual random blocks); with `dae.expand` false (the
    control), the family as it is, so that DaE's steps train the tier's own block, norm and head."""

    def build(run: StageRun) -> dict:
        from ruyi_core.dae.expand import expand_tier
        from ruyi_core.eval.heldout import heldout_texts
        from ruyi_core.family.io import save_family
        from ruyi_core.family.loss import heldout_loss

        d = spec.dae
        fam, tok = load_for_tier(run, "dae", d.tier)
        p = fam.config.tiers[d.tier]
        before = heldout_loss(fam, tok, heldout_texts(spec, run.work, run.store), exit_point=p)
        out = expand_tier(fam, d.tier, d.blocks, d.init, d.std, seed=spec.family.seed,
                          share_weights=True) if d.expand else fam
        save_family(out, tok, run.out)
        return {"tier": d.tier, "exit_point": p, "blocks": d.blocks if d.expand else 0, "init": d.init,
                "added_parameters": out.tier_parameter_count(p) - fam.tier_parameter_count(p),
                "heldout_loss_unexpanded": before}

    return run_stage(EXPAND, spec, store, build, inputs={"family": family})


def svd_compress(spec: RunSpec, store: ArtifactStore, family: str, packed_pretrain: str, expanded: str) -> Compressed:
    """SVD-LLM-v2 compression of the tier's added blocks and head: a factored tier (two factors per matrix), a
    materialised plain-Qwen3 export, and what was measured (SvdResult: the ranks kept, the held-out losses and a
    sweep of ratios, held-out loss vs parameters)."""

    def build(run: StageRun) -> dict:
        import torch
        from transformers import AutoTokenizer, Qwen3ForCausalLM

        from ruyi_core.eval.heldout import heldout_texts
        from ruyi_core.family.convert import export_tier
        from ruyi_core.runtime import for_spec

        d = spec.dae
        fam, tok = load_for_tier(run, "dae", d.tier, stored=True)
        cfg, p = fam.config, fam.config.tiers[d.tier]
        if not cfg.expansion(p):
            raise RuyiError(f"dae.tier {d.tier!r} is not expanded: run dae_expand first")
        export_tier(fam, d.tier, run.work / "dense", tok)
        del fam  # what is compressed is the tier: the family is not held beside it
        dense = for_spec(spec).load(Qwen3ForCausalLM, run.work / "dense")
        tok = AutoTokenizer.from_pretrained(run.work / "dense")
        calib = _calibration(run, spec.data.seq_length, d.calib_samples, cfg.vocab_size)
        n_dense = dense.num_parameters()  # the sweep's last ratio compresses `dense` itself
        chosen, rows, base_loss = _sweep(dense, tok, cfg, d, calib, heldout_texts(spec, run.work, run.store), run.log)
        model, rep, row = chosen
        result = SvdResult(
            tier=d.tier, exit_point=p, ratio=d.svd_ratio, removed_fraction=row.removed_fraction,
            heldout_loss_unexpanded=run.manifest("expanded").metadata["heldout_loss_unexpanded"],
            heldout_loss_dense=base_loss, heldout_loss_compressed=row.heldout_loss, relative_drop=row.relative_drop,
            factored_parameters=row.tier_parameters, dense_parameters=n_dense,
            ranks={m.name: m.rank for m in rep.matrices}, sweep=rows)
        _save_compressed(model.to(getattr(torch, cfg.weights_dtype)), rep, result, tok, run.out)
        return {"tier": d.tier, "exit_point": p, "ratio": d.svd_ratio}

    inputs = {"family": family, "packed": packed_pretrain, "expanded": expanded}
    return run_stage(SVD, spec, store, build, inputs=inputs)


def _calibration(run: StageRun, seq: int, n: int, vocab: int) -> list[dict]:
    """`n` windows of `seq` tokens, in batches whose fp32 logits stay within 256 MiB (8 windows at most)."""
    from ruyi_core.data.packed import fetch_packed
    from ruyi_core.family.loss import rows_within
    from ruyi_core.megatron.data import TokenStream

    stream = TokenStream(fetch_packed(run.store, run.inputs["packed"], run.work / "packed"), seq, seed=12345)
    per = rows_within(8, vocab, seq)
    return [{"input_ids": stream.batch(i, min(per, n - i))["tokens"]} for i in range(0, n, per)]


def _sweep(dense, tok, cfg, d, calib, texts, log=print):
    """Compress at every sweep ratio; returns ((model, report, row) at dae.svd_ratio, rows, dense loss).
    `log` gets a line per ratio ("[svd_compress] ratio 0.4 (2/3): ...")."""
    from ruyi_core.dae.svd import calibrate, compress
    from ruyi_core.family.loss import heldout_loss
    from ruyi_core.family.names import dae_linear_names

    # Ranks are shared out within groups of same-type matrices across the added blocks (all q_proj, ...).
    names = dae_linear_names(cfg, cfg.tiers[d.tier])
    groups = {n: "lm_head" if n == "lm_head" else n.split(".", 3)[-1] for n in names}
    base_loss = heldout_loss(dense, tok, texts)
    started = time.perf_counter()
    cal = calibrate(dense, names, calib)  # once: the Grams and truncation losses serve every ratio
    log(f"[svd_compress] calibrated {len(names)} matrices on {len(calib)} batches in "
        f"{time.perf_counter() - started:.1f} s")
    rows, chosen = [], None
    ratios = sorted({*d.sweep, d.svd_ratio})
    for i, ratio in enumerate(ratios, 1):
        started = time.perf_counter()
        model = dense if i == len(ratios) else _copy_sharing(dense, names)  # the last ratio needs no copy
        rep = compress(model, names, groups, cal, ratio)
        loss = heldout_loss(model, tok, texts)
        row = SweepPoint(ratio=ratio, removed_fraction=rep.removed_fraction, heldout_loss=loss,
                         relative_drop=(loss - base_loss) / base_loss, tier_parameters=model.num_parameters())
        rows.append(row)
        log(f"[svd_compress] ratio {ratio:g} ({i}/{len(ratios)}): removed {rep.removed_fraction:.1%} of the added "
            f"parameters, held-out loss {loss:.4f} ({row.relative_drop:+.2%}), "
            f"{time.perf_counter() - started:.1f} s")
        if ratio == d.svd_ratio:
            chosen = (model, rep, row)
    return chosen, rows, base_loss


def _copy_sharing(model, names: list[str]):
    """A copy of `model` whose Linears in `names` (what compression replaces) are its own and whose every other
    tensor is `model`'s: a sweep ratio costs the compressed matrices, not a copy of the tier."""
    own = tuple(f"{n}." for n in names)
    memo = {id(t): t for n, t in [*model.named_parameters(), *model.named_buffers()] if not n.startswith(own)}
    return copy.deepcopy(model, memo)


def _save_compressed(model, rep, result: SvdResult, tok, out: Path) -> None:
    from ruyi_core.dae.svd import materialize

    (out / "factored").mkdir(parents=True)
    model.save_pretrained(out / "factored")
    tok.save_pretrained(out / "factored")
    (out / "factored" / "ruyi_lowrank.json").write_text(json.dumps(rep.to_dict(), indent=2))
    materialize(model).save_pretrained(out / "materialized")  # dense again, in place: after the factored save
    tok.save_pretrained(out / "materialized")
    (out / SVD_RESULT).write_text(result.model_dump_json(indent=2))
    _sweep_png(result, out / "sweep.png")


def _sweep_png(result: SvdResult, path: Path) -> None:
    from ruyi_core.plots import axes, png

    fig, ax = axes(5, 3.4)
    rows = result.sweep
    ax.plot([r.tier_parameters / 1e6 for r in rows], [r.heldout_loss for r in rows], "o-", label="compressed")
    for r in rows:
        ax.annotate(f"{r.ratio:.0%}", (r.tier_parameters / 1e6, r.heldout_loss), fontsize=7)
    ax.axhline(result.heldout_loss_dense, color="grey", ls="--", label="dense (DaE-trained)")
    ax.set_xlabel("tier parameters (M)")
    ax.set_ylabel("held-out loss")
    ax.set_title("SVD compression sweep")
    ax.legend(fontsize=7)
    png(fig, path, 110)
