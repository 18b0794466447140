"""The serving engine: text made token by token equals the whole answer's decoding (multi-byte characters never
sent in halves, stop strings never sent in part); inside the server, self-speculative decoding answers as the
target tier's plain greedy decoding, and answers decoded in one batch equal the same requests one by one."""
import asyncio
import random

import pytest
from openai import AsyncOpenAI, OpenAI
from test_serve import PROMPTS, chat_ids, family_dir, served, serving  # noqa: F401 - fixtures

from ruyi_core.serve.decode import generate
from ruyi_core.serve.detok import Detokenizer, StopStrings


def _pieces(tok, ids: list[int]) -> list[str]:
    d = Detokenizer(tok)
    return [*(d.push(t) for t in ids), d.flush()]


def test_incremental_text_is_the_whole_decoding(served):
    tok = served.tokenizer
    text = "Ada lives in Zürich — 日本語 🙂 naïve café"
    ids = tok(text)["input_ids"]
    assert len(ids) > len(text) // 2  # bytes split into tokens: characters span several
    pieces = _pieces(tok, ids)
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    rng = random.Random(0)
    for _ in range(50):  # random tokens: lone bytes and halves of characters included
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 40))]
        assert "".join(_pieces(tok, ids)) == tok.decode(ids, skip_special_tokens=True), ids


def test_stop_strings_cut_and_are_never_sent_in_part():
    s = StopStrings(["STOP", "\n\n"])
    sent = [s.push(x) for x in ["Ada li", "ves", " in Os", "lo ST", "O", "P and more"]]
    assert "".join(t for t, _ in sent) == "Ada lives in Oslo " and sent[-1][1] and not any(st for _, st in sent[:-1])
    s = StopStrings(["STOP"])
    assert [s.push("no ST"), s.push("ORY")] == [("no", False), (" ST", False)] and s.flush() == "ORY"
    assert StopStrings([]).push("all of it") == ("all of it", False)


@pytest.fixture(scope="module")
def spec_server(served):
    from ruyi_core.serve.api import create_app

    app = create_app(served, max_batch=8, draft="end", draft_tokens=3)
    with serving(app) as url:
        yield url, app


def test_speculation_inside_the_server_is_plain_greedy(spec_server, served):
    url, app = spec_server
    client, tok = OpenAI(base_url=url, api_key="unused", max_retries=0), served.tokenizer
    for p in PROMPTS:
        r = client.chat.completions.create(model="micro:cloud", messages=[{"role": "user", "content": p}],
                                           max_tokens=16)
        want = generate(served.tiers["cloud"], [chat_ids(tok, p)], [16], served.eos)[0]
        assert r.choices[0].message.content == tok.decode(want, skip_special_tokens=True), p
        assert r.usage.completion_tokens == len(want)
    assert app.state.engine.spec_stats.rounds > 0  # the answers were drafted by end


def test_batched_answers_equal_one_by_one(spec_server, served):
    """Eight concurrent greedy requests of different lengths, left-padded into shared batches, answer as each
    does alone; so do seeded samples, decoded alone whatever else is waiting."""
    url, app = spec_server
    tok, batcher = served.tokenizer, app.state.engine.batcher
    prompts = [f"{p} {'and ' * i}" for i, p in enumerate(PROMPTS * 2)]

    async def ask():
        client = AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        greedy = [client.completions.create(model="micro:edge", prompt=p, max_tokens=10) for p in prompts]
        sampled = [client.completions.create(model="micro:edge", prompt=p, max_tokens=10, temperature=1.0, seed=i)
                   for i, p in enumerate(prompts[:3])]
        return await asyncio.gather(*greedy, *sampled)

    before = batcher.batches
    got = asyncio.run(ask())
    assert batcher.batches - before < len(got)  # some requests shared a batch
    for p, r in zip(prompts, got):
        want = generate(served.tiers["edge"], [tok(p)["input_ids"]], [10], served.eos)[0]
        assert r.choices[0].text == tok.decode(want, skip_special_tokens=True), p
    alone = OpenAI(base_url=url, api_key="unused", max_retries=0)
    for i, (p, r) in enumerate(zip(prompts, got[len(prompts):])):
        again = alone.completions.create(model="micro:edge", prompt=p, max_tokens=10, temperature=1.0, seed=i)
        assert r.choices[0].text == again.choices[0].text, p
