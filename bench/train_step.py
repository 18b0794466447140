"""Training-step cost on the CPU (fp32, 1 process): the joint multi-exit step (forward + backward + optimizer
step, every exit's loss) over a full-depth-only step, beside the ideal ratio from FLOP counts; and megatron's
joint step over transformers' at the same config and weights. Variants run interleaved, round by round
(order rotated each round), after a warm-up step each, and are reported as medians: absolute times on
these machines mean little, ratios measured side by side do.

    python bench/train_step.py [--preset tiny] [--batch 8] [--seq 128] [--rounds 5] [--threads 1]

The megatron step is the trainer's (ruyi_core/megatron/trainer.py) minus data loading and logging: megatron
DDP, `get_megatron_optimizer` (Adam, clip 1.0; torch's AdamW underneath on the CPU) and the schedule from
`get_forward_backward_func` with num_microbatches=1, so what is timed is what training runs, including the
DDP grad buffer, the (world-of-one) grad all-reduce and the grad-norm clip. The transformers step is the
plain HF loop: `forward_exits(ids, labels=ids)`, summed losses, backward, `clip_grad_norm_(1.0)` (to match
megatron's clip) and `torch.optim.AdamW` with the same hyperparameters. All exit weights are 1.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

EXITS = {"tiny": [1, 6, 11], "micro": [1, 3]}
LR, BETAS, EPS, WD, CLIP = 1e-4, (0.9, 0.95), 1e-8, 0.1, 1.0


def forward_flops_per_token(cfg, seq: int, n_blocks: int, n_heads: int) -> float:
    """Matmul FLOPs of one token's forward pass through `n_blocks` decoder blocks and `n_heads` LM heads."""
    h, hd, q, kv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    proj = 2 * h * (q * hd + 2 * kv * hd + q * hd)  # q, k, v, o projections
    core = 2 * 2 * seq * q * hd / 2  # QK^T and AV; causal: a token sees s/2 keys on average
    mlp = 2 * 3 * h * cfg.intermediate_size  # gate, up, down
    return n_blocks * (proj + core + mlp) + n_heads * 2 * h * cfg.vocab_size


def megatron_step_fn(fam, batch: dict, seq: int):
    """A megatron FamilyGPT with `fam`'s weights, wrapped as the trainer wraps it; returns (step(), model)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from ruyi_core.megatron.convert import hf_to_megatron, load_into
    from ruyi_core.megatron.model import build_model, causal_mask

    model = build_model(fam.config, 1, 1, seq)
    load_into(model, hf_to_megatron(fam.state_dict(), fam.config))
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    opt = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=LR, min_lr=LR, weight_decay=WD, clip_grad=CLIP, adam_beta1=BETAS[0],
        adam_beta2=BETAS[1], adam_eps=EPS, bf16=False, params_dtype=torch.float32,
        use_distributed_optimizer=False), [ddp])
    model.config.grad_scale_func = opt.scale_loss
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = ddp.no_sync
    mask = causal_mask(seq)
    pos = torch.arange(seq).unsqueeze(0).expand(batch["tokens"].shape[0], -1)
    weights = [1.0] * len(fam.config.early_exit_points)
    fb = get_forward_backward_func()
    losses = {}

    def forward_step(data_iterator, model_chunk):
        b = next(data_iterator)
        out, exit_losses = model_chunk(b["tokens"], pos, mask, labels=b["labels"], loss_mask=b["loss_mask"],
                                       exit_weights=weights, loss_scale=float(opt.get_loss_scale()))
        losses.update(exit_losses)
        return out, lambda t: (t, {"loss": t.detach()})

    def step() -> list[float]:
        ddp.zero_grad_buffer()
        opt.zero_grad()
        fb(forward_step_func=forward_step, data_iterator=iter([batch]), model=[ddp], num_microbatches=1,
           seq_length=seq, micro_batch_size=batch["tokens"].shape[0], forward_only=False)
        opt.step()
        return [float(losses[k]) for k in sorted(losses)]

    return step, model


def hf_step_fn(fam, ids: torch.Tensor):
    fam.train()
    opt = torch.optim.AdamW(fam.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)

    def step() -> list[float]:
        opt.zero_grad(set_to_none=True)
        out = fam.forward_exits(ids, labels=ids)  # shifts labels itself
        sum(out.losses.values()).backward()
        torch.nn.utils.clip_grad_norm_(fam.parameters(), CLIP)
        opt.step()
        return [out.losses[p].item() for p in sorted(out.losses)]

    return step


def timed(step) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    losses = step()
    return time.perf_counter() - t0, losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=sorted(EXITS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 = least noisy)")
    ap.add_argument("--out", default="bench/results/train_step.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from megatron.core import parallel_state as ps

    from ruyi_core.family.convert import build_preset_base, family_from_base
    from ruyi_core.megatron.ckpt import init_distributed
    from ruyi_core.megatron.cpu import cpu_shim, seed_everything

    init_distributed()
    with cpu_shim():
        ps.initialize_model_parallel(1, 1)
        seed_everything(0)
        base, _ = build_preset_base(a.preset)
        n_layers = base.config.num_hidden_layers
        exits = EXITS[a.preset]
        # Two HF copies of the joint family: one for transformers' step, one as the megatron model's source
        # (each optimizer then updates its own weights, starting from the same ones).
        joint_hf = family_from_base(base, exits)
        joint_src = family_from_base(base, exits)
        full_src = family_from_base(base, [n_layers - 1])
        cfg = joint_hf.config
        ids = torch.randint(3, cfg.vocab_size, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))
        # megatron takes next-token labels and a mask; HF shifts labels=ids itself: the same tokens count.
        loss_mask = torch.ones(a.batch, a.seq)
        loss_mask[:, -1] = 0
        batch = {"tokens": ids, "labels": torch.roll(ids, -1, dims=1), "loss_mask": loss_mask}
        mg_joint, mg_joint_model = megatron_step_fn(joint_src, batch, a.seq)
        mg_full, mg_full_model = megatron_step_fn(full_src, batch, a.seq)
        variants = {"megatron_joint": mg_joint, "megatron_full": mg_full, "hf_joint": hf_step_fn(joint_hf, ids)}
        params = {"megatron_joint": sum(p.numel() for p in mg_joint_model.parameters()),
                  "megatron_full": sum(p.numel() for p in mg_full_model.parameters()),
                  "hf_joint": sum(p.numel() for p in joint_hf.parameters())}

        # Warm-up: one step each; its losses are at the shared initial weights, so they must agree.
        first = {name: timed(step)[1] for name, step in variants.items()}
        times = {name: [] for name in variants}
        names = list(variants)
        for r in range(a.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:  # rotate: no variant always first
                times[name].append(timed(variants[name])[0])

    med = {n: statistics.median(t) for n, t in times.items()}
    tokens = a.batch * a.seq
    f_joint = forward_flops_per_token(cfg, a.seq, n_layers + len(exits) - 1, len(exits))
    f_full = forward_flops_per_token(cfg, a.seq, n_layers, 1)
    ratios = {
        "joint_over_full": med["megatron_joint"] / med["megatron_full"],
        "joint_over_full_ideal": f_joint / f_full,
        "megatron_over_hf": med["megatron_joint"] / med["hf_joint"],
    }
    flops = {"megatron_joint": f_joint, "megatron_full": f_full, "hf_joint": f_joint}
    rows = []
    print(f"{'variant':<16}{'params':>9}{'step ms':>10}{'min ms':>9}{'max ms':>9}{'tok/s':>9}{'GFLOP/s':>9}")
    for n in names:
        gflops = 3 * flops[n] * tokens / med[n] / 1e9  # forward + backward (2x forward)
        rows.append({"variant": n, "parameters": params[n], "step_ms_median": round(med[n] * 1e3, 1),
                     "step_ms_all": [round(t * 1e3, 1) for t in times[n]], "tokens_per_s": round(tokens / med[n]),
                     "train_gflop_per_s": round(gflops, 2), "first_step_losses": [round(x, 4) for x in first[n]]})
        print(f"{n:<16}{params[n] / 1e6:>8.2f}M{med[n] * 1e3:>10.1f}{min(times[n]) * 1e3:>9.1f}"
              f"{max(times[n]) * 1e3:>9.1f}{tokens / med[n]:>9.0f}{gflops:>9.2f}")
    print(f"joint/full step time  {ratios['joint_over_full']:.2f}  (ideal from FLOPs {ratios['joint_over_full_ideal']:.2f}: "
          f"{f_joint / 1e6:.2f} vs {f_full / 1e6:.2f} MFLOP/token forward)")
    print(f"megatron/HF step time {ratios['megatron_over_hf']:.2f}  (< 1: megatron faster)")
    gap = max(abs(x - y) for x, y in zip(first["megatron_joint"], first["hf_joint"]))
    print("first-step losses per exit: megatron " + " ".join(f"{x:.4f}" for x in first["megatron_joint"])
          + " | HF " + " ".join(f"{x:.4f}" for x in first["hf_joint"]) + f" | max gap {gap:.1e}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "preset": a.preset, "exits": exits, "num_layers": n_layers, "batch": a.batch, "seq": a.seq,
        "rounds": a.rounds, "threads": a.threads, "dtype": "float32", "hf_attn": cfg._attn_implementation,
        "forward_mflop_per_token": {"joint": round(f_joint / 1e6, 3), "full": round(f_full / 1e6, 3)},
        "ratios": {k: round(v, 3) for k, v in ratios.items()}, "first_step_loss_gap": gap, "variants": rows,
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
