"""The data stage with the real great-expectations and megatron-core: the gate passes the demo world, names each
defect class with its count and line numbers (API and CLI), and packing round-trips with exact SFT masks."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ruyi_core import demo as demo_world
from ruyi_core.demo import tokenizer_texts, world
from ruyi_core.data.cli import data_app
from ruyi_core.data.pack import prepare_corpus
from ruyi_core.data.packed import read_documents
from ruyi_core.data.validate import DataGateError, gate_or_raise, validate_corpus
from ruyi_core.family.tokenizer import IM_END, build_tokenizer
from ruyi_core.spec import DataSpec, KindThresholds

N = 60  # records in the small corpora the defect tests start from


@pytest.fixture(scope="session")
def tok():
    return build_tokenizer(512, tokenizer_texts())


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return {kind: demo_world.write_source("demo", kind, out, 0, {}) for kind in ("pretrain", "sft", "rl")}


def _good(kind: str, n: int = N) -> list[dict]:
    return {"pretrain": world.pretrain_records, "sft": world.sft_records, "rl": world.rl_records}[kind](n, seed=7)


def _write(path: Path, lines: list) -> Path:
    """Lines as bytes (written raw) or records (dumped as JSON)."""
    path.write_bytes(b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines))
    return path


@pytest.mark.parametrize("kind", ["pretrain", "sft", "rl"])
def test_demo_corpus_passes_the_gate(demo, kind, tmp_path):
    docs = tmp_path / "docs" if kind == "sft" else None
    res = gate_or_raise(validate_corpus([demo[kind]], kind, DataSpec(), docs))
    assert res.passed and not res.failures and res.n_records == len(list(res.iter_records())) > 0
    json.dumps(res.summary, allow_nan=False)  # strict JSON, as promised
    checks = {r["check"] for r in res.summary["checks"]}
    assert {"duplicates", "min_records", "missing_field", "empty_text", "readable"} <= checks
    if kind == "sft":
        assert "bad_chat_roles" in checks
        assert res.docs_index.name == "index.html" and res.docs_index.is_file()
        assert "validations/sft/" in res.docs_index.read_text()
        assert list(docs.glob("validations/sft/**/*.html")) and list(docs.glob("validations/sft_readable/**/*.html"))


def _inject(kind: str, tmp_path: Path, edits: dict[int, object], extra: list | None = None) -> Path:
    """A good corpus with the 1-based lines in `edits` replaced (and `extra` lines appended)."""
    lines: list = list(_good(kind))
    for lineno, x in edits.items():
        lines[lineno - 1] = x
    return _write(tmp_path / f"{kind}.jsonl", lines + (extra or []))


def _user(c):
    return {"role": "user", "content": c}


def _asst(c):
    return {"role": "assistant", "content": c}


# (defect class, kind, edits, appended lines, expected count, expected line numbers in the message)
DEFECTS = [
    ("bad_json", "pretrain", {5: b'{"text": "x", "source": "facts"', 17: b"not json"}, None, 2, [5, 17]),
    ("bad_utf8", "sft", {3: b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', 9: b"\xff\xfe"}, None, 2,
     [3, 9]),
    ("empty_text", "pretrain", {4: {"text": "", "source": "facts", "lang": "en"},
                                8: {"text": "  \n ", "source": "facts", "lang": "en"}}, None, 2, [4, 8]),
    ("wrong_types", "rl", {2: {"prompt": 5, "answer": "1"}, 6: [1, 2], 11: {"prompt": "q", "answer": ["7"]}},
     None, 3, [2, 6, 11]),
    ("duplicates", "pretrain", {}, "dup", 6, [N + 1, N + 2, N + 3]),
    ("missing_answer", "rl", {3: {"prompt": "How many?", "answer": ""}, 7: {"prompt": "How much?"},
                              9: {"prompt": "Which?", "answer": None}}, None, 3, [3, 7, 9]),
    ("bad_chat_roles", "sft", {2: {"messages": [_user("a"), _user("b")]},
                               5: {"messages": [_asst("hi"), _user("b")]},
                               11: {"messages": [_user("a"), _asst("b"), _user("c")]}}, None, 3, [2, 5, 11]),
]


@pytest.mark.parametrize("defect,kind,edits,extra,count,lines", DEFECTS, ids=[d[0] for d in DEFECTS])
def test_each_defect_fails_the_gate_with_count_and_lines(defect, kind, edits, extra, count, lines, tmp_path):
    if extra == "dup":  # 6 repeats of 60 records: 6 / 66 = 0.09 > 0.05
        extra = _good(kind)[:count]
    path = _inject(kind, tmp_path, edits, extra)
    res = validate_corpus([path], kind, DataSpec())
    assert not res.passed
    assert [f["check"] for f in res.failures] == [defect], res.failures
    assert res.failures[0]["count"] == count
    with pytest.raises(DataGateError) as e:
        gate_or_raise(res)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"data gate failed for {kind} (1 file, ")
    assert f"{defect}: " in msg
    if defect == "duplicates":
        assert f"({count} records: {path.name}:{N + 1} = {path.name}:1" in msg and "rate 0.091 > 0.05" in msg
    else:
        assert f"{defect}: {count} " in msg
    for ln in lines:
        assert f"{path.name}:{ln}" in msg, (ln, msg)

    r = CliRunner().invoke(data_app, ["validate", "--kind", kind, str(path), "--summary", str(tmp_path / "s.json")])
    assert r.exit_code != 0 and isinstance(r.exception, DataGateError), r.output
    assert str(r.exception) == msg and "Traceback" not in r.output
    assert json.loads((tmp_path / "s.json").read_text())["failures"][0]["check"] == defect


def test_bad_record_rate_threshold_and_multiple_files(tmp_path):
    a = _write(tmp_path / "a.jsonl", _good("rl")[:30] + [b"{oops"])
    b = _write(tmp_path / "b.jsonl", _good("rl")[30:])
    spec = DataSpec(thresholds={"rl": KindThresholds(max_bad_record_rate=0.05)})
    assert validate_corpus([a, b], "rl", spec).passed  # 1 / 61 unreadable is under 5%
    res = validate_corpus([a, b], "rl", DataSpec())  # default: any unreadable line fails
    assert not res.passed and str(_raises(res)).startswith("data gate failed for rl (2 files, 61 records): bad_json")
    assert "a.jsonl:31" in str(_raises(res))


def test_the_stored_gate_summary_is_a_function_of_the_data(tmp_path):
    """What curate_shard stores names the files as stored, not where a run found them: two runs over the same
    data in different work folders store the same bytes."""
    from ruyi_core.stages.data import stored_summary

    spec = DataSpec(thresholds={"rl": KindThresholds(max_bad_record_rate=0.05)})
    texts = []
    for where in ("run1", "run2"):
        (tmp_path / where).mkdir()
        paths = [_write(tmp_path / where / "a.jsonl", _good("rl")[:30] + [b"{oops"]),
                 _write(tmp_path / where / "b.jsonl", _good("rl")[30:])]
        res = validate_corpus(paths, "rl", spec, tmp_path / where / "docs")
        texts.append(json.dumps(stored_summary(res.summary, {str(p): f"{i:03d}-{p.name}"
                                                             for i, p in enumerate(paths)})))
    assert texts[0] == texts[1] and str(tmp_path) not in texts[0] and "000-a.jsonl" in texts[0]


def _raises(res) -> DataGateError:
    with pytest.raises(DataGateError) as e:
        gate_or_raise(res)
    return e.value


def test_parquet_streams_and_fails_on_missing_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = _good("sft")
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "sft.parquet", row_group_size=16)
    res = validate_corpus([tmp_path / "sft.parquet"], "sft")
    assert res.passed and list(res.iter_records()) == recs
    pq.write_table(pa.Table.from_pylist([{"text": r["text"]} for r in _good("pretrain")]), tmp_path / "p.parquet")
    msg = str(_raises(validate_corpus([tmp_path / "p.parquet"], "pretrain")))
    assert "missing_columns: 2 columns (source, lang)" in msg


def _pack(records, kind, tok, out, shard_tokens=1_000_000):
    return prepare_corpus(records, kind, tok, out, shard_tokens, progress=False)


def test_pretrain_and_rl_round_trip_over_shards(tok, tmp_path):
    recs = _good("pretrain", 300)
    res = _pack(recs, "pretrain", tok, tmp_path / "pt", shard_tokens=2000)
    assert len(res.shards) > 3 and res.dtype == "uint16" and res.n_docs == 300
    docs = list(read_documents(tmp_path / "pt", "pretrain"))
    assert len(docs) == 300 and sum(len(d) for d, _ in docs) == res.n_tokens
    for r, (ids, mask) in zip(recs, docs):
        assert mask is None and ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[:-1]
        assert tok.decode(ids[:-1]) == r["text"]
    meta = json.loads((tmp_path / "pt" / "dataset.json").read_text())
    assert meta["kind"] == "pretrain" and sum(s["n_docs"] for s in meta["shards"]) == 300
    assert all(s["n_tokens"] <= 2000 for s in meta["shards"])

    rl = _good("rl")
    _pack(rl, "rl", tok, tmp_path / "rl")
    for r, (ids, _) in zip(rl, read_documents(tmp_path / "rl", "rl")):
        assert tok.decode(ids) == r["prompt"] + tok.eos_token
    answers = [json.loads(x) for x in (tmp_path / "rl" / "rl_answers.jsonl").read_text().splitlines()]
    assert [a["answer"] for a in answers] == [r["answer"] for r in rl] and answers[5]["doc"] == 5


@pytest.mark.parametrize("damage", ["truncate_bin", "truncate_mask_idx", "manifest"])
def test_a_damaged_packed_dataset_is_a_data_error_naming_the_file(tok, tmp_path, damage):
    """Training's reader checks every shard whole when it opens it: one line naming the file and the fix, not
    megatron's bare ValueError at the first read past the damage."""
    from ruyi_core.errors import CorruptDataError
    from ruyi_core.megatron.data import TokenStream

    _pack(world.sft_records(40, seed=0), "sft", tok, tmp_path / "sft")
    victim = {"truncate_bin": "sft_00000.bin", "truncate_mask_idx": "sft_mask_00000.idx",
              "manifest": "dataset.json"}[damage]
    f = tmp_path / "sft" / victim
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CorruptDataError) as e:
        TokenStream(tmp_path / "sft", 32, seed=0)
    msg = str(e.value)
    assert str(f) in msg and "truncated or damaged" in msg and "re-run the data stage" in msg and "\n" not in msg
    _pack(world.sft_records(40, seed=0), "sft", tok, tmp_path / "sft")  # the fix works, whatever was damaged
    assert TokenStream(tmp_path / "sft", 32, seed=0).n_windows > 0


def test_sft_masks_cover_exactly_the_assistant_tokens(tok, tmp_path):
    recs = _good("sft", 200) + [
        {"messages": [{"role": "system", "content": "Be brief."}, _user("Spell sun."), _asst("s-u-n"),
                      _user("And tree?"), _asst(" t-r-e-e \n")]},
        {"messages": [_user("x"), _asst("<|im_start|> is literal here"), _user("ok"), _asst("fine")]},
    ]
    res = _pack(recs, "sft", tok, tmp_path / "sft", shard_tokens=3000)
    assert len(res.shards) > 1
    assert {p.name for p in (tmp_path / "sft").glob("sft_mask_00000.*")} == {"sft_mask_00000.bin",
                                                                               "sft_mask_00000.idx"}
    docs = list(read_documents(tmp_path / "sft", "sft"))
    for r, (ids, mask) in zip(recs, docs, strict=True):
        text = tok.apply_chat_template(r["messages"], tokenize=False)
        assert mask.dtype == np.uint8 and len(mask) == len(ids) and ids[-1] == tok.eos_token_id
        assert tok.decode(ids) == text + tok.eos_token
        replies = [m["content"] + IM_END for m in r["messages"] if m["role"] == "assistant"]
        assert tok.decode(ids[mask == 1]) == "".join(replies)
        rest = text
        for reply in replies:  # everything else, in order, is unmasked
            rest = rest.replace(reply, "", 1)
        assert tok.decode(ids[mask == 0]) == rest + tok.eos_token


def test_packing_is_deterministic_and_fingerprinted(tok, tmp_path):
    recs = _good("sft", 120)
    a = _pack(recs, "sft", tok, tmp_path / "a", shard_tokens=2000)
    b = _pack(recs, "sft", tok, tmp_path / "b", shard_tokens=2000)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir()) and len(files) > 5
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert a.fingerprint == b.fingerprint
    again = _pack(recs[:10], "sft", tok, tmp_path / "a", shard_tokens=2000)  # smaller re-run: no stale shards
    assert len(list((tmp_path / "a").glob("sft_*.bin"))) == 2 * len(again.shards)
    changed = [dict(r) for r in recs]
    changed[7] = {"messages": [_user("Spell lamp."), _asst("l-a-m-p")]}
    assert _pack(changed, "sft", tok, tmp_path / "c", shard_tokens=2000).fingerprint != a.fingerprint
    p1, p2 = _write(tmp_path / "1.jsonl", recs), _write(tmp_path / "2.jsonl", changed)
    f1, f2 = (validate_corpus([p], "sft").fingerprint for p in (p1, p2))
    assert f1 != f2 and f1 == validate_corpus([p1], "sft").fingerprint


def test_cli_prepare_validates_then_packs(tok, demo, tmp_path):
    tok.save_pretrained(tmp_path / "tok")
    r = CliRunner().invoke(data_app, ["prepare", "--kind", "rl", "--tokenizer", str(tmp_path / "tok"),
                                      "--out", str(tmp_path / "out"), str(demo["rl"])])
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert meta["n_docs"] == 300 and "packed rl" in r.output
    bad = _write(tmp_path / "bad.jsonl", _good("rl") + [b"\xff"])
    r = CliRunner().invoke(data_app, ["prepare", "--kind", "rl", "--tokenizer", str(tmp_path / "tok"),
                                      "--out", str(tmp_path / "out2"), str(bad)])
    assert isinstance(r.exception, DataGateError) and "bad_utf8: 1 line" in str(r.exception)
    assert not (tmp_path / "out2").exists()


def test_replay_mixes_pretraining_windows_into_sft_evenly_and_deterministically(tok, tmp_path):
    from ruyi_core.megatron.data import ReplayStream, TokenStream

    _pack(world.sft_records(60, seed=0), "sft", tok, tmp_path / "sft")
    _pack(world.pretrain_records(60, seed=0), "pretrain", tok, tmp_path / "pre")
    sft, pre = TokenStream(tmp_path / "sft", 32, seed=3), TokenStream(tmp_path / "pre", 32, seed=3)
    mixed = ReplayStream(sft, pre, 0.25)
    got = [mixed.window(i) for i in range(40)]
    # every 4th window is pretraining text (all positions trained), in the pretraining stream's own order;
    # the others are the SFT stream's windows, in its order, with nothing skipped
    extra = [w for i, w in enumerate(got) if (i + 1) % 4 == 0]
    primary = [w for i, w in enumerate(got) if (i + 1) % 4]
    assert len(extra) == 10 and all(torch_equal(a, pre.window(j)) and a[2].all() for j, a in enumerate(extra))
    assert all(torch_equal(a, sft.window(j)) for j, a in enumerate(primary))
    # a pure function of the sample index: a batch starting mid-stream (a resume) sees the same windows
    b = mixed.batch(12, 8)
    assert all(torch_equal((b["tokens"][k], b["labels"][k], b["loss_mask"][k]), got[12 + k]) for k in range(8))
    # SFT windows hold whole conversations (a window edge never separates an answer from its question): an
    # epoch trains every assistant token exactly once, and the next epoch packs them differently
    n_assistant = json.loads((tmp_path / "sft" / "dataset.json").read_text())["n_assistant_tokens"]
    sft = TokenStream(tmp_path / "sft", 160, seed=3)  # longer than any conversation (a longer one is cut)
    first = [sft.window(i) for i in range(sft.n_windows)]
    assert sum(int(m.sum()) for _, _, m in first) == n_assistant
    docs = {tuple(ids.tolist()) for ids, _ in read_documents(tmp_path / "sft")}
    for tokens, labels, _ in first:
        window, held = [int(tokens[0])] + labels.tolist(), []
        while window and window[0] != tok.eos_token_id:  # documents, each ending with EOS, then EOS padding
            end = window.index(tok.eos_token_id) + 1
            held.append(tuple(window[:end]))
            window = window[end:]
        assert held and set(held) <= docs and set(window) <= {tok.eos_token_id}
    assert not all(torch_equal(a, sft.window(sft.n_windows + i)) for i, a in enumerate(first))


def torch_equal(a, b) -> bool:
    return all(bool((x == y).all()) for x, y in zip(a, b))


def test_any_source_by_default_and_allow_lists_when_a_spec_sets_them(tmp_path):
    """The library's defaults take a real user's corpus (`source: web`, any language); a spec narrows them."""
    recs = [{"text": f"page {i} of a crawl", "source": "web", "lang": "de"} for i in range(N)]
    path = _write(tmp_path / "web.jsonl", recs)
    assert validate_corpus([path], "pretrain", DataSpec()).passed
    res = validate_corpus([path], "pretrain", DataSpec(allowed_sources=["facts"], allowed_langs=["en"]))
    assert sorted(f["check"] for f in res.failures) == ["unknown_lang", "unknown_source"]


def test_whole_packing_trains_every_text_from_its_beginning(tok, tmp_path):
    """Pretraining windows packed whole: a text that fits a window is never split across two (a worked solution
    is never trained without the question it copies from), a longer one comes in window-sized pieces, and an epoch
    still trains every token exactly once; the stream packing, by contrast, splits most short texts."""
    from ruyi_core.megatron.data import TokenStream

    recs = world.pretrain_records(80, seed=0) + [{"text": " ".join(["The river runs to the sea."] * 30),
                                                  "source": "literature", "lang": "en"}]
    _pack(recs, "pretrain", tok, tmp_path / "pre")
    docs = [ids.tolist() for ids, _ in read_documents(tmp_path / "pre")]
    seq = 96
    assert max(map(len, docs)) > 2 * (seq + 1) and sum(len(d) <= seq + 1 for d in docs) > 60

    def windows(stream):
        out = [stream.window(i) for i in range(stream.n_windows)]
        return [[int(t[0]), *lab.tolist()] for t, lab, _ in out], sum(int(m.sum()) for *_, m in out)

    def whole_in_a_window(rows, doc):
        return any(any(r[i:i + len(doc)] == doc for i in range(len(r) - len(doc) + 1)) for r in rows)

    whole = TokenStream(tmp_path / "pre", seq, seed=3, packing="whole")
    rows, trained = windows(whole)
    # every token once: each window trains all it holds but its first token (which has no context)
    assert trained == sum(map(len, docs)) - whole.n_windows
    assert all(whole_in_a_window(rows, d) for d in docs if len(d) <= seq + 1)
    assert [whole.window(i)[0].tolist() for i in range(3)] == [r[:seq] for r in rows[:3]]  # a pure function
    rows, _ = windows(TokenStream(tmp_path / "pre", seq, seed=3, packing="stream"))
    assert sum(not whole_in_a_window(rows, d) for d in docs if len(d) <= seq + 1) > 20
