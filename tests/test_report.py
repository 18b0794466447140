"""The run report: the per-tier benchmark table, the deeper-vs-shallower check and the promotion outcome."""
from ruyi_core.report import depth_flags, render


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

    promotion = {"family": "f", "version": "v1", "promoted": {"end": "v1", "edge": "v1", "cloud": "v0"}}
    md, page, _ = render("f-v1", bad, [], [], {}, promotion)
    assert "| facts_mc | heldout_text | average | prefill tok/s | decode tok/s | peak MiB | promoted |" in md
    assert "⚠ facts_mc: cloud" in md and "cloud: kept, not promoted: not promoted, v0 stays" in md
    assert "promoted now: cloud v0, edge v1, end v1" in md
    assert "Quality vs parameters" in page and page.count("<tr>") >= 4
    assert "- end: identical scores" in md
    same = [dict(t, evaluation=dict(t["evaluation"], family_same_weights=True)) for t in bad]
    md, _, _ = render("f-v1", same, [], [], {}, promotion)
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
