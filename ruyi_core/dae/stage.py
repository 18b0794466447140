"""DaE and GRPO as pipeline stages: expand the chosen tier, (train it on megatron: stages.train), GRPO on it,
then compress what was added. Each writes one artifact under runs/<run-id>/<stage>/."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from ruyi_core.dae.expand import expand_tier, merge_tier, tier_own_prefixes
from ruyi_core.errors import RuyiError
from ruyi_core.eval.heldout import heldout_loss, heldout_prompts, heldout_texts
from ruyi_core.family.convert import export_tier
from ruyi_core.family.io import load_family, save_family
from ruyi_core.stages import workdir

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _cached(store, key: str) -> dict | None:
    m = store.read_manifest(store.uri(key))
    return None if m is None else {"uri": store.uri(key), **m.metadata}


def dae_expand(spec, store, run_id: str, family_uri: str) -> dict:
    key = f"runs/{run_id}/dae_expand"
    if (hit := _cached(store, key)) is not None:
        return hit
    d = spec.dae
    with workdir("dae-expand") as work:
        store.get_artifact(family_uri, work / "in")
        fam, tok = load_family(work / "in")
        if d.tier not in fam.config.tiers:
            raise RuyiError(f"dae.tier: unknown tier {d.tier!r}; this family has {', '.join(fam.config.tiers)}")
        p = fam.config.tiers[d.tier]
        before = heldout_loss(fam, tok, heldout_texts(spec, work), exit_point=p)
        out = expand_tier(fam, d.tier, d.blocks, d.init, d.std, seed=spec.family.seed)
        save_family(out, tok, work / "out")
        meta = {"run_id": run_id, "tier": d.tier, "exit_point": p, "blocks": d.blocks, "init": d.init,
                "added_parameters": out.tier_parameter_count(p) - fam.tier_parameter_count(p),
                "heldout_loss_unexpanded": before}
        store.put_artifact(key, work / "out", stage="dae_expand", spec_hash=spec.fingerprint(), inputs=[family_uri],
                           metadata=meta)
    return {"uri": store.uri(key), **meta}


def _records(store, uri: str, kind: str, work: Path) -> list[dict]:
    from ruyi_core.data.reader import expand_paths, read_corpus

    store.get_artifact(uri, work / kind)
    return list(read_corpus(expand_paths([work / kind]), kind).records)


def grpo(spec, store, run_id: str, family_uri: str, rl_raw_uri: str) -> dict:
    """GRPO (TRL) on the exported tier with only its own parameters trainable, merged back into the family."""
    from ruyi_core.rl.grpo import run_grpo

    key = f"runs/{run_id}/grpo"
    if (hit := _cached(store, key)) is not None:
        return hit
    with workdir("grpo") as work:
        store.get_artifact(family_uri, work / "in")
        fam, tok = load_family(work / "in")
        tier = spec.rl.tier
        if tier not in fam.config.tiers:
            raise RuyiError(f"rl.tier: unknown tier {tier!r}; this family has {', '.join(fam.config.tiers)}")
        export_tier(fam, tier, work / "tier", tok)
        own = tier_own_prefixes(fam.config, tier)
        res = run_grpo(work / "tier", work / "policy", _records(store, rl_raw_uri, "rl", work), heldout_prompts(spec),
                       own, spec.rl, log=lambda m: print(m, flush=True))
        from safetensors.torch import load_file

        state = {}
        for f in sorted((work / "policy").glob("*.safetensors")):
            state.update(load_file(f))
        merge_tier(fam, tier, state, own)
        save_family(fam, tok, work / "out")
        for f in ("rewards.jsonl", "rewards.png"):
            if (work / "policy" / f).is_file():
                (work / "out" / f).write_bytes((work / "policy" / f).read_bytes())
        meta = {"run_id": run_id, "tier": tier,
                **{k: v for k, v in res.items() if isinstance(v, (int, float, str)) and k != "path"}}
        store.put_artifact(key, work / "out", stage="grpo", spec_hash=spec.fingerprint(),
                           inputs=[family_uri, rl_raw_uri], metadata=meta)
    return {"uri": store.uri(key), **meta}


def _calibration(store, packed_uri: str, tok, n: int, seq: int, work: Path) -> list[dict]:
    from ruyi_core.megatron.data import TokenStream

    store.get_artifact(packed_uri, work / "calib")
    stream = TokenStream(work / "calib", seq, seed=12345)
    return [{"input_ids": stream.batch(i, 8)["tokens"]} for i in range(0, n, 8)]


def svd_compress(spec, store, run_id: str, family_uri: str, packed_pretrain_uri: str, expand_uri: str) -> dict:
    """SVD-LLM-v2 compression of the tier's added blocks and head: a factored tier (two factors per matrix), a
    materialised plain-Qwen3 export, and a sweep of ratios (held-out loss vs parameters)."""
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    from ruyi_core.dae.svd import compress, materialize

    key = f"runs/{run_id}/svd_compress"
    if (hit := _cached(store, key)) is not None:
        return hit
    d = spec.dae
    with workdir("svd") as work:
        store.get_artifact(family_uri, work / "in")
        fam, tok = load_family(work / "in")
        p = fam.config.tiers[d.tier]
        n_added = fam.config.expansion(p)
        if not n_added:
            raise RuyiError(f"dae.tier {d.tier!r} is not expanded: run dae_expand first")
        export_tier(fam, d.tier, work / "dense", tok)
        dense = Qwen3ForCausalLM.from_pretrained(work / "dense", dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(work / "dense")
        names = [f"model.layers.{p + 1 + j}.{proj}" for j in range(n_added) for proj in PROJECTIONS] + ["lm_head"]
        groups = {n: n.split(".", 3)[-1] if n != "lm_head" else "lm_head" for n in names}
        calib = _calibration(store, packed_pretrain_uri, tok, d.calib_samples, spec.data.seq_length, work)
        texts = heldout_texts(spec, work)
        base_loss = heldout_loss(dense, tok, texts)
        rows, chosen = [], None
        for ratio in sorted({*d.sweep, d.svd_ratio}):
            model = copy.deepcopy(dense)
            rep = compress(model, names, groups, calib, ratio)
            loss = heldout_loss(model, tok, texts)
            row = {"ratio": ratio, "removed_fraction": rep.removed_fraction, "heldout_loss": loss,
                   "relative_drop": (loss - base_loss) / base_loss, "tier_parameters": model.num_parameters()}
            rows.append(row)
            if ratio == d.svd_ratio:
                chosen, chosen_rep, row_chosen = model, rep, row
        factored_params = chosen.num_parameters()  # before materialize() makes it dense again, in place
        out = work / "out"
        (out / "factored").mkdir(parents=True)
        chosen.save_pretrained(out / "factored")
        tok.save_pretrained(out / "factored")
        (out / "factored" / "ruyi_lowrank.json").write_text(json.dumps(chosen_rep.to_dict(), indent=2))
        materialize(chosen).save_pretrained(out / "materialized")
        tok.save_pretrained(out / "materialized")
        (out / "sweep.json").write_text(json.dumps(rows, indent=2))
        _sweep_png(rows, base_loss, out / "sweep.png")
        expand_meta = store.read_manifest(expand_uri).metadata
        meta = {"run_id": run_id, "tier": d.tier, "exit_point": p, "ratio": d.svd_ratio,
                "removed_fraction": row_chosen["removed_fraction"], "heldout_loss_dense": base_loss,
                "heldout_loss_compressed": row_chosen["heldout_loss"], "relative_drop": row_chosen["relative_drop"],
                "heldout_loss_unexpanded": expand_meta["heldout_loss_unexpanded"],
                "factored_parameters": factored_params, "dense_parameters": dense.num_parameters()}
        store.put_artifact(key, out, stage="svd_compress", spec_hash=spec.fingerprint(),
                           inputs=[family_uri, packed_pretrain_uri, expand_uri], metadata=meta)
    return {"uri": store.uri(key), **meta}


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
