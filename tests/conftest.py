import contextlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from ruyi_core.demo import tokenizer_texts  # noqa: E402
import ruyi_core  # noqa: E402

ruyi_core.register()
from ruyi_core.family.convert import build_preset_base  # noqa: E402

TOL = 1e-5
# What every spec must name, set to the demo world on the tiny preset: tests that vary other fields start here.
DEMO_NAMED = {
    "family": {"base": "tiny", "exit_points": [1, 6, 11]},
    "data": {**{k: ["demo"] for k in ("pretrain", "sft", "rl", "heldout", "rl_heldout")},
             # as specs/tiny.yaml: curation narrowed to the generated world
             "curation": {"languages": ["en"], "quality": False, "near_dedup": False,
                          "keep_overlap_with": ["data.heldout"]}},
    "rl": {"answer_pattern": r"The answer is ([+-]?\d+)"},
    "eval": {"benchmarks": {"arithmetic": {"format": "exact_match", "path": "demo:arithmetic"},
                            "facts_mc": {"format": "multiple_choice", "path": "demo:facts_mc", "template": "cloze"},
                            "heldout_text": {"format": "perplexity", "path": "demo:heldout_text"}}},
}


def with_demo(raw: dict | None = None) -> dict:
    """`raw` (a spec as a dict) with whatever it leaves unnamed taken from DEMO_NAMED, section by section."""
    raw = dict(raw or {})
    for section, named in DEMO_NAMED.items():
        raw[section] = {**named, **raw.get(section, {})}
    return raw


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Weights far from HF's near-zero init, so a wrong wiring cannot hide inside the tolerance."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(1.0 + noise if "norm" in name else noise)
    return model


def padded_batch(vocab: int, lengths: list[int], seed: int = 0):
    """Left-padded random batch (the generation convention) and its attention mask."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), n), generator=g)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for i, length in enumerate(lengths):
        mask[i, n - length:] = 1
        ids[i, : n - length] = 0
    return ids, mask


@pytest.fixture(scope="session")
def micro_base():
    base, tok = build_preset_base("micro", tokenizer_texts(), seed=0)
    return randomize_(base, seed=1), tok


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A throwaway local S3 server (SeaweedFS) for the whole session; SIGKILLed at the end."""
    from ruyi_core.store.server import serve

    srv = serve(tmp_path_factory.mktemp("s3"))
    yield srv
    srv.kill()


@pytest.fixture
def store(s3_server):
    """An ArtifactStore on a fresh bucket of the session server, with small (5 MiB) parts."""
    import uuid

    from ruyi_core.spec import StoreSpec
    from ruyi_core.store import ArtifactStore

    store = ArtifactStore.from_spec(StoreSpec(bucket=f"t-{uuid.uuid4().hex[:16]}", part_size_mb=5),
                                    env=s3_server.env())
    yield store
    drop_bucket(store.client, store.bucket)


def drop_bucket(client, bucket: str) -> None:
    """SeaweedFS gives every bucket its own volume and caps volumes at free disk / 128 MiB: a suite that kept its
    buckets would run out of volumes on a small CI disk (InternalError on every upload from then on)."""
    with contextlib.suppress(Exception):
        for o in client.list_objects(bucket, recursive=True):
            client.remove_object(bucket, o.object_name)
        client.remove_bucket(bucket)


@pytest.fixture
def run_cli(capsys):
    """Runs `ruyi ARGS` in-process; returns (exit code, stdout + stderr)."""
    import sys

    from ruyi_core.cli import main

    def run(args) -> tuple[int, str]:
        sys.argv = ["ruyi", *map(str, args)]
        with pytest.raises(SystemExit) as e:
            main()
            sys.exit(0)
        out = capsys.readouterr()
        return e.value.code, out.out + out.err

    return run
