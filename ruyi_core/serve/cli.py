"""`ruyi serve`: a family behind an OpenAI-compatible HTTP API, one trunk in memory."""
from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console

from ruyi_core.errors import RuyiError


def load_served(family: Path | None, registry: str | None, version: str | None, spec: Path | None, log,
                only: list[str] | None = None):
    """The family to serve (its `only` tiers, when named): a family folder, or its packages from the registry."""
    from ruyi_core.runtime import resolve
    from ruyi_core.serve.tiers import from_family, from_registry
    from ruyi_core.spec import RuntimeSpec, load_spec

    if (family is None) == (registry is None):
        raise RuyiError("say what to serve: --family DIR, or --registry FAMILY")
    runtime = resolve(load_spec(spec).runtime if spec is not None else RuntimeSpec())
    if family is not None:
        if version is not None:
            raise RuyiError("--version goes with --registry")
        return from_family(family, runtime, only=only)
    from ruyi_core.package.cli import open_store

    return from_registry(open_store(spec), registry, runtime, version, log=log, only=only)


def calibrated_draft(served) -> dict:
    """`--draft auto`: the policy the family's routing calibration measured fastest (ruyi_core.serve.route)."""
    draft = (served.routing or {}).get("draft")
    if not draft:
        raise RuyiError(f"--draft auto: {served.name} has no calibrated draft policy (its version's routing "
                        "calibration found none faster, or there is none): name a draft tier")
    return draft


def _check_draft(served, draft: str | None, skip: int) -> None:
    """Refused before serving: an unknown draft tier, or a skip that leaves it no block of its own."""
    from ruyi_core.serve.decode import shared_depth

    if draft is None:
        return
    if draft not in served.tiers:
        raise RuyiError(f"--draft {draft}: {served.name} has tiers {', '.join(served.tiers)}")
    own = served.depth(draft) - max(shared_depth(served.tiers[draft], served.tiers[served.deepest]), 0)
    if skip >= own:
        raise RuyiError(f"--draft-skip {skip}: the {draft} tier has {own} blocks of its own beside the "
                        f"{served.deepest} tier; skip at most {own - 1}")


def serve_command(family: Path | None = typer.Option(None, help="a family folder (all its tiers)"),
                  registry: str | None = typer.Option(None, help="a family in the model registry: its promoted "
                                                                 "package per tier"),
                  version: str | None = typer.Option(None, help="with --registry: this version's packages"),
                  spec: Path | None = typer.Option(None, help="run spec YAML: its store section locates the "
                                                              "registry, its runtime section the device"),
                  host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0: every interface)"),
                  port: int = typer.Option(8000, min=1, max=65535),
                  max_batch: int = typer.Option(8, min=1, help="requests decoded together at most"),
                  draft: str | None = typer.Option(None, help="decode greedy requests to deeper tiers "
                                                              "self-speculatively, this tier drafting (auto: "
                                                              "the policy the routing calibration measured "
                                                              "fastest, with its tokens, skip and min p)"),
                  draft_tokens: int = typer.Option(8, min=1, max=16, help="tokens drafted per round, at most"),
                  draft_skip: int = typer.Option(0, min=0, help="the draft leaves out its last N blocks (a cheaper "
                                                                "draft, e.g. the end tier's DaE blocks)"),
                  draft_min_p: float = typer.Option(0.0, min=0.0, max=1.0, help="a round stops drafting after a "
                                                                                 "token the draft gives less "
                                                                                 "probability than this"),
                  api_key: str | None = typer.Option(None, envvar="RUYI_API_KEY", show_envvar=True,
                                                     help="answer /v1 only for requests bearing this key "
                                                          "(Authorization: Bearer KEY; others get 401), as vLLM's "
                                                          "--api-key and VLLM_API_KEY: for a server on a shared "
                                                          "network"),
                  max_body_bytes: int | None = typer.Option(None, min=1, help="refuse larger request bodies "
                                                                              "(413) before reading them; default "
                                                                              "32 bytes per context token, at "
                                                                              "least 1 MiB"),
                  tiers: str | None = typer.Option(None, help="serve only these tiers (comma-separated), loading "
                                                              "only their packages"),
                  upstream: str | None = typer.Option(None, help="a server of deeper tiers (http://HOST:PORT): "
                                                                 "FAMILY:auto hands on to it what these tiers are "
                                                                 "unsure of"),
                  upstream_timeout: float = typer.Option(10.0, min=0.1, help="seconds to wait for the upstream "
                                                                             "to connect, then to answer, before "
                                                                             "answering here, flagged"),
                  upstream_key: str | None = typer.Option(None, envvar="RUYI_UPSTREAM_KEY", show_envvar=True,
                                                          help="the upstream's API key"),
                  handoff: str = typer.Option("auto", help="what a hand-off sends upstream: tokens (the ids), "
                                                           "state (also the shared trunk's keys and values), "
                                                           "split (the trunk's output, token by token, while "
                                                           "this server runs the trunk), or auto (the cheapest "
                                                           "for --link-mbps); all exact"),
                  link_mbps: float = typer.Option(100.0, min=0.001, help="the link to the upstream, in Mbit/s, "
                                                                         "for --handoff auto")):
    """Serve every tier of a family over an OpenAI-compatible API (/v1/chat/completions, /v1/completions,
    /v1/models; streaming; an open /health), one shared trunk in memory. Models are named FAMILY:TIER."""
    import uvicorn

    from ruyi_core.serve.api import create_app
    from ruyi_core.serve.upstream import Upstream

    from transformers.utils import logging as hf_logging

    if handoff not in ("tokens", "state", "split", "auto"):
        raise RuyiError(f"--handoff {handoff}: choose tokens, state, split or auto")
    hf_logging.disable_progress_bar()  # the server's own lines only
    c = Console(stderr=True)
    only = [t.strip() for t in tiers.split(",")] if tiers is not None else None
    served = load_served(family, registry, version, spec, lambda m: c.print(f"[dim]{m}[/]", highlight=False), only)
    if draft == "auto":
        d = calibrated_draft(served)
        draft, draft_tokens, draft_skip, draft_min_p = d["tier"], d["tokens"], d["skip"], d["min_p"]
        c.print(f"[dim]draft policy from the calibration: {draft}, {draft_tokens} tokens, skip {draft_skip}, "
                f"min p {draft_min_p} ({d['speedup']:.2f}x measured)[/]", highlight=False)
    _check_draft(served, draft, draft_skip)
    up = Upstream(upstream, upstream_timeout, upstream_key, handoff, link_mbps) if upstream else None
    app = create_app(served, max_batch=max_batch, draft=draft, draft_tokens=draft_tokens, api_key=api_key,
                     max_body_bytes=max_body_bytes, upstream=up, draft_skip=draft_skip, draft_min_p=draft_min_p)
    own = sum(p.numel() for m in served.tiers.values() for p in m.parameters())
    c.print(f"serving {served.name}" + (f" {served.version}" if served.version else "") + " at "
            f"http://{host}:{port}/v1: " + ", ".join(f"{served.name}:{t}" for t in served.tiers)
            + f" ({served.parameters_in_memory() / 1e6:.1f}M parameters in memory for {own / 1e6:.1f}M "
            "across the tiers)" + ("; API key required" if api_key else "")
            + (f"; auto hands on to {upstream}" if upstream else ""), highlight=False, soft_wrap=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level=os.environ.get("RUYI_SERVE_LOG", "warning"))
    except OSError as e:
        raise RuyiError(f"cannot listen on {host}:{port} ({e.strerror or e}): pick another --port") from None
