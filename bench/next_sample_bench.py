"""How long Next Sample holds the server after a training published a checkpoint (every uncertainty score stale).

    python bench/next_sample_bench.py [--copies 3] [--budgets 1e9 10 0] [--repeats 2] [--out FILE]

MONAI Label runs a strategy on the server's event loop: while Next Sample scores images, no other request is
answered. The server (started as the README starts it, on a temporary copy of ``sample_data`` with the shipped 3D
checkpoint, MONAI Label's background scoring off so that nothing else runs) serves ``--copies`` copies of each
unlabelled sample volume. For each ``scoring_s`` budget (``1e9``: no budget, every stale image scored inside the
request, as before 2026-12-06), the checkpoint's file time is moved (a publish), ``POST
/activelearning/dfm_vlm_3d_uncertainty`` is sent, and 0.3 s later ``GET /info/``: the bench reports how long each
took, and how many images the answer ranked and left pending. Budgets alternate within each repeat, in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from server_utils import Server, copy_sample_data  # noqa: E402

STRATEGY = "dfm_vlm_3d_uncertainty"


def publish(path: Path) -> None:
    t = os.stat(path).st_mtime_ns + 10 ** 9
    os.utime(path, ns=(t, t))


def one(server: Server, ckpt: Path, budget: float) -> dict:
    publish(ckpt)
    out = {}

    def next_sample():
        t0 = time.perf_counter()
        r = requests.post(f"{server.url}/activelearning/{STRATEGY}", json={"scoring_s": budget}, timeout=1800)
        out["next_sample_s"] = time.perf_counter() - t0
        out["status"] = r.status_code
        body = r.json() if r.ok else {}
        out["ranked"], out["pending"] = body.get(f"{STRATEGY}_ranked"), body.get(f"{STRATEGY}_pending")

    th = threading.Thread(target=next_sample)
    th.start()
    time.sleep(0.3)
    t0 = time.perf_counter()
    requests.get(f"{server.url}/info/", timeout=1800)
    out["info_s"] = time.perf_counter() - t0
    th.join()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=3, help="copies of each unlabelled sample volume (>= 1)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[1e9, 10.0, 0.0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="runs/bench/next_sample.json")
    a = ap.parse_args(argv)
    if a.copies < 1 or a.repeats < 1 or any(not 0 <= b < float("inf") for b in a.budgets):  # (before a server starts)
        ap.error(f"--copies and --repeats must be >= 1 and --budgets finite numbers >= 0; got {a.copies}, {a.repeats}, "
                 f"{a.budgets}")
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        studies = copy_sample_data(work / "studies")
        labelled = {p.name for p in (studies / "labels" / "final").iterdir()}
        pool = [p for p in studies.glob("phantom_ct_*.nii.gz") if p.name not in labelled]
        for p in pool:
            for c in range(1, a.copies):
                shutil.copy2(p, p.with_name(p.name.replace(".nii.gz", f"_copy{c}.nii.gz")))
        models = work / "models"  # the shipped checkpoint and its VLM folder, whose file time a "publish" moves
        shutil.copytree(ROOT / "sample_data" / "models" / "vlm", models / "vlm")
        ckpt = models / "dfm_vlm_3d.pt"
        shutil.copy2(ROOT / "sample_data" / "models" / "dfm_vlm_3d.pt", ckpt)
        server = Server(str(studies), work, conf={"models": "dfm_vlm_3d", "dfm_vlm_3d_checkpoint": ckpt,
                                                   "model_dir": work / "model"})
        try:
            one(server, ckpt, 1e9)  # warm-up: every image scored once, the model loaded
            runs = {b: [] for b in a.budgets}
            for _ in range(a.repeats):
                for b in a.budgets:
                    r = one(server, ckpt, b)
                    runs[b].append(r)
                    print(json.dumps({"scoring_s": b, **{k: round(v, 2) if isinstance(v, float) else v
                                                         for k, v in r.items()}}), flush=True)
        finally:
            server.stop()
    res = {"command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
           "unlabelled_volumes": len(pool) * a.copies, "wall_seconds": round(time.perf_counter() - t_all, 1),
           "budgets": {str(b): {"info_s_median": round(statistics.median(x["info_s"] for x in v), 2),
                                "next_sample_s_median": round(statistics.median(x["next_sample_s"] for x in v), 2),
                                "ranked": [x["ranked"] for x in v], "pending": [x["pending"] for x in v]}
                       for b, v in runs.items()}}
    print(json.dumps(res, indent=1))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lib.cli import run_bench  # noqa: E402

    raise SystemExit(run_bench(main))
