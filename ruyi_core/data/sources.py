"""Where a corpus comes from: the one resolver of a spec's data sources, for every corpus kind (pretrain, sft, rl,
heldout, rl_heldout) and every benchmark file. A source is a local JSONL/Parquet file, a local folder (its
JSONL/Parquet files, sorted), an s3:// object or prefix in the artifact store, or `demo` / `demo:<set>` (the
generated demo world, ruyi_core.demo: the only door into it)."""
from __future__ import annotations

from pathlib import Path

from ruyi_core.data.reader import JSONL_SUFFIXES, PARQUET_SUFFIXES, expand_paths
from ruyi_core.errors import RuyiError

SOURCE_FORMS = "a JSONL/Parquet file or folder, an s3:// object or prefix, or demo"


def is_demo(entry: str) -> bool:
    return entry == "demo" or entry.startswith("demo:")


def demo_sizes(spec) -> dict[str, int]:
    """How many records the demo world generates per kind, where a spec names `demo`."""
    return {**spec.data.demo_records, "rl_heldout": spec.rl.heldout_prompts}


def resolve(entries: list[str], kind: str, work: Path, *, label: str, store=None, seed: int = 0,
            demo_sizes: dict[str, int] | None = None) -> list[Path]:
    """Local files for `entries`, in order (a folder or prefix contributes its files sorted by name). `kind` is a
    corpus kind or `benchmark`; `label` names the spec field in errors; `store` is needed for s3:// sources."""
    out: list[Path] = []
    for i, entry in enumerate(entries):
        if is_demo(entry):
            from ruyi_core import demo

            try:
                out.append(demo.write_source(entry, kind, work / "demo", seed, demo_sizes or {}))
            except ValueError as e:
                raise RuyiError(f"{label}: {e}") from None
        elif entry.startswith("s3://"):
            out += _from_store(entry, work / "inputs" / f"{i:03d}", label, store)
        else:
            try:
                out += expand_paths([entry])
            except RuyiError as e:
                raise RuyiError(f"{label}: {e} (a source is {SOURCE_FORMS})") from None
    return out


def shard_sources(entries: list[str], *, label: str, store=None) -> list[str]:
    """`entries` as shards, each a source of one file: a local folder or an s3:// prefix gives one per corpus file
    (sorted by name); a file, an s3:// object or `demo` is one shard itself."""
    out: list[str] = []
    for entry in entries:
        if is_demo(entry):
            out.append(entry)
        elif entry.startswith("s3://"):
            if entry.rstrip("/").rpartition("/")[2].lower().endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES):
                out.append(entry)
                continue
            if store is None:
                raise RuyiError(f"{label}: {entry} is in the object store, but no store was given")
            found = [u for u in store.list_objects(entry) if u.lower().endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES)]
            if not found:
                raise RuyiError(f"{label}: no .jsonl or .parquet objects under {entry}")
            out += found
        else:
            try:
                out += [str(p) for p in expand_paths([entry])]
            except RuyiError as e:
                raise RuyiError(f"{label}: {e} (a source is {SOURCE_FORMS})") from None
    return out


def source_version(source: str, store=None) -> str:
    """What changes when a one-file source's content may have: size and mtime of a local file, an object's ETag.
    A demo source's content follows the spec and the demo's code."""
    if is_demo(source):
        from ruyi_core.demo import version

        return f"demo-{version()}"
    if source.startswith("s3://"):
        return store.etag(source)
    st = Path(source).stat()
    return f"{st.st_size}-{st.st_mtime_ns}"


def _from_store(uri: str, dest: Path, label: str, store) -> list[Path]:
    if store is None:
        raise RuyiError(f"{label}: {uri} is in the object store, but no store was given")
    name = uri.rstrip("/").rpartition("/")[2]
    if name.lower().endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES):
        path = dest / name
        store.get_file(uri, path)
        return [path]
    store.get_folder(uri.rstrip("/"), dest)  # a prefix: every object under it
    try:
        return expand_paths(sorted(p for p in dest.rglob("*") if p.is_file()
                                   and p.name.lower().endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES)) or [dest])
    except RuyiError:
        raise RuyiError(f"{label}: no .jsonl or .parquet objects under {uri}") from None


def check_sources(spec) -> None:
    """What can be checked of every source before any work starts: demo names exist, local paths exist (s3 sources
    are checked when the data gate reads them)."""
    from ruyi_core import demo

    fields = [(f"data.{k}", getattr(spec.data, k)) for k in ("pretrain", "sft", "rl", "heldout", "rl_heldout")]
    fields += [(f"eval.benchmarks.{n}.path", [b.path]) for n, b in spec.eval.benchmarks.items()]
    for label, entries in fields:
        for entry in entries or []:
            benchmark = label.startswith("eval.")
            if entry.startswith("demo:") and (not benchmark or entry.removeprefix("demo:") not in demo.EVAL_SETS):
                known = ", ".join("demo:" + n for n in demo.EVAL_SETS)
                raise RuyiError(f"{label}: unknown source {entry!r}; a benchmark may name one of {known}")
            if entry == "demo" and benchmark:
                raise RuyiError(f"{label}: name a demo set (demo:<set>), not bare demo")
            if not is_demo(entry) and "://" not in entry and not Path(entry).exists():
                raise RuyiError(f"{label}: {entry} does not exist (a source is {SOURCE_FORMS})")
