"""The stage table (ruyi_core/stages/table.py) is the one list of the pipeline's steps: the compiled DAG runs
exactly its steps, in an order the DAG allows, each through its own component."""
import pytest
import yaml

from test_pipeline import micro_spec


def dag_steps(ir: dict) -> dict[str, set[str]]:
    """{step: the steps upstream of it} of a compiled pipeline, by display name; KFP's groups (conditions, loops)
    are seen through: what a group waits for, every task in it waits for."""
    comps, deps, inner = ir["components"], {}, {}

    def leaves(dag: dict, name: str) -> set[str]:
        comp = comps[dag["tasks"][name]["componentRef"]["name"]]
        return inner[name] if "dag" in comp else {dag["tasks"][name]["taskInfo"]["name"]}

    def walk(dag: dict, above: set[str]) -> set[str]:
        for name in dag["tasks"]:  # groups first, so that `leaves` knows what each holds
            comp = comps[dag["tasks"][name]["componentRef"]["name"]]
            if "dag" in comp:
                inner[name] = walk(comp["dag"], set())
        for name, t in dag["tasks"].items():
            up = above | {x for d in t.get("dependentTasks", []) for x in leaves(dag, d)}
            comp = comps[t["componentRef"]["name"]]
            for leaf in leaves(dag, name):
                deps.setdefault(leaf, set()).update(up)
            if "dag" in comp:
                walk(comp["dag"], up)
        return {x for name in dag["tasks"] for x in leaves(dag, name)}

    walk(ir["root"]["dag"], set())
    return deps


@pytest.mark.parametrize("dae_and_rl", [True, False])
def test_the_dag_runs_the_stage_table(tmp_path, dae_and_rl):
    """The compiled DAG has one task per step of the stage table that the spec turns on, each with its component,
    and nothing else; the table's order is an order the DAG can run in."""
    from pipelines.run import compile_pipeline
    from ruyi_core.spec import load_spec
    from ruyi_core.stages import STEPS, steps

    spec = micro_spec(tmp_path, "table")
    data = yaml.safe_load(spec.read_text())
    data["dae"]["enabled"] = data["rl"]["enabled"] = dae_and_rl
    spec.write_text(yaml.safe_dump(data))
    ir = next(yaml.safe_load_all(compile_pipeline(spec, tmp_path / "pipeline.yaml").read_text()))
    deps = dag_steps(ir)
    on = [s.name for s in steps(load_spec(spec))]
    assert sorted(deps) == sorted(on)
    assert len(on) == len(STEPS) - (0 if dae_and_rl else 5)  # dae_expand, dae_cpt, dae_sft, svd_compress, grpo
    for i, name in enumerate(on):
        assert deps[name] <= set(on[:i]), (name, deps[name] - set(on[:i]))
    executors = {s.component for s in steps(load_spec(spec))}
    assert {e.removeprefix("exec-").rstrip("-0123456789").replace("-", "_")
            for e in ir["deploymentSpec"]["executors"]} == executors
