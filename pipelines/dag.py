"""The DAG, readable on one screen:

    validate_data x kinds -> plan_run (data-fingerprint gate) -> init_family -> prepare_data (every kind)
        -> train cpt -> train sft [-> dae_expand -> train dae_cpt -> train dae_sft] [-> grpo] [-> svd_compress]
        -> (export_tier -> package_tier) x tiers -> promote -> report
"""
from kfp import dsl, kubernetes
from kfp.dsl import Dataset

from components import (dae_expand, export_tier, grpo, init_family, package_tier, plan_run, prepare_data, promote,
                        report, svd_compress, train, validate_data)
from ruyi_core.spec import RunSpec
from ruyi_core.stages import KINDS


def build_pipeline(spec: RunSpec, spec_yaml: str, cluster: bool = True):
    """The pipeline for one spec; `spec_yaml` is its text (one-line JSON keeps the compiled YAML's header
    comment valid). `cluster` adds what only a cluster uses: images, resources, the S3 Secret as environment,
    timeouts, retries and GPUs (the local runner ignores or rejects those)."""
    p = spec.pipeline

    def on_cluster(task, stage: str):
        task.set_display_name(stage)
        if cluster:
            res = p.resources_for(stage)
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
        return task

    @dsl.pipeline(name="ruyi-flow", description="Train a familial LLM and ship one model per tier.")
    def ruyi_flow(spec_yaml: str = spec_yaml) -> Dataset:
        with dsl.ParallelFor(list(KINDS)) as kind:
            gate = on_cluster(validate_data(spec_yaml=spec_yaml, kind=kind), "validate_data")

        run = on_cluster(plan_run(spec_yaml=spec_yaml, datasets=dsl.Collected(gate.outputs["dataset"])), "plan_run")
        run.set_caching_options(False)  # the gate must look at the store every time
        with dsl.If(run.outputs["Output"] == True):  # noqa: E712 (a KFP condition, not a Python comparison)
            train_and_ship(spec, spec_yaml, run.outputs["plan"], on_cluster)
        return run.outputs["plan"]  # its metadata names the run

    return ruyi_flow


def train_and_ship(spec: RunSpec, spec_yaml: str, plan, on_cluster) -> None:
    """Everything after the data gate, for a run whose data or spec is new (`plan`: the validated datasets)."""
    fam = on_cluster(init_family(spec_yaml=spec_yaml, plan=plan), "init_family")
    packed = on_cluster(prepare_data(spec_yaml=spec_yaml, plan=plan, family=fam.outputs["family"]),
                        "prepare_data").outputs["packed"]
    family = fam.outputs["family"]
    stages = ["cpt", "sft"] + (["dae_expand", "dae_cpt", "dae_sft"] if spec.dae.enabled else [])
    for stage in stages:
        if stage == "dae_expand":  # the smallest tier grows, then trains alone on the frozen backbone
            expanded = on_cluster(dae_expand(spec_yaml=spec_yaml, family=family), "dae_expand").outputs["expanded"]
            family = expanded
        else:
            family = on_cluster(train(spec_yaml=spec_yaml, stage=stage, family=family, packed=packed), "train") \
                .set_display_name(stage).outputs["trained"]
    if spec.rl.enabled:
        family = on_cluster(grpo(spec_yaml=spec_yaml, family=family, plan=plan), "grpo").outputs["policy"]
    if spec.dae.enabled:
        family = on_cluster(svd_compress(spec_yaml=spec_yaml, family=family, packed=packed, expanded=expanded),
                            "svd_compress").outputs["compressed"]
    with dsl.ParallelFor(sorted(spec.family.tiers, key=spec.family.tiers.get)) as tier:
        exported = on_cluster(export_tier(spec_yaml=spec_yaml, tier=tier, family=family), "export_tier")
        pkg = on_cluster(package_tier(spec_yaml=spec_yaml, plan=plan, tier_model=exported.outputs["tier_model"],
                                      family=family), "package_tier")
    gate = on_cluster(promote(spec_yaml=spec_yaml, plan=plan, packages=dsl.Collected(pkg.outputs["package"])),
                      "promote")
    on_cluster(report(spec_yaml=spec_yaml, plan=plan, promotion=gate.outputs["promotion"], packed=packed), "report")
