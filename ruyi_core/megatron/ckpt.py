"""Megatron checkpoints: dist_checkpointing save/load (any TP/PP layout loads any other), completeness
markers, and the world-1 conversions HF family <-> megatron checkpoint.

    python -m ruyi_core.megatron.ckpt from-hf --family DIR --out CKPT
    python -m ruyi_core.megatron.ckpt to-hf   --ckpt CKPT --family DIR --out DIR
"""
from __future__ import annotations

import argparse
import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist

DONE = "ruyi_complete.json"  # written last, by rank 0, after every rank has saved


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


def save(path: Path, model, optimizer=None, extra: dict | None = None) -> None:
    """Model (and optimizer) shards from every rank, then the completeness marker."""
    from megatron.core import dist_checkpointing

    path.mkdir(parents=True, exist_ok=True)
    model_sd = model.sharded_state_dict()
    sd = {"model": model_sd}
    if optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(model_sd)
    if extra is not None:
        sd["extra"] = extra
    dist_checkpointing.save(sd, str(path))
    dist.barrier()
    if dist.get_rank() == 0:
        (path / DONE).write_text(json.dumps({"step": (extra or {}).get("step")}))
    dist.barrier()


def load(path: Path, model, optimizer=None) -> dict | None:
    """Loads into this rank's model (and optimizer); returns the saved `extra` dict."""
    from megatron.core import dist_checkpointing

    if not (path / DONE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint")
    model_sd = model.sharded_state_dict()
    sd = {"model": model_sd}
    if optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True)
        sd["extra"] = None
    loaded = dist_checkpointing.load(sd, str(path))
    model.load_state_dict(loaded["model"], strict=False)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    return loaded.get("extra")


def latest_complete(root: Path) -> Path | None:
    done = sorted(p for p in root.glob("iter_*") if (p / DONE).is_file())
    return done[-1] if done else None


def _single_model(family_config):
    from megatron.core import parallel_state as ps

    from ruyi_core.megatron.model import build_model

    ps.initialize_model_parallel(1, 1)
    return build_model(family_config)


def from_hf(family_dir: Path, out: Path) -> None:
    """HF family directory -> megatron checkpoint (TP=1, PP=1; loadable by any layout)."""
    from ruyi_core.family.io import load_family
    from ruyi_core.megatron.convert import hf_to_megatron, load_into
    from ruyi_core.megatron.cpu import cpu_shim, seed_everything

    init_distributed()
    with cpu_shim():
        fam, _ = load_family(family_dir)
        seed_everything(0)
        model = _single_model(fam.config)
        load_into(model, hf_to_megatron(fam.state_dict(), fam.config))
        save(out, model, extra={"step": 0, "source": str(family_dir)})


def to_hf(ckpt: Path, family_dir: Path, out: Path) -> None:
    """Megatron checkpoint -> HF family directory (config and tokenizer from `family_dir`)."""
    from transformers import AutoTokenizer

    from ruyi_core.family.io import save_family
    from ruyi_core.family.modeling import RuyiForCausalLM
    from ruyi_core.megatron.convert import megatron_to_hf
    from ruyi_core.megatron.cpu import cpu_shim, seed_everything

    init_distributed()
    with cpu_shim():
        fam = RuyiForCausalLM.from_pretrained(family_dir, dtype=torch.float32)
        seed_everything(0)
        model = _single_model(fam.config)
        load(ckpt, model)
        sd = {k: v.float() for k, v in megatron_to_hf(model.state_dict(), fam.config).items()}
        fam.load_state_dict(sd, strict=True)
        save_family(fam, AutoTokenizer.from_pretrained(family_dir), out)


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
