"""The run report: per-tier table, data-gate results, and the lineage chain as a picture (Markdown + HTML)."""
from __future__ import annotations

import base64
import html
import io

from ruyi_core.store import Manifest


def _label(uri: str) -> str:
    """The informative tail of an artifact key: run ids and long hashes shortened."""
    parts = uri.split("/", 3)[-1].split("/")
    if parts[0] == "runs" and len(parts) > 2:
        parts = parts[2:]
    return "/".join(p[:10] if len(p) > 12 else p for p in parts)


def lineage_png(chain: list[Manifest]) -> bytes:
    """The chain drawn left (raw data) to right (the artifact): one box per manifest, arrows for inputs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_uri = {m.uri: m for m in chain}
    level: dict[str, int] = {}

    def depth(uri: str) -> int:  # longest path from a root
        if uri not in level:
            ins = [i.uri for i in by_uri[uri].inputs if i.uri in by_uri]
            level[uri] = 1 + max((depth(i) for i in ins), default=-1)
        return level[uri]

    for m in chain:
        depth(m.uri)
    cols: dict[int, list[str]] = {}
    for uri, lv in sorted(level.items(), key=lambda kv: kv[0]):
        cols.setdefault(lv, []).append(uri)
    pos = {u: (2.4 * lv, -1.2 * i) for lv, us in cols.items() for i, u in enumerate(us)}
    fig, ax = plt.subplots(figsize=(3.3 * len(cols), 1.2 + 1.0 * max(len(v) for v in cols.values())))
    boxes = {}
    for m in chain:
        x, y = pos[m.uri]
        label = f"{m.stage}\n{_label(m.uri)}\nsha {m.sha256()[:10]} · {len(m.files)} files"
        boxes[m.uri] = ax.text(x, y, label, ha="center", va="center", fontsize=7, family="monospace", zorder=3,
                               bbox=dict(boxstyle="round,pad=0.4", fc="#eef4fb", ec="#3b6ea5"))
    for m in chain:  # arrows run between the boxes' edges, from input to output
        for i in m.inputs:
            if i.uri in boxes:
                ax.annotate("", xy=(0, 0.5), xycoords=boxes[m.uri], xytext=(1, 0.5), textcoords=boxes[i.uri],
                            arrowprops=dict(arrowstyle="-|>", color="#555", shrinkA=4, shrinkB=4), zorder=2)
    xs, ys = [p[0] for p in pos.values()], [p[1] for p in pos.values()]
    ax.set_xlim(min(xs) - 1.1, max(xs) + 1.1)
    ax.set_ylim(min(ys) - 0.7, max(ys) + 0.7)
    ax.axis("off")
    ax.set_title("lineage: raw data → tiers", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


CAPTIONS = {"cpt": "CPT: loss per exit", "sft": "SFT: loss per exit", "dae_cpt": "DaE CPT: loss per exit",
            "dae_sft": "DaE SFT: loss per exit", "grpo": "GRPO: reward per step",
            "svd_compress": "SVD sweep: held-out loss vs tier size"}


def _dae_lines(chain: list[Manifest]) -> list[str]:
    """Measured DaE / GRPO / SVD outcomes, from the stages' manifests."""
    by_stage = {m.stage: m.metadata for m in chain}
    lines = []
    if "svd_compress" in by_stage:
        s = by_stage["svd_compress"]
        lines += [f"- DaE tier {s['tier']}: held-out loss {s['heldout_loss_unexpanded']:.4f} unexpanded -> "
                  f"{s['heldout_loss_dense']:.4f} after DaE training",
                  f"- SVD at ratio {s['ratio']}: removed {s['removed_fraction']:.1%} of the added parameters, held-out "
                  f"loss {s['heldout_loss_compressed']:.4f} ({s['relative_drop']:+.2%} relative)"]
    if "grpo" in by_stage:
        g = by_stage["grpo"]
        lines.append(f"- GRPO on tier {g['tier']}: held-out mean reward {g.get('heldout_reward_before', 0):.3f} -> "
                     f"{g.get('heldout_reward_after', 0):.3f}")
    return (["", "## DaE and GRPO", ""] + lines) if lines else []


TIER_COLS = [("tier", "tier"), ("exit_point", "exit"), ("depth", "depth"), ("parameters", "parameters"),
             ("weight_bytes", "bytes"), ("sample", "greedy sample"), ("uri", "store URI")]


def render(run_id: str, tiers: list[dict], datasets: list[dict], chain: list[Manifest],
           curves: dict[str, bytes] | None = None) -> tuple[str, str, bytes]:
    """Markdown, HTML and the lineage PNG for one run; `curves` are training stages' loss-curve PNGs."""
    curves = curves or {}
    tiers = sorted(tiers, key=lambda r: r["exit_point"])
    md = [f"# Ruyi Flow run `{run_id}`", "", "## Tiers", "",
          "| " + " | ".join(h for _, h in TIER_COLS) + " |", "|" + "---|" * len(TIER_COLS)]
    md += ["| " + " | ".join(str(r.get(k, "")).replace("|", "\\|").replace("\n", " ") for k, _ in TIER_COLS) + " |"
           for r in tiers]
    md += ["", "## Data", "", "| kind | documents | fingerprint | packed tokens | store URI |", "|---|---|---|---|---|"]
    md += [f"| {d['kind']} | {d.get('n_docs', '')} | {d.get('fingerprint', '')[:16]} | {d.get('n_tokens', '')} "
           f"| {d['uri']} |" for d in datasets]
    trained = [m for m in chain if m.stage in ("cpt", "sft", "dae_cpt", "dae_sft")]
    if trained:
        md += ["", "## Training (mean loss per exit, first step -> last step)", "",
               "| stage | steps | " + " | ".join(f"exit {p}" for p in trained[0].metadata["exit_points"]) + " |",
               "|---|---|" + "---|" * len(trained[0].metadata["exit_points"])]
        md += [f"| {m.stage} | {m.metadata['steps']} | " + " | ".join(
            f"{a:.3f} → {b:.3f}" for a, b in zip(m.metadata["first_exit_losses"], m.metadata["final_exit_losses"]))
            + " |" for m in trained]
    md += _dae_lines(chain)
    md += ["", "## Lineage", ""] + [f"- `{m.stage}` {m.uri} (manifest sha256 {m.sha256()[:16]})" for m in chain]
    png = lineage_png(chain) if chain else b""

    def table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for _, h in cols)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(k, '')))}</td>" for k, _ in cols) + "</tr>"
                       for r in rows)
        return f"<table><tr>{head}</tr>{body}</table>"

    data_cols = [("kind", "kind"), ("n_docs", "documents"), ("n_tokens", "packed tokens"), ("uri", "store URI")]
    img = f'<img alt="lineage" src="data:image/png;base64,{base64.b64encode(png).decode()}">' if png else ""
    loss_imgs = "".join(f'<figure><img alt="{s} loss" src="data:image/png;base64,{base64.b64encode(b).decode()}">'
                        f"<figcaption>{CAPTIONS.get(s, s)}</figcaption></figure>" for s, b in curves.items())
    dae = "".join(f"<li>{html.escape(line[2:])}</li>" for line in _dae_lines(chain) if line.startswith("- "))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Ruyi Flow {html.escape(run_id)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px}}th{{background:#f3f6fa}}</style></head><body>
<h1>Ruyi Flow run <code>{html.escape(run_id)}</code></h1><h2>Tiers</h2>{table(tiers, TIER_COLS)}
<h2>Training</h2>{loss_imgs or "<p>no training stage</p>"}{f"<h2>DaE and GRPO</h2><ul>{dae}</ul>" if dae else ""}
<h2>Data</h2>{table(datasets, data_cols)}<h2>Lineage</h2>{img}</body></html>"""
    return "\n".join(md) + "\n", page, png
