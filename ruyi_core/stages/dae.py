"""DaE and GRPO as pipeline stages: expand the chosen tier (then stages.train trains it on megatron), GRPO on
it, then compress what was added."""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from pydantic import ConfigDict

from ruyi_core.errors import RuyiError
from ruyi_core.spec import RunSpec
from ruyi_core.stages.contract import Artifact, Stage, StageRun, run_stage
from ruyi_core.stages.data import corpus_records
from ruyi_core.store import ArtifactStore


class Expanded(Artifact):
    tier: str
    exit_point: int
    blocks: int
    init: str
    added_parameters: int
    heldout_loss_unexpanded: float


class Grpo(Artifact):
    model_config = ConfigDict(extra="allow")  # plus run_grpo's measurements (rewards before / after, ...)
    tier: str


class Compressed(Artifact):
    tier: str
    exit_point: int
    ratio: float
    removed_fraction: float
    heldout_loss_dense: float
    heldout_loss_compressed: float
    relative_drop: float
    heldout_loss_unexpanded: float
    factored_parameters: int
    dense_parameters: int


EXPAND = Stage("dae_expand", Expanded, ("dae.tier", "dae.blocks", "dae.init", "dae.std", "family.seed",
                                        "data.heldout", "data.seed"))
GRPO = Stage("grpo", Grpo, ("rl", "data.rl_heldout", "data.heldout", "data.seed"))
SVD = Stage("svd_compress", Compressed, ("dae.tier", "dae.svd_ratio", "dae.sweep", "dae.calib_samples",
                                         "data.seq_length", "data.heldout", "data.seed"))


def _load(run: StageRun, section: str, tier: str, stored: bool = False):
    """The family, in the spec's runtime, or (`stored`: for work that only moves tensors) as it was saved."""
    from ruyi_core.family.io import load_family
    from ruyi_core.runtime import for_spec

    fam, tok = load_family(run.fetch("family"), for_spec(run.spec), stored_dtype=stored)
    if tier not in fam.config.tiers:
        raise RuyiError(f"{section}.tier: unknown tier {tier!r}; this family has {', '.join(fam.config.tiers)}")
    return fam, tok


def dae_expand(spec: RunSpec, store: ArtifactStore, family: str) -> Expanded:
    """Stable Block Expansion of `dae.tier` (zero-residual random blocks)."""

    def build(run: StageRun) -> dict:
        from ruyi_core.dae.expand import expand_tier
        from ruyi_core.eval.heldout import heldout_texts
        from ruyi_core.family.io import save_family
        from ruyi_core.family.loss import heldout_loss

        d = spec.dae
        fam, tok = _load(run, "dae", d.tier)
        p = fam.config.tiers[d.tier]
        before = heldout_loss(fam, tok, heldout_texts(spec, run.work, run.store), exit_point=p)
        out = expand_tier(fam, d.tier, d.blocks, d.init, d.std, seed=spec.family.seed, share_weights=True)
        save_family(out, tok, run.out)
        return {"tier": d.tier, "exit_point": p, "blocks": d.blocks, "init": d.init,
                "added_parameters": out.tier_parameter_count(p) - fam.tier_parameter_count(p),
                "heldout_loss_unexpanded": before}

    return run_stage(EXPAND, spec, store, build, inputs={"family": family})


def grpo(spec: RunSpec, store: ArtifactStore, family: str, rl_raw: str) -> Grpo:
    """GRPO (TRL) on the exported tier with only its own parameters trainable, merged back into the family. It runs
    as training does, on the training launcher: torchrun here, or a TrainJob on the cluster; one worker per GPU
    the `grpo` step is given (one on the CPU)."""

    def build(run: StageRun) -> dict:
        from safetensors.torch import load_file

        from ruyi_core.dae.expand import merge_tier, tier_own_prefixes
        from ruyi_core.eval.heldout import heldout_prompts, heldout_texts
        from ruyi_core.family.convert import export_tier
        from ruyi_core.family.io import save_family
        from ruyi_core.launch import run_child, torchrun
        from ruyi_core.rl.worker import INPUTS

        tier = spec.rl.tier
        fam, tok = _load(run, "rl", tier, stored=True)
        given = run.work / "grpo-inputs"  # laid out as the worker's --inputs artifact
        export_tier(fam, tier, given / INPUTS["tier"], tok)
        own = tier_own_prefixes(fam.config, tier)
        del fam  # not held while the workers train: read again for the merge
        with (given / INPUTS["prompts"]).open("w") as f:
            for rec in corpus_records(run, "rl", "rl"):
                f.write(json.dumps(rec) + "\n")
        (given / INPUTS["heldout"]).write_text(json.dumps(heldout_prompts(spec, run.work, run.store)))
        (given / INPUTS["heldout_text"]).write_text(json.dumps(heldout_texts(spec, run.work, run.store)))
        policy = run.work / "policy"
        args = ["--spec", spec.model_dump_json(), "--trainable", json.dumps(own)]
        if spec.train.launcher == "local":
            workers = max(1, spec.pipeline.resources_for("grpo").gpus)
            parts = [a for n, rel in INPUTS.items() for a in (f"--{n.replace('_', '-')}", str(given / rel))]
            run_child(torchrun(workers, "ruyi_core.rl.worker", [*args, "--out", str(policy), *parts]), run.log)
        else:  # a TrainJob: the inputs and the policy travel through the store, deleted once the output is stored
            from ruyi_core.megatron.trainjob import grpo_workers, run_trainjob

            sent, got = store.uri(f"{run.key}/inputs"), store.uri(f"{run.key}/policy")
            store.put_artifact(sent, given, stage="grpo_inputs", spec_hash="",
                               inputs=[run.inputs["family"], run.inputs["rl"]])
            run.scratch += [sent, got]
            run_trainjob(spec, "grpo", f"{spec.family.name}-grpo-{run.key.rsplit('/', 1)[-1][:8]}",
                         [*args, "--inputs", sent, "--publish", got, "--out", "/scratch/grpo"],
                         workers=grpo_workers(spec), log=run.log)
            store.get_artifact(got, policy)
        res = json.loads((policy / "result.json").read_text())
        state = {}
        for f in sorted(policy.glob("*.safetensors")):
            state.update(load_file(f))
        fam, tok = _load(run, "rl", tier, stored=True)
        merge_tier(fam, tier, state, own)
        save_family(fam, tok, run.out)
        for f in ("rewards.jsonl", "rewards.png"):
            if (policy / f).is_file():
                (run.out / f).write_bytes((policy / f).read_bytes())
        return {"tier": tier, **{k: v for k, v in res.items() if isinstance(v, (int, float, str)) and k != "path"}}

    return run_stage(GRPO, spec, store, build, inputs={"family": family, "rl": rl_raw})


def svd_compress(spec: RunSpec, store: ArtifactStore, family: str, packed_pretrain: str, expanded: str) -> Compressed:
    """SVD-LLM-v2 compression of the tier's added blocks and head: a factored tier (two factors per matrix), a
    materialised plain-Qwen3 export, and a sweep of ratios (held-out loss vs parameters)."""

    def build(run: StageRun) -> dict:
        import torch
        from transformers import AutoTokenizer, Qwen3ForCausalLM

        from ruyi_core.eval.heldout import heldout_texts
        from ruyi_core.family.convert import export_tier
        from ruyi_core.runtime import for_spec

        d = spec.dae
        fam, tok = _load(run, "dae", d.tier, stored=True)
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
        _save_compressed(model.to(getattr(torch, cfg.weights_dtype)), rep, rows, base_loss, tok, run.out)
        return {"tier": d.tier, "exit_point": p, "ratio": d.svd_ratio, "removed_fraction": row["removed_fraction"],
                "heldout_loss_dense": base_loss, "heldout_loss_compressed": row["heldout_loss"],
                "relative_drop": row["relative_drop"],
                "heldout_loss_unexpanded": run.manifest("expanded").metadata["heldout_loss_unexpanded"],
                "factored_parameters": row["tier_parameters"], "dense_parameters": n_dense}

    inputs = {"family": family, "packed": packed_pretrain, "expanded": expanded}
    return run_stage(SVD, spec, store, build, inputs=inputs)


def _calibration(run: StageRun, seq: int, n: int, vocab: int) -> list[dict]:
    """`n` windows of `seq` tokens, in batches whose fp32 logits stay within 256 MiB (8 windows at most)."""
    from ruyi_core.family.loss import rows_within
    from ruyi_core.megatron.data import TokenStream

    stream = TokenStream(run.fetch("packed"), seq, seed=12345)
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
        row = {"ratio": ratio, "removed_fraction": rep.removed_fraction, "heldout_loss": loss,
               "relative_drop": (loss - base_loss) / base_loss, "tier_parameters": model.num_parameters()}
        rows.append(row)
        log(f"[svd_compress] ratio {ratio:g} ({i}/{len(ratios)}): removed {rep.removed_fraction:.1%} of the added "
            f"parameters, held-out loss {loss:.4f} ({row['relative_drop']:+.2%}), "
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


def _save_compressed(model, rep, rows: list[dict], base_loss: float, tok, out: Path) -> None:
    from ruyi_core.dae.svd import materialize

    (out / "factored").mkdir(parents=True)
    model.save_pretrained(out / "factored")
    tok.save_pretrained(out / "factored")
    (out / "factored" / "ruyi_lowrank.json").write_text(json.dumps(rep.to_dict(), indent=2))
    materialize(model).save_pretrained(out / "materialized")  # dense again, in place: after the factored save
    tok.save_pretrained(out / "materialized")
    (out / "sweep.json").write_text(json.dumps(rows, indent=2))
    _sweep_png(rows, base_loss, out / "sweep.png")


def _sweep_png(rows: list[dict], base_loss: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot([r["tier_parameters"] / 1e6 for r in rows], [r["heldout_loss"] for r in rows], "o-", label="compressed")
    for r in rows:
        ax.annotate(f"{r['ratio']:.0%}", (r["tier_parameters"] / 1e6, r["heldout_loss"]), fontsize=7)
    ax.axhline(base_loss, color="grey", ls="--", label="dense (DaE-trained)")
    ax.set_xlabel("tier parameters (M)")
    ax.set_ylabel("held-out loss")
    ax.set_title("SVD compression sweep")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
