"""KServe InferenceServices for a family's promoted tiers, and one for the family server (`ruyi serve`: every
tier on one trunk). A tier's service runs KServe's Hugging Face runtime on its package, read from the store
with KServe's S3 convention (a ServiceAccount whose Secret carries the endpoint annotations and AWS-style
keys); on GPUs the runtime's vLLM backend, on CPUs its transformers backend. `promote` writes them beside the
family's index (keys.deploy_key); `ruyi models deploy` prints them."""
from __future__ import annotations

import re

import yaml

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


def family_service(family: str, version: str | None, *, namespace: str, image: str, bucket: str, endpoint: str,
                   secure: bool, s3_secret: str, gpu: bool = False, cpu: str = "4", memory: str = "16Gi") -> dict:
    """`ruyi serve --registry FAMILY` in a custom predictor: every promoted tier (or `version`'s) on one trunk,
    the OpenAI API on KServe's port."""
    cmd = ["ruyi", "serve", "--registry", family, "--host", "0.0.0.0", "--port", str(PORT)]
    if version:
        cmd += ["--version", version]
    env = [{"name": "RUYI_S3_ENDPOINT", "value": f"{'https' if secure else 'http'}://{endpoint}"},
           {"name": "RUYI_S3_BUCKET", "value": bucket},
           *({"name": f"RUYI_S3_{k.upper()}", "valueFrom": {"secretKeyRef": {"name": s3_secret, "key": k}}}
             for k in ("access_key", "secret_key"))]
    container = {"name": "kserve-container", "image": image, "command": cmd, "env": env,
                 "ports": [{"containerPort": PORT, "protocol": "TCP"}], "resources": _resources(gpu, cpu, memory),
                 "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True,
                                     "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}}
    return {"apiVersion": API, "kind": "InferenceService",
            "metadata": {"name": service_name(family), "namespace": namespace,
                         "labels": _labels(family, version, None)},
            "spec": {"predictor": {"containers": [container]}}}


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
