"""`ruyi models list|show|verify|deploy`: the registry from the command line. The store comes from --spec's
store section (default: the local server; RUYI_S3_BUCKET names another bucket) and the RUYI_S3_* environment,
as for `ruyi lineage`."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ruyi_core.errors import RuyiError
from ruyi_core.package.build import verify_package
from ruyi_core.package.keys import ROOT, PackageKey, family_prefix, parse_package
from ruyi_core.package.registry import absent_packages, families, read_index, tier_entry, version_entry
from ruyi_core.store import ArtifactStore, IntegrityError

models_app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                         help="The model registry: per-tier packages, their promotion, their integrity.")
SPEC_HELP = "run spec YAML whose store section locates the registry (default: the local server)"


def open_store(spec: Path | None, uri: str | None = None) -> ArtifactStore:
    """The registry's store, read-only (a lookup creates no bucket); an s3:// URI picks its own bucket."""
    from ruyi_core.spec import StoreSpec, load_spec

    store_spec = load_spec(spec).store if spec is not None else StoreSpec(
        **({"bucket": os.environ["RUYI_S3_BUCKET"]} if os.environ.get("RUYI_S3_BUCKET") else {}))
    if uri and uri.startswith("s3://"):
        store_spec = store_spec.model_copy(update={"bucket": uri[5:].partition("/")[0] or store_spec.bucket})
    return ArtifactStore.from_spec(store_spec, env=os.environ, create_bucket=False)


def _avg(v) -> str:
    return "–" if v is None else f"{v:.3f}"


@models_app.command("list")
def list_command(family: str | None = typer.Argument(None, help="a family: list its versions"),
                 spec: Path | None = typer.Option(None, help=SPEC_HELP)) -> None:
    """The families in the registry, or one family's versions with each tier's gate decision."""
    store, c = open_store(spec), Console()
    if family is None:
        names = families(store)
        if not names:
            c.print(f"no packages under {store.uri(ROOT)} yet: run the pipeline to publish some", highlight=False)
            return
        t = Table(title=f"families in {store.uri(ROOT)}")
        for col in ("family", "versions", "promoted"):
            t.add_column(col, overflow="fold")
        for name in names:
            index = read_index(store, name, missing_ok=True)  # packages whose promote step never ran
            promoted = ", ".join(f"{tier} {v}" for tier, v in sorted(index["promoted"].items())) if index else "–"
            t.add_row(name, str(len(index["versions"])) if index else "–", promoted or "–")
        c.print(t)
        return
    index = read_index(store, family)
    tiers = list(dict.fromkeys(t for v in index["versions"] for t in v["tiers"]))
    t = Table(title=f"{family}: versions (average score per tier)",
              caption="★ promoted now · ✓ passed the gate, since superseded · ✗ kept, not promoted")
    for col in ("version", "run", "created", *tiers):
        t.add_column(col, overflow="fold")
    for v in index["versions"]:
        cells = []
        for tier in tiers:
            e = v["tiers"].get(tier)
            mark = "" if e is None else "★" if index["promoted"].get(tier) == v["version"] else \
                "✓" if e["promoted"] else "✗"
            cells.append(f"{mark} {_avg(e['average'])}" if e else "")
        t.add_row(v["version"], v["run_id"], v["created"][:16].replace("T", " "), *cells)
    c.print(t)


def _picks(index: dict, family: str, version: str | None, tier: str | None) -> list[tuple[str, str, dict]]:
    """(version, tier, index entry) to show: one version's tiers, or each tier's promoted version."""
    if version is None:
        chosen = {tier: index["promoted"].get(tier)} if tier else dict(sorted(index["promoted"].items()))
        if not all(chosen.values()):
            raise RuyiError(f"{family} has no promoted {tier!r} tier: pass --version, or one of "
                            f"{', '.join(index['promoted']) or 'no tiers'}")
        return [(v, t, tier_entry(index, v, t)) for t, v in chosen.items()]
    tiers = [tier] if tier else version_entry(index, version)["tiers"]
    return [(version, t, tier_entry(index, version, t)) for t in tiers]


@models_app.command("show")
def show_command(family: str, version: str | None = typer.Option(None, help="default: each tier's promoted one"),
                 tier: str | None = typer.Option(None, help="default: every tier"),
                 spec: Path | None = typer.Option(None, help=SPEC_HELP)) -> None:
    """A package's gate decision and model card."""
    store, c = open_store(spec), Console()
    index = read_index(store, family)
    for v, t, e in _picks(index, family, version, tier):
        state = "promoted now" if index["promoted"].get(t) == v else "passed the gate" if e["promoted"] else "kept"
        c.print(f"[bold]{family} {v} {t}[/]  {e['uri']}\n{state}: {e['reason']}", highlight=False, soft_wrap=True)
        with tempfile.TemporaryDirectory(prefix="ruyi-card-") as d:
            store.get_file(f"{e['uri']}/README.md", Path(d) / "README.md")
            c.print((Path(d) / "README.md").read_text(), markup=False, highlight=False, soft_wrap=True)


def _wanted(key: PackageKey | None, version: str | None, tier: str | None) -> bool:
    """Whether a listed artifact is a package of this version and tier (any, where None)."""
    if version is None and tier is None:
        return True
    return key is not None and version in (None, key.version) and tier in (None, key.tier)


@models_app.command("verify")
def verify_command(target: str | None = typer.Argument(None, help="a family, or the s3:// URI of a package or of "
                                                                  "a prefix holding packages"),
                   version: str | None = typer.Option(None, help="only this version"),
                   tier: str | None = typer.Option(None, help="only this tier"),
                   path: Path | None = typer.Option(None, "--path", help="check a local package folder instead"),
                   spec: Path | None = typer.Option(None, help=SPEC_HELP)) -> None:
    """Download each package and check its files against its SHA256SUMS (independently of the store's manifest
    check), and that every tier the family's index promotes still has its package; exits 1 with one line per
    problem. A package that fails is removed from the store, and stays a problem until a run of its spec
    rebuilds and republishes it."""
    if (target is None) == (path is None):
        raise RuyiError("say what to verify: a family, an s3:// URI, or --path DIR (one of them)")
    if path is not None:
        results = [(str(path), verify_package(path))]
    else:
        store = open_store(spec, target)
        results = [] if target.startswith("s3://") else _promoted_absent(store, target, version, tier)
        prefix = target if target.startswith("s3://") else family_prefix(target)
        uris = [u for u in store.list_artifacts(prefix) if _wanted(parse_package(store.split(u)[1]), version, tier)]
        if not uris and not results:
            raise RuyiError(f"no packages under {store.normalize_uri(prefix)}"
                            + (f" for version {version}" if version else "") + (f" tier {tier}" if tier else "")
                            + (": that is the default bucket; pass --spec with the run's spec (its store section), "
                               "set RUYI_S3_BUCKET, or give the package's s3:// URI"
                               if spec is None and not target.startswith("s3://") else ""))
        for uri in uris:
            with tempfile.TemporaryDirectory(prefix="ruyi-verify-") as d:
                try:
                    store.get_artifact(uri, d)
                except IntegrityError as e:  # the stored bytes do not even match the manifest
                    results.append((uri, [str(e)]))
                    continue
                results.append((uri, verify_package(Path(d))))
    c = Console()
    for label, problems in results:
        for p in problems:
            c.print(f"[red]FAILED[/] {label}: {p}", highlight=False, soft_wrap=True)
        if not problems:
            c.print(f"[green]OK[/] {label}", highlight=False, soft_wrap=True)
    if any(p for _, p in results):
        raise typer.Exit(1)


def _promoted_absent(store: ArtifactStore, family: str, version: str | None,
                     tier: str | None) -> list[tuple[str, list[str]]]:
    """A problem for each package the family's index promotes (of `version`, `tier`) that is not in the store."""
    index = read_index(store, family, missing_ok=True)
    if index is None:
        return []
    return [(uri, [f"the index promotes {family} {v} {t} but its package is missing (removed as corrupt?): run "
                   "the spec that built it again, which rebuilds and republishes it"])
            for v, t, uri in absent_packages(store, index) if version in (None, v) and tier in (None, t)]


@models_app.command("deploy")
def deploy_command(family: str = typer.Argument(..., help="a family in the registry"),
                   tier: str | None = typer.Option(None, help="only this tier's service (default: every promoted "
                                                              "tier and the family server)"),
                   chain: str | None = typer.Option(None, help="instead, a role per tier, shallowest first "
                                                               "(comma-separated, e.g. end,edge,cloud): each "
                                                               "serves its tier and hands FAMILY:auto on to the "
                                                               "next"),
                   api_key_secret: str | None = typer.Option(None, help="with --chain: a Secret holding each "
                                                                        "role's API key under its tier's name"),
                   gpu: bool = typer.Option(False, help="GPU services: vLLM backend, one GPU each"),
                   namespace: str = typer.Option("ruyi", help="Kubernetes namespace"),
                   spec: Path | None = typer.Option(None, help=SPEC_HELP + "; also the image and S3 Secret")) -> None:
    """Print KServe InferenceServices for the promoted tiers (`kubectl apply -f -`), with the S3 credentials'
    ServiceAccount and Secret template; or, with --chain, a service per role of a split deployment."""
    from ruyi_core.package.deploy import chain_services, family_manifests, to_yaml
    from ruyi_core.spec import PipelineSpec, load_spec

    if chain is not None and tier is not None:
        raise RuyiError("--chain and --tier are two kinds of deployment: pass one")
    if api_key_secret is not None and chain is None:
        raise RuyiError("--api-key-secret goes with --chain (the keys between its roles)")
    store = open_store(spec)
    run = load_spec(spec) if spec is not None else None
    index = read_index(store, family)
    if tier is not None and tier not in index["promoted"]:
        have = ", ".join(index["promoted"]) or "none"
        raise RuyiError(f"{family} has no promoted {tier!r} tier: promoted are {have}")
    pipe = run.pipeline if run is not None else PipelineSpec()
    where = run.store if run is not None else store.spec
    if chain is not None:
        # The roles read the store with the spec's S3 Secret, as the family server does: no KServe credentials.
        docs = chain_services(index, [t.strip() for t in chain.split(",")], store=where, image=pipe.image,
                              s3_secret=pipe.s3_secret, namespace=namespace, key_secret=api_key_secret, gpu=gpu)
    else:
        docs = family_manifests(index, store=where, image=pipe.image, s3_secret=pipe.s3_secret,
                                namespace=namespace, tier=tier, gpu=gpu)
    print(to_yaml(docs), end="")
