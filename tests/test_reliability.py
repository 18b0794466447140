"""Faults an operator meets, against the real local S3 server: the store going away mid-training (one line
naming it; a re-run resumes from its checkpoint), killed runs' work folders, a corpus whose size must not
decide the gate's memory. Hostile specs live in test_spec_cli.py, hostile corpora in test_data.py, store
faults (tampering, credentials, TLS, silence, concurrent promotes) in test_store.py."""
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from test_megatron import spec_file, workdir  # noqa: F401  (the micro family, its checkpoint, a packed corpus)

from ruyi_core.errors import RuyiError
from ruyi_core.launch import run_child
from ruyi_core.stages.contract import WORK_PREFIX, sweep_workdirs, workdir as stage_workdir


def _trainer(d: Path, name: str, bucket: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port", "29877",
            "-m", "ruyi_core.megatron.trainer", "--stage", "cpt", "--spec", str(spec_file(d, name, {}, bucket=bucket)),
            "--family", str(d / "family"), "--init", str(d / "init"), "--data", str(d / "packed"),
            "--out", str(d / name), "--ckpt-prefix", f"runs/{name}/cpt/checkpoints", "--resume"]


@pytest.mark.slow
def test_store_killed_mid_training_is_one_line_and_the_rerun_resumes(workdir, tmp_path):  # noqa: F811
    """The launcher's view (what a stage and `ruyi train` show): the store dies after the first checkpoint
    upload (step 3); the next upload (step 6) fails with one line naming the store. With the store back,
    the same command resumes from its latest complete checkpoint and finishes."""
    from ruyi_core.spec import StoreSpec
    from ruyi_core.store import ArtifactStore
    from ruyi_core.store.server import serve

    srv = serve(tmp_path / "s3")
    ArtifactStore.from_spec(StoreSpec(bucket="storekill"), env=srv.env())  # creates the bucket
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        if "step 4/10" in line:
            srv.kill()

    try:
        with pytest.raises(RuyiError) as e:
            run_child(_trainer(workdir, "storekill", "storekill"), log, env=srv.env())
        msg = str(e.value)
        assert "\n" not in msg and srv.endpoint.removeprefix("http://") in msg, msg
        assert not any("Traceback" in line for line in lines[-3:])
        srv = serve(tmp_path / "s3")  # the same data folder, back
        lines.clear()
        run_child(_trainer(workdir, "storekill", "storekill"), lines.append, env=srv.env())
        out = "\n".join(lines)
        # step 3 from the store, or step 6 from the run's own folder (saved there before its upload failed)
        assert re.search(r"\[cpt\] resumed from step [36] \(iter_\d+\)", out), out[-3000:]
        assert "step 10/10" in out
    finally:
        srv.kill()


def test_killed_runs_leave_no_work_folders(tmp_path, monkeypatch):
    """A SIGKILLed stage cannot clean its work folder; the next stage that opens one removes it."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    child = ("import os, sys\nfrom ruyi_core.stages.contract import workdir\n"
             "with workdir('cpt') as d:\n    (d / 'big.bin').write_bytes(b'x' * 1000)\n    os._exit(9)\n")
    r = subprocess.run([sys.executable, "-c", child], env={**os.environ, "TMPDIR": str(tmp_path)})
    assert r.returncode == 9
    assert len(list(tmp_path.glob(f"{WORK_PREFIX}*"))) == 1  # the dead process's folder
    with stage_workdir("validate") as mine:
        assert [p.name for p in tmp_path.glob(f"{WORK_PREFIX}*")] == [mine.name]
    assert sweep_workdirs(tmp_path) == 0 and not list(tmp_path.glob(f"{WORK_PREFIX}*"))


def test_a_killed_runner_leaves_no_task_or_child_running(tmp_path):
    """`kill` of `ruyi pipeline run`: its tasks (under KFP's shell, not under the runner) stop when the runner is
    gone, and a task's child (torchrun in a real stage, which asks for nothing itself) dies with the task."""
    import time

    from ruyi_core.launch import RUNNER_PID_ENV

    pid_file = tmp_path / "child.pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    task = ("from ruyi_core.launch import run_child, stop_with_runner\nstop_with_runner()\n"
            f"run_child({[sys.executable, '-c', child]!r}, print)")
    runner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    proc = subprocess.Popen([sys.executable, "-c", task], env={**os.environ, RUNNER_PID_ENV: str(runner.pid)})
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        runner.kill()
        runner.wait()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive(int(pid_file.read_text())) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(int(pid_file.read_text()))
    finally:
        runner.kill()
        proc.kill()


def _alive(pid: int) -> bool:
    try:  # a zombie (dead, not yet reaped by init) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_torchrun_and_the_local_store_leave_nothing_in_the_temp_dir(tmp_path, monkeypatch):
    """torchrun's own folder goes where its caller says (a stage's work folder); the local store writes its glog
    files under its root. The temp dir is as it was."""
    from ruyi_core.launch import torchrun
    from ruyi_core.store.server import serve

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    lines: list[str] = []
    run_child(torchrun(1, "this", [], tmp_path / "work" / "torchrun"), lines.append)
    assert any("Beautiful is better than ugly" in line for line in lines)
    assert list((tmp_path / "work" / "torchrun").iterdir())  # torchrun's run folder, where it was told
    srv = serve(tmp_path / "s3")
    try:
        assert srv.env()["RUYI_S3_ENDPOINT"]
    finally:
        srv.kill()
    assert any(p.name.startswith("weed.") for p in (tmp_path / "s3" / "logs").iterdir())
    assert sorted(p.name for p in tmp.iterdir()) == []


def _peak_rss_mib(code: str, *args: str) -> int:
    r = subprocess.run([sys.executable, "-c", code + "\nfrom ruyi_core.measure import peak_rss_mib\n"
                        "print(int(peak_rss_mib()))", *args],
                       capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0, r.stderr[-2000:]
    return int(r.stdout.split()[-1])


@pytest.mark.slow
def test_gate_memory_does_not_grow_with_the_corpus(tmp_path):
    """The gate keeps a few small columns per record, never the texts: validating 64 MiB of long documents takes
    little more memory than validating 1 MiB of them (bench/gate_memory.py measures 1 GiB)."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    from gate_memory import write_corpus

    gate = ("import sys\nfrom ruyi_core.data.validate import gate_or_raise, validate_corpus\n"
            "r = gate_or_raise(validate_corpus([sys.argv[1]], 'pretrain'))")
    peak = {}
    for mb in (1, 64):
        write_corpus(tmp_path / f"{mb}.jsonl", mb, 8000)
        peak[mb] = _peak_rss_mib(gate, str(tmp_path / f"{mb}.jsonl"))
    assert peak[64] - peak[1] < 24, f"peak RSS {peak[1]} MiB for 1 MiB of corpus, {peak[64]} MiB for 64 MiB"
