"""A split deployment: a server of the end tier hands `auto` requests its tier is unsure of to a server of the
deeper tiers (the prompt and the draft, and in state mode the shared trunk's keys and values); the client gets
exactly the answering tier's own answer, told where it was computed, how it was handed over and how many bytes
crossed the network; an upstream that is down leaves the lower tier's own answer, flagged; a state the upstream's
trunk does not match is read as tokens; a malformed one is a 4xx."""
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from openai import OpenAI
from test_serve import CPU, chat_ids, family_dir, serving  # noqa: F401 - a fixture

from ruyi_core.serve.api import create_app
from ruyi_core.serve.decode import generate
from ruyi_core.family.tensors import digests
from ruyi_core.serve.decode import Read
from ruyi_core.serve.handoff import encode
from ruyi_core.serve.split import encode_step, trunk_step
from ruyi_core.serve.route import escalate
from ruyi_core.serve.tiers import from_family
from ruyi_core.serve.upstream import REFRESH_S, Upstream

QUESTIONS = ["Where does Ada live?", "What is 3 + 4?", "Tell me about Oslo.", "hi", "Who is Bo?"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alone(served, tier, ids, n):
    return generate(served.tiers[tier], [ids], [n], served.eos)[0]


def _ask(url: str, q: str, model: str = "micro:auto", n: int = 6):
    return OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60).chat.completions.create(
        model=model, messages=[{"role": "user", "content": q}], max_tokens=n)


@pytest.fixture(scope="module")
def whole(family_dir):  # noqa: F811
    return from_family(family_dir, CPU, name="micro")


def test_end_hands_on_to_edge_and_cloud_with_their_own_answers(family_dir, whole):  # noqa: F811
    end = from_family(family_dir, CPU, name="micro", only=["end"])
    deeper = from_family(family_dir, CPU, name="micro", only=["edge", "cloud"])
    assert list(end.tiers) == ["end"] and list(deeper.tiers) == ["edge", "cloud"]
    tok, seen = whole.tokenizer, set()
    for threshold in (0.012, 0.5):  # the random micro family is unsure (p ~ 0.01): some stay, most hand on
        with serving(create_app(deeper, auto_threshold=threshold)) as up, \
                serving(create_app(end, auto_threshold=threshold, upstream=Upstream(up, timeout=30))) as url:
            for q in QUESTIONS:
                r = _ask(url, q)
                tier = r.system_fingerprint.split(":")[1]
                seen.add(tier)
                want = tok.decode(_alone(whole, tier, chat_ids(tok, q), 6), skip_special_tokens=True)
                assert r.choices[0].message.content == want, (q, tier)
                extra = r.usage.model_extra
                if tier == "end":
                    assert extra["computed_at"] == "local" and extra["network_bytes"] == 0
                else:
                    assert extra["computed_at"] == up and extra["network_bytes"] > 0
                assert extra["fallback"] is None
    assert "end" in seen and "cloud" in seen


@pytest.mark.parametrize("mode", ["tokens", "state", "split"])
def test_edge_hands_cloud_its_trunk_state_and_the_answers_stay_exact(family_dir, whole, mode):  # noqa: F811
    lower = from_family(family_dir, CPU, name="micro", only=["end", "edge"])
    cloud = from_family(family_dir, CPU, name="micro", only=["cloud"])
    tok, sent = whole.tokenizer, []
    with serving(create_app(cloud)) as up, \
            serving(create_app(lower, auto_threshold=0.5, upstream=Upstream(up, timeout=30, mode=mode))) as url:
        for q in QUESTIONS:  # the random family is unsure everywhere: every answer is the cloud's
            r = _ask(url, q)
            assert r.system_fingerprint == "micro:cloud"
            want = _alone(whole, "cloud", chat_ids(tok, q), 6)
            assert r.choices[0].message.content == tok.decode(want, skip_special_tokens=True), q
            assert escalate(whole, chat_ids(tok, q), 6, 0.5).tokens == want  # one process: the same tokens
            assert r.usage.model_extra["handoff"] == mode and r.usage.model_extra["computed_at"] == up
            sent.append(r.usage.model_extra["network_bytes"])
    # two blocks' k and v (2 heads x 16) and the states, fp32; split: the states alone
    per_position = {"tokens": 0, "state": 2 * 2 * 2 * 16 * 4 + 64 * 4, "split": 64 * 4}[mode]
    prompt = min(len(chat_ids(tok, q)) for q in QUESTIONS)
    assert min(sent) > prompt * per_position and max(sent) < 1 << 20


def test_a_state_for_another_trunk_is_read_as_tokens_and_a_malformed_one_is_a_400(family_dir, whole):  # noqa: F811
    from test_serve import post

    lower = whole.tiers["edge"]
    ids = chat_ids(whole.tokenizer, QUESTIONS[0])
    a = escalate(from_family(family_dir, CPU, name="micro", only=["edge"]), ids, 4, 1.01, hand_depth=2)
    request = {"model": "micro:auto", "prompt": ids, "draft": a.draft, "max_tokens": 4}
    good = encode(request, a.read, digests(lower)[2])
    cloud = from_family(family_dir, CPU, name="micro", only=["cloud"])
    want = _alone(whole, "cloud", ids, 4)
    with serving(create_app(cloud)) as up:
        code, got = post(f"{up}/ruyi/continue-state", good, {"content-type": "application/octet-stream"})
        assert code == 200 and got["handoff"] == "state" and got["tokens"] == want, got
        code, got = post(f"{up}/ruyi/continue-state", encode(request, a.read, "0" * 32))
        assert code == 200 and got["handoff"].startswith("tokens: ") and got["tokens"] == want, got
        head, tensors = good.split(b"\n", 1)
        hostile = {"length": 10 ** 9}, {"depth": 99}, {"dtype": "int64"}, {"depth": "2"}
        bodies = [b"{no json", head, good[:-4], good + b"0000", b"[]\n", head + b"\n" + tensors[:10]] + [
            json.dumps({**json.loads(head), "state": {**json.loads(head)["state"], **h}}).encode() + b"\n" + tensors
            for h in hostile]
        for body in bodies:
            code, got = post(f"{up}/ruyi/continue-state", body)
            assert code == 400 and "state hand-off" in got["error"]["message"], (body[:80], got)
        host, port = up.split("//")[1].split("/")[0].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)  # refused on its declared length
        conn.request("POST", "/v1/ruyi/continue-state", body=b"x", headers={"content-length": str(4 << 20)})
        assert conn.getresponse().status == 413


def test_split_sessions_answer_exactly_and_refuse_bad_steps_unknown_sessions_and_a_full_table(
        family_dir, whole):  # noqa: F811
    from test_serve import post

    edge = from_family(family_dir, CPU, name="micro", only=["edge"])
    ids = chat_ids(whole.tokenizer, QUESTIONS[1])
    want = _alone(whole, "cloud", ids, 5)

    def handed():  # the edge tier's unsure answer, read at the 2 blocks it shares with the cloud
        a = escalate(edge, ids, 5, 1.01, hand_depth=2)
        return a, trunk_step(edge.tiers["edge"], a.read)

    app = create_app(from_family(family_dir, CPU, name="micro", only=["cloud"]))
    with serving(app) as up:
        a, step = handed()
        got = Upstream(up, timeout=30).split("micro:auto", ids, a.draft, 5, a.read, digests(whole.tiers["edge"])[2],
                                             step)
        assert got.tokens == want and got.tier == "cloud" and got.handoff == "split"
        a, step = handed()
        states = torch.cat([a.read.states, step(a.draft[-1], a.read.length)], 1)
        request = {"model": "micro:auto", "prompt": ids, "draft": a.draft, "max_tokens": 5}
        body = encode(request, Read(a.read.model, 2, a.read.kv, states), digests(whole.tiers["edge"])[2], kv=False)
        code, opened = post(f"{up}/ruyi/split", body, {"content-type": "application/octet-stream"})
        assert code == 200 and not opened["done"] and opened["at"] == len(ids) + len(opened["tokens"]) - 1, opened
        state = step(opened["tokens"][-1], opened["at"])
        for bad in (encode_step(opened["at"] + 1, state), encode_step(opened["at"], state)[:-4], b"{}\n",
                    encode_step(opened["at"], state) + b"\0" * 4, b"x" * 10_000):
            code, got = post(f"{up}/ruyi/split/{opened['session']}", bad)
            assert code == 400 and "split step" in got["error"]["message"], (bad[:40], got)
        code, got = post(f"{up}/ruyi/split/{'0' * 32}", encode_step(opened["at"], state))
        assert code == 404 and got["error"]["code"] == "session_not_found"
        code, got = post(f"{up}/ruyi/split/{opened['session']}", encode_step(opened["at"], state))
        assert code == 200 and got["at"] == opened["at"] + 1  # the session survived every bad step
        code, got = post(f"{up}/ruyi/split", body[:-8])
        assert code == 400 and "split hand-off" in got["error"]["message"]
        other = encode(request, Read(a.read.model, 2, a.read.kv, states), "0" * 32, kv=False)  # another version's
        code, got = post(f"{up}/ruyi/split", other)
        assert code == 200 and got["done"] and got["handoff"].startswith("tokens: ") and got["tokens"] == want
        app.state.engine.sessions.limit = 0  # a full table: the lower server hands over tokens instead
        a, step = handed()
        got = Upstream(up, timeout=30).split("micro:auto", ids, a.draft, 5, a.read, digests(whole.tiers["edge"])[2],
                                             step)
        assert got.tokens == want and got.handoff.startswith("tokens: the upstream's split sessions are full")


def test_the_cost_model_picks_state_on_a_fast_link_tokens_on_a_slow_one_and_split_for_a_slow_upstream():
    def up(mbps, rtt=1e-3, step=1e-4):
        u = Upstream("http://x", mode="auto", link_mbps=mbps)
        u._trunk = {"digests": [], "dtype": "float32", "block_token_s": 2e-4, "block_step_s": step, "rtt_s": rtt}
        u._asked_at = time.monotonic()
        return u  # as GET /v1/ruyi/trunk says, and the round trip measured, just now

    per_position = {"state": 50_000, "split": 2_000}
    # 20 positions, 20 blocks: re-reading costs 80 ms; 1 MB of state takes 8 ms at 1 Gbit/s and 1.6 s at 5 Mbit/s;
    # 16 tokens ahead cost the upstream 32 ms of trunk, or split 16 round trips (16 ms at 1 ms, 1.3 s at 80 ms)
    args = (20, 20, 32, per_position, 1e-4)
    assert up(1000).choose(*args) == "state" and up(5, 0.08).choose(*args) == "tokens"
    assert up(1000, step=5e-3).choose(*args) == "split"  # a loaded upstream: 100 ms of trunk per token
    assert up(5, 0.08, step=2e-3).choose(*args) == "tokens"  # 40 ms per token: not worth an 80 ms round trip
    assert Upstream("http://x", mode="tokens").choose(*args) == "tokens"
    assert Upstream("http://x", mode="split").choose(0, 20, 32, per_position, 1e-4) == "tokens"  # nothing shared


def test_the_cost_model_follows_the_upstreams_load():
    class Upstream_(Upstream):  # answers GET /v1/ruyi/trunk with its current speed
        step, asks = 1e-4, 0

        def _call(self, path, body=None, kind="application/json", conn=None):
            self.asks += 1
            return json.dumps({"digests": [], "dtype": "float32", "block_token_s": 2e-4,
                               "block_step_s": self.step}).encode()

    up = Upstream_("http://x", link_mbps=1000)
    args = (20, 20, 32, {"state": 50_000, "split": 2_000}, 5e-4)  # this server: 0.5 ms a block per token
    assert up.choose(*args) == "state"
    up.step = 5e-3  # the upstream got busy
    assert up.choose(*args) == "state" and up.asks == 4  # asked once (and three round trips) per REFRESH_S
    up._asked_at -= REFRESH_S + 1
    assert up.choose(*args) == "split" and up.asks == 8


def _dies_while_answering(listener: socket.socket) -> None:
    """An upstream killed mid-answer: it reads a request, sends the start of a response, and is gone."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:  # the listener closed: the test is over
            return
        with conn:
            conn.recv(65536)
            conn.sendall(b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 400\r\n\r\n{"tier": ')


@pytest.mark.parametrize("upstream", ["down", "silent", "dies"])
def test_an_upstream_down_slow_or_dying_leaves_the_lower_tiers_answer_flagged(family_dir, whole,  # noqa: F811
                                                                               upstream):
    import threading

    end = from_family(family_dir, CPU, name="micro", only=["end"])
    with socket.socket() as listener:  # "silent" accepts connections and never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = _free_port() if upstream == "down" else listener.getsockname()[1]
        if upstream == "dies":
            threading.Thread(target=_dies_while_answering, args=(listener,), daemon=True).start()
        with serving(create_app(end, upstream=Upstream(f"http://127.0.0.1:{port}", timeout=1))) as url:
            client = OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)  # its timeout bounds the wait too
            chunks = list(client.chat.completions.create(
                model="micro:auto", messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=6,
                temperature=0, stream=True, stream_options={"include_usage": True}))
    tok = whole.tokenizer
    # the role chunk goes out before the route is known; every chunk after it names the answering tier
    assert {c.system_fingerprint for c in chunks[1:]} == {"micro:end"}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == tok.decode(_alone(whole, "end", chat_ids(tok, QUESTIONS[0]), 6), skip_special_tokens=True)
    usage = chunks[-1].usage.model_extra  # the stream's last event: complete, and flagged
    assert "did not answer" in usage["fallback"] and usage["computed_at"] == "local"


def test_malformed_hand_offs_get_4xx(family_dir):  # noqa: F811
    from test_serve import post

    deeper = from_family(family_dir, CPU, name="micro", only=["edge", "cloud"])
    with serving(create_app(deeper)) as up:
        for body in ({"model": "micro:auto", "prompt": [1], "draft": [10 ** 9], "max_tokens": 4},
                     {"model": "micro:auto", "prompt": [], "draft": [1], "max_tokens": 4},
                     {"model": "micro:auto", "prompt": [1], "draft": [1, 2, 3], "max_tokens": 2},
                     {"model": "micro:cloud", "prompt": [1], "draft": [1], "max_tokens": 2}):
            code, got = post(f"{up}/ruyi/continue", json.dumps(body).encode())
            assert code == 400, (body, got)
        code, got = post(f"{up}/ruyi/continue", b'{"model": "micro:auto", "prompt": [1, 2], "draft": [3], '
                                                b'"max_tokens": 3}')
        assert code == 200 and got["tier"] in ("edge", "cloud") and len(got["tokens"]) <= 3


def _start(args: list[str], port: int | None = None) -> tuple[subprocess.Popen, str]:
    port = port or _free_port()
    proc = subprocess.Popen([Path(sys.executable).parent / "ruyi", "serve", *args, "--port", str(port)],
                            env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for _ in range(1200):
        assert proc.poll() is None, proc.stdout.read()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return proc, f"http://127.0.0.1:{port}/v1"
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(args)


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)


@pytest.mark.slow
def test_three_ruyi_serve_processes_chain_end_edge_cloud(family_dir, whole):  # noqa: F811
    """device -> edge -> cloud as three `ruyi serve` processes, the edge handing the cloud over in every mode."""
    procs, edge_port = [], _free_port()
    try:
        cloud, cloud_url = _start(["--family", str(family_dir), "--tiers", "cloud"])
        procs.append(cloud)
        edge_url = f"http://127.0.0.1:{edge_port}/v1"
        end, end_url = _start(["--family", str(family_dir), "--tiers", "end", "--upstream", edge_url])
        procs.append(end)
        tok = whole.tokenizer
        for mode in ("tokens", "state", "split", "auto"):
            edge, _ = _start(["--family", str(family_dir), "--tiers", "edge", "--upstream", cloud_url,
                              "--handoff", mode], edge_port)
            for q in QUESTIONS[:3]:  # at the default threshold (0.5) the random family's tiers are all unsure
                r = _ask(end_url, q, "micro-fam:auto")
                assert r.system_fingerprint == "micro-fam:cloud"
                assert r.choices[0].message.content == tok.decode(_alone(whole, "cloud", chat_ids(tok, q), 6),
                                                                  skip_special_tokens=True), mode
                assert r.usage.model_extra["computed_at"] == cloud_url and r.usage.model_extra["network_bytes"] > 0
                # the end tier shares only the embedding with the edge: tokens; the edge shares 2 blocks with the
                # cloud, handed over as the edge's mode says (auto: whichever its cost model picks)
                hops = r.usage.model_extra["handoff"].split(", then ")
                assert hops[0] == "tokens" and (hops[1] == mode or mode == "auto"), hops
            if mode != "auto":
                _stop(edge)
        procs.append(edge)
        _stop(cloud)
        r = _ask(end_url, QUESTIONS[0], "micro-fam:auto")  # the cloud gone: the edge answers, flagged
        assert r.system_fingerprint == "micro-fam:edge" and r.usage.model_extra["fallback"]
    finally:
        for p in procs:
            if p.poll() is None:
                _stop(p)
