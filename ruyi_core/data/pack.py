"""Tokenize and pack a validated corpus into megatron-core indexed datasets.

Layout of `out_dir`: `<kind>_00000.bin/.idx`, ... (one document per record, each ending with EOS, shards cut
at `shard_tokens`), for sft a parallel `<kind>_mask_00000.bin/.idx` (uint8, 1 exactly on assistant tokens),
for rl `rl_answers.jsonl` (the answers RL rewards need), and `dataset.json` describing it all. Output is a pure
function of (records, tokenizer, shard_tokens): re-running gives byte-identical files.

SFT loss mask: the chat template is rendered turn by turn; the text an assistant turn adds after the
generation prompt, up to and including its end-of-turn special token, is tokenized as its own segment and
masked 1. Tokenizing segments separately matches inference, where the prompt ends at the generation prompt
and the reply's tokens are produced from scratch.
"""
from __future__ import annotations

import hashlib
import json
import re
import struct
import sys
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ruyi_core.data.schema import check_kind
from ruyi_core.errors import RuyiError

MANIFEST = "dataset.json"
ANSWERS = "rl_answers.jsonl"
_BATCH = 1024  # records tokenized per encode_batch call
_TEXT_FIELD = {"pretrain": "text", "rl": "prompt"}


@dataclass
class PackResult:
    out_dir: Path
    kind: str
    shards: list[str]  # path prefixes relative to out_dir (megatron's data_path wants out_dir/prefix)
    n_docs: int
    n_tokens: int
    dtype: str
    fingerprint: str  # sha256 of the token streams (+ masks, + rl answers)
    vocab_hash: str
    manifest: Path


def _indexed():
    with warnings.catch_warnings():  # megatron-core warns at import that Apex/TE are absent: irrelevant here
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def vocab_hash(tokenizer) -> str:
    """sha256 of everything that decides the token ids: the tokenizer's full JSON and its chat template."""
    h = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    h.update((getattr(tokenizer, "chat_template", None) or "").encode())
    return h.hexdigest()


def _special_strings(tokenizer) -> list[str]:
    return [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]


def chat_segments(tokenizer, messages: list[dict], specials: list[str]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_assistant) pieces whose concatenation is the template's text."""
    def render(msgs: list[dict], gen: bool = False) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    def unstable() -> RuyiError:
        return RuyiError("the tokenizer's chat template is not prefix-stable (rendering the first k turns is not a "
                         "prefix of rendering k+1), so the SFT loss mask cannot be derived; use a template that "
                         "renders each turn independently")

    segs, prev = [], ""
    for k, m in enumerate(messages):
        cur = render(messages[: k + 1])
        if not cur.startswith(prev):
            raise unstable()
        if m["role"] != "assistant":
            segs.append((cur[len(prev):], False))
        else:
            head = render(messages[:k], gen=True)
            if not (head.startswith(prev) and cur.startswith(head)):
                raise unstable()
            body, content = cur[len(head):], m["content"]
            # The turn ends at the first special token after the content (<|im_end|> in ours).
            start = len(content) if body.startswith(content) else 0
            hits = [(i, len(s)) for s in specials if (i := body.find(s, start)) >= 0]
            end = min(i + n for i, n in hits) if hits else (len(content) if start else len(body))
            segs += [(head[len(prev):], False), (body[:end], True), (body[end:], False)]
        prev = cur
    return [s for s in segs if s[0]]


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    # The Rust tokenizer directly: batched, multi-threaded, no Python-side offsets.
    return [e.ids for e in tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)]


def _tokenize_batch(tokenizer, recs: list[dict], kind: str, eos: int,
                    specials: list[str]) -> list[tuple[np.ndarray, np.ndarray | None]]:
    if kind != "sft":
        f = _TEXT_FIELD[kind]
        texts = [r.get(f) for r in recs]
        if any(not isinstance(t, str) for t in texts):
            raise RuyiError(f"a {kind} record has no {f!r}: validate the corpus (ruyi data validate) before packing")
        return [(np.array(ids + [eos], dtype=np.int64), None) for ids in _encode(tokenizer, texts)]
    per_doc = []
    for r in recs:
        if not isinstance(r.get("messages"), list):
            raise RuyiError("an sft record has no 'messages': validate the corpus before packing")
        per_doc.append(chat_segments(tokenizer, r["messages"], specials))
    flat = _encode(tokenizer, [t for segs in per_doc for t, _ in segs])
    out, j = [], 0
    for segs in per_doc:
        ids, mask = [], []
        for _, assistant in segs:
            ids += flat[j]
            mask += [int(assistant)] * len(flat[j])
            j += 1
        out.append((np.array(ids + [eos], dtype=np.int64), np.array(mask + [0], dtype=np.uint8)))
    return out


class _ShardWriter:
    """Documents into `<kind>_NNNNN` shards (and `<kind>_mask_NNNNN`), a new shard once the next document
    would push the current one past `shard_tokens`. A document never straddles shards."""

    def __init__(self, out: Path, kind: str, dtype, shard_tokens: int, with_mask: bool):
        self.idx, self.out, self.kind, self.dtype = _indexed(), out, kind, dtype
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
            self._mask = self.idx.IndexedDatasetBuilder(str(self.out / f"{s['mask_prefix']}.bin"), dtype=np.uint8)

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
    pat = re.compile(rf"^{kind}(_mask)?_\d{{5}}\.(bin|idx)$")
    (out / MANIFEST).unlink(missing_ok=True)  # written last: its presence means the dataset is complete
    for f in out.iterdir():
        if pat.match(f.name) or (f.name == ANSWERS and kind == "rl"):
            f.unlink()


def _progress(enabled: bool | None, total: int | None):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import Progress

    p = Progress(console=Console(stderr=True), transient=True)
    p.start()
    return p, p.add_task("packing", total=total)


def prepare_corpus(records: Iterable[dict], kind: str, tokenizer, out_dir: str | Path,
                   shard_tokens: int = 50_000_000, progress: bool | None = None,
                   total: int | None = None) -> PackResult:
    """Tokenize `records` (normalized, gate-checked) and write the indexed dataset; see the module doc."""
    check_kind(kind)
    if not getattr(tokenizer, "is_fast", False):
        raise RuyiError("packing needs a fast (Rust) tokenizer: save it with tokenizer.json")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise RuyiError("the tokenizer has no eos_token: every packed document must end with one")
    if shard_tokens < 1:
        raise RuyiError(f"shard_tokens must be >= 1, got {shard_tokens}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text()).get("kind") not in (kind, None):
        raise RuyiError(f"{out} already holds a packed {json.loads(manifest.read_text())['kind']} dataset: "
                        f"use a separate --out directory per corpus kind")
    _clean(out, kind)
    dtype = _indexed().DType.optimal_dtype(len(tokenizer))
    writer = _ShardWriter(out, kind, dtype, shard_tokens, with_mask=kind == "sft")
    specials = _special_strings(tokenizer)
    h = hashlib.sha256(f"ruyi-packed:{kind}\n".encode())
    n_docs = n_tokens = n_masked = 0
    bar = _progress(progress, len(records) if hasattr(records, "__len__") else total)
    answers = (out / ANSWERS).open("w", encoding="utf-8") if kind == "rl" else None
    try:
        it = iter(records)
        while batch := [r for _, r in zip(range(_BATCH), it)]:
            for r, (ids, mask) in zip(batch, _tokenize_batch(tokenizer, batch, kind, eos, specials)):
                writer.add(ids, mask)
                h.update(struct.pack("<Q", len(ids)))
                h.update(ids.astype("<i4").tobytes())
                if mask is not None:
                    h.update(mask.tobytes())
                    n_masked += int(mask.sum())
                if answers is not None:
                    line = json.dumps({"doc": n_docs, "prompt": r["prompt"], "answer": r.get("answer")},
                                      ensure_ascii=False) + "\n"
                    answers.write(line)
                    h.update(line.encode())
                n_docs += 1
                n_tokens += len(ids)
            if bar:
                bar[0].advance(bar[1], len(batch))
        shards = writer.finish()
    finally:
        if answers is not None:
            answers.close()
        if bar:
            bar[0].stop()
    vh = vocab_hash(tokenizer)
    meta = {
        "format": "megatron-core-indexed", "kind": kind, "shards": shards, "n_docs": n_docs, "n_tokens": n_tokens,
        "dtype": np.dtype(dtype).name, "mask_dtype": "uint8" if kind == "sft" else None,
        "n_assistant_tokens": n_masked if kind == "sft" else None, "eos_token_id": eos,
        "vocab_size": len(tokenizer), "vocab_hash": vh, "shard_tokens": shard_tokens,
        "answers": ANSWERS if kind == "rl" else None, "fingerprint": h.hexdigest(),
    }
    manifest.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return PackResult(out, kind, [s["prefix"] for s in shards], n_docs, n_tokens, meta["dtype"], meta["fingerprint"],
                      vh, manifest)


def read_manifest(out_dir: str | Path) -> dict:
    p = Path(out_dir) / MANIFEST
    if not p.is_file():
        raise RuyiError(f"{out_dir} is not a packed dataset (no {MANIFEST}): run `ruyi data prepare` first")
    return json.loads(p.read_text())


def read_documents(out_dir: str | Path, kind: str | None = None) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """(tokens, mask or None) per document, in corpus order, through megatron-core's IndexedDataset."""
    meta = read_manifest(out_dir)
    if kind is not None and meta["kind"] != kind:
        raise RuyiError(f"{out_dir} holds a {meta['kind']} dataset, not {kind}")
    idx = _indexed()
    for s in meta["shards"]:
        toks = idx.IndexedDataset(str(Path(out_dir) / s["prefix"]))
        masks = idx.IndexedDataset(str(Path(out_dir) / s["mask_prefix"])) if s["mask_prefix"] else None
        for i in range(len(toks)):
            # Copies: the arrays are views of an mmap that megatron closes when the dataset is collected.
            yield np.array(toks[i]), (np.array(masks[i]) if masks is not None else None)
        del toks, masks
