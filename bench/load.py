"""N concurrent clients against one MONAI Label server started as the README starts it (loopback only).

    python bench/load.py [--clients 20] [--requests 5] [--while-training] [--out bench/results/load.json]

The server serves a temporary copy of ``sample_data`` with the shipped checkpoints. Each client sends ``--requests``
requests, rotating through: 3D infer, 2D infer, ``next_sample``, ``save_label`` (a valid label, its own tag) and
``/info``. Every infer answer is compared voxel for voxel with the single-request answer for the same image and
seed (taken first, one request at a time). Reports p50/p95/max latency per kind, errors (any status >= 400), the
server's peak RSS (its process tree) and the wall time. ``--while-training`` starts ``POST /train/dfm_vlm_2d``
first and keeps it running during the load.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import requests
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from server_utils import Server, copy_sample_data  # noqa: E402

PARAMS = {"steps": 2, "num_samples": 1, "seed": 7}


def infer(url, model, image):
    t = time.perf_counter()
    r = requests.post(f"{url}/infer/{model}", params={"image": image, "output": "image"},
                      data={"params": json.dumps(PARAMS)}, timeout=1800)
    return r, time.perf_counter() - t


def decode(content: bytes, suffix: str) -> np.ndarray:
    with tempfile.NamedTemporaryFile(suffix=suffix) as f:
        f.write(content)
        f.flush()
        if suffix == ".png":
            from PIL import Image

            return np.asarray(Image.open(f.name))
        import nibabel as nib

        return np.asarray(nib.load(f.name).dataobj)


def percentile(v, q):
    return float(np.percentile(v, q)) if v else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--while-training", action="store_true")
    ap.add_argument("--out", default="runs/bench/load.json")
    a = ap.parse_args()
    if a.clients * a.requests > 1000:
        sys.exit("at most 1000 requests")
    work = Path(tempfile.mkdtemp(prefix="dfm_load_"))
    studies = copy_sample_data(work / "studies")
    t0 = time.perf_counter()
    # its own model folder: a training started here must not publish into the app's (monailabel_app/model)
    server = Server(str(studies), work, conf={"model_dir": work / "model"})
    url = server.url
    peak = {"rss": 0}
    stop = threading.Event()

    def watch():
        p = psutil.Process(server.proc.pid)
        while not stop.is_set():
            try:
                procs = [p] + p.children(recursive=True)
                peak["rss"] = max(peak["rss"], sum(q.memory_info().rss for q in procs if q.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()
    try:
        objects = requests.get(f"{url}/datastore/?output=all", timeout=60).json()["objects"]
        ids3d = sorted(i for i in objects if i.startswith("phantom_ct"))[:2]
        ids2d = sorted(i for i in objects if objects[i]["image"]["ext"] == ".png")[:2]
        # single-request answers first
        ref = {}
        for model, ids, suffix in (("dfm_vlm_3d", ids3d, ".nii.gz"), ("dfm_vlm_2d", ids2d, ".png")):
            for i in ids:
                r, dt = infer(url, model, i)
                r.raise_for_status()
                ref[i] = (decode(r.content, suffix), dt)
        single = {k: round(v[1], 2) for k, v in ref.items()}
        label_src = work / "label2d.png"
        from PIL import Image

        Image.fromarray(ref[ids2d[0]][0].astype(np.uint8)).save(label_src)
        training = None
        if a.while_training:
            training = requests.post(f"{url}/train/dfm_vlm_2d", json={"max_epochs": 1000, "val_split": 0.2},
                                     timeout=60).status_code
            time.sleep(5)

        def one(client: int, k: int):
            kind = ("infer3d", "infer2d", "next_sample", "save_label", "info")[(client + k) % 5]
            t = time.perf_counter()
            mismatch = None
            if kind == "infer3d":
                img = ids3d[(client + k) % len(ids3d)]
                r, _ = infer(url, "dfm_vlm_3d", img)
                if r.ok:
                    mismatch = int((decode(r.content, ".nii.gz") != ref[img][0]).sum())
            elif kind == "infer2d":
                img = ids2d[(client + k) % len(ids2d)]
                r, _ = infer(url, "dfm_vlm_2d", img)
                if r.ok:
                    mismatch = int((decode(r.content, ".png") != ref[img][0]).sum())
            elif kind == "next_sample":
                r = requests.post(f"{url}/activelearning/random", json={}, timeout=1800)
            elif kind == "save_label":
                with open(label_src, "rb") as f:
                    r = requests.put(f"{url}/datastore/label", params={"image": ids2d[0], "tag": f"load_{client}_{k}"},
                                     files={"label": ("label.png", io.BytesIO(f.read()))}, timeout=1800)
            else:
                r = requests.get(f"{url}/info/", timeout=1800)
            return {"kind": kind, "status": r.status_code, "seconds": time.perf_counter() - t, "mismatch": mismatch,
                    "error": r.text[:300] if r.status_code >= 400 else None}

        t_load = time.perf_counter()
        with ThreadPoolExecutor(a.clients) as pool:
            futures = [pool.submit(lambda c=c: [one(c, k) for k in range(a.requests)]) for c in range(a.clients)]
            results = [r for f in futures for r in f.result()]
        load_wall = time.perf_counter() - t_load
        train_state = None
        if a.while_training:
            train_state = requests.get(f"{url}/train/", timeout=60).json()
            requests.delete(f"{url}/train/", timeout=60)
        alive = server.alive()
    finally:
        stop.set()
        server.stop()
    rows = {}
    for kind in ("infer3d", "infer2d", "next_sample", "save_label", "info"):
        v = [r["seconds"] for r in results if r["kind"] == kind]
        rows[kind] = {"n": len(v), "p50": percentile(v, 50), "p95": percentile(v, 95), "max": max(v) if v else None,
                      "errors": sum(r["status"] >= 400 for r in results if r["kind"] == kind),
                      "mismatching_voxels": sum(r["mismatch"] or 0 for r in results if r["kind"] == kind)}
    report = {"command": "python " + " ".join(sys.argv), "cpu": torch.backends.cpu.get_cpu_capability(),
              "cores": os.cpu_count(), "platform": platform.platform(), "clients": a.clients,
              "requests_per_client": a.requests, "while_training": a.while_training, "training_post": training,
              "training_status_after": (train_state or {}).get("status") if isinstance(train_state, dict) else None,
              "single_request_seconds": single, "load_wall_seconds": round(load_wall, 1),
              "total_wall_seconds": round(time.perf_counter() - t0, 1), "server_peak_rss_MiB": peak["rss"] >> 20,
              "server_alive_after": alive, "infer_concurrency": os.environ.get("MONAI_LABEL_INFER_CONCURRENCY", "-1"),
              "rows": rows, "errors": sorted({f"{r['kind']} {r['status']}: {r['error']}" for r in results
                                              if r["error"]})}
    print(f"{report['command']}\nCPU {report['cpu']}, {report['cores']} cores; {a.clients} clients x {a.requests} "
          f"requests in {load_wall:.1f} s; server peak RSS {report['server_peak_rss_MiB']} MiB; alive {alive}")
    print(f"single-request seconds: {single}")
    print(f"{'kind':12} {'n':>3} {'p50 s':>8} {'p95 s':>8} {'max s':>8} {'errors':>6} {'mismatch':>8}")
    for k, r in rows.items():
        if r["n"]:
            print(f"{k:12} {r['n']:3d} {r['p50']:8.2f} {r['p95']:8.2f} {r['max']:8.2f} {r['errors']:6d} "
                  f"{r['mismatching_voxels']:8d}")
    for e in report["errors"]:
        print("error:", e)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
