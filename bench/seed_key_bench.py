"""What seeding a session's image by its content costs per request (``lib.infers.dfm_vlm.seed_key``): the first
request of a session hashes the file, later clicks on the same unchanged file reuse the digest.

    python bench/seed_key_bench.py --mib 100 --repeats 10
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lib.infers.dfm_vlm as infers  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=100, help="size of the image file (a compressed CT series: ~100 MiB)")
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args(argv)
    if a.mib < 1 or a.repeats < 1:  # (a traceback from os.urandom / a division by zero)
        ap.error(f"--mib and --repeats must be >= 1, got {a.mib} and {a.repeats}")
    with tempfile.TemporaryDirectory() as store:
        infers.session_store = lambda: os.path.realpath(store)  # a session store of this bench's own
        os.makedirs(os.path.join(store, "session"))
        path = os.path.join(store, "session", "image.nii.gz")
        with open(path, "wb") as f:
            f.write(os.urandom(a.mib * 2**20))
        t = time.perf_counter()
        infers.seed_key(path)
        first = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(a.repeats):
            infers.seed_key(path)
        later = (time.perf_counter() - t) / a.repeats
    print(f"seed_key of a {a.mib} MiB session image: first request {first * 1000:.1f} ms, each later click "
          f"{later * 1000:.3f} ms (mean of {a.repeats})")
    return 0


if __name__ == "__main__":
    from lib.cli import run_bench  # noqa: E402

    raise SystemExit(run_bench(main))
