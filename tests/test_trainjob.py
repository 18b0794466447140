"""The trainjob launcher against a loopback stand-in for the Kubernetes API server.

The stand-in answers the few calls a TrainJob submission makes (create, get, list pods, pod log) and
records the raw traffic, so the tests see exactly what a real cluster would receive.
"""
from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob
from kubernetes import client

from conftest import with_demo
from ruyi_core.errors import RuyiError
from ruyi_core.megatron.trainjob import JOBSET_NAME_LABEL, job_name, run_trainjob, trainjob_body
from ruyi_core.spec import RunSpec

SENTINEL_SECRET = "sentinel-secret-8c1f2e"
SENTINEL_ACCESS = "sentinel-access-51d0aa"
NS = "ruyi-test"
TJ_PATH = f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{NS}/trainjobs"
POD = "cpt-job-node-0-0-abcde"


def _spec(**trainjob) -> RunSpec:
    tj = {"namespace": NS, "image": "registry.example/ruyi-trainer:test", "gpus_per_node": 4,
          "cpu": "8", "memory": "64Gi", **trainjob}
    dp = 2 * (tj["gpus_per_node"] or 1) // 2  # nodes x GPUs per node = tp x pp x dp
    return RunSpec.model_validate(with_demo({
        "store": {"endpoint": "seaweedfs.ruyi.svc:8333"},
        "pipeline": {"s3_secret": "my-s3-creds"},
        "train": {"launcher": "trainjob", "parallel": {"tp": 2, "nodes": 2, "dp": dp}, "trainjob": tj,
                  "cpt": {"global_batch_size": 8 * dp}, "sft": {"global_batch_size": 8 * dp}},
        "dae": {"enabled": False},
    }))


class FakeKube:
    """State and recorded traffic of the stand-in API server."""

    def __init__(self, outcome: str = "Complete", running_polls: int = 3, create_status: int = 201):
        self.outcome, self.running_polls, self.create_status = outcome, running_polls, create_status
        self.requests: list[dict] = []
        self.raw: list[bytes] = []
        self.job: dict | None = None
        self.gets = 0
        self.lock = threading.Lock()

    def log_text(self, timestamps: bool) -> str:
        # The log grows by one line per status poll; every read returns it all, as a wide
        # since_seconds window would, so the client must print only the new lines.
        n = min(self.gets, self.running_polls + 1)
        lines = [(f"2025-01-01T00:00:0{i}.5Z", f"step {i} loss {4.0 - i / 2:.2f}") for i in range(n)]
        lines.insert(1, ("2025-01-01T00:00:00.5Z", "same stamp twice"))  # equal stamps must both print once
        return "".join(f"{ts} {msg}\n" if timestamps else f"{msg}\n" for ts, msg in lines)

    def answer(self, method: str, url: str, body: dict | None) -> tuple[int, object]:
        u = urlparse(url)
        q = parse_qs(u.query)
        with self.lock:
            self.requests.append({"method": method, "path": u.path, "query": q, "body": body})
            if method == "POST" and u.path == TJ_PATH:
                if self.create_status != 201:
                    return self.create_status, _status(self.create_status, "denied by the stand-in")
                self.job = body
                return 201, body
            if method == "GET" and self.job and u.path == f"{TJ_PATH}/{self.job['metadata']['name']}":
                self.gets += 1
                conds = [{"type": "Created", "status": "True", "reason": "JobSetCreated", "message": "ok"}]
                if self.gets > self.running_polls:
                    conds.append({"type": self.outcome, "status": "True", "reason": f"Jobs{self.outcome}",
                                  "message": "jobset node failed: exit code 137 (OOMKilled)"
                                  if self.outcome == "Failed" else "jobset completed"})
                return 200, {**self.job, "status": {"conditions": conds}}
            if method == "GET" and u.path == f"/api/v1/namespaces/{NS}/pods":
                sel = q.get("labelSelector", [""])[0]
                return 200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [_pod(sel)]}
            if method == "GET" and u.path == f"/api/v1/namespaces/{NS}/pods/{POD}/log":
                return 200, self.log_text(q.get("timestamps", [""])[0].lower() == "true")  # Go ParseBool
            return 404, _status(404, f"{method} {u.path} not found")


def _status(code: int, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "code": code}


def _pod(selector: str) -> dict:
    jobset = selector.split(f"{JOBSET_NAME_LABEL}=", 1)[-1].split(",")[0]
    return {
        "metadata": {"name": POD, "namespace": NS, "creationTimestamp": "2025-01-01T00:00:00Z",
                     "labels": {JOBSET_NAME_LABEL: jobset, "jobset.sigs.k8s.io/replicatedjob-name": "node",
                                "batch.kubernetes.io/job-completion-index": "0"}},
        "spec": {"containers": [{"name": "node", "image": "x"}]},
        "status": {"phase": "Running"},
    }


def _handler(fake: FakeKube):
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):  # keep pytest output clean
            pass

        def _do(self):
            n = int(self.headers.get("Content-Length") or 0)
            data = self.rfile.read(n) if n else b""
            fake.raw.append(self.requestline.encode() + b"\n" + bytes(self.headers) + data)
            code, payload = fake.answer(self.command, self.path, json.loads(data) if data else None)
            out = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain" if isinstance(payload, str) else "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _do

    return H


@pytest.fixture
def kube(request):
    """(fake, api_client) with the stand-in server running; FakeKube kwargs via indirect params."""
    fake = FakeKube(**getattr(request, "param", {}))
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    t.start()
    api = client.ApiClient(client.Configuration(host=f"http://127.0.0.1:{srv.server_address[1]}"))
    yield fake, api
    api.close()
    srv.shutdown()
    srv.server_close()


@pytest.fixture(autouse=True)
def _sentinel_creds(monkeypatch):
    monkeypatch.setenv("RUYI_S3_SECRET_KEY", SENTINEL_SECRET)
    monkeypatch.setenv("RUYI_S3_ACCESS_KEY", SENTINEL_ACCESS)


def _strip_none(x):
    if isinstance(x, dict):
        return {k: _strip_none(v) for k, v in x.items() if v is not None}
    if isinstance(x, list):
        return [_strip_none(v) for v in x]
    return x


def _typed_roundtrip(body: dict) -> dict:
    return _strip_none(TrainerV1alpha1TrainJob.from_dict(body).to_dict())


def test_submit_body_is_a_valid_trainjob_and_completes(kube):
    fake, api = kube
    spec = _spec()
    lines: list[str] = []
    run_trainjob(spec, "cpt", "Ruyi CPT_run", ["--stage", "cpt", "--spec", "s3://ruyi/spec.yaml"],
                 api_client=api, log=lines.append, poll_s=0.05, timeout_s=10)  # past timeout_s it would raise

    posts = [r for r in fake.requests if r["method"] == "POST"]
    assert len(posts) == 1 and posts[0]["path"] == TJ_PATH
    body = posts[0]["body"]
    assert body == trainjob_body(spec, "cpt", "Ruyi CPT_run", ["--stage", "cpt", "--spec", "s3://ruyi/spec.yaml"])
    # Every field is known to the SDK's typed model (unknown ones would vanish in the round trip) ...
    assert _typed_roundtrip(body) == _strip_none(body)
    # ... and the check has teeth: a misspelt field does not survive it.
    typo = json.loads(json.dumps(body))
    typo["spec"]["trainer"]["numProcsPerNode"] = typo["spec"]["trainer"].pop("numProcPerNode")
    assert _typed_roundtrip(typo) != _strip_none(typo)

    assert body["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and body["kind"] == "TrainJob"
    meta = body["metadata"]
    assert meta["name"] == job_name("Ruyi CPT_run") == "ruyi-cpt-run" and meta["namespace"] == NS
    assert meta["labels"] == {"app.kubernetes.io/part-of": "ruyi-flow", "ruyi-flow/stage": "cpt"}
    assert body["spec"]["runtimeRef"] == {"name": "ruyi-megatron", "kind": "ClusterTrainingRuntime",
                                          "apiGroup": "trainer.kubeflow.org"}
    tr = body["spec"]["trainer"]
    assert tr["image"] == "registry.example/ruyi-trainer:test"
    assert tr["numNodes"] == 2 and tr["numProcPerNode"] == 4
    assert tr["command"] == ["torchrun", "-m", "ruyi_core.megatron.trainer"]
    assert tr["args"] == ["--stage", "cpt", "--spec", "s3://ruyi/spec.yaml"]
    for part in ("requests", "limits"):
        assert tr["resourcesPerNode"][part] == {"nvidia.com/gpu": "4", "cpu": "8", "memory": "64Gi"}
    env = {e["name"]: e for e in tr["env"]}
    assert env["RUYI_S3_ENDPOINT"] == {"name": "RUYI_S3_ENDPOINT", "value": "seaweedfs.ruyi.svc:8333"}
    for var, key in (("RUYI_S3_ACCESS_KEY", "access_key"), ("RUYI_S3_SECRET_KEY", "secret_key")):
        assert env[var] == {"name": var, "valueFrom": {"secretKeyRef": {"name": "my-s3-creds", "key": key}}}
    assert env["HF_HUB_OFFLINE"]["value"] == "1"

    traffic = b"\n".join(fake.raw)
    assert SENTINEL_SECRET.encode() not in traffic and SENTINEL_ACCESS.encode() not in traffic
    assert not any(SENTINEL_SECRET in ln or SENTINEL_ACCESS in ln for ln in lines)

    # Pods are found by the JobSet label Trainer v2 puts on them; each log line is streamed exactly once.
    pod_lists = [r for r in fake.requests if r["path"].endswith("/pods")]
    assert pod_lists and pod_lists[0]["query"]["labelSelector"] == [f"{JOBSET_NAME_LABEL}=ruyi-cpt-run"]
    logs = [r for r in fake.requests if r["path"].endswith("/log")]
    assert logs and all(r["query"]["timestamps"][0].lower() == "true" for r in logs)
    streamed = [ln for ln in lines if ln.startswith(("step ", "same stamp"))]
    assert streamed == ["step 0 loss 4.00", "same stamp twice", "step 1 loss 3.50", "step 2 loss 3.00",
                        "step 3 loss 2.50"]
    assert lines[-1].endswith("complete")


def test_cpu_only_job_requests_no_gpus():
    body = trainjob_body(_spec(gpus_per_node=0), "sft", "sft", [])
    tr = body["spec"]["trainer"]
    assert tr["numProcPerNode"] == 1 and "nvidia.com/gpu" not in tr["resourcesPerNode"]["limits"]
    assert _typed_roundtrip(body) == _strip_none(body)


def test_grpo_runs_as_a_trainjob_of_its_own_workers():
    """GRPO on the cluster: the same TrainJob, running the GRPO worker on one node, a process per GPU of the
    `grpo` step's resources (not the trainer's layout)."""
    from ruyi_core.megatron.trainjob import grpo_workers

    base = _spec().model_dump()
    base["pipeline"]["resources"] = {"grpo": {"cpu": "16", "memory": "200Gi", "gpus": 8}}
    spec = RunSpec.model_validate(base)
    tr = trainjob_body(spec, "grpo", "grpo", ["--inputs", "s3://ruyi/x"], grpo_workers(spec))["spec"]["trainer"]
    assert tr["command"] == ["torchrun", "-m", "ruyi_core.rl.worker"] and tr["args"] == ["--inputs", "s3://ruyi/x"]
    assert (tr["numNodes"], tr["numProcPerNode"]) == (1, 8)
    assert tr["resourcesPerNode"]["limits"] == {"cpu": "16", "memory": "200Gi", "nvidia.com/gpu": "8"}
    assert trainjob_body(spec, "cpt", "cpt", [])["spec"]["trainer"]["command"][-1] == "ruyi_core.megatron.trainer"


def test_long_or_odd_names_become_valid_labels():
    long = job_name("Ruyi/CPT " + "x" * 100)
    assert len(long) <= 63 and long[0].isalpha() and long == job_name("Ruyi/CPT " + "x" * 100)
    assert long != job_name("Ruyi/CPT " + "x" * 101)  # truncated names stay distinct
    assert job_name("7b_cpt") == "r-7b-cpt"


@pytest.mark.parametrize("kube", [{"outcome": "Failed", "running_polls": 1}], indirect=True)
def test_failed_condition_raises_one_line(kube):
    _, api = kube
    lines: list[str] = []
    with pytest.raises(RuyiError) as e:
        run_trainjob(_spec(), "cpt", "cpt-fails", ["--stage", "cpt"], api_client=api, log=lines.append,
                     poll_s=0.05, timeout_s=10)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"{NS}/cpt-fails" in msg and "exit code 137 (OOMKilled)" in msg
    assert f"kubectl -n {NS} describe trainjob cpt-fails" in msg
    assert "step 0 loss 4.00" in lines  # the log streamed before the failure was reported


@pytest.mark.parametrize("kube", [{"running_polls": 10_000}], indirect=True)
def test_timeout_raises_one_line(kube):
    _, api = kube
    with pytest.raises(RuyiError, match=r"did not finish within 0.3s") as e:
        run_trainjob(_spec(), "cpt", "slow", [], api_client=api, log=lambda s: None, poll_s=0.05,
                     timeout_s=0.3)
    assert "\n" not in str(e.value) and "delete trainjob slow" in str(e.value)


@pytest.mark.parametrize("kube", [{"create_status": 409, "running_polls": 0}], indirect=True)
def test_conflict_attaches_to_the_existing_job(kube):
    fake, api = kube
    fake.job = trainjob_body(_spec(), "cpt", "again", ["--stage", "cpt"])  # what a first attempt created
    lines: list[str] = []
    run_trainjob(_spec(), "cpt", "again", ["--stage", "cpt"], api_client=api, log=lines.append, poll_s=0.05,
                 timeout_s=10)
    assert any("attaching" in ln for ln in lines) and lines[-1].endswith("complete")
    with pytest.raises(RuyiError, match="different TrainJob .*delete trainjob again"):
        run_trainjob(_spec(), "cpt", "again", ["--stage", "sft"], api_client=api, log=lambda s: None,
                     poll_s=0.05, timeout_s=10)


@pytest.mark.parametrize("kube", [{"create_status": 403}], indirect=True)
def test_forbidden_names_the_server_and_the_fix(kube):
    _, api = kube
    with pytest.raises(RuyiError, match=r"forbids creating TrainJob .*403: denied by the stand-in.*grant") as e:
        run_trainjob(_spec(), "cpt", "x", [], api_client=api, log=lambda s: None, poll_s=0.05, timeout_s=10)
    assert api.configuration.host in str(e.value) and "\n" not in str(e.value)


def test_unreachable_api_server_fails_fast():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    api = client.ApiClient(client.Configuration(host=f"http://127.0.0.1:{port}"))
    with pytest.raises(RuyiError) as e:
        run_trainjob(_spec(), "cpt", "x", [], api_client=api, log=lambda s: None, poll_s=0.05, timeout_s=10)
    api.close()
    msg = str(e.value)  # the first refused connection names the server; a wait until timeout_s would say so
    assert "\n" not in msg and f"127.0.0.1:{port}" in msg and msg.startswith("cannot reach the Kubernetes API")


def test_indivisible_parallelism_is_caught_before_submitting():
    spec = _spec(gpus_per_node=3)  # 2 nodes x 3 = 6 processes, tp*pp = 2 divides; tp 4 would not
    trainjob_body(spec, "cpt", "ok", [])
    bad = spec.model_copy(update={"train": spec.train.model_copy(
        update={"parallel": spec.train.parallel.model_copy(update={"tp": 4})})})
    with pytest.raises(RuyiError, match="tp\\*pp = 4 does not divide"):
        trainjob_body(bad, "cpt", "bad", [])
