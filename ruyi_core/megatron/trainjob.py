"""The `trainjob` launcher: run one training stage as a Kubeflow Trainer v2 TrainJob and follow it.

`trainjob_body` builds the custom object (field names checked against the kubeflow SDK's typed models,
`kubeflow_trainer_api.TrainerV1alpha1TrainJob`); `run_trainjob` submits it with the plain kubernetes
client, polls its conditions and streams the node-0 trainer pod's log until it completes or fails.
Credentials only ever travel as Secret references; every failure is one RuyiError line with the fix.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

from ruyi_core.errors import RuyiError
from ruyi_core.spec import RunSpec

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
PLURAL = "trainjobs"
# Trainer v2 makes a JobSet named after the TrainJob; these are the labels its pods carry (the SDK's
# TrainerClient selects on the same ones, see kubeflow.trainer.constants).
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
RJOB_NAME_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
JOB_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
NODE = "node"  # Trainer v2's replicated job (and container) name for the training nodes
# Workers run as `torchrun -m MODULE`: torchrun reads the PET_* variables Kubeflow Trainer injects (nodes, procs
# per node, rank, master).
TRAINER = "ruyi_core.megatron.trainer"
# JobSet derives pod hostnames "<name>-node-<job>-<index>" that must stay DNS labels (<= 63 chars),
# so the TrainJob name keeps room for that suffix.
MAX_NAME = 48
REQUEST_TIMEOUT = (10, 60)  # (connect, read) seconds per API call: a dead server fails fast
TRANSIENT_GRACE_S = 300.0  # ride out API-server restarts this long while polling a running job


def job_name(name: str) -> str:
    """A valid TrainJob name: lowercase RFC 1035 label (JobSet also names a Service after it, so it
    must start with a letter), at most MAX_NAME chars; a hash of the original keeps truncations unique."""
    s = re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]+", "-", name.lower())).strip("-")
    if not s or not s[0].isalpha():
        s = ("r-" + s).rstrip("-")
    if len(s) > MAX_NAME:
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        s = s[: MAX_NAME - 9].rstrip("-") + "-" + digest
    return s


def _label_value(v: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", v)[:63].strip("-_.")


@dataclass(frozen=True)
class Workers:
    """What a TrainJob runs: a module under torchrun, on `nodes` x `procs` processes with these resources."""

    module: str
    nodes: int
    procs: int
    gpus: int
    cpu: str
    memory: str


def trainer_workers(spec: RunSpec) -> Workers:
    """The megatron trainer over the spec's parallel layout and the TrainJob's nodes."""
    tj, par = spec.train.trainjob, spec.train.parallel
    procs = tj.gpus_per_node if tj.gpus_per_node > 0 else 1
    world = par.nodes * procs
    if world % (par.tp * par.pp):
        # Megatron needs the world size divisible by tp * pp: catch it before GPUs are allocated.
        raise RuyiError(
            f"train.parallel: tp*pp = {par.tp * par.pp} does not divide the TrainJob's {world} processes "
            f"(nodes {par.nodes} x {procs} per node): change train.parallel or train.trainjob.gpus_per_node"
        )
    return Workers(TRAINER, par.nodes, procs, tj.gpus_per_node, tj.cpu, tj.memory)


def grpo_workers(spec: RunSpec) -> Workers:
    """GRPO's worker on one node, a process per GPU of the `grpo` step's resources (TRL shards generation)."""
    r = spec.pipeline.resources_for("grpo")
    return Workers("ruyi_core.rl.worker", 1, max(1, r.gpus), r.gpus, r.cpu, r.memory)


def trainjob_body(spec: RunSpec, stage: str, name: str, args: list[str], workers: Workers | None = None) -> dict:
    """The TrainJob custom object for one stage (a plain dict, ready for the API server); by default it runs
    the megatron trainer."""
    tj = spec.train.trainjob
    w = workers or trainer_workers(spec)
    amounts = {"cpu": w.cpu, "memory": w.memory}
    if w.gpus > 0:
        amounts["nvidia.com/gpu"] = str(w.gpus)
    secret = spec.pipeline.s3_secret
    env = [
        {"name": "RUYI_S3_ENDPOINT", "value": spec.store.endpoint},
        {"name": "RUYI_S3_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": secret, "key": "access_key"}}},
        {"name": "RUYI_S3_SECRET_KEY", "valueFrom": {"secretKeyRef": {"name": secret, "key": "secret_key"}}},
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "HF_DATASETS_OFFLINE", "value": "1"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},  # lines reach the pod log (and us) as they are printed
    ]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": {
            "name": job_name(name),
            "namespace": tj.namespace,
            "labels": {"app.kubernetes.io/part-of": "ruyi-flow", "ruyi-flow/stage": _label_value(stage)},
        },
        "spec": {
            "runtimeRef": {"name": tj.runtime, "kind": "ClusterTrainingRuntime", "apiGroup": GROUP},
            "trainer": {
                "image": tj.image,
                "command": ["torchrun", "-m", w.module],
                "args": [str(a) for a in args],
                "numNodes": w.nodes,
                "numProcPerNode": w.procs,
                "resourcesPerNode": {"requests": dict(amounts), "limits": dict(amounts)},
                "env": env,
            },
        },
    }


def run_trainjob(spec: RunSpec, stage: str, name: str, args: list[str], *, api_client=None,
                 log: Callable[[str], Any] = print, poll_s: float | None = None,
                 timeout_s: float | None = None, workers: Workers | None = None) -> None:
    """Submit the stage's TrainJob (or attach to one already there) and block until it completes."""
    from kubernetes import client

    body = trainjob_body(spec, stage, name, args, workers)
    own_client = api_client is None
    api_client = api_client or _default_api_client()
    try:
        watch = _Watch(client, api_client, body, log)
        watch.submit()
        watch.follow(poll_s or spec.train.trainjob.poll_s, timeout_s or spec.train.trainjob.timeout_s)
    finally:
        if own_client:
            api_client.close()


def _default_api_client():
    """In-cluster service account first (a pipeline step), else the user's kubeconfig."""
    from kubernetes import client, config

    cfg = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=cfg)
    except config.ConfigException:
        try:
            config.load_kube_config(client_configuration=cfg, persist_config=False)
        except (config.ConfigException, OSError) as e:
            raise RuyiError(
                f"no Kubernetes configuration: not running in a cluster and no usable kubeconfig "
                f"({_one_line(str(e))}): set KUBECONFIG or run `ruyi` inside the cluster"
            ) from None
    cfg.retries = 1  # urllib3 would try a blackholed server 4 times x the connect timeout
    return client.ApiClient(cfg)


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _server_message(exc) -> str:
    """The Status message the API server put in an error body, else the HTTP reason."""
    try:
        return _one_line(json.loads(exc.body).get("message") or exc.reason)
    except (TypeError, ValueError, AttributeError):
        return _one_line(exc.reason or "")


def _is_network(exc: BaseException) -> bool:
    """urllib3 connection/timeout errors and socket errors: the server was not reached (or went away)."""
    return isinstance(exc, OSError) or type(exc).__module__.startswith("urllib3")


def _is_transient(exc: BaseException | None) -> bool:
    status = getattr(exc, "status", None)
    return exc is not None and (_is_network(exc) or status == 429 or (status or 0) >= 500)


def _ts_key(stamp: str) -> tuple[str, int] | None:
    """Order key of a kubelet RFC 3339 (nano) UTC timestamp, e.g. 2024-05-01T10:00:00.123456789Z."""
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z", stamp)
    return (m.group(1), int((m.group(2) or "").ljust(9, "0"))) if m else None


class _Watch:
    """One submitted TrainJob: status polling and incremental log streaming (state lives here only)."""

    def __init__(self, client, api_client, body: dict, log):
        self.api = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.ApiException = client.exceptions.ApiException
        self.host = api_client.configuration.host
        self.body = body
        self.ns = body["metadata"]["namespace"]
        self.name = body["metadata"]["name"]
        self.log = log
        self.describe = f"kubectl -n {self.ns} describe trainjob {self.name}"
        self.pod: str | None = None  # node-0 pod whose log we follow
        self.cursor: tuple[tuple[str, int] | None, int] = (None, 0)  # (last timestamp, lines printed at it)
        self.read_at = 0.0  # monotonic time of the last successful log read
        self.logs_ok = True

    # --- API errors -> one line -------------------------------------------------------------------
    def _error(self, exc: BaseException, what: str) -> RuyiError:
        if isinstance(exc, self.ApiException) and exc.status:
            msg, code = _server_message(exc), exc.status
            if code == 401:
                return RuyiError(f"the Kubernetes API server {self.host} rejected our credentials while {what} "
                                 f"(401 Unauthorized): refresh the kubeconfig or service-account token")
            if code == 403:
                return RuyiError(f"the Kubernetes API server {self.host} forbids {what} (403: {msg}): grant "
                                 f"create/get on trainjobs.{GROUP} and get/list on pods, pods/log in "
                                 f"namespace {self.ns}")
            if code == 404 and what.startswith("creating"):
                return RuyiError(f"the Kubernetes API server {self.host} has no {PLURAL}.{GROUP}/{VERSION} in "
                                 f"namespace {self.ns} (404: {msg}): install Kubeflow Trainer v2 and create the "
                                 f"namespace, or set train.trainjob.namespace")
            if code in (400, 422):
                return RuyiError(f"the Kubernetes API server {self.host} rejected TrainJob {self.ns}/{self.name} "
                                 f"({code}: {msg}): check train.trainjob (runtime {self.body['spec']['runtimeRef']['name']!r} "
                                 f"must exist as a ClusterTrainingRuntime)")
            return RuyiError(f"the Kubernetes API server {self.host} answered {code} while {what} ({msg}): "
                             f"check the cluster, then `{self.describe}`")
        reason = getattr(exc, "reason", None) or exc  # urllib3's MaxRetryError wraps the socket error
        cause = _one_line(str(reason))
        for sep in (">: ", "): "):  # drop urllib3's "HTTPConnection(host=..., port=...): " prefix
            if sep in cause:
                cause = cause.split(sep, 1)[1]
                break
        return RuyiError(f"cannot reach the Kubernetes API server {self.host} while {what} "
                         f"({cause}): check the kubeconfig / in-cluster network")

    def _call(self, what: str, fn, *a, **kw):
        try:
            return fn(*a, _request_timeout=REQUEST_TIMEOUT, **kw)
        except Exception as e:
            if isinstance(e, self.ApiException) or _is_network(e):
                raise self._error(e, what) from e
            raise

    # --- submit ----------------------------------------------------------------------------------
    def submit(self) -> None:
        what = f"creating TrainJob {self.ns}/{self.name}"
        try:
            self._call(what, self.api.create_namespaced_custom_object, GROUP, VERSION, self.ns, PLURAL, self.body)
            self.log(f"trainjob {self.name}: submitted to {self.ns} (runtime {self.body['spec']['runtimeRef']['name']})")
            return
        except RuyiError as e:
            if getattr(e.__cause__, "status", None) != 409:
                raise
        # 409: a retried step finds its own job; attach unless it runs something else under our name.
        have = self._get()
        want_t, have_t = self.body["spec"]["trainer"], (have.get("spec") or {}).get("trainer") or {}
        if any(have_t.get(k) != want_t[k] for k in ("image", "command", "args")):
            raise RuyiError(f"a different TrainJob {self.ns}/{self.name} already exists (other image or args): "
                            f"delete it with `kubectl -n {self.ns} delete trainjob {self.name}` and rerun")
        self.log(f"trainjob {self.name}: already exists in {self.ns}; attaching to it")

    def _get(self) -> dict:
        return self._call(f"reading TrainJob {self.ns}/{self.name}", self.api.get_namespaced_custom_object,
                          GROUP, VERSION, self.ns, PLURAL, self.name)

    # --- follow ----------------------------------------------------------------------------------
    def follow(self, poll_s: float, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        failing_since: float | None = None
        seen: tuple = ()
        while True:
            try:
                job = self._get()
                failing_since = None
            except RuyiError as e:
                # 401/403/404 will not heal; connection drops and 5xx may (API-server restart): wait a while.
                now = time.monotonic()
                failing_since = failing_since or now
                if not _is_transient(e.__cause__) or now - failing_since > TRANSIENT_GRACE_S or now > deadline:
                    raise
                time.sleep(poll_s)
                continue
            conds = {c.get("type"): c for c in ((job.get("status") or {}).get("conditions") or [])
                     if c.get("status") == "True"}
            state = tuple(sorted(t for t in conds if t))
            if state != seen:
                seen = state
                self.log(f"trainjob {self.name}: {', '.join(state) or 'active'}")
            self._stream_logs()
            if "Failed" in conds:
                c = conds["Failed"]
                why = _one_line(f"{c.get('reason') or 'Failed'}: {c.get('message') or 'no message'}")
                raise RuyiError(f"TrainJob {self.ns}/{self.name} failed ({why}): see `{self.describe}` and "
                                f"`kubectl -n {self.ns} logs -l {JOBSET_NAME_LABEL}={self.name}`")
            if "Complete" in conds:
                self.log(f"trainjob {self.name}: complete")
                return
            if time.monotonic() > deadline:
                raise RuyiError(f"TrainJob {self.ns}/{self.name} did not finish within {timeout_s:g}s (state: "
                                f"{', '.join(state) or 'no conditions'}): it may still run; inspect with "
                                f"`{self.describe}` or stop it with `kubectl -n {self.ns} delete trainjob {self.name}`")
            time.sleep(poll_s)

    def _node0_pod(self) -> tuple[str, str | None] | None:
        """(pod, container) of the newest node-0 pod that has started, else None."""
        pods = self.core.list_namespaced_pod(self.ns, label_selector=f"{JOBSET_NAME_LABEL}={self.name}",
                                             _request_timeout=REQUEST_TIMEOUT).items
        # Prefer Trainer's replicated job "node"; fall back to any index-0 pod for runtimes that name it otherwise.
        idx0 = [p for p in pods if (p.metadata.labels or {}).get(JOB_INDEX_LABEL, "0") == "0"
                and (p.status is None or p.status.phase != "Pending")]
        node = [p for p in idx0 if (p.metadata.labels or {}).get(RJOB_NAME_LABEL) == NODE] or idx0
        if not node:
            return None
        pod = max(node, key=lambda p: (p.metadata.creation_timestamp is not None, p.metadata.creation_timestamp
                                       or 0, p.metadata.name))
        names = [c.name for c in (pod.spec.containers if pod.spec else [])]
        return pod.metadata.name, (NODE if NODE in names else (names[0] if names else None))

    def _stream_logs(self) -> None:
        """Print the node-0 log lines not printed yet. Best effort: the job's status is what counts."""
        if not self.logs_ok:
            return
        try:
            found = self._node0_pod()
            if found is None:
                return
            pod, container = found
            kw: dict[str, Any] = {"timestamps": True, "_preload_content": False}
            if container:
                kw["container"] = container
            fresh = pod != self.pod
            if not fresh:  # a window since our last read, measured on our own clock (no skew); overlap is deduped
                kw["since_seconds"] = max(1, int(time.monotonic() - self.read_at) + 10)
            started = time.monotonic()
            resp = self.core.read_namespaced_pod_log(pod, self.ns, _request_timeout=REQUEST_TIMEOUT, **kw)
            text = resp.data.decode("utf-8", errors="replace")
            resp.release_conn()
            self.read_at = started
            if fresh:  # first sight of this pod (or a restarted one): its whole log
                self.log(f"trainjob {self.name}: following pod {pod}")
                self.pod, self.cursor = pod, (None, 0)
        except self.ApiException as e:
            if e.status in (401, 403):
                self.logs_ok = False
                self.log(f"trainjob {self.name}: cannot read pod logs ({e.status}: {_server_message(e)}); "
                         f"following status only: grant get/list on pods and pods/log in {self.ns}")
            return  # 400 (container not started yet), 404 (pod gone), 5xx: try again next poll
        except Exception as e:
            if _is_network(e):
                return  # the status poll reports connectivity problems
            raise
        for line in self._new_lines(text):
            self.log(line)

    def _new_lines(self, text: str) -> list[str]:
        """Lines after the cursor; lines with equal timestamps are told apart by how many were printed."""
        last, n = self.cursor
        eq = 0
        out = []
        for raw in text.splitlines():
            stamp, _, line = raw.partition(" ")
            key = _ts_key(stamp)
            if key is None:  # not a kubelet timestamp: never drop text
                out.append(raw)
                continue
            if last is not None and key < last:
                continue
            if key == last:
                eq += 1
                if eq <= n:
                    continue
                n += 1
            else:
                last, n, eq = key, 1, 1
            out.append(line)
        self.cursor = (last, n)
        return out
