"""What seeding by content costs per request (``lib.transforms.content_key``, in every caller's preprocessing): the
digest of an image's voxels (float32) as loaded and oriented, once per request (every click re-reads the image).

    python bench/seed_key_bench.py --mib 143 --repeats 5

143 MiB: a BraTS case as the 3D model loads it (4 x 240 x 240 x 155 float32); a 512² X-ray is 1 MiB.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lib.transforms import content_key  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=143, help="size of the image's voxels in float32 (BraTS: 143 MiB)")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    if a.mib < 1 or a.repeats < 1:  # (a traceback from an empty array / a division by zero)
        ap.error(f"--mib and --repeats must be >= 1, got {a.mib} and {a.repeats}")
    image = torch.from_numpy(np.random.default_rng(0).random(a.mib * 2**18, dtype=np.float32))
    t = time.perf_counter()
    for _ in range(a.repeats):
        content_key(image)
    each = (time.perf_counter() - t) / a.repeats
    print(f"content_key of a {a.mib} MiB image: {each * 1000:.1f} ms per request (mean of {a.repeats})")
    return 0


if __name__ == "__main__":
    from lib.cli import run_bench  # noqa: E402

    raise SystemExit(run_bench(main))
