"""Upload, run and schedule the compiled pipeline on a Kubeflow Pipelines server (kfp.Client, v2beta1 API).

Every failure a user can fix (server unreachable, credentials refused, no pipeline yet, bad cron) is one
RuyiError line naming the problem and the fix. Only KFP credentials (RUYI_KFP_TOKEN, RUYI_KFP_COOKIES) are sent:
the pipeline carries the S3 Secret's *name*, never its keys.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import ssl
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

from ruyi_core.errors import RuyiError
from ruyi_core.measure import git_commit
from ruyi_core.spec import RunSpec, load_spec

PROBE_TIMEOUT_S = 10.0
TOKEN_ENV, COOKIES_ENV = "RUYI_KFP_TOKEN", "RUYI_KFP_COOKIES"
# robfig/cron (KFP's scheduler) fields: second minute hour day-of-month month day-of-week (0-6, no 7).
CRON_FIELDS = (("second", 0, 59), ("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12),
               ("day of week", 0, 6))
_CRON_NAMES = re.compile(r"^(jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec|sun|mon|tue|wed|thu|fri|sat)$", re.I)


# --- connecting -----------------------------------------------------------------------------------------
def normalize_host(host: str) -> str:
    """`localhost:8080` -> `http://localhost:8080` (a port-forward); other bare hosts get https, as in kfp."""
    host = (host or "").strip().rstrip("/")
    if not host:
        raise RuyiError("no Kubeflow Pipelines host: pass --host, e.g. http://localhost:8080 after "
                        "`kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80`")
    if "://" not in host:
        local = re.match(r"^(localhost|127\.[\d.]+|\[::1\])(:\d+)?$", host)
        host = ("http://" if local else "https://") + host
    return host


def _auth_headers() -> dict[str, str]:
    headers = {}
    if os.environ.get(TOKEN_ENV):
        headers["Authorization"] = f"Bearer {os.environ[TOKEN_ENV]}"
    if os.environ.get(COOKIES_ENV):
        headers["Cookie"] = os.environ[COOKIES_ENV]
    return headers


def _auth_fix() -> str:
    return (f"set {TOKEN_ENV} (a bearer token, e.g. `kubectl create token <sa> -n <ns>`) or {COOKIES_ENV} "
            f"(the session cookie of a logged-in browser, e.g. authservice_session=...)")


def _probe(host: str) -> None:
    """GET healthz with a timeout before kfp.Client, whose constructor retries failures for ~25 s."""
    req = urllib.request.Request(f"{host}/apis/v2beta1/healthz", headers=_auth_headers())
    ctx = ssl.create_default_context(cafile=os.environ.get("SSL_CERT_FILE"))
    # No proxies from the environment: kfp.Client ignores them too, so the probe tests the same route.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx))
    try:
        with opener.open(req, timeout=PROBE_TIMEOUT_S) as resp:
            body = resp.read()
    except urllib.error.HTTPError as e:
        raise _status_error(host, "checking the server", e.code, e.reason) from None
    except (urllib.error.URLError, OSError) as e:
        raise _unreachable(host, "checking the server", getattr(e, "reason", e)) from None
    try:
        json.loads(body or b"{}")
    except ValueError:
        # An HTML login page (Dex/oauth2-proxy) answers 200 to unauthenticated requests.
        raise RuyiError(f"{host} answered healthz with a web page, not the KFP API (a login redirect?): "
                        f"{_auth_fix()}, or point --host at the ml-pipeline service") from None


def connect(host: str):
    """A kfp.Client for `host`, after a quick reachability and credential check."""
    import kfp

    host = normalize_host(host)
    _probe(host)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # kfp's FutureWarning about server versions
        try:
            return kfp.Client(host=host, existing_token=os.environ.get(TOKEN_ENV) or None,
                              cookies=os.environ.get(COOKIES_ENV) or None)
        except Exception as e:
            raise _as_ruyi(host, "connecting", e) from None


def _one_line(text, limit: int = 240) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unreachable(host: str, what: str, cause) -> RuyiError:
    return RuyiError(f"cannot reach Kubeflow Pipelines at {host} while {what} ({_one_line(cause)}): check --host; "
                     f"from outside the cluster run `kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80` "
                     f"and use --host http://localhost:8080")


def _status_error(host: str, what: str, status: int, message) -> RuyiError:
    msg = _one_line(message or "")
    if status == 401:
        return RuyiError(f"Kubeflow Pipelines at {host} rejected our credentials while {what} (401 {msg}): "
                         f"{_auth_fix()}")
    if status == 403:
        return RuyiError(f"Kubeflow Pipelines at {host} forbids {what} (403 {msg}): use credentials of a user or "
                         f"service account allowed in that namespace (multi-user KFP: pass --namespace of your "
                         f"profile), or {_auth_fix()}")
    if status == 404 and what == "checking the server":
        return RuyiError(f"{host} has no KFP v2 API (404 {msg}) while {what}: point --host at the KFP UI or "
                         f"ml-pipeline service (Kubeflow Pipelines 2.x)")
    return RuyiError(f"Kubeflow Pipelines at {host} answered {status} while {what} ({msg}): check the server "
                     f"(`kubectl -n kubeflow logs deploy/ml-pipeline`)")


def _as_ruyi(host: str, what: str, e: BaseException) -> BaseException:
    import kfp_server_api

    if isinstance(e, RuyiError):
        return e
    if isinstance(e, kfp_server_api.ApiException):
        if not e.status:  # kfp_server_api reports TLS failures as status 0
            return _unreachable(host, what, e.reason)
        try:
            message = json.loads(e.body or "{}").get("message") or e.reason
        except (ValueError, TypeError, AttributeError):  # not a JSON object (a proxy's HTML page)
            message = e.reason
        return _status_error(host, what, e.status, message)
    if isinstance(e, OSError) or type(e).__module__.startswith("urllib3"):
        return _unreachable(host, what, getattr(e, "reason", None) or e)
    return e


def _call(host: str, what: str, fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):  # kfp prints "... details: <link>"; we return links
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise _as_ruyi(host, what, e) from None


def _host_of(client, host: str | None) -> str:
    # private: kfp.Client keeps the host it resolved (from kube config) only here (test_private_apis)
    return normalize_host(host) if host else client._existing_config.host


# --- versions -------------------------------------------------------------------------------------------
def default_version_name() -> str:
    """`<ruyi version>-<git short sha>` of the code that compiled the pipeline, `-dev` outside git."""
    from ruyi_core import __version__

    return f"{__version__}-{git_commit() or 'dev'}"


def _eq_filter(key: str, value: str) -> str:
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": key, "stringValue": value}]})


def _find_version(client, host: str, pipeline_id: str, version_name: str):
    res = _call(host, "listing pipeline versions", client.list_pipeline_versions, pipeline_id,
                filter=_eq_filter("display_name", version_name), page_size=10)
    return next((v for v in res.pipeline_versions or [] if v.display_name == version_name), None)


def _pipeline_id(client, host: str, name: str, namespace: str | None) -> str | None:
    # Not kfp's get_pipeline_id: it cannot look in a namespace (multi-user KFP).
    res = _call(host, f"looking up pipeline {name!r}", client.list_pipelines, filter=_eq_filter("display_name", name),
                namespace=namespace, page_size=10)
    found = [p for p in res.pipelines or [] if p.display_name == name]
    if len(found) > 1:
        raise RuyiError(f"{host} has {len(found)} pipelines named {name!r}: delete the extra ones in the UI or "
                        f"pass --name")
    return found[0].pipeline_id if found else None


def _store_warnings(spec: RunSpec) -> list[str]:
    host = spec.store.endpoint.split(":")[0]
    if host in ("localhost", "::1") or host.startswith("127."):
        return [f"store.endpoint is {spec.store.endpoint}, a loopback address: pods in the cluster cannot reach "
                f"it; upload a spec whose store section names the cluster's S3 (manifests/base/spec.yaml)"]
    return []


# --- the three commands ---------------------------------------------------------------------------------
def upload(spec_path, host, *, name: str = "ruyi-flow", version: str | None = None, client=None,
           namespace: str | None = None) -> dict:
    """Compile the pipeline for `spec_path` and upload it: a new pipeline when `name` is absent, else a new
    version of it. The default version name is `<version>-<git sha>`; when that name is taken by other content
    (a changed spec or uncommitted code) a hash of the compiled YAML is appended, and identical content reuses
    the existing version. An explicit `version` that is taken is an error."""
    from pipelines.run import compile_pipeline

    spec = load_spec(spec_path)
    client = client or connect(host)  # before compiling: a wrong host fails in seconds
    host = _host_of(client, host)
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(spec_path, Path(tmp) / "ruyi-flow.yaml")
        digest = hashlib.sha256(package.read_bytes()).hexdigest()[:8]
        pipeline_id = _pipeline_id(client, host, name, namespace)
        created_pipeline = pipeline_id is None
        if created_pipeline:
            pipeline_id = _create_pipeline(client, host, name, namespace)
        names = [version] if version else [default_version_name(), f"{default_version_name()}-{digest}"]
        for vname in names:
            found = _find_version(client, host, pipeline_id, vname)
            if found is None:
                v = _call(host, f"uploading version {vname!r}", client.upload_pipeline_version, str(package),
                          pipeline_version_name=vname, pipeline_id=pipeline_id,
                          description=f"spec {spec.family.name} ({spec.fingerprint()}), package sha256 {digest}")
                created_version = True
                break
            if digest in (found.description or ""):  # this very package is already there
                v, created_version = found, False
                break
        else:
            raise RuyiError(f"pipeline {name!r} already has a version named {names[-1]!r} with other content: "
                            f"pass --version with a new name")
    return {"pipeline_id": pipeline_id, "pipeline_name": name, "version_id": v.pipeline_version_id,
            "version_name": v.display_name, "created_pipeline": created_pipeline, "created_version": created_version,
            "url": f"{host}/#/pipelines/details/{pipeline_id}/version/{v.pipeline_version_id}",
            "warnings": _store_warnings(spec)}


def _create_pipeline(client, host: str, name: str, namespace: str | None) -> str:
    """An empty pipeline record, so that even the first version carries our version name (an upload to
    /pipelines/upload would name it after the pipeline)."""
    import kfp_server_api

    body = kfp_server_api.V2beta1Pipeline(name=name, display_name=name, namespace=namespace,
                                          description="Ruyi Flow: train a familial LLM, ship one model per tier")
    try:
        return _call(host, f"creating pipeline {name!r}", client.pipelines.pipeline_service_create_pipeline,
                     body).pipeline_id
    except RuyiError as e:
        found = _pipeline_id(client, host, name, namespace)  # created meanwhile by a concurrent upload
        if found:
            return found
        raise e


def _latest_version(client, host: str, name: str, namespace: str | None):
    pipeline_id = _pipeline_id(client, host, name, namespace)
    if pipeline_id is None:
        raise RuyiError(f"{host} has no pipeline named {name!r}: upload it first with "
                        f"`ruyi pipeline upload --spec SPEC --host {host}`")
    res = _call(host, "listing pipeline versions", client.list_pipeline_versions, pipeline_id,
                sort_by="created_at desc", page_size=1)
    if not res.pipeline_versions:
        raise RuyiError(f"pipeline {name!r} on {host} has no version: upload one with `ruyi pipeline upload`")
    return pipeline_id, res.pipeline_versions[0]


def _experiment_id(client, host: str, experiment: str, namespace: str | None) -> str:
    try:
        return _call(host, f"opening experiment {experiment!r}", client.create_experiment, experiment,
                     namespace=namespace).experiment_id
    except ValueError as e:  # kfp: several experiments share the name
        raise RuyiError(f"{host}: {_one_line(e)}: pass --experiment with a unique name") from None


def run(spec_path, host, *, experiment: str = "ruyi-flow", client=None, name: str = "ruyi-flow",
        namespace: str | None = None, service_account: str | None = None) -> dict:
    """Start one run of the latest uploaded version (its spec is the one baked in at upload time)."""
    spec = load_spec(spec_path)
    client = client or connect(host)
    host = _host_of(client, host)
    pipeline_id, v = _latest_version(client, host, name, namespace)
    exp_id = _experiment_id(client, host, experiment, namespace)
    run_name = f"{spec.family.name} {time.strftime('%Y-%m-%d %H:%M:%S')}"
    r = _call(host, "creating the run", client.run_pipeline, exp_id, run_name, pipeline_id=pipeline_id,
              version_id=v.pipeline_version_id, service_account=service_account)
    return {"run_id": r.run_id, "run_name": run_name, "experiment_id": exp_id, "pipeline_id": pipeline_id,
            "version_id": v.pipeline_version_id, "version_name": v.display_name,
            "url": f"{host}/#/runs/details/{r.run_id}"}


def normalize_cron(cron: str) -> str:
    """KFP wants 6 fields with seconds first; the usual 5-field cron gets second 0. Checked here, because
    KFP only rejects a bad expression when the recurring run fires (or never)."""
    fields = (cron or "").split()
    if len(fields) == 5:
        fields = ["0", *fields]
    if len(fields) != 6:
        raise RuyiError(f"cron {cron!r} has {len((cron or '').split())} fields: give 5 (minute hour day month "
                        f"weekday, e.g. '0 3 * * *' for 03:00 daily) or 6 with seconds first")
    for value, (what, lo, hi) in zip(fields, CRON_FIELDS):
        for part in value.split(","):
            base, _, step = part.partition("/")
            bounds = [] if base in ("*", "?") else base.split("-")
            ok = bool(part) and len(bounds) <= 2 and (not step or step.isdigit() and int(step) > 0)
            for b in bounds:
                ok = ok and (b.isdigit() and lo <= int(b) <= hi or bool(what in ("month", "day of week")
                                                                        and _CRON_NAMES.match(b)))
            if not ok:
                raise RuyiError(f"cron {cron!r}: {what} field {value!r} is invalid (allowed {lo}-{hi}, *, lists "
                                f"a,b, ranges a-b, steps */n): fix the expression")
    return " ".join(fields)


def schedule(spec_path, host, cron: str, *, name: str | None = None, experiment: str = "ruyi-flow", client=None,
             pipeline: str = "ruyi-flow", namespace: str | None = None, service_account: str | None = None,
             max_concurrency: int = 1) -> dict:
    """A recurring run of the latest uploaded version on `cron` (5 or 6 fields). One at a time by default:
    a retraining still running when the next one is due delays it instead of competing for GPUs."""
    cron6 = normalize_cron(cron)
    spec = load_spec(spec_path)
    client = client or connect(host)
    host = _host_of(client, host)
    pipeline_id, v = _latest_version(client, host, pipeline, namespace)
    exp_id = _experiment_id(client, host, experiment, namespace)
    name = name or f"{pipeline} {spec.family.name}"
    existing = _call(host, "listing recurring runs", client.list_recurring_runs, experiment_id=exp_id,
                     filter=_eq_filter("display_name", name), page_size=10)
    for rr in existing.recurring_runs or []:
        if rr.display_name == name:
            raise RuyiError(f"experiment {experiment!r} already has a recurring run named {name!r} "
                            f"(id {rr.recurring_run_id}): delete or disable it in the UI first, or pass --name")
    rr = _call(host, "creating the recurring run", client.create_recurring_run, exp_id, name,
               description=f"{spec.family.name} on '{cron6}', version {v.display_name}", cron_expression=cron6,
               max_concurrency=max_concurrency, no_catchup=True, pipeline_id=pipeline_id,
               version_id=v.pipeline_version_id, service_account=service_account)
    return {"recurring_run_id": rr.recurring_run_id, "name": name, "cron": cron6, "experiment_id": exp_id,
            "pipeline_id": pipeline_id, "version_id": v.pipeline_version_id, "version_name": v.display_name,
            "url": f"{host}/#/recurringrun/details/{rr.recurring_run_id}"}
