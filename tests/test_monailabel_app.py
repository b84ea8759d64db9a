"""The MONAI Label app through a real server started as users start it, driven by MONAILabelClient."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException
from PIL import Image

from conftest import CXR, requires_cxr
from server_utils import ROOT, Server, copy_sample_data, process_group_alive

pytestmark = pytest.mark.server

SAMPLE_MODELS = ROOT / "sample_data" / "models"
needs_defaults = pytest.mark.skipif(not (SAMPLE_MODELS / "dfm_vlm_3d.pt").exists(),
                                    reason="sample_data/models has no default checkpoints (make_sample_data.py --train)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("mlserver")
    studies = copy_sample_data(work / "studies")
    s = Server(str(studies), work, conf={"model_dir": work / "model", "uncertainty_samples": 3})
    s.studies = studies
    s.model_dir = work / "model"
    yield s
    pgid = s.proc.pid
    s.stop()
    assert not process_group_alive(pgid), "server processes left running"


@pytest.fixture(scope="module")
def client(server):
    return MONAILabelClient(server.url, tmpdir=str(server.studies.parent / "client"))


def _infer(server, model, image, params=None, files=None):
    return requests.post(f"{server.url}/infer/{model}", params={"image": image, "output": "image"},
                         data={"params": json.dumps(params or {})}, files=files, timeout=600)


@needs_defaults
def test_info_lists_models_labels_parameters_and_strategies(client):
    info = client.info()
    assert set(info["models"]) == {"dfm_vlm_2d", "dfm_vlm_3d", "dfm_vlm_2d_interactive", "dfm_vlm_3d_interactive"}, \
        info.get("models_not_ready")
    for name, dim in (("dfm_vlm_2d_interactive", 2), ("dfm_vlm_3d_interactive", 3)):  # Slicer/OHIF point tools
        m = info["models"][name]
        assert m["type"] == "deepedit" and m["dimension"] == dim, m
        assert m["checkpoint"] == info["models"][name.replace("_interactive", "")]["checkpoint"]
    m3 = info["models"]["dfm_vlm_3d"]
    assert m3["labels"] == {"lesion": 1} and m3["dimension"] == 3 and m3["type"] == "segmentation"
    assert info["models"]["dfm_vlm_2d"]["labels"] == {"lung": 1}
    for key in ("sampler", "steps", "num_samples", "overlap", "sw_batch_size", "seed", "device"):
        assert key in m3["config"], key
    assert m3["config"]["sampler"][:1] == [m3["sampler_defaults"]["sampler"]]
    assert {"random", "first", "dfm_vlm_3d_uncertainty", "dfm_vlm_2d_uncertainty"} <= set(info["strategies"])
    assert {"dfm_vlm_3d_uncertainty", "dfm_vlm_2d_uncertainty"} <= set(info["scoring"])
    assert info["models_not_ready"] == {}


@needs_defaults
def test_infer_3d_returns_a_label_with_the_input_geometry(client, server):
    label_file, params = client.infer("dfm_vlm_3d", "phantom_ct_06", {"steps": 3, "num_samples": 2})
    img = nib.load(server.studies / "phantom_ct_06.nii.gz")
    lab = nib.load(label_file)
    assert lab.shape == img.shape
    assert np.allclose(lab.affine, img.affine, atol=1e-4), (lab.affine, img.affine)
    values = set(np.unique(np.asarray(lab.dataobj)).tolist())
    assert values <= {0, 1} and 1 in values
    assert params["steps"] == 3 and params["num_samples"] == 2 and "uncertainty" in params
    assert params["checkpoint"].endswith("dfm_vlm_3d.pt")


@needs_defaults
def test_bad_requests_get_clear_http_errors_and_the_server_keeps_serving(server):
    r = _infer(server, "dfm_vlm_3d", "no_such_image")
    assert r.status_code == 404 and "unknown image id 'no_such_image'" in r.json()["detail"]
    r = _infer(server, "no_such_model", "phantom_ct_06")
    assert r.status_code == 404 and "unknown model 'no_such_model'" in r.json()["detail"]
    r = _infer(server, "dfm_vlm_3d", "phantom_ct_06", {"steps": 0})
    assert r.status_code == 422 and "steps must be an integer >= 1" in r.json()["detail"]
    r = _infer(server, "dfm_vlm_3d", "phantom_ct_06", {"overlap": 2})
    assert r.status_code == 422 and "overlap must be in [0, 1)" in r.json()["detail"]
    r = _infer(server, "dfm_vlm_3d", "phantom_ct_06", {"sampler": "rk4"})
    assert r.status_code == 422 and "sampler must be one of" in r.json()["detail"]
    (server.studies / "corrupt_ct.nii.gz").write_bytes(b"\x1f\x8b\x08 definitely not a volume")
    deadline = time.time() + 30
    while time.time() < deadline:  # the datastore picks up new files by itself
        if "corrupt_ct" in requests.get(f"{server.url}/datastore/?output=all", timeout=30).json().get("objects", {}):
            break
        time.sleep(1)
    r = _infer(server, "dfm_vlm_3d", "corrupt_ct")
    assert r.status_code == 422 and "cannot read" in r.json()["detail"] and "corrupt_ct.nii.gz" in r.json()["detail"]
    for bad in ("../../../../etc/passwd", "/etc/passwd", "phantom_ct_06/../../x", "phantom_ct_06\x00"):
        r = _infer(server, "dfm_vlm_3d", bad)  # existing files of the server were read as images before
        assert r.status_code == 422 and "is not a plain name" in r.json()["detail"], (bad, r.status_code, r.text)
        r = _infer(server, "dfm_vlm_3d", "phantom_ct_06", {"image": bad})  # params override the image too
        assert r.status_code == 422 and "is not a plain name" in r.json()["detail"], (bad, r.status_code, r.text)
        r = requests.get(f"{server.url}/datastore/image", params={"image": bad}, timeout=30)
        assert r.status_code in (404, 422) and "root:" not in r.text, (bad, r.status_code, r.text[:300])
    r = requests.post(f"{server.url}/activelearning/no_such_strategy", json={}, timeout=30)
    assert r.status_code == 404 and "unknown strategy" in r.json()["detail"]
    assert server.alive()
    assert _infer(server, "dfm_vlm_3d", "phantom_ct_06", {"steps": 2}).status_code == 200
    (server.studies / "corrupt_ct.nii.gz").unlink()


@needs_defaults
def test_next_sample_serves_the_most_uncertain_unlabelled_image(client, server):
    ds = requests.get(f"{server.url}/datastore/?output=all", timeout=30).json()["objects"]
    unlabeled_3d = {k for k, v in ds.items() if not v.get("labels") and k.startswith("phantom_ct")}
    r = requests.post(f"{server.url}/scoring/dfm_vlm_3d_uncertainty", timeout=600)
    assert r.status_code == 200
    res = client.next_sample("dfm_vlm_3d_uncertainty", {})
    assert res["id"] in unlabeled_3d
    ds = requests.get(f"{server.url}/datastore/?output=all", timeout=30).json()["objects"]
    scores = {k: ds[k]["image"]["info"].get("dfm_vlm_3d_uncertainty") for k in unlabeled_3d}
    assert all(v is not None for v in scores.values()), scores
    assert res["id"] == max(scores, key=scores.get)
    for strategy in ("random", "first"):
        assert client.next_sample(strategy, {})["id"] in ds


def _wait_for_training(client, server, timeout: float = 900) -> dict:
    """Poll the full status until the task is DONE or ERROR (a fresh task is SUBMITTED before it is RUNNING)."""
    deadline = time.time() + timeout
    status = client.train_status()
    while time.time() < deadline and status["status"] not in ("DONE", "ERROR"):
        time.sleep(3)
        status = client.train_status()
    assert status["status"] == "DONE", f"{status}\n--- server log ---\n{server.tail(120)}"
    return status


@needs_defaults
def test_save_label_train_publish_and_infer_with_the_new_checkpoint(client, server):
    # an annotator saves a final label for an unlabelled volume (the phantom's truth, regenerated)
    sys_path = str(ROOT / "sample_data")
    import sys

    sys.path.insert(0, sys_path)
    try:
        from make_sample_data import ct_affine, ct_phantom
    finally:
        sys.path.remove(sys_path)
    _, truth = ct_phantom(7)
    lab_path = server.studies.parent / "phantom_ct_07_label.nii.gz"
    nib.save(nib.Nifti1Image(truth, ct_affine()), str(lab_path))
    client.save_label("phantom_ct_07", str(lab_path), tag="final")
    ds = requests.get(f"{server.url}/datastore/?output=all", timeout=30).json()["objects"]
    assert "final" in ds["phantom_ct_07"]["labels"]

    published = server.model_dir / "dfm_vlm_3d.pt"
    assert not published.exists()
    before = client.info()["models"]["dfm_vlm_3d"]["checkpoint"]
    client.train_start("dfm_vlm_3d", {"max_epochs": 2, "val_split": 0.34, "patches_per_image": 2})
    _wait_for_training(client, server)
    assert published.exists(), "training did not publish a checkpoint"
    info = client.info()
    after = info["models"]["dfm_vlm_3d"]["checkpoint"]
    assert after["path"] == str(published) and after["path"] != before["path"]
    stats = info["train_stats"]["dfm_vlm_3d"]
    assert stats["epoch"] == 2 and "val_mean_dice" in json.dumps(stats)
    import torch

    ck = torch.load(published, weights_only=True)
    assert ck["format"] == "dfm-vlm-checkpoint" and ck["hyper_parameters"]["model"]["vlm_film_decoder_stages"] == [0, 1, 2]
    # the sample model is click-trained: the MONAI Label trainer fine-tunes it with simulated clicks (train_loss)
    assert ck["hyper_parameters"]["clicks"]["enabled"] and ck["hyper_parameters"]["model"]["guidance_channels"] == 2
    _, params = client.infer("dfm_vlm_3d", "phantom_ct_05", {"steps": 2})
    assert params["checkpoint"] == str(published)
    # a second training run replaces the file atomically; the next request picks it up (no restart)
    mtime = published.stat().st_mtime
    client.train_start("dfm_vlm_3d", {"max_epochs": 1, "val_split": 0.34})
    _wait_for_training(client, server)
    assert published.stat().st_mtime > mtime
    assert client.info()["models"]["dfm_vlm_3d"]["checkpoint"]["modified_time"] == published.stat().st_mtime


@needs_defaults
@requires_cxr
def test_2d_model_infers_on_a_real_chest_xray(client, server):
    src = CXR / "images" / "MCUCXR_0001_0.png"
    label_file, params = client.infer("dfm_vlm_2d", "", {"steps": 2}, file=str(src))
    lab = np.asarray(Image.open(label_file))
    assert lab.shape == np.asarray(Image.open(src)).shape[:2]
    assert set(np.unique(lab).tolist()) <= {0, 1}


@needs_defaults
def test_a_bad_label_never_replaces_a_stored_one(client, server, tmp_path):
    """Observed: PUT /datastore/label with a body that is not an image answered 200 and replaced the good final
    label (and broke the next training); unknown or path-like ids answered 500."""
    import hashlib

    # phantom_ct_07 has a final label (saved by the training test, or here)
    labels = server.studies / "labels" / "final"
    stored = labels / "phantom_ct_07.nii.gz"
    if not stored.exists():
        img = nib.load(server.studies / "phantom_ct_07.nii.gz")
        good = tmp_path / "good.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), str(good))
        client.save_label("phantom_ct_07", str(good), tag="final")
    digest = hashlib.sha256(stored.read_bytes()).hexdigest()

    def put(image, path, tag="final"):
        with open(path, "rb") as f:
            return requests.put(f"{server.url}/datastore/label", params={"image": image, "tag": tag},
                                files={"label": (os.path.basename(path), f)}, timeout=60)

    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"this is not an image")
    r = put("phantom_ct_07", garbage)
    assert r.status_code == 422 and "not a readable image" in r.json()["detail"], r.text
    img = nib.load(server.studies / "phantom_ct_07.nii.gz")
    wrong_shape = tmp_path / "wrong.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), img.affine), str(wrong_shape))
    r = put("phantom_ct_07", wrong_shape)
    assert r.status_code == 422 and "shape" in r.json()["detail"], r.text
    not_a_map = tmp_path / "float.nii.gz"
    nib.save(nib.Nifti1Image(np.full(img.shape, 0.5, np.float32), img.affine), str(not_a_map))
    r = put("phantom_ct_07", not_a_map)
    assert r.status_code == 422 and "not a label map" in r.json()["detail"], r.text
    from test_hostile import _header_only

    r = put("phantom_ct_07", _header_only(tmp_path / "huge.nii.gz", (30000, 30000, 30000)))
    assert r.status_code == 422 and "more than this server's limit" in r.json()["detail"], r.text
    r = put("no_such_image", wrong_shape)
    assert r.status_code == 404 and "unknown image id" in r.json()["detail"], r.text
    for bad in ("../../../../evil", "a/b", "x" * 300, "phantom_ct_07\x00.nii.gz", "/etc/passwd"):
        r = put(bad, wrong_shape)
        assert r.status_code == 422 and "not a plain name" in r.json()["detail"], (bad, r.text)
    r = put("phantom_ct_07", wrong_shape, tag="../final")
    assert r.status_code == 422 and "label tag" in r.json()["detail"], r.text
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == digest, "a refused label changed the stored one"
    assert not any(p.name.startswith("evil") for p in server.studies.parent.rglob("*"))
    assert server.alive() and client.info()["models"]


@needs_defaults
@pytest.mark.parametrize("model, image, ext", [("dfm_vlm_3d_interactive", "phantom_ct_06", ".nii.gz"),
                                               ("dfm_vlm_2d_interactive", "phantom_xray_05", ".png")])
def test_clicks_through_monailabel_client_label_the_clicked_voxels(client, server, model, image, ext):
    """A user clicks: DeepEdit's label-name format and DeepGrow's foreground/background format, through the real
    server and MONAILabelClient; every clicked voxel comes back labelled as clicked; a bad point is a 422."""
    label_name = "lesion" if "3d" in model else "lung"
    auto_file, _ = client.infer(model.replace("_interactive", ""), image, {"steps": 2})
    auto = np.asarray(nib.load(auto_file).dataobj) if ext == ".nii.gz" else np.asarray(Image.open(auto_file)).T
    # PNG results come back as rows x columns; MONAI's (x, y) voxel indices are columns, rows
    fg = [list(map(int, p)) for p in np.argwhere(auto == 0)[::1999][:3]]
    bg = [list(map(int, p)) for p in np.argwhere(auto == 1)[::499][:2]]
    for n, params in enumerate(({label_name: fg, "background": bg}, {"foreground": fg, "background": bg})):
        label_file, res = client.infer(model, image, {"steps": 2, **params})
        lab = np.asarray(nib.load(label_file).dataobj) if ext == ".nii.gz" else np.asarray(Image.open(label_file)).T
        assert lab.shape == auto.shape
        assert all(lab[tuple(p)] == 1 for p in fg) and all(lab[tuple(p)] == 0 for p in bg), (params, res)
        assert res["clicks"] == {"foreground": len(fg), "background": len(bg)}
        # the same clicks in the other format: every window comes from the task's window cache
        assert (0 < res["windows_rerun"] <= res["windows"]) if n == 0 else res["windows_rerun"] == 0, res
    bad = [9999] * (3 if ext == ".nii.gz" else 2)
    r = _infer(server, model, image, {"foreground": [bad]})
    assert r.status_code == 422 and f"foreground[0] = {bad}" in r.json()["detail"] and "outside" in r.json()["detail"]
    r = _infer(server, model, image, {"foreground": [["a"] + [1] * (len(bad) - 1)]})
    assert r.status_code == 422 and "not a finite number" in r.json()["detail"]
    assert server.alive()


def test_two_annotators_saving_one_image_at_once_leave_one_whole_label(server, tmp_path):
    """Concurrent PUT /datastore/label on one image: both answered, the stored file is exactly one of the two (MONAI
    Label's datastore lock serialises the copies), and it is listed."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    img = nib.load(server.studies / "phantom_ct_03.nii.gz")
    bodies = []
    for k in range(2):
        lab = np.zeros(img.shape, np.uint8)
        lab[k::2] = 1  # two different label maps
        p = tmp_path / f"annotator{k}.nii.gz"
        nib.save(nib.Nifti1Image(lab, img.affine), str(p))
        bodies.append(p.read_bytes())
    digests = {hashlib.sha256(b).hexdigest() for b in bodies}

    def put(k):
        return requests.put(f"{server.url}/datastore/label", params={"image": "phantom_ct_03", "tag": "concurrent"},
                            files={"label": (f"annotator{k}.nii.gz", bodies[k])}, timeout=120).status_code

    stored = server.studies / "labels" / "concurrent" / "phantom_ct_03.nii.gz"
    for _ in range(3):
        with ThreadPoolExecutor(2) as pool:
            assert list(pool.map(put, (0, 1))) == [200, 200]
        assert hashlib.sha256(stored.read_bytes()).hexdigest() in digests
    ds = requests.get(f"{server.url}/datastore/?output=all", timeout=30).json()["objects"]
    assert "concurrent" in ds["phantom_ct_03"]["labels"]
