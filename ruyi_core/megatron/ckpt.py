"""Megatron checkpoints: dist_checkpointing save/load (any TP/PP layout loads any other), completeness
markers, and the world-1 conversions HF family <-> megatron checkpoint.

    python -m ruyi_core.megatron.ckpt from-hf --family DIR --out CKPT
    python -m ruyi_core.megatron.ckpt to-hf   --ckpt CKPT --family DIR --out DIR
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import random
import socket
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ruyi_core.errors import RuyiError

DONE = "ruyi_complete.json"  # written last, by rank 0, after every rank has saved
RNG_KEY = "rng_state"
# The distributed optimizer's state, one shard per DP rank, written in parallel (resumable with the same TP x PP;
# the model's weights reshard into any layout). The default gathers everything on one rank: at 14B, ~170 GB.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def init_distributed() -> None:
    """From torchrun's environment; a standalone process becomes a world of one."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


@contextlib.contextmanager
def _one_intraop_thread():
    """Threads that torch and gloo start during checkpoint I/O take the intra-op thread count of that
    moment, and each then keeps an OpenMP team of its own. With more OpenMP threads than CPUs, libgomp
    makes every team sleep instead of spin between parallel regions: every later training step in the
    process ran ~30% slower. Started under one thread, they add no team."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _local_results_queue() -> None:
    """megatron's checkpoint writer makes the queue it reports through, on its first save in a process, in a
    Manager process started by spawn: a fresh interpreter that imports torch and this module's imports again
    (~2.5 s per process here). Our saves are synchronous, the writer reports from this process, so a plain
    queue serves."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    # private: megatron makes the queue lazily and offers no way to pass one (test_private_apis)
    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def save(path: Path, model, optimizer=None, extra: dict | None = None, rng: bool = False) -> None:
    """Model (and optimizer, and with `rng` every rank's generators) from every rank, then the marker."""
    from megatron.core import dist_checkpointing

    _local_results_queue()

    path.mkdir(parents=True, exist_ok=True)
    model_sd = model.sharded_state_dict()
    sd = {"model": model_sd}
    if optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(model_sd, metadata=OPTIMIZER_METADATA)
    if rng:
        sd["rng"], sd["rng_layout"] = _rng_object(rng_state()), _layout()
    if extra is not None:
        sd["extra"] = extra
    with _one_intraop_thread():
        dist_checkpointing.save(sd, str(path))
    dist.barrier()
    if dist.get_rank() == 0:
        _drop_storage_meta(path)
        (path / DONE).write_text(json.dumps({"step": (extra or {}).get("step")}))
    dist.barrier()


def _drop_storage_meta(path: Path) -> None:
    """torch's DCP pickles a StorageMeta into `.metadata`: the folder it saved to and a fresh uuid4 per save.
    Neither is needed to load (the reader fills in its own), but both make two saves of the same tensors differ,
    so a checkpoint would not be a function of its contents (concurrent identical runs, bit-identical
    re-runs). Rewritten without it; a plain pickle of a dataclass tree, so the rest stays byte-for-byte."""
    import pickle

    meta_file = path / ".metadata"
    if not meta_file.is_file():  # a save strategy other than DCP's: nothing of the kind
        return
    with open(meta_file, "rb") as f:
        meta = pickle.load(f)  # noqa: S301 - the file this process just wrote
    if getattr(meta, "storage_meta", None) is None:
        return
    meta.storage_meta = None
    tmp = meta_file.with_name(".metadata.tmp")
    with open(tmp, "wb") as f:
        pickle.dump(meta, f)
    os.replace(tmp, meta_file)


def load(path: Path, model, optimizer=None, rng: bool = False) -> dict | None:
    """Loads into this rank's model (and optimizer, and with `rng` restores this rank's generators); returns
    the saved `extra` dict. Strict: a key the model asks for that the checkpoint lacks, or a model key in the
    checkpoint the model does not have, is an error (the optimizer's and RNG keys count only when loaded)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    if not (path / DONE).is_file():
        raise RuyiError(f"{path} is not a complete checkpoint (no {DONE}): point at a finished one")
    model_sd = model.sharded_state_dict()
    sd = {"model": model_sd}
    if optimizer is not None:
        _prime_adam_state(optimizer)
        sd["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=OPTIMIZER_METADATA)
    if rng:
        saved = dist_checkpointing.load_common_state_dict(str(path)).get("rng_layout")
        if saved is None:
            raise RuyiError(f"{path} holds no RNG states, so it cannot be resumed exactly: start a new run")
        if saved != _layout():
            raise RuyiError(f"{path} holds RNG states for pp x tp x dp = {saved}, this run is {_layout()}: "
                            "resume with the layout it was saved with (RNG states cannot be resharded)")
        sd["rng"] = _rng_object(None)
    with _one_intraop_thread():
        loaded, missing, unexpected = dist_checkpointing.load(sd, str(path), strict=StrictHandling.RETURN_ALL)
    not_asked = tuple(k for k, asked in (("optimizer.", optimizer is not None), (RNG_KEY, rng)) if not asked)
    missing = {k for k in missing if not k.startswith(not_asked)}
    if missing or unexpected:
        raise RuyiError(f"checkpoint {path} does not match the model: not in the model {sorted(missing)[:4]}, "
                        f"not in the checkpoint {sorted(unexpected)[:4]}: was it made for another family?")
    model.load_state_dict(loaded["model"], strict=True)
    if optimizer is not None:
        with torch.no_grad():  # fp32 weights: the distributed optimizer's shards are views of the parameters
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer)
    if rng:
        set_rng_state(loaded["rng"])
    return loaded.get("extra")


def _prime_adam_state(optimizer) -> None:
    """megatron's distributed optimizer over torch's Adam (no Apex or Transformer Engine) reads the inner state's
    step while building the state dict it loads into, and a fresh optimizer has none: give every parameter
    zero moments at step 0, which the checkpoint then overwrites."""
    for inner in _torch_adams(optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}


def _torch_adams(optimizer):
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(opt, DistributedOptimizer) and isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            yield inner


def _restore_adam_steps(optimizer) -> None:
    """The distributed optimizer saves torch Adam's step count in its parameter groups, but its load leaves the
    per-parameter counts at the primed 0 (or one tensor shared by all, which Adam would advance once per
    parameter): give every parameter its own count, as a run that never stopped has."""
    for inner in _torch_adams(optimizer):
        for group in inner.param_groups:
            if "step" in group:
                for p in group["params"]:
                    inner.state[p]["step"] = torch.tensor(float(group["step"]))


def rng_state() -> dict:
    """Every generator this rank draws from: python, numpy, torch CPU and CUDA, and megatron's tracker."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": get_cuda_rng_tracker().get_states()}


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _layout() -> list[int]:
    from megatron.core import parallel_state as ps

    return [ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
            ps.get_data_parallel_world_size()]


def _rng_object(state: dict | None):
    """One shard per (pp, tp, dp) rank: every rank has its own generators."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing import ShardedObject

    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
              ps.get_data_parallel_rank())
    return ShardedObject(RNG_KEY, state, tuple(_layout()), offset, replica_id=0)


def latest_complete(root: Path) -> Path | None:
    done = sorted(p for p in root.glob("iter_*") if (p / DONE).is_file())
    return done[-1] if done else None


def _single_model(family_config):
    from megatron.core import parallel_state as ps

    from ruyi_core.megatron.model import build_model

    ps.initialize_model_parallel(1, 1)
    return build_model(family_config)


def from_hf(family_dir: Path, out: Path) -> None:
    """HF family directory -> megatron checkpoint (TP=1, PP=1; loadable by any layout). The family is read
    module by module into the megatron model: one copy of the weights in memory."""
    from ruyi_core.family.config import RuyiConfig
    from ruyi_core.megatron.convert import load_family_into
    from ruyi_core.megatron.cpu import cpu_shim, seed_everything

    init_distributed()
    with cpu_shim():
        cfg = RuyiConfig.from_pretrained(family_dir)
        seed_everything(0)
        model = _single_model(cfg)
        load_family_into(model, family_dir, cfg)
        save(out, model, extra={"step": 0, "source": str(family_dir)})


def to_hf(ckpt: Path, family_dir: Path, out: Path) -> None:
    """Megatron checkpoint -> HF family directory (config and tokenizer from `family_dir`), written module by
    module in the family's weights dtype: one copy of the weights in memory."""
    from ruyi_core.family.config import RuyiConfig
    from ruyi_core.family.io import load_tokenizer, save_family_files
    from ruyi_core.megatron.convert import write_family_weights
    from ruyi_core.megatron.cpu import cpu_shim, seed_everything

    init_distributed()
    with cpu_shim():
        cfg = RuyiConfig.from_pretrained(family_dir)
        seed_everything(0)
        model = _single_model(cfg)
        load(ckpt, model)
        write_family_weights(model, cfg, out, getattr(torch, cfg.weights_dtype))
        save_family_files(cfg, load_tokenizer(Path(family_dir)), out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m ruyi_core.megatron.ckpt")
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("from-hf")
    a.add_argument("--family", type=Path, required=True)
    a.add_argument("--out", type=Path, required=True)
    b = sub.add_parser("to-hf")
    b.add_argument("--ckpt", type=Path, required=True)
    b.add_argument("--family", type=Path, required=True)
    b.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.cmd == "from-hf":
        from_hf(args.family, args.out)
    else:
        to_hf(args.ckpt, args.family, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
