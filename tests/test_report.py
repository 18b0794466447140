"""The run report: the per-tier benchmark table, the deeper-vs-shallower check and the promotion outcome."""
from ruyi_core.report import depth_flags, depth_ties, render


def tier(name: str, exit_point: int, acc: float, ppl: float, promoted: bool) -> dict:
    return {"tier": name, "exit_point": exit_point, "depth": exit_point + 2, "parameters": 1000 * (exit_point + 1),
            "weight_bytes": 4000 * (exit_point + 1), "sample": "hi", "uri": f"s3://b/models/f/v1/{name}",
            "evaluation": {"benchmarks": {
                "facts_mc": {"format": "multiple_choice", "metric": "acc", "value": acc, "higher_is_better": True},
                "heldout_text": {"format": "perplexity", "metric": "word_perplexity", "value": ppl,
                                 "higher_is_better": False}},
                "average": acc, "family": {"facts_mc": acc, "heldout_text": ppl}, "speed": {"prefill_tokens_per_s": 900.0, "decode_tokens_per_s": 80.0,
                                          "peak_memory_mib": 12.5}},
            "gate": {"promoted": promoted, "reason": "first promoted version" if promoted else
                     "not promoted, v0 stays: facts_mc 0.3 is worse", "uri": f"s3://b/models/f/v1/{name}"}}


def test_depth_check_flags_a_deeper_tier_that_scores_lower():
    good = [tier("end", 1, 0.30, 9.0, True), tier("edge", 6, 0.40, 7.0, True), tier("cloud", 11, 0.50, 6.0, True)]
    assert depth_flags(good) == []
    # cloud below edge on accuracy, and worse than end on perplexity (higher is worse)
    bad = [tier("end", 1, 0.30, 6.5, True), tier("edge", 6, 0.45, 6.0, True), tier("cloud", 11, 0.40, 7.0, False)]
    flags = depth_flags(bad)
    assert any(f.startswith("facts_mc: cloud (0.4) scores below the shallower edge") for f in flags), flags
    assert any(f.startswith("heldout_text: cloud (7) scores below the shallower end") for f in flags), flags
    assert not any("edge (" in f.split("below")[0] for f in flags)  # edge beats end on both
    # 2 of 29 questions: within the items' sampling error, a tie rather than a warning; 8 of 29 is beyond it
    for t, acc in zip(good, (1.0, 1.0, 27 / 29)):
        t["evaluation"]["benchmarks"]["facts_mc"].update(value=acc, n=29)
    assert depth_flags(good) == [] and len(depth_ties(good)) == 2
    assert "within the sampling error of 29 items" in depth_ties(good)[0]
    good[2]["evaluation"]["benchmarks"]["facts_mc"]["value"] = 21 / 29
    assert len(depth_flags(good)) == 2 and depth_ties(good) == []

    promotion = {"family": "f", "version": "v1", "promoted": {"end": "v1", "edge": "v1", "cloud": "v0"}}
    md, page, _ = render("f-v1", bad, [], [], promotion)
    assert "| facts_mc | heldout_text | average | prefill tok/s | decode tok/s | peak MiB | promoted |" in md
    assert "⚠ facts_mc: cloud" in md and "cloud: kept, not promoted: not promoted, v0 stays" in md
    assert "The family is not graded on facts_mc, heldout_text: a deeper tier scores below" in md
    assert "promoted now: cloud v0, edge v1, end v1" in md
    assert "Quality vs parameters" in page and page.count("<tr>") >= 4
    assert "- end: identical scores" in md
    assert "- edge: 1.00× (ideal 0.62×, 8 of 13 blocks)" in md  # decode time against the deepest tier's
    same = [dict(t, evaluation=dict(t["evaluation"], family_same_weights=True)) for t in bad]
    md, _, _ = render("f-v1", same, [], [], promotion)
    assert "- end: the same weights as the family's exit, so the same scores (evaluated once)" in md


def test_training_table_has_every_exit_and_a_dae_stage_only_its_own():
    from types import SimpleNamespace

    from ruyi_core.report import training_lines

    def stage(name, points, first, last):
        return SimpleNamespace(stage=name, metadata={"steps": 3, "exit_points": points, "first_exit_losses": first,
                                                     "final_exit_losses": last})

    chain = [stage("dae_sft", [1], [0.5], [0.4]), stage("sft", [1, 6, 11], [2, 2, 2], [0.3, 0.2, 0.1])]
    lines = training_lines(chain)
    assert "| stage | steps | exit 1 | exit 6 | exit 11 |" in lines
    assert "| dae_sft | 3 | 0.500 → 0.400 | — | — |" in lines
    assert "| sft | 3 | 2.000 → 0.300 | 2.000 → 0.200 | 2.000 → 0.100 |" in lines


def test_report_shows_what_the_stages_measured():
    """The routing calibration, SVD's result and GRPO's measurements, each from its own step's output."""
    from ruyi_core.report import Measured

    point = {"threshold": 0.5, "quality": 0.5, "compute": 0.75, "answered_by": {"end": 0.5, "cloud": 0.5}}
    routing = {"rule": "min token probability >= threshold, shallowest tier first", "tolerance": 0.02,
               "questions": 12, "tier_quality": {"end": 0.25, "cloud": 0.5}, "operating_point": point,
               "curve": [{"threshold": 0.0, "quality": 0.25, "compute": 0.4, "answered_by": {"end": 1.0}}, point],
               "draft_acceptance": {"end": 0.625},
               "draft": {"tier": "end", "tokens": 8, "skip": 3, "min_p": 0.3, "speedup": 2.105, "prompts": 16,
                         "ceiling": 4.0, "ceiling_at_ruyi2_proportions": 5.81}}
    svd = {"tier": "end", "ratio": 0.4, "removed_fraction": 0.41, "heldout_loss_unexpanded": 3.0,
           "heldout_loss_dense": 2.5, "heldout_loss_compressed": 2.6, "relative_drop": 0.04}
    grpo = {"tier": "end", "heldout_reward_before": 0.1, "heldout_reward_after": 0.3, "heldout_samples": 2,
            "temperature": 1.0, "heldout_prompts": 4, "heldout_exact_greedy_before": 0.0,
            "heldout_exact_greedy_after": 0.25, "heldout_text_loss_before": 2.7, "heldout_text_loss_after": 2.5}
    tiers = [tier("end", 1, 0.3, 9.0, True), tier("cloud", 3, 0.5, 7.0, True)]
    ablations = {"grpo_control": {"what": "GRPO vs the same steps of SFT", "ablated_family": "f-grpo-control",
                                  "rows": [{"tier": "end", "benchmark": "literature", "family": 16810.4,
                                            "ablation": 17002.0, "family_better_by": 0.0113}]}}
    measured = Measured(grpo=grpo, svd=svd, routing=routing, figures={"GRPO: reward per step": b"png"},
                        ablations=ablations)
    md, page, _ = render("f-v1", tiers, [], [], {"family": "f", "version": "v1", "promoted": {}}, measured)
    assert "## Adaptive routing (`auto`)" in md and "calibrated on 12 held-out questions" in md
    assert "answer tokens a tier's own answer drafts): end 0.625" in md
    assert "end drafting 8 tokens without its last 3 blocks, a round stopped below p 0.3: 2.10× the deepest" in md
    assert "ceiling 4.00× if every draft were accepted (at Ruyi2's proportions, exits [2, 21, 39] of 40: 5.81×)" in md
    assert "threshold 0.5000: quality 0.500 at 75% of the deepest tier's compute" in md
    assert "- DaE tier end: held-out loss 3.0000 unexpanded -> 2.7000 after DaE training -> 2.5000 after GRPO" in md
    assert "- SVD at ratio 0.4: removed 41.0% of the added parameters, held-out loss 2.6000 (+4.00% relative)" in md
    assert "GRPO on tier end: held-out mean reward 0.100 -> 0.300" in md
    assert "<figcaption>GRPO: reward per step</figcaption>" in page and "Adaptive routing (FAMILY:auto)" in page
    assert "### grpo_control: GRPO vs the same steps of SFT (control family f-grpo-control)" in md
    assert "| end | literature | 16,810 | 17,002 | +1.1% |" in md and "<h2>Ablations</h2>" in page
    assert "Adaptive routing" not in render("f-v1", tiers, [], [], None, Measured(svd=svd))[0]


def test_a_routing_step_without_two_tiers_records_that_it_did_not_calibrate(store):
    """The routing step's result says whether it calibrated; a run without two tiers stores an empty calibration,
    writes nothing to the registry, and the report reads no routing from it."""
    from conftest import with_demo
    from ruyi_core.package.keys import routing_key
    from ruyi_core.spec import RunSpec
    from ruyi_core.stages import Promotion, calibrate_routing

    spec = RunSpec.model_validate(with_demo({"store": {"bucket": store.bucket}}))
    promotion = Promotion(family="micro", version="v1", run_id="r1", tiers={}, promoted={}, packages=[])
    routing = calibrate_routing(spec, store, promotion)
    assert calibrate_routing(spec, store, promotion) == routing  # reused
    assert routing.questions == 0 and routing.read(store) is None
    assert store.read_manifest(routing.uri).files == [] and store.read_object(routing_key("micro", "v1")) is None
