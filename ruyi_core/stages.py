"""Pipeline stages as plain functions: a spec and input URIs in, an artifact in the store out.

Each stage writes to a content-derived location and returns at once when a complete artifact (one with a
manifest) is already there, so re-runs are cheap on any orchestrator, with or without KFP's own cache.
Components (components/) are thin wrappers around these; the CLI and tests call them directly too.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ruyi_core.errors import RuyiError
from ruyi_core.spec import RunSpec, parse_spec_yaml
from ruyi_core.store import ArtifactStore, Manifest, lineage

KINDS = ("pretrain", "sft", "rl")


@contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix=f"ruyi-{prefix}-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextmanager
def open_run(spec_yaml: str) -> Iterator[tuple[RunSpec, ArtifactStore]]:
    """What every component does: the spec from its YAML text and the store from spec + environment.
    A user error inside is also written, as its one line, to $RUYI_ERROR_DIR for the local runner to show."""
    import os

    try:
        spec = parse_spec_yaml(spec_yaml)
        yield spec, ArtifactStore.from_spec(spec.store, env=os.environ)
    except RuyiError as e:
        if os.environ.get("RUYI_ERROR_DIR"):
            (Path(os.environ["RUYI_ERROR_DIR"]) / f"{os.getpid()}.txt").write_text(str(e))
        raise


def _short_hash(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def resolve_corpus(spec: RunSpec, kind: str, store: ArtifactStore, work: Path) -> list[Path]:
    """Local files for a corpus kind: `demo` generates the demo world, s3:// URIs are downloaded."""
    from ruyi_core.data import world

    out = []
    for i, entry in enumerate(getattr(spec.data, kind)):
        if entry == "demo":
            n = spec.data.demo_records
            paths = world.write_demo_corpus(work / "demo", spec.data.seed, n_pretrain=n.get("pretrain", 4000),
                                            n_sft=n.get("sft", 1500), n_rl=n.get("rl", 300))
            out.append(paths[kind])
        elif entry.startswith("s3://"):
            dest = work / "inputs" / f"{i:03d}-{Path(entry).name}"
            store.get_file(entry, dest)
            out.append(dest)
        else:
            p = Path(entry)
            if not p.is_file():
                raise RuyiError(f"data.{kind}: {entry} does not exist: point it at a JSONL/Parquet file, an "
                                "s3:// URI, or 'demo'")
            out.append(p)
    return out


def validate_data(spec: RunSpec, store: ArtifactStore, kind: str, docs_dir: Path | None = None) -> dict:
    """The data gate. Only a corpus that passes reaches datasets/, as raw files plus the gate's summary."""
    from ruyi_core.data.validate import gate_or_raise, validate_corpus

    with workdir("validate") as work:
        paths = resolve_corpus(spec, kind, store, work)
        gate = validate_corpus(paths, kind, spec.data, docs_dir)
        gate_or_raise(gate)
        key = f"datasets/raw/{kind}/{gate.fingerprint[:16]}"
        uri = store.uri(key)
        if not store.has_artifact(uri):
            art = work / "artifact"
            art.mkdir()
            for i, p in enumerate(paths):
                shutil.copy(p, art / f"{i:03d}-{p.name}")
            (art / "gate_summary.json").write_text(json.dumps(gate.summary, indent=2, default=str))
            store.put_artifact(key, art, stage="validate_data", spec_hash=spec.fingerprint(),
                               metadata={"kind": kind, "n_records": gate.n_records, "fingerprint": gate.fingerprint,
                                         "sources": [str(p) for p in getattr(spec.data, kind)]})
    return {"uri": uri, "kind": kind, "n_records": gate.n_records, "fingerprint": gate.fingerprint,
            "summary": gate.summary, "docs_index": str(gate.docs_index) if gate.docs_index else None}


def plan_run(spec: RunSpec, dataset_fingerprints: list[str]) -> str:
    """A run id derived from the spec and the validated data: same inputs, same run, same artifacts."""
    return f"{spec.family.name}-{_short_hash(spec.fingerprint(), *sorted(dataset_fingerprints))[:12]}"


def _corpus_records(store: ArtifactStore, uri: str, kind: str, work: Path) -> list[dict]:
    from ruyi_core.data.reader import expand_paths, read_corpus

    local = work / "raw"
    store.get_artifact(uri, local)
    return list(read_corpus(expand_paths([local]), kind).records)


def init_family(spec: RunSpec, store: ArtifactStore, run_id: str, pretrain_uri: str) -> dict:
    """The family from the spec's base; a preset's tokenizer is trained on the validated pretraining data."""
    from ruyi_core.family.io import init_family as build, save_family

    key = f"runs/{run_id}/init_family"
    uri = store.uri(key)
    if (m := store.read_manifest(uri)) is not None:
        return {"uri": uri, "run_id": run_id, **m.metadata}
    with workdir("init") as work:
        records = _corpus_records(store, pretrain_uri, "pretrain", work)
        fam, tok = build(spec.family, texts=(r["text"] for r in records))
        save_family(fam, tok, work / "family")
        meta = {"exit_points": fam.config.early_exit_points, "tiers": fam.config.tiers,
                "parameters": fam.num_parameters(), "vocab_size": fam.config.vocab_size}
        store.put_artifact(key, work / "family", stage="init_family", spec_hash=spec.fingerprint(),
                           inputs=[pretrain_uri], metadata=meta)
    return {"uri": uri, "run_id": run_id, **meta}


def prepare_data(spec: RunSpec, store: ArtifactStore, kind: str, raw_uri: str, family_uri: str) -> dict:
    """Tokenize and pack a validated corpus with the family's tokenizer (megatron indexed datasets)."""
    from transformers import AutoTokenizer

    from ruyi_core.data.pack import prepare_corpus

    key = _short_hash(store.read_manifest(raw_uri).sha256(), store.read_manifest(family_uri).sha256(),
                      str(spec.data.shard_tokens))
    key = f"datasets/packed/{kind}/{key}"
    uri = store.uri(key)
    if (m := store.read_manifest(uri)) is not None:
        return {"uri": uri, **m.metadata}
    with workdir("prepare") as work:
        records = _corpus_records(store, raw_uri, kind, work)
        tok_dir = work / "tokenizer"
        store.get_artifact(family_uri, tok_dir)
        tok = AutoTokenizer.from_pretrained(tok_dir)
        prepare_corpus(records, kind, tok, work / "packed", spec.data.shard_tokens)
        info = json.loads((work / "packed" / "dataset.json").read_text())
        meta = {k: info[k] for k in ("kind", "n_docs", "n_tokens", "fingerprint") if k in info}
        store.put_artifact(key, work / "packed", stage="prepare_data", spec_hash=spec.fingerprint(),
                           inputs=[raw_uri, family_uri], metadata=meta)
    return {"uri": uri, **meta}


def train(spec: RunSpec, store: ArtifactStore, stage: str, run_id: str, family_uri: str, packed: list[dict]) -> dict:
    """Joint multi-exit CPT or SFT on megatron-core (local torchrun or a TrainJob, from the spec)."""
    from ruyi_core.megatron.launch import train_stage

    kind = "pretrain" if stage in ("cpt", "dae_cpt") else "sft"
    (data_uri,) = [d["uri"] for d in packed if d["kind"] == kind]
    replay = [d["uri"] for d in packed if d["kind"] == "pretrain"] if spec.train_stage(stage).replay else [None]
    with workdir(stage) as work:
        return train_stage(spec, store, stage, run_id, family_uri, data_uri, work, replay_uri=replay[0])


def export_tier(spec: RunSpec, store: ArtifactStore, run_id: str, family_uri: str, tier: str,
                compressed: dict | None = None) -> dict:
    """One tier as a standalone Qwen3 checkpoint, with its summary row in the manifest's metadata. The DaE tier,
    when `compressed` (svd_compress's result) names it, ships the compressed weights: the materialised plain
    checkpoint plus the factored form under factored/."""
    from ruyi_core.family.io import export_tiers, load_family

    if compressed and compressed.get("tier") == tier:
        return _export_compressed(spec, store, run_id, tier, compressed)
    key = f"runs/{run_id}/export/{tier}"
    uri = store.uri(key)
    if (m := store.read_manifest(uri)) is not None:
        return {"uri": uri, **m.metadata}
    with workdir("export") as work:
        store.get_artifact(family_uri, work / "family")
        fam, tok = load_family(work / "family")
        if tier not in fam.config.tiers:
            raise RuyiError(f"unknown tier {tier!r}: this family has {', '.join(fam.config.tiers)}")
        (row,) = export_tiers(fam, tok, work / "tiers", [tier])
        row.pop("path")
        store.put_artifact(key, work / "tiers" / tier, stage="export_tier", spec_hash=spec.fingerprint(),
                           inputs=[family_uri], metadata=row)
    return {"uri": uri, **row}


def _export_compressed(spec: RunSpec, store: ArtifactStore, run_id: str, tier: str, compressed: dict) -> dict:
    import torch
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    from ruyi_core.family.io import dir_bytes, greedy_sample

    key = f"runs/{run_id}/export/{tier}"
    uri = store.uri(key)
    if (m := store.read_manifest(uri)) is not None:
        return {"uri": uri, **m.metadata}
    with workdir("export") as work:
        store.get_artifact(compressed["uri"], work / "svd")
        out = work / "svd" / "materialized"
        shutil.copytree(work / "svd" / "factored", out / "factored")
        model = Qwen3ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        row = {"tier": tier, "exit_point": int(compressed["exit_point"]), "depth": model.config.num_hidden_layers,
               "parameters": int(compressed["factored_parameters"]),
               "weight_bytes": dir_bytes(out / "factored", "*.safetensors"),
               "compressed": f"SVD {compressed['ratio']:.0%} of the added parameters",
               "sample": greedy_sample(model, AutoTokenizer.from_pretrained(out))}
        store.put_artifact(key, out, stage="export_tier", spec_hash=spec.fingerprint(), inputs=[compressed["uri"]],
                           metadata=row)
    return {"uri": uri, **row}


def manifest_of(store: ArtifactStore, uri: str) -> Manifest:
    m = store.read_manifest(uri)
    if m is None:
        raise RuyiError(f"{uri} is not a complete artifact (no manifest): re-run the stage that makes it")
    return m


def report(spec: RunSpec, store: ArtifactStore, run_id: str, promotion: dict, datasets: list[dict]) -> dict:
    """The run's report (Markdown, HTML with charts and the lineage picture), also kept in the store.
    `promotion` is the promote stage's result: this version's packages and the gate's decision per tier."""
    from ruyi_core.report import render

    key = f"runs/{run_id}/report"
    uri = store.uri(key)
    tiers = []
    with workdir("report") as work:
        for p in promotion["packages"]:
            # Rows come from the manifests (orchestrator metadata may have turned ints into floats).
            store.get_file(f"{p['uri']}/eval.json", work / "eval.json")
            tiers.append({"uri": p["uri"], **manifest_of(store, p["export_uri"]).metadata,
                          "evaluation": json.loads((work / "eval.json").read_text()),
                          "gate": promotion["tiers"].get(p["tier"])})
        tiers.sort(key=lambda r: r["exit_point"])
        datasets = [{"uri": d["uri"], **manifest_of(store, d["uri"]).metadata} for d in datasets]
        seen, chain = set(), []
        for start in [t["uri"] for t in tiers] + [d["uri"] for d in datasets]:
            for m in lineage(store, start):
                if m.uri not in seen:
                    seen.add(m.uri)
                    chain.append(m)
        figures = {}  # stage -> PNG: loss curves, GRPO rewards, the SVD sweep
        pictures = {"cpt": "cpt_losses.png", "sft": "sft_losses.png", "dae_cpt": "dae_cpt_losses.png",
                    "dae_sft": "dae_sft_losses.png", "grpo": "rewards.png", "svd_compress": "sweep.png"}
        for m in chain:
            name = pictures.get(m.stage)
            if name and any(f.path == name for f in m.files):
                store.get_file(f"{m.uri}/{name}", work / f"{m.stage}.png")
                figures[m.stage] = (work / f"{m.stage}.png").read_bytes()
        md, page, png = render(run_id, tiers, datasets, chain, figures, promotion)
        if not store.has_artifact(uri):
            out = work / "out"
            out.mkdir()
            (out / "report.md").write_text(md)
            (out / "report.html").write_text(page)
            (out / "lineage.png").write_bytes(png)
            (out / "tiers.json").write_text(json.dumps(tiers, indent=2))
            (out / "promotion.json").write_text(json.dumps(promotion, indent=2))
            store.put_artifact(key, out, stage="report", spec_hash=spec.fingerprint(),
                               inputs=[t["uri"] for t in tiers] + [d["uri"] for d in datasets])
    return {"uri": uri, "markdown": md, "html": page, "tiers": tiers, "promotion": promotion}
