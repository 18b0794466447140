"""Training-step speed on the CPU (1 process), measured side by side in one run: megatron's joint multi-exit
step (the trainer's) against a plain transformers training loop on the same family, weights, batch and
optimizer kind, in fp32 and in bf16 mixed precision (megatron's bf16 with fp32 masters, the demo's
`train.precision`, against transformers under bf16 autocast); megatron's full-depth-only step (joint/full
against the ideal ratio from FLOP counts); and torch.matmul on large square matrices, the machine's dense fp32
(and bf16) rate that the trainer's model-FLOP rate is a share of. Variants run interleaved, round by round (order rotated each round), after a
warm-up each, and are reported as medians: absolute times on these machines mean little, ratios measured
side by side do.

    python bench/train_step.py [--preset tiny] [--batch 8] [--seq 128] [--rounds 8] [--threads 1] [--json PATH]

The megatron step is the trainer's (ruyi_core/megatron/trainer.py) minus data loading and logging: megatron
DDP, `get_megatron_optimizer` (Adam, clip 1.0; torch's AdamW underneath on the CPU) and the schedule from
`get_forward_backward_func` with num_microbatches=1, so what is timed is what training runs, including the
DDP grad buffer, the (world-of-one) grad all-reduce, the grad-norm clip and the CPU shim (megatron/cpu.py),
entered around each megatron step, and torch's fused AdamW inside megatron's optimizer (as the trainer sets it
on the CPU). The transformers step runs outside the shim, as a plain HF loop: `forward_exits(ids, labels=ids)`,
summed losses, backward, `clip_grad_norm_(1.0)` (to match megatron's clip) and `torch.optim.AdamW(fused=True)`
(the transformers Trainer's default optimizer) with the same hyperparameters. All exit weights are 1.
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
FUSED = True  # torch's fused AdamW: the transformers Trainer's default (torch >= 2.8) and the trainer's on the CPU
MATMUL_SIZES = (1024, 2048)
FLOPS_FORMULA = ("train FLOPs/token = 6*N + 6*L*s*a: N = matmul weights (all 2-D parameters but the input "
                 "embedding), L = decoder blocks on the family's paths (trunk + exit branches), s = seq len, "
                 "a = heads*head_dim; attention QK^T and AV, forward 2 FLOPs/MAC, backward 2x forward, causal: "
                 "s/2 keys per query on average")


def train_flops_per_token(model, cfg, seq: int, n_blocks: int) -> float:
    """Model FLOPs of one trained token (forward + backward), by FLOPS_FORMULA."""
    n = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "embedding" not in name)
    return 6 * n + 6 * n_blocks * seq * cfg.num_attention_heads * cfg.head_dim


def megatron_step_fn(fam, batch: dict, seq: int, bf16: bool = False):
    """A megatron FamilyGPT with `fam`'s weights, wrapped as the trainer wraps it (`bf16`: the trainer's bf16
    mixed precision, `train.precision: bf16`); returns (step(), model)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from ruyi_core.megatron.convert import hf_to_megatron, load_into
    from ruyi_core.megatron.cpu import fuse_cpu_adam, native_torch
    from ruyi_core.megatron.model import build_model, causal_mask

    model = build_model(fam.config, 1, 1, seq, bf16=bf16)
    load_into(model, hf_to_megatron(fam.state_dict(), fam.config))
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    opt = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=LR, min_lr=LR, weight_decay=WD, clip_grad=CLIP, adam_beta1=BETAS[0],
        adam_beta2=BETAS[1], adam_eps=EPS, bf16=bf16, params_dtype=model.config.params_dtype,
        use_distributed_optimizer=False), [ddp])
    fuse_cpu_adam(opt)  # as the trainer does
    model.config.grad_scale_func = opt.scale_loss
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = ddp.no_sync
    mask = None if model.implicit_causal else causal_mask(seq)  # as the trainer does
    pos = torch.arange(seq).unsqueeze(0).expand(batch["tokens"].shape[0], -1)
    weights = [1.0] * len(fam.config.early_exit_points)
    fb = get_forward_backward_func()
    losses = {}

    def forward_step(data_iterator, model_chunk):
        b = next(data_iterator)
        with native_torch():  # as the trainer's forward step
            out, exit_losses = model_chunk(b["tokens"], pos, mask, labels=b["labels"], loss_mask=b["loss_mask"],
                                           exit_weights=weights, loss_scale=scale)
        losses.update(exit_losses)
        return out, lambda t: (t, {"loss": t.detach()})

    def step() -> list[float]:
        ddp.zero_grad_buffer()
        opt.zero_grad()
        fb(forward_step_func=forward_step, data_iterator=iter([batch]), model=[ddp], num_microbatches=1,
           seq_length=seq, micro_batch_size=batch["tokens"].shape[0], forward_only=False)
        opt.step()
        return torch.stack([losses[k] for k in sorted(losses)]).tolist()

    scale = float(opt.get_loss_scale())  # fp32: constant (the trainer reads it once per step)
    return step, model


def hf_step_fn(fam, ids: torch.Tensor, bf16: bool = False):
    """`bf16`: the forward under torch's bf16 autocast (transformers' `bf16=True` on the CPU)."""
    fam.train()
    opt = torch.optim.AdamW(fam.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, fused=FUSED)

    def step() -> list[float]:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = fam.forward_exits(ids, labels=ids)  # shifts labels itself
        sum(out.losses.values()).backward()
        torch.nn.utils.clip_grad_norm_(fam.parameters(), CLIP)
        opt.step()
        return [out.losses[p].item() for p in sorted(out.losses)]

    return step


def matmul_fn(n: int, dtype=torch.float32):
    """One dense n x n x n product in `dtype` (the machine's matmul rate: 2 n^3 FLOPs)."""
    a, b = (torch.randn(n, n, generator=torch.Generator().manual_seed(i)).to(dtype) for i in (1, 2))
    out = torch.empty(n, n, dtype=dtype)
    return lambda: [float(torch.matmul(a, b, out=out)[0, 0])]


def in_shim(step):
    """`step` inside the CPU shim, as the trainer runs (the shim is a no-op where CUDA exists)."""
    from ruyi_core.megatron.cpu import cpu_shim

    def run():
        with cpu_shim():
            return step()

    return run


def timed(step) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    losses = step()
    return time.perf_counter() - t0, losses


def build_variants(preset: str, batch: int, seq: int):
    """The variants (name -> step) and, per training variant, (parameters, train FLOPs per token)."""
    from ruyi_core.demo import tokenizer_texts
    from ruyi_core.family.convert import build_preset_base, family_from_base

    base, _ = build_preset_base(preset, tokenizer_texts())
    n_layers, exits = base.config.num_hidden_layers, EXITS[preset]
    # Two HF copies of the joint family: one for transformers' step, one as the megatron model's source
    # (each optimizer then updates its own weights, starting from the same ones).
    joint_hf, joint_src = family_from_base(base, exits), family_from_base(base, exits)
    full_src = family_from_base(base, [n_layers - 1])
    cfg = joint_hf.config
    ids = torch.randint(3, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    # megatron takes next-token labels and a mask; HF shifts labels=ids itself: the same tokens count.
    loss_mask = torch.ones(batch, seq)
    loss_mask[:, -1] = 0
    data = {"tokens": ids, "labels": torch.roll(ids, -1, dims=1), "loss_mask": loss_mask}
    mg_joint, joint_model = megatron_step_fn(joint_src, data, seq)
    mg_full, full_model = megatron_step_fn(full_src, data, seq)
    joint_blocks = n_layers + len(exits) - 1
    f_joint = train_flops_per_token(joint_model, cfg, seq, joint_blocks)
    info = {"megatron_joint": (sum(p.numel() for p in joint_model.parameters()), f_joint),
            "hf_joint": (sum(p.numel() for p in joint_hf.parameters()), f_joint),
            "megatron_full": (sum(p.numel() for p in full_model.parameters()),
                              train_flops_per_token(full_model, cfg, seq, n_layers))}
    variants = {"megatron_joint": mg_joint, "hf_joint": hf_step_fn(joint_hf, ids), "megatron_full": mg_full}
    # bf16 mixed precision (the demo's `train.precision`) against transformers under bf16 autocast, fresh copies
    variants["megatron_joint_bf16"] = megatron_step_fn(family_from_base(base, exits), data, seq, bf16=True)[0]
    variants["hf_joint_bf16"] = hf_step_fn(family_from_base(base, exits), ids, bf16=True)
    info |= {f"{n}_bf16": info[n] for n in ("megatron_joint", "hf_joint")}
    variants |= {f"matmul_{n}": matmul_fn(n) for n in MATMUL_SIZES}
    variants[f"matmul_bf16_{MATMUL_SIZES[-1]}"] = matmul_fn(MATMUL_SIZES[-1], torch.bfloat16)
    return variants, info, cfg


def measure(variants: dict, rounds: int) -> tuple[dict, dict]:
    """Warm-up step each (its losses, at the shared initial weights, must agree), then `rounds` rounds."""
    first = {name: timed(step)[1] for name, step in variants.items()}
    times = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate: no variant always first
            times[name].append(timed(variants[name])[0])
    return first, times


def report(a, info: dict, cfg, first: dict, times: dict) -> dict:
    med = {n: statistics.median(t) for n, t in times.items()}
    tokens = a.batch * a.seq
    matmul = {n: 2 * n**3 / med[f"matmul_{n}"] / 1e9 for n in MATMUL_SIZES}
    n_bf16 = MATMUL_SIZES[-1]
    bf16_rate = 2 * n_bf16**3 / med[f"matmul_bf16_{n_bf16}"] / 1e9
    fp32_peak = max(matmul.values())
    rows = []
    print(f"{'variant':<20}{'params':>9}{'step ms':>10}{'min ms':>9}{'max ms':>9}{'tok/s':>9}{'GFLOP/s':>9}"
          f"{'of matmul':>10}")
    for n, (params, fpt) in info.items():
        gflops, peak = fpt * tokens / med[n] / 1e9, bf16_rate if n.endswith("_bf16") else fp32_peak
        rows.append({"variant": n, "parameters": params, "train_mflop_per_token": round(fpt / 1e6, 3),
                     "step_ms_median": round(med[n] * 1e3, 1), "step_ms_all": [round(t * 1e3, 1) for t in times[n]],
                     "tokens_per_s": round(tokens / med[n]), "train_gflop_per_s": round(gflops, 2),
                     "share_of_matmul": round(gflops / peak, 3), "first_step_losses": [round(x, 4) for x in first[n]]})
        print(f"{n:<20}{params / 1e6:>8.2f}M{med[n] * 1e3:>10.1f}{min(times[n]) * 1e3:>9.1f}"
              f"{max(times[n]) * 1e3:>9.1f}{tokens / med[n]:>9.0f}{gflops:>9.2f}{gflops / peak:>10.0%}")
    for name, g, peak in [*((f"matmul_{n}", g, fp32_peak) for n, g in matmul.items()),
                          (f"matmul_bf16_{n_bf16}", bf16_rate, bf16_rate)]:
        print(f"{name.replace('_', ' '):<20}{'':>9}{med[name] * 1e3:>10.1f}{min(times[name]) * 1e3:>9.1f}"
              f"{max(times[name]) * 1e3:>9.1f}{'':>9}{g:>9.2f}{g / peak:>10.0%}")
    ratios = {"megatron_over_hf": med["megatron_joint"] / med["hf_joint"],
              "megatron_over_hf_best": min(times["megatron_joint"]) / min(times["hf_joint"]),
              "joint_over_full": med["megatron_joint"] / med["megatron_full"],
              "megatron_bf16_over_hf_bf16": med["megatron_joint_bf16"] / med["hf_joint_bf16"],
              "megatron_bf16_over_fp32": med["megatron_joint_bf16"] / med["megatron_joint"],
              "joint_over_full_ideal": info["megatron_joint"][1] / info["megatron_full"][1]}
    print(FLOPS_FORMULA)
    print(f"megatron/transformers step time {ratios['megatron_over_hf']:.3f} (medians; best steps "
          f"{ratios['megatron_over_hf_best']:.3f})  (<= 1: megatron as fast or faster)")
    print(f"joint/full step time {ratios['joint_over_full']:.2f}  (ideal from FLOPs "
          f"{ratios['joint_over_full_ideal']:.2f})")
    print(f"bf16 mixed precision: megatron/transformers (autocast) step time "
          f"{ratios['megatron_bf16_over_hf_bf16']:.3f}; megatron bf16/fp32 {ratios['megatron_bf16_over_fp32']:.3f}; "
          f"bf16/fp32 matmul rate {bf16_rate / matmul[n_bf16]:.2f}x")
    gap = max(abs(x - y) for x, y in zip(first["megatron_joint"], first["hf_joint"]))
    print("first-step losses per exit: megatron " + " ".join(f"{x:.4f}" for x in first["megatron_joint"])
          + " | transformers " + " ".join(f"{x:.4f}" for x in first["hf_joint"]) + f" | max gap {gap:.1e}")
    return {"preset": a.preset, "exits": EXITS[a.preset], "num_layers": cfg.num_hidden_layers, "batch": a.batch,
            "seq": a.seq, "rounds": a.rounds, "threads": a.threads, "dtypes": ["float32", "bf16 mixed"],
            "hf_attn": cfg._attn_implementation, "flops_formula": FLOPS_FORMULA,
            "matmul_gflop_per_s": {str(n): round(g, 2) for n, g in matmul.items()},
            "matmul_bf16_gflop_per_s": {str(n_bf16): round(bf16_rate, 2)},
            "ratios": {k: round(v, 3) for k, v in ratios.items()}, "first_step_loss_gap": gap, "variants": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=sorted(EXITS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 = least noisy)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from megatron.core import parallel_state as ps

    from ruyi_core.megatron.ckpt import init_distributed
    from ruyi_core.megatron.cpu import cpu_shim, seed_everything

    init_distributed()
    with cpu_shim():
        ps.initialize_model_parallel(1, 1)
        seed_everything(0)
        variants, info, cfg = build_variants(a.preset, a.batch, a.seq)
    # megatron's steps run inside the CPU shim, as in the trainer; transformers' loop and matmul outside it.
    variants |= {n: in_shim(step) for n, step in variants.items() if n.startswith("megatron")}
    first, times = measure(variants, a.rounds)
    out = report(a, info, cfg, first, times)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=2))
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
