"""`ruyi pipeline ...`: the application's commands (compile, upload, schedule and run the KFP pipeline), added to
the library's command line. This module is the `ruyi` entry point; ruyi_core itself never imports pipelines."""
from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ruyi_core.cli import app, console
from ruyi_core.cli import fmt_int, main as library_main, quiet_hf
from ruyi_core.errors import RuyiError

pipeline_app = typer.Typer(no_args_is_help=True, help="Compile and run the KFP pipeline.")
app.add_typer(pipeline_app, name="pipeline")


@pipeline_app.command("compile")
def pipeline_compile(spec: Path = typer.Option(..., help="run spec YAML"),
                     out: Path = typer.Option(..., help="pipeline IR YAML to write")):
    """Compile the pipeline for a cluster (images, resources, the S3 Secret as env)."""
    from pipelines.run import compile_pipeline

    console.print(f"wrote [bold]{compile_pipeline(spec, out)}[/]")


@pipeline_app.command("upload")
def pipeline_upload(spec: Path = typer.Option(..., help="run spec YAML"),
                    host: str = typer.Option(..., envvar="KF_PIPELINES_ENDPOINT", help="KFP API endpoint"),
                    name: str = typer.Option("ruyi-flow"), version: str = typer.Option(None),
                    namespace: str = typer.Option(None)):
    """Upload the compiled pipeline (a new version named from the package version and git commit)."""
    from pipelines.remote import upload

    _check_plan(spec)
    res = upload(spec, host, name=name, version=version, namespace=namespace)
    console.print(f"pipeline {res['pipeline_name']} version [bold]{res['version_name']}[/]\n{res['url']}",
                  highlight=False)
    for w in res.get("warnings", []):
        console.print(f"[yellow]warning:[/] {escape(str(w))}", highlight=False)


@pipeline_app.command("schedule")
def pipeline_schedule(spec: Path = typer.Option(..., help="run spec YAML"),
                      host: str = typer.Option(..., envvar="KF_PIPELINES_ENDPOINT", help="KFP API endpoint"),
                      cron: str = typer.Option(..., help='cron, e.g. "0 3 * * 0" (5 or 6 fields)'),
                      name: str = typer.Option(None), experiment: str = typer.Option("ruyi-flow"),
                      namespace: str = typer.Option(None), service_account: str = typer.Option(None)):
    """A recurring retraining run of the latest uploaded version."""
    from pipelines.remote import schedule

    _check_plan(spec)
    res = schedule(spec, host, cron, name=name, experiment=experiment, namespace=namespace,
                   service_account=service_account)
    console.print(f"recurring run [bold]{res['name']}[/] ({res['cron']})\n{res['url']}", highlight=False)


def _check_plan(spec: Path) -> None:
    """A spec whose sources are missing or whose plan does not fit never reaches a cluster (or this machine)."""
    from ruyi_core.data.sources import check_sources
    from ruyi_core.plan import check_fits
    from ruyi_core.spec import load_spec

    s = load_spec(spec)
    check_sources(s)
    check_fits(s)


def _print_tiers(tiers: list[dict], promotion: dict) -> None:
    """The run's end product: per-tier quality, size and speed, then what the registry now serves."""
    from ruyi_core.report import depth_flags, depth_ties

    benches = sorted({b for t in tiers for b in t["evaluation"]["benchmarks"]})
    plain = not console.is_terminal
    t = Table(title=f"{promotion['family']} version {promotion['version']}: tiers",
              box=box.MARKDOWN if plain else box.HEAVY_HEAD)
    for c in ["tier", "params", "on disk", *benches, "average", "prefill tok/s", "decode tok/s", "peak MiB",
              "promoted"]:
        t.add_column(c, justify="left" if c == "tier" else "right", no_wrap=plain)
    for r in tiers:
        ev, sp, gate = r["evaluation"], r["evaluation"].get("speed", {}), r.get("gate") or {}
        vals = [f"{ev['benchmarks'][b]['value']:.3f}" if b in ev["benchmarks"] else "" for b in benches]
        mem = sp.get("peak_memory_mib")
        t.add_row(r["tier"], fmt_int(r["parameters"]), f"{r['weight_bytes'] / 2**20:.1f} MiB", *vals,
                  f"{ev['average']:.3f}" if ev.get("average") is not None else "",
                  f"{sp.get('prefill_tokens_per_s', 0):,.0f}", f"{sp.get('decode_tokens_per_s', 0):,.0f}",
                  f"{mem:.0f}" if mem is not None else "", "yes" if gate.get("promoted") else "kept")
    if plain:
        console.out(_plain_text(t), highlight=False)
    else:
        console.print(t)
    for flag in depth_flags(tiers):
        console.print(f"[yellow]warning:[/] {escape(str(flag))}", highlight=False)
    for tie in depth_ties(tiers):
        console.print(f"[dim]tie:[/] {escape(str(tie))}", highlight=False)
    for r in tiers:
        gate = r.get("gate") or {}
        if not gate.get("promoted"):
            console.print(f"{r['tier']}: {gate.get('reason', '')}", highlight=False, soft_wrap=True)
        console.print(f"{r['tier']:<8}{r['uri']}", highlight=False, soft_wrap=True)
    served = ", ".join(f"{k} {v}" for k, v in sorted(promotion["promoted"].items()))
    console.print(f"registry {promotion['family']}: promoted {served}  (ruyi models list {promotion['family']})",
                  highlight=False, soft_wrap=True)


def _plain_text(table: Table) -> str:
    """The table for a log file or pipe: at its natural width (rich would otherwise lay it out in 80 columns,
    cutting and wrapping the header), no colour, a Markdown table's ASCII rules, no blank edge lines."""
    wide = Console(file=io.StringIO(), width=10_000, color_system=None)
    out = Console(file=io.StringIO(), width=wide.measure(table).maximum, color_system=None)
    out.print(table)
    return "\n".join(line.rstrip() for line in out.file.getvalue().splitlines() if line.strip())


def progress_printer(live: Console):
    """Shows task events and progress lines, dimmed, each on one line however narrow the output (soft wrap: a pipe
    gets 80 columns). Escaped: a line's "[grpo]" tag is text, not rich markup (which would swallow it)."""
    return lambda line: live.print(f"  [dim]{escape(line)}[/]", highlight=False, soft_wrap=True)


@pipeline_app.command("run")
def pipeline_run(spec: Path = typer.Option(..., help="run spec YAML"),
                 local: bool = typer.Option(False, "--local", help="run with KFP's local SubprocessRunner"),
                 host: str = typer.Option(None, envvar="KF_PIPELINES_ENDPOINT", help="KFP API endpoint"),
                 root: Path = typer.Option(Path(".ruyi/kfp"), help="local pipeline root"),
                 experiment: str = typer.Option("ruyi-flow"), namespace: str = typer.Option(None),
                 service_account: str = typer.Option(None)):
    """Run the whole pipeline: --local runs every component here with the store from the environment;
    --host starts a run of the latest uploaded version on a cluster."""
    _check_plan(spec)
    if host and not local:
        from pipelines.remote import run

        res = run(spec, host, experiment=experiment, namespace=namespace, service_account=service_account)
        console.print(f"run [bold]{res['run_name']}[/] of version {res['version_name']}\n{res['url']}",
                      highlight=False)
        return
    if not local:
        raise RuyiError("say where to run: --local (here) or --host URL (a Kubeflow Pipelines endpoint)")
    from pipelines.run import fetch_report, run_local
    from ruyi_core.spec import load_spec

    quiet_hf()
    started = time.perf_counter()
    live = Console(file=sys.stdout)  # bound now: the runner redirects sys.stdout into its log meanwhile
    res = run_local(spec, root, show=progress_printer(live))
    rep = fetch_report(load_spec(spec), res["report_uri"], root / "reports" / res["report_uri"].split("/")[-2])
    _print_tiers(rep["tiers"], rep["promotion"])
    gated = not any("init-family" in e for e in res["events"])  # nothing ran past plan_run
    cached = ("unchanged data and spec: stopped at the data-fingerprint gate" if gated
              else f"{res['executed']} tasks executed")
    console.print(f"report  [bold]{rep['html']}[/]\nstore   {res['report_uri']}\n"
                  f"log     {res['log']}\n{cached} in {time.perf_counter() - started:.0f} s",
                  highlight=False, soft_wrap=True)


def main() -> None:
    library_main(app)


if __name__ == "__main__":
    main()
