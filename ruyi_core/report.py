"""The run report: per-tier table, data-gate results, and the lineage chain as a picture (Markdown + HTML)."""
from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field

from ruyi_core.plots import axes, png
from ruyi_core.store import Manifest


@dataclass
class Measured:
    """What the run's stages measured, picked out of its lineage by the stage table (stages/report.py): the
    training stages' manifests in run order, GRPO's measurements, SVD's result (svd_result.json), the calibrated
    `auto` routing (serve/route.py), and the stages' figures by caption."""

    trained: list[Manifest] = field(default_factory=list)
    grpo: dict | None = None
    svd: dict | None = None
    routing: dict | None = None
    figures: dict[str, bytes] = field(default_factory=dict)
    ablations: dict = field(default_factory=dict)  # the version's recorded ablations (package/registry.py)


ABLATION_COLS = [("tier", "tier"), ("benchmark", "benchmark"), ("family", "family"), ("ablation", "control"),
                 ("better", "family better by")]


def ablation_rows(entry: dict) -> list[dict]:
    def num(v: float) -> str:
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"

    return [{"tier": r["tier"], "benchmark": r["benchmark"], "family": num(r["family"]), "ablation": num(r["ablation"]),
             "better": f"{r['family_better_by']:+.1%}"} for r in entry["rows"]]


def ablation_lines(ablations: dict) -> list[str]:
    """Each ablation against its control (the same compute without the method), as Markdown tables."""
    md = []
    for name, entry in ablations.items():
        md += ["", f"### {name}: {entry['what']} (control family {entry['ablated_family']})", "",
               "| " + " | ".join(h for _, h in ABLATION_COLS) + " |", "|" + "---|" * len(ABLATION_COLS)]
        md += ["| " + " | ".join(r[k] for k, _ in ABLATION_COLS) + " |" for r in ablation_rows(entry)]
    return (["", "## Ablations"] + md) if md else []


def _label(uri: str) -> str:
    """The informative tail of an artifact key: run ids and long hashes shortened."""
    parts = uri.split("/", 3)[-1].split("/")
    if parts[0] == "runs" and len(parts) > 2:
        parts = parts[2:]
    return "/".join(p[:10] if len(p) > 12 else p for p in parts)


def lineage_png(chain: list[Manifest]) -> bytes:
    """The chain drawn left (raw data) to right (the artifact): one box per manifest, arrows for inputs."""
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
    fig, ax = axes(3.3 * len(cols), 1.2 + 1.0 * max(len(v) for v in cols.values()))
    boxes = {}
    for m in chain:
        x, y = pos[m.uri]
        label = f"{m.stage}\n{_label(m.uri)}\nsha {m.content_sha256()[:10]} · {len(m.files)} files"
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
    return png(fig, dpi=110, crop=True)


def time_lines(chain: list[Manifest]) -> list[str]:
    """Wall time of every stage behind this run, from the manifests (artifacts reused from earlier runs included)."""
    timed = sorted((m for m in chain if m.build_seconds is not None), key=lambda m: m.created_at)
    if not timed:
        return []
    lines = ["", "## Stage wall times", "", "| stage | seconds | peak MiB | artifact |", "|---|---|---|---|"]
    lines += [f"| {m.stage} | {m.build_seconds:.1f} | {_peak(m)} | {m.uri} |" for m in timed]
    return lines + [f"| total | {sum(m.build_seconds for m in timed):.1f} | | |"]


def _peak(m: Manifest) -> str:
    return f"{m.build_peak_mib:,.0f}" if m.build_peak_mib is not None else "-"


def training_lines(trained: list[Manifest]) -> list[str]:
    """Each training stage's mean loss per exit, first step -> last; a DaE stage trains (and logs) one exit."""
    if not trained:
        return []
    points = sorted({p for m in trained for p in m.metadata["exit_points"]})
    lines = ["", "## Training (mean loss per exit, first step -> last step; — not trained)", "",
             "| stage | steps | " + " | ".join(f"exit {p}" for p in points) + " |", "|---|---|" + "---|" * len(points)]
    for m in trained:
        got = {p: f"{a:.3f} → {b:.3f}" for p, a, b in zip(
            m.metadata["exit_points"], m.metadata["first_exit_losses"], m.metadata["final_exit_losses"])}
        lines.append(f"| {m.stage} | {m.metadata['steps']} | " + " | ".join(got.get(p, "—") for p in points) + " |")
    return lines


def _dae_lines(grpo: dict | None, svd: dict | None) -> list[str]:
    """Measured DaE / GRPO / SVD outcomes: GRPO's manifest, SVD's result."""
    lines, g, s = [], grpo or {}, svd
    if s:
        # GRPO on the DaE tier sits between DaE's training and compression: its held-out loss before GRPO is DaE's.
        after_grpo = g.get("tier") == s["tier"] and "heldout_text_loss_before" in g
        steps = (f"{g['heldout_text_loss_before']:.4f} after DaE training -> {s['heldout_loss_dense']:.4f} after GRPO"
                 if after_grpo else f"{s['heldout_loss_dense']:.4f} after DaE training")
        lines += [f"- DaE tier {s['tier']}: held-out loss {s['heldout_loss_unexpanded']:.4f} unexpanded -> {steps}",
                  f"- SVD at ratio {s['ratio']}: removed {s['removed_fraction']:.1%} of the added parameters, held-out "
                  f"loss {s['heldout_loss_compressed']:.4f} ({s['relative_drop']:+.2%} relative)"]
    if g:
        lines.append(f"- GRPO on tier {g['tier']}: held-out mean reward {g['heldout_reward_before']:.3f} -> "
                     f"{g['heldout_reward_after']:.3f} ({g['heldout_samples']} samples per prompt at temperature "
                     f"{g['temperature']:g}, {g['heldout_prompts']} prompts never trained on); greedy exact answers "
                     f"{g['heldout_exact_greedy_before']:.3f} -> {g['heldout_exact_greedy_after']:.3f}"
                     + (f"; held-out text loss {g['heldout_text_loss_before']:.4f} -> "
                        f"{g['heldout_text_loss_after']:.4f}" if "heldout_text_loss_before" in g else ""))
    return (["", "## DaE and GRPO", ""] + lines) if lines else []


TIER_COLS = [("tier", "tier"), ("exit_point", "exit"), ("depth", "depth"), ("parameters", "parameters"),
             ("weight_bytes", "bytes")]
SPEED_COLS = [("prefill", "prefill tok/s"), ("decode", "decode tok/s"), ("memory", "peak MiB")]


def _num(v, digits: int = 3) -> str:
    return "" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def tier_rows(tiers: list[dict], benchmarks: list[str]) -> list[dict]:
    """One flat row per tier for the tables: shape, every benchmark, the average, speed and the gate's verdict."""
    rows = []
    for t in tiers:
        ev, speed = t.get("evaluation") or {}, (t.get("evaluation") or {}).get("speed") or {}
        row = {k: t.get(k, "") for k, _ in TIER_COLS}
        row.update({b: _num(ev.get("benchmarks", {}).get(b, {}).get("value")) for b in benchmarks})
        row.update({"average": _num(ev.get("average")), "prefill": _num(speed.get("prefill_tokens_per_s"), 0),
                    "decode": _num(speed.get("decode_tokens_per_s"), 0),
                    "memory": _num(speed.get("peak_memory_mib"), 1)})
        gate = t.get("gate") or {}
        row["promoted"] = ("yes" if gate.get("promoted") else "kept") if gate else ""
        rows.append(row)
    return rows


def family_lines(tiers: list[dict]) -> list[str]:
    """Each package against the family at the same exit: equal for a plain export (the same weights, so it was
    evaluated once), the cost of compression for an SVD-compressed tier."""
    lines = []
    for t in tiers:
        ev = t.get("evaluation") or {}
        fam = ev.get("family")
        if not fam:
            continue
        if ev.get("family_same_weights"):
            lines.append(f"- {t['tier']}: the same weights as the family's exit, so the same scores (evaluated once)")
            continue
        diffs = [f"{b} {r['value']:.4g} vs {fam[b]:.4g}" for b, r in ev["benchmarks"].items()
                 if b in fam and r["value"] != fam[b]]
        lines.append(f"- {t['tier']}: " + ("; ".join(diffs) if diffs else "identical scores")
                     + (f" ({t['compressed']})" if t.get("compressed") else ""))
    return (["", "Packaged tier vs the family at the same exit:", ""] + lines) if lines else []


def _inversions(tiers: list[dict]):
    """(benchmark, deeper row, shallower row, deeper result, shallower result, beyond noise) for every benchmark
    where a deeper tier scores worse than a shallower one. An accuracy over n items is beyond noise when the gap
    passes twice the standard error of the difference of two proportions (the items' sampling error); a
    perplexity, or a score without its n, always is."""
    tiers = sorted(tiers, key=lambda r: r["exit_point"])
    for i, deep in enumerate(tiers):
        for b, r in (deep.get("evaluation") or {}).get("benchmarks", {}).items():
            for shallow in tiers[:i]:
                s = (shallow.get("evaluation") or {}).get("benchmarks", {}).get(b)
                if s is None:
                    continue
                higher = r.get("higher_is_better", True)
                if not (r["value"] < s["value"] if higher else r["value"] > s["value"]):
                    continue
                n, p, q = r.get("n"), r["value"], s["value"]
                noise = (2 * math.sqrt((p * (1 - p) + q * (1 - q)) / n)
                         if n and higher and 0 <= p <= 1 and 0 <= q <= 1 else 0.0)
                yield b, deep, shallow, r, s, abs(q - p) > noise


def depth_flags(tiers: list[dict]) -> list[str]:
    """Deeper tiers should score at least as well as shallower ones: one line per benchmark where one does not,
    beyond the benchmark's sampling error."""
    return [f"{b}: {deep['tier']} ({r['value']:.4g}) scores below the shallower {shallow['tier']} ({s['value']:.4g})"
            for b, deep, shallow, r, s, beyond in _inversions(tiers) if beyond]


def depth_ties(tiers: list[dict]) -> list[str]:
    """The inversions within sampling error: a tie the benchmark cannot tell apart, not a failure of depth."""
    return [f"{b}: {deep['tier']} ({r['value']:.4g}) below the shallower {shallow['tier']} ({s['value']:.4g}) "
            f"within the sampling error of {r['n']} items" for b, deep, shallow, r, s, beyond in _inversions(tiers)
            if not beyond]


def speed_lines(tiers: list[dict]) -> list[str]:
    """Each tier's decode time per token against the deepest tier's, beside the ideal of its share of the blocks
    (packages are measured one at a time on one machine, so the ratio is the model's, not the scheduler's)."""
    timed = [(t["tier"], t.get("depth"), ((t.get("evaluation") or {}).get("speed") or {}).get("decode_tokens_per_s"))
             for t in sorted(tiers, key=lambda r: r["exit_point"])]
    timed = [x for x in timed if x[1] and x[2]]
    if len(timed) < 2:
        return []
    _, deepest, rate = timed[-1]
    return ["", "Decode time per token against the deepest tier (ideal: the share of its blocks):", ""] + [
        f"- {tier}: {rate / r:.2f}× (ideal {depth / deepest:.2f}×, {depth} of {deepest} blocks)"
        for tier, depth, r in timed[:-1]]


def _png(fig, ax) -> bytes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png(fig)


def quality_png(tiers: list[dict]) -> bytes:
    """Each higher-is-better benchmark and the average against the tier's parameter count."""
    fig, ax = axes(6)
    tiers = sorted(tiers, key=lambda r: r["parameters"])
    xs = [t["parameters"] / 1e6 for t in tiers]
    names = sorted({b for t in tiers for b, r in t["evaluation"]["benchmarks"].items() if r.get("higher_is_better")})
    for b in names:
        ax.plot(xs, [t["evaluation"]["benchmarks"].get(b, {}).get("value", float("nan")) for t in tiers], marker="o",
                label=b)
    ax.plot(xs, [t["evaluation"].get("average") or float("nan") for t in tiers], marker="s", lw=2, color="k",
            label="average")
    for x, t in zip(xs, tiers):
        ax.annotate(t["tier"], (x, 0), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=8)
    ax.set_xlabel("tier parameters (M)")
    ax.set_ylabel("score")
    ax.set_ylim(0, 1.05)
    ax.set_title("quality vs parameters")
    return _png(fig, ax)


def routing_lines(routing: dict | None) -> list[str]:
    """The calibrated `auto` routing: every tier's own quality, the chosen operating point, the curve's ends."""
    if not routing:
        return []
    op = routing["operating_point"]
    share = ", ".join(f"{t} {v:.0%}" for t, v in op["answered_by"].items())
    lines = ["", "## Adaptive routing (`auto`)", "",
             f"- calibrated on {routing['questions']} held-out questions; rule: {routing['rule']}",
             "- each tier alone: " + ", ".join(f"{t} {q:.3f}" for t, q in routing["tier_quality"].items()),
             f"- operating point: threshold {op['threshold']:.4f}: quality {op['quality']:.3f} at "
             f"{op['compute']:.0%} of the deepest tier's compute (answered by {share}); within "
             f"{routing['tolerance']} of the deepest tier's quality"]
    if routing.get("draft_acceptance"):  # the price of grading: a deeper tier keeps less of a shallower one's draft
        lines.append("- draft acceptance (share of the deepest tier's answer tokens a tier's own answer drafts): "
                     + ", ".join(f"{t} {v:.3f}" for t, v in routing["draft_acceptance"].items()))
    if d := routing.get("draft"):
        lines.append(f"- self-speculation (`ruyi serve --draft auto`): {d['tier']} drafting {d['tokens']} tokens "
                     f"without its last {d['skip']} blocks, a round stopped below p {d['min_p']}: "
                     f"{d['speedup']:.2f}× the deepest tier alone on {d['prompts']} questions, the same answers"
                     + (f"; ceiling {d['ceiling']:.2f}× if every draft were accepted (at Ruyi2's proportions, exits "
                        f"[2, 21, 39] of 40: {d['ceiling_at_ruyi2_proportions']:.2f}×)" if "ceiling" in d else ""))
    return lines


def routing_png(routing: dict) -> bytes:
    fig, ax = axes(5)
    pts = sorted(routing["curve"], key=lambda p: p["compute"])
    ax.plot([p["compute"] for p in pts], [p["quality"] for p in pts], "o-", ms=3, label="auto, per threshold")
    op = routing["operating_point"]
    ax.plot([op["compute"]], [op["quality"]], "r*", ms=12, label="operating point")
    ax.axhline(list(routing["tier_quality"].values())[-1], color="k", lw=0.8, ls="--", label="deepest tier")
    ax.set_xlabel("compute (share of the deepest tier's block-tokens)")
    ax.set_ylabel("quality")
    return _png(fig, ax)


def render(run_id: str, tiers: list[dict], datasets: list[dict], chain: list[Manifest],
           promotion: dict | None = None, measured: Measured | None = None) -> tuple[str, str, bytes]:
    """Markdown, HTML and the lineage PNG for one run. `tiers` carry their export row, `evaluation` and `gate`."""
    measured = measured or Measured()
    routing = measured.routing
    curves = dict(measured.figures) | (
        {"Adaptive routing (FAMILY:auto): quality vs compute, one point per threshold": routing_png(routing)}
        if routing else {})
    tiers = sorted(tiers, key=lambda r: r["exit_point"])
    benchmarks = sorted({b for t in tiers for b in (t.get("evaluation") or {}).get("benchmarks", {})})
    cols = TIER_COLS + [(b, b) for b in benchmarks] + [("average", "average")] + SPEED_COLS + [("promoted", "promoted")]
    rows = tier_rows(tiers, benchmarks)
    flags = depth_flags(tiers)
    if benchmarks:
        curves = {"Quality vs parameters (held-out benchmarks)": quality_png(tiers), **curves}
    md = [f"# Ruyi Flow run `{run_id}`", "", "## Tiers", "",
          "| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(str(r.get(k, "")).replace("|", "\\|") for k, _ in cols) + " |" for r in rows]
    ungraded = sorted({f.split(":")[0] for f in flags})
    md += [""] + ([f"- The family is not graded on {', '.join(ungraded)}: a deeper tier scores below a shallower "
                   "one there (beyond the items' sampling error for accuracies):"] if ungraded else [])
    md += [f"- ⚠ {f}" for f in flags] or ["- every deeper tier scores at least as well as the shallower ones"
                                          + (", within sampling error" if depth_ties(tiers) else "")]
    md += [f"- tie: {t}" for t in depth_ties(tiers)]
    md += family_lines(tiers) + speed_lines(tiers)
    gate_lines = _gate_lines(tiers, promotion) + routing_lines(routing)
    md += gate_lines
    md += ["", "Greedy samples:", ""] + [f"- {t['tier']}: {t.get('sample', '')!r}" for t in tiers]
    md += ["", "## Data", "", "| kind | documents | fingerprint | packed tokens | store URI |", "|---|---|---|---|---|"]
    md += [f"| {d['kind']} | {d.get('n_docs', '')} | {d.get('fingerprint', '')[:16]} | {d.get('n_tokens', '')} "
           f"| {d['uri']} |" for d in datasets]
    dae = _dae_lines(measured.grpo, measured.svd)
    md += training_lines(measured.trained) + dae + ablation_lines(measured.ablations) + time_lines(chain)
    md += ["", "## Lineage", ""] + [f"- `{m.stage}` {m.uri} (content sha256 {m.content_sha256()[:16]})" for m in chain]
    png = lineage_png(chain) if chain else b""

    def table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for _, h in cols)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(k, '')))}</td>" for k, _ in cols) + "</tr>"
                       for r in rows)
        return f"<table><tr>{head}</tr>{body}</table>"

    def items(lines: list[str]) -> str:
        return "<ul>" + "".join(f"<li>{html.escape(x[2:])}</li>" for x in lines if x.startswith("- ")) + "</ul>"

    data_cols = [("kind", "kind"), ("n_docs", "documents"), ("n_tokens", "packed tokens"), ("uri", "store URI")]
    img = f'<img alt="lineage" src="data:image/png;base64,{base64.b64encode(png).decode()}">' if png else ""
    figs = "".join(f'<figure><img alt="{html.escape(c)}" src="data:image/png;base64,{base64.b64encode(b).decode()}">'
                   f"<figcaption>{html.escape(c)}</figcaption></figure>" for c, b in curves.items())
    timed = [{"stage": m.stage, "s": f"{m.build_seconds:.1f}", "peak": _peak(m), "uri": m.uri}
             for m in sorted(chain, key=lambda m: m.created_at) if m.build_seconds is not None]
    cols = [("stage", "stage"), ("s", "seconds"), ("peak", "peak MiB"), ("uri", "artifact")]
    times = f"<h2>Stage wall times</h2>{table(timed, cols)}" if timed else ""
    ablations = "".join(f"<h3>{html.escape(n)}: {html.escape(e['what'])}</h3>{table(ablation_rows(e), ABLATION_COLS)}"
                        for n, e in measured.ablations.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Ruyi Flow {html.escape(run_id)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px}}th{{background:#f3f6fa}}
figure{{display:inline-block;margin:0 1em 1em 0}}</style></head><body>
<h1>Ruyi Flow run <code>{html.escape(run_id)}</code></h1><h2>Tiers</h2>{table(rows, cols)}
{items([f"- ⚠ {f}" for f in flags] or ["- every deeper tier scores at least as well as the shallower ones"])}
{items(family_lines(tiers) + speed_lines(tiers))}{f"<h2>Promotion</h2>{items(gate_lines)}" if gate_lines else ""}
<h2>Charts</h2>{figs or "<p>no charts</p>"}{f"<h2>DaE and GRPO</h2>{items(dae)}" if dae else ""}
{f"<h2>Ablations</h2>{ablations}" if ablations else ""}
<h2>Data</h2>{table(datasets, data_cols)}{times}<h2>Lineage</h2>{img}</body></html>"""
    return "\n".join(md) + "\n", page, png


def _gate_lines(tiers: list[dict], promotion: dict | None) -> list[str]:
    if not promotion:
        return []
    lines = ["", f"## Promotion ({promotion['family']} version {promotion['version']})", ""]
    for t in tiers:
        g = t.get("gate") or {}
        verdict = "promoted" if g.get("promoted") else "kept, not promoted"
        lines.append(f"- {t['tier']}: {verdict}: {g.get('reason', '')} (package {g.get('uri', '')})")
    lines.append("- promoted now: " + ", ".join(f"{k} {v}" for k, v in sorted(promotion["promoted"].items())))
    return lines
