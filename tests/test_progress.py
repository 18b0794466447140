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
