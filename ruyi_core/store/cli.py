"""`ruyi store serve|stop` and `ruyi lineage URI`. The lead mounts `store_app` and `lineage_command` into the
main CLI, which prints any RuyiError (StoreError included) as one line."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer
from rich.console import Console

from ruyi_core.errors import RuyiError
from ruyi_core.store.server import DEFAULT_ROOT, serve, stop

store_app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                        help="Run a local S3 server (SeaweedFS) and inspect stored artifacts.")


def _console() -> Console:
    return Console()


@store_app.command("serve")
def serve_command(root: Path = typer.Option(DEFAULT_ROOT, "--root", help="folder for data, credentials and log"),
                  port: int | None = typer.Option(None, "--port", help="S3 port (default: a free one)")) -> None:
    """Start (or reuse) the local S3 server; credentials go to ROOT/s3.env, never to the terminal."""
    srv = serve(root, port)
    env_file = srv.root / "s3.env"
    c = _console()
    c.print(f"object store ready at [bold]{srv.endpoint}[/] (pid {srv.pid}, log {srv.log})", highlight=False,
            soft_wrap=True)
    c.print(f"credentials in {env_file} (mode 0600); use them with:", highlight=False)
    c.print(f"  set -a; source {env_file}; set +a", highlight=False, soft_wrap=True)


@store_app.command("stop")
def stop_command(root: Path = typer.Option(DEFAULT_ROOT, "--root", help="folder the server was started with")) -> None:
    """Stop the local S3 server (data and credentials stay for the next `serve`)."""
    c = _console()
    c.print("stopped the local object store" if stop(root) else f"no local object store is running from {root}")


@store_app.command("lineage")
def lineage_command(uri: str, spec: Path | None = None,
                    as_json: bool = typer.Option(False, "--json", help="print the chain as JSON, for scripts")) -> None:
    """Print an artifact and, transitively, the artifacts it was built from: a tree, or JSON with --json."""
    from ruyi_core.spec import StoreSpec, load_spec
    from ruyi_core.store.artifact import ArtifactStore
    from ruyi_core.store.lineage import lineage, lineage_json, lineage_tree

    store_spec = load_spec(spec).store if spec is not None else StoreSpec()
    if uri.startswith("s3://"):  # connect to the URI's bucket
        store_spec = store_spec.model_copy(update={"bucket": uri[5:].partition("/")[0] or store_spec.bucket})
    store = ArtifactStore.from_spec(store_spec, env=os.environ, create_bucket=False)  # a lookup creates nothing
    chain = lineage(store, uri)
    # plain text: a pipe or a narrow terminal gets the same lines, unwrapped
    typer.echo(json.dumps(lineage_json(chain), indent=2) if as_json else "\n".join(lineage_tree(chain)))


if __name__ == "__main__":  # python -m ruyi_core.store.cli ...
    try:
        store_app(standalone_mode=False)
    except RuyiError as e:
        _console().print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
