"""A training stage's loss log: `<stage>_losses.jsonl` in the run folder, one record per step, and with every
checkpoint a copy of it and its curves per exit (`<stage>_losses.png`), so the log travels with each checkpoint
wherever the trainer ran. Only the rank that `writes` touches the files; on the others every call does nothing."""
from __future__ import annotations

import json
from pathlib import Path

from ruyi_core.plots import exit_losses


class LossLog:
    def __init__(self, out: Path, stage: str, writes: bool):
        self.stage, self.writes = stage, writes
        self.path = out / f"{stage}_losses.jsonl"

    def restart(self, history: list[dict]) -> None:
        """The log from a checkpoint's history: steps after it will be redone."""
        if self.writes:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("".join(json.dumps(r) + "\n" for r in history))

    def append(self, record: dict) -> None:
        if self.writes:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def attach(self, folder: Path, history: list[dict]) -> None:
        """The log and its curves into a checkpoint's folder."""
        if self.writes:
            (folder / self.path.name).write_bytes(self.path.read_bytes())
            exit_losses(history, folder / f"{self.stage}_losses.png", f"{self.stage}: loss per exit")
