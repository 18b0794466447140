"""`ruyi eval tasks`: the spec's benchmarks as an lm-evaluation-harness task folder, the one the evaluation stage
runs, for plain `lm_eval` runs on any exported tier."""
from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ruyi_core.errors import RuyiError

eval_app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                       help="The spec's benchmarks as lm-evaluation-harness tasks.")
console = Console()


@eval_app.command("tasks")
def tasks_command(spec: Path = typer.Option(..., help="run spec YAML: its eval.benchmarks and family name"),
                  model: Path = typer.Option(..., help="the family folder or any tier exported from it: its chat "
                                                       "template and end-of-turn tokens shape the generative tasks"),
                  out: Path = typer.Option(..., help="a new (or empty) folder for the tasks")):
    """Write the spec's benchmarks as an lm-eval task folder.

    One task per benchmark (ruyi_<benchmark>), its data, utils.py (the scoring) and a group named after the
    family: `lm_eval --include_path OUT --tasks <family>` scores a tier as the evaluation stage does."""
    from transformers import AutoConfig, AutoTokenizer

    from ruyi_core.data.sources import check_sources
    from ruyi_core.eval.tasks import PRIMARY, end_of_turn_ids, write_tasks
    from ruyi_core.spec import load_spec

    s = load_spec(spec)
    check_sources(s)
    if not (model / "config.json").is_file():
        raise RuyiError(f"--model {model} is not a model directory (no config.json)")
    tok = AutoTokenizer.from_pretrained(model)
    store = None
    if any(b.path.startswith("s3://") for b in s.eval.benchmarks.values()):
        from ruyi_core.store import ArtifactStore

        store = ArtifactStore.from_spec(s.store, env=os.environ, create_bucket=False)  # reads only
    suite = write_tasks(s, tok, end_of_turn_ids(tok, AutoConfig.from_pretrained(model)), out, store)
    t = Table(title=f"lm-eval tasks in {escape(str(suite.folder))}")
    for c in ("task", "benchmark", "format", "records", "metric"):
        t.add_column(c)
    for name, task in suite.tasks.items():
        fmt = s.eval.benchmarks[name].format
        t.add_row(task, name, fmt, str(suite.records[name]), PRIMARY[fmt][0])
    Console(width=max(console.width, 100)).print(t)  # task names whole: they are what --tasks takes
    # The stage's settings on a CPU (fp32, its batch size); on a GPU it scores a tier with --model vllm.
    console.print(f"group [bold]{escape(suite.group)}[/] runs them all, as the evaluation stage does:\n"
                  f"  lm_eval --model hf --model_args pretrained=TIER_DIR,dtype=float32 --device cpu "
                  f"--batch_size {s.eval.batch_size} --include_path {escape(str(suite.folder))} "
                  f"--tasks {escape(suite.group)}", highlight=False, soft_wrap=True)
