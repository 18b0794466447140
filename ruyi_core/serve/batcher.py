"""Batches concurrent requests: one worker thread takes whatever requests are waiting (up to `max_batch`),
groups them by tier and sampling settings, and decodes each group as one batch. Tokens go back to each
request's asyncio queue as they are made, so streaming and batching work together. A seeded job is decoded
alone: its sampled tokens then depend on its seed only, not on what it happened to share a batch with."""
from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

DONE = None  # the last item a job's queue receives


@dataclass
class Job:
    tier: str
    prompt: list[int]
    max_new_tokens: int
    temperature: float
    seed: int | None
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)  # (index, item): the n jobs of a request share it
    index: int = 0  # which of its request's answers (OpenAI's choice index)
    stop: threading.Event = field(default_factory=threading.Event)  # set: the request wants no more tokens
    answered_by: str | None = None  # the tier that answered (set before the first token; `auto` routes)
    draft: list[int] | None = None  # `auto` handed over by a server of shallower tiers: their draft
    computed_at: str = "local"  # `auto`: where the answer was computed (this server, or an upstream's URL)
    network_bytes: int = 0  # `auto`: bytes sent to and received from upstream servers
    fallback: str | None = None  # `auto`: why this server answered although its answer was unsure
    read: object | None = None  # `auto` handed over with a trunk state: what the lower server read (decode.Read)
    handoff: str | None = None  # `auto` sent upstream: "tokens", "state", or why a state was not used

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, (self.index, item))

    @property
    def group(self) -> tuple:
        """Jobs decoded together share this."""
        return (self.tier, self.temperature) if self.seed is None else (self.tier, self.temperature, id(self))


class Batcher:
    def __init__(self, run: Callable, max_batch: int = 8):
        """`run(tier, jobs, on_token) -> None` decodes one batch of jobs (same tier and sampling settings);
        on_token(i, token) returns True when job i should stop."""
        self.run, self.max_batch = run, max_batch
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.batches = 0  # how many batches ran (and so how many requests shared one)
        self.thread = threading.Thread(target=self._loop, name="ruyi-decode", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> Job:
        self.jobs.put(job)
        return job

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=30)

    def _take(self) -> list[Job] | None:
        first = self.jobs.get()
        if first is None:
            return None
        jobs = [first]
        while len(jobs) < self.max_batch:
            try:
                nxt = self.jobs.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                self.jobs.put(None)
                break
            jobs.append(nxt)
        return jobs

    def _loop(self) -> None:
        while (jobs := self._take()) is not None:
            groups: dict[tuple, list[Job]] = {}
            for j in jobs:
                groups.setdefault(j.group, []).append(j)
            for group in groups.values():
                self.batches += 1
                self._run_group(group[0].tier, group)

    def _run_group(self, tier: str, group: list[Job]) -> None:
        def on_token(i: int, token: int) -> bool:
            group[i].put(token)
            return group[i].stop.is_set()

        try:
            self.run(tier, group, on_token)
        except Exception as e:  # noqa: BLE001 - reported to every request of the batch, the server lives on
            for j in group:
                j.put(e)
        for j in group:
            j.put(DONE)
