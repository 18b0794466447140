"""The model registry, kept in the store beside the runs (its keys: package/keys.py): one package per tier (an
artifact: files + manifest.json, stage "package"), and per family an index of every version with its per-tier
gate decision and the promoted version of each tier: {"family", "versions": [{"version", "run_id", "created",
"tiers": {tier: {"uri", "metrics", "average", "promoted", "reason"}}}], "promoted": {tier: version}}

A version names weights (it is derived from what determines them) and its weights never change once published; the
index only grows. A gate decision, once recorded, stands: promoting the same version from the same run again
changes nothing, so a retried pipeline step is harmless. A later run that re-evaluates the same weights (new
evaluation settings) replaces the version's evaluation and gate decisions.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path

from ruyi_core.errors import RuyiError
from ruyi_core.package.build import SUMS, verify_package
from ruyi_core.package.keys import ROOT, ablations_key, index_key, package_key, parse_package
from ruyi_core.spec import PackageSpec
from ruyi_core.store import ArtifactStore, lineage
from ruyi_core.store.client import hash_file


def lineage_entries(store: ArtifactStore, uri: str) -> list[dict]:
    """The lineage of an artifact (an exported tier) as build_package records it."""
    return [{"stage": m.stage, "uri": m.uri, "sha256": m.content_sha256()} for m in lineage(store, uri)]


def check_publishable(store: ArtifactStore, family: str, version: str, tier: str, weights: str) -> str:
    """The URI for a tier's package of `version`; refuses a version that already holds other weights (a version
    names weights: re-publishing the same weights, say with a new evaluation, is fine)."""
    uri = store.uri(package_key(family, version, tier))
    if (m := store.read_manifest(uri)) is not None and m.metadata.get("weights", "") != weights:
        raise RuyiError(f"{family} version {version} already holds other {tier} weights (run "
                        f"{m.metadata.get('run_id')}): versions are immutable, set package.version to a new one")
    return uri


def publish(store: ArtifactStore, pkg_dir: Path, family: str, version: str, tier: str, *, run_id: str,
            spec_hash: str, weights: str = "", inputs: Iterable[str] = ()) -> str:
    """Upload a package built outside the pipeline to its registry key; returns its URI. The
    pipeline's package stage publishes through the stage contract, with the same checks."""
    if problems := verify_package(pkg_dir):
        raise RuyiError(f"{pkg_dir} is not an intact package ({problems[0]}): rebuild it before publishing")
    uri = check_publishable(store, family, version, tier, weights)
    evaluation = json.loads((Path(pkg_dir) / "eval.json").read_text())
    store.put_artifact(uri, pkg_dir, stage="package", spec_hash=spec_hash, inputs=inputs,
                       metadata={"family": family, "version": version, "tier": tier, "run_id": run_id,
                                 "weights": weights, "average": evaluation.get("average")})
    return uri


def families(store: ArtifactStore) -> list[str]:
    """Families with at least one published package."""
    keys = (parse_package(store.split(u)[1]) for u in store.list_artifacts(ROOT))
    return sorted({k.family for k in keys if k is not None})


def read_index(store: ArtifactStore, family: str, *, missing_ok: bool = False) -> dict | None:
    """The family's index; a family without one is an error (None with missing_ok)."""
    got = _read_index(store, family)
    if got is None:
        if missing_ok:
            return None
        known = families(store)
        have = f"the registry has {', '.join(known)}" if known else "the registry is empty"
        raise RuyiError(f"no model family {family!r} at {store.uri(ROOT)} ({have}): check the family name, "
                        "or run the pipeline to publish and promote one")
    return got[0]


def _read_index(store: ArtifactStore, family: str) -> tuple[dict, str] | None:
    got = store.read_object(index_key(family))
    if got is None:
        return None
    try:
        return json.loads(got[0]), got[1]
    except ValueError:
        raise RuyiError(f"{store.uri(index_key(family))} is not valid JSON: restore it from a copy, or delete it "
                        "and promote the family's versions again") from None


def read_ablations(store: ArtifactStore, family: str, version: str) -> dict:
    """The version's recorded ablations, {name: {"what", "ablated_family", "rows"}} ({} when none ran)."""
    got = store.read_object(ablations_key(family, version))
    return json.loads(got[0]) if got else {}


def record_ablation(store: ArtifactStore, family: str, version: str, name: str, entry: dict) -> None:
    """Adds (or replaces) one ablation of `version`; a concurrent writer's ablations are kept (read, merge, write
    if unchanged, retry)."""
    key = ablations_key(family, version)
    for _ in range(10):
        got = store.read_object(key)
        merged = (json.loads(got[0]) if got else {}) | {name: entry}
        if store.write_object_if(key, json.dumps(merged, indent=2).encode(), got[1] if got else None):
            return
    raise RuyiError(f"{store.uri(key)} kept changing while recording ablation {name!r}: record it again")


def _find(index: dict, version: str) -> dict | None:
    return next((v for v in index["versions"] if v["version"] == version), None)


def version_entry(index: dict, version: str) -> dict:
    """The index's entry for `version`; a version the family does not have is an error naming those it has."""
    entry = _find(index, version)
    if entry is None:
        raise RuyiError(f"{index['family']} has no version {version!r}: versions are "
                        f"{', '.join(v['version'] for v in index['versions'])}")
    return entry


def tier_entry(index: dict, version: str, tier: str) -> dict:
    """The gate decision of `version`'s `tier` ({"uri", "metrics", "average", "promoted", "reason"})."""
    tiers = version_entry(index, version)["tiers"]
    if tier not in tiers:
        raise RuyiError(f"{index['family']} {version} has no {tier!r} tier: it has {', '.join(tiers)}")
    return tiers[tier]


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not math.isnan(v)


def gate(evaluation: dict, baseline: dict | None, package: PackageSpec) -> tuple[bool, str]:
    """(promote?, why) for a candidate's evaluation against the promoted version's index entry
    ({"version", "metrics"}), or None when the tier has nothing promoted yet."""
    if baseline is None:
        return True, "first promoted version of this tier"
    old_v, old = baseline["version"], baseline["metrics"]
    new = evaluation.get("benchmarks", {})
    common = sorted(b for b in set(new) & set(old) if _number(new[b].get("value")) and _number(old[b]))
    ignored = sorted((set(new) | set(old)) - set(common))
    note = f"; not compared (missing or not a number on one side): {', '.join(ignored)}" if ignored else ""
    if not common:
        return True, f"no benchmark comparable with {old_v}: promoted without comparison{note}"
    worse, compared = [], []
    for b in common:
        n, o = new[b]["value"], old[b]
        if new[b].get("format") == "perplexity":  # relative: perplexities have no fixed scale
            rel = package.perplexity_tolerance
            ok, tol = n <= o * (1 + rel), f"relative tolerance {rel:g}"
        elif new[b].get("higher_is_better", True):
            ok, tol = n >= o - package.tolerance, f"tolerance {package.tolerance:g}"
        else:
            ok, tol = n <= o + package.tolerance, f"tolerance {package.tolerance:g}"
        compared.append(f"{b} {n:.4g} vs {o:.4g}")
        if not ok:
            worse.append(f"{b} {n:.4g} is worse than {old_v}'s {o:.4g} beyond the {tol}")
    if worse:
        return False, f"not promoted, {old_v} stays: {'; '.join(worse)}{note}"
    return True, f"no benchmark worse than {old_v} beyond tolerance ({', '.join(compared)}){note}"


def promote(store: ArtifactStore, family: str, version: str, run_id: str, candidates: dict[str, dict],
            package: PackageSpec) -> dict:
    """Record `version` in the family's index and gate each tier ({tier: {"uri", "evaluation"}}) against the
    tier's promoted version; returns the new index. The index is written only if nobody changed it since it was
    read (a conditional write); a promote that loses the race reads it again and re-decides, so concurrent
    promotes never lose an entry."""
    import random
    import time

    for cand in candidates.values():
        if not store.has_artifact(cand["uri"]):
            raise RuyiError(f"{cand['uri']} is not a published package: publish it before promoting")
    for attempt in range(_INDEX_ATTEMPTS):
        got = _read_index(store, family)
        index, etag = got if got else ({"family": family, "versions": [], "promoted": {}}, None)
        _decide(store, index, version, run_id, candidates, package)
        body = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()
        if store.write_object_if(index_key(family), body, etag):
            return index
        time.sleep(random.uniform(0.02, 0.1) * (attempt + 1))  # another promote wrote first: read it again
    raise RuyiError(f"{store.uri(index_key(family))} kept changing under {_INDEX_ATTEMPTS} attempts to record "
                    f"{version}: run the promote step again")


_INDEX_ATTEMPTS = 30


def _decide(store: ArtifactStore, index: dict, version: str, run_id: str, candidates: dict[str, dict],
            package: PackageSpec) -> None:
    entry = _find(index, version)
    if entry is None:
        created = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
        entry = {"version": version, "run_id": run_id, "created": created, "tiers": {}}
        index["versions"].append(entry)
    elif entry["run_id"] != run_id:  # the same weights, evaluated again by a run with other evaluation settings
        entry.update(run_id=run_id, tiers={})
    for tier, cand in sorted(candidates.items()):
        if tier in entry["tiers"]:
            continue  # decided before: the decision stands
        current = index["promoted"].get(tier)
        ev = cand["evaluation"]
        if current == version:
            ok, reason = True, "re-evaluated (same weights, new evaluation settings): stays promoted"
        else:
            baseline = {"version": current, **_find(index, current)["tiers"][tier]} if current else None
            ok, reason = gate(ev, baseline, package)
        entry["tiers"][tier] = {"uri": store.normalize_uri(cand["uri"]), "promoted": ok, "reason": reason,
                                "metrics": {b: r["value"] for b, r in ev.get("benchmarks", {}).items()},
                                "average": ev.get("average")}
        if ok:
            index["promoted"][tier] = version


def absent_packages(store: ArtifactStore, index: dict, version: str | None = None) -> list[tuple[str, str, str]]:
    """(version, tier, uri) of each package the index names that has no complete artifact in the store: every
    tier's promoted package, or `version`'s packages. A quarantined package stays absent until a run of its spec
    rebuilds and republishes it."""
    if version is None:
        picks = sorted((v, t) for t, v in index["promoted"].items())
    else:
        entry = _find(index, version)
        picks = [(version, t) for t in sorted(entry["tiers"])] if entry else []
    return [(v, t, u) for v, t in picks if not store.has_artifact(u := tier_entry(index, v, t)["uri"])]


def resolve(store: ArtifactStore, family: str, tier: str, version: str | None = None) -> str:
    """The URI of a tier's package: the promoted version's, or `version`'s."""
    index = read_index(store, family)
    if version is None:
        version = index["promoted"].get(tier)
        if version is None:
            have = ", ".join(f"{t} ({v})" for t, v in sorted(index["promoted"].items())) or "none"
            raise RuyiError(f"{family} has no promoted {tier!r} tier (promoted: {have}): pick a tier, or a "
                            "--version that has it")
    return tier_entry(index, version, tier)["uri"]


def cache_root() -> Path:
    return Path(os.environ.get("RUYI_CACHE") or Path.home() / ".cache" / "ruyi") / "models"


def fetch(store: ArtifactStore, family: str, tier: str, version: str | None = None, cache: Path | None = None,
          log: Callable[[str], None] = lambda m: None) -> Path:
    """A verified local copy of a package (promoted by default) under <cache>/<family>/<version>/<tier>,
    downloaded only when the cached copy is not that package or no longer intact."""
    uri = resolve(store, family, tier, version)
    m = store.read_manifest(uri)
    if m is None:
        raise RuyiError(f"the index of {family} names {uri}, which is not a complete package: publish it again")
    dest = Path(cache or cache_root()) / family / m.metadata["version"] / tier
    sums = next((f.sha256 for f in m.files if f.path == SUMS), None)
    if (dest / SUMS).is_file():
        if hash_file(dest / SUMS)[0] == sums and not verify_package(dest):
            log(f"using the cached {dest}")
            return dest
        log(f"the cached {dest} is not {uri} or was modified: downloading it again")
    # into a sibling folder first, so an interrupted download never looks like a cached package
    tmp = dest.with_name(f".{tier}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        store.get_artifact(uri, tmp)
        if problems := verify_package(tmp):
            raise RuyiError(f"{uri} fails its {SUMS}: {'; '.join(problems)}")
    except BaseException:  # a failed or interrupted download leaves nothing behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    log(f"downloaded {uri} to {dest}")
    return dest


def promoted_family(store: ArtifactStore, family: str) -> str:
    """The URI of the jointly trained family (its `sft` stage's artifact: the trunk and every exit, before DaE)
    behind `family`'s promoted version, the one most tiers are promoted from: what a warm-started run continues."""
    index = read_index(store, family)
    counts = Counter(index["promoted"].values())
    if not counts:
        raise RuyiError(f"{family} has no promoted version to warm-start from: run it once without "
                        "family.warm_start")
    order = [v["version"] for v in index["versions"]]
    version = max(counts, key=lambda v: (counts[v], order.index(v) if v in order else -1))
    tier = next(t for t, v in sorted(index["promoted"].items()) if v == version)
    chain = lineage(store, tier_entry(index, version, tier)["uri"])
    found = next((m.uri for m in chain if m.stage == "sft"), None)
    if found is None:
        raise RuyiError(f"{family} version {version}: its {tier} package's lineage holds no sft stage to "
                        "continue from (a package published outside the pipeline)")
    return found
