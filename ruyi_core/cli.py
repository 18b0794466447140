"""`ruyi ...`: the command line. User errors print one line naming the problem and the fix, exit code 2."""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ruyi_core.data.cli import Kind, data_app, validate_files
from ruyi_core.errors import RuyiError
from ruyi_core.eval.cli import eval_app
from ruyi_core.package.cli import models_app
from ruyi_core.serve.cli import serve_command
from ruyi_core.store.cli import lineage_command, store_app

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Ruyi Flow: train familial LLMs and ship one model per tier.")
family_app = typer.Typer(no_args_is_help=True, help="Build, import and export familial models.")
app.add_typer(family_app, name="family")
console = Console()


app.add_typer(data_app, name="data", help="Validate and pack corpora.")
app.add_typer(store_app, name="store", help="The local S3 server.")
app.add_typer(models_app, name="models", help="The model registry: packages per tier, promotion, verification.")
app.add_typer(eval_app, name="eval", help="The spec's benchmarks as lm-evaluation-harness tasks.")
app.command("lineage", help="The chain from an artifact back to the raw data files, with hashes.")(lineage_command)
app.command("serve")(serve_command)


def curate_command(files: list[Path] = typer.Argument(..., help="JSONL / Parquet files (or directories): a shard each"),
                   kind: Kind = typer.Option(..., help="corpus kind"),
                   out: Path = typer.Option(..., help="output directory: one curated JSONL file per input file"),
                   spec: Path = typer.Option(None, help="run spec YAML: its data.curation, and its benchmarks and "
                                                        "held-out sets to decontaminate against; curation's "
                                                        "defaults if omitted")):
    """Validate, then curate as the pipeline does (language, quality, decontamination, exact and MinHash dedup
    across the files) and write what survives, with curation.json counting what each step removed."""
    # here, not in `ruyi data`'s own module: decontamination reads the spec's benchmarks (ruyi_core.eval)
    import json
    import tempfile

    from ruyi_core.data.curate import curate as run_curation, decontamination_index
    from ruyi_core.data.reader import expand_paths
    from ruyi_core.spec import load_spec
    from ruyi_core.spec.sections import CurationSpec
    from ruyi_core.stages.data import reference_sets

    validate_files(files, kind, spec, None, None)
    run = load_spec(spec) if spec is not None else None
    cur = run.data.curation if run is not None else CurationSpec()
    paths = expand_paths(files)
    with tempfile.TemporaryDirectory(prefix="ruyi-curate-") as tmp:
        index = None
        if run is not None and cur.enabled and cur.decontaminate:
            index = decontamination_index(reference_sets(run, None, Path(tmp) / "references"),
                                          cur.decontamination_ngrams)
        kept, result = run_curation([[str(p)] for p in paths], kind.value, cur, index, Path(tmp) / "work")
    out.mkdir(parents=True, exist_ok=True)
    for p, records in zip(paths, kept):
        (out / f"{p.name.split('.')[0]}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                                   for r in records))
    (out / "curation.json").write_text(json.dumps(result.summary(), indent=2) + "\n")
    t = Table(title=f"curation: {kind.value} ({result.n_kept} of {result.n_in} records kept)")
    for c in ("step", "removed", "first example"):
        t.add_column(c)
    for step, v in result.removed.items():
        t.add_row(step, str(v["count"]), " | ".join(str(x) for x in v["examples"][0][:2]) if v["examples"] else "")
    console.print(t)
    console.print(f"curated    [bold]{out}[/]")


data_app.command("curate")(curate_command)


def quiet_hf() -> None:
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging

    disable_progress_bars()
    logging.disable_progress_bar()
    logging.set_verbosity_error()


def fmt_int(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _table(title: str, rows: list[dict], cols: dict[str, str]) -> Table:
    t = Table(title=title)
    for c in cols.values():
        t.add_column(c)
    for r in rows:
        t.add_row(*(str(r[k]) for k in cols))
    return t


@family_app.command("init")
def family_init(spec: Path = typer.Option(..., help="run spec YAML"),
                out: Path = typer.Option(..., help="directory for the family checkpoint")):
    """Build a family from the spec's base (a preset or a Qwen3 checkpoint) and save it. A preset's tokenizer is
    trained on the spec's pretraining data."""
    import tempfile

    from ruyi_core.family.io import init_family, save_family
    from ruyi_core.family.presets import PRESETS
    from ruyi_core.spec import load_spec

    s = load_spec(spec)
    quiet_hf()
    with tempfile.TemporaryDirectory(prefix="ruyi-init-") as tmp:
        texts = _pretrain_texts(s, Path(tmp)) if s.family.base in PRESETS else None
        fam, tok = init_family(s.family, texts)
    save_family(fam, tok, out)
    cfg = fam.config
    rows = [{"tier": t, "exit": p, "depth": p + 1, "params": fmt_int(fam.tier_parameter_count(p))}
            for t, p in sorted(cfg.tiers.items(), key=lambda kv: kv[1])]
    console.print(_table(f"family {s.family.name} ({fmt_int(fam.num_parameters())} parameters)", rows,
                         {"tier": "tier", "exit": "exit point", "depth": "depth", "params": "parameters"}))
    console.print(f"saved to [bold]{out}[/]")


def _pretrain_texts(s, work: Path) -> list[str]:
    from ruyi_core.data.reader import read_corpus
    from ruyi_core.data.sources import demo_sizes, resolve

    store = None
    if any(e.startswith("s3://") for e in s.data.pretrain):
        from ruyi_core.store import ArtifactStore

        store = ArtifactStore.from_spec(s.store, env=os.environ)
    paths = resolve(s.data.pretrain, "pretrain", work, label="data.pretrain", store=store, seed=s.data.seed,
                    demo_sizes=demo_sizes(s))
    return [r["text"] for r in read_corpus(paths, "pretrain").records]


@family_app.command("export")
def family_export(family: Path = typer.Option(..., help="family checkpoint directory"),
                  tier: str = typer.Option("all", help="tier name, or 'all'"),
                  out: Path = typer.Option(..., help="output directory (one sub-directory per tier)")):
    """Export tiers as standalone Qwen3 checkpoints that load in vanilla transformers."""
    from ruyi_core.family.io import export_tiers, load_family

    quiet_hf()
    fam, tok = load_family(family)
    names = None if tier == "all" else [tier]
    if names and tier not in fam.config.tiers:
        raise RuyiError(f"unknown tier {tier!r}: this family has {', '.join(fam.config.tiers)}")
    rows = export_tiers(fam, tok, out, names)
    for r in rows:
        r["params"], r["mb"] = fmt_int(r["parameters"]), f"{r['weight_bytes'] / 2**20:.1f} MiB"
        r["sample"] = repr(r["sample"][:48])
    console.print(_table("exported tiers", rows, {"tier": "tier", "exit_point": "exit point", "depth": "depth",
                                                  "params": "parameters", "mb": "on disk",
                                                  "sample": "greedy sample"}))
    console.print(f"tiers under [bold]{out}[/]")
    if tok is None:
        console.print(f"[yellow]warning:[/] {escape(str(family))} has no tokenizer files: exported weights and config "
                      "only; copy the base's tokenizer files into each tier's folder", highlight=False)


@family_app.command("import-published")
def family_import(src: Path = typer.Option(..., help="published AI-Flow-Ruyi / Ruyi2 checkpoint directory"),
                  out: Path = typer.Option(..., help="output family directory")):
    """Import a checkpoint in the published layout (ruyi_qwen2 / ruyi_qwen3) as a family."""
    from ruyi_core.family.convert import import_published
    from ruyi_core.family.io import save_family

    quiet_hf()
    fam = import_published(src)
    save_family(fam, None, out)  # in the checkpoint's own dtype
    for f in src.iterdir():  # tokenizer files travel with the weights
        if f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    console.print(f"imported exits {fam.config.early_exit_points} ({fam.config.base_arch}) to [bold]{out}[/]")


@app.command("generate")
def generate(prompt: str = typer.Argument(..., help="the user message"),
             model: Path = typer.Option(None, help="a family directory or an exported tier"),
             tier: str = typer.Option(None, help="tier to run: of the --model family, or of the --registry family"),
             registry: str = typer.Option(None, help="a family in the model registry: run a package of it"),
             version: str = typer.Option(None, help="with --registry: this version, not the promoted one"),
             spec: Path = typer.Option(None, help="with --registry: run spec YAML whose store section locates "
                                                  "the registry (default: the local server)"),
             max_new_tokens: int = typer.Option(64), temperature: float = typer.Option(0.0),
             chat: bool = typer.Option(True, help="wrap the prompt in the chat template"),
             draft: str = typer.Option(None, help="self-speculative decoding: this shallower tier drafts, --tier "
                                                  "verifies (greedy; the same tokens as --tier alone)"),
             draft_tokens: int = typer.Option(8, min=1, max=16, help="with --draft: tokens drafted per round")):
    """Generate from one tier (greedy unless --temperature > 0): a local model, or a registry package
    (downloaded once to ~/.cache/ruyi/models or $RUYI_CACHE/models, verified before every use)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import ruyi_core

    ruyi_core.register()  # a family folder loads through the Auto classes too

    if (model is None) == (registry is None):
        raise RuyiError("say what to run: --model DIR, or --registry FAMILY --tier TIER")
    if draft is not None:
        return _generate_speculative(prompt, model, registry, version, spec, tier, draft, draft_tokens,
                                     max_new_tokens, temperature, chat)
    if registry is not None:
        from ruyi_core.package import fetch
        from ruyi_core.package.cli import open_store

        if tier is None:
            raise RuyiError(f"--registry needs --tier: which of {registry}'s tiers to run")
        log = Console(stderr=True)  # stdout carries only the generated text
        model = fetch(open_store(spec), registry, tier, version,
                      log=lambda m: log.print(f"[dim]{m}[/]", highlight=False, soft_wrap=True))
        tier = None  # a package is one tier already
    elif version is not None or spec is not None:
        raise RuyiError("--version and --spec go with --registry")
    quiet_hf()
    if not (model / "config.json").is_file():
        raise RuyiError(f"{model} is not a model directory (no config.json)")
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model)
    kw = {}
    if tier is not None:
        if not hasattr(m.config, "tiers"):
            raise RuyiError(f"{model} is a single exported tier; drop --tier or point --model at a family")
        if tier not in m.config.tiers:
            raise RuyiError(f"unknown tier {tier!r}: this family has {', '.join(m.config.tiers)}")
        kw["exit_point"] = m.config.tiers[tier]
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                   tokenize=False) if chat and tok.chat_template else prompt
    ids = tok(text, return_tensors="pt")
    sample = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
    with torch.no_grad():
        out = m.generate(**ids, max_new_tokens=max_new_tokens, **sample, **kw)
    print(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))


def _generate_speculative(prompt, model, registry, version, spec, tier, draft, k, max_new_tokens, temperature,
                          chat) -> None:
    from ruyi_core.serve.cli import load_served
    from ruyi_core.serve.decode import SpecStats, speculative

    if temperature > 0:
        raise RuyiError("--draft decodes greedily: drop --temperature")
    log = Console(stderr=True)
    quiet_hf()
    served = load_served(model, registry, version, spec, lambda m: log.print(f"[dim]{m}[/]", highlight=False))
    for name, what in ((tier, "--tier"), (draft, "--draft")):
        if name not in served.tiers:
            raise RuyiError(f"{what} {name}: {served.name} has tiers {', '.join(served.tiers)}")
    if served.depth(draft) >= served.depth(tier):
        raise RuyiError(f"--draft {draft} is not shallower than --tier {tier}: draft with a shallower tier")
    tok = served.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                   tokenize=False) if chat and tok.chat_template else prompt
    stats, t0 = SpecStats(), time.perf_counter()
    out = speculative(served.tiers[draft], served.tiers[tier], tok(text)["input_ids"], max_new_tokens, served.eos,
                      k=k, stats=stats)
    print(tok.decode(out, skip_special_tokens=True))
    log.print(f"[dim]{len(out)} tokens in {time.perf_counter() - t0:.2f} s; {draft} drafted {stats.drafted}, "
              f"{tier} accepted {stats.accepted} ({stats.acceptance:.0%}) in {stats.rounds} rounds[/]",
              highlight=False)


@app.command("train")
def train_cmd(stage: str = typer.Option(..., help="cpt or sft"),
              spec: Path = typer.Option(..., help="run spec YAML (train section: steps, parallel layout, launcher)"),
              family: str = typer.Option(..., help="s3:// URI of the family artifact to train"),
              data: str = typer.Option(..., help="s3:// URI of the packed dataset artifact"),
              replay: str = typer.Option(None, help="s3:// URI of the packed pretraining dataset that SFT mixes in "
                                                    "(train.sft.replay)")):
    """Joint multi-exit CPT or SFT on megatron-core: torchrun here, or a TrainJob (train.launcher).
    Checkpoints go to the store; running the same command again resumes from the latest complete one."""
    import os

    from ruyi_core.spec import load_spec, training_stages
    from ruyi_core.stages import train
    from ruyi_core.store import ArtifactStore

    if stage not in training_stages("train"):
        raise RuyiError(f"--stage must be one of {', '.join(training_stages('train'))}, got {stage!r}")
    for name, uri in (("--family", family), ("--data", data)):
        if not uri.startswith("s3://"):
            raise RuyiError(f"{name} must be an s3:// artifact URI (the pipeline's init_family / prepare_data "
                            f"outputs), got {uri!r}")
    s = load_spec(spec)
    store = ArtifactStore.from_spec(s.store, env=os.environ)
    out = train(s, store, stage, family, data, replay, log=lambda m: console.print(m, highlight=False, markup=False))
    console.print(f"trained family: [bold]{out.uri}[/]\nfinal loss per exit: "
                  + ", ".join(f"exit {p}: {v:.3f}" for p, v in zip(out.exit_points, out.final_exit_losses)))


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else fmt_int(n)


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f}" if n else "-"


@app.command("plan")
def plan_cmd(spec: Path = typer.Option(..., help="run spec YAML"),
             gpu: str = typer.Option(None, help="h100-80gb, h200-141gb or cpu (default: what the spec trains on)")):
    """Per stage: parameters, GiB per device for weights, gradients, optimizer state and activations under the
    spec's layout, the devices needed and an estimated step time. Exit 2 when a stage cannot fit."""
    from ruyi_core.data.sources import check_sources
    from ruyi_core.plan import MFU, plan_run, refusal
    from ruyi_core.spec import load_spec

    s = load_spec(spec)
    check_sources(s)
    dev, a, rows = plan_run(s, gpu, store_config=_store_config(s))
    total, body = a.base()
    tiers = ", ".join(f"{t} {_count(a.tier(p))}" for t, p in sorted(s.family.tiers.items(), key=lambda x: x[1]))
    wide = Console(width=max(console.width, 150))  # twelve columns: wider than a pipe's default 80
    wide.print(f"base {s.family.base}: {_count(total)} parameters ({_count(body)} non-embedding), "
               f"{a.layers} layers; tiers: {tiers}; on {dev.name}"
               + (f", step times at {MFU:.0%} MFU" if dev.peak_flops else ""), highlight=False)
    t = Table(title=f"{s.family.name}: memory per device (GiB)")
    for c in ("stage", "params", "trained", "weights", "grads", "optimizer", "activations", "total", "devices",
              "step s", "fits", "layout"):
        t.add_column(c)
    for r in rows:
        t.add_row(r.stage, _count(r.parameters), _count(r.trained) if r.trained else "-", _gib(r.weights),
                  _gib(r.grads), _gib(r.optimizer), _gib(r.activations), _gib(r.total), str(r.gpus),
                  f"{r.step_s:.1f}" if r.step_s else "-", "yes" if r.fits else "NO", r.note)
    wide.print(t)
    line = refusal(s, dev, rows)
    if line:
        raise RuyiError(line)


def _store_config(spec):
    """Reads a base's config.json from the store (for a base the plan does not know by name)."""
    def read(base: str) -> dict | None:
        import json
        import tempfile

        from ruyi_core.store import ArtifactStore

        if not base.startswith("s3://"):
            return None
        with tempfile.TemporaryDirectory() as tmp:
            ArtifactStore.from_spec(spec.store, env=os.environ).get_file(base.rstrip("/") + "/config.json",
                                                                         Path(tmp) / "config.json")
            return json.loads((Path(tmp) / "config.json").read_text())
    return read


def _internal_error(e: Exception) -> None:
    """Not a user error: a bug or an unexpected failure. One line here, the traceback in a log file."""
    import tempfile
    import traceback

    log = Path(tempfile.gettempdir()) / f"ruyi-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    log.write_text("".join(traceback.format_exception(e)))
    first = (str(e).strip().splitlines() or [""])[0]
    console.print(f"[bold red]internal error:[/] {escape(f'{type(e).__name__}: {first} (traceback: {log}')}; please "
                  "report it)",
                  highlight=False, soft_wrap=True)
    sys.exit(1)


def main(app: typer.Typer = app) -> None:
    """Runs `app` (the library's commands, or an application's app built on them)."""
    try:
        code = app(standalone_mode=False)  # non-standalone click returns a typer.Exit's code instead of raising
    except RuyiError as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)  # literally: [a-z] stays
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        console.print("aborted")
        sys.exit(130)
    except Exception as e:  # usage errors arrive here in non-standalone mode
        # click's ClickException, or the copy typer vendors (typer._click): both show a usage line themselves.
        if any(c.__name__ == "ClickException" for c in type(e).__mro__):
            e.show()
            sys.exit(e.exit_code)
        _internal_error(e)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
