"""The DAG, readable on one screen:

    validate_data x kinds -> plan_run -> init_family -> prepare_data (every kind)
        -> train cpt -> train sft [-> dae_expand -> train dae_cpt -> train dae_sft] [-> grpo] [-> svd_compress]
        -> export_tier x tiers -> report
"""

from kfp import dsl, kubernetes

from components import (dae_expand, export_tier, grpo, init_family, plan_run, prepare_data, report, svd_compress,
                        train, validate_data)
from ruyi_core.spec import RunSpec
from ruyi_core.stages import KINDS


def build_pipeline(spec: RunSpec, spec_yaml: str, cluster: bool = True):
    """The pipeline for one spec; `spec_yaml` is its text (one-line JSON keeps the compiled YAML's header
    comment valid). `cluster` adds what only a cluster uses: images, resources, the S3
    Secret as environment, timeouts and retries (the local runner ignores or rejects those)."""
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
        return task

    @dsl.pipeline(name="ruyi-flow", description="Train a familial LLM and ship one model per tier.")
    def ruyi_flow(spec_yaml: str = spec_yaml) -> str:
        with dsl.ParallelFor(list(KINDS)) as kind:
            gate = on_cluster(validate_data(spec_yaml=spec_yaml, kind=kind), "validate_data")
        # One Collected per consumer: kfp 2.17's compiler fails on a Collected shared by two tasks.
        def raws():
            return dsl.Collected(gate.outputs["dataset"])

        run = on_cluster(plan_run(spec_yaml=spec_yaml, datasets=raws()), "plan_run")
        fam = on_cluster(init_family(spec_yaml=spec_yaml, run_id=run.output, datasets=raws()), "init_family")
        packed = on_cluster(prepare_data(spec_yaml=spec_yaml, datasets=raws(), family=fam.outputs["family"]),
                            "prepare_data")
        cpt = on_cluster(train(spec_yaml=spec_yaml, stage="cpt", family=fam.outputs["family"],
                               packed=packed.outputs["packed"]), "train").set_display_name("cpt")
        sft = on_cluster(train(spec_yaml=spec_yaml, stage="sft", family=cpt.outputs["trained"],
                               packed=packed.outputs["packed"]), "train").set_display_name("sft")
        family = sft.outputs["trained"]
        if spec.dae.enabled:  # the smallest tier grows, trains alone on the frozen backbone
            exp = on_cluster(dae_expand(spec_yaml=spec_yaml, family=family), "dae_expand")
            family = exp.outputs["expanded"]
            for stage in ("dae_cpt", "dae_sft"):
                family = on_cluster(train(spec_yaml=spec_yaml, stage=stage, family=family,
                                          packed=packed.outputs["packed"]), "train").set_display_name(stage) \
                    .outputs["trained"]
        if spec.rl.enabled:
            family = on_cluster(grpo(spec_yaml=spec_yaml, family=family, datasets=raws()), "grpo").outputs["policy"]
        if spec.dae.enabled:
            family = on_cluster(svd_compress(spec_yaml=spec_yaml, family=family, packed=packed.outputs["packed"],
                                             expanded=exp.outputs["expanded"]), "svd_compress").outputs["compressed"]
        with dsl.ParallelFor(sorted(spec.family.tiers, key=spec.family.tiers.get)) as tier:
            tiers = on_cluster(export_tier(spec_yaml=spec_yaml, tier=tier, family=family), "export_tier")
        rep = on_cluster(report(spec_yaml=spec_yaml, run_id=run.output, tiers=dsl.Collected(tiers.outputs["tier_model"]),
                                packed=packed.outputs["packed"]), "report")
        return rep.outputs["Output"]

    return ruyi_flow
