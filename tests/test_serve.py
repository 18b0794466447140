"""`ruyi serve`: each tier answers over the OpenAI API exactly as its exported package does in vanilla
transformers; streaming; 100 concurrent requests batched; bad requests get 4xx JSON and the server lives on;
self-speculative decoding gives the target tier's own greedy tokens; registry packages share their trunk."""
import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import randomize_

from ruyi_core.family.convert import export_tier, family_from_base
from ruyi_core.family.io import save_family
from ruyi_core.runtime import Runtime
from ruyi_core.serve.decode import SpecStats, generate, shared_depth, speculative
from ruyi_core.serve.specbatch import speculative_batch
from ruyi_core.serve.tiers import from_family, from_packages

CPU = Runtime(torch.device("cpu"), torch.float32)
PROMPTS = ["Where does Ada live?", "What is 3 + 4?", "Tell me about Oslo.", "hi"]


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory, micro_base):
    base, tok = micro_base
    d = tmp_path_factory.mktemp("serve") / "micro-fam"
    save_family(randomize_(family_from_base(base, [0, 2, 3]), seed=5).eval(), tok, d)
    return d


@pytest.fixture(scope="module")
def served(family_dir):
    return from_family(family_dir, CPU, name="micro")


@pytest.fixture(scope="module")
def package_dirs(family_dir, tmp_path_factory):
    """Each tier exported as its own package."""
    from ruyi_core.family.io import load_family

    fam, tok = load_family(family_dir)
    return {tier: export_tier(fam, tier, tmp_path_factory.mktemp("pkg") / tier, tok) for tier in fam.config.tiers}


@pytest.fixture(scope="module")
def packages(package_dirs):
    """Each tier's package, loaded by vanilla transformers."""
    from transformers import AutoModelForCausalLM

    return {t: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for t, d in package_dirs.items()}


def post(url: str, content: bytes | None, headers: dict | None = None) -> tuple[int, dict]:
    """(status, JSON body) of a POST (a GET without `content`)."""
    req = urllib.request.Request(url, data=content, headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def chat_ids(tok, text: str) -> list[int]:
    t = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    return tok(t)["input_ids"]


def _vanilla(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


@contextmanager
def serving(app):
    """`app` on a free local port, in a thread: yields its /v1 URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        srv.should_exit = True
        th.join(timeout=10)


@pytest.fixture(scope="module")
def server(served):
    from ruyi_core.serve.api import create_app

    app = create_app(served, max_batch=16)
    with serving(app) as url:
        yield url, app


def test_one_trunk_and_every_tier_equals_its_package(served, packages):
    assert list(served.tiers) == ["end", "edge", "cloud"] or len(served.tiers) == 3
    a, b, c = served.tiers.values()
    assert shared_depth(a, c) == 0 and shared_depth(b, c) == 2  # exits 0, 2, 3: embeddings; + trunk blocks 0, 1
    tok = served.tokenizer
    for tier, pkg in packages.items():
        for p in PROMPTS:
            ids = chat_ids(tok, p)
            got = generate(served.tiers[tier], [ids], [12], set())[0]
            assert got == _vanilla(pkg, ids, 12), (tier, p)


def test_openai_client_streaming_and_models(server, served, packages):
    from openai import OpenAI

    url, _ = server
    client = OpenAI(base_url=url, api_key="unused")
    assert [m.id for m in client.models.list().data] == [f"micro:{t}" for t in [*served.tiers, "auto"]]
    tok = served.tokenizer
    for tier, pkg in packages.items():
        r = client.chat.completions.create(model=f"micro:{tier}", messages=[{"role": "user", "content": PROMPTS[0]}],
                                           max_tokens=10, temperature=0)
        want = tok.decode(_vanilla(pkg, chat_ids(tok, PROMPTS[0]), 10), skip_special_tokens=True)
        assert r.choices[0].message.content == want and r.usage.completion_tokens == 10
        assert r.choices[0].finish_reason == "length"
        chunks = client.chat.completions.create(model=f"micro:{tier}", messages=[{"role": "user",
                                                                                  "content": PROMPTS[0]}],
                                                max_tokens=10, stream=True)
        parts = list(chunks)
        assert "".join(c.choices[0].delta.content or "" for c in parts) == want
        assert parts[-1].choices[0].finish_reason == "length"
    c = client.completions.create(model="micro:edge", prompt="Oslo is", max_tokens=5)
    ids = served.tokenizer("Oslo is")["input_ids"]
    assert c.choices[0].text == tok.decode(_vanilla(packages["edge"], ids, 5), skip_special_tokens=True)


def test_hundred_concurrent_requests_are_batched(server):
    from openai import AsyncOpenAI

    url, app = server
    before = app.state.engine.batcher.batches

    async def main():
        client = AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        tiers = ["end", "edge", "cloud"]
        return await asyncio.gather(*(client.completions.create(model=f"micro:{tiers[i % 3]}", prompt=f"n {i}",
                                                                max_tokens=8) for i in range(100)))

    out = asyncio.run(main())
    assert len(out) == 100
    assert all(r.usage.completion_tokens == 8 or r.choices[0].finish_reason == "stop" for r in out)
    assert app.state.engine.batcher.batches - before < 100  # some requests shared a batch


@pytest.mark.parametrize("body,status,needle", [
    ({"model": "micro:nope", "prompt": "x"}, 404, "does not exist"),
    ("{not json", 400, "not valid JSON"),
    ({"model": "micro:edge", "prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ({"model": "micro:edge", "prompt": "word " * 400}, 400, "maximum context length"),
    ({"model": "micro:edge"}, 400, "prompt"),
])
def test_bad_requests_get_openai_errors_and_the_server_lives_on(server, body, status, needle):
    url, _ = server
    code, got = post(f"{url}/completions", (body if isinstance(body, str) else json.dumps(body)).encode())
    assert code == status, got
    err = got["error"]
    assert needle in err["message"] and err["type"].endswith("_error")
    code, ok = post(f"{url}/completions", json.dumps({"model": "micro:end", "prompt": "x", "max_tokens": 2}).encode())
    assert code == 200 and ok["usage"]["completion_tokens"] == 2


@pytest.mark.slow
def test_self_speculative_decoding_gives_the_target_tiers_greedy_tokens(served):
    end, edge, cloud = served.tiers.values()
    tok, stats = served.tokenizer, SpecStats()
    for i in range(20):
        ids = chat_ids(tok, f"question {i}: {PROMPTS[i % len(PROMPTS)]}")
        want = generate(cloud, [ids], [24], served.eos)[0]
        for draft, k, conf in ((end, 3, 0.0), (edge, 5, 0.0), (edge, 8, 0.02)):
            got = speculative(draft, cloud, ids, 24, served.eos, k=k, stats=stats, min_confidence=conf)
            assert got == want, (i, k, conf)
    assert stats.rounds > 0 and 0 <= stats.acceptance <= 1


def test_batched_self_speculation_gives_each_prompt_the_targets_greedy_tokens(served):
    """Prompts of different lengths and budgets speculated as one left-padded batch: each row's tokens are the
    target's own (those of batched greedy decoding, and here of each prompt alone), whatever the draft's policy."""
    end, edge, cloud = served.tiers.values()
    tok = served.tokenizer
    prompts = [chat_ids(tok, f"{'and ' * i}{PROMPTS[i % len(PROMPTS)]}") for i in range(6)]
    budgets = [12, 3, 16, 7, 16, 1]
    alone = [generate(cloud, [p], [n], served.eos)[0] for p, n in zip(prompts, budgets)]
    assert generate(cloud, prompts, budgets, served.eos) == alone
    for draft, k, conf in ((end, 3, 0.0), (edge, 5, 0.0), (edge, 8, 0.02)):
        stats, seen = SpecStats(), []
        got = speculative_batch(draft, cloud, prompts, budgets, served.eos, k=k, stats=stats, min_confidence=conf,
                                on_token=lambda i, t: seen.append((i, t)))
        assert got == alone, (k, conf)
        assert [[t for i, t in seen if i == row] for row in range(len(prompts))] == got  # streamed as kept
        assert stats.rounds > 0
    stopped = speculative_batch(end, cloud, prompts, budgets, served.eos, k=3, on_token=lambda i, t: i == 0)
    assert stopped[0] == alone[0][:1] and stopped[1:] == alone[1:]  # a stopped row leaves the batch alone


def test_tiers_are_ordered_by_exit_even_when_dae_makes_the_end_tier_deeper_than_the_edge(family_dir, tmp_path):
    """With 3 DaE blocks the end tier has 4 blocks, the edge 3: serving (routing, hand-offs) still goes end, edge,
    cloud, from a family folder and from packages (which record their exit)."""
    from ruyi_core.dae.expand import expand_tier
    from ruyi_core.family.io import load_family
    from ruyi_core.package import build_package

    fam, tok = load_family(family_dir, CPU)
    save_family(expand_tier(fam, "end", 3), tok, tmp_path / "expanded")
    served = from_family(tmp_path / "expanded", CPU)
    assert list(served.tiers) == ["end", "edge", "cloud"] and served.depth("end") > served.depth("edge")
    fam, _ = load_family(tmp_path / "expanded")
    dirs = {}
    for tier in ("edge", "end"):
        exported = export_tier(fam, tier, tmp_path / "export" / tier, tok)
        dirs[tier] = build_package(exported, tmp_path / "pkg" / tier, family="micro", version="v1", tier=tier,
                                   target=tier, evaluation={}, lineage=[], run_id="r", spec_hash="h",
                                   exit_point=fam.config.tiers[tier])
    assert list(from_packages("micro", dirs, CPU).tiers) == ["end", "edge"]


def test_a_draft_that_skips_its_added_blocks_gives_the_targets_tokens(family_dir, tmp_path):
    from ruyi_core.dae.expand import expand_tier
    from ruyi_core.family.io import load_family

    fam, tok = load_family(family_dir, CPU)
    save_family(expand_tier(fam, "end", 2, init="clone"), tok, tmp_path / "expanded")  # clones: not identities
    served = from_family(tmp_path / "expanded", CPU)
    end, cloud = served.tiers["end"], served.tiers["cloud"]
    stats = SpecStats()
    for i, q in enumerate(PROMPTS):
        ids = chat_ids(served.tokenizer, q)
        want = generate(cloud, [ids], [16], served.eos)[0]
        for skip in (0, 1, 2):
            assert speculative(end, cloud, ids, 16, served.eos, k=4, stats=stats, skip=skip) == want, (i, skip)
    with pytest.raises(ValueError, match="keep at least one"):
        speculative(end, cloud, ids, 4, served.eos, skip=3)


def test_recorded_digest_chains_name_the_shared_trunk(package_dirs, tmp_path):
    """A package's recorded chain (as packaging writes it) is what serving compares before a state hand-off."""
    import shutil

    from ruyi_core.family.tensors import TRUNK_FILE, digests, stored_digests
    from ruyi_core.serve.handoff import common_depth

    dirs = {t: Path(shutil.copytree(d, tmp_path / t)) for t, d in package_dirs.items()}
    for d in dirs.values():
        (d / TRUNK_FILE).write_text(json.dumps({"digests": stored_digests(d)}))
    served = from_packages("micro", dirs, CPU)
    assert served.chains == {t: digests(m) for t, m in served.tiers.items()}
    assert common_depth(served.chains["edge"], served.chains["cloud"]) == 2  # the trunk's two blocks
    assert common_depth(served.chains["end"], served.chains["edge"]) == 0  # the embedding only


def test_packages_load_with_their_shared_blocks_once(package_dirs, packages):
    """The registry's packages, read block by block, deepest first: the same tensors (and so the same answers)
    as vanilla transformers gives each package, with the embeddings and the trunk blocks in memory once."""
    lines = []
    served = from_packages("micro", package_dirs, CPU, log=lines.append)
    assert list(served.tiers) == ["end", "edge", "cloud"]
    for t, model in served.tiers.items():
        want, got = packages[t].state_dict(), model.state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), t
        assert model.generation_config.eos_token_id == packages[t].generation_config.eos_token_id
    # end's and edge's embeddings are cloud's; edge's trunk blocks 0 and 1 are cloud's
    assert lines == ["micro: 3 tiers, 4 shared blocks kept once"]
    tiers = served.tiers
    assert shared_depth(tiers["edge"], tiers["cloud"]) == 2 and shared_depth(tiers["end"], tiers["cloud"]) == 0
    assert tiers["end"].model.embed_tokens is tiers["cloud"].model.embed_tokens
    assert served.parameters_in_memory() < sum(sum(p.numel() for p in m.parameters()) for m in packages.values())
    ids = chat_ids(served.tokenizer, PROMPTS[0])
    for t in tiers:
        assert generate(tiers[t], [ids], [8], served.eos) == generate(packages[t], [ids], [8], served.eos), t


def test_routing_curve_and_operating_point():
    from ruyi_core.serve.route import Attempt, curve

    # two questions, three tiers of depth 1, 2, 4 (cost = depth * 10 tokens); the shallow tier is sure and right
    # on the first, unsure and wrong on the second
    per = [[Attempt("end", [1], 0.9, 10), Attempt("edge", [1], 0.8, 20), Attempt("cloud", [1], 0.9, 40)],
           [Attempt("end", [2], 0.3, 10), Attempt("edge", [2], 0.7, 20), Attempt("cloud", [2], 0.9, 40)]]
    right = [[True, True, True], [False, True, True]]
    pts = {p["threshold"]: p for p in curve(per, right)}
    assert pts[0.0]["quality"] == 0.5 and pts[0.0]["compute"] == 20 / 80  # the shallowest tier answers all
    assert pts[1.01]["quality"] == 1.0 and pts[1.01]["compute"] == (70 + 70) / 80  # every tier tried
    assert pts[0.7] == {"threshold": 0.7, "quality": 1.0, "compute": (10 + 30) / 80,
                        "answered_by": {"end": 0.5, "edge": 0.5}}


def test_auto_answers_as_one_tier_and_says_which(server, served):
    from openai import OpenAI

    url, app = server
    client = OpenAI(base_url=url, api_key="unused")
    r = client.chat.completions.create(model="micro:auto", messages=[{"role": "user", "content": PROMPTS[1]}],
                                       max_tokens=8)
    tier = r.system_fingerprint.split(":")[1]
    ids = chat_ids(served.tokenizer, PROMPTS[1])
    want = served.tokenizer.decode(generate(served.tiers[tier], [ids], [8], served.eos)[0], skip_special_tokens=True)
    assert tier in served.tiers and r.choices[0].message.content == want
