"""The OpenAI habits clients have, through the real `openai` client: content as a list of text parts, n answers
(sampled; refused when greedy), usage on every response and on a stream's last chunk when asked, streamed
answers equal to whole ones (stop strings included), an API key, and a bound on the body checked before
anything is parsed or tokenized."""
import http.client
import json

import openai
import pytest
from openai import OpenAI
from test_serve import PROMPTS, chat_ids, family_dir, post, served, serving  # noqa: F401 - fixtures

KEY = "sk-test-ruyi"


@pytest.fixture(scope="module")
def server(served):  # noqa: F811 - the fixture imported above
    from ruyi_core.serve.api import create_app

    app = create_app(served, max_batch=8, api_key=KEY)
    with serving(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server[0], api_key=KEY, max_retries=0, timeout=120)


def _chat(client, content, **kw):
    return client.chat.completions.create(model="micro:edge", messages=[{"role": "user", "content": content}],
                                          **{"max_tokens": 12, **kw})


def test_content_as_text_parts_is_the_joined_text(client):
    parts = [{"type": "text", "text": "Where does "}, {"type": "text", "text": "Ada live?"}]
    assert _chat(client, parts).choices[0].message.content == _chat(client, PROMPTS[0]).choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="messages"):  # an image part: not a text part
        _chat(client, [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}])


def test_n_answers_are_sampled_and_greedy_n_is_refused(client):
    r = _chat(client, PROMPTS[1], n=3, temperature=1.0, seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) > 1  # seeds 7, 8, 9: different answers
    assert texts == [c.message.content for c in _chat(client, PROMPTS[1], n=3, temperature=1.0, seed=7).choices]
    assert r.usage.completion_tokens == 3 * 12 or any(c.finish_reason == "stop" for c in r.choices)
    streamed = ["", "", ""]
    for c in _chat(client, PROMPTS[1], n=3, temperature=1.0, seed=7, stream=True):
        streamed[c.choices[0].index] += c.choices[0].delta.content or ""
    assert streamed == texts
    c = client.completions.create(model="micro:end", prompt="Oslo is", n=2, temperature=0.8, max_tokens=4)
    assert [x.index for x in c.choices] == [0, 1]
    for greedy in ({"temperature": 0}, {}):
        with pytest.raises(openai.BadRequestError, match="temperature above 0") as e:
            _chat(client, PROMPTS[1], n=2, **greedy)
        assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError, match="routes greedy answers"):  # auto: every answer greedy
        client.chat.completions.create(model="micro:auto", messages=[{"role": "user", "content": "hi"}],
                                       temperature=0.7, max_tokens=4)


def test_usage_on_every_response_and_the_last_stream_chunk(client, served):
    r = _chat(client, PROMPTS[0])
    n_prompt = len(chat_ids(served.tokenizer, PROMPTS[0]))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 12, n_prompt + 12)
    chunks = list(_chat(client, PROMPTS[0], stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == n_prompt and all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == r.choices[0].message.content
    plain = list(_chat(client, PROMPTS[0], stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError, match="stream_options goes with stream"):
        _chat(client, PROMPTS[0], stream_options={"include_usage": True})


def test_streamed_answers_equal_whole_ones(client):
    for p in PROMPTS:
        kw = {"model": "micro:edge", "messages": [{"role": "user", "content": p}], "max_tokens": 20}
        text = client.chat.completions.create(**kw).choices[0].message.content
        # a stop string from the middle of the answer: the same cut either way, none of it sent
        stop = text[len(text) // 2:len(text) // 2 + 3] if len(text) > 8 else None
        for extra in ({}, {"stop": [stop, "\u00a7never"]} if stop else {}):
            want = client.chat.completions.create(**kw, **extra).choices[0]
            chunks = list(client.chat.completions.create(**kw, **extra, stream=True))
            got = "".join(c.choices[0].delta.content or "" for c in chunks)
            assert got == want.message.content, (p, extra)
            assert chunks[-1].choices[0].finish_reason == want.finish_reason
            if extra:
                assert want.message.content == text[:text.find(stop)] and want.finish_reason == "stop"
        comp = client.completions.create(model="micro:edge", prompt=p, max_tokens=20, temperature=0)
        streamed = client.completions.create(model="micro:edge", prompt=p, max_tokens=20, stream=True)
        assert "".join(c.choices[0].text for c in streamed) == comp.choices[0].text


def test_api_key_is_required(server, client):
    url, _ = server
    with pytest.raises(openai.AuthenticationError, match="API key"):
        OpenAI(base_url=url, api_key="sk-wrong", max_retries=0).models.list()
    code, body = post(f"{url}/chat/completions", json.dumps({"model": "micro:end", "messages": []}).encode())
    assert code == 401 and body["error"]["code"] == "invalid_api_key"  # no Authorization header at all
    code, body = post(url.removesuffix("/v1") + "/health", None)
    assert code == 200 and body == {"status": "ok"}  # open, for probes
    assert [m.id for m in client.models.list().data][-1] == "micro:auto"


def test_an_oversized_body_is_refused_before_it_is_tokenized(server, client, monkeypatch):
    url, app = server
    engine = app.state.engine
    called = []
    monkeypatch.setattr(engine, "prompt_ids", lambda text: called.append(len(text)))
    with pytest.raises(openai.APIStatusError, match="bound of 1048576 bytes") as e:
        client.completions.create(model="micro:end", prompt="word " * 2_000_000, max_tokens=2)  # 10 MB
    assert e.value.status_code == 413
    # chunked: no Content-Length to go by, refused while it is read
    host, port = url.split("//")[1].split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/completions", body=iter([b'{"model": "micro:end", "prompt": "'] + [b"x" * 65536] * 20),
                 headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"},
                 encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 413 and json.loads(r.read())["error"]["code"] == "request_too_large"
    assert called == []
    monkeypatch.undo()
    assert client.completions.create(model="micro:end", prompt="x", max_tokens=2).usage.completion_tokens == 2


def test_unknown_paths_answer_in_openai_shape(server):
    url, _ = server
    code, body = post(f"{url}/embeddings", b"{}", {"authorization": f"Bearer {KEY}"})
    assert code == 404 and body["error"]["message"] == "Not Found"

