"""megatron-core training of the family: exactness against the HF family, the joint loss, parity between
parallel layouts (torchrun, 2 processes, gloo), exact resume after SIGKILL, and layout errors."""
import importlib
import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from conftest import randomize_, with_demo

from ruyi_core.demo import tokenizer_texts
from ruyi_core.errors import RuyiError
from ruyi_core.family.convert import build_preset_base, family_from_base
from ruyi_core.family.io import save_family
from ruyi_core.spec import parse_spec

pytestmark = pytest.mark.slow  # real training, generation or pipeline runs: minutes in all

HERE = Path(__file__).parent
EXITS = [1, 2, 3]  # micro: 4 layers; with PP=2 exit 1 is on stage 0, exits 2 and 3 on stage 1


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A micro family (exits apart from each other), its megatron checkpoint and a packed corpus."""
    from transformers import AutoTokenizer

    from ruyi_core.demo import world
    from ruyi_core.data.pack import prepare_corpus

    d = tmp_path_factory.mktemp("mcore")
    base, tok = build_preset_base("micro", tokenizer_texts())
    save_family(randomize_(family_from_base(base, EXITS), seed=4).eval(), tok, d / "family")
    prepare_corpus(world.pretrain_records(300), "pretrain", AutoTokenizer.from_pretrained(d / "family"),
                   d / "packed", 10**6)
    subprocess.run([sys.executable, "-m", "ruyi_core.megatron.ckpt", "from-hf", "--family", str(d / "family"),
                    "--out", str(d / "init")], check=True, capture_output=True)
    return d


def probe(mode: str, family: Path) -> dict:
    r = subprocess.run([sys.executable, str(HERE / "mcore_probe.py"), mode, str(family)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_hf_megatron_hf_exact_and_logits_match(workdir):
    out = probe("exactness", workdir / "family")
    assert out["roundtrip_exact"] and out["max_logit_diff"] <= 1e-5


def test_joint_loss_is_the_weighted_sum_of_exit_losses(workdir):
    out = probe("joint-loss", workdir / "family")
    assert out["loss_vs_reference"] < 1e-5  # each exit's loss equals HF cross-entropy at that exit
    assert out["grad_vs_weighted_sum"] < 1e-5  # grad(sum w_k L_k) == sum w_k grad(L_k)
    assert out["bump_vs_exit0_grad"] < 1e-5 < out["exit0_grad_norm"]  # +0.25 on w_0 adds 0.25 grad(L_0)
    assert not any(t.startswith("final.") for t in out["exit0_touches"])
    assert any(t.startswith("branches.0") for t in out["exit0_touches"])
    # a DaE stage's forward stops at its exit: the same gradient, nothing after it computed
    assert out["stopped_vs_exit0_grad"] == 0.0 and out["stopped_exits"] == [0]


def test_recompute_applies_with_the_same_losses_and_gradients(workdir):
    out = probe("recompute", workdir / "family")
    assert out["full_same_losses"] and out["selective_same_losses"]
    assert out["full_grad_diff"] < 1e-6 and out["selective_grad_diff"] < 1e-6
    assert out["bytes_full"] < out["bytes_plain"] / 2  # only each block's input is kept for the backward


def test_cpu_attention_and_swiglu_match_megatron(workdir):
    out = probe("cpu-swaps", workdir / "family")
    assert out["gqa"] and out["attention_max_rel_diff"] < 1e-5 and out["swiglu_exact"]
    assert out["rope_max_diff"] < 1e-12 and out["xent_max_diff"] < 1e-12


def test_a_checkpoint_is_a_function_of_its_tensors(workdir):
    """Saved again (another folder, another process), the same tensors give the same bytes in every file:
    concurrent or repeated runs store one and the same checkpoint artifact."""
    import hashlib

    subprocess.run([sys.executable, "-m", "ruyi_core.megatron.ckpt", "from-hf", "--family", str(workdir / "family"),
                    "--out", str(workdir / "init_again")], check=True, capture_output=True)

    def shas(d: Path) -> dict[str, str]:
        return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir()) if f.is_file()}

    assert ".metadata" in shas(workdir / "init") and shas(workdir / "init") == shas(workdir / "init_again")


def test_checkpoint_restores_every_rng(workdir):
    out = probe("rng-resume", workdir / "family")
    assert out["repeats"] and out["extra"] == {"step": 1}


def spec_file(d: Path, name: str, parallel: dict, steps: int = 10, bucket: str = "ruyi", keep: int = 2,
              precision: str = "auto") -> Path:
    spec = {"family": {"name": "micro", "base": "micro", "exit_points": EXITS}, "store": {"bucket": bucket},
            "train": {"parallel": parallel, "precision": precision,
                      "cpt": {"steps": steps, "micro_batch_size": 4, "global_batch_size": 8, "seq_length": 32,
                              "save_every": 3, "lr": 3e-3, "warmup_steps": 1, "keep_checkpoints": keep},
                      "sft": {"micro_batch_size": 4}},  # every stage's batch must split over DP 2
            "dae": {"cpt": {"micro_batch_size": 4}, "sft": {"micro_batch_size": 4}}}
    path = d / f"{name}.yaml"
    path.write_text(yaml.safe_dump(with_demo(spec)))
    return path


def train(d: Path, name: str, parallel: dict, extra: list[str] = (), bucket: str = "ruyi", keep: int = 2,
          precision: str = "auto", init: list[str] | None = None, **popen) -> subprocess.Popen:
    nproc = parallel.get("tp", 1) * parallel.get("pp", 1) * parallel.get("dp", 1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(29500 + hash(name) % 1000), "-m", "ruyi_core.megatron.trainer", "--stage", "cpt",
           "--spec", str(spec_file(d, name, parallel, bucket=bucket, keep=keep, precision=precision)),
           "--family", str(d / "family"), *(init or ["--init", str(d / "init")]),
           "--data", str(d / "packed"), "--out", str(d / name), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **popen)


def losses(d: Path, name: str) -> list[list[float]]:
    return [json.loads(line)["exits"] for line in (d / name / "cpt_losses.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(workdir):
    p = train(workdir, "tp1", {})
    out = p.communicate()[0]
    assert p.returncode == 0, out[-3000:]
    # saved at 3, 6, 9 and 10; the two newest kept
    assert sorted(c.name for c in (workdir / "tp1" / "checkpoints").iterdir()) == ["iter_0000009", "iter_0000010"]
    return losses(workdir, "tp1")


@pytest.mark.parametrize("layout", [{"tp": 2}, {"pp": 2}, {"dp": 2}, {"tp": 2, "sequence_parallel": True}],
                         ids=["tp2", "pp2", "dp2", "tp2_sp"])
def test_parallel_layouts_match_tp1(workdir, reference, layout):
    """Also megatron's sequence parallelism, which GPU runs switch on under TP by default."""
    name = "_".join(k if v is True else f"{k}{v}" for k, v in layout.items())
    p = train(workdir, name, layout)
    out = p.communicate()[0]
    assert p.returncode == 0, out[-3000:]
    got = losses(workdir, name)
    assert len(got) == len(reference) == 10
    assert max(abs(a - b) for r, s in zip(reference, got) for a, b in zip(r, s)) <= 2e-3
    assert all(r[-1] < r[0] for r in zip(*got))  # every exit's loss falls


def test_one_rank_reads_and_writes_the_hf_family_in_process(workdir, reference):
    """--init-hf / --export (a one-rank stage's path, no converter processes): the same losses bit for bit as
    starting from the converted checkpoint, and the same family as `ckpt to-hf` of the last checkpoint."""
    from safetensors.torch import load_file

    d = workdir
    p = train(d, "inproc", {}, init=["--init-hf", str(d / "family"), "--export", str(d / "inproc_hf")])
    out = p.communicate()[0]
    assert p.returncode == 0, out[-3000:]
    assert losses(d, "inproc") == reference
    subprocess.run([sys.executable, "-m", "ruyi_core.megatron.ckpt", "to-hf", "--ckpt",
                    str(d / "inproc" / "checkpoints" / "iter_0000010"), "--family", str(d / "family"), "--out",
                    str(d / "inproc_ref")], check=True, capture_output=True)
    names = sorted(f.name for f in (d / "inproc_ref").iterdir())
    assert sorted(f.name for f in (d / "inproc_hf").iterdir()) == names
    for f in (n for n in names if n.endswith(".safetensors")):
        got, want = load_file(d / "inproc_hf" / f), load_file(d / "inproc_ref" / f)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    p = train(d, "inproc_tp2", {"tp": 2}, init=["--init-hf", str(d / "family")])
    out = p.communicate()[0]
    assert p.returncode != 0 and "error: --init-hf and --export run on one rank" in out, out[-3000:]


def test_distributed_optimizer_matches_tp1_and_resumes_exactly(workdir, reference):
    """megatron's distributed optimizer (GPU runs' default) over torch's Adam: DP 2 learns as TP 1 does, and a
    run resumed from its step-6 checkpoint repeats the uninterrupted run's losses bit for bit."""

    layout = {"dp": 2, "distributed_optimizer": True}
    p = train(workdir, "distopt", layout, keep=4)
    out = p.communicate()[0]
    assert p.returncode == 0, out[-3000:]
    full = losses(workdir, "distopt")
    assert max(abs(a - b) for r, s in zip(reference, full) for a, b in zip(r, s)) <= 2e-3
    for it in ("iter_0000009", "iter_0000010"):
        shutil.rmtree(workdir / "distopt" / "checkpoints" / it)
    p = train(workdir, "distopt", layout, ["--resume"], keep=4)
    out = p.communicate()[0]
    assert p.returncode == 0 and "[cpt] resumed from step 6" in out, out[-3000:]
    assert losses(workdir, "distopt") == full


def test_bf16_learns_as_fp32_resumes_exactly_and_exports(workdir, reference):
    """bf16 mixed precision (`train.precision: bf16`, GPUs' default, here on the CPU): every exit learns as in fp32 up
    to bf16's rounding; resumed from its step-6 checkpoint, a run repeats its losses bit for bit (the fp32 master
    weights and moments travel in the checkpoint); the bf16 checkpoint exports to an HF family."""

    from ruyi_core.family.modeling import RuyiForCausalLM

    p = train(workdir, "bf16", {}, keep=4, precision="bf16")
    out = p.communicate()[0]
    assert p.returncode == 0, out[-3000:]
    full = losses(workdir, "bf16")
    assert max(abs(a - b) for r, s in zip(reference, full) for a, b in zip(r, s)) <= 1e-2
    assert all(r[-1] < r[0] - 0.3 for r in zip(*full))  # every exit's loss falls
    for it in ("iter_0000009", "iter_0000010"):
        shutil.rmtree(workdir / "bf16" / "checkpoints" / it)
    p = train(workdir, "bf16", {}, ["--resume"], keep=4, precision="bf16")
    out = p.communicate()[0]
    assert p.returncode == 0 and "[cpt] resumed from step 6" in out, out[-3000:]
    assert losses(workdir, "bf16") == full
    subprocess.run([sys.executable, "-m", "ruyi_core.megatron.ckpt", "to-hf", "--ckpt",
                    str(workdir / "bf16" / "checkpoints" / "iter_0000010"), "--family", str(workdir / "family"),
                    "--out", str(workdir / "bf16_hf")], check=True, capture_output=True)
    before, after = (RuyiForCausalLM.from_pretrained(workdir / d) for d in ("family", "bf16_hf"))
    w0, w1 = before.state_dict(), after.state_dict()
    assert w1.keys() == w0.keys() and all(w1[k].isfinite().all() for k in w1)
    assert all(not torch.equal(w0[k], w1[k]) for k in w0)  # every leaf trained


def _processes_marked(mark: str) -> dict[int, int]:
    """{pid: parent pid} of every process whose environment holds `mark` (forks inherit it, as execs do)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if mark.encode() in Path(f"/proc/{pid}/environ").read_bytes():
                found[int(pid)] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:  # gone meanwhile, or not ours
            pass
    return found


def test_sigkill_during_a_save_leaves_no_process_and_resume_repeats_the_losses(workdir, reference, s3_server):
    """Killing the runner's process group while a checkpoint is being written stops every process of the run,
    megatron's forked checkpoint writers included; checkpoints go to the store, and the resumed run finds the
    latest complete one there and repeats the loss sequence exactly."""
    run_id = uuid.uuid4().hex
    mark = f"RUYI_TEST_RUN={run_id}"
    env = {**os.environ, **s3_server.env(), "RUYI_TEST_RUN": run_id}
    spec = parse_spec(with_demo({"store": {"bucket": "killres"}}))
    from ruyi_core.store import ArtifactStore

    ArtifactStore.from_spec(spec.store, env=env)  # creates the bucket
    # the step-6 save's writers block opening their files (FIFOs nobody reads): the kill lands mid-save
    saving = workdir / "killed" / "checkpoints" / "iter_0000006"
    saving.mkdir(parents=True)
    for name in ("__0_0.distcp", "__0_1.distcp"):
        os.mkfifo(saving / name)
    extra = ["--ckpt-prefix", "runs/kill/cpt/checkpoints", "--resume"]
    p = train(workdir, "killed", {}, extra, bucket="killres", env=env)
    seen = []
    for line in p.stdout:
        seen.append(line)
        if "step 6/10" in line:
            break
    writers: dict[int, int] = {}
    for _ in range(600):  # a worker's child: a forked checkpoint writer
        run = _processes_marked(mark)
        writers = {pid: parent for pid, parent in run.items() if parent in run and parent != p.pid}
        if writers or p.poll() is not None:
            break
        time.sleep(0.05)
    assert writers, "".join(seen)[-3000:]
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    time.sleep(5)
    left = _processes_marked(mark)
    for pid in left:  # do not leave them to the rest of the session
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes of the killed run still alive 5 s later: {left}"
    shutil.rmtree(workdir / "killed" / "checkpoints")  # the store's copy must be enough
    p = train(workdir, "killed", {}, extra, bucket="killres", env=env)
    out = p.communicate()[0]
    assert p.returncode == 0, out[-3000:]
    assert "[cpt] resumed from step 3 (iter_0000003)" in out, out[-3000:]  # the step-6 save never completed
    assert losses(workdir, "killed") == reference  # bit-exact, every exit, every step
    kept = ArtifactStore.from_spec(spec.store, env=env).list_artifacts("runs/kill/cpt/checkpoints")
    assert [u.rsplit("/", 1)[-1] for u in kept] == ["iter_0000009", "iter_0000010"]  # older ones deleted


def test_trainer_errors_are_one_line_for_users_and_a_traceback_for_bugs(workdir, tmp_path):
    base, tok = build_preset_base("micro", tokenizer_texts())
    save_family(family_from_base(base, [1, 3]), tok, tmp_path / "family13")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "dataset.json").write_text("not json")
    (tmp_path / "odd").mkdir()  # a manifest no writer of ours makes: reading it fails in the trainer's own code
    (tmp_path / "odd" / "dataset.json").write_text('{"kind": "pretrain", "shards": 7}')

    def run(family: Path, data: Path) -> subprocess.CompletedProcess:  # a world of one: its own exit code
        return subprocess.run([sys.executable, "-m", "ruyi_core.megatron.trainer", "--stage", "cpt", "--spec",
                               str(spec_file(tmp_path, "errors", {}, steps=2)), "--family", str(family), "--init",
                               str(workdir / "init"), "--data", str(data), "--out", str(tmp_path / "out")],
                              capture_output=True, text=True)

    r = run(tmp_path / "family13", workdir / "packed")  # strict: the init has a branch for exit 2, this family none
    assert r.returncode == 2, r.stderr[-3000:]
    assert re.search(r"^error: checkpoint .* does not match the model: not in the model \['branches\.1\.",
                     r.stderr, re.M), r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    r = run(workdir / "family", tmp_path / "broken")  # damaged data: the user's to rebuild
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "dataset.json is truncated or damaged" in r.stderr.strip().splitlines()[-1]
    r = run(workdir / "family", tmp_path / "odd")  # not a RuyiError: a bug, whatever its type
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback (most recent call last)" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("internal error: "), r.stderr[-3000:]


def test_bad_layouts_stop_before_any_process(capsys):
    """A base only the store has is checked against the fetched family's config when training starts."""
    from ruyi_core.megatron.launch import validate_layout

    cfg = {"num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 4, "vocab_size": 510}
    ok = parse_spec(with_demo({"family": {"base": "s3://ruyi/bases/mine", "exit_points": EXITS}}))

    def spec(**train):
        return ok.model_copy(update={"train": ok.train.model_copy(update={
            k: getattr(ok.train, k).model_copy(update=v) if isinstance(v, dict) else v for k, v in train.items()})})

    with pytest.raises(RuyiError, match=r"tp = 4 must divide the base's 4 attention heads and 2 key/value heads"):
        validate_layout(spec(parallel={"tp": 4}), cfg, "cpt")
    with pytest.raises(RuyiError, match=r"tp = 4 must divide the base's 4 attention heads"):
        validate_layout(spec(parallel={"tp": 4}), cfg, "cpt")
    with pytest.raises(RuyiError, match=r"pp = 3 must divide the base's 4 layers"):
        validate_layout(spec(parallel={"pp": 3}), cfg, "cpt")
    with pytest.raises(RuyiError, match=r"tp = 4 must divide the vocabulary \(510\)"):
        validate_layout(spec(parallel={"tp": 4}), cfg | {"num_attention_heads": 8, "num_key_value_heads": 4}, "cpt")
    with pytest.raises(RuyiError, match=r"shared_heads"):
        validate_layout(ok, cfg | {"shared_heads": True}, "cpt")
    with pytest.raises(RuyiError, match=r"sequence_parallel needs tp > 1"):
        validate_layout(spec(parallel={"sequence_parallel": True}), cfg, "cpt")
    with pytest.raises(RuyiError, match=r"train.cpt.seq_length \(127\) must be a multiple of train.parallel.tp \(2\)"):
        validate_layout(spec(parallel={"tp": 2}, cpt={"seq_length": 127}), cfg, "cpt")
    validate_layout(ok, cfg, "cpt")


def test_cpu_shim_canary():
    """Fails loudly when a megatron-core upgrade makes a patch of the CPU shim wrong or unneeded."""
    from megatron.core.models.common.embeddings import rotary_pos_embedding
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as moptim
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer import attention
    from megatron.core.utils import local_multi_tensor_l2_norm

    from ruyi_core.megatron.cpu import clip_grad_by_total_norm_cpu, cpu_shim, l2_norm_cpu

    mfinalize = importlib.import_module("megatron.core.distributed.finalize_model_grads")

    assert "torch.cuda.FloatTensor" in inspect.getsource(clip_grads.clip_grad_by_total_norm_fp32)
    assert moptim.clip_grad_by_total_norm_fp32 is clip_grads.clip_grad_by_total_norm_fp32
    assert "torch.cuda.current_device()" in inspect.getsource(rotary_pos_embedding.RotaryEmbedding)
    assert hasattr(mrandom, "_CUDA_RNG_STATE_TRACKER") and hasattr(mrandom, "_CUDA_RNG_STATE_TRACKER_INITIALIZED")
    # (on every device) ckpt.save hands megatron's checkpoint writer a local results queue, saving a spawned
    # Manager process per process that saves: the writer still makes it lazily, in this global
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    assert "_results_queue = ctx.Manager().Queue()" in inspect.getsource(filesystem_async._get_write_results_queue)
    if torch.cuda.is_available():
        pytest.skip(reason="the shim is a no-op where CUDA exists")
    assert clip_grads.l2_norm_impl is local_multi_tensor_l2_norm  # no apex: megatron's Python fallback
    # megatron's grad norm names a CUDA device; its per-step reset walks every module for the two MoE features
    # the shim checks first
    assert "device='cuda'" in inspect.getsource(clip_grads.get_grad_norm_fp32)
    reset = inspect.getsource(mfinalize.reset_model_temporary_tensors)
    assert "'modules'" in reset and reset.count("if ") == 2
    assert "moe_router_enable_expert_bias" in reset and "global_aux_loss" in reset
    speedups = (attention.apply_rotary_pos_emb, schedules.backward_step, moptim.ChainedOptimizer.step,
                moptim.ChainedOptimizer.zero_grad, moptim.get_grad_norm_fp32, mfinalize.reset_model_temporary_tensors)
    with cpu_shim():
        assert moptim.clip_grad_by_total_norm_fp32 is clip_grad_by_total_norm_cpu
        assert clip_grads.l2_norm_impl is l2_norm_cpu
        now = (attention.apply_rotary_pos_emb, schedules.backward_step, moptim.ChainedOptimizer.step,
               moptim.ChainedOptimizer.zero_grad, moptim.get_grad_norm_fp32, mfinalize.reset_model_temporary_tensors)
        assert all(a is not b for a, b in zip(now, speedups))
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        with mrandom.get_cuda_rng_tracker().fork():
            pass
    assert moptim.clip_grad_by_total_norm_fp32 is clip_grads.clip_grad_by_total_norm_fp32
    assert clip_grads.l2_norm_impl is local_multi_tensor_l2_norm
    assert (attention.apply_rotary_pos_emb, schedules.backward_step, moptim.ChainedOptimizer.step,
            moptim.ChainedOptimizer.zero_grad, moptim.get_grad_norm_fp32,
            mfinalize.reset_model_temporary_tensors) == speedups


def test_a_worker_dies_with_its_parent(tmp_path):
    """torchrun's workers live in their own session; killing the parent (SIGKILL, no cleanup) stops them too."""
    import os
    import signal

    pid_file = tmp_path / "worker.pid"
    worker = ("import os, sys, time; from ruyi_core.launch import die_with_parent; die_with_parent(); "
              f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)")
    parent = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {worker!r}], "
              "start_new_session=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", parent], cwd=Path(__file__).resolve().parents[1])
    for _ in range(200):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.05)
    child = int(pid_file.read_text())
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    for _ in range(100):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(child, signal.SIGKILL)
    raise AssertionError("the worker outlived its killed parent")
