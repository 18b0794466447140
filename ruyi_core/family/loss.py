"""The token-mean cross-entropy of a causal LM (or one exit of a family) on texts, in batches whose logits stay
within a memory budget."""
from __future__ import annotations

import torch

LOGIT_BYTES = 2**28  # a forward batch's fp32 logits stay within this (a 152k vocabulary: 0.6 MB per token)


def rows_within(limit: int, vocab: int, seq: int, logit_bytes: int = LOGIT_BYTES) -> int:
    """How many sequences of `seq` tokens (at most `limit`, at least one) fit one batch's logits budget."""
    return max(1, min(limit, logit_bytes // (4 * vocab * seq)))


@torch.no_grad()
def heldout_loss(model, tokenizer, texts: list[str], exit_point: int | None = None, batch: int = 16,
                 logit_bytes: int = LOGIT_BYTES) -> float:
    """Mean cross-entropy per predicted token over `texts` (each followed by EOS), on the model's device. Batches
    shrink so that one batch's logits stay within `logit_bytes`."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    kw = {} if exit_point is None else {"exit_point": exit_point}
    enc = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    longest = max(map(len, enc), default=1)
    batch = rows_within(batch, model.config.vocab_size, longest, logit_bytes)
    for i in range(0, len(enc), batch):
        part = enc[i:i + batch]
        n = max(map(len, part))
        ids = torch.full((len(part), n), tokenizer.pad_token_id or 0)
        mask = torch.zeros(len(part), n, dtype=torch.long)
        for j, e in enumerate(part):  # right padding: labels of padded positions are ignored
            ids[j, : len(e)] = torch.tensor(e)
            mask[j, : len(e)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(ids, attention_mask=mask, **kw).logits
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        for j in range(len(part)):  # a row at a time: no flattened copy of the batch's logits
            total += torch.nn.functional.cross_entropy(logits[j, :-1].float(), labels[j], ignore_index=-100,
                                                       reduction="sum").item()
        count += int((labels != -100).sum())
    return total / max(count, 1)
