"""Packages: an intact one verifies (also with coreutils), one changed byte is named; the promotion gate both ways;
the registry from the command line: list, show, verify (independently of the store's own manifest check) and
`generate --registry` from a verified cache."""
import json
import shutil
import subprocess

import pytest
import yaml

from conftest import with_demo
from ruyi_core.demo import tokenizer_texts
from ruyi_core.errors import RuyiError
from ruyi_core.family.io import export_tiers, init_family
from ruyi_core.package import build_package, gate, promote, publish, read_index, resolve, verify_package
from ruyi_core.package import keys
from ruyi_core.package.keys import package_key
from ruyi_core.spec import FamilySpec, PackageSpec

FAMILY = "micro"
GATE = PackageSpec(tolerance=0.02, perplexity_tolerance=0.05)


def evaluation(score: float, ppl: float = 10.0) -> dict:
    return {"benchmarks": {
        "arithmetic": {"format": "exact_match", "metric": "exact_match", "value": score, "higher_is_better": True,
                       "n": 50},
        "heldout_text": {"format": "perplexity", "metric": "word_perplexity", "value": ppl,
                         "higher_is_better": False, "n": 20}},
        "average": score, "speed": {"prefill_tokens_per_s": 5123.4, "decode_tokens_per_s": 210.5, "peak_memory_mib": 312.0},
        "parameters": 139648, "bytes_on_disk": 561144}


@pytest.fixture(scope="module")
def tier_dir(tmp_path_factory):
    fam, tok = init_family(FamilySpec(name=FAMILY, base="micro", exit_points=[1, 3]), tokenizer_texts())
    out = tmp_path_factory.mktemp("tiers")
    export_tiers(fam, tok, out, ["end"])
    return out / "end"


def build(tier_dir, out, version, ev):
    lineage = [{"stage": "export_tier", "uri": f"s3://b/runs/run-{version}/export/end", "sha256": "ab" * 32}]
    return build_package(tier_dir, out, family=FAMILY, version=version, tier="end", target="end device (phone)",
                         evaluation=ev, lineage=lineage, run_id=f"run-{version}", spec_hash="0" * 16)


def release(store, tier_dir, tmp_path, version, ev):
    """Build, publish and promote one version of the end tier, as the pipeline's package step does."""
    pkg = build(tier_dir, tmp_path / version, version, ev)
    uri = publish(store, pkg, FAMILY, version, "end", run_id=f"run-{version}", spec_hash="0" * 16)
    return promote(store, FAMILY, version, f"run-{version}", {"end": {"uri": uri, "evaluation": ev}}, GATE)



def flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_package_verifies_and_a_changed_byte_is_named(tier_dir, tmp_path, run_cli):
    pkg = build(tier_dir, tmp_path / "pkg", "v1", evaluation(0.5))
    files = sorted(p.relative_to(pkg).as_posix() for p in pkg.rglob("*") if p.is_file())
    assert {"README.md", "eval.json", "lineage.json", "SHA256SUMS", "model.safetensors", "config.json",
            "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    listed = [line.split("  ", 1)[1] for line in (pkg / "SHA256SUMS").read_text().splitlines()]
    assert listed == sorted(listed) == [f for f in files if f != "SHA256SUMS"]
    assert verify_package(pkg) == []
    # the blocks' digest chain as stored is the chain of the model as loaded (in its stored dtype)
    from transformers import AutoModelForCausalLM

    from ruyi_core.family.tensors import digests

    loaded = AutoModelForCausalLM.from_pretrained(pkg, dtype="auto")
    assert json.loads((pkg / "trunk.json").read_text())["digests"] == digests(loaded)
    if shutil.which("sha256sum"):  # the GNU format: checkable without any Ruyi code
        subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=pkg, check=True)
    card = (pkg / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "text-generation"
    assert {"ruyi-flow", "end"} <= set(front["tags"])
    for words in ("end device (phone)", "| arithmetic | exact_match", "5,123", "ababababab",
                  "AutoModelForCausalLM.from_pretrained", f"ruyi generate --registry {FAMILY} --tier end"):
        assert words in card, words
    code, out = run_cli(["models", "verify", "--path", pkg])
    assert code == 0 and "OK" in out

    flip_byte(pkg / "model.safetensors")
    (problem,) = verify_package(pkg)
    assert problem.startswith("model.safetensors: changed")
    code, out = run_cli(["models", "verify", "--path", pkg])
    assert code == 1 and "model.safetensors: changed" in out and "OK" not in out

    (pkg / "eval.json").unlink()
    (pkg / "notes.txt").write_text("not part of the package")
    assert verify_package(pkg) == ["eval.json: missing", problem,
                                   "notes.txt: extra file, not listed in SHA256SUMS"]


def test_promotion_gate_both_ways(store, tier_dir, tmp_path):
    idx = release(store, tier_dir, tmp_path, "v1", evaluation(0.50, ppl=10.0))
    assert idx["promoted"] == {"end": "v1"}
    assert idx["versions"][0]["tiers"]["end"]["reason"] == "first promoted version of this tier"

    idx = release(store, tier_dir, tmp_path, "v2", evaluation(0.45, ppl=10.0))  # 0.05 worse: beyond 0.02
    kept = idx["versions"][1]["tiers"]["end"]
    assert idx["promoted"] == {"end": "v1"} and kept["promoted"] is False
    for words in ("arithmetic", "0.45", "0.5", "tolerance 0.02", "v1 stays"):
        assert words in kept["reason"], words
    assert "heldout_text" not in kept["reason"].split("stays")[1]  # perplexity unchanged: not a failure

    idx = release(store, tier_dir, tmp_path, "v2b", evaluation(0.60, ppl=10.6))  # perplexity 6% worse
    assert idx["promoted"] == {"end": "v1"} and "heldout_text 10.6" in idx["versions"][2]["tiers"]["end"]["reason"]

    idx = release(store, tier_dir, tmp_path, "v3", evaluation(0.49, ppl=10.4))  # within both tolerances
    assert idx["promoted"] == {"end": "v3"} and idx["versions"][3]["tiers"]["end"]["promoted"] is True
    stored = read_index(store, FAMILY)
    assert stored == idx and [v["version"] for v in stored["versions"]] == ["v1", "v2", "v2b", "v3"]
    assert resolve(store, FAMILY, "end") == store.uri(package_key(FAMILY, "v3", "end"))
    assert resolve(store, FAMILY, "end", "v2") == store.uri(package_key(FAMILY, "v2", "end"))

    # idempotent: the same version again (a retried step) leaves the index as it was
    uri = store.uri(package_key(FAMILY, "v3", "end"))
    again = promote(store, FAMILY, "v3", "run-v3", {"end": {"uri": uri, "evaluation": evaluation(0.49, 10.4)}}, GATE)
    assert again == stored == read_index(store, FAMILY)
    # a version names weights: the same weights again are fine (a re-evaluation), other weights are refused
    assert publish(store, tmp_path / "v3", FAMILY, "v3", "end", run_id="another-run", spec_hash="0" * 16) == uri
    with pytest.raises(RuyiError, match="version v3 already holds other end weights"):
        publish(store, tmp_path / "v3", FAMILY, "v3", "end", run_id="another-run", spec_hash="0" * 16,
                weights="f" * 64)
    with pytest.raises(RuyiError, match="check the family name"):
        read_index(store, "nosuch")


def test_eight_concurrent_promotes_lose_no_entry(store, tier_dir, tmp_path):
    """Promotes of eight versions at once: every version lands in the index, and the promoted end tier is the
    best one's (each gate decision was taken against the index as it stood when its write succeeded)."""
    from concurrent.futures import ThreadPoolExecutor

    scores = {f"c{i}": 0.30 + 0.05 * i for i in range(8)}
    uris = {}
    for v, sc in scores.items():
        pkg = build(tier_dir, tmp_path / v, v, evaluation(sc))
        uris[v] = publish(store, pkg, FAMILY, v, "end", run_id=f"run-{v}", spec_hash="0" * 16)

    def one(v):
        return promote(store, FAMILY, v, f"run-{v}", {"end": {"uri": uris[v], "evaluation": evaluation(scores[v])}},
                       GATE)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, scores))
    index = read_index(store, FAMILY)
    assert sorted(v["version"] for v in index["versions"]) == sorted(scores)
    promoted = [v["version"] for v in index["versions"] if v["tiers"]["end"]["promoted"]]
    assert index["promoted"]["end"] == promoted[-1] == "c7"  # the best, whatever order they landed in


def test_registry_keys_keep_their_layout_and_parse_back():
    # published stores hold these exact keys
    assert package_key("micro", "v1", "end") == "models/micro/v1/end"
    assert keys.PACKAGE.format(family="micro", version="v1", tier="end") == "models/micro/v1/end"
    assert keys.index_key("micro") == "models/micro/index.json"
    assert keys.deploy_key("micro") == "models/micro/deploy.yaml"
    assert keys.routing_key("micro", "v1") == "models/micro/v1/routing.json"
    assert keys.ablations_key("micro", "v1") == "models/micro/v1/ablations.json"
    assert keys.family_prefix("micro") == "models/micro"
    assert keys.parse_package(package_key("micro", "v1.2", "end")) == ("micro", "v1.2", "end")
    assert keys.parse_package(package_key("micro", "v1", "end") + "/") == ("micro", "v1", "end")
    for other in (keys.index_key("micro"), keys.deploy_key("micro"), keys.routing_key("micro", "v1"),
                  "stages/micro/export/0123456789abcdef", "models/micro/v1/end/extra"):
        assert keys.parse_package(other) is None, other


def test_ablations_are_recorded_per_version_and_kept_together(store):
    from ruyi_core.package.registry import read_ablations, record_ablation

    assert read_ablations(store, FAMILY, "v1") == {}
    record_ablation(store, FAMILY, "v1", "dae_control", {"what": "a", "ablated_family": "x", "rows": []})
    record_ablation(store, FAMILY, "v1", "grpo_control", {"what": "b", "ablated_family": "y", "rows": []})
    record_ablation(store, FAMILY, "v1", "dae_control", {"what": "a2", "ablated_family": "x", "rows": []})
    got = read_ablations(store, FAMILY, "v1")
    assert list(got) == ["dae_control", "grpo_control"] and got["dae_control"]["what"] == "a2"
    assert read_ablations(store, FAMILY, "v2") == {}


def test_gate_ignores_benchmarks_missing_on_one_side():
    only_mc = {"benchmarks": {"facts_mc": {"format": "multiple_choice", "metric": "acc", "value": 0.1,
                                           "higher_is_better": True, "n": 9}}}
    ok, reason = gate(only_mc, {"version": "v1", "metrics": {"arithmetic": 0.9}}, GATE)
    assert ok and "no benchmark comparable with v1" in reason and "arithmetic, facts_mc" in reason
    ok, reason = gate(evaluation(0.1), {"version": "v1", "metrics": {"arithmetic": 0.9, "facts_mc": 0.5}}, GATE)
    assert not ok and "arithmetic 0.1 is worse" in reason and "not compared" in reason and "facts_mc" in reason


def test_registry_from_the_command_line(store, s3_server, tier_dir, tmp_path, monkeypatch, run_cli):
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("RUYI_CACHE", str(tmp_path / "cache"))
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(with_demo({"store": {"bucket": store.bucket}})))
    release(store, tier_dir, tmp_path, "v1", evaluation(0.50))
    release(store, tier_dir, tmp_path, "v2", evaluation(0.30))

    code, out = run_cli(["models", "list", "--spec", spec])
    assert code == 0 and FAMILY in out and "end v1" in out
    code, out = run_cli(["models", "list", FAMILY, "--spec", spec])
    assert code == 0 and "v1" in out and "v2" in out and "★ 0.500" in out and "✗ 0.300" in out
    code, out = run_cli(["models", "list", "nosuch", "--spec", spec])
    assert code == 2 and "check the family name" in out and FAMILY in out
    code, out = run_cli(["models", "show", FAMILY, "--version", "v2", "--spec", spec])
    assert code == 0 and "kept: not promoted, v1 stays" in out and "library_name: transformers" in out

    code, out = run_cli(["models", "verify", FAMILY, "--spec", spec])
    assert code == 0 and out.count("OK") == 2

    # generate: downloads the promoted package once, then runs from the verified cache
    args = ["generate", "--registry", FAMILY, "--tier", "end", "--spec", spec, "--max-new-tokens", "4", "hi"]
    code, out = run_cli(args)
    cached = tmp_path / "cache" / "models" / FAMILY / "v1" / "end"
    assert code == 0 and "downloaded" in out and verify_package(cached) == []
    mtime = (cached / "model.safetensors").stat().st_mtime_ns
    code, out = run_cli(args)
    assert code == 0 and "using the cached" in out and "downloaded" not in out
    assert (cached / "model.safetensors").stat().st_mtime_ns == mtime
    flip_byte(cached / "config.json")  # a damaged cache is replaced, not used
    code, out = run_cli(args)
    assert code == 0 and "downloading it again" in out and verify_package(cached) == []

    # a package rewritten in the store with a consistent manifest passes the store's check, not SHA256SUMS
    tampered = tmp_path / "tampered"
    shutil.copytree(tmp_path / "v2", tampered)
    flip_byte(tampered / "model.safetensors")
    m = store.read_manifest(store.uri(package_key(FAMILY, "v2", "end")))
    store.put_artifact(package_key(FAMILY, "v2", "end"), tampered, stage="package", spec_hash=m.spec_hash,
                       metadata=m.metadata)
    code, out = run_cli(["models", "verify", FAMILY, "--spec", spec])
    assert code == 1 and "v1/end" in out and "OK" in out
    assert [line for line in out.splitlines() if "FAILED" in line] == [
        line for line in out.splitlines() if "v2/end: model.safetensors: changed" in line]


def test_a_corrupt_promoted_package_fails_verify_until_a_rerun_heals_it(store, s3_server, tier_dir, tmp_path,
                                                                        monkeypatch, run_cli):
    """verify quarantines a corrupt promoted package and keeps failing while the index promotes what is gone;
    the run gate then lets the same run go again, and republishing the same weights (what its package step
    does) heals it; a bit-identical rebuild of the exported tier is the same version's weights."""
    import io

    from ruyi_core.package import check_publishable
    from ruyi_core.spec import parse_spec
    from ruyi_core.stages import RunPlan, run_finished

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(with_demo({"store": {"bucket": store.bucket}, "family": {"name": FAMILY}})))
    export = store.put_artifact("stages/micro/export_tier/e1", tier_dir, stage="export_tier", spec_hash="h",
                                identity="e1")
    weights = export.content_sha256()
    pkg = build(tier_dir, tmp_path / "v1", "v1", evaluation(0.5))
    uri = publish(store, pkg, FAMILY, "v1", "end", run_id="run-v1", spec_hash="0" * 16, weights=weights)
    promote(store, FAMILY, "v1", "run-v1", {"end": {"uri": uri, "evaluation": evaluation(0.5)}}, GATE)
    store.put_artifact("runs/run-v1/report", pkg, stage="report", spec_hash="h", identity="r1")
    run, plan = parse_spec(with_demo({"family": {"name": FAMILY}})), RunPlan(run_id="run-v1", version="v1",
                                                                             datasets=[])
    assert run_finished(run, store, plan)

    # another writer's bytes under the package's weights (with the sha256 the manifest expects)
    m = store.read_manifest(uri)
    entry = next(f for f in m.files if f.path == "model.safetensors")
    data = bytearray((pkg / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x01
    store.client.put_object(store.bucket, f"{store.split(uri)[1]}/model.safetensors", io.BytesIO(bytes(data)),
                            len(data), metadata={"sha256": entry.sha256})
    code, out = run_cli(["models", "verify", FAMILY, "--spec", spec])
    assert code == 1 and "sha256 mismatch" in out
    code, out = run_cli(["models", "verify", FAMILY, "--spec", spec])
    assert code == 1 and f"the index promotes {FAMILY} v1 end but its package is missing" in out
    assert not run_finished(run, store, plan)  # the gate lets the same run go again

    # the re-run rebuilds the exported tier bit for bit: the same weights, so the same version takes them
    store.delete_artifact(export.uri)
    rebuilt = store.put_artifact("stages/micro/export_tier/e1", tier_dir, stage="export_tier", spec_hash="h",
                                 identity="e1")
    assert rebuilt.content_sha256() == weights and rebuilt.sha256() != export.sha256()
    publish(store, pkg, FAMILY, "v1", "end", run_id="run-v1", spec_hash="0" * 16, weights=rebuilt.content_sha256())
    code, out = run_cli(["models", "verify", FAMILY, "--spec", spec])
    assert code == 0 and "OK" in out and "FAILED" not in out
    assert run_finished(run, store, plan)
    publish(store, pkg, FAMILY, "v1", "end", run_id="run-v1", spec_hash="0" * 16, weights=weights)  # still fine
    with pytest.raises(RuyiError, match="already holds other end weights"):
        check_publishable(store, FAMILY, "v1", "end", "other" + weights[5:])
    # an ablation recorded since the report: the run goes again (every stage reused) to show it in the report
    from ruyi_core.package.registry import record_ablation

    record_ablation(store, FAMILY, "v1", "grpo_control", {"what": "w", "ablated_family": "c", "rows": []})
    assert not run_finished(run, store, plan)
