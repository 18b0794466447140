"""Curation with datatrove through the data stage and the real store: planted duplicates, near duplicates,
off-language and junk lines and leaked benchmark items never reach the packed dataset, the gate's summary counts
each kind, and the result does not depend on how the corpus is sharded."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import with_demo
from ruyi_core.data.curate import curate, decontamination_index
from ruyi_core.data.curation_docs import corpus_docs, one_page
from ruyi_core.data.pack import prepare_corpus
from ruyi_core.data.packed import fetch_packed, read_documents, read_manifest
from ruyi_core.errors import RuyiError
from ruyi_core.family.tokenizer import build_tokenizer
from ruyi_core.spec import RunSpec
from ruyi_core.spec.sections import CurationSpec
from ruyi_core.stages import curate_shard, gate_and_curate, pack_all, plan_run, plan_shards
from ruyi_core.stages.data import dataset_records

_STOP = "the of and to a in that is was he for it with as his on be at by had not are but from or have".split()
_NOUNS = ("river mountain garden market winter letter window kitchen captain village harbour lantern orchard "
          "meadow bridge candle sailor shepherd").split()
BENCH = "the quick brown fox jumps over the lazy dog while the farmer counts his seven golden apples"
HELDOUT = "a quiet evening settled on the valley as the last train left the station for the northern coast"


def _paragraph(rng: random.Random) -> str:
    return " ".join(rng.choice(_STOP + _NOUNS * 2) for _ in range(rng.randint(60, 90))) + "."


def _planted(rng: random.Random) -> tuple[list[str], dict[str, list[str]]]:
    """Clean English-like paragraphs plus one or two records of each kind curation must remove."""
    clean = [_paragraph(rng) for _ in range(48)]
    near = clean[5].split()
    near[10] = "zebra"
    planted = {
        "exact_duplicates": [clean[3], clean[7]],
        "near_duplicates": [" ".join(near)],
        "language": ["Der Hund läuft schnell über die Straße, und der Garten ist sehr schön, während die Katze den "
                     "ganzen Tag im warmen Haus schläft und auf den Abend wartet."],
        "quality": ["asdf qwer zxcv $$$ ### 1234 5678 !!!"],
        "decontamination": [f"{_paragraph(rng)} {BENCH} {_paragraph(rng)}",
                            f"{_paragraph(rng)} {HELDOUT}. {_paragraph(rng)}"],
    }
    return clean, planted


def _write_lines(folder: Path, lines: list[str], n: int) -> list[Path]:
    """JSON lines in `n` files of consecutive records, as a corpus is split: the corpus order stays."""
    folder.mkdir(parents=True)
    size = -(-len(lines) // n)
    paths = [folder / f"part-{s:02d}.jsonl" for s in range(n)]
    for s, p in enumerate(paths):
        p.write_text("".join(x + "\n" for x in lines[s * size:(s + 1) * size]))
    return paths


def _write_shards(folder: Path, texts: list[str], n: int) -> list[Path]:
    return _write_lines(folder, [json.dumps({"text": t, "source": "web", "lang": "en"}) for t in texts], n)


def _spec(tmp_path: Path, corpus: Path, **curation) -> RunSpec:
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"question": BENCH, "answer": "seven"}) + "\n")
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(json.dumps({"text": HELDOUT, "source": "web", "lang": "en"}) + "\n")
    return RunSpec.model_validate(with_demo({
        "data": {"pretrain": [str(corpus)], "sft": ["demo"], "heldout": [str(heldout)],
                 "curation": {"languages": ["en"], **curation}},
        "rl": {"enabled": False},
        "eval": {"benchmarks": {"leaky": {"format": "exact_match", "path": str(bench)}}}}))


def test_planted_records_never_reach_the_packed_dataset_and_each_kind_is_counted(store, tmp_path):
    clean, planted = _planted(random.Random(0))
    texts = clean + [t for ts in planted.values() for t in ts]
    random.Random(1).shuffle(texts)
    _write_shards(tmp_path / "corpus", texts, 4)
    spec = _spec(tmp_path, tmp_path / "corpus")

    [raw] = gate_and_curate(spec, store, kinds=("pretrain",))
    local = tmp_path / "stored"
    store.get_folder(raw.uri, local)
    stored = json.loads((local / "gate_summary.json").read_text())
    summary = stored["curation"]
    for step, v in summary["removed"].items():  # the totals are the shards' sums
        assert sum(sh["removed"].get(step, 0) for sh in stored["shards"]) == v["count"]
    corpus_docs({"pretrain": stored}, tmp_path / "docs")  # Data Docs: the corpus in total, then each shard
    page = one_page(tmp_path / "docs")
    assert all(f"curation: {step} removed {len(v)} of {len(texts)} records" in page for step, v in planted.items())
    assert "pretrain_curation_shard00003_part-03.jsonl" in page and "Der Hund" in page
    assert {k: v["count"] for k, v in summary["removed"].items()} == {k: len(v) for k, v in planted.items()}
    assert summary["records_in"] == len(texts) and summary["records_kept"] == raw.n_records == len(clean)
    assert "overlaps leaky" in json.dumps(summary["removed"]["decontamination"]["examples"])
    assert "overlaps data.heldout" in json.dumps(summary["removed"]["decontamination"]["examples"])
    shards = json.loads((local / "dataset.json").read_text())["shards"]
    assert [Path(s["source"]).name for s in shards] == [f"part-{i:02d}.jsonl" for i in range(4)]

    # packed as the pipeline packs, shard by shard, into one dataset whose parts are the shards' packs
    tok = build_tokenizer(512, clean[:20])
    tok.save_pretrained(tmp_path / "tok")
    family = store.put_artifact("families/tok", tmp_path / "tok", stage="init_family", spec_hash="t").uri
    [data] = pack_all(spec, store, plan_run(spec, [raw]), family)
    folder = fetch_packed(store, data.uri, tmp_path / "packed")
    assert len(read_manifest(folder)["parts"]) == 4 and data.n_docs == len(clean)
    packed = [tok.decode(ids[:-1]) for ids, _ in read_documents(folder, "pretrain")]
    whole = prepare_corpus(dataset_records(store, local, tmp_path / "read"), "pretrain", tok, tmp_path / "one", 10**5)
    assert [d.tolist() for d, _ in read_documents(folder)] == [d.tolist() for d, _ in read_documents(whole.out_dir)]
    same = {t: tok.decode(tok(t)["input_ids"]) for t in texts}  # the tokenizer's round trip of each text
    assert len(packed) == len(set(packed)) == len(clean)  # no copy twice
    for kind in ("language", "quality", "decontamination"):
        assert not {same[t] for t in planted[kind]} & set(packed)
    pair = {same[clean[5]], same[planted["near_duplicates"][0]]}
    assert len(pair & set(packed)) == 1  # one of the near duplicates is kept, whichever MinHash keeps

    [again] = gate_and_curate(spec, store, kinds=("pretrain",))  # the same data under the same curation: reused
    assert again.uri == raw.uri and again.fingerprint == raw.fingerprint
    # a shard's Data Docs: the gate's checks, then what curation removed from it (a reused shard's as well)
    curate_shard(spec, store, plan_shards(spec, store)[0], docs_dir=tmp_path / "shard-docs")
    page = one_page(tmp_path / "shard-docs")
    assert "pretrain_readable" in page and "pretrain_curation" in page and "curation: language removed" in page


def test_sharding_does_not_change_what_curation_keeps(tmp_path):
    clean, planted = _planted(random.Random(0))
    texts = clean + [t for ts in planted.values() for t in ts]
    random.Random(1).shuffle(texts)
    index = decontamination_index({"leaky": [BENCH], "data.heldout": [HELDOUT]}, 13)
    kept = []
    for n in (1, 4):
        paths = _write_shards(tmp_path / f"in{n}", texts, n)
        records, result = curate([[str(p)] for p in paths], "pretrain", CurationSpec(languages=["en"]), index,
                                 tmp_path / f"out{n}")
        kept.append(sorted(r["text"] for shard in records for r in shard))
        assert {k: v["count"] for k, v in result.removed.items()} == {k: len(v) for k, v in planted.items()}
    assert kept[0] == kept[1]


def test_a_curation_that_leaves_too_little_is_one_line_and_stores_nothing(store, tmp_path):
    clean, _ = _planted(random.Random(3))
    _write_shards(tmp_path / "corpus", clean, 2)
    spec = _spec(tmp_path, tmp_path / "corpus", min_words=500)  # every paragraph is shorter
    with pytest.raises(RuyiError, match=r"curation kept 0 of 48 records.*quality removed 48: loosen data.curation"):
        gate_and_curate(spec, store, kinds=("pretrain",))
    assert not store.list_artifacts("datasets/raw/")  # no dataset; the shards' filtering is kept for a re-run


def test_keep_overlap_with_names_a_benchmark_or_held_out_set(tmp_path):
    with pytest.raises(ValueError, match="'leaky_typo' is neither a benchmark nor a held-out set"):
        _spec(tmp_path, tmp_path, keep_overlap_with=["leaky_typo"])


def test_a_grown_corpus_rebuilds_only_its_new_shard_and_the_merge(store, tmp_path, capsys):
    rng = random.Random(4)
    texts = [_paragraph(rng) for _ in range(50)]
    paths = _write_shards(tmp_path / "corpus", texts[:40], 4)
    spec = _spec(tmp_path, tmp_path / "corpus")
    build_tokenizer(512, texts[:20]).save_pretrained(tmp_path / "tok")
    family = store.put_artifact("families/grown", tmp_path / "tok", stage="init_family", spec_hash="t").uri
    [first] = gate_and_curate(spec, store, kinds=("pretrain",))
    pack_all(spec, store, plan_run(spec, [first]), family)
    before = {u: store.read_manifest(u).created_at for u in store.list_artifacts("datasets/shards/pretrain")}
    capsys.readouterr()

    (paths[-1].parent / "part-04.jsonl").write_text(
        "".join(json.dumps({"text": t, "source": "web", "lang": "en"}) + "\n" for t in texts[40:]))
    [grown] = gate_and_curate(spec, store, kinds=("pretrain",))
    log = capsys.readouterr().out
    assert log.count("[curate_shard] reused") == 4 and log.count("[curate_shard] built") == 1
    assert "[merge_data] built" in log and grown.uri != first.uri and grown.n_records > first.n_records
    [packed] = pack_all(spec, store, plan_run(spec, [grown]), family)  # and packing too packs only the new shard
    log = capsys.readouterr().out
    assert log.count("[pack_shard] reused") == 4 and log.count("[pack_shard] built") == 1
    assert "[prepare_data] built" in log and packed.n_docs == grown.n_records
    after = {u: store.read_manifest(u).created_at for u in store.list_artifacts("datasets/shards/pretrain")}
    assert len(after) == 5 and all(after[u] == t for u, t in before.items())  # the old shards were not rewritten


def test_the_demo_corpus_in_four_shards_curates_to_the_same_records_as_in_one(store, tmp_path):
    from ruyi_core.demo import write_source

    lines = write_source("demo", "pretrain", tmp_path / "whole", 0, {"pretrain": 400}).read_text().splitlines()
    _write_lines(tmp_path / "four", lines, 4)
    read = []
    for name, source in (("one", "demo"), ("four", str(tmp_path / "four"))):
        spec = RunSpec.model_validate(with_demo({"data": {"pretrain": [source], "demo_records": {"pretrain": 400}}}))
        [raw] = gate_and_curate(spec, store, kinds=("pretrain",))
        store.get_folder(raw.uri, tmp_path / name)
        read.append(list(dataset_records(store, tmp_path / name, tmp_path / f"read-{name}")))
    assert len(read[0]) > 300 and read[0] == read[1]  # the same records in the same order: the same packed tokens


def test_the_cli_curates_files_as_the_pipeline_does(tmp_path):
    from typer.testing import CliRunner

    from ruyi_core.cli import app

    clean, planted = _planted(random.Random(0))
    texts = clean + [t for ts in planted.values() for t in ts]
    random.Random(1).shuffle(texts)
    _write_shards(tmp_path / "corpus", texts, 3)
    spec = tmp_path / "spec.yaml"
    spec.write_text(_spec(tmp_path, tmp_path / "corpus").model_dump_json())  # JSON is YAML
    r = CliRunner().invoke(app, ["data", "curate", str(tmp_path / "corpus"), "--kind", "pretrain", "--spec", str(spec),
                                 "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "out" / "curation.json").read_text())
    assert {k: v["count"] for k, v in summary["removed"].items()} == {k: len(v) for k, v in planted.items()}
    kept = [line for i in range(3) for line in (tmp_path / "out" / f"part-{i:02d}.jsonl").read_text().splitlines()]
    assert len(kept) == summary["records_kept"] == len(clean)
