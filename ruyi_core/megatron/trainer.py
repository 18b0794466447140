"""Joint multi-exit training (continued pretraining or SFT) on megatron-core with TP x PP x DP, under torchrun.

    torchrun --nproc-per-node N -m ruyi_core.megatron.trainer --stage cpt --spec SPEC \\
        --family URI --init URI --data URI --out DIR [--ckpt-prefix KEY] [--resume]

Inputs are store URIs (or local directories). Every step reports every exit's loss. Checkpoints (model,
optimizer, scheduler, data position, RNG, loss history) are saved every `save_every` steps and at the end
and, with --ckpt-prefix, uploaded to the store as complete artifacts; --resume continues exactly from the
latest complete one (local or in the store). The same command runs locally and in a TrainJob.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from ruyi_core.megatron import ckpt
from ruyi_core.megatron.cpu import cpu_shim, seed_everything


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="ruyi_core.megatron.trainer")
    ap.add_argument("--stage", choices=["cpt", "sft", "dae_cpt", "dae_sft"], required=True)
    ap.add_argument("--spec", required=True, help="run spec: a YAML/JSON file, or the JSON itself")
    ap.add_argument("--family", required=True, help="HF family (URI or dir): the model's config")
    ap.add_argument("--init", help="megatron checkpoint to start from (URI or dir)")
    ap.add_argument("--data", required=True, help="packed dataset (URI or dir)")
    ap.add_argument("--replay", help="packed pretraining dataset mixed into SFT batches (URI or dir)")
    ap.add_argument("--out", type=Path, required=True, help="local work dir (shared by all ranks of a node)")
    ap.add_argument("--ckpt-prefix", help="store key prefix that receives each complete checkpoint")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--log-every", type=int, default=1)
    return ap.parse_args(argv)


def _rank0() -> bool:
    return dist.get_rank() == 0


class StoreIO:
    """Rank 0 of each node fetches inputs and rank 0 uploads checkpoints; other ranks wait at barriers."""

    def __init__(self, spec, out: Path):
        import os

        self.spec, self.out = spec, out
        self.local0 = int(os.environ.get("LOCAL_RANK", 0)) == 0
        self._store = None

    @property
    def store(self):
        if self._store is None:
            import os

            from ruyi_core.store import ArtifactStore

            self._store = ArtifactStore.from_spec(self.spec.store, env=os.environ, create_bucket=False)
        return self._store

    def fetch(self, src: str, name: str) -> Path:
        if not src.startswith("s3://"):
            return Path(src)
        dest = self.out / "inputs" / name
        if self.local0 and not (dest / ".fetched").is_file():
            self.store.get_artifact(src, dest)
            (dest / ".fetched").write_text(src)
        dist.barrier()
        return dest

    def pull_latest(self, prefix: str, root: Path) -> None:
        """The store's latest complete checkpoint, when it is newer than what is on local disk."""
        if self.local0:
            remote = sorted(self.store.list_artifacts(prefix))
            local = ckpt.latest_complete(root)
            if remote and (local is None or remote[-1].rsplit("/", 1)[-1] > local.name):
                self.store.get_artifact(remote[-1], root / remote[-1].rsplit("/", 1)[-1])
        dist.barrier()

    def push(self, path: Path, prefix: str, stage: str, step: int, inputs: list[str]) -> None:
        if _rank0():
            self.store.put_artifact(f"{prefix}/{path.name}", path, stage=f"{stage}_checkpoint",
                                    spec_hash=self.spec.fingerprint(),
                                    inputs=[i for i in inputs if i and i.startswith("s3://")], metadata={"step": step})
        dist.barrier()


class ExitLossMeter:
    """Per-exit losses of one step: recorded per microbatch on the stage that computes each exit, then
    averaged over microbatches, summed over pipeline stages (each exit lives on one) and averaged over DP."""

    def __init__(self, n_exits: int):
        self.n, self.sums, self.counts = n_exits, torch.zeros(n_exits), torch.zeros(n_exits)

    def add(self, losses: dict[int, torch.Tensor]) -> None:
        for k, v in losses.items():
            self.sums[k] += v.float().cpu()
            self.counts[k] += 1

    def reduce(self) -> list[float]:
        from megatron.core import parallel_state as ps

        vec = self.sums / self.counts.clamp(min=1)
        dist.all_reduce(vec, group=ps.get_pipeline_model_parallel_group())
        dist.all_reduce(vec, group=ps.get_data_parallel_group())
        return (vec / ps.get_data_parallel_world_size()).tolist()


def loss_curves_png(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    steps = [h["step"] for h in history]
    for p, _ in enumerate(history[0]["exits"]):
        ax.plot(steps, [h["exits"][p] for h in history], label=f"exit {history[0]['exit_points'][p]}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train(args: argparse.Namespace) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from ruyi_core.family.config import RuyiConfig
    from ruyi_core.megatron.data import ReplayStream, TokenStream
    from ruyi_core.megatron.loss import exit_weights
    from ruyi_core.megatron.model import build_model, causal_mask
    from ruyi_core.spec import load_spec, parse_spec_yaml

    spec = parse_spec_yaml(args.spec) if args.spec.lstrip().startswith("{") else load_spec(args.spec)
    par, st = spec.train.parallel, spec.train_stage(args.stage)
    cuda = torch.cuda.is_available()
    ps.initialize_model_parallel(par.tp, par.pp)
    seed_everything(st.seed)
    io = StoreIO(spec, args.out)
    hf_cfg = RuyiConfig.from_pretrained(io.fetch(args.family, "family"))
    data_dir = io.fetch(args.data, "data")
    if st.replay and not args.replay:
        raise ValueError(f"train stage {args.stage} has replay {st.replay} but no --replay dataset was given")
    exits = list(hf_cfg.early_exit_points)
    model = build_model(hf_cfg, par.tp, par.pp, st.seq_length, bf16=cuda, recompute=st.recompute)
    only = hf_cfg.tiers[spec.dae.tier] if args.stage.startswith("dae_") else None
    if only is not None:
        model.train_only(only)
    if cuda:
        model.cuda()
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    opt = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=st.lr, min_lr=st.min_lr, weight_decay=st.weight_decay, clip_grad=st.clip_grad,
        adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, bf16=cuda, params_dtype=model.config.params_dtype,
        use_distributed_optimizer=False), [ddp])
    sched = OptimizerParamScheduler(opt, init_lr=0.0, max_lr=st.lr, min_lr=st.min_lr, lr_warmup_steps=st.warmup_steps,
                                    lr_decay_steps=st.steps, lr_decay_style="cosine", start_wd=st.weight_decay,
                                    end_wd=st.weight_decay, wd_incr_steps=st.steps, wd_incr_style="constant")
    model.config.grad_scale_func = opt.scale_loss
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = ddp.no_sync

    ckpt_root = args.out / "checkpoints"
    state = {"step": 0, "consumed": 0, "history": []}
    if args.resume and args.ckpt_prefix:
        io.pull_latest(args.ckpt_prefix, ckpt_root)
    last = ckpt.latest_complete(ckpt_root) if args.resume else None
    if last is not None:
        extra = ckpt.load(last, ddp.module, opt)
        sched.load_state_dict(extra["scheduler"])
        torch.set_rng_state(extra["rng"])
        state = {k: extra[k] for k in state}
        if _rank0():
            print(f"resumed from {last.name} (step {state['step']})", flush=True)
    elif args.init is not None:
        ckpt.load(io.fetch(args.init, "init"), ddp.module)
        # The loaded model weights replaced the optimizer's fp32 master copies only when they are the same
        # tensors (fp32); with bf16 params, reload the masters from the model.
        if cuda:
            opt.reload_model_params()

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    if st.global_batch_size % (st.micro_batch_size * dp):
        raise ValueError(f"global_batch_size {st.global_batch_size} is not a multiple of micro_batch_size x dp "
                         f"= {st.micro_batch_size * dp}")
    n_micro = st.global_batch_size // (st.micro_batch_size * dp)
    stream = TokenStream(data_dir, st.seq_length, st.seed)
    if st.replay:
        stream = ReplayStream(stream, TokenStream(io.fetch(args.replay, "replay"), st.seq_length, st.seed), st.replay)
    device = torch.device("cuda") if cuda else torch.device("cpu")
    mask = causal_mask(st.seq_length, device)
    pos = torch.arange(st.seq_length, device=device).unsqueeze(0).expand(st.micro_batch_size, -1)
    fb = get_forward_backward_func()
    log_path = args.out / f"{args.stage}_losses.jsonl"
    if _rank0():  # the log restarts from the checkpoint's history: steps after it will be redone
        args.out.mkdir(parents=True, exist_ok=True)
        log_path.write_text("".join(json.dumps(r) + "\n" for r in state["history"]))
    started, tokens_done = time.perf_counter(), 0

    while state["step"] < st.steps:
        step = state["step"]
        lam = exit_weights(st.loss, len(exits), step, st.steps) if only is None else \
            [1.0 if p == only else 0.0 for p in exits]
        meter = ExitLossMeter(len(exits))
        first = state["consumed"] + dp_rank * n_micro * st.micro_batch_size

        def batches():
            for m in range(n_micro):
                b = stream.batch(first + m * st.micro_batch_size, st.micro_batch_size)
                yield {k: v.to(device) for k, v in b.items()}

        def forward_step(data_iterator, model_chunk):
            b = next(data_iterator)
            scale = float(opt.get_loss_scale()) / n_micro
            out = model_chunk(b["tokens"], pos, mask, labels=b["labels"], loss_mask=b["loss_mask"],
                              exit_weights=lam, loss_scale=scale)
            meter.add(ddp.module.last_exit_losses)
            return out, lambda t: (t, {"loss": t.detach()})

        ddp.zero_grad_buffer()
        opt.zero_grad()
        fb(forward_step_func=forward_step, data_iterator=batches(), model=[ddp], num_microbatches=n_micro,
           seq_length=st.seq_length, micro_batch_size=st.micro_batch_size, forward_only=False)
        ok, grad_norm, _ = opt.step()
        sched.step(increment=1)
        per_exit = meter.reduce()
        state["step"] += 1
        state["consumed"] += st.global_batch_size
        tokens_done += st.global_batch_size * st.seq_length
        rec = {"step": state["step"], "loss": sum(w * v for w, v in zip(lam, per_exit)), "exits": per_exit,
               "exit_points": exits, "weights": lam, "lr": opt.param_groups[0]["lr"],
               "grad_norm": float(grad_norm) if grad_norm is not None else None}
        state["history"].append(rec)
        if _rank0():
            with log_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            if state["step"] % args.log_every == 0 or state["step"] == st.steps:
                rate = tokens_done / max(time.perf_counter() - started, 1e-9)
                left = (st.steps - state["step"]) * st.global_batch_size * st.seq_length / max(rate, 1e-9)
                print(f"[{args.stage}] step {state['step']}/{st.steps} | loss {rec['loss']:.4f} | exits "
                      + " ".join(f"{v:.3f}" for v in per_exit)
                      + f" | lr {rec['lr']:.2e} | {rate:,.0f} tok/s | ETA {left:.0f}s", flush=True)
        if state["step"] % st.save_every == 0 or state["step"] == st.steps:
            extra = {**state, "scheduler": sched.state_dict(), "rng": torch.get_rng_state()}
            path = ckpt_root / f"iter_{state['step']:07d}"
            ckpt.save(path, ddp.module, opt, extra)
            if _rank0():  # the loss log travels with each checkpoint, wherever the trainer ran
                (path / log_path.name).write_bytes(log_path.read_bytes())
                loss_curves_png(state["history"], path / f"{args.stage}_losses.png", f"{args.stage}: loss per exit")
            if args.ckpt_prefix:
                io.push(path, args.ckpt_prefix, args.stage, state["step"],
                        [u for u in (args.family, args.data, args.replay, args.init) if u])


def main(argv=None) -> None:
    args = parse_args(argv)
    ckpt.init_distributed()
    try:
        with cpu_shim():
            train(args)
    except ValueError as e:  # layout and batch errors: one line from rank 0
        if dist.get_rank() == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
