"""Artifact store throughput against the raw minio client on the same local S3 server: upload and download
MB/s of put_artifact/get_artifact (one file, hashed and verified) vs fput_object/fget_object of the same
bytes. Rounds are interleaved so machine noise hits both alike; medians are reported as ours / raw.

    python bench/store_io.py [--size-mb 200] [--rounds 3] [--out bench/results/store_io.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from minio import Minio

from ruyi_core.spec import StoreSpec
from ruyi_core.store import ArtifactStore
from ruyi_core.store.server import serve


def write_random(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for off in range(0, size, 4 << 20):
            f.write(os.urandom(min(4 << 20, size - off)))


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--part-size-mb", type=int, default=StoreSpec().part_size_mb)
    ap.add_argument("--parallel-parts", type=int, default=StoreSpec().parallel_parts)
    ap.add_argument("--out", default="bench/results/store_io.json")
    a = ap.parse_args()
    size = a.size_mb << 20
    work = Path(tempfile.mkdtemp(prefix="ruyi-store-bench-"))
    srv = serve(work / "s3")
    try:
        spec = StoreSpec(bucket="bench", part_size_mb=a.part_size_mb, parallel_parts=a.parallel_parts)
        store = ArtifactStore.from_spec(spec, env=srv.env())
        raw = Minio(srv.endpoint.removeprefix("http://"), srv.access_key, srv.secret_key, secure=False)
        src = work / "src"
        write_random(src / "blob.bin", size)
        names = ("ours_up", "raw_up", "ours_down", "raw_down")
        secs = {k: [] for k in names}
        for r in range(a.rounds + 1):  # round 0 warms the bucket (SeaweedFS grows volumes on first writes)
            got = {
                "ours_up": timed(lambda: store.put_artifact(f"b/{r}/ours", src, stage="bench", spec_hash="-")),
                "raw_up": timed(lambda: raw.fput_object("bench", f"b/{r}/raw/blob.bin", str(src / "blob.bin"))),
                "ours_down": timed(lambda: store.get_artifact(f"b/{r}/ours", work / f"d{r}" / "ours")),
                "raw_down": timed(lambda: raw.fget_object("bench", f"b/{r}/raw/blob.bin",
                                                          str(work / f"d{r}" / "raw" / "blob.bin"))),
            }
            shutil.rmtree(work / f"d{r}")
            if r:
                for k, v in got.items():
                    secs[k].append(v)
            print(f"round {r}{' (warm-up)' if not r else ''}: "
                  + "  ".join(f"{k} {a.size_mb / v:.0f} MB/s" for k, v in got.items()), flush=True)
        mbps = {k: a.size_mb / statistics.median(v) for k, v in secs.items()}
        result = {
            "size_mb": a.size_mb, "rounds": a.rounds, "part_size_mb": spec.part_size_mb,
            "parallel_parts": spec.parallel_parts, "cpus": os.cpu_count(), "machine": platform.machine(),
            "server": "SeaweedFS weed mini (local)", "mb_per_s": {k: round(v, 1) for k, v in mbps.items()},
            "ratio_upload": round(mbps["ours_up"] / mbps["raw_up"], 3),
            "ratio_download": round(mbps["ours_down"] / mbps["raw_down"], 3),
            "seconds": secs,
            "note": "ours = put_artifact/get_artifact (sha256 before+during upload, verified download); "
                    "raw = minio fput_object/fget_object (no verification)",
        }
        print(f"upload   ours {mbps['ours_up']:.0f} MB/s  raw {mbps['raw_up']:.0f} MB/s  "
              f"ratio {result['ratio_upload']:.2f}")
        print(f"download ours {mbps['ours_down']:.0f} MB/s  raw {mbps['raw_down']:.0f} MB/s  "
              f"ratio {result['ratio_download']:.2f}")
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")
    finally:
        srv.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
