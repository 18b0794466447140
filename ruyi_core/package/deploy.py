"""KServe InferenceServices for a family's promoted tiers, and one for the family server (`ruyi serve`: every
tier on one trunk). A tier's service runs KServe's Hugging Face runtime on its package, read from the store
with KServe's S3 convention (a ServiceAccount whose Secret carries the endpoint annotations and AWS-style
keys); on GPUs the runtime's vLLM backend, on CPUs its transformers backend. `promote` writes them beside the
family's index (keys.deploy_key); `ruyi models deploy` prints them. Or a chain of roles, a service per tier
(`ruyi serve --tiers TIER --upstream NEXT`): device, edge and cloud apart, each handing on to the next."""
from __future__ import annotations

import re

import yaml

from ruyi_core.errors import RuyiError
from ruyi_core.package.registry import tier_entry

API = "serving.kserve.io/v1beta1"
CREDENTIALS = "ruyi-kserve-s3"  # the ServiceAccount and its Secret
PORT = 8080  # KServe's container port


def _dns(raw: str) -> str:
    """A DNS-1035 label: lowercase letters, digits and '-', starting with a letter."""
    name = re.sub(r"[^a-z0-9-]+", "-", raw.lower()).strip("-")
    return name if name[:1].isalpha() else f"r-{name}"


def service_name(family: str, tier: str | None = None) -> str:
    """KServe's rule for InferenceService names is DNS-1035; it adds suffixes (-predictor-...) within 63."""
    return _dns(f"{family}-{tier}" if tier else f"{family}-family")[:45].rstrip("-")


def _labels(family: str, version: str | None, tier: str | None) -> dict:
    out = {"app.kubernetes.io/part-of": "ruyi-flow", "ruyi.ai/family": _dns(family)[:63].rstrip("-")}
    if tier:
        out["ruyi.ai/tier"] = tier
    if version:
        out["ruyi.ai/version"] = version
    return out


def _resources(gpu: bool, cpu: str, memory: str) -> dict:
    res = {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu, "memory": memory}}
    if gpu:
        res["requests"]["nvidia.com/gpu"] = res["limits"]["nvidia.com/gpu"] = "1"
    return res


def tier_service(family: str, tier: str, version: str, uri: str, *, namespace: str, gpu: bool = False,
                 cpu: str = "2", memory: str = "8Gi") -> dict:
    name = service_name(family, tier)
    backend = "vllm" if gpu else "huggingface"
    args = [f"--model_name={name}", f"--backend={backend}", "--dtype=bfloat16" if gpu else "--dtype=float32"]
    return {"apiVersion": API, "kind": "InferenceService",
            "metadata": {"name": name, "namespace": namespace, "labels": _labels(family, version, tier),
                         "annotations": {"ruyi.ai/package": uri}},
            "spec": {"predictor": {"serviceAccountName": CREDENTIALS, "model": {
                "modelFormat": {"name": "huggingface"}, "storageUri": uri, "args": args,
                "resources": _resources(gpu, cpu, memory)}}}}


def _serve_container(cmd: list[str], *, image: str, bucket: str, endpoint: str, secure: bool, s3_secret: str,
                     gpu: bool, cpu: str = "4", memory: str = "16Gi", env: list[dict] = ()) -> dict:
    """`ruyi serve` as KServe's custom predictor container: the store's address and keys in its environment (the
    server fetches its packages itself, so no storage initializer), hardened as every pod of ours."""
    store_env = [{"name": "RUYI_S3_ENDPOINT", "value": f"{'https' if secure else 'http'}://{endpoint}"},
                 {"name": "RUYI_S3_BUCKET", "value": bucket},
                 *({"name": f"RUYI_S3_{k.upper()}", "valueFrom": {"secretKeyRef": {"name": s3_secret, "key": k}}}
                   for k in ("access_key", "secret_key"))]
    return {"name": "kserve-container", "image": image, "command": cmd, "env": [*store_env, *env],
            "ports": [{"containerPort": PORT, "protocol": "TCP"}], "resources": _resources(gpu, cpu, memory),
            "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True,
                                "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}}


def _custom_service(name: str, namespace: str, labels: dict, container: dict) -> dict:
    return {"apiVersion": API, "kind": "InferenceService",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"predictor": {"containers": [container]}}}


def family_service(family: str, version: str | None, *, namespace: str, image: str, bucket: str, endpoint: str,
                   secure: bool, s3_secret: str, gpu: bool = False, cpu: str = "4", memory: str = "16Gi") -> dict:
    """`ruyi serve --registry FAMILY` in a custom predictor: every promoted tier (or `version`'s) on one trunk,
    the OpenAI API on KServe's port."""
    cmd = ["ruyi", "serve", "--registry", family, "--host", "0.0.0.0", "--port", str(PORT)]
    if version:
        cmd += ["--version", version]
    container = _serve_container(cmd, image=image, bucket=bucket, endpoint=endpoint, secure=secure,
                                 s3_secret=s3_secret, gpu=gpu, cpu=cpu, memory=memory)
    return _custom_service(service_name(family), namespace, _labels(family, version, None), container)


def role_name(family: str, tier: str) -> str:
    """A chain role's service: apart from the tier's own (KServe's runtime on its package), which may run beside."""
    return service_name(family, f"{tier}-role")


def role_url(family: str, tier: str, namespace: str) -> str:
    """Where the role serving `tier` answers inside the cluster. KServe names an InferenceService N's predictor
    Service N-predictor (port 80) in raw deployment mode, and Knative gives the same name a cluster-local route
    in serverless mode; its full DNS name resolves in both, whereas the bare N.NAMESPACE address is the
    ingress's and has no Service behind it in raw mode."""
    return f"http://{role_name(family, tier)}-predictor.{namespace}.svc.cluster.local"


def chain_services(index: dict, chain: list[str], *, store, image: str, s3_secret: str, namespace: str = "ruyi",
                   key_secret: str | None = None, gpu: bool = False) -> list[dict]:
    """A role per tier of `chain` (shallowest first, e.g. end, edge, cloud): `ruyi serve --tiers TIER` of the
    tier's promoted package, handing FAMILY:auto on to the next role; the deepest answers itself. With
    `key_secret`, each role's API key is that Secret's key named after its tier, and it holds its upstream's:
    the same value everywhere makes one shared token; distinct ones leave a role only its own and its next's."""
    family = index["family"]
    if not chain or len(set(chain)) < len(chain):
        raise RuyiError(f"a chain names each tier once, shallowest first: got {','.join(chain) or 'none'}")
    if missing := [t for t in chain if t not in index["promoted"]]:
        raise RuyiError(f"{family} has no promoted {missing[0]!r} tier: promoted are "
                        f"{', '.join(sorted(index['promoted'])) or 'none'}")
    docs = []
    for tier, upstream in zip(chain, [*chain[1:], None]):
        cmd = ["ruyi", "serve", "--registry", family, "--tiers", tier, "--host", "0.0.0.0", "--port", str(PORT)]
        env = [_secret_env("RUYI_API_KEY", key_secret, tier)] if key_secret else []
        if upstream:
            cmd += ["--upstream", role_url(family, upstream, namespace)]
            env += [_secret_env("RUYI_UPSTREAM_KEY", key_secret, upstream)] if key_secret else []
        container = _serve_container(cmd, image=image, bucket=store.bucket, endpoint=store.endpoint,
                                     secure=store.secure, s3_secret=s3_secret, gpu=gpu, env=env)
        labels = {**_labels(family, None, tier), "ruyi.ai/role": tier}
        docs.append(_custom_service(role_name(family, tier), namespace, labels, container))
    return docs


def _secret_env(name: str, secret: str, key: str) -> dict:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def credentials(*, namespace: str, endpoint: str, secure: bool, region: str | None) -> list[dict]:
    """KServe's S3 convention: a ServiceAccount naming a Secret whose annotations say where the store is. The
    keys are placeholders: fill them from your store's credentials (never commit real ones)."""
    ann = {"serving.kserve.io/s3-endpoint": endpoint, "serving.kserve.io/s3-usehttps": "1" if secure else "0",
           "serving.kserve.io/s3-verifyssl": "1" if secure else "0"}
    if region:
        ann["serving.kserve.io/s3-region"] = region
    meta = {"name": CREDENTIALS, "namespace": namespace, "labels": {"app.kubernetes.io/part-of": "ruyi-flow"}}
    return [{"apiVersion": "v1", "kind": "Secret", "metadata": {**meta, "annotations": ann}, "type": "Opaque",
             "stringData": {"AWS_ACCESS_KEY_ID": "REPLACE_ME", "AWS_SECRET_ACCESS_KEY": "REPLACE_ME"}},
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta, "secrets": [{"name": CREDENTIALS}]}]


def family_manifests(index: dict, *, store, image: str, s3_secret: str, namespace: str = "ruyi",
                     tier: str | None = None, gpu: bool = False) -> list[dict]:
    """The credentials, a service per promoted tier (or just `tier`), and the family server's service."""
    family = index["family"]
    promoted = {t: v for t, v in index["promoted"].items() if tier is None or t == tier}
    docs = credentials(namespace=namespace, endpoint=store.endpoint, secure=store.secure, region=store.region)
    for t, version in sorted(promoted.items()):
        uri = tier_entry(index, version, t)["uri"]
        docs.append(tier_service(family, t, version, uri, namespace=namespace, gpu=gpu))
    if tier is None:
        docs.append(family_service(family, None, namespace=namespace, image=image, bucket=store.bucket,
                                   endpoint=store.endpoint, secure=store.secure, s3_secret=s3_secret, gpu=gpu))
    return docs


def to_yaml(docs: list[dict]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)
