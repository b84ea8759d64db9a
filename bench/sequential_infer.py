"""One request at a time against the README's server: the inference latency a user sees alone.

    python bench/sequential_infer.py [--app-root DIR] [--requests 8] [--model dfm_vlm_3d] [--image phantom_ct_00]

Starts the server of ``--app-root`` (default: this repository; give a worktree of another commit to compare two
versions in one session) on a temporary copy of ``sample_data``, sends ``--requests`` inferences one after
another, and prints each one's wall time and the ``infer`` latency MONAI Label reports, then their medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--app-root", default=str(ROOT), help="the repository whose app is served")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--model", default="dfm_vlm_3d")
    ap.add_argument("--image", default="phantom_ct_00")
    a = ap.parse_args()
    root = Path(a.app_root).resolve()
    sys.path.insert(0, str(root / "tests"))
    from server_utils import Server, copy_sample_data

    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        server = Server(str(copy_sample_data(work / "studies")), work, conf={"model_dir": work / "model"})
        try:
            walls, infers = [], []
            for _ in range(a.requests):
                t = time.perf_counter()
                r = requests.post(f"{server.url}/infer/{a.model}", params={"image": a.image, "output": "json"},
                                  data={"params": "{}"}, timeout=600)
                r.raise_for_status()
                walls.append(round(time.perf_counter() - t, 3))
                infers.append(r.json().get("latencies", {}).get("infer"))
        finally:
            server.stop()
    print(json.dumps({"app_root": str(root), "model": a.model, "image": a.image, "wall_s": walls,
                      "infer_s": infers, "wall_median_s": statistics.median(walls),
                      "infer_median_s": statistics.median(x for x in infers if x is not None)}))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from lib.cli import run_bench  # noqa: E402

    raise SystemExit(run_bench(main))
