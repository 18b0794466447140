"""One-shot GPU checks for a lent CUDA machine (bench/gpu_check.sh runs each section in its own process, under a
time limit, and collects the PASS/FAIL/SKIP lines). Sections:

    env       versions: torch, CUDA, GPU, megatron-core, transformers, attention backends
    hf        the HF family (ruyi_core.family) in bf16 on the GPU: every exit's logits against its standalone tier
              export loaded in vanilla transformers (Qwen3ForCausalLM), greedy generation identical; fp32 parity
              on the GPU; bf16 against fp32; which attention implementation and SDPA kernel ran
    prep      a tiny family + packed demo corpus + trainer specs for the megatron trainer check (run by torchrun)
    verdict   reads the trainer's loss log: PASS when every exit's loss fell
    layer     one Qwen3-14B decoder layer (hidden 5120, 40/8 heads, head_dim 128, ffn 17408) through the project's
              megatron FamilyGPT at seq 8192, micro batch 1, bf16: forward + backward peak memory and time against
              ruyi_core/plan.py's per-layer activation count and FLOP-based step time

    python bench/gpu_check.py SECTION WORKDIR

The device is CUDA; GPU_CHECK_ALLOW_CPU=1 lets a dry run fall back to the CPU, and GPU_CHECK_SMALL=1 shrinks every
size (micro preset, a small layer) so that dry run takes seconds. Neither is meant for the device run.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # conftest's randomize_ / padded_batch, as the CPU tests use them

import torch  # noqa: E402

SMALL = os.environ.get("GPU_CHECK_SMALL") == "1"
RESULTS: list[tuple[str, str, str]] = []


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("GPU_CHECK_ALLOW_CPU") == "1":
        print("NOTE: no CUDA; GPU_CHECK_ALLOW_CPU=1, so this is a CPU dry run (numbers mean nothing)")
        return torch.device("cpu")
    raise SystemExit("no CUDA device (set GPU_CHECK_ALLOW_CPU=1 for a CPU dry run)")


def verdict(name: str, ok: bool | None, detail: str = "") -> None:
    word = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
    RESULTS.append((word, name, detail))
    print(f"{word} {name}: {detail}", flush=True)


def guarded(name: str, fn, *args, **kwargs):
    """Runs one sub-check; an exception is a FAIL line with its type and message (and a traceback above it)."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - every failure becomes a verdict line
        traceback.print_exc()
        first = (str(e).strip().splitlines() or [""])[0][:300]
        verdict(name, False, f"{type(e).__name__}: {first}")
        return None


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------------- env
def section_env(work: Path) -> None:
    import importlib.metadata as md

    print(f"python {sys.version.split()[0]}  torch {torch.__version__}  torch CUDA {torch.version.cuda}  "
          f"cuDNN {torch.backends.cudnn.version()}  NCCL {'.'.join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else '-'}")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"GPU {p.name}  cc {p.major}.{p.minor}  {p.total_memory / 2**30:.1f} GiB  {p.multi_processor_count} SMs  "
              f"devices {torch.cuda.device_count()}  bf16 supported {torch.cuda.is_bf16_supported()}")
    for pkg in ("megatron-core", "transformers", "huggingface-hub", "tokenizers", "safetensors", "pydantic",
                "pydantic-core", "numpy", "accelerate", "transformer-engine", "transformer-engine-torch",
                "flash-attn", "vllm", "apex", "triton"):
        try:
            v = md.version(pkg)
        except md.PackageNotFoundError:
            v = "not installed"
        print(f"  {pkg}: {v}")
    for mod in ("transformer_engine", "flash_attn", "vllm", "apex"):
        try:
            __import__(mod)
            print(f"  import {mod}: ok")
        except Exception as e:  # noqa: BLE001
            print(f"  import {mod}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    b = torch.backends.cuda
    print(f"  SDPA backends enabled: flash {b.flash_sdp_enabled()} mem_efficient {b.mem_efficient_sdp_enabled()} "
          f"cudnn {b.cudnn_sdp_enabled()} math {b.math_sdp_enabled()}; matmul allow_tf32 {b.matmul.allow_tf32}")
    import megatron.core  # noqa: F401  (the trainer's import; fails loudly if the wheel does not load)

    verdict("env.imports", True, "megatron.core, transformers and ruyi_core import")


# ----------------------------------------------------------------------------------------------------------- hf
def _tier_logits_and_generation(work: Path, tiers: dict, ids, mask, gen_ids, gen_mask, new_tokens: int, dev):
    """Vanilla transformers only (Auto classes, no ruyi_core classes): each tier's bf16 logits and greedy tokens."""
    from transformers import AutoModelForCausalLM

    out = {}
    for tier in tiers:
        m = AutoModelForCausalLM.from_pretrained(work / "tiers" / tier, dtype="auto").to(dev).eval()
        assert type(m).__name__ == "Qwen3ForCausalLM", type(m)
        with torch.no_grad():
            logits = m(ids, attention_mask=mask).logits
            gen = m.generate(gen_ids, attention_mask=gen_mask, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
        out[tier] = {"logits": logits, "gen": gen, "dtype": str(next(m.parameters()).dtype),
                     "attn": m.config._attn_implementation}
        del m
    return out


def section_hf(work: Path) -> None:
    from conftest import padded_batch, randomize_

    from ruyi_core.demo import tokenizer_texts
    from ruyi_core.family.convert import build_preset_base, export_tier, family_from_base
    from ruyi_core.family.io import load_family, save_family
    from ruyi_core.runtime import Runtime

    dev = device()
    preset, exits = ("micro", [1, 2, 3]) if SMALL else ("tiny", [1, 6, 11])
    t0 = time.perf_counter()
    base, tok = build_preset_base(preset, tokenizer_texts(), seed=0)
    randomize_(base, seed=1)
    # Branches made to differ from the trunk (as test_export_import does), so a mixed-up block shows.
    fam = randomize_(family_from_base(base, exits), seed=5).eval()
    fam.config.weights_dtype = "bfloat16"  # what a bf16 base gives: the family and its tiers stored in bf16
    save_family(fam, tok, work / "family_bf16")
    stored, _ = load_family(work / "family_bf16", stored_dtype=True)  # as the export stage reads it
    tiers = dict(stored.config.tiers)
    for tier in tiers:
        export_tier(stored, tier, work / "tiers" / tier, tok)
    del fam, stored
    # The production load path (runtime.load: from_pretrained in the runtime's dtype, then to the device):
    # bf16 on the GPU, and the same stored weights computed in fp32 as the reference.
    fam16, _ = load_family(work / "family_bf16", Runtime(dev, torch.bfloat16))
    fam32, _ = load_family(work / "family_bf16", Runtime(dev, torch.float32))
    print(f"{preset} family, exits {exits}, tiers {tiers}, vocab {fam16.config.vocab_size}, saved and exported in "
          f"bf16, loaded on {dev.type} in {time.perf_counter() - t0:.1f}s; family params "
          f"{next(fam16.parameters()).dtype}, rope inv_freq {fam16.model.rotary_emb.inv_freq.dtype}")

    V = fam32.config.vocab_size
    lengths = [48, 31, 12, 5] if SMALL else [200, 131, 64, 9]
    ids, mask = padded_batch(V, lengths, seed=2)
    gen_ids, gen_mask = padded_batch(V, [17, 9, 4], seed=3)
    new_tokens = 24
    ids, mask, gen_ids, gen_mask = (t.to(dev) for t in (ids, mask, gen_ids, gen_mask))
    real = mask.bool()

    print(f"family attention implementation: {fam16.config._attn_implementation}")
    tier_out = _tier_logits_and_generation(work, tiers, ids, mask, gen_ids, gen_mask, new_tokens, dev)
    for tier, p in tiers.items():
        t = tier_out[tier]
        with torch.no_grad():
            f16 = fam16(ids, attention_mask=mask, exit_point=p).logits
            f32 = fam32(ids, attention_mask=mask, exit_point=p).logits
            g16 = fam16.generate(gen_ids, attention_mask=gen_mask, max_new_tokens=new_tokens, do_sample=False,
                                 exit_point=p, pad_token_id=0, eos_token_id=None)
        scale = f32[real].abs().max().item()
        d_tier = (f16[real].float() - t["logits"][real].float()).abs().max().item()
        d_ref = (f16[real].float() - f32[real]).abs().max().item()
        agree = (f16[real].argmax(-1) == f32[real].argmax(-1)).float().mean().item()
        print(f"  exit {p} ({tier}): tier dtype {t['dtype']}, tier attn {t['attn']}; |logit| max {scale:.3f}; "
              f"family bf16 vs tier bf16 max|d| {d_tier:.3e}; bf16 vs fp32 max|d| {d_ref:.3e} "
              f"({d_ref / scale:.2e} of the scale); argmax agreement bf16/fp32 {agree:.4f}")
        # Same weights, same ops: the family's exit and its export should agree to bf16 rounding of a few ulps of
        # the logit scale (2^-8 relative); against fp32 a few % of the scale is bf16's expected error on random
        # weights with std 0.1.
        exact = torch.equal(f16[real], t["logits"][real])
        verdict(f"hf.bf16_logits_family_vs_tier.exit{p}", t["dtype"] == "torch.bfloat16" and d_tier <= 0.02 * max(scale, 1.0),
                f"max|d| {d_tier:.3e} (tol {0.02 * max(scale, 1.0):.3e}; bitwise equal: {exact}), tier weights {t['dtype']}")
        verdict(f"hf.bf16_vs_fp32.exit{p}", d_ref <= 0.1 * max(scale, 1.0) and agree >= 0.85,
                f"max|d| {d_ref:.3e} (tol {0.1 * max(scale, 1.0):.3e}), argmax agreement {agree:.4f}")
        same = torch.equal(g16, t["gen"])
        differ_at = "" if same else f", first differing column {int((g16 != t['gen']).any(0).nonzero()[0])}"
        verdict(f"hf.bf16_greedy_identical.exit{p}", same,
                f"{gen_ids.shape[0]} prompts x {new_tokens} new tokens, family == tier{differ_at}")

    # fp32 parity on the GPU: the family's exit against the same weights' fp32 tier (exported in fp32).
    def fp32_parity():
        from transformers import Qwen3ForCausalLM

        fam32.config.weights_dtype = "float32"
        worst = 0.0
        for tier, p in tiers.items():
            export_tier(fam32, tier, work / "tiers32" / tier)
            m = Qwen3ForCausalLM.from_pretrained(work / "tiers32" / tier, dtype=torch.float32).to(dev).eval()
            with torch.no_grad():
                d = (m(ids, attention_mask=mask).logits[real]
                     - fam32(ids, attention_mask=mask, exit_point=p).logits[real]).abs().max().item()
            worst = max(worst, d)
        verdict("hf.fp32_family_vs_tier", worst <= 1e-4, f"max|d| over exits {worst:.3e} (tol 1e-4)")

    guarded("hf.fp32_family_vs_tier", fp32_parity)

    def module_to_bf16():
        """Not the production path: `module.to(torch.bfloat16)` also casts rope's inv_freq buffer to bf16."""
        import copy

        p = max(tiers.values())
        cast = copy.deepcopy(fam32).to(torch.bfloat16)
        with torch.no_grad():
            d = (cast(ids, attention_mask=mask, exit_point=p).logits[real].float()
                 - fam16(ids, attention_mask=mask, exit_point=p).logits[real].float()).abs().max().item()
        print(f"  note: family.to(torch.bfloat16) turns rope inv_freq into {cast.model.rotary_emb.inv_freq.dtype}; its "
              f"deepest exit differs from the from_pretrained(dtype=bf16) family by max|d| {d:.3e}")

    guarded("hf.module_to_bf16_note", module_to_bf16)
    guarded("hf.kv_cache_bf16", _cache_check, fam16, gen_ids, gen_mask, tiers)
    guarded("attn", _attention_check, work, fam16, tiers, V, dev)


def _cache_check(fam16, gen_ids, gen_mask, tiers) -> None:
    p = max(tiers.values())
    kw = dict(attention_mask=gen_mask, max_new_tokens=16, exit_point=p, pad_token_id=0, eos_token_id=None,
              do_sample=False)
    with torch.no_grad():
        a = fam16.generate(gen_ids, use_cache=True, **kw)
        b = fam16.generate(gen_ids, use_cache=False, **kw)
    # In bf16 a cached step computes the last row alone and can round differently from a full recompute, so a
    # mismatch is reported (not a failure of the family's cache logic, which the fp32 CPU tests check exactly).
    same = torch.equal(a, b)
    verdict("hf.kv_cache_bf16", True if same else None,
            "cached == uncached greedy" if same else "cached != uncached greedy in bf16 (rounding; fp32 tests exact)")


# ------------------------------------------------------------------------------------------------- attention
def _attention_check(work: Path, fam16, tiers: dict, V: int, dev) -> None:
    """Which attention implementation transformers chose, which SDPA kernels ran (profiler kernel names),
    whether flash_attention_2 can be asked for, and eager vs sdpa logits in bf16."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM

    from conftest import padded_batch

    deepest = max(tiers, key=tiers.get)
    path = work / "tiers" / deepest
    seq = 256 if SMALL else 2048
    unpadded = torch.randint(3, V, (2, seq), device=dev)
    ids, mask = (t.to(dev) for t in padded_batch(V, [seq, seq // 2], seed=4))
    m = AutoModelForCausalLM.from_pretrained(path, dtype="auto").to(dev).eval()
    impl = m.config._attn_implementation
    if dev.type != "cuda":
        verdict("attn.kernels", None, f"implementation {impl}; no CUDA kernels on a CPU dry run")
        return
    found = {}
    for name, kw in (("no padding (is_causal)", dict(input_ids=unpadded)),
                     ("left padding (explicit mask)", dict(input_ids=ids, attention_mask=mask))):
        with torch.no_grad():
            m(**kw)  # warm-up
            sync()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                m(**kw)
                sync()
        names = sorted({e.key for e in prof.key_averages()
                        if any(s in e.key.lower() for s in ("flash", "fmha", "attention", "cudnn", "sdpa", "softmax"))})
        found[name] = names
        print(f"  attention kernels, {name}: {names or 'none matched (math path: bmm + softmax?)'}")
    print(f"  transformers attention implementation for the tier: {impl}")
    flashy = any("flash" in k.lower() for k in found["no padding (is_causal)"])
    verdict("attn.sdpa_kernel", impl == "sdpa",
            f"implementation {impl}; unpadded batch ran {'a flash-attention kernel' if flashy else 'no flash kernel'}; "
            f"padded: {', '.join(found['left padding (explicit mask)'][:3]) or '?'}")
    try:
        AutoModelForCausalLM.from_pretrained(path, dtype="auto", attn_implementation="flash_attention_2")
        verdict("attn.flash_attention_2", True, "loaded (flash-attn present)")
    except Exception as e:  # noqa: BLE001
        verdict("attn.flash_attention_2", None, f"not available: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    eager = AutoModelForCausalLM.from_pretrained(path, dtype="auto", attn_implementation="eager").to(dev).eval()
    with torch.no_grad():
        a, b = m(ids, attention_mask=mask).logits, eager(ids, attention_mask=mask).logits
    real = mask.bool()
    d, scale = (a[real].float() - b[real].float()).abs().max().item(), b[real].float().abs().max().item()
    verdict("attn.sdpa_vs_eager_bf16", d <= 0.1 * max(scale, 1.0), f"max|d| {d:.3e} (scale {scale:.2f})")


# --------------------------------------------------------------------------------------------------------- prep
def section_prep(work: Path) -> None:
    import yaml
    from conftest import with_demo
    from transformers import AutoTokenizer

    from ruyi_core.data.pack import prepare_corpus
    from ruyi_core.demo import tokenizer_texts, world
    from ruyi_core.family.convert import build_preset_base, family_from_base
    from ruyi_core.family.io import save_family

    preset, exits = ("micro", [1, 2, 3]) if SMALL else ("tiny", [1, 6, 11])
    t0 = time.perf_counter()
    base, tok = build_preset_base(preset, tokenizer_texts())
    # plain HF init (not randomized): the demo's own starting point, so the loss starts near ln(vocab) and falls
    save_family(family_from_base(base, exits).eval(), tok, work / "family")
    prepare_corpus(world.pretrain_records(400 if SMALL else 3000), "pretrain",
                   AutoTokenizer.from_pretrained(work / "family"), work / "packed", 10**7)
    steps, mbs, gbs, seq = (6, 4, 8, 64) if SMALL else (40, 8, 16, 256)
    for impl in ("auto", "local"):
        spec = {"family": {"name": preset, "base": preset, "exit_points": exits}, "store": {"bucket": "ruyi"},
                "train": {"parallel": {}, "precision": "bf16", "transformer_impl": impl,
                          "cpt": {"steps": steps, "micro_batch_size": mbs, "global_batch_size": gbs,
                                  "seq_length": seq, "save_every": steps, "lr": 2e-3, "warmup_steps": 4,
                                  "keep_checkpoints": 1}}}
        (work / f"spec_{impl}.yaml").write_text(yaml.safe_dump(with_demo(spec)))
    verdict("prep", True, f"{preset} family + packed corpus + specs in {time.perf_counter() - t0:.1f}s")


def section_verdict(work: Path) -> None:
    log = work / "train_local" / "cpt_losses.jsonl"
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    first, last = recs[0], recs[-1]
    exits = first["exit_points"]
    print("  step  " + "  ".join(f"exit{p:>3}" for p in exits) + "   grad_norm   lr")
    for r in recs:
        if r["step"] in (1, 2, 3, 5) or r["step"] % 10 == 0 or r is last:
            gn = r["grad_norm"]
            print(f"  {r['step']:4d}  " + "  ".join(f"{v:7.4f}" for v in r["exits"])
                  + f"   {gn if gn is None else round(gn, 4)}   {r['lr']:.2e}")
    fell = all(b < a for a, b in zip(first["exits"], last["exits"]))
    verdict("megatron.loss_falls", fell, f"{len(recs)} steps; exits {exits}: "
            + ", ".join(f"{a:.3f}->{b:.3f}" for a, b in zip(first["exits"], last["exits"])))
    ck = sorted((work / "train_local" / "checkpoints").glob("iter_*"))
    verdict("megatron.checkpoint_saved", bool(ck), ", ".join(c.name for c in ck) or "none")
    exported = work / "train_local_hf" / "config.json"
    verdict("megatron.export_hf", exported.is_file(), str(exported.parent))
    if exported.is_file():
        guarded("megatron.exported_family_loads", _exported_loads, work)


def _exported_loads(work: Path) -> None:
    """The trained family (written by --export) loads in the HF family class on the GPU in bf16, and its deepest
    exit's loss on a training window is close to the trainer's last logged loss of that exit."""
    import numpy as np

    from ruyi_core.family.io import load_family
    from ruyi_core.runtime import Runtime

    dev = device()
    fam, _ = load_family(work / "train_local_hf", Runtime(dev, torch.bfloat16))
    ids = torch.randint(3, fam.config.vocab_size, (1, 32), device=dev)
    with torch.no_grad():
        out = fam.forward_exits(ids, labels=ids)
    losses = {p: round(v.item(), 3) for p, v in out.losses.items()}
    ok = all(np.isfinite(v) for v in losses.values())
    verdict("megatron.exported_family_loads", ok, f"bf16 on {dev.type}; random-token losses per exit {losses}")


# -------------------------------------------------------------------------------------------------------- layer
def section_layer(work: Path) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from ruyi_core.family.config import RuyiConfig
    from ruyi_core.megatron import ckpt
    from ruyi_core.megatron.cpu import cpu_shim, seed_everything
    from ruyi_core.megatron.model import build_model
    from ruyi_core import plan

    dev = device()
    ckpt.init_distributed()  # NCCL on CUDA, a world of one
    with cpu_shim():  # a no-op with CUDA (what the trainer does); the CPU dry run needs it
        _layers(dev, ps, seed_everything, build_model, RuyiConfig, plan, DistributedDataParallel,
                DistributedDataParallelConfig)


def _layers(dev, ps, seed_everything, build_model, RuyiConfig, plan, DistributedDataParallel,
            DistributedDataParallelConfig) -> None:
    ps.initialize_model_parallel(1, 1)
    seed_everything(0)
    if SMALL:
        shape = dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                     intermediate_size=512)
        seq = 256
    else:  # Qwen3-14B's decoder layer
        shape = dict(hidden_size=5120, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
                     intermediate_size=17408)
        seq = 8192
    print(f"layer shape {shape}, seq {seq}, micro batch 1, bf16, megatron local spec (no Transformer Engine), "
          f"world 1 on {torch.distributed.get_backend()}")
    vocabs = [1024] if SMALL else [1024, 151936]
    for vocab in vocabs:
        guarded(f"layer.v{vocab}", _one_layer, shape, seq, vocab, dev, build_model, RuyiConfig, plan,
                DistributedDataParallel, DistributedDataParallelConfig)


def _one_layer(shape, seq, vocab, dev, build_model, RuyiConfig, plan, DDP, DDPConfig) -> None:
    hf_cfg = RuyiConfig(vocab_size=vocab, num_hidden_layers=1, early_exit_points=[0], rms_norm_eps=1e-6,
                        max_position_embeddings=max(seq, 40960),
                        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, **shape)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        base_mem = torch.cuda.memory_allocated()
    model = build_model(hf_cfg, 1, 1, seq, bf16=True, recompute=False, impl="local")
    if cuda:
        model.cuda()
    # As the trainer wraps it: megatron DDP with fp32 gradient buffers.
    ddp = DDP(model.config, DDPConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=cuda), model)
    n_params = sum(p.numel() for p in model.parameters())
    tokens = torch.randint(0, vocab, (1, seq), device=dev)
    pos = torch.arange(seq, device=dev).unsqueeze(0)
    labels = torch.randint(0, vocab, (1, seq), device=dev)
    loss_mask = torch.ones(1, seq, device=dev)
    mask = None if model.implicit_causal else torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool, device=dev), 1)

    def step():
        ddp.zero_grad_buffer()
        out, _ = ddp(tokens, pos, mask, labels=labels, loss_mask=loss_mask, exit_weights=[1.0], loss_scale=1.0)
        out.backward()
        return out

    static = (torch.cuda.memory_allocated() - base_mem) if cuda else 0
    step()  # warm-up (allocator, kernels)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    times = []
    for _ in range(1 if SMALL else 3):
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - before) if cuda else 0
    t = min(times)

    a = plan.Arch(vocab=vocab, hidden=shape["hidden_size"], intermediate=shape["intermediate_size"], layers=1,
                  heads=shape["num_attention_heads"], kv_heads=shape["num_key_value_heads"], head_dim=shape["head_dim"])
    act_layer = plan._layer_activation_bytes(a, seq, 2, 1, False)  # TP 1: no sequence parallelism
    logits = 1 * seq * vocab * 10  # train_plan's logits term: one head, bf16 logits + fp32 softmax
    plan_params = a.family([0], False)
    plan_static = plan_params * 2 + plan_params * 4  # bf16 weights + fp32 grad buffers (grad_reduce_in_fp32)
    flops = (6 * (a.block + a.embedding) + 6 * seq * a.heads * a.head_dim) * seq  # train_plan's per-token FLOPs
    dev_peak = plan.DEVICES["h200-141gb"].peak_flops
    plan_t = flops / (dev_peak * plan.MFU)
    gib = 2**30
    print(f"  vocab {vocab}: params {n_params / 1e6:.1f}M (plan {plan_params / 1e6:.1f}M; one block "
          f"{a.block / 1e6:.1f}M); loss {loss.item():.4f}")
    if cuda:
        print(f"  static (bf16 weights + fp32 grad buffer): measured {static / gib:.2f} GiB, plan {plan_static / gib:.2f} GiB")
        print(f"  fwd+bwd peak above static: measured {peak / gib:.2f} GiB; plan: layer activations "
              f"{act_layer / gib:.2f} GiB + logits {logits / gib:.2f} GiB = {(act_layer + logits) / gib:.2f} GiB "
              f"(measured/plan {peak / (act_layer + logits):.2f}x)")
        print(f"  fwd+bwd time: best of {len(times)} {t * 1e3:.1f} ms ({', '.join(f'{x * 1e3:.1f}' for x in times)}); "
              f"{flops / 1e12:.2f} TFLOP -> {flops / t / 1e12:.0f} TFLOP/s = {flops / t / dev_peak:.1%} of the plan's "
              f"989 TFLOP/s peak; plan at MFU {plan.MFU:.0%}: {plan_t * 1e3:.1f} ms")
    ok = bool(torch.isfinite(loss).item()) and (not cuda or peak > 0)
    verdict(f"layer.v{vocab}", ok, (f"peak {peak / gib:.2f} GiB vs plan {(act_layer + logits) / gib:.2f} GiB; "
                                    f"{t * 1e3:.0f} ms vs plan {plan_t * 1e3:.0f} ms") if cuda else "CPU dry run")
    if cuda and vocab == 1024:
        guarded("layer.attention_kernels", _layer_kernels, step)
    del ddp, model
    if cuda:
        torch.cuda.empty_cache()


def _layer_kernels(step) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        sync()
    ev = prof.key_averages()
    total = sum(e.device_time_total for e in ev if e.device_time_total > 0)
    attn = [(e.key, e.device_time_total) for e in ev
            if any(s in e.key.lower() for s in ("flash", "fmha", "attention", "cudnn", "sdpa"))]
    top = sorted(((e.key, e.device_time_total) for e in ev), key=lambda x: -x[1])[:8]
    for k, us in top:
        print(f"    {us / 1e3:8.2f} ms  {us / max(total, 1):5.1%}  {k[:110]}")
    verdict("layer.attention_kernels", bool(attn), "; ".join(f"{k[:70]} {us / 1e3:.1f} ms" for k, us in attn[:3])
            or "no flash/efficient attention kernel found")


SECTIONS = {"env": section_env, "hf": section_hf, "prep": section_prep, "verdict": section_verdict,
            "layer": section_layer}


def main() -> None:
    name, work = sys.argv[1], Path(sys.argv[2])
    work.mkdir(parents=True, exist_ok=True)
    import ruyi_core

    ruyi_core.register()
    t0 = time.perf_counter()
    guarded(name, SECTIONS[name], work)
    print(f"[{name}] {time.perf_counter() - t0:.1f}s; "
          + (", ".join(f"{w} {n}" for w, n, _ in RESULTS) or "no verdicts"), flush=True)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.exit(1 if any(w == "FAIL" for w, _, _ in RESULTS) else 0)


if __name__ == "__main__":
    main()
