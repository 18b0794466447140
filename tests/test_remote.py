"""pipelines.remote against a loopback stand-in for the KFP API server (the v2beta1 REST endpoints that
kfp.Client 2.17 calls), with the real kfp.Client: what upload, run and schedule send, and how failures read."""
from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import socket
import subprocess
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from pipelines import remote
from ruyi_core.errors import RuyiError

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "specs" / "tiny.yaml"
SENTINEL = "s3-secret-sentinel-7f3a91c2"  # must never leave this process
API = "/apis/v2beta1"


class FakeKFP:
    """State and request log of the stand-in server. `token`: require this bearer token (else 401)."""

    def __init__(self, token: str | None = None):
        self.token = token
        self.requests: list[dict] = []
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, list[dict]] = {}
        self.experiments: list[dict] = []
        self.runs: list[dict] = []
        self.recurring: list[dict] = []
        self.ids = itertools.count(1)
        self.clock = itertools.count(1)

    def _id(self, kind: str) -> str:
        return f"{kind}-{next(self.ids)}"

    def _stamp(self) -> str:
        return f"2030-01-01T00:00:{next(self.clock):02d}Z"

    def add_pipeline(self, name: str, versions: list[str]) -> str:
        pid = self._id("pipeline")
        self.pipelines[pid] = {"pipeline_id": pid, "display_name": name, "name": name}
        self.versions[pid] = []
        for v in versions:
            self._add_version(pid, v, "", b"")
        return pid

    def _add_version(self, pid: str, name: str, description: str, package: bytes) -> dict:
        v = {"pipeline_id": pid, "pipeline_version_id": self._id("version"), "display_name": name, "name": name,
             "description": description, "created_at": self._stamp()}
        self.versions[pid].append(v)
        self.package = package
        return v

    @staticmethod
    def _match(items: list[dict], query: dict) -> list[dict]:
        if "filter" not in query:
            return items
        (pred,) = json.loads(query["filter"])["predicates"]
        return [i for i in items if i.get(pred["key"]) == pred["stringValue"]]

    def answer(self, method: str, path: str, query: dict, body: bytes, ctype: str) -> tuple[int, dict]:
        if path == f"{API}/healthz":
            return 200, {"multi_user": False}
        if path == f"{API}/pipelines" and method == "GET":
            found = self._match(list(self.pipelines.values()), query)
            return 200, {"pipelines": found, "total_size": len(found)} if found else {}
        if path == f"{API}/pipelines" and method == "POST":
            p = json.loads(body)
            pid = self._id("pipeline")
            self.pipelines[pid] = {**p, "pipeline_id": pid, "created_at": self._stamp()}
            self.versions[pid] = []
            return 200, self.pipelines[pid]
        if path == f"{API}/pipelines/upload_version" and method == "POST":
            pid = query["pipelineid"]
            if pid not in self.pipelines:
                return 404, {"message": "no such pipeline"}
            files = _multipart(body, ctype)
            return 200, self._add_version(pid, query["name"], query.get("description", ""), files["uploadfile"])
        if path.startswith(f"{API}/pipelines/") and path.endswith("/versions") and method == "GET":
            found = self._match(self.versions[path.split("/")[4]], query)
            if query.get("sort_by") == "created_at desc":
                found = sorted(found, key=lambda v: v["created_at"], reverse=True)
            found = found[: int(query.get("page_size", 10))]
            return 200, {"pipeline_versions": found, "total_size": len(found)} if found else {}
        if path == f"{API}/experiments" and method == "GET":
            found = self._match(self.experiments, query)
            return 200, {"experiments": found, "total_size": len(found)} if found else {}
        if path == f"{API}/experiments" and method == "POST":
            self.experiments.append({**json.loads(body), "experiment_id": self._id("experiment")})
            return 200, self.experiments[-1]
        if path == f"{API}/runs" and method == "POST":
            self.runs.append({**json.loads(body), "run_id": self._id("run"), "state": "PENDING"})
            return 200, self.runs[-1]
        if path == f"{API}/recurringruns" and method == "GET":
            found = [r for r in self._match(self.recurring, query)
                     if r["experiment_id"] == query.get("experiment_id", r["experiment_id"])]
            # sic: this one proto field is camelCase on the wire (kfp_server_api maps it the same way)
            return 200, {"recurringRuns": found, "total_size": len(found)} if found else {}
        if path == f"{API}/recurringruns" and method == "POST":
            self.recurring.append({**json.loads(body), "recurring_run_id": self._id("recurring")})
            return 200, self.recurring[-1]
        return 404, {"message": f"stand-in has no {method} {path}"}


def _multipart(body: bytes, ctype: str) -> dict[str, bytes]:
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {ctype}\r\n\r\n".encode() + body)
    return {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
            for part in msg.iter_parts()}


def _handler(fake: FakeKFP):
    class Handler(BaseHTTPRequestHandler):
        def _serve(self):
            url = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            fake.requests.append({"method": self.command, "path": url.path, "query": query,
                                  "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
            if fake.token and self.headers.get("Authorization") != f"Bearer {fake.token}":
                code, payload = 401, {"message": "Unauthorized"}
            else:
                code, payload = fake.answer(self.command, url.path, query, body,
                                            self.headers.get("Content-Type", ""))
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _serve

        def log_message(self, *args):
            pass

    return Handler


@pytest.fixture
def kfp_server(monkeypatch):
    """Start a stand-in on 127.0.0.1; yields (fake, host). The S3 secret in the environment is a sentinel."""
    monkeypatch.setenv("RUYI_S3_ACCESS_KEY", "s3-access-sentinel")
    monkeypatch.setenv("RUYI_S3_SECRET_KEY", SENTINEL)
    for var in (remote.TOKEN_ENV, remote.COOKIES_ENV):
        monkeypatch.delenv(var, raising=False)
    servers = []

    def start(token: str | None = None):
        fake = FakeKFP(token)
        srv = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return fake, f"http://127.0.0.1:{srv.server_address[1]}"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _posts(fake: FakeKFP, path: str) -> list[dict]:
    return [r for r in fake.requests if r["method"] == "POST" and r["path"] == f"{API}{path}"]


def _assert_no_secret(fake: FakeKFP) -> None:
    for r in fake.requests:
        blob = json.dumps({k: v for k, v in r.items() if k != "body"}).encode() + r["body"]
        assert SENTINEL.encode() not in blob and b"s3-access-sentinel" not in blob, r["path"]


def _git_sha() -> str:
    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else "dev"


# --- upload ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_upload_creates_the_pipeline_then_adds_versions(kfp_server, tmp_path):
    from pipelines.run import compile_pipeline
    from ruyi_core import __version__

    fake, host = kfp_server()
    expected = compile_pipeline(SPEC, tmp_path / "expected.yaml").read_bytes()
    first = remote.upload(SPEC, host)

    (create,) = _posts(fake, "/pipelines")
    assert json.loads(create["body"])["display_name"] == "ruyi-flow"
    (up,) = _posts(fake, "/pipelines/upload_version")
    version_name = f"{__version__}-{_git_sha()}"
    assert up["query"]["name"] == version_name and up["query"]["pipelineid"] == first["pipeline_id"]
    assert _multipart(up["body"], up["headers"]["content-type"])["uploadfile"] == expected  # our compiled YAML
    assert first["created_pipeline"] and first["created_version"] and first["version_name"] == version_name
    assert first["version_id"] == fake.versions[first["pipeline_id"]][0]["pipeline_version_id"]
    assert first["url"] == f"{host}/#/pipelines/details/{first['pipeline_id']}/version/{first['version_id']}"
    assert first["warnings"] and "loopback" in first["warnings"][0]  # tiny.yaml's store is 127.0.0.1

    # The same package again: nothing new is uploaded.
    again = remote.upload(SPEC, host)
    assert not again["created_pipeline"] and not again["created_version"]
    assert again["version_id"] == first["version_id"] and len(_posts(fake, "/pipelines/upload_version")) == 1

    # Other content (here: another spec) under the same code: a new version, told apart by its package hash.
    other = tmp_path / "other.yaml"
    other.write_text(SPEC.read_text().replace("seed: 0", "seed: 1") + "store: {endpoint: minio.s3:9000}\n")
    changed = remote.upload(other, host)
    assert changed["version_name"].startswith(version_name + "-") and changed["created_version"]
    assert not changed["warnings"]

    # An explicit version name; taking it again with other content is refused in one line.
    named = remote.upload(SPEC, host, version="v1-test")
    assert named["version_name"] == "v1-test" and len(fake.versions[first["pipeline_id"]]) == 3
    with pytest.raises(RuyiError, match="already has a version named 'v1-test'") as e:
        remote.upload(other, host, version="v1-test")
    assert "\n" not in str(e.value) and len(fake.pipelines) == 1
    _assert_no_secret(fake)
    # The package names the S3 Secret and its keys for every step; the values stay in the cluster.
    executors = list(yaml.safe_load_all(expected))[-1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name, ex in executors.items():
        (ref,) = ex["secretAsEnv"]
        assert ref["secretName"] == "ruyi-s3", name
        assert {k["secretKey"] for k in ref["keyToEnv"]} == {"access_key", "secret_key"}, name


# --- run and schedule -----------------------------------------------------------------------------------
def test_run_starts_the_latest_version_in_the_experiment(kfp_server):
    fake, host = kfp_server()
    pid = fake.add_pipeline("ruyi-flow", ["0.1.0-aaaaaaa", "0.1.0-bbbbbbb"])
    latest = fake.versions[pid][-1]
    out = remote.run(SPEC, host)

    (exp,) = _posts(fake, "/experiments")
    assert json.loads(exp["body"])["display_name"] == "ruyi-flow"
    (req,) = _posts(fake, "/runs")
    body = json.loads(req["body"])
    assert body["pipeline_version_reference"] == {"pipeline_id": pid,
                                                  "pipeline_version_id": latest["pipeline_version_id"]}
    assert body["experiment_id"] == fake.experiments[0]["experiment_id"]
    assert body["display_name"].startswith("ruyi-tiny ") and "pipeline_spec" not in body
    assert out["run_id"] == fake.runs[0]["run_id"] and out["version_name"] == "0.1.0-bbbbbbb"
    assert out["url"] == f"{host}/#/runs/details/{out['run_id']}"

    remote.run(SPEC, host, experiment="ruyi-flow")  # the experiment is reused, not created again
    assert len(_posts(fake, "/experiments")) == 1 and len(fake.runs) == 2
    _assert_no_secret(fake)


def test_run_without_an_uploaded_pipeline_says_upload_first(kfp_server):
    fake, host = kfp_server()
    with pytest.raises(RuyiError, match="no pipeline named 'ruyi-flow'.*ruyi pipeline upload"):
        remote.run(SPEC, host)
    assert not _posts(fake, "/runs")


def test_schedule_creates_a_recurring_run_with_a_six_field_cron(kfp_server):
    fake, host = kfp_server()
    pid = fake.add_pipeline("ruyi-flow", ["0.1.0-aaaaaaa"])
    out = remote.schedule(SPEC, host, "30 2 * * mon-fri")

    (req,) = _posts(fake, "/recurringruns")
    body = json.loads(req["body"])
    assert body["trigger"] == {"cron_schedule": {"cron": "0 30 2 * * mon-fri"}}
    assert body["mode"] == "ENABLE" and body["no_catchup"] is True and int(body["max_concurrency"]) == 1
    assert body["pipeline_version_reference"] == {"pipeline_id": pid,
                                                  "pipeline_version_id": fake.versions[pid][0]["pipeline_version_id"]}
    assert body["display_name"] == "ruyi-flow ruyi-tiny" and out["cron"] == "0 30 2 * * mon-fri"
    assert out["recurring_run_id"] == fake.recurring[0]["recurring_run_id"]

    # A second schedule under the same name would train twice: refused, nothing created.
    with pytest.raises(RuyiError, match="already has a recurring run named 'ruyi-flow ruyi-tiny'"):
        remote.schedule(SPEC, host, "0 4 * * *")
    out2 = remote.schedule(SPEC, host, "0 0 4 * * *", name="nightly")  # 6 fields pass through
    assert out2["cron"] == "0 0 4 * * *" and len(fake.recurring) == 2
    _assert_no_secret(fake)


@pytest.mark.parametrize("cron,problem", [
    ("* * *", "has 3 fields"), ("61 * * * *", "minute field '61'"), ("0 25 * * *", "hour field '25'"),
    ("0 3 * * 1-9", "day of week field '1-9'"), ("0 3 * * 7", "day of week field '7'"),
    ("*/0 * * * *", "minute field '\\*/0'"),
])
def test_bad_cron_is_one_line_and_sends_nothing(kfp_server, cron, problem):
    fake, host = kfp_server()
    with pytest.raises(RuyiError, match=problem) as e:
        remote.schedule(SPEC, host, cron)
    assert "\n" not in str(e.value) and not fake.requests


# --- failures -------------------------------------------------------------------------------------------
def test_unreachable_host_is_one_line_naming_the_fix():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    for call in (lambda h: remote.run(SPEC, h), lambda h: remote.upload(SPEC, h)):
        with pytest.raises(RuyiError) as e:
            call(f"127.0.0.1:{port}")
        msg = str(e.value)
        assert "\n" not in msg and f"cannot reach Kubeflow Pipelines at http://127.0.0.1:{port}" in msg
        assert "port-forward" in msg


def test_rejected_credentials_say_how_to_authenticate(kfp_server, monkeypatch):
    fake, host = kfp_server(token="kfp-token-123")
    with pytest.raises(RuyiError, match=r"rejected our credentials .*401.*RUYI_KFP_TOKEN") as e:
        remote.run(SPEC, host)
    assert "\n" not in str(e.value)
    monkeypatch.setenv(remote.TOKEN_ENV, "kfp-token-123")
    fake.add_pipeline("ruyi-flow", ["0.1.0-aaaaaaa"])
    assert remote.run(SPEC, host)["run_id"]
    assert fake.requests[-1]["headers"]["authorization"] == "Bearer kfp-token-123"
