"""Joint multi-exit training (continued pretraining or SFT) on megatron-core with TP x PP x DP, under torchrun.

    torchrun --nproc-per-node N -m ruyi_core.megatron.trainer --stage cpt --spec SPEC \\
        --family URI (--init URI | --init-hf URI [--export DIR]) --data URI --out DIR \\
        [--ckpt-prefix KEY] [--resume]

Inputs are store URIs (or local directories). Every step reports every exit's loss (a DaE stage: its tier's).
Checkpoints (model, optimizer, scheduler, data position, RNG, loss history) are saved every `save_every` steps
and at the end and, with --ckpt-prefix, uploaded to the store as complete artifacts; --resume continues exactly
from the latest complete one (local or in the store). The same command runs locally and in a TrainJob.
"""
from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from ruyi_core.errors import RuyiError
from ruyi_core.megatron import ckpt
from ruyi_core.megatron.cpu import cpu_shim, fuse_cpu_adam, native_torch, seed_everything
from ruyi_core.megatron.loss import exit_weights
from ruyi_core.megatron.losslog import LossLog
from ruyi_core.megatron.storage import CheckpointStore, StoreIO
from ruyi_core.spec.train import TRAINING_STAGES, TrainStageSpec


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="ruyi_core.megatron.trainer")
    ap.add_argument("--stage", choices=list(TRAINING_STAGES), required=True)
    ap.add_argument("--spec", required=True, help="run spec: a YAML/JSON file, or the JSON itself")
    ap.add_argument("--family", required=True, help="HF family (URI or dir): the model's config")
    init = ap.add_mutually_exclusive_group()
    init.add_argument("--init", help="megatron checkpoint to start from (URI or dir)")
    # One rank (TP = PP = DP = 1): the HF family is read and written in process, sparing a converter process
    # (and its megatron import) on each side of the stage.
    init.add_argument("--init-hf", help="HF family (URI or dir) to start from, read in process; one rank only")
    ap.add_argument("--export", type=Path, help="write the trained HF family here at the end; with --init-hf")
    ap.add_argument("--data", required=True, help="packed dataset (URI or dir)")
    ap.add_argument("--replay", help="packed pretraining dataset mixed into SFT batches (URI or dir)")
    ap.add_argument("--out", type=Path, required=True, help="local work dir (shared by all ranks of a node)")
    ap.add_argument("--ckpt-prefix", help="store key prefix that receives each complete checkpoint")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--log-every", type=int, default=1)
    return ap.parse_args(argv)


def _rank0() -> bool:
    return dist.get_rank() == 0


def lr_scheduler(opt, st: TrainStageSpec):
    """megatron's scheduler for a stage: linear warm-up to st.lr, then st.lr_schedule's decay to st.min_lr."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    wsd = st.lr_schedule == "wsd"
    return OptimizerParamScheduler(
        opt, init_lr=0.0, max_lr=st.lr, min_lr=st.min_lr, lr_warmup_steps=st.warmup_steps, lr_decay_steps=st.steps,
        lr_decay_style="WSD" if wsd else "cosine", wsd_decay_steps=st.wsd_decay_steps if wsd else None,
        lr_wsd_decay_style="cosine" if wsd else None, start_wd=st.weight_decay, end_wd=st.weight_decay,
        wd_incr_steps=st.steps, wd_incr_style="constant")


class ExitLossMeter:
    """Per-exit losses of one step: recorded per microbatch on the stage that computes each exit, then
    averaged over microbatches, summed over pipeline stages (each exit lives on one) and averaged over DP.
    Sums stay on the device (no host sync per microbatch); `reduce()` syncs once per step."""

    def __init__(self, n_exits: int, device: torch.device):
        self.n, self.sums, self.counts = n_exits, torch.zeros(n_exits, device=device), [0] * n_exits

    def add(self, losses: dict[int, torch.Tensor]) -> None:
        for k, v in losses.items():
            self.sums[k] += v.float()
            self.counts[k] += 1

    def reduce(self) -> list[float]:
        from megatron.core import parallel_state as ps

        vec = self.sums / torch.tensor(self.counts, dtype=torch.float32, device=self.sums.device).clamp(min=1)
        dist.all_reduce(vec, group=ps.get_pipeline_model_parallel_group())
        dist.all_reduce(vec, group=ps.get_data_parallel_group())
        return (vec / ps.get_data_parallel_world_size()).tolist()


def _last_exit_loss(loss: torch.Tensor):
    """The loss function megatron's schedule calls on the last stage's output."""
    return loss, {"loss": loss.detach()}


class Trainer:
    """One training stage on this rank. The constructor builds model, optimizer, scheduler and data; `step()`
    runs one optimizer step and returns every exit's loss; `save()` checkpoints; `resume()` continues from the
    latest complete checkpoint; `run()` trains to the end. A checkpoint holds the model and optimizer shards,
    every rank's RNG states and `state_dict()` (step, data position, scheduler, loss history)."""

    def __init__(self, args: argparse.Namespace):
        from megatron.core import parallel_state as ps

        from ruyi_core.family.config import RuyiConfig
        from ruyi_core.spec import spec_from_arg

        self.args = args
        self.spec = spec_from_arg(args.spec)
        self.st, par = self.spec.train_stage(args.stage), self.spec.train.parallel
        if (args.init_hf or args.export) and (dist.get_world_size() > 1 or not args.init_hf):
            raise RuyiError("--init-hf and --export run on one rank, --export with --init-hf: use --init and "
                            "`python -m ruyi_core.megatron.ckpt from-hf/to-hf` for a parallel layout")
        if self.st.replay and not args.replay:
            raise RuyiError(f"train stage {args.stage} has replay {self.st.replay}: pass a --replay dataset")
        from ruyi_core.runtime import for_spec

        rt = for_spec(self.spec)  # CUDA + bf16 where GPUs are visible, CPU + fp32 here (spec.runtime)
        self.cuda, self.bf16 = rt.cuda, self.spec.train.bf16(rt.dtype == torch.bfloat16)
        self.device = rt.device
        ps.initialize_model_parallel(par.tp, par.pp)
        seed_everything(self.st.seed)
        self.io = StoreIO(self.spec, args.out)
        self.hf_cfg = RuyiConfig.from_pretrained(self.io.fetch(args.family, "family", only=["config.json"]))
        self.exits = list(self.hf_cfg.early_exit_points)
        self.only = self.hf_cfg.tiers[self.spec.dae.tier] if args.stage.startswith("dae_") else None
        self.step_idx, self.consumed, self.history = 0, 0, []
        self.checkpoints = CheckpointStore(self.io, args.out / "checkpoints", args.ckpt_prefix, args.stage,
                                           [args.family, args.data, args.replay])
        self.losses = LossLog(args.out, args.stage, writes=_rank0())
        self._build_model()
        self._build_data()

    def _build_model(self) -> None:
        from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                               finalize_model_grads)
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from ruyi_core.megatron.model import build_model

        st, par = self.st, self.spec.train.parallel
        dist_opt, seq_par = par.resolved(self.cuda)
        model = build_model(self.hf_cfg, par.tp, par.pp, st.seq_length, bf16=self.bf16, recompute=st.recompute,
                            sequence_parallel=seq_par, impl=self.spec.train.transformer_impl)
        if self.only is not None:
            model.train_only(self.only)
        if self.cuda:
            model.cuda()
        self.ddp = DistributedDataParallel(
            model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=dist_opt),
            model)
        self.opt = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=st.lr, min_lr=st.min_lr, weight_decay=st.weight_decay, clip_grad=st.clip_grad,
            adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, bf16=self.bf16, params_dtype=model.config.params_dtype,
            use_distributed_optimizer=dist_opt), [self.ddp])
        fuse_cpu_adam(self.opt)
        self.sched = lr_scheduler(self.opt, st)
        model.config.grad_scale_func = self.opt.scale_loss
        model.config.finalize_model_grads_func = finalize_model_grads
        model.config.no_sync_func = self.ddp.no_sync
        self.forward_backward = get_forward_backward_func()

    def _build_data(self) -> None:
        from megatron.core import parallel_state as ps

        from ruyi_core.megatron.data import ReplayStream, TokenStream
        from ruyi_core.megatron.model import causal_mask

        st, dp = self.st, ps.get_data_parallel_world_size()
        if st.global_batch_size % (st.micro_batch_size * dp):
            raise RuyiError(f"train.{self.args.stage}.global_batch_size = {st.global_batch_size} must be a multiple "
                            f"of micro_batch_size x dp = {st.micro_batch_size * dp}")
        self.n_micro, self.dp_rank = st.global_batch_size // (st.micro_batch_size * dp), ps.get_data_parallel_rank()
        def stream(ref: str, name: str) -> TokenStream:
            return TokenStream(self.io.fetch(ref, name, packed=True), st.seq_length, st.seed, st.packing)

        self.stream = stream(self.args.data, "data")
        if st.replay:
            extra = stream(self.args.replay, "replay")
            self.stream = ReplayStream(self.stream, extra, st.replay)
        # SDPA's causal kernel (the CPU spec) needs no mask; Transformer Engine's path keeps the explicit one.
        self.mask = None if self.ddp.module.implicit_causal else causal_mask(st.seq_length, self.device)
        self.pos = torch.arange(st.seq_length, device=self.device).unsqueeze(0).expand(st.micro_batch_size, -1)

    def state_dict(self) -> dict:
        """Training state beside the model, optimizer and RNG shards (`consumed` is the data position)."""
        return {"step": self.step_idx, "consumed": self.consumed, "history": self.history,
                "scheduler": self.sched.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step_idx, self.consumed, self.history = state["step"], state["consumed"], state["history"]
        self.sched.load_state_dict(state["scheduler"])

    def weights(self) -> list[float]:
        """lambda_k for the coming step; a DaE stage trains only its tier's exit."""
        if self.only is not None:
            return [1.0 if p == self.only else 0.0 for p in self.exits]
        return exit_weights(self.st.loss, len(self.exits), self.step_idx, self.st.steps)

    def _microbatches(self):
        """This DP rank's share of the next global batch: a pure function of the samples consumed so far."""
        mb = self.st.micro_batch_size
        first = self.consumed + self.dp_rank * self.n_micro * mb
        for m in range(self.n_micro):
            yield {k: v.to(self.device) for k, v in self.stream.batch(first + m * mb, mb).items()}

    def _forward_step(self, lam: list[float], loss_scale: float, meter: ExitLossMeter, data_iterator,
                      model_chunk):
        b = next(data_iterator)
        with native_torch():
            out, exit_losses = model_chunk(b["tokens"], self.pos, self.mask, labels=b["labels"],
                                           loss_mask=b["loss_mask"], exit_weights=lam, loss_scale=loss_scale)
        meter.add(exit_losses)
        return out, _last_exit_loss

    def step(self) -> list[float]:
        """One optimizer step over the next global batch; returns every exit's loss (mean over the batch; 0 for
        the exits a DaE stage does not compute)."""
        st, lam, meter = self.st, self.weights(), ExitLossMeter(len(self.exits), self.device)
        loss_scale = float(self.opt.get_loss_scale()) / self.n_micro  # once per step: a host sync on GPUs
        self.ddp.zero_grad_buffer()
        self.opt.zero_grad()
        self.forward_backward(forward_step_func=partial(self._forward_step, lam, loss_scale, meter),
                              data_iterator=self._microbatches(), model=[self.ddp], num_microbatches=self.n_micro,
                              seq_length=st.seq_length, micro_batch_size=st.micro_batch_size, forward_only=False)
        _, grad_norm, _ = self.opt.step()
        self.sched.step(increment=1)
        per_exit = meter.reduce()
        self.step_idx += 1
        self.consumed += st.global_batch_size
        # A DaE stage logs its tier's exit only: the others are frozen and not computed.
        shown = [k for k, p in enumerate(self.exits) if self.only in (None, p)]
        self.history.append({
            "step": self.step_idx, "loss": sum(lam[k] * per_exit[k] for k in shown),
            "exits": [per_exit[k] for k in shown], "exit_points": [self.exits[k] for k in shown],
            "weights": [lam[k] for k in shown], "lr": self.opt.param_groups[0]["lr"],
            "grad_norm": float(grad_norm) if grad_norm is not None else None})
        return per_exit

    def save(self) -> Path:
        """Checkpoints the current step, with the loss log and its curves."""
        keep = max(1, self.st.keep_checkpoints)  # 0: the newest is kept while training, for resume
        return self.checkpoints.save(self.step_idx, self.ddp.module, self.opt, self.state_dict(), keep,
                                     attach=lambda path: self.losses.attach(path, self.history))

    def resume(self) -> bool:
        """Continues exactly from the latest complete checkpoint, local or (when newer) in the store."""
        loaded = self.checkpoints.load_latest(self.ddp.module, self.opt)
        if loaded is None:
            return False
        last, state = loaded
        self.load_state_dict(state)
        if _rank0():
            # tagged like the progress lines, so the pipeline's screen shows it, not only its log
            print(f"[{self.args.stage}] resumed from step {self.step_idx} ({last.name})", flush=True)
        return True

    def load_init(self) -> None:
        """The starting weights (--init or --init-hf); the optimizer starts fresh."""
        if self.args.init_hf:
            from ruyi_core.megatron.convert import load_family_into

            load_family_into(self.ddp.module, self.io.fetch(self.args.init_hf, "init_hf"), self.hf_cfg)
        else:
            ckpt.load(self.io.fetch(self.args.init, "init"), self.ddp.module)
        # The loaded weights replaced the optimizer's fp32 master copies only when they are the same tensors
        # (fp32); with bf16 params, reload the masters from the model.
        if self.bf16:
            self.opt.reload_model_params()

    def run(self) -> None:
        if not (self.args.resume and self.resume()) and (self.args.init or self.args.init_hf):
            self.load_init()
        self.losses.restart(self.history)
        st, started, tokens = self.st, time.perf_counter(), 0
        while self.step_idx < st.steps:
            self.step()
            tokens += st.global_batch_size * st.seq_length
            self._report(tokens / max(time.perf_counter() - started, 1e-9))
            if self.step_idx % st.save_every == 0 or self.step_idx == st.steps:
                self.save()
        if self.args.export:
            self.export(self.args.export)

    def export(self, out: Path) -> None:
        """The model as an HF family (what `ckpt to-hf` makes of the last checkpoint), tokenizer from --init-hf."""
        from ruyi_core.family.io import load_tokenizer, save_family_files
        from ruyi_core.megatron.convert import write_family_weights

        write_family_weights(self.ddp.module, self.hf_cfg, out, getattr(torch, self.hf_cfg.weights_dtype))
        save_family_files(self.hf_cfg, load_tokenizer(self.io.fetch(self.args.init_hf, "init_hf")), out)

    def _report(self, rate: float) -> None:
        """Appends the step's record to the loss log; rank 0 prints progress every --log-every steps."""
        rec, st = self.history[-1], self.st
        self.losses.append(rec)
        if not _rank0():
            return
        if self.step_idx % self.args.log_every == 0 or self.step_idx == st.steps:
            left = (st.steps - self.step_idx) * st.global_batch_size * st.seq_length / max(rate, 1e-9)
            print(f"[{self.args.stage}] step {self.step_idx}/{st.steps} | loss {rec['loss']:.4f} | exits "
                  + " ".join(f"{v:.3f}" for v in rec["exits"])
                  + f" | lr {rec['lr']:.2e} | {rate:,.0f} tok/s | ETA {left:.0f}s", flush=True)


def main(argv=None) -> None:
    from ruyi_core.launch import worker_main

    args = parse_args(argv)

    def body() -> None:
        ckpt.init_distributed()
        with cpu_shim():
            Trainer(args).run()

    worker_main(body, cleanup=lambda: dist.destroy_process_group() if dist.is_initialized() else None)


if __name__ == "__main__":
    main()
