"""Writers and readers of one artifact at once, through the real local store: concurrent writers of one key all
succeed with one manifest and delete nothing; a reader whose artifact is rewritten mid-read does not take it for
damage; a bit-identical rebuild is the same artifact (its content token), so lineage survives it."""
import threading

import pytest

from ruyi_core.spec import StoreSpec
from ruyi_core.store import ArtifactStore, InputRef, Manifest, lineage


def writer(store: ArtifactStore, env: dict) -> tuple[ArtifactStore, list[str]]:
    """Another client of the same bucket (another run), and the keys it removes."""
    other = ArtifactStore.from_spec(StoreSpec(bucket=store.bucket, part_size_mb=5), env=env)
    removed, remove = [], other.client.remove_object
    other.client.remove_object = lambda bucket, name: (removed.append(name), remove(bucket, name))[1]
    return other, removed


def folder(path, seed: int = 0):
    (path / "ckpt").mkdir(parents=True)
    for i in range(4):
        (path / "ckpt" / f"shard-{i}.bin").write_bytes(bytes([seed + i]) * (50_000 + i))
    (path / "summary.json").write_text('{"rows": 3}')
    return path


@pytest.mark.parametrize("n", [2, 8])
def test_concurrent_writers_of_one_key_share_one_manifest(store, s3_server, tmp_path, n):
    src = folder(tmp_path / "src")
    writers = [writer(store, s3_server.env()) for _ in range(n)]
    start, got, errors = threading.Barrier(n), [None] * n, []

    def put(i: int) -> None:
        start.wait()
        try:
            got[i] = writers[i][0].put_artifact("stages/fam/train/abc", src, stage="train", spec_hash="h",
                                                identity="abc", metadata={"step": 3})
        except Exception as e:  # noqa: BLE001 - collected for the assertion below
            errors.append(e)

    threads = [threading.Thread(target=put, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    stored = store.read_manifest("stages/fam/train/abc")
    assert all(m == stored for m in got), "every writer returns the one stored manifest"
    assert [r for _, r in writers for r in r] == [], "no writer deleted anything"
    assert store.get_artifact(stored.uri, tmp_path / "dst") == stored
    assert store.list_artifacts() == [stored.uri]


def test_writers_of_different_bytes_for_one_identity_end_consistent(store, s3_server, tmp_path):
    """A stage whose output is not a pure function of its identity: both writers succeed and what is stored
    matches its manifest (the first complete one, or the second's when its upload replaced files under it)."""
    srcs = [folder(tmp_path / f"src{i}", seed=10 * i) for i in range(2)]
    writers = [writer(store, s3_server.env())[0] for _ in range(2)]
    start, errors = threading.Barrier(2), []

    def put(i: int) -> None:
        start.wait()
        try:
            writers[i].put_artifact("stages/fam/train/abc", srcs[i], stage="train", spec_hash="h", identity="abc")
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=put, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    stored = store.read_manifest("stages/fam/train/abc")
    assert store.get_artifact(stored.uri, tmp_path / "dst") == stored


def test_a_reader_does_not_quarantine_an_artifact_rewritten_under_it(store, s3_server, tmp_path):
    old = store.put_artifact("runs/r/report", folder(tmp_path / "v1", seed=1), stage="report", spec_hash="h",
                             identity="one")
    other, removed = writer(store, s3_server.env())
    batch, calls = store.transfer.batch, []

    def rewritten_first():  # another run rewrites the (named) artifact as this read begins
        if not calls:
            calls.append(1)
            other.put_artifact("runs/r/report", folder(tmp_path / "v2", seed=2), stage="report", spec_hash="h",
                               identity="two")
        return batch()

    store.transfer.batch = rewritten_first
    got = store.get_artifact(old.uri, tmp_path / "dst")
    assert got.identity == "two" and store.read_manifest(old.uri) == got, "read the new artifact, removed nothing"
    assert removed == ["runs/r/report/manifest.json"]  # only the rewrite hid the old manifest


def test_a_bit_identical_rebuild_is_the_same_artifact(store, tmp_path):
    data = store.put_artifact("datasets/raw/pretrain/f1", folder(tmp_path / "d"), stage="validate_data",
                              spec_hash="h", identity="d1")
    model = store.put_artifact("stages/fam/train/t1", folder(tmp_path / "m", seed=5), stage="train",
                               spec_hash="h", identity="t1", inputs=[data.uri])
    assert model.inputs == [InputRef(uri=data.uri, content_sha256=data.content_sha256())]
    store.delete_artifact(data.uri)  # quarantined, say; rebuilt later from the same inputs
    rebuilt = store.put_artifact("datasets/raw/pretrain/f1", tmp_path / "d", stage="validate_data",
                                 spec_hash="h", identity="d1")
    assert rebuilt.sha256() != data.sha256() and rebuilt.content_sha256() == data.content_sha256()
    assert [m.uri for m in lineage(store, model.uri)] == [model.uri, data.uri]
    # a manifest written before content tokens: its reference is the input manifest's whole hash
    legacy = Manifest.model_validate({**model.model_dump(), "inputs": [{"uri": data.uri,
                                                                        "manifest_sha256": rebuilt.sha256()}]})
    assert legacy.inputs[0].matches(rebuilt) and not legacy.inputs[0].matches(data.model_copy(
        update={"completed_at": "other"}))


def test_a_stage_that_fails_behind_a_concurrent_run_reuses_its_artifact(store, tmp_path):
    """Two runs build one stage at once; the first stores it and removes what the second still needed (the
    checkpoints a spec does not keep): the second reuses the first's artifact instead of failing."""
    from conftest import with_demo
    from ruyi_core.spec import parse_spec
    from ruyi_core.stages.contract import Artifact, Stage, run_stage

    class Counted(Artifact):
        n: int

    stage = Stage("probe", Counted, ("family.name",))
    spec = parse_spec(with_demo({"store": {"bucket": store.bucket}}))
    identity, lines = stage.identity(spec, {}, {}), []

    def overtaken(run):
        (run.out / "x.txt").write_text("x")
        store.put_artifact(run.key, run.out, stage="probe", spec_hash="h", identity=identity, metadata={"n": 1})
        raise RuntimeError("its checkpoints are gone")

    got = run_stage(stage, spec, store, overtaken, log=lines.append)
    assert got.n == 1 and "another run stored it" in lines[-1]

    def broken(run):
        raise RuntimeError("a real failure")

    other = Stage("probe2", Counted, ("family.name",))
    with pytest.raises(RuntimeError, match="a real failure"):
        run_stage(other, spec, store, broken, log=lines.append)
