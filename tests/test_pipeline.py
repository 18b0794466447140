"""The KFP pipeline: compiled for a cluster (images, resources, the S3 Secret) and run end to end with KFP's
local runner against the real local S3 server, on the micro preset."""
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from conftest import with_demo
from ruyi_core.errors import RuyiError
from ruyi_core.store import ArtifactStore, lineage

pytestmark = pytest.mark.slow  # real training, generation or pipeline runs: minutes in all

ROOT = Path(__file__).resolve().parents[1]


def micro_spec(tmp_path: Path, bucket: str, **data) -> Path:
    spec = {
        "family": {"name": "micro", "base": "micro", "exit_points": [1, 3], "tiers": {"end": 1, "cloud": 3}},
        "data": {"demo_records": {"pretrain": 300, "sft": 120, "rl": 40}, "shard_tokens": 20000, **data},
        "store": {"bucket": bucket},
        "pipeline": {"image": "registry.example/ruyi-base:test",
                     "resources": {"default": {"cpu": "3", "memory": "5Gi"}}},
        "train": {s: {"steps": n, "micro_batch_size": 4, "global_batch_size": 8, "seq_length": 32, "save_every": 2,
                      "warmup_steps": 0, "replay": 0.25 if s == "sft" else 0} for s, n in (("cpt", 3), ("sft", 2))},
        "dae": {"blocks": 2, "sweep": [0.4], "calib_samples": 16,
                **{s: {"steps": 2, "micro_batch_size": 4, "global_batch_size": 4, "seq_length": 32,
                       "save_every": 2, "warmup_steps": 0, "keep_checkpoints": 0} for s in ("cpt", "sft")}},
        "rl": {"steps": 1, "group_size": 2, "prompts_per_step": 2, "max_new_tokens": 8, "heldout_prompts": 4,
               "heldout_samples": 2},
        "eval": {"benchmarks": {"arithmetic": {"format": "exact_match", "path": "demo:arithmetic", "limit": 6},
                                "facts_mc": {"format": "multiple_choice", "path": "demo:facts_mc", "limit": 12},
                                "heldout_text": {"format": "perplexity", "path": "demo:heldout_text", "limit": 12}},
                 "max_new_tokens": 12, "speed_prompt_tokens": 16, "speed_new_tokens": 8},
    }
    path = tmp_path / f"{bucket}.yaml"
    path.write_text(yaml.safe_dump(with_demo(spec)))
    return path


def test_compiled_pipeline_sets_images_resources_and_secret(tmp_path, monkeypatch):
    from pipelines.run import compile_pipeline

    secret = "s3cr3t-that-must-not-leak"
    monkeypatch.setenv("RUYI_S3_SECRET_KEY", secret)
    monkeypatch.setenv("RUYI_S3_ACCESS_KEY", "access-that-must-not-leak")
    out = compile_pipeline(micro_spec(tmp_path, "compiled"), tmp_path / "pipeline.yaml")
    text = out.read_text()
    assert secret not in text and "access-that-must-not-leak" not in text
    docs = list(yaml.safe_load_all(text))
    ir, platform = docs[0], docs[1]
    executors = ir["deploymentSpec"]["executors"]
    assert len(executors) == 20  # train runs 4 times (cpt, sft, dae_cpt, dae_sft)
    for name, ex in executors.items():
        c = ex["container"]
        assert c["image"] == "registry.example/ruyi-base:test", name
        assert c["resources"]["cpuLimit"] == 3 and c["resources"]["resourceMemoryLimit"] == "5Gi", name
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(k8s) == set(executors)
    for name, cfg in k8s.items():
        envs = {e["envVar"]: e["secretKey"] for s in cfg["secretAsEnv"] for e in s["keyToEnv"]}
        assert envs == {"RUYI_S3_ACCESS_KEY": "access_key", "RUYI_S3_SECRET_KEY": "secret_key"}, name
        assert cfg["secretAsEnv"][0]["secretName"] == "ruyi-s3"


STAGE_LINE = re.compile(r"\[(\w+)\] (reused|built) (s3://\S+)")


def split_demo_pretrain(folder: Path, n: int) -> Path:
    """The micro spec's demo pretraining corpus as `n` files of consecutive records."""
    from ruyi_core.demo import write_source

    lines = write_source("demo", "pretrain", folder.parent / "whole", 0, {"pretrain": 300}).read_text().splitlines()
    folder.mkdir()
    size = -(-len(lines) // n)
    for i in range(n):
        (folder / f"part-{i}.jsonl").write_text("".join(x + "\n" for x in lines[i * size:(i + 1) * size]))
    return folder


def fresh_temp_dir(tmp_path: Path, monkeypatch) -> Path:
    """A temp dir of the test's own, for this process and the tasks it starts."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


def stage_lines(run: dict) -> dict[str, set[str]]:
    """{stage: {"reused", "built"}} from the run log's per-stage lines."""
    out: dict[str, set[str]] = {}
    for stage, what, _ in STAGE_LINE.findall(Path(run["log"]).read_text(errors="replace")):
        out.setdefault(stage, set()).add(what)
    return out


def rerun_with(tmp_path, spec: Path, name: str, change) -> tuple[dict, Path]:
    from pipelines.run import run_local

    data = yaml.safe_load(spec.read_text())
    change(data)
    changed = tmp_path / f"{name}.yaml"
    changed.write_text(yaml.safe_dump(data))
    return run_local(changed, tmp_path / "kfp", show=lambda m: None), changed


def test_local_pipeline_end_to_end_then_cached(tmp_path, s3_server, monkeypatch):
    from pipelines.run import run_local

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    spec = micro_spec(tmp_path, "e2e", pretrain=[str(split_demo_pretrain(tmp_path / "pretrain", 2))])
    tmp = fresh_temp_dir(tmp_path, monkeypatch)
    first = run_local(spec, tmp_path / "kfp", show=lambda m: None)
    assert list(tmp.iterdir()) == []  # KFP's task scripts, torchrun's folders, the stages' work folders: all gone
    # plan_shards, curate_shard x4, merge_data, plan, init, plan_packs, pack_shard x4, prepare, cpt, sft, dae_expand,
    # dae_cpt, dae_sft, grpo, svd, export x2, package x2, promote, calibrate_routing, report
    # (parallel loop iterations may share a log line, so count at least the sequential ones)
    assert first["executed"] >= 1 + 1 + 1 + 2 + 3 + 1 + 1 + 1
    assert all(v == {"built"} for v in stage_lines(first).values()), stage_lines(first)
    from ruyi_core.package import read_index
    from ruyi_core.spec import load_spec

    store = ArtifactStore.from_spec(load_spec(spec).store)
    report = store.read_manifest(first["report_uri"])
    index = read_index(store, "micro")
    (version,) = [v["version"] for v in index["versions"]]
    packages = sorted(i.uri for i in report.inputs if i.uri.startswith("s3://e2e/models/"))
    assert packages == [f"s3://e2e/models/micro/{version}/{t}" for t in ("cloud", "end")]
    tiers = [store.read_manifest(p).metadata["export_uri"] for p in packages]
    for pkg, uri in zip(packages, tiers):
        files = {f.path for f in store.read_manifest(pkg).files}
        assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "eval.json", "lineage.json",
                "SHA256SUMS"} <= files
        chain = lineage(store, pkg)
        stages = [c.stage for c in chain]
        assert stages[:2] == ["package", "export_tier"] and chain[1].uri == uri
        assert {"sft", "cpt", "init_family", "prepare_data"} <= set(stages)
        raws = [c for c in chain if c.stage == "merge_data"]
        assert {r.metadata["kind"] for r in raws} >= {"pretrain", "sft"}  # (+ rl for the GRPO tier)
        shards = [c for c in chain if c.stage == "curate_shard"]  # the corpora's shards, down to their records
        assert sorted(s.metadata["source"].rpartition("/")[2] for s in shards if s.metadata["kind"] == "pretrain") \
            == [f"part-{i}.jsonl" for i in range(2)]  # two tasks of the pipeline's fan-out
        assert {s.metadata["kind"] for s in shards} >= {"pretrain", "sft"}
        for shard in shards:
            assert "records.jsonl" in {f.path for f in shard.files} and all(len(f.sha256) == 64 for f in shard.files)
    # the first version of each tier is promoted, and every package verifies against its SHA256SUMS
    assert index["promoted"] == {"cloud": version, "end": version}
    env = {**s3_server.env(), "PATH": "/usr/bin:/bin", "COLUMNS": "250", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "ruyi_core.cli", "models", "verify", "micro", "--spec", str(spec)],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.count("OK") == 2, r.stdout + r.stderr
    by_stage = {c.stage: c for c in lineage(store, [u for u in tiers if "/cloud/" in u][0])}
    sft = by_stage["sft"].metadata
    assert sft["steps"] == 2 and len(sft["final_exit_losses"]) == 2
    end = {c.stage: c for c in lineage(store, [u for u in tiers if "/end/" in u][0])}
    assert {"svd_compress", "grpo", "dae_sft", "dae_cpt", "dae_expand"} <= set(end)
    assert end["grpo"].metadata["heldout_text_loss_before"] > 0  # DaE's result, before GRPO changes the tier
    # checkpoints: CPT keeps its last ones (the default) in the lineage; the DaE stages (keep_checkpoints 0)
    # none once their output was stored; no starting checkpoint is left (a local trainer reads it from disk)
    cpt = by_stage["cpt"].uri
    assert store.list_artifacts(store.split(cpt)[1] + "/checkpoints") == [f"{cpt}/checkpoints/iter_{i:07d}"
                                                                          for i in (2, 3)]
    assert not [u for u in store.list_artifacts("stages/") if u.endswith("/init")]
    for s in ("dae_cpt", "dae_sft"):
        assert store.list_artifacts(store.split(end[s].uri)[1] + "/checkpoints") == []
        assert not [i for i in store.read_manifest(end[s].uri).inputs if "/checkpoints/" in i.uri]
    # SVD's result is a file of its artifact, typed; the report shows it, and the routing the calibration step
    # published beside the packages
    from ruyi_core.package.keys import routing_key
    from ruyi_core.stages import SVD

    svd = SVD.result(uri=end["svd_compress"].uri, **end["svd_compress"].metadata).read_result(store)
    assert svd.removed_fraction >= 0.4 and svd.factored_parameters < svd.dense_parameters
    assert [p.ratio for p in svd.sweep] == [svd.ratio] == [0.4] and svd.tier == "end"
    assert svd.ranks and all(0 < r for r in svd.ranks.values())
    store.get_artifact(first["report_uri"], tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert f"- SVD at ratio 0.4: removed {svd.removed_fraction:.1%} of the added parameters" in md
    routing = json.loads(store.read_object(routing_key("micro", version))[0])
    assert "## Adaptive routing (`auto`)" in md and f"calibrated on {routing['questions']} held-out questions" in md
    assert any(i.uri.startswith("s3://e2e/stages/micro/calibrate_routing/") for i in report.inputs)
    # GRPO moved nothing but the end tier's added blocks and head
    import torch

    from ruyi_core.dae.expand import tier_trainable_prefixes
    from ruyi_core.family.io import load_family

    store.get_artifact(end["dae_sft"].uri, tmp_path / "before")
    store.get_artifact(end["grpo"].uri, tmp_path / "after")
    before, _ = load_family(tmp_path / "before")
    after, _ = load_family(tmp_path / "after")
    own, _ = tier_trainable_prefixes(before.config, "end")
    moved = {k for k, v in after.state_dict().items() if not torch.equal(v, before.state_dict()[k])}
    assert all(k.startswith(tuple(own)) for k in moved), sorted(moved)[:4]
    packed = [i.uri for i in report.inputs if "/datasets/packed/" in i.uri]
    assert len(packed) == 3
    # the CLI prints the same chain
    r = subprocess.run([sys.executable, "-m", "ruyi_core.cli", "lineage", tiers[0], "--spec", str(spec)],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "curate_shard" in r.stdout and "init_family" in r.stdout, r.stdout + r.stderr
    assert re.search(r"shard part-1\.jsonl \(records [0-9a-f]{12}\): [\d,]+ records, \d+ removed", r.stdout), r.stdout

    second = run_local(spec, tmp_path / "kfp", show=lambda m: None)
    # only the data-fingerprint gate runs: the data did not change, so the run stops there
    assert second["executed"] == 2 and second["report_uri"] == first["report_uri"], second["events"]
    assert any("plan-run" in e for e in second["events"]) and not any("train" in e for e in second["events"])
    assert store.read_manifest(first["report_uri"]).created_at == report.created_at
    check_identity_follows_the_weights(tmp_path, spec, first)
    check_a_worse_version_is_kept(spec, store, end["init_family"].uri, version)
    check_concurrent_runs(tmp_path, spec, store, env, version)


def check_identity_follows_the_weights(tmp_path, spec, first):
    """Operational fields rebuild nothing: the gate finds this run's report and stops. (A new init re-does it and
    what follows it: check_concurrent_runs.)"""
    def operational(d):
        d["pipeline"].update(image="registry.example/ruyi-base:other", timeout_s=1234)

    ops, _ = rerun_with(tmp_path, spec, "ops", operational)
    assert ops["report_uri"] == first["report_uri"] and not any("train" in e for e in ops["events"])
    assert all(v == {"reused"} for v in stage_lines(ops).values()), stage_lines(ops)


def check_concurrent_runs(tmp_path, spec, store, env, first_version):
    """Two pipeline runs at once against one store and in one folder, each publishing its own version of the same
    family: one with changed evaluation settings (only packaging, routing and the report are built again), one a
    scheduled retraining warm-started from the promoted family (the merged and packed data are reused; the family's
    init, which holds the promoted family's tensors, and every stage after it are built again). Both finish, and
    the registry index holds both versions, every tier with its gate decision."""
    import torch

    from ruyi_core.family.io import load_family
    from ruyi_core.package import promoted_family, read_index

    source = promoted_family(store, "micro")
    with pytest.raises(RuyiError, match="no model family 'nobody'"):  # refused before any task
        rerun_with(tmp_path, spec, "cold", lambda d: d["family"].update(warm_start="nobody"))

    def warm_start(d: dict) -> None:  # DaE and GRPO off: they come after CPT and would only add minutes here
        d["family"].update(warm_start="micro")
        d["dae"].update(enabled=False)
        d["rl"].update(enabled=False)

    changes = {"conc-a": lambda d: d.setdefault("eval", {}).update(batch_size=3), "conc-b": warm_start}
    procs = []
    for version, change in changes.items():
        data = yaml.safe_load(spec.read_text())
        data.setdefault("package", {})["version"] = version
        change(data)
        path = tmp_path / f"{version}.yaml"
        path.write_text(yaml.safe_dump(data))
        procs.append(subprocess.Popen([sys.executable, "-m", "pipelines.cli", "pipeline", "run", "--local", "--spec",
                                       str(path)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=1200)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    logs = [tmp_path / re.search(r"^log\s+(\S+)", out, re.M).group(1) for out in outs]
    lines = [stage_lines({"log": log}) for log in logs]
    built = [{s for s, v in ln.items() if "built" in v} for ln in lines]  # a loop's tasks may share a line
    reused = [{s for s, v in ln.items() if v == {"reused"}} for ln in lines]
    assert built[0] == {"package", "calibrate_routing", "report"}, lines[0]
    assert {"curate_shard", "merge_data", "init_family", "cpt", "sft", "dae_sft", "grpo", "export_tier"} <= reused[0]
    assert {"merge_data", "pack_shard", "prepare_data"} <= reused[1], lines[1]  # the same tokenizer: no re-packing
    assert {"init_family", "cpt", "sft", "export_tier", "package", "report"} <= built[1], lines[1]
    warm_log = logs[1].read_text(errors="replace")
    assert "warm start from " + source in warm_log
    init = {stage: uri for stage, _, uri in STAGE_LINE.findall(warm_log)}["init_family"]
    families = []
    for name, uri in (("source", source), ("init", init)):
        store.get_artifact(uri, tmp_path / name)
        families.append(load_family(tmp_path / name, stored_dtype=True)[0].state_dict())
    assert families[0].keys() == families[1].keys()
    assert all(torch.equal(families[0][k], families[1][k]) for k in families[0])
    got = {v["version"]: v for v in read_index(store, "micro")["versions"]}
    for version in changes:
        tiers = got[version]["tiers"]
        assert set(tiers) == {"cloud", "end"} and all(isinstance(t["promoted"], bool) and t["reason"]
                                                      for t in tiers.values()), got[version]
    assert first_version in got


def check_a_worse_version_is_kept(spec, store, init_uri, version):
    """A worse version (the untrained family's tiers, evaluated and packaged by the same stages) is published and
    recorded, but not promoted: the registry keeps serving the promoted version and says why."""
    from ruyi_core.package import read_index
    from ruyi_core.spec import load_spec
    from ruyi_core.stages import RunPlan, export_tier, package_tier, promote

    s = load_spec(spec)
    plan = RunPlan(run_id="micro-untrained0", version="untrained0", datasets=[])
    promoted = read_index(store, "micro")["promoted"]
    worse = [package_tier(s, store, plan, export_tier(s, store, init_uri, t).uri, init_uri) for t in ("end", "cloud")]
    outcome = promote(s, store, plan, worse)
    index = read_index(store, "micro")
    assert index["promoted"] == promoted
    assert [v["version"] for v in index["versions"]][-1] == "untrained0"
    for t in ("end", "cloud"):
        assert outcome.tiers[t]["promoted"] is False
        assert "heldout_text" in outcome.tiers[t]["reason"], outcome.tiers[t]["reason"]


def test_failed_gate_stops_the_pipeline_and_writes_nothing(tmp_path, s3_server, monkeypatch):
    from pipelines.run import run_local

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine text", "source": "facts", "lang": "en"}\n{not json\n' * 20)
    spec = micro_spec(tmp_path, "badgate", pretrain=[str(bad)])
    tmp = fresh_temp_dir(tmp_path, monkeypatch)
    with pytest.raises(RuyiError, match="data gate failed for pretrain.*bad_json") as e:
        run_local(spec, tmp_path / "kfp", show=lambda m: None)
    assert "\n" not in str(e.value) and "\x1b" not in str(e.value)
    assert list(tmp.iterdir()) == []  # a failed run cleans up too
    from ruyi_core.spec import load_spec

    store = ArtifactStore.from_spec(load_spec(spec).store)
    assert store.list_artifacts("datasets/raw/pretrain") == []


def test_gpu_spec_requests_gpus_on_training_steps_only(tmp_path):
    from pipelines.run import compile_pipeline

    docs = list(yaml.safe_load_all(compile_pipeline(ROOT / "specs/gpu.yaml", tmp_path / "gpu.yaml").read_text()))
    executors = docs[0]["deploymentSpec"]["executors"]
    with_gpus = {n for n, ex in executors.items() if ex["container"]["resources"].get("accelerator")}
    assert with_gpus == {n for n in executors if n.startswith("exec-train")} and len(with_gpus) == 4
    for n in with_gpus:
        assert executors[n]["container"]["resources"]["accelerator"]["resourceCount"] == "8"
    k8s = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert {n for n, c in k8s.items() if c.get("tolerations") or c.get("nodeSelector")} == with_gpus


def test_an_upgraded_library_gets_its_own_task_cache(tmp_path, monkeypatch):
    """KFP's local cache keys a task on its inputs: a changed component (or library) must not be served what the
    old code made for the same spec and data, so each version of the code has its own cache."""
    import shutil

    import components
    from pipelines.run import task_cache

    before = task_cache(tmp_path)
    assert before.parent == tmp_path / ".kfp_cache"
    copy = tmp_path / "components"
    shutil.copytree(Path(components.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(components, "__file__", str(copy / "__init__.py"))
    assert task_cache(tmp_path) == before
    (copy / "train.py").write_text((copy / "train.py").read_text() + "\n# a new trainer\n")
    assert task_cache(tmp_path) != before
