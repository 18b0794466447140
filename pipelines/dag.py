"""The DAG, readable on one screen. Its steps, their order and what turns them on are the stage table's
(ruyi_core/stages/table.py); this module wires their inputs and outputs:

    plan_shards -> curate_shard x shards -> merge_data -> plan_run (data-fingerprint gate) -> init_family
        -> plan_packs -> pack_shard x shards -> prepare_data
        -> train cpt -> train sft [-> dae_expand -> train dae_cpt -> train dae_sft] [-> grpo] [-> svd_compress]
        -> (export_tier -> package_tier) x tiers -> promote -> calibrate_routing -> report
"""
from kfp import dsl, kubernetes
from kfp.dsl import Dataset

import components
from ruyi_core.spec import PipelineSpec, RunSpec, training_stages
from ruyi_core.stages import steps


def build_pipeline(spec: RunSpec, spec_yaml: str, cluster: bool = True):
    """The pipeline for one spec; `spec_yaml` is its text (one-line JSON keeps the compiled YAML's header
    comment valid). `cluster` adds what only a cluster uses: images, resources, the S3 Secret as environment,
    timeouts, retries and GPUs (the local runner ignores or rejects those)."""

    @dsl.pipeline(name="ruyi-flow", description="Train a familial LLM and ship one model per tier.")
    def ruyi_flow(spec_yaml: str = spec_yaml) -> Dataset:
        task = _tasks(spec, spec_yaml, cluster)
        shards = task("plan_shards")
        shards.set_caching_options(False)  # the sources may have grown since
        with dsl.ParallelFor(shards.output) as shard:  # on a cluster, a pod per shard
            part = task("curate_shard", shard=shard)
        merged = task("merge_data", shards=dsl.Collected(part.outputs["curated"]))
        run = task("plan_run", datasets=merged.outputs["datasets"])
        run.set_caching_options(False)  # the gate must look at the store every time
        with dsl.If(run.outputs["Output"] == True):  # noqa: E712 (a KFP condition, not a Python comparison)
            train_and_ship(spec, task, run.outputs["plan"], cluster)
        return run.outputs["plan"]  # its metadata names the run

    return ruyi_flow


def train_and_ship(spec: RunSpec, task, plan, cluster: bool) -> None:
    """Everything after the data gate, for a run whose data or spec is new (`plan`: the validated datasets)."""
    on = {s.name for s in steps(spec)}
    family = task("init_family", plan=plan).outputs["family"]
    pieces = task("plan_packs", plan=plan)
    with dsl.ParallelFor(pieces.output) as piece:  # on a cluster, a pod per shard
        part = task("pack_shard", piece=piece, family=family)
    packed = task("prepare_data", parts=dsl.Collected(part.outputs["packed"])).outputs["packed"]
    for stage in training_stages("train"):
        family = task(stage, stage=stage, family=family, packed=packed).outputs["trained"]
    if "dae_expand" in on:  # the smallest tier grows, then trains alone on the frozen backbone
        family = expanded = task("dae_expand", family=family).outputs["expanded"]
        for stage in training_stages("dae"):
            family = task(stage, stage=stage, family=family, packed=packed).outputs["trained"]
    if "grpo" in on:
        family = task("grpo", family=family, plan=plan).outputs["policy"]
    svd = {}
    if "svd_compress" in on:  # the compressed tier ships in place of the family's at its exit
        svd["compressed"] = task("svd_compress", family=family, packed=packed,
                                 expanded=expanded).outputs["compressed"]
    # On one machine one tier at a time, so a package's speed and memory are measured with nothing else running
    # (on a cluster every task has its own pod and resources).
    tiers = sorted(spec.family.tiers, key=spec.family.tiers.get)
    with dsl.ParallelFor(tiers, parallelism=0 if cluster else 1) as tier:
        exported = task("export_tier", tier=tier, family=family, **svd)
        pkg = task("package", plan=plan, tier_model=exported.outputs["tier_model"], family=family)
    gate = task("promote", plan=plan, packages=dsl.Collected(pkg.outputs["package"]))
    routing = task("calibrate_routing", promotion=gate.outputs["promotion"])
    task("report", plan=plan, promotion=gate.outputs["promotion"], routing=routing.outputs["routing"], packed=packed)


def _tasks(spec: RunSpec, spec_yaml, cluster: bool):
    """task(name, **inputs): the stage table's step `name` as a task of this pipeline, on these inputs."""
    table = {s.name: s for s in steps(spec)}

    def task(name: str, **inputs):
        step = table[name]
        t = getattr(components, step.component)(spec_yaml=spec_yaml, **inputs).set_display_name(step.name)
        if cluster:
            _on_cluster(t, spec.pipeline, step.component)
        return t

    return task


def _on_cluster(task, p: PipelineSpec, component: str) -> None:
    """The image, the component's resources, retries, the S3 Secret as environment, the timeout and GPUs."""
    res = p.resources_for(component)
    task.set_container_image(p.image)
    task.set_cpu_request(res.cpu).set_cpu_limit(res.cpu)
    task.set_memory_request(res.memory).set_memory_limit(res.memory)
    task.set_retry(num_retries=p.retries, backoff_duration="60s")
    kubernetes.use_secret_as_env(task, secret_name=p.s3_secret, secret_key_to_env={
        "access_key": "RUYI_S3_ACCESS_KEY", "secret_key": "RUYI_S3_SECRET_KEY"})
    kubernetes.set_timeout(task, p.timeout_s)
    if res.gpus:  # only steps given GPUs land on the GPU node pool
        task.set_accelerator_type(p.accelerator).set_accelerator_limit(res.gpus)
        for key, value in p.gpu_node_selector.items():
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
        for t in p.gpu_tolerations:
            kubernetes.add_toleration(task, key=t.get("key"), operator=t.get("operator", "Equal"),
                                      value=t.get("value"), effect=t.get("effect"))
