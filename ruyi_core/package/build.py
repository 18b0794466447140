"""One tier as a self-describing package: the plain Qwen3 checkpoint, a model card (README.md, the Hugging Face
convention), its evaluation and lineage, and SHA256SUMS so anyone can check it with `sha256sum -c SHA256SUMS`,
with no Ruyi code and no object store."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import yaml

from ruyi_core.errors import RuyiError

SUMS = "SHA256SUMS"
# What transformers needs to load the checkpoint and its tokenizer (sharded weights come with their index).
WEIGHTS = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json")
CONFIGS = ("config.json", "generation_config.json")
TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
             "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _copy_checkpoint(tier_dir: Path, out: Path) -> None:
    if not (tier_dir / "config.json").is_file() or not any(tier_dir.glob("model*.safetensors")):
        raise RuyiError(f"{tier_dir} is not an exported tier (needs config.json and model.safetensors)")
    for pattern in WEIGHTS + CONFIGS + TOKENIZER:
        for f in tier_dir.glob(pattern):
            shutil.copy2(f, out / f.name)
    if (tier_dir / "factored").is_dir():  # the SVD-compressed DaE tier also ships its low-rank form
        shutil.copytree(tier_dir / "factored", out / "factored")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return "–" if v is None else str(v)


def model_card(*, family: str, version: str, tier: str, target: str, evaluation: dict, lineage: list[dict],
               run_id: str, spec_hash: str, depth: int, factored: bool) -> str:
    front = {"library_name": "transformers", "pipeline_tag": "text-generation",
             "tags": ["ruyi-flow", tier, family, "qwen3", "early-exit"]}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
             f"# {family} · {tier} · {version}", "",
             f"The **{tier}** tier of the Ruyi Flow family **{family}**: one exit of a shared decoder trunk, exported "
             "as a standalone Qwen3 checkpoint (no custom code).", "",
             "| | |", "|---|---|", f"| tier | {tier} |", f"| deployment target | {target or '–'} |",
             f"| decoder layers | {depth} |", f"| parameters | {_fmt(evaluation.get('parameters'))} |",
             f"| bytes on disk | {_fmt(evaluation.get('bytes_on_disk'))} |", f"| version | {version} |",
             f"| run | {run_id} |", f"| spec hash | {spec_hash} |", ""]
    if factored:
        lines += ["`factored/` holds the SVD-compressed low-rank form of this tier; the top-level weights are the "
                  "same model materialised densely.", ""]
    lines += ["## Evaluation", "", "| benchmark | format | metric | value | better | n |", "|---|---|---|---|---|---|"]
    for name, b in sorted(evaluation.get("benchmarks", {}).items()):
        lines.append(f"| {name} | {b.get('format', '')} | {b.get('metric', '')} | {_fmt(b.get('value'))} | "
                     f"{'higher' if b.get('higher_is_better', True) else 'lower'} | {b.get('n', '')} |")
    lines += ["", f"Average of the higher-is-better scores: {_fmt(evaluation.get('average'))}", ""]
    speed = evaluation.get("speed") or {}
    lines += ["## Speed and memory", "", "| prefill tok/s | decode tok/s | peak memory MiB |", "|---|---|---|",
              f"| {_fmt(speed.get('prefill_tokens_per_s'))} | {_fmt(speed.get('decode_tokens_per_s'))} | "
              f"{_fmt(speed.get('peak_memory_mib'))} |", ""]
    lines += ["## Lineage", "", "From this package back to the raw data (each artifact's content sha256, first 12 hex "
              "digits):", "",
              "| stage | artifact | sha256 |", "|---|---|---|"]
    lines += [f"| {e.get('stage', '')} | `{e['uri']}` | `{e.get('sha256', '')[:12]}` |" for e in lineage]
    lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
              'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")', "```", "",
              "or, from the registry (downloads, verifies and caches the promoted version):", "", "```sh",
              f'ruyi generate --registry {family} --tier {tier} "What is 2 + 3?"', "```", "",
              f"Check the files with `sha256sum -c {SUMS}` (or `ruyi models verify --path .`).", ""]
    return "\n".join(lines)


def build_package(tier_dir: Path, out: Path, *, family: str, version: str, tier: str, target: str,
                  evaluation: dict, lineage: list[dict], run_id: str, spec_hash: str,
                  exit_point: int | None = None) -> Path:
    """Assemble the package for one exported tier in `out` (created; must not exist). `lineage` entries are
    {"stage", "uri", "sha256"} (see registry.lineage_entries). Nothing time-dependent goes in, so building the
    same inputs twice gives identical bytes."""
    tier_dir, out = Path(tier_dir), Path(out)
    if out.exists():
        raise RuyiError(f"{out} already exists: build a package into a new folder")
    out.mkdir(parents=True)
    _copy_checkpoint(tier_dir, out)
    from ruyi_core.family.tensors import TRUNK_FILE, stored_digests  # torch: not for the registry's readers

    # the blocks' digest chain as stored: servers of this family hand trunk state only to bit-identical blocks;
    # the exit orders a server's tiers (DaE's blocks can make a small tier as deep as the next)
    trunk = {"digests": stored_digests(out), **({"exit": exit_point} if exit_point is not None else {})}
    (out / TRUNK_FILE).write_text(json.dumps(trunk, indent=2) + "\n")
    depth = json.loads((out / "config.json").read_text())["num_hidden_layers"]
    (out / "README.md").write_text(model_card(
        family=family, version=version, tier=tier, target=target, evaluation=evaluation, lineage=lineage,
        run_id=run_id, spec_hash=spec_hash, depth=depth, factored=(out / "factored").is_dir()))
    (out / "eval.json").write_text(json.dumps(evaluation, indent=2, sort_keys=True) + "\n")
    (out / "lineage.json").write_text(json.dumps(lineage, indent=2) + "\n")
    # Written last, over every other file: a package without it is incomplete.
    rels = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    (out / SUMS).write_text("".join(f"{_sha256(out / r)}  {r}\n" for r in rels))
    return out


def verify_package(path: Path) -> list[str]:
    """Problems with a package folder against its SHA256SUMS, one line each naming the file; [] when intact."""
    path = Path(path)
    sums = path / SUMS
    if not sums.is_file():
        return [f"{SUMS}: missing (not a package, or an incomplete one)"]
    listed: dict[str, str] = {}
    problems = []
    for n, line in enumerate(sums.read_text().splitlines(), 1):
        digest, sep, rel = line.partition("  ")
        # the paths are ours to read: refuse anything that could point outside the folder
        if not sep or len(digest) != 64 or rel.startswith("/") or ".." in rel.split("/"):
            problems.append(f"{SUMS}: line {n} is not '<sha256>  <relative path>'")
            continue
        listed[rel] = digest
    for rel, digest in sorted(listed.items()):
        f = path / rel
        if not f.is_file():
            problems.append(f"{rel}: missing")
        elif (got := _sha256(f)) != digest:
            problems.append(f"{rel}: changed (sha256 {got[:12]}…, {SUMS} says {digest[:12]}…)")
    present = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    problems += [f"{rel}: extra file, not listed in {SUMS}" for rel in sorted(present - set(listed) - {SUMS})]
    return problems
