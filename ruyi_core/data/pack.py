"""Tokenize and pack a validated corpus into a packed dataset (ruyi_core.data.packed: megatron-core indexed
datasets): one document per record, each ending with EOS; for sft a loss mask 1 exactly on assistant tokens; for rl
the answers RL rewards need. Output is a pure function of (records, tokenizer, shard_tokens): re-running gives
byte-identical files.

SFT loss mask: the chat template is rendered turn by turn; the text an assistant turn adds after the
generation prompt, up to and including its end-of-turn special token, is tokenized as its own segment and
masked 1. Tokenizing segments separately matches inference, where the prompt ends at the generation prompt
and the reply's tokens are produced from scratch.
"""
from __future__ import annotations

import hashlib
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ruyi_core.data.packed import MANIFEST, Writer
from ruyi_core.data.schema import check_kind
from ruyi_core.errors import RuyiError

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


def sft_examples(tokenizer, records: list[dict]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Chat records ({messages}) as (token ids, assistant mask) pairs, exactly as SFT packs them."""
    return _tokenize_batch(tokenizer, records, "sft", tokenizer.eos_token_id, _special_strings(tokenizer))


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
    writer = Writer(out, kind, len(tokenizer), shard_tokens)
    specials = _special_strings(tokenizer)
    h = hashlib.sha256(f"ruyi-packed:{kind}\n".encode())
    n_docs = n_tokens = n_masked = 0
    bar = _progress(progress, len(records) if hasattr(records, "__len__") else total)
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
                if kind == "rl":
                    h.update(writer.add_answer(n_docs, r["prompt"], r.get("answer")).encode())
                n_docs += 1
                n_tokens += len(ids)
            if bar:
                bar[0].advance(bar[1], len(batch))
    finally:
        writer.close()
        if bar:
            bar[0].stop()
    vh = vocab_hash(tokenizer)
    meta = writer.finish(n_docs=n_docs, n_tokens=n_tokens, n_assistant_tokens=n_masked if kind == "sft" else None,
                         eos_token_id=eos, vocab_size=len(tokenizer), vocab_hash=vh, fingerprint=h.hexdigest())
    return PackResult(out, kind, [s["prefix"] for s in meta["shards"]], n_docs, n_tokens, meta["dtype"],
                      meta["fingerprint"], vh, out / MANIFEST)
