"""Training batches from packed megatron indexed datasets, a pure function of (seed, sample index), so resuming
needs only the number of samples consumed.

Pretraining text, packing "stream" (megatron's GPT dataset): each epoch, the documents of every shard (each ends
with EOS) form one token stream in a seeded order, cut into windows of seq_length + 1 that are visited in a seeded
order. Packing "whole", and conversations (SFT) always: every window holds whole documents (a text longer than a
window in window-sized pieces), drawn in a fresh seeded order each epoch and padded at the end. A text cut by a
window edge trains its continuation without its beginning: an answer without its question, a worked solution
without the numbers it copies, so the model learns to guess instead of read (Ding et al. 2024, "Fewer Truncations
Improve Language Modeling"). Fixed cuts would put the same texts side by side every epoch (the model memorises
contexts); reshuffling avoids that."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ruyi_core.data.packed import open_shards, read_manifest
from ruyi_core.errors import RuyiError

_OPEN_WINDOWS = 8  # whole packing: windows still being filled while packing an epoch


class TokenStream:
    def __init__(self, packed_dir: str | Path, seq_length: int, seed: int,
                 packing: Literal["stream", "whole"] = "stream"):
        meta = read_manifest(packed_dir)
        self.kind, self.seq, self.seed, self.eos = meta["kind"], seq_length, seed, int(meta["eos_token_id"])
        self.parts = list(open_shards(packed_dir, meta))  # (IndexedDataset, mask IndexedDataset | None) per shard
        lengths = [np.asarray(tok.sequence_lengths, dtype=np.int64) for tok, _ in self.parts]
        self.doc_len = np.concatenate(lengths)
        self.doc_shard = np.concatenate([np.full(len(n), i) for i, n in enumerate(lengths)])
        self.doc_local = np.concatenate([np.arange(len(n)) for n in lengths])
        total = int(self.doc_len.sum())
        conversations = self.parts[0][1] is not None
        self.whole = conversations or packing == "whole"
        self.pieces = self._pieces(split=self.whole and not conversations)
        self.n_windows = len(self._packing(0)[0]) if self.whole else (total - 1) // seq_length
        if self.n_windows < 1:
            raise RuyiError(f"{packed_dir}: {total} tokens are fewer than one window of {seq_length}: "
                            "pack more text or lower seq_length")
        self._cache: dict = {}  # epoch -> its stream or packing (O(documents) to draw: once per epoch)
        self._epoch_starts = [0]  # whole packing: the first sample of each epoch (epochs differ in length)

    def _pieces(self, split: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(document, offset, length) of what whole packing places: every document, or (split) every window-sized
        piece of one. A conversation is never split: its answer needs its question, so one longer than a window
        is cut once, in a window of its own."""
        counts = -(-self.doc_len // (self.seq + 1)) if split else np.ones(len(self.doc_len), dtype=np.int64)
        doc = np.repeat(np.arange(len(self.doc_len)), counts)
        offset = (np.arange(len(doc)) - np.repeat(np.cumsum(counts) - counts, counts)) * (self.seq + 1)
        length = self.doc_len[doc] - offset
        return doc, offset, np.minimum(length, self.seq + 1) if split else length

    def _doc(self, d: int, offset: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        tok, mask = self.parts[self.doc_shard[d]]
        ids = tok.get(int(self.doc_local[d]), offset=offset, length=length)
        m = mask.get(int(self.doc_local[d]), offset=offset, length=length) if mask is not None else None
        return ids, (m if m is not None else np.ones(length, dtype=np.uint8))

    def _span(self, order: np.ndarray, starts: np.ndarray, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """`length` tokens from `start` of the stream of documents `order` (`starts`: where each begins)."""
        toks, masks = [], []
        k = int(np.searchsorted(starts, start, side="right") - 1)
        while length > 0:
            d, off = int(order[k]), start - int(starts[k])
            n = min(length, int(starts[k + 1]) - start)
            ids, m = self._doc(d, off, n)
            toks.append(ids)
            masks.append(m)
            start, length, k = start + n, length - n, k + 1
        return np.concatenate(toks).astype(np.int64), np.concatenate(masks)

    def _stream(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(document order, where each starts in the epoch's stream, window order): both drawn per epoch, as
        megatron's GPT dataset does, so the same texts do not share a window epoch after epoch."""
        rng = np.random.default_rng(self.seed + epoch)
        order = rng.permutation(len(self.doc_len))
        return order, np.concatenate([[0], np.cumsum(self.doc_len[order])]), rng.permutation(self.n_windows)

    def _packing(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(windows, order): pieces in this epoch's order, first-fit into the last few open windows of
        seq + 1 tokens (so little is padding); row k of `windows` is the (first, end) slice of `order` that
        window k holds."""
        cap, open_ = self.seq + 1, []  # open windows: [room, their pieces]
        done = []
        for d in np.random.default_rng(self.seed + epoch).permutation(len(self.pieces[0])).tolist():
            n = int(self.pieces[2][d])
            slot = next((w for w in open_ if w[0] >= n), None)
            if slot is None:  # a conversation longer than a window gets one to itself, cut
                slot = [cap, []]
                open_.append(slot)
                if len(open_) > _OPEN_WINDOWS:
                    done.append(open_.pop(0)[1])
            slot[0] -= n
            slot[1].append(d)
        done += [w[1] for w in open_]
        sizes = np.array([len(w) for w in done])
        ends = np.cumsum(sizes)
        return np.stack([ends - sizes, ends], 1), np.array([d for w in done for d in w], dtype=np.int64)

    def _epoch(self, epoch: int):
        if epoch not in self._cache:
            self._cache = {epoch: self._packing(epoch) if self.whole else self._stream(epoch)}
        return self._cache[epoch]

    def _locate(self, sample: int) -> tuple[int, int]:
        if not self.whole:
            return divmod(sample, self.n_windows)
        while self._epoch_starts[-1] <= sample:
            e = len(self._epoch_starts) - 1
            self._epoch_starts.append(self._epoch_starts[-1] + len(self._epoch(e)[0]))
        e = int(np.searchsorted(self._epoch_starts, sample, side="right") - 1)
        return e, sample - self._epoch_starts[e]

    def window(self, sample: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens, labels, loss_mask) of global sample index `sample` (epochs wrap in a new order)."""
        epoch, i = self._locate(sample)
        if self.whole:
            (first, end), order = self._epoch(epoch)[0][i], self._epoch(epoch)[1]
            pieces = [self._doc(*(int(a[p]) for a in self.pieces)) for p in order[first:end]]
            toks = np.concatenate([p[0] for p in pieces]).astype(np.int64)[: self.seq + 1]
            mask = np.concatenate([p[1] for p in pieces])[: self.seq + 1]
            pad = self.seq + 1 - len(toks)  # padding: end-of-text tokens that are never trained
            toks, mask = np.pad(toks, (0, pad), constant_values=self.eos), np.pad(mask, (0, pad))
        else:
            order, starts, windows = self._epoch(epoch)
            toks, mask = self._span(order, starts, int(windows[i]) * self.seq, self.seq + 1)
        # The label at position t is token t+1; it counts when that token is a trained one (SFT: assistant).
        return torch.from_numpy(toks[:-1]), torch.from_numpy(toks[1:]), torch.from_numpy(mask[1:].astype(np.float32))

    def batch(self, first_sample: int, size: int) -> dict[str, torch.Tensor]:
        rows = [self.window(first_sample + j) for j in range(size)]
        return {"tokens": torch.stack([r[0] for r in rows]), "labels": torch.stack([r[1] for r in rows]),
                "loss_mask": torch.stack([r[2] for r in rows])}


class ReplayStream:
    """`primary` with a fraction `replay` of its windows drawn from `extra` (pretraining text mixed into SFT),
    spread evenly: sample i comes from `extra` when floor((i + 1) r) > floor(i r). Still a pure function of the
    sample index, so resuming stays exact."""

    def __init__(self, primary: TokenStream, extra: TokenStream, replay: float):
        self.primary, self.extra, self.r = primary, extra, replay

    def window(self, sample: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        before = int(sample * self.r)  # extra windows among samples 0..sample-1
        if int((sample + 1) * self.r) > before:
            return self.extra.window(before)
        return self.primary.window(sample - before)

    batch = TokenStream.batch
