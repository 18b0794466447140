"""`ruyi serve`: its flags reach the server (the API key from --api-key or RUYI_API_KEY, the draft tier, the body
bound), what it cannot serve is one line and exit 2, and as a process it answers over the OpenAI API."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest
from openai import OpenAI
from test_serve import family_dir, serving  # noqa: F401 - a fixture

MODEL = "micro-fam:cloud"  # the family folder's name, then the tier


@pytest.fixture
def started(monkeypatch):
    """What `ruyi serve` hands uvicorn, instead of listening: (app, options)."""
    import uvicorn

    got = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: got.update(app=app, **kw))
    return got


def _ask(url: str, key: str):
    return OpenAI(base_url=url, api_key=key, max_retries=0).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6)


def test_serve_flags_reach_the_server(run_cli, family_dir, started, monkeypatch):  # noqa: F811
    monkeypatch.setenv("RUYI_API_KEY", "sk-from-env")
    code, out = run_cli(["serve", "--family", family_dir, "--port", "8123", "--draft", "end", "--draft-tokens", "2"])
    assert code == 0, out
    assert MODEL in out and "API key required" in out and ":8123/v1" in out
    assert (started["host"], started["port"]) == ("127.0.0.1", 8123)
    app = started["app"]
    with serving(app) as url:
        assert _ask(url, "sk-from-env").usage.completion_tokens > 0
        assert app.state.engine.spec_stats.rounds > 0  # cloud's greedy answer was drafted by end
        with pytest.raises(openai.AuthenticationError):
            _ask(url, "sk-wrong")
    code, out = run_cli(["serve", "--family", family_dir, "--api-key", "sk-flag", "--max-body-bytes", "50"])
    assert code == 0, out
    with serving(started["app"]) as url:
        with pytest.raises(openai.AuthenticationError):
            _ask(url, "sk-from-env")  # the flag wins over the environment
        with pytest.raises(openai.APIStatusError, match="bound of 50 bytes"):
            _ask(url, "sk-flag")


@pytest.mark.parametrize("args,needle", [
    ([], "say what to serve"),
    (["--draft", "nope"], "--draft nope: micro-fam has tiers end, edge, cloud"),
    (["--tiers", "end,nope"], "--tiers end,nope: micro-fam has tiers cloud, edge, end"),
])
def test_what_cannot_be_served_is_one_line(run_cli, family_dir, started, args, needle):  # noqa: F811
    code, out = run_cli(["serve", *(["--family", family_dir] if args else []), *args])
    assert code == 2 and needle in " ".join(out.split()), out
    assert not started


@pytest.mark.slow
def test_ruyi_serve_answers_as_a_process(family_dir):  # noqa: F811
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ruyi = Path(sys.executable).parent / "ruyi"
    env = {**os.environ, "RUYI_API_KEY": "sk-proc"}
    proc = subprocess.Popen([ruyi, "serve", "--family", family_dir, "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        health = f"http://127.0.0.1:{port}/health"
        for _ in range(600):
            assert proc.poll() is None, proc.stdout.read()
            try:
                with urllib.request.urlopen(health, timeout=1) as r:
                    assert json.loads(r.read()) == {"status": "ok"}
                    break
            except OSError:
                time.sleep(0.1)
        assert _ask(f"http://127.0.0.1:{port}/v1", "sk-proc").choices[0].finish_reason in ("stop", "length")
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0 or proc.returncode == -signal.SIGINT
