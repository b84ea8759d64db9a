"""N concurrent clients against one MONAI Label server started as the README starts it (loopback only).

    python bench/load.py [--clients 20] [--requests 5] [--while-training] [--out bench/results/load.json]

The server serves a temporary copy of ``sample_data`` with the shipped checkpoints. Each client sends ``--requests``
requests, rotating through: 3D infer, 2D infer, ``next_sample``, ``save_label`` (a valid label, its own tag) and
``/info``. Every infer answer names the checkpoint that answered it (``checkpoint_sha256``) and is compared voxel
for voxel with the single-request answer of that checkpoint for the same image and seed (taken one request at a
time: first for the served checkpoints; after the load for each checkpoint a training published meanwhile, put back
in place one by one -- a watcher keeps a copy of every version). Reports p50/p95/max latency per kind, errors (any
status >= 400), the server's peak RSS (its process tree) and the wall time. ``--while-training`` starts
``POST /train/dfm_vlm_2d`` first and keeps it running during the load.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
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


class Answer:
    """An infer answer (``output=all``: the label file and the result parameters, as MONAILabelClient reads it)."""

    def __init__(self, status: int, content: bytes | None, params: dict | None, text: str):
        self.status_code, self.content, self.params, self.text = status, content, params or {}, text
        self.ok = status == 200 and content is not None

    @property
    def checkpoint(self) -> str | None:
        return self.params.get("checkpoint_sha256")


def infer(url, model, image):
    from monailabel.client.client import MONAILabelUtils

    t = time.perf_counter()
    status, form, files, _ = MONAILabelUtils.http_multipart(
        "POST", url, f"/infer/{model}?image={image}&output=all", {"params": json.dumps(PARAMS)}, {})
    dt = time.perf_counter() - t
    if status != 200 or not files:
        text = form.decode(errors="replace") if isinstance(form, bytes) else str(form)
        return Answer(status if status != 200 else 599, None, None, text), dt
    form = json.loads(form) if isinstance(form, str) else form
    params = form.get("params")
    return Answer(status, next(iter(files.values())), json.loads(params) if isinstance(params, str) else params,
                  ""), dt


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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--while-training", action="store_true")
    ap.add_argument("--out", default="runs/bench/load.json")
    ap.add_argument("--workers", type=int, default=None, help="start_server --workers N (N server processes)")
    ap.add_argument("--infer-concurrency", type=int, default=None,
                    help="MONAI_LABEL_INFER_CONCURRENCY=N (inference in a pool of N threads; -1: MONAI Label's "
                         "default, in the request)")
    a = ap.parse_args(argv)
    if a.clients < 1 or a.requests < 1:  # (a ValueError from the thread pool)
        ap.error(f"--clients and --requests must be >= 1, got {a.clients} and {a.requests}")
    if a.clients * a.requests > 1000:
        sys.exit("at most 1000 requests")
    work = Path(tempfile.mkdtemp(prefix="dfm_load_"))
    studies = copy_sample_data(work / "studies")
    t0 = time.perf_counter()
    # its own model folder: a training started here must not publish into the app's (monailabel_app/model)
    env = {} if a.infer_concurrency is None else {"MONAI_LABEL_INFER_CONCURRENCY": str(a.infer_concurrency)}
    server = Server(str(studies), work, conf={"model_dir": work / "model"}, env=env,
                    args=("--workers", a.workers) if a.workers else ())
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
    versions = work / "versions"  # every checkpoint version the server could serve, by sha256
    versions.mkdir()

    def keep_versions():
        """Copy each new version of the published checkpoints (an open file keeps its version whatever replaces
        it) so that its single-request answers can be taken after the load."""
        seen = {}
        while not stop.is_set():
            for f in (work / "model").glob("*.pt"):
                try:
                    m = f.stat().st_mtime
                    if seen.get(f.name) != m:
                        with open(f, "rb") as src:
                            data = src.read()
                        digest = hashlib.sha256(data).hexdigest()
                        (versions / f"{f.stem}.{digest}.pt").write_bytes(data)
                        seen[f.name] = m
                except OSError:
                    pass
            time.sleep(0.05)

    threading.Thread(target=keep_versions, daemon=True).start()
    ref = {}  # (image, checkpoint sha256) -> the single-request answer
    try:
        objects = requests.get(f"{url}/datastore/?output=all", timeout=60).json()["objects"]
        ids3d = sorted(i for i in objects if i.startswith("phantom_ct"))[:2]
        ids2d = sorted(i for i in objects if objects[i]["image"]["ext"] == ".png")[:2]
        kinds = {"dfm_vlm_3d": (ids3d, ".nii.gz"), "dfm_vlm_2d": (ids2d, ".png")}
        # single-request answers first (the served checkpoints)
        single, served = {}, {}
        for model, (ids, suffix) in kinds.items():
            for i in ids:
                r, dt = infer(url, model, i)
                assert r.ok, r.text
                ref[(i, r.checkpoint)] = decode(r.content, suffix)
                single[i], served[model] = round(dt, 2), r.checkpoint
        label_src = work / "label2d.png"
        from PIL import Image

        Image.fromarray(ref[(ids2d[0], served["dfm_vlm_2d"])].astype(np.uint8)).save(label_src)
        training = None
        if a.while_training:
            training = requests.post(f"{url}/train/dfm_vlm_2d", json={"max_epochs": 1000, "val_split": 0.2},
                                     timeout=60).status_code
            time.sleep(5)

        def one(client: int, k: int):
            kind = ("infer3d", "infer2d", "next_sample", "save_label", "info")[(client + k) % 5]
            t = time.perf_counter()
            answer = None
            if kind in ("infer3d", "infer2d"):
                model = "dfm_vlm_3d" if kind == "infer3d" else "dfm_vlm_2d"
                ids, suffix = kinds[model]
                img = ids[(client + k) % len(ids)]
                r, _ = infer(url, model, img)
                if r.ok:
                    answer = (model, img, r.checkpoint, decode(r.content, suffix))
            elif kind == "next_sample":
                r = requests.post(f"{url}/activelearning/random", json={}, timeout=1800)
            elif kind == "save_label":
                with open(label_src, "rb") as f:
                    r = requests.put(f"{url}/datastore/label", params={"image": ids2d[0], "tag": f"load_{client}_{k}"},
                                     files={"label": ("label.png", io.BytesIO(f.read()))}, timeout=1800)
            else:
                r = requests.get(f"{url}/info/", timeout=1800)
            return {"kind": kind, "status": r.status_code, "seconds": time.perf_counter() - t, "answer": answer,
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
            deadline = time.time() + 120
            while time.time() < deadline and requests.get(f"{url}/train/", timeout=60).json().get("status") \
                    == "RUNNING":
                time.sleep(1)
            time.sleep(1)
        # the single-request answers of every other checkpoint that answered: each version put back in place
        # (atomically, as a training publishes), then one request at a time
        wanted = {}
        for r in results:
            if r["answer"] and (r["answer"][1], r["answer"][2]) not in ref:
                wanted.setdefault((r["answer"][0], r["answer"][2]), set()).add(r["answer"][1])
        stop.set()
        for (model, digest), images in sorted(wanted.items()):
            kept = versions / f"{model}.{digest}.pt"
            if not kept.exists():
                continue  # the watcher missed it: its answers are counted as unverified
            published = work / "model" / f"{model}.pt"
            tmp = published.with_name(f".{model}.restore")
            shutil.copyfile(kept, tmp)
            os.replace(tmp, published)
            for img in sorted(images):
                r, _ = infer(url, model, img)
                if r.ok and r.checkpoint == digest:
                    ref[(img, digest)] = decode(r.content, kinds[model][1])
        alive = server.alive()
    finally:
        stop.set()
        server.stop()
    for r in results:
        ans = r.pop("answer")
        r["checkpoint"] = ans[2] if ans else None
        reference = ref.get((ans[1], ans[2])) if ans else None
        r["mismatch"] = None if reference is None else int((ans[3] != reference).sum())
        r["unverified"] = bool(ans) and reference is None
    rows = {}
    for kind in ("infer3d", "infer2d", "next_sample", "save_label", "info"):
        v = [r["seconds"] for r in results if r["kind"] == kind]
        rows[kind] = {"n": len(v), "p50": percentile(v, 50), "p95": percentile(v, 95), "max": max(v) if v else None,
                      "errors": sum(r["status"] >= 400 for r in results if r["kind"] == kind),
                      "mismatching_voxels": sum(r["mismatch"] or 0 for r in results if r["kind"] == kind),
                      "checkpoints": len({r["checkpoint"] for r in results if r["kind"] == kind and r["checkpoint"]}),
                      "unverified": sum(r["unverified"] for r in results if r["kind"] == kind)}
    concurrency = env.get("MONAI_LABEL_INFER_CONCURRENCY", os.environ.get("MONAI_LABEL_INFER_CONCURRENCY", "-1"))
    report = {"command": "python " + " ".join(sys.argv), "cpu": torch.backends.cpu.get_cpu_capability(),
              "cores": os.cpu_count(), "platform": platform.platform(), "clients": a.clients,
              "requests_per_client": a.requests, "while_training": a.while_training, "training_post": training,
              "training_status_after": (train_state or {}).get("status") if isinstance(train_state, dict) else None,
              "single_request_seconds": single, "load_wall_seconds": round(load_wall, 1),
              "total_wall_seconds": round(time.perf_counter() - t0, 1), "server_peak_rss_MiB": peak["rss"] >> 20,
              "server_alive_after": alive, "infer_concurrency": concurrency,
              "workers": a.workers or 1,
              "rows": rows, "errors": sorted({f"{r['kind']} {r['status']}: {r['error']}" for r in results
                                              if r["error"]})}
    print(f"{report['command']}\nCPU {report['cpu']}, {report['cores']} cores; server workers {report['workers']}, "
          f"infer concurrency {report['infer_concurrency']}; {a.clients} clients x {a.requests} requests in "
          f"{load_wall:.1f} s; server peak RSS {report['server_peak_rss_MiB']} MiB; alive {alive}")
    print(f"single-request seconds: {single}")
    print(f"{'kind':12} {'n':>3} {'p50 s':>8} {'p95 s':>8} {'max s':>8} {'errors':>6} {'mismatch':>8} "
          f"{'checkpoints':>11} {'unverified':>10}")
    for k, r in rows.items():
        if r["n"]:
            print(f"{k:12} {r['n']:3d} {r['p50']:8.2f} {r['p95']:8.2f} {r['max']:8.2f} {r['errors']:6d} "
                  f"{r['mismatching_voxels']:8d} {r['checkpoints']:11d} {r['unverified']:10d}")
    for e in report["errors"]:
        print("error:", e)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lib.cli import run_bench  # noqa: E402

    raise SystemExit(run_bench(main))
