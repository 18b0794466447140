"""Escalation that continues instead of restarting: a deeper tier reuses the trunk's keys and values a
shallower tier computed, checks its answer as a draft in one pass and decodes on; every answer is exactly the
answering tier's own greedy answer, at less compute than starting over."""
from test_serve import chat_ids, family_dir, served  # noqa: F401 - fixtures

from ruyi_core.serve.decode import continue_reading, first_read, generate, shared_depth
from ruyi_core.serve.route import escalate

QUESTIONS = [f"question {i}: where does {name} live?" for i, name in enumerate(["Ada", "Bo", "Cy", "Di"] * 3)]


def _alone(served, tier, ids, n):  # noqa: F811
    return generate(served.tiers[tier], [ids], [n], served.eos)[0]


def test_a_deeper_tier_continuing_a_shallower_answer_gives_its_own_answer(served):  # noqa: F811
    tiers, eos = served.tiers, served.eos
    drafts_rejected = drafts_accepted = 0
    for i, q in enumerate(QUESTIONS):
        ids, n = chat_ids(served.tokenizer, q), 1 + i % 7
        for t in tiers:  # no draft: plain greedy decoding
            assert continue_reading(tiers[t], first_read(tiers[t], ids), [], n, eos, keep=0).tokens == \
                _alone(served, t, ids, n), (t, q)
        for low, high in [("end", "edge"), ("edge", "cloud"), ("end", "cloud")]:
            want = _alone(served, high, ids, n)
            a = continue_reading(tiers[low], first_read(tiers[low], ids), [], n, eos,
                                 keep=shared_depth(tiers[low], tiers[high]))
            b = continue_reading(tiers[high], a.read, a.tokens, n, eos, keep=a.read.depth)
            assert b.tokens == want, (low, high, q)
            drafts_rejected += b.accepted < len(a.tokens)
        # the tier's own shorter answer as the draft, its trunk state reused: all accepted, then decoding goes on
        cloud = tiers["cloud"]
        short = continue_reading(cloud, first_read(cloud, ids), [], max(n - 2, 1), eos, keep=2)
        on = continue_reading(cloud, short.read, short.tokens, n + 3, eos, keep=2)
        assert on.tokens == _alone(served, "cloud", ids, n + 3) and on.accepted == len(short.tokens)
        # tokens only (nothing reused): the prompt and the whole answer read in one pass, all accepted
        want = _alone(served, "cloud", ids, n)
        whole = continue_reading(cloud, first_read(cloud, ids + want[:-1]), want, n, eos, keep=0)
        assert whole.tokens == want and whole.accepted == len(want)
        drafts_accepted += 1
    assert drafts_rejected > 0 and drafts_accepted > 0


def test_escalate_answers_as_the_answering_tier_for_less_compute_than_restarting(served):  # noqa: F811
    answered, cost, restarts = set(), 0, 0
    for i, q in enumerate(QUESTIONS):
        ids, n = chat_ids(served.tokenizer, q), 4 + i % 5
        alone = {t: _alone(served, t, ids, n) for t in served.tiers}
        for threshold in (0.0, 0.012, 0.014, 1.01):  # the random micro family is unsure: p ~ 0.01
            got = escalate(served, ids, n, threshold)
            assert got.tokens == alone[got.tier], (q, threshold)
            answered.add(got.tier)
            tried = list(served.tiers)[:list(served.tiers).index(got.tier) + 1]
            restart = sum(served.depth(t) * (len(ids) + len(alone[t]) - 1) for t in tried)
            cost, restarts = cost + got.cost, restarts + restart
    assert answered == set(served.tiers) and cost < restarts


def test_draft_acceptance_is_the_common_prefix_share_of_the_deepest_answers():
    from ruyi_core.serve.route import Attempt, draft_acceptance

    def answers(*tokens):
        return [Attempt("t", list(t), 1.0, 1) for t in tokens]

    per_tier = {"end": answers([1, 2, 3], [5], []), "edge": answers([1, 2, 4], [5, 6], [7]),
                "cloud": answers([1, 2, 4], [5, 6], [8])}
    assert draft_acceptance(per_tier, "cloud") == {"end": 0.5, "edge": 0.8333}  # (2+1+0)/6, (3+2+0)/6


def test_the_draft_policy_is_measured_and_served_with_draft_auto(served):  # noqa: F811
    from types import SimpleNamespace

    import pytest

    from ruyi_core.errors import RuyiError
    from ruyi_core.serve.cli import calibrated_draft
    from ruyi_core.serve.route import choose_draft

    prompts = [chat_ids(served.tokenizer, q) for q in ("Where does Ada live?", "What is 3 + 4?", "hi")]
    d = choose_draft(served, prompts, 6, min_speedup=0.0)  # whichever is fastest here: timing is not asserted
    assert d["tier"] in list(served.tiers)[:-1] and d["tokens"] == 8 and d["prompts"] == 3 and d["speedup"] > 0
    assert d["ceiling"] > 1 and d["ceiling_at_ruyi2_proportions"] > 1
    own = served.depth(d["tier"]) - max(shared_depth(served.tiers[d["tier"]], served.tiers[served.deepest]), 0)
    assert 0 <= d["skip"] < own
    assert choose_draft(served, prompts, 6, min_speedup=1e9) is None  # none fast enough: no policy
    assert calibrated_draft(SimpleNamespace(name="micro", routing={"draft": d})) == d
    with pytest.raises(RuyiError, match="--draft auto: micro has no calibrated draft policy"):
        calibrated_draft(SimpleNamespace(name="micro", routing=None))
