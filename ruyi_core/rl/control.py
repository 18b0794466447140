"""GRPO's control (`rl.method: sft`): the same optimizer steps on the same parameters, by supervised fine-tuning on
the SFT corpus's chat turns instead of reinforcement. A step takes as many turns as a GRPO step has completions
(prompts_per_step x group_size), at GRPO's learning rate and schedule (AdamW without weight decay, linear decay:
TRL's defaults), with the loss on the assistant's tokens. What GRPO gains over this tier is the method's, not
the extra steps'."""
from __future__ import annotations

import random

import torch

from ruyi_core.data.pack import sft_examples
from ruyi_core.errors import RuyiError
from ruyi_core.spec import RlSpec


def train_sft_control(model, tok, turns: list[dict], spec: RlSpec, log=print) -> list[dict]:
    """Trains `model`'s parameters that require grad on `turns` ({messages}); one row per step (step, loss)."""
    if not turns:
        raise RuyiError("rl.method sft: the SFT corpus has no chat turns to train the control on")
    examples = sft_examples(tok, turns)
    per_step = spec.prompts_per_step * spec.group_size
    micro = spec.micro_batch_size or per_step
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / spec.steps)
    rng, rows = random.Random(spec.seed), []
    model.train()
    for step in range(1, spec.steps + 1):
        batch = [examples[rng.randrange(len(examples))] for _ in range(per_step)]
        n_tokens = sum(int(mask.sum()) for _, mask in batch)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for i in range(0, per_step, micro):
            loss = _summed_loss(model, batch[i:i + micro]) / max(n_tokens, 1)
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # as TRL's trainer (max_grad_norm 1.0)
        opt.step()
        sched.step()
        rows.append({"step": step, "loss": total})
        log(f"[grpo] sft control step {step}/{spec.steps} | loss {total:.4f}")
    return rows


def _summed_loss(model, part: list[tuple]) -> torch.Tensor:
    """Summed cross-entropy over the assistant tokens of `part` ((ids, mask) pairs), right-padded."""
    device = next(model.parameters()).device
    n = max(len(ids) for ids, _ in part)
    ids = torch.zeros(len(part), n, dtype=torch.long)
    labels = torch.full((len(part), n), -100, dtype=torch.long)
    attn = torch.zeros(len(part), n, dtype=torch.long)
    for j, (seq, mask) in enumerate(part):
        seq, mask = torch.as_tensor(seq), torch.as_tensor(mask).bool()
        ids[j, : len(seq)], attn[j, : len(seq)] = seq, 1
        labels[j, : len(seq)] = seq.masked_fill(~mask, -100)
    ids, labels, attn = ids.to(device), labels.to(device), attn.to(device)
    logits = model(ids, attention_mask=attn).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=-100, reduction="sum")
