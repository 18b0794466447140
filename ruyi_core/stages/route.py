"""Routing calibration: the `auto` routing over this version's tier packages (ruyi_core.serve.route), calibrated
on the generative benchmarks' first questions and published beside the packages, where `ruyi serve` reads it.
It writes the registry, so it is a step of its own; the report shows its result."""
from __future__ import annotations

import json
from collections.abc import Callable

from ruyi_core.spec import RunSpec
from ruyi_core.stages.contract import Artifact, Stage, StageRun, overwrite, run_stage
from ruyi_core.stages.ship import Promotion
from ruyi_core.store import ArtifactStore

ROUTING_FILE = "routing.json"
DRAFT_PROMPTS = 16  # routing questions that time the self-speculation policies


class Routing(Artifact):
    family: str
    version: str
    questions: int  # 0: not calibrated (no routing questions, no generative benchmark, or a single tier)

    def read(self, store: ArtifactStore) -> dict | None:
        """The calibration (serve.route.calibrate's curve, tier qualities and operating point); None when none."""
        return json.loads(self.read_text(store, ROUTING_FILE)) if self.questions else None


ROUTE = Stage("calibrate_routing", Routing, ("eval.benchmarks", "eval.max_new_tokens", "package.routing_questions",
                                             "package.routing_tolerance"), version=2)


def calibrate_routing(spec: RunSpec, store: ArtifactStore, promotion: Promotion) -> Routing:
    """`promotion` is the promote stage's result: its packages are the tiers routed over."""
    inputs = {f"package/{p.tier}": p.uri for p in promotion.packages}
    return run_stage(ROUTE, spec, store, lambda run: _calibrate(run, promotion), inputs=inputs,
                     params={"version": promotion.version})


def _calibrate(run: StageRun, promotion: Promotion) -> dict:
    from ruyi_core.eval.tasks import GENERATIVE
    from ruyi_core.package.keys import routing_key
    from ruyi_core.runtime import for_spec
    from ruyi_core.serve.route import calibrate, choose_draft
    from ruyi_core.serve.tiers import from_packages

    spec, n = run.spec, run.spec.package.routing_questions
    result = {"family": promotion.family, "version": promotion.version, "questions": 0}
    benches = {k: b for k, b in spec.eval.benchmarks.items() if b.format in GENERATIVE}
    if not n or not benches or len(promotion.packages) < 2:
        run.log(f"[{ROUTE.name}] not calibrated: it needs package.routing_questions, a generative benchmark and "
                "two tiers")
        return result
    dirs = {}
    for p in promotion.packages:
        run.store.get_artifact(p.uri, run.work / "packages" / p.tier)
        dirs[p.tier] = run.work / "packages" / p.tier
    served = from_packages(promotion.family, dirs, for_spec(spec))
    questions = _questions(run, benches, served.tokenizer)
    routing = calibrate(served, questions, max_new_tokens=spec.eval.max_new_tokens,
                        tolerance=spec.package.routing_tolerance)
    # With nothing else running, as the package step's speed: `ruyi serve --draft auto` takes this policy.
    routing["draft"] = choose_draft(served, [p for p, _ in questions[:DRAFT_PROMPTS]], spec.eval.max_new_tokens)
    text = json.dumps(routing, indent=2)
    (run.out / ROUTING_FILE).write_text(text)
    overwrite(run.store, routing_key(promotion.family, promotion.version), text)
    op = routing["operating_point"]
    run.log(f"[{ROUTE.name}] threshold {op['threshold']:.4f}, quality {op['quality']:.3f} at {op['compute']:.0%} "
            f"compute (deepest tier alone {list(routing['tier_quality'].values())[-1]:.3f})")
    if d := routing["draft"]:
        run.log(f"[{ROUTE.name}] self-speculation: {d['tier']} drafting {d['tokens']} tokens, leaving out "
                f"{d['skip']} blocks, min p {d['min_p']}: {d['speedup']:.2f}x on {d['prompts']} prompts")
    return {**result, "questions": routing["questions"]}


def _questions(run: StageRun, benches: dict, tok) -> list[tuple[list[int], Callable[[str], bool]]]:
    """(prompt ids, is-this-answer-right) for each benchmark's first `package.routing_questions` records."""
    from ruyi_core.eval.tasks import contains_results, exact_match_results, load_records

    questions = []
    for name, bench in sorted(benches.items()):
        score = exact_match_results if bench.format == "exact_match" else contains_results
        for rec in load_records(name, bench, run.spec, tok, run.work, run.store)[:run.spec.package.routing_questions]:
            questions.append((tok(rec["prompt"])["input_ids"],
                              lambda text, rec=rec, score=score: bool(next(iter(score(rec, [text]).values())))))
    return questions
