"""The packed dataset format: megatron-core indexed datasets plus a manifest, in one folder.

Layout: `<kind>_00000.bin/.idx`, ... (one document per record, shards cut so that none passes `shard_tokens`
unless one document does), for sft a parallel `<kind>_mask_00000.bin/.idx` (uint8, the loss mask), for rl
`rl_answers.jsonl` (one {"doc", "prompt", "answer"} line per document) and `dataset.json`, written last: its
presence means the dataset is complete. A dataset packed in parts (the pipeline packs each shard of a corpus
apart) keeps each part in `parts/<i>/` and its manifest lists their shards under those folders (compose).
"""
from __future__ import annotations

import json
import re
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ruyi_core.errors import CorruptDataError, RuyiError

MANIFEST = "dataset.json"
ANSWERS = "rl_answers.jsonl"
FORMAT = "megatron-core-indexed"
MASK_DTYPE = np.uint8


def indexed():
    """megatron-core's indexed_dataset module."""
    with warnings.catch_warnings():  # megatron-core warns at import that Apex/TE are absent: irrelevant here
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


class _Shards:
    """Documents into `<kind>_NNNNN` shards (and `<kind>_mask_NNNNN`), a new shard once the next document
    would push the current one past `shard_tokens`. A document never straddles shards."""

    def __init__(self, out: Path, kind: str, dtype, shard_tokens: int, with_mask: bool):
        self.idx, self.out, self.kind, self.dtype = indexed(), out, kind, dtype
        self.shard_tokens, self.with_mask = shard_tokens, with_mask
        self.shards: list[dict] = []
        self._tok = self._mask = None

    def _open(self) -> None:
        n = len(self.shards)
        s = {"prefix": f"{self.kind}_{n:05d}", "mask_prefix": f"{self.kind}_mask_{n:05d}" if self.with_mask else None,
             "n_docs": 0, "n_tokens": 0}
        self.shards.append(s)
        self._tok = self.idx.IndexedDatasetBuilder(str(self.out / f"{s['prefix']}.bin"), dtype=self.dtype)
        if self.with_mask:
            self._mask = self.idx.IndexedDatasetBuilder(str(self.out / f"{s['mask_prefix']}.bin"), dtype=MASK_DTYPE)

    def _close(self) -> None:
        if self._tok is not None:
            s = self.shards[-1]
            self._tok.finalize(str(self.out / f"{s['prefix']}.idx"))
            if self._mask is not None:
                self._mask.finalize(str(self.out / f"{s['mask_prefix']}.idx"))
        self._tok = self._mask = None

    def add(self, ids: np.ndarray, mask: np.ndarray | None) -> None:
        cur = self.shards[-1] if self._tok is not None else None
        if cur is None or (cur["n_tokens"] and cur["n_tokens"] + len(ids) > self.shard_tokens):
            self._close()
            self._open()
            cur = self.shards[-1]
        self._tok.add_document(ids, [len(ids)])
        if self._mask is not None:
            self._mask.add_document(mask, [len(mask)])
        cur["n_docs"] += 1
        cur["n_tokens"] += len(ids)

    def finish(self) -> list[dict]:
        self._close()  # an empty corpus has no shards at all: megatron cannot mmap an empty .bin
        return self.shards


def _clean(out: Path, kind: str) -> None:
    """Drop this kind's files from an earlier run, so stale extra shards cannot survive a smaller re-run."""
    manifest = out / MANIFEST
    try:
        held = json.loads(manifest.read_text()).get("kind") if manifest.is_file() else None
    except (ValueError, AttributeError):  # a damaged manifest: re-packing is its fix, so it goes like the rest
        held = None
    if held not in (kind, None):
        raise RuyiError(f"{out} already holds a packed {held} dataset: use a separate --out directory per corpus kind")
    pat = re.compile(rf"^{kind}(_mask)?_\d{{5}}\.(bin|idx)$")
    manifest.unlink(missing_ok=True)
    for f in out.iterdir():
        if pat.match(f.name) or (f.name == ANSWERS and kind == "rl"):
            f.unlink()


class Writer:
    """One packed dataset of `kind` into `out`: `add` each document (and for rl `add_answer`), then `finish`
    writes the manifest; `close` releases the files of an unfinished one."""

    def __init__(self, out: Path, kind: str, vocab_size: int, shard_tokens: int):
        out.mkdir(parents=True, exist_ok=True)
        _clean(out, kind)
        self.out, self.kind, self.shard_tokens = out, kind, shard_tokens
        self.dtype = indexed().DType.optimal_dtype(vocab_size)
        self._shards = _Shards(out, kind, self.dtype, shard_tokens, with_mask=kind == "sft")
        self._answers = (out / ANSWERS).open("w", encoding="utf-8") if kind == "rl" else None

    def add(self, ids: np.ndarray, mask: np.ndarray | None) -> None:
        self._shards.add(ids, mask)

    def add_answer(self, doc: int, prompt: str, answer) -> str:
        """Records an rl document's answer; returns the line written (for the caller's fingerprint)."""
        line = json.dumps({"doc": doc, "prompt": prompt, "answer": answer}, ensure_ascii=False) + "\n"
        self._answers.write(line)
        return line

    def close(self) -> None:
        if self._answers is not None:
            self._answers.close()

    def finish(self, **stats) -> dict:
        """Closes the shards and writes the manifest: the layout's fields plus `stats` (counts, tokenizer
        facts, fingerprint). Returns the manifest."""
        self.close()
        sft, rl = self.kind == "sft", self.kind == "rl"
        meta = {"format": FORMAT, "kind": self.kind, "shards": self._shards.finish(),
                "dtype": np.dtype(self.dtype).name, "mask_dtype": np.dtype(MASK_DTYPE).name if sft else None,
                "shard_tokens": self.shard_tokens, "answers": ANSWERS if rl else None, **stats}
        (self.out / MANIFEST).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return meta


def read_manifest(packed_dir: str | Path, kind: str | None = None) -> dict:
    """The dataset's manifest; with `kind`, an error unless it holds that kind."""
    p = Path(packed_dir) / MANIFEST
    if not p.is_file():
        raise RuyiError(f"{packed_dir} is not a packed dataset (no {MANIFEST}): run `ruyi data prepare` first")
    try:
        meta = json.loads(p.read_text())
        meta["kind"], meta["shards"]  # noqa: B018 (the fields every reader needs)
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _corrupt(p, f"unreadable manifest: {type(e).__name__}: {e}") from None
    if kind is not None and meta["kind"] != kind:
        raise RuyiError(f"{packed_dir} holds a {meta['kind']} dataset, not {kind}")
    return meta


def _corrupt(path: Path, what: str) -> CorruptDataError:
    return CorruptDataError(f"{path} is truncated or damaged ({what}): delete this packed dataset and re-run the "
                            "data stage that made it (`ruyi data prepare`, or the pipeline's prepare_data)")


def _open_shard(prefix: Path):
    """One memory-mapped IndexedDataset, checked whole: megatron would only fail (with a bare ValueError or
    AssertionError) at the first read past a truncation, deep inside training."""
    idx = indexed()
    idx_file, bin_file = prefix.with_name(prefix.name + ".idx"), prefix.with_name(prefix.name + ".bin")
    for f in (idx_file, bin_file):
        if not f.is_file():
            raise _corrupt(f, "missing")
    try:  # the index alone first: a half-built IndexedDataset fails again in its __del__
        ix = idx._IndexReader(str(idx_file), multimodal=False)
    except (ValueError, AssertionError, struct.error) as e:
        raise _corrupt(idx_file, f"{type(e).__name__}: {e}") from None
    end = int(ix.sequence_pointers[-1]) + int(ix.sequence_lengths[-1]) * ix.dtype_size if len(ix) else 0
    if (size := bin_file.stat().st_size) != end:
        raise _corrupt(bin_file, f"{size} bytes, its index needs {end}")
    return idx.IndexedDataset(str(prefix), mmap=True)


def open_shards(packed_dir: str | Path, meta: dict) -> Iterator[tuple]:
    """(tokens, mask or None) IndexedDataset pair per shard, memory-mapped, opened one at a time; a truncated or
    damaged shard is a CorruptDataError naming its file."""
    d = Path(packed_dir)
    for s in meta["shards"]:
        yield _open_shard(d / s["prefix"]), _open_shard(d / s["mask_prefix"]) if s.get("mask_prefix") else None


def read_documents(packed_dir: str | Path, kind: str | None = None) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """(tokens, mask or None) per document, in corpus order."""
    for toks, masks in open_shards(packed_dir, read_manifest(packed_dir, kind)):
        for i in range(len(toks)):
            # Copies: the arrays are views of an mmap that megatron closes when the dataset is collected.
            yield np.array(toks[i]), (np.array(masks[i]) if masks is not None else None)


def compose(parts: list[dict], uris: list[str]) -> dict:
    """One dataset's manifest from its parts' (packed shard by shard, each an artifact `uris[i]` that a reader
    fetches into `parts/<i>`): the parts' shards in order, their counts summed, the parts' fingerprints hashed."""
    import hashlib

    dirs = [f"parts/{i:05d}" for i in range(len(parts))]
    if not parts:
        raise RuyiError("a packed dataset needs at least one part")
    first = parts[0]
    same = ("format", "kind", "dtype", "mask_dtype", "eos_token_id", "vocab_size", "vocab_hash")
    for p in parts[1:]:
        if (got := {k: p.get(k) for k in same}) != (want := {k: first.get(k) for k in same}):
            raise RuyiError(f"packed parts disagree ({got} against {want}): pack every part with one tokenizer")
    shards = [{**s, "prefix": f"{d}/{s['prefix']}",
               "mask_prefix": f"{d}/{s['mask_prefix']}" if s.get("mask_prefix") else None}
              for p, d in zip(parts, dirs) for s in p["shards"]]
    h = hashlib.sha256(f"ruyi-packed-parts:{first['kind']}\n".encode())
    for p in parts:
        h.update(p["fingerprint"].encode())
    sums = {k: sum(p[k] for p in parts) for k in ("n_docs", "n_tokens")}
    if first["kind"] == "sft":
        sums["n_assistant_tokens"] = sum(p["n_assistant_tokens"] for p in parts)
    return {**{k: first.get(k) for k in same}, "shard_tokens": first["shard_tokens"], "answers": None,
            "shards": shards,
            "parts": [{"dir": d, "uri": u} for d, u in zip(dirs, uris)], **sums, "fingerprint": h.hexdigest()}


def fetch_packed(store, uri: str, dest: Path) -> Path:
    """A packed dataset from the store into `dest`, with the parts its manifest names (the pipeline packs a
    corpus shard by shard, and its dataset is the parts' artifacts: compose)."""
    store.get_artifact(uri, dest)
    for part in read_manifest(dest).get("parts", []):
        store.get_artifact(part["uri"], dest / part["dir"])
    return dest
