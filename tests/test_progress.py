"""What a local pipeline run shows: progress lines whole and with their [tag], however the runner's output is cut
into writes, and the final tier table with its header row when stdout is a pipe or a log file."""
import io

import pytest
from rich.console import Console

from pipelines.cli import _print_tiers, progress_printer
from pipelines.run import _TaskLog

OUTPUT = ("    [KFP Executor 2026-12-01 11:51:46,672 INFO]: Looking for component `grpo`\n"
          "12:01:00.000 - INFO - Executing task 'grpo'\n"
          "    [grpo] step 3/30 | reward 0.500, kl 0.01\n"
          "\x1b[32m    [package] end: arithmetic 2/3: exact_match 0.14 (n=50) in 3.1 s\x1b[0m\r\n"
          "[default0]:[cpt] step 1/60 | loss 6.5\n"
          "some library chatter with [brackets] in it\n"
          "[transformers] Token indices sequence length is longer than 1024 (2/3 of a batch)\n"
          "    [svd_compress] ratio 0.4 (2/3): removed 40.2%")  # the last line has no newline


@pytest.mark.parametrize("chunk", [1, 7, len(OUTPUT)])
def test_progress_lines_come_out_whole_with_their_tag(chunk):
    shown, log = [], io.StringIO()
    tee = _TaskLog(log, shown.append)
    for i in range(0, len(OUTPUT), chunk):  # cut anywhere: inside a tag, a line, an escape sequence
        tee.write(OUTPUT[i:i + chunk])
    tee.finish()
    assert shown == ["Executing task 'grpo'", "  [grpo] step 3/30 | reward 0.500, kl 0.01",
                     "  [package] end: arithmetic 2/3: exact_match 0.14 (n=50) in 3.1 s",
                     "  [cpt] step 1/60 | loss 6.5", "  [svd_compress] ratio 0.4 (2/3): removed 40.2%"]
    assert tee.events == ["Executing task 'grpo'"] and log.getvalue() == OUTPUT


def test_shown_lines_keep_their_tag_and_stay_whole():
    live = Console(file=io.StringIO(), width=200)
    progress_printer(live)("[grpo] step 3/30 | reward 0.5")
    assert live.file.getvalue() == "  [grpo] step 3/30 | reward 0.5\n"
    narrow = Console(file=io.StringIO(), width=40)  # a pipe: rich's default width would wrap the line
    line = "[cpt] step 240/240 | loss 0.9361 | exits 0.623 0.592 0.572 | lr 3.00e-04 | 2,596 tok/s | ETA 0s"
    progress_printer(narrow)(line)
    assert narrow.file.getvalue() == f"  {line}\n"


def test_tier_table_keeps_its_header_in_a_pipe(capsys):
    benches = ["arithmetic", "facts_mc", "gsm8k_chain_of_thought", "heldout_text", "mmlu_college_physics",
               "wikitext_perplexity"]  # wider than the 170 columns it was once squeezed into
    tiers = [{"tier": t, "exit_point": p, "parameters": 10**6 * (p + 1), "weight_bytes": 4 * 10**6 * (p + 1),
              "uri": f"s3://b/models/f/v1/{t}", "gate": {"promoted": True},
              "evaluation": {"benchmarks": {b: {"value": 0.5, "higher_is_better": True} for b in benches},
                             "average": 0.5, "speed": {"prefill_tokens_per_s": 2059.0, "decode_tokens_per_s": 52.0,
                                                       "peak_memory_mib": 9.0}}}
             for t, p in (("end", 1), ("cloud", 11))]
    _print_tiers(tiers, {"family": "f", "version": "v1", "promoted": {"end": "v1", "cloud": "v1"}})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].strip() == "f version v1: tiers"
    assert [c.strip() for c in lines[1].split("|")[1:-1]] == [
        "tier", "params", "on disk", *benches, "average", "prefill tok/s", "decode tok/s", "peak MiB", "promoted"]
    assert set(lines[2]) <= {"|", "-"} and len(lines[1]) > 170
    assert lines[3].startswith("| end ") and lines[4].startswith("| cloud ") and len(lines[3]) == len(lines[1])


KFP_FAILED = ("Pipeline \x1b[95m'ruyi-flow'\x1b[0m finished with status \x1b[91mFAILURE\x1b[0m. Inner task failed: "
              "\x1b[96m'cpt'\x1b[0m.")


def test_a_failed_task_shows_its_cause_in_one_plain_line(tmp_path, monkeypatch, s3_server):
    """A stage's internal error reaches the runner as its type and first line; KFP's colour codes never show."""
    import yaml

    from conftest import with_demo
    from pipelines.run import _failure
    from ruyi_core.errors import RuyiError
    from ruyi_core.stages.contract import ERROR_DIR_ENV, open_run

    for k, v in {**s3_server.env(), ERROR_DIR_ENV: str(tmp_path)}.items():
        monkeypatch.setenv(k, v)
    spec_yaml = yaml.safe_dump(with_demo({"store": {"bucket": "failed-task"}}))
    with pytest.raises(ValueError), open_run(spec_yaml):
        raise ValueError("offset must be non-negative and no greater than buffer length (1160)\nmore detail")
    e = _failure(tmp_path, RuntimeError(KFP_FAILED), tmp_path / "run.log")
    assert type(e) is RuntimeError and "\n" not in str(e) and "\x1b" not in str(e)
    assert str(e).startswith("task 'cpt' failed: ValueError: offset must be non-negative and no greater than "
                             "buffer length (1160) (its traceback is in ")
    with pytest.raises(RuyiError), open_run(spec_yaml):  # a user error wins: it names the fix
        raise RuyiError("x.bin is truncated or damaged: re-run the data stage")
    e = _failure(tmp_path, RuntimeError(KFP_FAILED), tmp_path / "run.log")
    assert isinstance(e, RuyiError) and str(e).startswith("x.bin is truncated or damaged: re-run the data stage")
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    e = _failure(nothing, RuntimeError(KFP_FAILED), tmp_path / "run.log")  # died before saying why
    assert "Pipeline 'ruyi-flow' finished with status FAILURE. Inner task failed: 'cpt'." in str(e)
    assert "\x1b" not in str(e)
