"""GRPO on one exported tier (a plain Qwen3 checkpoint) with TRL's GRPOTrainer, training only the parameters
under the given name prefixes (the tier's own blocks and head). Everything else is frozen and must come out
bit-identical: the family's other tiers share those weights (DESIGN §3, GRPO)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, TrainerCallback
from transformers.trainer_callback import PrinterCallback

from ruyi_core.errors import RuyiError
from ruyi_core.family.convert import generation_config as default_generation_config
from ruyi_core.family.loss import heldout_loss
from ruyi_core.plots import curves
from ruyi_core.rl.rewards import DEFAULT_ANSWER_PATTERN, exact_answer, rewards_for
from ruyi_core.spec import RlSpec


@contextlib.contextmanager
def _rng_sandbox():
    """Trainer and generate() reseed the global RNGs; give the caller its own states back afterwards."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def _messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def freeze_except(model: torch.nn.Module, trainable: list[str]) -> tuple[int, int]:
    """requires_grad only for parameters under one of the `trainable` prefixes; (trainable, frozen) counts.
    A prefix that matches nothing is an error: a typo would silently train nothing (or the wrong tier)."""
    if not trainable:
        raise RuyiError("rl: no trainable prefixes given (e.g. ['model.layers.3.', 'lm_head.'])")
    names = [n for n, _ in model.named_parameters()]
    for pre in trainable:
        if not any(n.startswith(pre) for n in names):
            raise RuyiError(f"rl: trainable prefix {pre!r} matches no parameter; names look like "
                            f"{names[0]!r} .. {names[-1]!r} (tied embeddings have no 'lm_head.' parameter)")
    n_train = n_frozen = 0
    for n, p in model.named_parameters():
        p.requires_grad_(any(n.startswith(pre) for pre in trainable))
        if p.requires_grad:
            n_train += p.numel()
        else:
            n_frozen += p.numel()
    return n_train, n_frozen


def _digest(model: torch.nn.Module, frozen_only: bool = True) -> str:
    # A hash rather than a copy: the frozen trunk can be most of the model's memory.
    h = hashlib.sha256()
    for n, p in model.named_parameters():
        if not (frozen_only and p.requires_grad):
            h.update(n.encode())
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _eos_ids(model, tok) -> list[int]:
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return eos or [tok.eos_token_id]


@torch.no_grad()
def evaluate_reward(model_or_dir, tokenizer, prompts: list[dict], max_new_tokens: int, seed: int = 0,
                    batch_size: int = 16, samples: int = 0, temperature: float = 1.0,
                    rewards: dict[str, float] | None = None, answer_pattern: str = DEFAULT_ANSWER_PATTERN,
                    log=None) -> dict:
    """Held-out rewards on `prompts` ({prompt, answer} records, or eval_sets' {question, answer}), deterministic
    in `seed`: `exact_greedy`, the exact-answer rate of greedy completions, and with `samples` > 0 `reward`, the
    mean total reward (the weighted sum of `rewards`, as GRPO computes it; default RlSpec's) of `samples`
    completions per prompt drawn at `temperature`: the objective GRPO maximises, measured on prompts it never
    trained on, plus each reward's own mean. `answer_pattern`: the final answer's form (RlSpec.answer_pattern).
    `model_or_dir` is a model or a checkpoint folder (then `tokenizer` may be None: the folder's is used).
    `log`, when given, gets a line after each batch of prompts ("64/128 prompts")."""
    rewards = rewards or RlSpec().rewards
    if not prompts:
        return {"exact_greedy": 0.0, "reward": 0.0 if samples else None}
    if isinstance(model_or_dir, (str, Path)):
        model = AutoModelForCausalLM.from_pretrained(model_or_dir, dtype=torch.float32)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_or_dir)
    else:
        model = model_or_dir
    was_training, side = model.training, tokenizer.padding_side
    # Explicit configs: TRL leaves sampling settings on the model that must not leak into evaluation.
    common = dict(max_new_tokens=max_new_tokens, eos_token_id=_eos_ids(model, tokenizer),
                  pad_token_id=tokenizer.pad_token_id, use_cache=True)
    greedy = GenerationConfig(do_sample=False, **common)
    sampled = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                               num_return_sequences=samples, **common) if samples else None
    scores: dict[str, list[float]] = {}
    model.eval()
    tokenizer.padding_side = "left"  # decoder-only batching: prompts must end where generation starts
    try:
        with _rng_sandbox():
            torch.manual_seed(seed)
            for i in range(0, len(prompts), batch_size):
                batch = prompts[i:i + batch_size]
                _score_batch(model, tokenizer, batch, greedy, sampled, rewards, answer_pattern, scores)
                if log:
                    log(f"{min(i + batch_size, len(prompts))}/{len(prompts)} prompts")
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    out = {k: sum(v) / len(v) for k, v in scores.items()}
    out.setdefault("reward", None)
    return out


def _score_batch(model, tokenizer, batch: list[dict], greedy: GenerationConfig, sampled: GenerationConfig | None,
                 rewards: dict[str, float], pattern: str, scores: dict[str, list[float]]) -> None:
    """One batch of prompts, left-padded: one greedy generate call (exact answers) and, with `sampled`, one
    call drawing every prompt's samples (each reward, and their weighted total); appended to `scores`."""
    users = [r.get("prompt", r.get("question")) for r in batch]
    texts = [tokenizer.apply_chat_template(_messages(u), add_generation_prompt=True, tokenize=False) for u in users]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    for gen in (greedy, sampled) if sampled else (greedy,):
        out = model.generate(**enc, generation_config=gen)
        done = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        k = len(done) // len(batch)  # completions per prompt, in prompt order
        answers = [r["answer"] for r in batch for _ in range(k)]
        if gen is greedy:
            scores.setdefault("exact_greedy", []).extend(exact_answer(done, answers, pattern))
            continue
        ps = [_messages(u) for u in users for _ in range(k)]
        funcs = rewards_for(pattern)
        per_fn = {n: funcs[n](done, answer=answers, prompts=ps) for n in rewards}
        for n, vals in per_fn.items():
            scores.setdefault(n, []).extend(vals)
        total = [sum(w * v for w, v in zip(rewards.values(), vs)) for vs in zip(*per_fn.values())]
        scores.setdefault("reward", []).extend(total)


class _LogTo(TrainerCallback):
    """Forwards each step's rewards to the caller's `log` as it happens (a GRPO run can be long), as
    "[grpo] step 3/30 | reward ...", the trainer's progress-line form that the local runner shows."""

    def __init__(self, log, names: list[str]):
        self.log, self.names = log, names

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "reward" in logs:
            parts = [f"reward {logs['reward']:.3f}"] + [
                f"{n} {logs.get(f'rewards/{n}/mean', float('nan')):.3f}" for n in self.names]
            if "kl" in logs:
                parts.append(f"kl {logs['kl']:.3g}")
            self.log(f"[grpo] step {state.global_step}/{state.max_steps} | " + ", ".join(parts))


def _reward_rows(log_history: list[dict], names: list[str]) -> list[dict]:
    rows = []
    for h in log_history:
        if "reward" not in h:  # the final train summary and any non-step entries
            continue
        # "reward" is TRL's total: the weighted sum of the functions' rewards; each function's mean is unweighted.
        row = {"step": h["step"], "reward": h["reward"], "reward_std": h.get("reward_std")}
        row.update({n: h.get(f"rewards/{n}/mean") for n in names})
        for k in ("kl", "loss", "completions/mean_length", "clip_ratio/region_mean"):
            if k in h:
                row[k] = h[k]
        rows.append(row)
    return rows


def _write_rows(out_dir: Path, rows: list[dict], spec: RlSpec) -> None:
    """rewards.jsonl and rewards.png: GRPO's rewards per step, or its control's SFT loss."""
    with (out_dir / "rewards.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    steps = [r["step"] for r in rows]
    if spec.method == "sft":
        curves(out_dir / "rewards.png", steps, {"loss": [r["loss"] for r in rows]}, "step", "SFT loss",
               "GRPO's control: the same steps by SFT", marker="o", ms=3)
        return
    series = {"total" if k == "reward" else k: [r[k] for r in rows] for k in ["reward", *spec.rewards]}
    curves(out_dir / "rewards.png", steps, series, "GRPO step", "mean reward",
           f"GRPO, G={spec.group_size}, {spec.prompts_per_step} prompts/step", marker="o", ms=3)


def _generation_config(tier_dir: Path, tok, cfg) -> GenerationConfig:
    """The tier's own generation config (else the family default), never with a max_new_tokens: a saved one
    overrides evaluation harnesses' own limits."""
    try:
        gen = GenerationConfig.from_pretrained(tier_dir)
    except OSError:
        gen = default_generation_config(tok, cfg)
    gen.max_new_tokens = None
    return gen


def _measure(model, tok, heldout: list[dict], texts, spec: RlSpec, when: str, log) -> dict:
    """The held-out rewards (and the held-out texts' loss, when there are texts), logged."""
    r = evaluate_reward(model, tok, heldout, spec.max_new_tokens, spec.seed, samples=spec.heldout_samples,
                        temperature=spec.temperature, rewards=spec.rewards, answer_pattern=spec.answer_pattern,
                        log=lambda m: log(f"[grpo] held-out {when}: {m}"))
    if texts:
        r["text_loss"] = heldout_loss(model, tok, list(texts))
        log(f"[grpo] held-out text {when}: loss {r['text_loss']:.4f} ({len(texts)} texts)")
    log(f"[grpo] held-out {when}: mean reward {r['reward']:.3f} ({spec.heldout_samples} samples/prompt at "
        f"T={spec.temperature:g}), greedy exact answers {r['exact_greedy']:.3f}, {len(heldout)} prompts")
    return r


def _save_policy(model, tok, gen_cfg: GenerationConfig, out_dir: Path) -> None:
    """A plain checkpoint again: no trainer traces in config, generation config without a length cap."""
    for p in model.parameters():
        p.requires_grad_(True)
    model.config._name_or_path = str(out_dir)
    model.config.use_cache = True
    model.generation_config = gen_cfg
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def _train_grpo(model, tok, train_prompts: list[dict], spec: RlSpec, rt, out_dir: Path, result: dict, log
                ) -> tuple[torch.nn.Module, list[dict], float | None]:
    """TRL's GRPOTrainer on `model` (its trainable parameters); (the trained model, one row per step, seconds)."""
    from datasets import Dataset  # heavy imports only when RL actually runs
    from trl import GRPOConfig, GRPOTrainer

    names, dtype, cuda = list(spec.rewards), rt.dtype, rt.cuda
    # Conversational dataset: TRL applies the tokenizer's chat template; `answer` reaches the reward functions.
    ds = Dataset.from_list([{"prompt": _messages(r["prompt"]), "answer": str(r["answer"])} for r in train_prompts])
    work = Path(tempfile.mkdtemp(prefix=".grpo-", dir=out_dir))  # trainer scratch + reference copy
    try:
        if spec.beta > 0:
            # TRL builds the KL reference with from_pretrained(model.config._name_or_path) (DESIGN §5): save
            # the initial policy and point there, so the reference is exactly the starting point.
            ref_dir = work / "reference"
            model.save_pretrained(ref_dir)
            model.config._name_or_path = str(ref_dir)
        micro = spec.micro_batch_size or spec.prompts_per_step * spec.group_size
        args = GRPOConfig(
            output_dir=str(work / "trainer"), use_cpu=not cuda, bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16, seed=spec.seed,
            num_generations=spec.group_size, max_steps=spec.steps, learning_rate=spec.lr, beta=spec.beta,
            epsilon=spec.clip_eps, max_completion_length=spec.max_new_tokens, temperature=spec.temperature,
            # One optimizer step = one generation batch = prompts_per_step prompts x G completions, in passes of
            # micro_batch_size completions.
            per_device_train_batch_size=micro,
            gradient_accumulation_steps=spec.prompts_per_step * spec.group_size // micro,
            report_to=[], logging_steps=1, save_strategy="no", disable_tqdm=True,
            # Only the tier's own blocks train, so activations are small; checkpointing would only cost time.
            # (the new name: TRL's own gradient_checkpointing=True default trips transformers' rename warning)
            activation_checkpointing=False, dataloader_num_workers=0, reward_weights=list(spec.rewards.values()),
            # On GPUs with vLLM installed (the `gpu` extra), generation runs in vLLM beside the trainer.
            use_vllm=rt.vllm, vllm_mode="colocate",
        )
        with _rng_sandbox():
            funcs = [rewards_for(spec.answer_pattern)[n] for n in names]
            trainer = GRPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=ds, processing_class=tok,
                                  callbacks=[_LogTo(log, names)])
            trainer.remove_callback(PrinterCallback)  # raw metric dicts on stdout; _LogTo reports instead
            if spec.beta > 0:
                if _digest(trainer.ref_model, frozen_only=False) != _digest(model, frozen_only=False):
                    raise RuyiError("rl: TRL's reference model differs from the initial policy")
                result["reference"] = "initial policy"
            train_out = trainer.train()
        model = trainer.accelerator.unwrap_model(trainer.model)
        history = trainer.state.log_history
        del trainer
    finally:
        shutil.rmtree(work, ignore_errors=True)

    return model, _reward_rows(history, names), train_out.metrics.get("train_runtime")


def run_grpo(tier_dir: Path, out_dir: Path, train_prompts: list[dict], heldout: list[dict], trainable: list[str],
             spec: RlSpec, log=print, runtime=None, heldout_texts: list[str] = (), sft_turns: list[dict] = ()) -> dict:
    """GRPO on the tier at `tier_dir`; the trained policy (safetensors, config, tokenizer), rewards.jsonl and
    rewards.png go to `out_dir`. Returns held-out rewards before/after, the held-out loss of `heldout_texts`
    before/after (what GRPO costs plain-text modelling) and parameter counts. The rewards and their weights are
    `spec.rewards`; `runtime` (ruyi_core.runtime: device and dtype) defaults to CPU fp32. With `spec.method`
    "sft" the same steps train the same parameters by SFT on `sft_turns` instead: GRPO's control."""
    tier_dir, out_dir = Path(tier_dir).resolve(), Path(out_dir)
    if not (tier_dir / "config.json").is_file():
        raise RuyiError(f"rl: {tier_dir} is not a checkpoint folder (no config.json): export the tier first")
    if len(train_prompts) < spec.prompts_per_step:
        raise RuyiError(f"rl: {len(train_prompts)} training prompts, fewer than rl.prompts_per_step="
                        f"{spec.prompts_per_step}")
    out_dir.mkdir(parents=True, exist_ok=True)
    from ruyi_core.runtime import Runtime

    rt = runtime or Runtime(torch.device("cpu"), torch.float32)
    model = rt.load(AutoModelForCausalLM, tier_dir)  # the trainer sets train mode
    tok = AutoTokenizer.from_pretrained(tier_dir)
    if tok.chat_template is None:
        raise RuyiError(f"rl: the tokenizer in {tier_dir} has no chat template (GRPO prompts are chat turns)")
    gen_cfg = _generation_config(tier_dir, tok, model.config)
    n_train, n_frozen = freeze_except(model, trainable)
    frozen_before = _digest(model)
    log(f"[grpo] {n_train:,} trainable / {n_frozen:,} frozen parameters (prefixes {trainable})")

    def measured(when: str) -> dict:
        return _measure(model, tok, heldout, heldout_texts, spec, when, log)

    before = measured("before")
    result: dict = {}
    if spec.method == "sft":
        from ruyi_core.rl.control import train_sft_control

        started = time.perf_counter()
        rows = train_sft_control(model, tok, list(sft_turns), spec, log)
        train_s = time.perf_counter() - started
    else:
        model, rows, train_s = _train_grpo(model, tok, train_prompts, spec, rt, out_dir, result, log)

    if _digest(model) != frozen_before:
        raise RuyiError("rl: a frozen parameter changed during GRPO; the other tiers would no longer match")
    _write_rows(out_dir, rows, spec)

    after = measured("after")
    _save_policy(model, tok, gen_cfg, out_dir)

    first = rows[0] if rows else {}
    result.update({
        **{f"heldout_{k}_{when}": v for when, r in (("before", before), ("after", after)) for k, v in r.items()},
        "heldout_samples": spec.heldout_samples, "temperature": spec.temperature, "steps": len(rows),
        "trainable_params": n_train, "frozen_params": n_frozen, "trainable_prefixes": list(trainable),
        "train_reward_first": first.get("reward"), "train_reward_last": rows[-1].get("reward") if rows else None,
        "kl_first": first.get("kl"), "train_runtime_s": train_s, "method": spec.method,
        "heldout_prompts": len(heldout), "train_prompts": len(train_prompts), "path": str(out_dir),
    })
    return result
