"""Benchmarks on one model (a packaged tier, or one exit of the family) through lm-evaluation-harness."""
from __future__ import annotations

import logging
import random
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from ruyi_core.eval.tasks import PRIMARY, end_of_turn_ids, write_tasks

# HFLM warns on every construction that it was handed a model instance instead of a name; we do that on
# purpose (the model is already loaded, possibly a family), so only these two messages are dropped.
_EXPECTED = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model")


class _DropExpected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_EXPECTED)


def _quiet_lm_eval() -> None:
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    hf = logging.getLogger("lm_eval.models.huggingface")  # the warnings' own logger: filters do not inherit
    if not any(isinstance(f, _DropExpected) for f in hf.filters):
        hf.addFilter(_DropExpected())


def _tier_lm(model, tokenizer, exit_point: int | None, eos: list[int], batch_size: int):
    """lm-eval's HFLM over an already-loaded model, pinned to one exit and to the packaged stop tokens `eos`."""
    from lm_eval.models.huggingface import HFLM

    exit_kw = {} if exit_point is None else {"exit_point": exit_point}

    class TierLM(HFLM):
        def _model_call(self, inps, attn_mask=None, labels=None):
            # Causal only: lm-eval right-pads loglikelihood batches, so no attention mask is needed.
            with torch.no_grad():
                return self.model(inps, **exit_kw).logits

        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            # Every sequence of a batch stops at its own end of turn (<|im_end|> or EOS, as packaged). lm-eval's
            # string stops cannot do that alone: it decodes with special tokens skipped before cutting at them.
            return super()._model_generate(context, max_length, stop, eos_token_id=eos, **exit_kw,
                                           **generation_kwargs)

    return TierLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)


def use_vllm(runtime, exit_point: int | None = None) -> bool:
    """lm-eval's vLLM backend scores a standalone tier where the runtime has vLLM, as GRPO generates with it there;
    the family at an exit (vLLM has no early exits) and the CPU use transformers."""
    return exit_point is None and runtime.vllm


def _vllm_lm(path: Path, runtime, ev):
    """lm-eval's VLLM over the checkpoint folder `path`, batched by vLLM itself; it stops generation at the
    tasks' stop strings (the packaged end-of-turn tokens, decoded with special tokens kept)."""
    from lm_eval.models.vllm_causallms import VLLM

    # 0.6 of the GPU: the speed measurement loads the tier with transformers after this evaluation.
    return VLLM(pretrained=str(path), dtype=str(runtime.dtype).removeprefix("torch."), batch_size="auto",
                max_gen_toks=ev.max_new_tokens, seed=ev.seed, gpu_memory_utilization=0.6)


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def evaluate(model, tokenizer, spec, work: Path, store=None, exit_point: int | None = None, log=None,
             path: Path | None = None, runtime=None) -> dict:
    """Every benchmark in `spec.eval` on `model` (at `exit_point` for a family); with `model` None, on the
    checkpoint folder `path` through lm-eval's vLLM backend in `runtime` (see use_vllm). Returns
    {"benchmarks": {name: {"format", "metric", "value", "higher_is_better", "n", <other metrics>}},
     "average": mean of the higher-is-better primary scores (None if there are none), "lm_eval_version"}.

    Deterministic in `spec.eval.seed`: greedy generation, zero-shot, no bootstrap (stderr) resampling.
    `work` holds the throwaway task folder (tasks.write_tasks, the folder `ruyi eval tasks` writes for plain
    lm_eval runs); s3:// benchmarks are fetched with `store`. `log`, when given, gets a line as each benchmark
    finishes ("arithmetic 1/3: exact_match 0.140 (n=50) in 3.1 s").
    """
    from lm_eval.evaluator import evaluate as lm_evaluate
    from lm_eval.tasks import TaskManager
    from transformers import AutoConfig

    _quiet_lm_eval()
    ev = spec.eval
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.from_pretrained(path) if model is None else model.eval().config
    eos = end_of_turn_ids(tokenizer, config)
    lm = _vllm_lm(path, runtime, ev) if model is None else _tier_lm(model, tokenizer, exit_point, eos, ev.batch_size)
    out = {"results": {}, "n-samples": {}}
    with tempfile.TemporaryDirectory(dir=work, prefix="lm-eval-") as tmp:
        suite = write_tasks(spec, tokenizer, eos, Path(tmp), store)
        # include_defaults=False: only our tasks are indexed (indexing lm-eval's own ~14k YAMLs took 27 s here).
        tasks = TaskManager(include_path=tmp, include_defaults=False).load(list(suite.tasks.values()))["tasks"]
        _seed(ev.seed)
        # lm_eval.evaluator.evaluate, not simple_evaluate: the latter only adds what we do here (seeding, the LM
        # and the tasks) plus seconds per call collecting environment info (torch collect_env, git). Its few-shot
        # seed has no use: every task is zero-shot. One benchmark per call, so progress shows between them
        # (greedy and log-likelihood scores do not depend on what else runs in the call).
        for i, (name, task) in enumerate(suite.tasks.items(), 1):
            started = time.perf_counter()
            res = lm_evaluate(lm=lm, task_dict={"tasks": {task: tasks[task]}, "groups": {}, "group_map": {}},
                              bootstrap_iters=0, log_samples=False)
            for key in out:
                out[key][name] = res[key][task]
            if log:
                b = summarize(out, spec, [name])["benchmarks"][name]
                log(f"{name} {i}/{len(suite.tasks)}: {b['metric']} {b['value']:.4g} (n={b['n']}) "
                    f"in {time.perf_counter() - started:.1f} s")
    return summarize(out, spec)


def summarize(out: dict, spec, names: list[str] | None = None) -> dict:
    """lm-eval's results for the benchmarks `names` (default: all of the spec's) in our schema."""
    benchmarks = {}
    for name in names or spec.eval.benchmarks:
        bench = spec.eval.benchmarks[name]
        metrics = {k.split(",")[0]: float(v) for k, v in out["results"][name].items()
                   if "," in k and "_stderr" not in k}
        metric, higher = PRIMARY[bench.format]
        benchmarks[name] = {"format": bench.format, "metric": metric, "value": metrics.pop(metric),
                            "higher_is_better": higher, "n": int(out["n-samples"][name]["effective"]), **metrics}
    scores = [b["value"] for b in benchmarks.values() if b["higher_is_better"]]
    return {"benchmarks": benchmarks, "average": sum(scores) / len(scores) if scores else None,
            "lm_eval_version": version("lm_eval")}
