"""The artifact store against a real local S3 server (SeaweedFS `weed mini`), no mocks."""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
import socket
import threading
import time
from pathlib import Path

import psutil
import pytest
from minio import Minio
from typer.testing import CliRunner

from ruyi_core.errors import RuyiError
from ruyi_core.spec import StoreSpec
from ruyi_core.store import ArtifactStore, IntegrityError, Manifest, StoreError, lineage
from ruyi_core.store.lineage import lineage_json, lineage_tree
from ruyi_core.store.cli import store_app
from ruyi_core.store.server import serve, stop

MiB = 1 << 20


def write_random(path: Path, size: int, seed: int = 0) -> str:
    """Write `size` pseudo-random bytes in 1 MiB chunks (never all in memory); returns their sha256. Each
    chunk is one random block stamped with its index: every MiB differs, and it is fast to make."""
    block, h = bytearray(random.Random(seed).randbytes(MiB)), hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for i, off in enumerate(range(0, size, MiB)):
            block[:8] = i.to_bytes(8, "little")
            chunk = memoryview(block)[: min(MiB, size - off)]
            f.write(chunk)
            h.update(chunk)
    return h.hexdigest()


def sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def raw_client(store: ArtifactStore, env: dict[str, str]) -> Minio:
    return Minio(store.endpoint, env["RUYI_S3_ACCESS_KEY"], env["RUYI_S3_SECRET_KEY"], secure=False)


class PeakRSS:
    """Samples this process's RSS in a background thread; `growth` is the peak above the start."""

    def __enter__(self):
        self.proc, self.stop = psutil.Process(), threading.Event()
        self.base = self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.base


@pytest.mark.slow
def test_large_artifact_round_trips_streaming(store, tmp_path):
    size = 300 * MiB
    src = tmp_path / "src"
    digest = write_random(src / "shard-000.bin", size, seed=1)
    (src / "meta" / "info.json").parent.mkdir()
    (src / "meta" / "info.json").write_text('{"rows": 3}')
    warm = tmp_path / "warm"  # warm up pools and lazy imports outside the measured window
    write_random(warm / "w.bin", 12 * MiB, seed=2)
    store.get_artifact(store.put_artifact("runs/warm/x", warm, stage="x", spec_hash="s").uri, tmp_path / "w2")

    with PeakRSS() as up:
        m = store.put_artifact("datasets/big", src, stage="prepare_data", spec_hash="abc")
    with PeakRSS() as down:
        got = store.get_artifact(m.uri, tmp_path / "dst")

    assert m.uri == f"s3://{store.bucket}/datasets/big" and got == m
    assert {f.path: f.sha256 for f in m.files}["shard-000.bin"] == digest
    assert sha(tmp_path / "dst" / "shard-000.bin") == digest
    assert (tmp_path / "dst" / "meta" / "info.json").read_text() == '{"rows": 3}'
    assert up.growth < size / 3 and down.growth < size / 3, (up.growth / MiB, down.growth / MiB)
    # the sha256 rides in the object's metadata, also for multipart uploads
    st = store.client.stat_object(store.bucket, "datasets/big/shard-000.bin")
    assert st.metadata["x-amz-meta-sha256"] == digest
    assert not list((tmp_path / "dst").rglob("*.ruyi-part"))


@pytest.mark.parametrize("size", [100_000, 12 * MiB], ids=["single-part", "multipart"])
def test_corrupt_object_is_caught_by_hash(store, s3_server, tmp_path, size):
    src = tmp_path / "src"
    write_random(src / "weights.bin", size, seed=3)
    (src / "config.json").write_text("{}")
    m = store.put_artifact("models/demo/v1/small", src, stage="package", spec_hash="h")
    # same key, same size, same sha256 metadata, one byte flipped: only the content hash can tell
    key = "models/demo/v1/small/weights.bin"
    data = bytearray((src / "weights.bin").read_bytes())
    data[size // 2] ^= 0xFF
    entry = next(f for f in m.files if f.path == "weights.bin")
    raw_client(store, s3_server.env()).put_object(store.bucket, key, io.BytesIO(bytes(data)), len(data),
                                                  metadata={"sha256": entry.sha256})
    dst = tmp_path / "dst"
    with pytest.raises(IntegrityError, match=r"weights\.bin: sha256 mismatch") as e:
        store.get_artifact(m.uri, dst)
    assert "\n" not in str(e.value) and "running the stage that built" in str(e.value)
    assert not (dst / "weights.bin").exists()
    assert not list(dst.rglob("*.ruyi-part")), "a partial file was left behind"
    # repaired by building the artifact again: the corrupt object and the manifest are gone, so nothing is
    # skipped as "already stored" and the re-upload writes the good bytes
    assert not store.has_artifact(m.uri)
    again = store.put_artifact("models/demo/v1/small", src, stage="package", spec_hash="h")
    store.get_artifact(again.uri, dst)
    assert (dst / "weights.bin").read_bytes() == (src / "weights.bin").read_bytes()


@pytest.mark.slow
def test_killed_upload_stays_invisible_and_retry_completes(tmp_path):
    root = tmp_path / "s3"
    srv = serve(root)
    try:
        spec = StoreSpec(bucket="killed", part_size_mb=5, parallel_parts=2, retries=1)
        store = ArtifactStore.from_spec(spec, env=srv.env())
        src = tmp_path / "src"
        small = {f"small-{i}.txt": write_random(src / f"small-{i}.txt", 200_000, seed=i) for i in range(3)}
        write_random(src / "big.bin", 60 * MiB, seed=9)
        small_bytes = 3 * 200_000

        def killer():  # SIGKILL the server once the small files are in and the big one is on its way
            while store.stats.bytes_uploaded < small_bytes + 15 * MiB:
                time.sleep(0.002)
            os.kill(srv.pid, signal.SIGKILL)

        t = threading.Thread(target=killer, daemon=True)
        t.start()
        with pytest.raises(StoreError, match="cannot reach the object store") as e:
            store.put_artifact("runs/r1/pretrain", src, stage="pretrain", spec_hash="h")
        t.join(10)
        assert "\n" not in str(e.value)
        assert store.stats.files_uploaded == 3

        srv2 = serve(root, port=srv.port)  # same root and port: same data, same credentials
        try:
            assert srv2.pid != srv.pid and srv2.env() == srv.env()
            store = ArtifactStore.from_spec(spec, env=srv2.env())
            assert not store.has_artifact("runs/r1/pretrain")
            assert store.read_manifest("runs/r1/pretrain") is None
            assert store.list_artifacts("runs") == []
            m = store.put_artifact("runs/r1/pretrain", src, stage="pretrain", spec_hash="h")
            assert store.stats.files_skipped == 3 and store.stats.files_uploaded == 1  # only big.bin again
            assert store.list_artifacts("runs") == [m.uri]
            store.get_artifact(m.uri, tmp_path / "dst")
            assert sha(tmp_path / "dst" / "big.bin") == sha(src / "big.bin")
            assert {p: sha(tmp_path / "dst" / p) for p in small} == small
            assert stop(root) and not psutil.pid_exists(srv2.pid) and not stop(root)
        finally:
            srv2.kill()
    finally:
        srv.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_credentials_and_unreachable_endpoint_are_one_line(s3_server):
    spec = StoreSpec(bucket="creds", part_size_mb=5)
    env = s3_server.env()
    wrong = "not-the-secret-" + "x" * 20
    with pytest.raises(StoreError) as e:
        ArtifactStore.from_spec(spec, env={**env, "RUYI_S3_SECRET_KEY": wrong})
    msg = str(e.value)
    assert msg.startswith("the object store rejected the credentials (SignatureDoesNotMatch)")
    assert "RUYI_S3_SECRET_KEY" in msg and wrong not in msg and env["RUYI_S3_SECRET_KEY"] not in msg
    assert "\n" not in msg and isinstance(e.value, RuyiError)

    with pytest.raises(StoreError, match=r"credentials \(InvalidAccessKeyId\): check RUYI_S3_ACCESS_KEY"):
        ArtifactStore.from_spec(spec, env={**env, "RUYI_S3_ACCESS_KEY": "NOBODY"})

    port = _free_port()
    for endpoint in (f"127.0.0.1:{port}", f"http://127.0.0.1:{port}"):
        with pytest.raises(StoreError) as e:
            ArtifactStore.from_spec(spec, env={**env, "RUYI_S3_ENDPOINT": endpoint})
        assert str(e.value) == (f"cannot reach the object store at 127.0.0.1:{port} (connection refused): "
                                "start it with `ruyi store serve` or set RUYI_S3_ENDPOINT")

    plain = env["RUYI_S3_ENDPOINT"].split("://")[-1]  # https against this plain-HTTP server: no retries
    with pytest.raises(StoreError, match=r"\(TLS handshake failed; check store.secure\)"):
        ArtifactStore.from_spec(spec, env={**env, "RUYI_S3_ENDPOINT": f"https://{plain}"})

    # an endpoint that accepts connections and never answers: one line after store.read_timeout_s
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        where = f"127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(StoreError, match=rf"cannot reach the object store at {where} \(timed out\)"):
            ArtifactStore.from_spec(spec.model_copy(update={"read_timeout_s": 0.5}),
                                    env={**env, "RUYI_S3_ENDPOINT": where})

    with pytest.raises(StoreError, match="set RUYI_S3_ACCESS_KEY and RUYI_S3_SECRET_KEY"):
        ArtifactStore.from_spec(spec, env={"RUYI_S3_ENDPOINT": env["RUYI_S3_ENDPOINT"]})
    with pytest.raises(StoreError, match="invalid object store endpoint"):
        ArtifactStore.from_spec(spec, env={**env, "RUYI_S3_ENDPOINT": "ftp://x:1"})


def test_a_silenced_store_fails_a_many_file_transfer_within_its_bound(s3_server, tmp_path, monkeypatch):
    """The store stops answering (SIGSTOP) as the first file starts: an upload or download of many files fails
    with one line within one call's retries plus one attempt (docs/architecture.md), because the first failure
    stops the rest; files still queued never start."""
    spec = StoreSpec(bucket="silenced", part_size_mb=5, parallel_parts=2, retries=1, read_timeout_s=2.0)
    store = ArtifactStore.from_spec(spec, env=s3_server.env())
    src = tmp_path / "src"
    for i in range(16):
        write_random(src / f"shard-{i:02d}.bin", 1000, seed=i)
    uri = store.put_artifact("ckpt/stored", src, stage="t", spec_hash="h").uri
    t = store.transfer
    backoff = sum(min(t.backoff_cap_s, t.backoff_s * 2 ** i) for i in range(spec.retries))
    # a stopped process's kernel still accepts connections: every attempt waits out the read timeout
    bound = (spec.retries + 2) * spec.read_timeout_s + backoff
    stat, calls = store.client.stat_object, []

    def silence_then_stat(*args, **kw):  # every file's first call
        calls.append(args)
        os.kill(s3_server.pid, signal.SIGSTOP)
        return stat(*args, **kw)

    monkeypatch.setattr(store.client, "stat_object", silence_then_stat)
    try:
        for transfer in (lambda: store.put_artifact("ckpt/new", src, stage="t", spec_hash="h"),
                         lambda: store.get_artifact(uri, tmp_path / "dst")):
            calls.clear()
            started = time.monotonic()
            with pytest.raises(StoreError, match=r"cannot reach the object store at .* \(timed out\)") as e:
                transfer()
            took = time.monotonic() - started
            os.kill(s3_server.pid, signal.SIGCONT)
            assert "\n" not in str(e.value)
            assert took < bound, f"{took:.1f} s against a silent store; the bound is {bound:.1f} s"
            assert len(calls) < 16, "files still queued after the first failure were started"
    finally:
        os.kill(s3_server.pid, signal.SIGCONT)


def test_cli_serve_reuses_server_and_never_prints_the_secret(s3_server, store, tmp_path, monkeypatch):
    runner = CliRunner()
    res = runner.invoke(store_app, ["serve", "--root", str(s3_server.root)])
    assert res.exit_code == 0, res.output
    assert s3_server.endpoint in res.output and "s3.env" in res.output
    assert s3_server.secret_key not in res.output
    env_file = s3_server.root / "s3.env"
    assert oct(env_file.stat().st_mode & 0o777) == "0o600"
    assert dict(ln.split("=", 1) for ln in env_file.read_text().splitlines()) == s3_server.env()
    server_json = (s3_server.root / "server.json").read_text()
    assert json.loads(server_json)["pid"] == s3_server.pid and s3_server.secret_key not in server_json

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("x")
    m = store.put_artifact("datasets/cli", tmp_path / "a", stage="prepare_data", spec_hash="h")
    for k, v in {**s3_server.env(), "COLUMNS": "200"}.items():
        monkeypatch.setenv(k, v)
    res = runner.invoke(store_app, ["lineage", m.uri])
    assert res.exit_code == 0, res.output
    assert "prepare_data" in res.output and m.content_sha256()[:12] in res.output
    assert s3_server.secret_key not in res.output
    # errors reach the main CLI as one-line StoreErrors; a lookup creates no bucket
    res = runner.invoke(store_app, ["lineage", "s3://no-such-bucket/x"])
    assert isinstance(res.exception, StoreError) and "does not exist" in str(res.exception)
    assert not store.client.bucket_exists("no-such-bucket")
    monkeypatch.setenv("RUYI_S3_ENDPOINT", f"127.0.0.1:{_free_port()}")
    res = runner.invoke(store_app, ["lineage", m.uri])
    assert isinstance(res.exception, StoreError) and "cannot reach" in str(res.exception)


def test_reupload_transfers_nothing_new(store, tmp_path):
    src = tmp_path / "src"
    write_random(src / "a.bin", 11 * MiB, seed=4)  # multipart
    write_random(src / "sub" / "b.bin", 1000, seed=5)
    m1 = store.put_artifact("runs/r2/sft", src, stage="sft", spec_hash="h", metadata={"lr": 1e-4})
    before = {o.object_name: (o.last_modified, o.etag)
              for o in store.client.list_objects(store.bucket, prefix="runs/", recursive=True)}
    sent = store.stats.bytes_uploaded
    time.sleep(1.1)  # last_modified has 1 s resolution
    m2 = store.put_artifact("runs/r2/sft/", src, stage="sft", spec_hash="h", metadata={"lr": 1e-4})
    after = {o.object_name: (o.last_modified, o.etag)
             for o in store.client.list_objects(store.bucket, prefix="runs/", recursive=True)}
    assert store.stats.bytes_uploaded == sent and store.stats.files_skipped == 2
    assert after == before and len(after) == 3  # two files and the untouched manifest
    assert m2 == m1 and m2.sha256() == m1.sha256()

    # changed content: the manifest is rewritten, only the changed file is sent
    (src / "sub" / "b.bin").write_bytes(b"changed")
    m3 = store.put_artifact("runs/r2/sft", src, stage="sft", spec_hash="h", metadata={"lr": 1e-4})
    assert m3.sha256() != m1.sha256() and store.stats.bytes_uploaded == sent + len(b"changed")
    assert Manifest.model_validate_json(json.dumps(m3.model_dump())).sha256() == m3.sha256()


def test_lineage_walks_three_levels(store, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "f.txt").write_text("data")
    data = store.put_artifact("datasets/demo/v1", d, stage="prepare_data", spec_hash="h")
    run = store.put_artifact("runs/r3/pretrain", d, stage="pretrain", spec_hash="h", inputs=[data.uri])
    model = store.put_artifact("models/demo/v1/small", d, stage="package", spec_hash="h",
                               inputs=[run.uri, "datasets/demo/v1"])  # keys work as inputs too; no repeats
    assert model.inputs[0].content_sha256 == run.content_sha256()
    chain = lineage(store, model.uri)
    assert [m.stage for m in chain] == ["package", "pretrain", "prepare_data"]
    assert [m.uri for m in chain] == [model.uri, run.uri, data.uri]
    # printed as a tree of keys under the bucket (one node per artifact, a repeat named once), or as JSON
    tree = lineage_tree(chain)
    assert tree[2].startswith("package  " + model.content_sha256()[:12]) and tree[3] == "  models/demo/v1/small"
    assert tree[5] == "│    runs/r3/pretrain" and tree[7] == "│       datasets/demo/v1"
    assert tree[4].startswith("├─ pretrain") and tree[6].startswith("│  └─ prepare_data")
    assert tree[-1] == f"└─ prepare_data {data.content_sha256()[:8]} (above)"
    doc = json.loads(json.dumps(lineage_json(chain)))
    assert doc["uri"] == model.uri and [a["inputs"] for a in doc["artifacts"]] == [[run.uri, data.uri], [data.uri], []]
    assert model.code_version.startswith("0.") and model.created_at.endswith("Z")
    assert store.list_artifacts() == sorted([data.uri, run.uri, model.uri])
    assert store.list_artifacts("runs/r3") == [run.uri]

    with pytest.raises(StoreError, match="is not an artifact"):
        store.put_artifact("runs/r3/eval", d, stage="eval", spec_hash="h", inputs=["runs/nope"])
    # rewriting an input breaks the chain loudly
    (d / "f.txt").write_text("other data")
    store.put_artifact("datasets/demo/v1", d, stage="prepare_data", spec_hash="h")
    with pytest.raises(IntegrityError, match="changed after"):
        lineage(store, model.uri)


def test_single_files_and_unsafe_manifests(store, s3_server, tmp_path):
    p = tmp_path / "one.bin"
    digest = write_random(p, 7 * MiB, seed=6)
    entry = store.put_file(p, "misc/one.bin")
    assert entry.sha256 == digest
    assert store.get_file(store.uri("misc/one.bin"), tmp_path / "back" / "one.bin").sha256 == digest
    assert sha(tmp_path / "back" / "one.bin") == digest
    with pytest.raises(StoreError, match="no object at"):
        store.get_file("misc/none.bin", tmp_path / "none.bin")
    with pytest.raises(StoreError, match="no artifact at"):
        store.get_artifact("runs/none/x", tmp_path / "x")

    bad = {"uri": store.uri("evil"), "stage": "x", "spec_hash": "h", "code_version": "0", "created_at": "t",
           "completed_at": "t", "files": [{"path": "../escape.txt", "size": 1, "sha256": "0" * 64}]}
    body = json.dumps(bad).encode()
    raw_client(store, s3_server.env()).put_object(store.bucket, "evil/manifest.json", io.BytesIO(body), len(body))
    with pytest.raises(IntegrityError, match="unsafe path"):
        store.get_artifact("evil", tmp_path / "evil" / "inside")
    assert not (tmp_path / "evil" / "escape.txt").exists()
    with pytest.raises(StoreError, match="secret key"):
        store.put_artifact("runs/x/y", tmp_path / "back", stage="x", spec_hash="h",
                           metadata={"oops": s3_server.secret_key})
