"""Faults: kill -9 in the middle of a training, --resume, a disk that fills up while a checkpoint is written."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, tiny_hparams
from lib.checkpoint import CheckpointError, atomic_torch_save, load_checkpoint
from lib.config import ConfigError, HParams, TrainConfig
from lib.training import build_system, load_train_state
from lib.cli import main as cli
from test_inputs_evaluation import _phantom_datalist


def _train_cmd(preset, datalist, out, *extra):
    return [sys.executable, "-m", "lib", "train", "--preset", str(preset), "--datalist", str(datalist), "--out",
            str(out), "--max-iterations", "20", "--no-progress", *extra]


def write_run_files(tmp_path, clip, state_every_it=4, ema_decay=0.0, hard_share=0.0, clicks=False):
    hp = tiny_hparams(clip, spacing=[1.0, 1.0])
    hp.clicks.enabled = clicks  # simulated clicks: random and corrective (predictions of the model being trained)
    hp.clicks.corrective_prob = 0.5
    hp.train.augment = True  # random crops, flips, intensities: their streams must resume (and shard) too
    hp.train.state_every_it = state_every_it
    hp.train.ema_decay = ema_decay
    hp.train.hard_share = hard_share
    preset = tmp_path / "preset.json"
    preset.write_text(json.dumps(hp.to_dict()))
    return preset, _phantom_datalist(tmp_path)


@pytest.fixture
def run_files(tmp_path, tiny_clip):
    # with a weight average, whose state must resume too (the checkpoints hold the averaged weights), and hard-image
    # sampling, whose difficulties choose the next batches: they must resume too
    return write_run_files(tmp_path, tiny_clip, ema_decay=0.8, hard_share=0.5)


def test_kill_9_then_resume_continues_the_loss_curve(tmp_path, run_files):
    preset, datalist = run_files
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    a = subprocess.run(_train_cmd(preset, datalist, tmp_path / "a"), cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert a.returncode == 0, a.stderr[-2000:]
    killed = subprocess.run(_train_cmd(preset, datalist, tmp_path / "b"), cwd=ROOT, capture_output=True, text=True,
                            env=dict(env, DFM_TEST_SIGKILL_AT_ITERATION="10"), timeout=300)
    assert killed.returncode == -signal.SIGKILL
    b = tmp_path / "b"
    # what the kill left: the last complete state (iteration 8: states every 4), no partial file beside it
    assert load_train_state(b / "resume.pt")["iteration"] == 8
    assert not [p.name for p in b.iterdir() if p.name.endswith(".tmp")]
    with open(b / "losses.csv", "a") as f:  # the buffer flushed by the kernel cut row "11,0.5..." after its "1"
        f.write("1")
    r = subprocess.run(_train_cmd(preset, datalist, b, "--resume"), cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed" in r.stderr
    curve_a = (tmp_path / "a" / "losses.csv").read_text().splitlines()
    curve_b = (b / "losses.csv").read_text().splitlines()
    assert len(curve_a) == 21 and curve_b == curve_a  # iterations 1..20, the same losses to 6 decimals
    # a finished run resumed: nothing to do, no second final validation appended to its history
    history = (b / "history.json").read_text()
    again = subprocess.run(_train_cmd(preset, datalist, b, "--resume"), cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (b / "history.json").read_text() == history and (b / "losses.csv").read_text().splitlines() == curve_a
    for name in ("best.pt", "last.pt"):
        assert load_checkpoint(b / name).metrics["iteration"] == 20
    # the served weights are the average, resumed with the rest: the same as the uninterrupted run's, not the raw ones
    state = load_train_state(b / "resume.pt")
    served = load_checkpoint(b / "last.pt").model.state_dict()
    uninterrupted = load_checkpoint(tmp_path / "a" / "last.pt").model.state_dict()
    for k, v in served.items():
        assert torch.allclose(v, uninterrupted[k], atol=1e-6), k
        assert torch.equal(v, state["averaged"]["module." + k]), k
    raw = state["model"]
    torch.manual_seed(0)  # the run's seed: its initial weights
    initial = build_system(HParams.from_file(preset)).model.state_dict()

    def dist(x, y):
        return sum(float((x[k].float() - y[k].float()).norm() ** 2) for k in served) ** 0.5

    # an average of the last few iterations (decay 0.8): near the raw weights, not the initial ones, not equal to either
    assert 0 < dist(served, raw) < 0.25 * dist(initial, raw), (dist(served, raw), dist(initial, raw))


def test_weight_average_of_a_batch_norm_network_copies_its_integer_buffers():
    """A review: with ``model.norm=batch`` and ``train.ema_decay`` > 0 the second step raised ("lerp_kernel_scalar"
    not implemented for 'Long': batch norm's ``num_batches_tracked``). Integer buffers are copied, the floating
    ones averaged."""
    from lib.config import ModelConfig
    from lib.network import ConditionalUNet
    from lib.training import weight_average

    torch.manual_seed(0)
    model = ConditionalUNet(ModelConfig(features=(8, 16), time_embed_dim=8, norm="batch").resolved())
    avg = weight_average(model, 0.5)
    counts = [n for n, b in model.named_buffers() if not b.is_floating_point()]
    assert counts  # (batch norm's)
    for step in range(1, 4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
            for n, b in model.named_buffers():
                b.fill_(step * 7) if not b.is_floating_point() else b.add_(1.0)
        avg.update_parameters(model)
    averaged = dict(avg.module.named_buffers())
    assert all(int(averaged[n].max()) == 21 for n in counts)  # the current count
    p_now, p_avg = next(model.parameters()), next(avg.module.parameters())
    assert 0 < float((p_now - p_avg).abs().min())  # the weights averaged, not copied


def test_weight_average_decay_outside_0_1_is_refused():
    for bad in (1.0, 1.5, -0.1):  # 1 would never move from the initial weights; < 0 extrapolates past the current
        with pytest.raises(ConfigError, match=r"train\.ema_decay must be in \[0, 1\)"):
            HParams(train=TrainConfig(ema_decay=bad)).resolved()
    assert HParams(train=TrainConfig(ema_decay=0.999)).resolved().train.ema_decay == 0.999


def test_resume_refuses_what_it_cannot_continue(tmp_path, run_files, tiny_clip, capsys):
    import shutil

    from lib.vlm import make_tiny_clip

    preset, datalist = run_files
    out = tmp_path / "run"
    assert cli(["train", "--preset", str(preset), "--datalist", str(datalist), "--out", str(out),
                "--max-iterations", "4", "--no-progress", "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert cli(["train", "--preset", str(preset), "--datalist", str(datalist), "--out", str(out),
                "--max-iterations", "4", "--no-progress"]) == 0
    recorded = {n: (out / n).read_text() for n in ("hparams.json", "machine.json")}
    assert cli(["train", "--preset", str(preset), "--datalist", str(datalist), "--out", str(out),
                "--max-iterations", "4", "--no-progress", "--resume", "--set", "train.lr=0.01"]) == 2
    assert "differ: train.lr" in capsys.readouterr().err
    from lib.training import hparams_differences  # a list section by its name (was "structures.None", a review)

    assert hparams_differences({"structures": [{"name": "a"}], "train": {"lr": 1}, "old": 1},
                               {"structures": [{"name": "b"}], "train": {"lr": 2}}) == ["old", "structures", "train.lr"]
    # the refused resume wrote its rejected settings into the run's hparams.json (a review, 2026-12-07)
    assert {n: (out / n).read_text() for n in recorded} == recorded
    assert cli(["train", "--preset", str(preset), "--datalist", str(datalist), "--out", str(out),
                "--max-iterations", "8", "--no-progress", "--resume"]) == 2
    err = capsys.readouterr().err  # as given (it named the preset's unused budget: "budget 2400.0 s")
    assert "a run of --max-iterations 4 (no --minutes); this command asks for --max-iterations 8" in err, err
    # the same VLM in another folder (another node, a moved cache) resumes (a review: refused, "differ:
    # vlm.name_or_path"); another VLM of the same size does not
    moved = shutil.copytree(tiny_clip, tmp_path / "moved-clip")
    other = make_tiny_clip(tmp_path / "other-clip", image_size=32, hidden=32, projection_dim=16, seed=1)
    for vlm, rc, says in ((moved, 0, ""), (other, 2, "another VLM")):
        assert cli(["train", "--preset", str(preset), "--datalist", str(datalist), "--out", str(out),
                    "--max-iterations", "4", "--no-progress", "--resume", "--vlm", str(vlm)]) == rc
        err = capsys.readouterr().err
        assert says in err, err[-2000:]
    # one training per folder: a second --resume (or --overwrite) beside a running one rewrote its files, and
    # deleted its temporary ones (a review, 2026-12-07); a process that holds the run's lock stands for it here
    busy = shutil.copytree(out, tmp_path / "busy")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from lib.training import hold_run_lock; "
                               "hold_run_lock(sys.argv[1]); print('held', flush=True); time.sleep(120)", str(busy)],
                              cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = {p.name: p.stat().st_mtime_ns for p in busy.iterdir()}
        for flag in ("--resume", "--overwrite"):
            assert cli(["train", "--preset", str(preset), "--datalist", str(datalist), "--out", str(busy),
                        "--max-iterations", "4", "--no-progress", flag]) == 2
            err = capsys.readouterr().err
            assert f"another training is running in {busy} (process {holder.pid}" in err, err[-2000:]
        assert {p.name: p.stat().st_mtime_ns for p in busy.iterdir()} == before  # nothing moved or rewritten
    finally:
        holder.kill()
        holder.wait()


def test_checkpoints_are_written_with_the_umask_not_0600(tmp_path):
    """``tempfile.mkstemp``'s 0600 survived the rename: a server running as another user could not read the
    best.pt that training wrote (nor a label written through the same function)."""
    old = os.umask(0o022)
    try:
        path = atomic_torch_save({"w": torch.ones(1)}, tmp_path / "best.pt")
        assert (path.stat().st_mode & 0o777) == 0o644
        os.umask(0o077)
        path = atomic_torch_save({"w": torch.ones(1)}, tmp_path / "private.pt")
        assert (path.stat().st_mode & 0o777) == 0o600
    finally:
        os.umask(old)


def test_a_disk_that_fills_up_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "model" / "best.pt"
    atomic_torch_save({"w": torch.ones(3)}, path)
    before = path.read_bytes()

    def full(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match="No space left on device.*previous file.*kept"):
        atomic_torch_save({"w": torch.zeros(3)}, path)
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == ["best.pt"]
    monkeypatch.undo()
    # a real failed write (a file size limit, as a full disk, in a subprocess): torch's zip writer raises a
    # RuntimeError ("unexpected pos ...") that named neither the file nor the cause (a review, 2026-12-07)
    code = ("import resource, signal, sys, torch\n"
            "from lib.checkpoint import CheckpointError, atomic_torch_save\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
            "try:\n"
            "    atomic_torch_save({'w': torch.zeros(100000)}, sys.argv[1])\n"
            "except CheckpointError as e:\n"
            "    print('REFUSED', e)\n")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                         cwd=str(ROOT))
    assert out.stdout.startswith("REFUSED") and str(path) in out.stdout and "full disk" in out.stdout, \
        (out.stdout, out.stderr[-2000:])
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == ["best.pt"]
    blocked = tmp_path / "not_a_folder"
    blocked.write_text("a file where the model folder should be")
    with pytest.raises(CheckpointError, match="cannot write"):
        atomic_torch_save({"w": torch.ones(1)}, blocked / "best.pt")


def test_a_label_write_that_fails_half_way_keeps_the_stored_label(tmp_path, monkeypatch):
    """MONAI Label copied an upload over the stored label in place: a full disk (or a kill -9) half-way through
    left a partial label. The checked datastore writes beside it and renames: the old label stays whole, no
    partial file is left, the error says why (507), and the next save works."""
    import shutil

    import nibabel as nib
    import numpy as np
    from fastapi import HTTPException

    from lib.datastore import CheckedLocalDatastore

    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(ROOT / "sample_data" / "phantom_ct_06.nii.gz", studies)
    img = nib.load(studies / "phantom_ct_06.nii.gz")
    uploads = []
    for k in range(2):
        lab = np.zeros(img.shape, np.uint8)
        lab[k::2, 10:30] = 1
        uploads.append(tmp_path / f"upload{k}.nii.gz")
        nib.save(nib.Nifti1Image(lab, img.affine), str(uploads[-1]))
    ds = CheckedLocalDatastore(str(studies), extensions=["*.nii.gz"])
    ds.save_label("phantom_ct_06", str(uploads[0]), "final", {})
    stored = studies / "labels" / "final" / "phantom_ct_06.nii.gz"
    good = stored.read_bytes()
    assert good == uploads[0].read_bytes()

    def disk_full(src, dst, *a, **k):
        dst.write(src.read(100))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shutil, "copyfileobj", disk_full)
    with pytest.raises(HTTPException) as e:
        ds.save_label("phantom_ct_06", str(uploads[1]), "final", {})
    assert e.value.status_code == 507 and "No space left on device" in e.value.detail and "kept" in e.value.detail
    assert stored.read_bytes() == good, "a failed write changed the stored label"
    assert sorted(p.name for p in stored.parent.iterdir()) == ["phantom_ct_06.nii.gz"], "a partial file was left"
    monkeypatch.undo()
    # room for the label but not for the index (a review, 2026-12-07): the new label was in place, its entry (the
    # segments that decide what trains) not on disk, and the answer a bare 500
    ds.save_label("phantom_ct_06", str(uploads[0]), "final", {"segments": {"1": "lesion"}})

    def index_full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ds, "_update_datastore_file", index_full)
    with pytest.raises(HTTPException) as e:
        ds.save_label("phantom_ct_06", str(uploads[1]), "final", {"segments": {"1": "vertebra"}})
    assert e.value.status_code == 507 and "kept" in e.value.detail
    assert stored.read_bytes() == good, "the label was replaced though its index entry was not written"
    assert ds.get_label_info("phantom_ct_06", "final")["segments"] == {"1": "lesion"}  # the entry in memory too
    assert sorted(p.name for p in stored.parent.iterdir()) == ["phantom_ct_06.nii.gz"], "a partial file was left"
    monkeypatch.undo()
    # the index written, then the label's own rename fails (a second review): the index on disk gets the old entry
    # back (it kept the new segments beside the old label)
    import lib.checkpoint

    real_replace = os.replace

    def label_rename_fails(src, dst):
        if str(dst) == str(stored):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_replace(src, dst)

    monkeypatch.setattr(lib.checkpoint.os, "replace", label_rename_fails)
    with pytest.raises(HTTPException) as e:
        ds.save_label("phantom_ct_06", str(uploads[1]), "final", {"segments": {"1": "vertebra"}})
    assert e.value.status_code == 507 and stored.read_bytes() == good
    monkeypatch.undo()
    assert CheckedLocalDatastore(str(studies), extensions=["*.nii.gz"]).get_label_info(
        "phantom_ct_06", "final")["segments"] == {"1": "lesion"}
    assert sorted(p.name for p in stored.parent.iterdir()) == ["phantom_ct_06.nii.gz"], "a partial file was left"
    ds.save_label("phantom_ct_06", str(uploads[1]), "final", {"client": "test"})
    assert stored.read_bytes() == uploads[1].read_bytes()
    reopened = CheckedLocalDatastore(str(studies), extensions=["*.nii.gz"])  # the index on disk lists it
    assert reopened.get_label_uri(reopened.get_label_by_image_id("phantom_ct_06", "final"), "final") == str(stored)
    assert reopened.get_label_info("phantom_ct_06", "final")["client"] == "test"


def test_a_label_saved_again_in_another_format_replaces_the_old_file(tmp_path):
    """A review: a label saved again under another extension (Slicer saves .nii.gz where the label was a .png, an
    upload named .NII.GZ) left the old file beside the new one; a DELETE of the label then brought the old one
    back, an image added later under the id inherited it, a rebuilt index took whichever it found first."""
    import shutil

    import nibabel as nib
    import numpy as np

    from lib.datastore import CheckedLocalDatastore

    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(ROOT / "sample_data" / "phantom_ct_06.nii.gz", studies)
    img = nib.load(studies / "phantom_ct_06.nii.gz")
    lab = np.zeros(img.shape, np.uint8)
    lab[10:30, 10:30] = 1
    ds = CheckedLocalDatastore(str(studies), extensions=["*.nii.gz"])
    folder = studies / "labels" / "final"
    for name in ("a.nii.gz", "b.nii", "c.NII.GZ"):
        up = tmp_path / name
        nib.save(nib.Nifti1Image(lab, img.affine), str(up.with_suffix("").with_suffix(".nii.gz")) if
                 name.endswith("GZ") else str(up))
        if name.endswith("GZ"):
            (tmp_path / "c.nii.gz").rename(up)
        ds.save_label("phantom_ct_06", str(up), "final", {})
        stored = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        assert stored == ["phantom_ct_06" + (".nii" if name == "b.nii" else ".nii.gz")], (name, stored)
    ds.remove_label(ds.get_label_by_image_id("phantom_ct_06", "final"), "final")
    assert not [p for p in folder.iterdir() if not p.name.startswith(".")]
    assert not CheckedLocalDatastore(str(studies), extensions=["*.nii.gz"]).get_labeled_images()
    # ids with dots can name one file ("ph.x" + ".nii" and "ph" + ".x.nii"): replacing the first's label keeps the
    # file the second's label is stored as (a second review: it was deleted)
    for iid in ("ph", "ph.x"):
        shutil.copy(studies / "phantom_ct_06.nii.gz", studies / f"{iid}.nii.gz")
    ds = CheckedLocalDatastore(str(studies), extensions=["*.nii.gz"])
    nib.save(nib.Nifti1Image(lab, img.affine), str(tmp_path / "u1.nii"))
    nib.save(nib.Nifti1Image(lab, img.affine), str(tmp_path / "u2.x.nii"))
    ds.save_label("ph.x", str(tmp_path / "u1.nii"), "final", {})  # ph.x.nii
    ds.save_label("ph", str(tmp_path / "u2.x.nii"), "final", {})  # ph + .x.nii: the same file
    assert ds._datastore.objects["ph"].labels["final"].ext == ".x.nii"
    ds.save_label("ph.x", str(tmp_path / "a.nii.gz"), "final", {})
    assert (folder / "ph.x.nii").exists() and (folder / "ph.x.nii.gz").exists()


def test_a_scoring_subprocess_does_not_drop_a_label_saved_while_it_ran(tmp_path):
    """A review: MONAI Label's scoring subprocess holds the index as it was at its start and wrote all of it back
    with each score, so a label the server saved meanwhile vanished from the index (the server, which reloads the
    index it watches, then listed the image as unlabelled, and the label's info was lost). Each write now starts
    from the index on disk, under the lock: the label and the score both stay, in either order."""
    import shutil

    import nibabel as nib
    import numpy as np

    from lib.datastore import CheckedLocalDatastore

    studies = tmp_path / "studies"
    studies.mkdir()
    for name in ("a", "b"):
        shutil.copy(ROOT / "sample_data" / "phantom_ct_06.nii.gz", studies / f"{name}.nii.gz")
    img = nib.load(studies / "a.nii.gz")
    lab = np.zeros(img.shape, np.uint8)
    lab[4:20, 10:30] = 1
    upload = tmp_path / "upload.nii.gz"
    nib.save(nib.Nifti1Image(lab, img.affine), str(upload))

    def open_ds():
        return CheckedLocalDatastore(str(studies), extensions=["*.nii.gz"])

    server = open_ds()
    scoring = open_ds()  # the subprocess: started before the label was saved
    server.save_label("a", str(upload), "final", {"client": "annotator"})
    scoring.update_image_info("b", {"m_uncertainty": 0.5})  # its copy knows no label of "a"
    on_disk = CheckedLocalDatastore(str(studies), extensions=["*.nii.gz"], read_only=True)  # the index, as written
    assert on_disk.get_labeled_images() == ["a"], "the label was dropped from the index"
    assert on_disk.get_label_info("a", "final")["client"] == "annotator"
    server.update_image_info("a", {"note": 1})  # the server's copy has not seen the score yet
    on_disk = CheckedLocalDatastore(str(studies), extensions=["*.nii.gz"], read_only=True)
    assert on_disk.get_image_info("b")["m_uncertainty"] == 0.5, "the score was dropped"
    assert on_disk.get_image_info("a")["note"] == 1
    # the other order: a score written while the server's copy is stale is kept by the server's next label
    scoring.update_image_info("a", {"m_uncertainty": 0.25})
    server.save_label("b", str(upload), "final", {"client": "second"})
    on_disk = CheckedLocalDatastore(str(studies), extensions=["*.nii.gz"], read_only=True)
    assert on_disk.get_image_info("a")["m_uncertainty"] == 0.25 and sorted(on_disk.get_labeled_images()) == ["a", "b"]


def test_an_unknown_id_in_datastore_requests_is_a_404_and_a_concurrent_write_keeps_both(tmp_path, monkeypatch):
    """A review: (1) ``DELETE /datastore`` and ``PUT /datastore/imageinfo`` / ``labelinfo`` of an unknown id raised
    MONAI Label's ImageNotFoundException (no HTTP status: a 500); (2) the test of two annotators saving at once could
    not fail (MONAI Label's save endpoint is async and blocking, so the server ran the two one after the other).
    Here two datastore objects (the server and a subprocess) write the index at once, the first held inside its
    critical section until the second has started: the lock must make the second wait, or its write is lost."""
    import shutil
    import threading
    import time

    from fastapi import HTTPException

    import lib.datastore as dsmod
    from lib.datastore import CheckedLocalDatastore

    studies = tmp_path / "studies"
    studies.mkdir()
    for name in ("a", "b"):
        shutil.copy(ROOT / "sample_data" / "phantom_ct_06.nii.gz", studies / f"{name}.nii.gz")
    server = CheckedLocalDatastore(str(studies), extensions=["*.nii.gz"])
    other = CheckedLocalDatastore(str(studies), extensions=["*.nii.gz"])
    for call in (lambda: server.remove_image("nope"), lambda: server.update_image_info("nope", {"x": 1}),
                 lambda: server.update_label_info("a", "final", {"x": 1})):
        with pytest.raises(HTTPException) as e:
            call()
        assert e.value.status_code == 404, e.value.detail
    real = dsmod.FreshIndex._reload_index_locked
    entered = threading.Event()

    def slow_reload(self):  # the server's write: read the index, then wait inside its critical section
        real(self)
        if self is server:
            entered.set()
            time.sleep(0.6)

    monkeypatch.setattr(dsmod.FreshIndex, "_reload_index_locked", slow_reload)
    t = threading.Thread(target=server.update_image_info, args=("a", {"from_server": 1}))
    t.start()
    assert entered.wait(10)
    other.update_image_info("b", {"from_subprocess": 2})  # must wait for the server's write to end
    t.join()
    on_disk = CheckedLocalDatastore(str(studies), extensions=["*.nii.gz"], read_only=True)
    assert on_disk.get_image_info("a").get("from_server") == 1
    assert on_disk.get_image_info("b").get("from_subprocess") == 2, "a concurrent index write was lost"
    monkeypatch.undo()
    # an image another datastore object gave a label is not replaced by another file through a stale copy (409)
    import nibabel as nib
    import numpy as np

    img = nib.load(studies / "b.nii.gz")
    lab = np.zeros(img.shape, np.uint8)
    lab[4:20, 10:30] = 1
    nib.save(nib.Nifti1Image(lab, img.affine), str(tmp_path / "lab.nii.gz"))
    stale = CheckedLocalDatastore(str(studies), extensions=["*.nii.gz"])
    other.save_label("b", str(tmp_path / "lab.nii.gz"), "final", {})
    other_image = tmp_path / "other.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.int16), img.affine), str(other_image))
    with pytest.raises(HTTPException) as e:
        stale.add_image("b", str(other_image), {})
    assert e.value.status_code == 409, e.value.detail


class _Payload:
    """What a hostile checkpoint carries: unpickling it would run ``os.system``."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_checkpoint_carrying_a_pickle_payload_is_refused_not_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "model.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "hyper_parameters": _Payload()}, bad)
    with pytest.raises(CheckpointError, match="pickled Python objects.*DFM_ALLOW_PICKLED_CHECKPOINTS"):
        load_checkpoint(bad)
    img = tmp_path / "x.nii.gz"
    import nibabel as nib
    import numpy as np
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), img)
    assert cli(["predict", "--checkpoint", str(bad), "--image", str(img), "--out", str(tmp_path / "o")]) == 2
    assert "refused" in capsys.readouterr().err
    assert not (tmp_path / "PWNED").exists()


def test_kill_9_of_the_server_in_the_middle_of_a_training_loses_nothing(tmp_path):
    """kill -9 of the server's whole process group while a training runs (after it published once): the model
    file is a complete checkpoint, the label saved before is listed after a restart, the restarted server serves
    that checkpoint and trains again; a SIGTERM to the server alone then ends the training it started too."""
    import time

    import nibabel as nib
    import requests
    from monailabel.client import MONAILabelClient

    from lib.checkpoint import load_checkpoint
    from server_utils import Server, copy_sample_data, openmp_teams, process_group_alive

    sys.path.insert(0, str(ROOT / "sample_data"))
    try:
        from make_sample_data import ct_affine, ct_phantom
    finally:
        sys.path.remove(str(ROOT / "sample_data"))
    studies = copy_sample_data(tmp_path / "studies")
    conf = {"model_dir": tmp_path / "model", "uncertainty_samples": 2}
    published = tmp_path / "model" / "dfm_vlm_3d.pt"
    # started as users start it, scoring every image at start: MONAI Label asks /info for that on the main thread,
    # which loads the models there; that must not leave the main thread an OpenMP team (every inference, in the
    # models' thread, was about 25 % slower beside it)
    server = Server(str(studies), tmp_path, conf=conf, env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "true"})
    try:
        requests.delete(f"{server.url}/scoring/", timeout=60)  # (that scoring itself is not this test's)
        assert openmp_teams(server.proc.pid) in (None, 0), "a thread other than the models' holds an OpenMP team"
        client = MONAILabelClient(server.url)
        _, truth = ct_phantom(7)
        lab = tmp_path / "phantom_ct_07_label.nii.gz"
        nib.save(nib.Nifti1Image(truth, ct_affine()), str(lab))
        client.save_label("phantom_ct_07", str(lab), tag="final")
        client.train_start("dfm_vlm_3d", {"max_epochs": 200, "val_split": 0.34, "patches_per_image": 2,
                                          "publish": "always"})
        deadline = time.time() + 600
        while not published.exists() and time.time() < deadline:
            time.sleep(0.5)
        assert published.exists(), server.tail(80)
        time.sleep(2)  # a few more steps: the kill lands in the middle of the run, between (or in) publishes
        assert client.train_status()["status"] == "RUNNING"
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait(timeout=30)
    finally:
        server.stop()
    deadline = time.time() + 30
    while process_group_alive(server.proc.pid) and time.time() < deadline:
        time.sleep(0.5)
    ck = load_checkpoint(published)  # complete: written to a temporary file, then renamed
    assert ck.metrics["epoch"] >= 1
    # MONAI Label writes its datastore index in place: a kill inside that write leaves it truncated (no test can
    # time the kill there, so the truncation is made here); before, the next start failed on it
    index = studies / "datastore_v2.json"
    index.write_bytes(index.read_bytes()[: index.stat().st_size // 2])
    again = Server(str(studies), tmp_path, conf=conf)
    try:
        client = MONAILabelClient(again.url)
        ds = requests.get(f"{again.url}/datastore/?output=all", timeout=30).json()["objects"]
        assert "final" in ds["phantom_ct_07"]["labels"]
        assert len(list(studies.glob("datastore_v2.json.unreadable-*"))) == 1, "the unreadable index was not kept"
        assert {k for k, v in ds.items() if v.get("labels")} >= {f"phantom_ct_0{i}" for i in (0, 1, 2, 3, 4, 7)}
        assert client.info()["models"]["dfm_vlm_3d"]["checkpoint"]["path"] == str(published)
        _, params = client.infer("dfm_vlm_3d", "phantom_ct_05", {"steps": 2})
        assert params["checkpoint"] == str(published)
        client.train_start("dfm_vlm_3d", {"max_epochs": 1, "val_split": 0.34, "patches_per_image": 2})
        deadline = time.time() + 600
        status = client.train_status()
        while time.time() < deadline and status["status"] not in ("DONE", "ERROR"):
            time.sleep(2)
            status = client.train_status()
        assert status["status"] == "DONE", again.tail(80)
        # the server stopped (SIGTERM to it alone, as a service manager or ``kill <pid>`` does) in a training it
        # started: the training ends with it (it went on running with no parent, writing checkpoints)
        import psutil

        client.train_start("dfm_vlm_3d", {"max_epochs": 500, "val_split": 0.34, "patches_per_image": 2})
        deadline = time.time() + 300
        while time.time() < deadline and "Epoch: 1/" not in str(client.train_status().get("details")):
            time.sleep(0.5)  # training (a task process still importing died on its first print to the server)
        assert "Epoch: 1/" in str(client.train_status().get("details")), again.tail(80)
        tasks = psutil.Process(again.proc.pid).children(recursive=True)
        assert tasks and client.train_status()["status"] == "RUNNING", again.tail(40)
        os.kill(again.proc.pid, signal.SIGTERM)
        again.proc.wait(timeout=60)
        gone, alive = psutil.wait_procs(tasks, timeout=30)
        assert not alive, f"left running after the server ended: {[p.cmdline()[:6] for p in alive]}"
    finally:
        again.stop()


def test_a_task_process_started_when_its_server_has_ended_does_not_run(tmp_path):
    """MONAI Label's task queue starts the next task (the second model's scoring) as the first is stopped by the
    signal that stops the server: the process it starts finds its server gone and ends, before building anything."""
    code = ("import ctypes, os, signal, sys; sys.path.insert(0, sys.argv[1]); import lib.lifetime as m; "
            "m.end_with_the_server(); v = ctypes.c_int(); ctypes.CDLL(None).prctl(2, ctypes.byref(v), 0, 0, 0); "
            "print('ran', v.value == signal.SIGTERM, m.SERVER_PID in os.environ)")
    env = {**os.environ, "DFM_MONAILABEL_SERVER_PID": str(os.getppid())}  # alive, not the task's parent
    ended = subprocess.run([sys.executable, "-c", code, str(ROOT)], env=env, capture_output=True, text=True,
                           timeout=300)
    assert ended.returncode == 1 and "has ended: not running it" in ended.stderr, ended.stderr[-500:]
    assert "ran" not in ended.stdout
    env["DFM_MONAILABEL_SERVER_PID"] = str(os.getpid())  # its parent: it runs, to end with it
    ran = subprocess.run([sys.executable, "-c", code, str(ROOT)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert ran.returncode == 0 and "ran True False" in ran.stdout, ran.stderr[-500:]


def _studies_with(tmp_path, *names):
    import shutil

    studies = tmp_path / "studies"
    studies.mkdir()
    for name in names:
        shutil.copy(ROOT / "sample_data" / "phantom_ct_06.nii.gz", studies / f"{name}.nii.gz")
    return studies


def test_setting_aside_an_unreadable_index_waits_for_a_write_in_progress(tmp_path):
    """A review: set_aside_unreadable_index read the index without the datastore's lock, and MONAI Label wrote
    it in place: a subprocess (scoring, training) starting during the server's write found a half-written index
    and set the live one aside (its labels' info lost). It now waits for the lock: the write ends, the index is
    read whole and kept."""
    from filelock import FileLock

    from lib.datastore import CheckedLocalDatastore

    studies = _studies_with(tmp_path, "a")
    CheckedLocalDatastore(str(studies), extensions=["*.nii.gz"]).update_image_info("a", {"m_uncertainty": 0.7})
    index = studies / "datastore_v2.json"
    full = index.read_text()
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from lib.datastore import set_aside_unreadable_index; "
            "print('set aside:', set_aside_unreadable_index(sys.argv[2]))")
    with FileLock(str(studies / ".lock")):  # the server, in the middle of its in-place write
        index.write_text(full[: len(full) // 2])
        proc = subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(studies)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=8)  # it must wait for the lock, not read the half file
        except subprocess.TimeoutExpired:
            out = None
        index.write_text(full)  # the write completes, then the lock is released
    if out is None:
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert "set aside: None" in out, out
    assert index.read_text() == full and not list(studies.glob("*.unreadable-*")), "the live index was set aside"


def test_index_writes_are_atomic_a_reader_never_sees_a_partial_index(tmp_path):
    """MONAI Label wrote the index in place (``open(path, "w")``, then the JSON): a reader (another process, or a
    restart after a kill -9) could find it empty or half written. The checked datastore writes it beside and
    renames it: every read, at any moment, is a whole index."""
    import threading

    from monailabel.datastore.local import DataModel, ImageLabelModel

    from lib.datastore import CheckedLocalDatastore

    studies = _studies_with(tmp_path, "a")
    ds = CheckedLocalDatastore(str(studies), extensions=["*.nii.gz"])
    for k in range(400):  # a large index (records without files are fine for writing it)
        ds._datastore.objects[f"x{k}"] = ImageLabelModel(image=DataModel(info={"k": k, "pad": "p" * 100},
                                                                         ext=".nii.gz"))
    ds._update_datastore_file()
    index = studies / "datastore_v2.json"
    done = threading.Event()
    bad = []

    def reader():
        while not done.is_set():
            text = index.read_text()
            try:
                json.loads(text)
            except ValueError:
                bad.append(len(text))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for k in range(60):
            ds.update_image_info("a", {"n": k})
    finally:
        done.set()
        t.join()
    assert not bad, f"{len(bad)} reads found a partial index (sizes {bad[:5]})"
    assert json.loads(index.read_text())["objects"]["a"]["image"]["info"]["n"] == 59
    assert not [p.name for p in studies.iterdir() if p.name.endswith(".tmp")], "a temporary file was left"


def test_adding_an_image_keeps_a_score_a_subprocess_wrote_meanwhile(tmp_path):
    """A review: PUT /datastore/image went to MONAI Label's add_image, which wrote the server's in-memory index: a
    score a scoring subprocess wrote meanwhile was lost. It now re-reads the index under the lock first."""
    from lib.datastore import CheckedLocalDatastore

    studies = _studies_with(tmp_path, "a", "b")

    def open_ds(**k):
        return CheckedLocalDatastore(str(studies), extensions=["*.nii.gz"], **k)

    server, scoring = open_ds(), open_ds()
    scoring.update_image_info("b", {"m_uncertainty": 0.5})
    server.add_image("c", str(ROOT / "sample_data" / "phantom_ct_06.nii.gz"), {"client": "upload"})
    on_disk = open_ds(read_only=True)
    assert on_disk.get_image_info("b").get("m_uncertainty") == 0.5, "adding an image dropped a score"
    assert on_disk.get_image_info("c")["client"] == "upload" and (studies / "c.nii.gz").exists()
    # a review: an image sent again in another format (PUT /datastore/image of "c" with a .nrrd) left the old file,
    # and a DELETE of the image brought the old one back (listed, scored, handed out)
    import itk

    nrrd = tmp_path / "c_again.nrrd"
    itk.imwrite(itk.imread(str(ROOT / "sample_data" / "phantom_ct_06.nii.gz")), str(nrrd))
    ds = CheckedLocalDatastore(str(studies), extensions=["*.nii.gz", "*.nrrd"])
    ds.add_image("c", str(nrrd), {})
    assert sorted(p.name for p in studies.glob("c.*")) == ["c.nrrd"]
    ds.remove_image("c")
    assert "c" not in CheckedLocalDatastore(str(studies), extensions=["*.nii.gz", "*.nrrd"]).list_images()


def test_a_score_of_an_image_replaced_while_it_was_scored_is_not_written(tmp_path):
    """A review: a scoring process that scored an image while the server replaced it (PUT /datastore/image, the same
    format, within one second) wrote the old file's score onto the new one, counted current. The write checks, under
    the index's lock and against the index on disk, that the image is the file it read."""
    from lib.datastore import CheckedLocalDatastore, image_identity

    studies = _studies_with(tmp_path, "a")

    def open_ds():
        return CheckedLocalDatastore(str(studies), extensions=["*.nii.gz"])

    server, scoring = open_ds(), open_ds()
    server.add_image("a", str(ROOT / "sample_data" / "phantom_ct_05.nii.gz"), {})
    scoring._reload_index_locked()
    before = image_identity(scoring.get_image_info("a"))
    assert scoring.update_image_info("a", {"m_uncertainty": 0.1}, unless_replaced=before)
    server.add_image("a", str(ROOT / "sample_data" / "phantom_ct_06.nii.gz"), {})  # the same second, the same name
    assert not scoring.update_image_info("a", {"m_uncertainty": 0.9}, unless_replaced=before)
    assert "m_uncertainty" not in CheckedLocalDatastore(str(studies), extensions=["*.nii.gz"],
                                                        read_only=True).get_image_info("a")


def test_a_label_whose_affine_differs_from_the_image_is_refused(tmp_path):
    """A review: the label check compared array shapes only; a label whose header mirrors it (or places it with
    another spacing or origin) was accepted, and training, which orients a label by its own affine, learnt the
    mask mirrored. It is refused (422) naming the difference; a label with the image's geometry (as 3D Slicer
    writes it, float32 rounding included) is stored."""
    import nibabel as nib
    import numpy as np
    from fastapi import HTTPException

    from lib.datastore import CheckedLocalDatastore

    studies = _studies_with(tmp_path, "a")
    ds = CheckedLocalDatastore(str(studies), extensions=["*.nii.gz"])
    img = nib.load(studies / "a.nii.gz")
    lab = np.zeros(img.shape, np.uint8)
    lab[:10] = 1
    up = tmp_path / "up.nii.gz"
    flip = np.array([[-1, 0, 0, img.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    stored = studies / "labels" / "final" / "a.nii.gz"
    for name, aff, expect in (("mirrored", img.affine @ flip, r"orientation RPS vs LPS"),
                              ("identity", np.eye(4), r"spacing \[1.0, 1.0, 1.0\] vs \[1.5, 1.5, 2.5\]"),
                              ("rotated", img.affine @ np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0],
                                                                 [0, 0, 0, 1.0]]), r"orientation")):
        nib.save(nib.Nifti1Image(lab, aff), str(up))
        with pytest.raises(HTTPException) as e:
            ds.save_label("a", str(up), "final", {})
        assert e.value.status_code == 422 and "affine differs from the image's" in e.value.detail, (name, e.value)
        assert __import__("re").search(expect, e.value.detail), (name, e.value.detail)
        assert not stored.exists(), name
        # a label on the image's points in another voxel order is told so (a review: "it would land elsewhere on
        # the image", which it would not; the annotator must save it in the image's order)
        told = "another voxel order" if name != "identity" else "would land elsewhere"
        assert told in e.value.detail, (name, e.value.detail)
    near = img.affine.astype(np.float32).astype(float)
    near[:3, 3] += 0.01  # well under a tenth of a voxel
    nib.save(nib.Nifti1Image(lab, near), str(up))
    ds.save_label("a", str(up), "final", {})
    assert stored.read_bytes() == up.read_bytes()
    # only another origin (same axes and spacing): every voxel pairs with the same image voxel, and it is how a
    # correct label from an ITK editor differs when a NIfTI image's qform and sform differ (a review: refused)
    shifted = img.affine.copy()
    shifted[:3, 3] += [3.0, -2.0, 0.0]
    nib.save(nib.Nifti1Image(lab, shifted), str(up))
    ds.save_label("a", str(up), "final", {})
    assert stored.read_bytes() == up.read_bytes()


def test_the_server_still_reloads_an_index_another_process_wrote(tmp_path):
    """The index is written beside and renamed (atomic); MONAI Label's watcher takes only *modified* events of
    the index (a rename is a *moved* one): the server must still reload a score a subprocess wrote, and its own
    write's event must still be the one it skips (``_ignore_event_config``), not the next one."""
    import time

    from lib.datastore import CheckedLocalDatastore

    studies = _studies_with(tmp_path, "a")
    server = CheckedLocalDatastore(str(studies), extensions=["*.nii.gz"], auto_reload=True)
    try:
        scoring = CheckedLocalDatastore(str(studies), extensions=["*.nii.gz"])
        for k in range(2):
            server.update_image_info("a", {"own": k})
            deadline = time.time() + 5
            while server._ignore_event_config and time.time() < deadline:
                time.sleep(0.02)
            assert not server._ignore_event_config, "the server's own write made no event: the next one is skipped"
            scoring.update_image_info("a", {"m_uncertainty": k + 0.5})
            deadline = time.time() + 5
            while server.get_image_info("a").get("m_uncertainty") != k + 0.5 and time.time() < deadline:
                time.sleep(0.02)
            assert server.get_image_info("a").get("m_uncertainty") == k + 0.5, "the server did not reload the index"
    finally:
        server._observer.stop()
        server._observer.join()


def test_a_resumed_run_keeps_a_best_pt_newer_than_its_state(tmp_path, tiny_clip):
    """A review (suspected, then shown here): a kill between writing best.pt and resume.pt leaves a state whose best
    Dice is older than best.pt's; the resumed run's next, worse validation then replaced the better best.pt. The
    best on disk now counts. Simulated: the state from iteration 2 of a 4-iteration run, and a best.pt that a lost
    validation wrote with a higher Dice than this run reaches."""
    from lib.data import load_datalist
    from lib.training import train
    from test_inputs_evaluation import _phantom_datalist

    datalist = _phantom_datalist(tmp_path, n_train=3, n_val=1)
    tr, va = load_datalist(datalist, "training"), load_datalist(datalist, "validation")
    hp = tiny_hparams(tiny_clip, spacing=[1.0, 1.0])
    hp.train.state_every_it = 2
    out = tmp_path / "run"
    train(hp, tr, va, out, max_iterations=2, progress=False)  # its state: iteration 2, its best.pt
    st = torch.load(out / "resume.pt", weights_only=False)
    st["max_iterations"] = 4  # as if the command had asked for 4 and was killed after the state at 2
    st["validated_at"] = -1
    torch.save(st, out / "resume.pt")
    ck = torch.load(out / "best.pt", weights_only=False)
    ck["metrics"]["val"]["dice"]["mean"] = 0.999  # the lost timeline's better validation
    ck["metrics"]["iteration"] = 3
    torch.save(ck, out / "best.pt")
    orphan, other = out / ".resume.pt.3f9a2c71d0e4.tmp", out / ".notes.txt.tmp"  # a kill during a write: its half
    orphan.write_bytes(b"half a state")
    other.write_text("not the run's")
    hp = tiny_hparams(tiny_clip, spacing=[1.0, 1.0])
    hp.train.state_every_it = 2
    res = train(hp, tr, va, out, max_iterations=4, progress=False, resume=True)
    assert not orphan.exists() and other.exists()  # the interrupted write's temporary removed, nothing else
    assert res.iterations == 4 and res.history[-1]["val_dice"] < 0.999
    assert torch.load(out / "best.pt", weights_only=False)["metrics"]["val"]["dice"]["mean"] == 0.999
    assert res.best_val["dice"] == 0.999 and res.best_val["iteration"] == 3


def test_a_queued_inference_whose_client_left_or_whose_server_stops_is_not_run(tmp_path):
    """A review (2026-12-07): inferences wait their turn on the one model thread, and nothing took one out of the
    queue: six clients that had hung up each had their inference run (the next user waited 200 s instead of 32 s),
    and a SIGTERM waited for every queued inference (2 minutes; a service manager's 10 s grace ends in a SIGKILL).
    A queued request is dropped when its client goes away, or answered 503 when the server is told to stop; the
    inference that is running runs to its end."""
    import threading
    import time

    import requests

    from server_utils import Server, copy_sample_data

    studies = copy_sample_data(tmp_path / "studies")
    server = Server(str(studies), tmp_path, conf={"model_dir": tmp_path / "model", "models": "dfm_vlm_3d",
                                                  "interactive": "false"})
    done = {}

    def infer(name, seed, timeout=600):
        work = {"steps": 1, "num_samples": 1} if name == "after" else {"steps": 6, "num_samples": 4}  # (CPU time)
        try:
            r = requests.post(f"{server.url}/infer/dfm_vlm_3d", params={"image": "phantom_ct_05", "output": "json"},
                              data={"params": json.dumps({**work, "seed": seed})}, timeout=timeout)
            done[name] = (r.status_code, r.text[:300], time.monotonic())
        except requests.exceptions.RequestException as e:
            done[name] = (type(e).__name__, "", time.monotonic())

    def running(seed):
        return f"'seed': {seed}" in server.tail(400)

    def start(name, seed, timeout=600):
        t = threading.Thread(target=infer, args=(name, seed, timeout))
        t.start()
        return t

    try:
        slow = start("slow", 880001)
        deadline = time.time() + 120
        while not running(880001) and time.time() < deadline:
            time.sleep(0.05)
        gone = [start(f"gone{i}", 880010 + i, timeout=1.0) for i in range(2)]  # the clients hang up after 1 s
        for t in gone:
            t.join()
        after = start("after", 880020)
        slow.join()
        after.join()
        assert done["slow"][0] == 200 and done["after"][0] == 200, done
        assert {done[f"gone{i}"][0] for i in range(2)} == {"ReadTimeout"}, done
        log = server.tail(400)
        assert log.count("was not run: its client went away before its turn on the model") == 2, log
        assert not running(880010) and not running(880011), "an inference whose client had gone away was run"
        # told to stop (SIGTERM, as a service manager does) while one inference runs and another waits
        slow = start("slow2", 880030)
        deadline = time.time() + 120
        while not running(880030) and time.time() < deadline:
            time.sleep(0.05)
        queued = start("queued", 880031)
        time.sleep(1.0)
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(timeout=120)
        slow.join()
        queued.join()
        assert done["slow2"][0] == 200, done  # the running one ends
        assert done["queued"][0] == 503 and "the server is stopping" in done["queued"][1], done
        assert done["queued"][2] < done["slow2"][2], "the queued request was answered only after the running one"
        assert not running(880031)
    finally:
        server.stop()


def test_a_damaged_or_non_finite_checkpoint_is_refused_and_a_diverged_training_stops(tmp_path, tiny_clip):
    """A review (2026-12-08): (1) PyTorch's reader does not check a zip entry's CRC-32: a checkpoint with flipped
    bits loaded without a word, and its NaN probabilities became an empty label; (2) a training whose loss went
    NaN trained on and published last.pt of NaN weights, which loaded without a word; (3) a malformed field (a
    weight that is no tensor, a FiLM weight of one dimension, a fingerprint that is no mapping) was a bare
    AttributeError / IndexError."""
    import shutil
    import struct
    import zipfile

    from lib.checkpoint import save_checkpoint
    from lib.data import load_datalist
    from lib.training import TrainingDiverged, train

    hp = tiny_hparams(tiny_clip, spacing=[1.0, 1.0])
    system = build_system(hp)
    good = tmp_path / "good.pt"
    save_checkpoint(good, system.model, system.hparams)
    load_checkpoint(good)
    # (1) one byte of the largest weight's data changed
    with zipfile.ZipFile(good) as z:
        entry = max(z.infolist(), key=lambda i: i.file_size)
    raw = bytearray(good.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[entry.header_offset + 26:entry.header_offset + 30])
    at = entry.header_offset + 30 + name_len + extra_len + entry.file_size // 2
    raw[at] ^= 0x40
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=rf"is damaged: its entry '{entry.filename}' fails its CRC-32"):
        load_checkpoint(damaged)
    # (2) a NaN weight: refused at save and at load, naming the tensor
    obj = torch.load(good, weights_only=True)
    key = next(k for k in obj["state_dict"] if k.startswith("vlm_film_heads.0") and k.endswith("weight"))
    obj["state_dict"][key].view(-1)[0] = float("nan")
    torch.save(obj, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match=rf"1 weight tensor\(s\) hold NaN or infinity \({key}\)"):
        load_checkpoint(tmp_path / "nan.pt")
    with torch.no_grad():
        dict(system.model.named_parameters())[key].view(-1)[0] = float("nan")
    with pytest.raises(CheckpointError, match=rf"not writing .*hold NaN or infinity \({key}\)"):
        save_checkpoint(tmp_path / "nan2.pt", system.model, system.hparams)
    assert not (tmp_path / "nan2.pt").exists()
    # (3) malformed fields
    for edit, needle in ((lambda o: o["state_dict"].__setitem__(key, None), "must map names to tensors"),
                         (lambda o: o["state_dict"].__setitem__(key, o["state_dict"][key].view(-1)),
                          "invalid hyper-parameters"),
                         (lambda o: o["hyper_parameters"]["vlm"].__setitem__("fingerprint", "abc"),
                          "vlm.fingerprint must be a (mapping|JSON object)")):
        obj = torch.load(good, weights_only=True)
        edit(obj)
        torch.save(obj, tmp_path / "bad.pt")
        with pytest.raises(CheckpointError, match=needle):
            load_checkpoint(tmp_path / "bad.pt")
    # a training whose loss becomes NaN stops there, naming the iteration; what it wrote before is kept
    datalist = _phantom_datalist(tmp_path, n_train=2, n_val=1)
    tr, va = load_datalist(datalist, "training"), load_datalist(datalist, "validation")
    hp = tiny_hparams(tiny_clip, spacing=[1.0, 1.0])
    hp.train.lr = 1e15
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"the training loss is nan at iteration \d+"):
        train(hp, tr, va, out, max_iterations=6, progress=False)
    for f in out.glob("*.pt"):
        if f.name != "resume.pt":
            load_checkpoint(f)  # finite: written before the loss went NaN
    shutil.rmtree(out)


def test_an_index_with_one_bad_entry_keeps_the_others_segment_names_and_infos(tmp_path):
    """A review (2026-12-08): one entry of a valid JSON index left wrong (a hand edit: an image's ``ext`` null) set
    the whole index aside, and the rebuild from the files lost every label's segment names (a training then read
    the labels by the dataset's codes) and every image's info (scores). The entries that read are kept."""
    import nibabel as nib
    import numpy as np

    from lib.datastore import CheckedLocalDatastore, set_aside_unreadable_index

    studies = tmp_path / "studies"
    studies.mkdir()
    ds = CheckedLocalDatastore(str(studies), extensions=["*.nii.gz"], auto_reload=False)
    for name in ("a", "b"):
        img = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 6), np.float32), np.eye(4)), str(img))
        ds.add_image(name, str(img), {"score": 0.5})
        lab = np.zeros((8, 8, 6), np.uint8)
        lab[1:3, 1:3, 1:3], lab[5:7, 5:7, 3:5] = 1, 2
        nib.save(nib.Nifti1Image(lab, np.eye(4)), str(tmp_path / f"{name}_lab.nii.gz"))
        ds.save_label(name, str(tmp_path / f"{name}_lab.nii.gz"), "final",
                      {"label_info": [{"name": "lesion", "idx": 1}, {"name": "vertebra", "idx": 2}]})
    index = studies / "datastore_v2.json"
    raw = json.loads(index.read_text())
    raw["objects"]["a"]["image"]["ext"] = None
    index.write_text(json.dumps(raw))
    aside = set_aside_unreadable_index(studies)
    assert aside and os.path.exists(aside) and json.loads(open(aside).read())["objects"]["a"]["image"]["ext"] is None
    again = CheckedLocalDatastore(str(studies), extensions=["*.nii.gz"], auto_reload=False)
    assert sorted(again.list_images()) == ["a", "b"] and "final" in again.get_labels_by_image_id("a")
    assert again.get_label_info("b", "final")["segments"] == {"1": "lesion", "2": "vertebra"}
    assert again.get_image_info("b")["score"] == 0.5
    # a truncated index (no JSON): set aside and rebuilt from the files, as before
    index.write_bytes(index.read_bytes()[:50])
    assert set_aside_unreadable_index(studies) and not index.exists()
