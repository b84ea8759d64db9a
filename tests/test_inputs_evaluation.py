"""Bad input gives clear errors; metrics in original geometry; validation during training == `evaluate`."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from lib.audit import audit
from lib.checkpoint import save_checkpoint
from lib.cli import main as cli
from lib.evaluation import case_metrics, evaluate_items, predict_item
from lib.phantoms import phantom, write_nifti, write_phantom_case
from lib.transforms import InputError

from conftest import ROOT, tiny_hparams


@pytest.fixture
def system2d(make_system):
    return make_system(spacing=[2.0, 2.0])


def _img2d(tmp_path, name="img.nii.gz", arr=None, spacing=(1.0, 1.0)):
    arr = np.random.default_rng(0).random((40, 36)).astype(np.float32) if arr is None else arr
    return str(write_nifti(tmp_path / name, arr, spacing))


def test_bad_inputs_give_errors_that_name_the_problem(tmp_path, system2d, make_system):
    nan = np.random.default_rng(0).random((40, 36)).astype(np.float32)
    nan[3, 4] = np.nan
    with pytest.raises(InputError, match=r"nan\.nii\.gz.*1 NaN"):
        predict_item(system2d, {"image": _img2d(tmp_path, "nan.nii.gz", nan)})
    two = np.random.default_rng(0).random((40, 36, 2)).astype(np.float32)  # 2 channels (last axis in NIfTI)
    two_path = str(write_nifti(tmp_path / "two.nii.gz", two))
    with pytest.raises(InputError, match=r"a 3D image|expects 1 channel"):
        predict_item(system2d, {"image": two_path})
    with pytest.raises(InputError, match=r"expects 1 channel\(s\), the image has 2"):
        predict_item(system2d, {"image": [_img2d(tmp_path, "a.nii.gz"), _img2d(tmp_path, "b.nii.gz")]})
    system3d = make_system(spatial_dims=3, features=(8, 16))
    with pytest.raises(InputError, match=r"a 2D image .* was given to a 3D model"):
        predict_item(system3d, {"image": _img2d(tmp_path)})
    bad = tmp_path / "corrupt.nii.gz"
    bad.write_bytes(b"\x1f\x8b this is not a nifti file")
    with pytest.raises(InputError, match=r"cannot read .*corrupt\.nii\.gz"):
        predict_item(system2d, {"image": str(bad)})
    with pytest.raises(InputError, match="image file not found"):
        predict_item(system2d, {"image": str(tmp_path / "nope.nii.gz")})
    with pytest.raises(InputError, match="differs from its label"):
        system2d.preprocessing({"image": _img2d(tmp_path), "label": _img2d(tmp_path, "l.nii.gz", np.zeros((10, 10)))})


def test_cli_reports_bad_checkpoint_and_input_without_traceback(tmp_path, system2d):
    from monai.networks.nets import UNet

    other = tmp_path / "unet.pt"
    torch.save(UNet(2, 1, 1, channels=(4, 8), strides=(2,)).state_dict(), other)
    img = _img2d(tmp_path)
    r = subprocess.run([sys.executable, "-m", "lib", "predict", "--checkpoint", str(other), "--image", img, "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "architecture is unknown" in r.stderr and "Traceback" not in r.stderr
    ck = tmp_path / "ok.pt"
    save_checkpoint(ck, system2d.model, system2d.hparams)
    nan = np.zeros((40, 36), np.float32)
    nan[0, 0] = np.inf
    assert cli(["predict", "--checkpoint", str(ck), "--image", _img2d(tmp_path, "inf.nii.gz", nan), "--out",
                str(tmp_path / "o"), "--no-progress"]) == 2
    assert cli(["predict", "--checkpoint", str(ck), "--image", img, "--out", str(tmp_path / "o"), "--steps", "0",
                "--no-progress"]) == 2


def test_a_2d_image_stored_mirrored_or_transposed_is_named():
    """2D images are read in stored order; both readers' upright layouts (MONAI's 'RA', ITK's 'LP', and a coronal
    'LI') pass, and a layout that displays otherwise than it is stored (one axis mirrored, the axes swapped) is named
    with its axis codes (a review: a y-flipped X-ray was segmented upside down, Dice 0.96 -> 0.75, without a word)."""
    from lib.transforms import stored_layout_note

    upright = {"RA": np.diag([0.14, 0.2, 1.0, 1.0]), "LP": np.diag([-1.0, -1.0, 1.0, 1.0]),
               "LI": np.array([[-1.0, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]])}
    for codes, a in upright.items():
        assert stored_layout_note(a, "x.nii.gz") is None, codes
    assert stored_layout_note(None) is None
    # a sagittal plane (a lateral view's affine): neither axis L/R, no PNG layout to compare with
    assert stored_layout_note(np.array([[0, 0, 1.0, 0], [-1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]])) is None
    assert stored_layout_note(np.diag([1.0, 1.0, 1.0])) is None  # a 2D NRRD's 3 x 3 affine, upright
    for codes, a, how in [("LA", np.diag([-1.0, 1.0, 1.0, 1.0]), "mirrored"), ("RP", np.diag([1.0, -1.0, 1.0]), "mirrored"),
                          ("RP", np.diag([1.0, -1.0, 1.0, 1.0]), "mirrored"),
                          ("AR", np.array([[0, 1.0, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]), "swapped"),
                          ("IL", np.array([[0, -1.0, 0, 0], [0, 0, 1, 0], [-1, 0, 0, 0], [0, 0, 0, 1]]), "swapped")]:
        note = stored_layout_note(a, "x.nii.gz")
        assert note and f"'{codes}'" in note and how in note and note.startswith("x.nii.gz"), (codes, note)


def test_case_metrics_with_monai():
    a = torch.zeros(1, 20, 20)
    a[:, 5:15, 5:15] = 1
    b = torch.zeros(1, 20, 20)
    b[:, 5:15, 10:20] = 1
    m = case_metrics(a, a)
    assert m["dice"] == pytest.approx(1.0) and m["hd95"] == pytest.approx(0.0)
    m = case_metrics(a, b, spacing=[1.0, 2.0])
    assert m["dice"] == pytest.approx(0.5) and m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(0.5)
    assert m["hd95"] == pytest.approx(10.0)  # 5 columns apart at 2 mm
    empty = case_metrics(torch.zeros(1, 20, 20), a)
    assert empty["dice"] == 0.0 and empty["hd95"] is None


def test_prediction_comes_back_in_the_original_geometry(tmp_path, system2d, make_system):
    path = _img2d(tmp_path, spacing=(0.7, 1.3))
    r = predict_item(system2d, {"image": path, "case_id": "x"}, return_variance=True)
    ref = nib.load(path)
    assert tuple(r["prob"].shape[1:]) == ref.shape
    assert np.allclose(np.asarray(r["prob"].affine)[:2, :2], ref.affine[:2, :2])
    assert tuple(r["prob_pre"].shape[1:]) != ref.shape  # it was resampled to 2 mm for the network
    # 3D with orientation + spacing: the probability map is inverted onto the input's grid
    s3 = make_system(spatial_dims=3, features=(8, 16), spacing=[2.0, 2.0, 2.0])
    s3.hparams.preprocessing.orientation = "RAS"
    entry = write_phantom_case(tmp_path / "p3", "case", shape=(30, 26, 14), spacing=(1.2, 1.0, 2.5))
    r3 = predict_item(s3, entry)
    ref3 = nib.load(entry["image"])
    assert tuple(r3["prob"].shape[1:]) == ref3.shape
    assert np.allclose(np.asarray(r3["prob"].affine), ref3.affine, atol=1e-4)


def _phantom_datalist(tmp_path, n_train=6, n_val=3, shape=(40, 40)):
    items = {"training": [], "validation": []}
    for i in range(n_train + n_val):
        img, lab = phantom(shape, seed=i)
        split = "training" if i < n_train else "validation"
        items[split].append({"image": str(write_nifti(tmp_path / f"img{i}.nii.gz", img[0])),
                             "label": str(write_nifti(tmp_path / f"lab{i}.nii.gz", lab, dtype=np.uint8))})
    p = tmp_path / "datalist.json"
    p.write_text(json.dumps(items))
    return p


@pytest.mark.parametrize("ema_decay", [0.0, 0.9], ids=["weights", "weight_average"])
def test_validation_logged_during_training_equals_evaluate(tmp_path, tiny_clip, ema_decay):
    datalist = _phantom_datalist(tmp_path)
    preset = tmp_path / "preset.json"
    hp = tiny_hparams(tiny_clip, spacing=[1.0, 1.0])
    hp.train.ema_decay = ema_decay  # validation scores the weights best.pt holds: the average when there is one
    preset.write_text(json.dumps(hp.to_dict()))
    out = tmp_path / "run"
    assert cli(["train", "--preset", str(preset), "--datalist", str(datalist), "--out", str(out),
                "--max-iterations", "25", "--no-progress"]) == 0
    hist = json.loads((out / "history.json").read_text())
    assert cli(["evaluate", "--checkpoint", str(out / "best.pt"), "--datalist", str(datalist), "--split",
                "validation", "--out", str(tmp_path / "ev"), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert abs(summary["dice"]["mean"] - max(h["val_dice"] for h in hist)) < 1e-6
    assert (tmp_path / "ev" / "cases.csv").read_text().startswith("case_id,dice,hd95,precision,recall")
    ck = torch.load(out / "best.pt", weights_only=True)
    assert ck["hyper_parameters"]["model"]["vlm_film_decoder_stages"] == [0, 1]


@pytest.mark.parametrize("val_every_s,max_iterations", [(2.0, None), (1e9, None), (2.0, 10 ** 6)])
def test_a_time_budget_ends_with_one_validation_within_the_budget(tmp_path, tiny_clip, monkeypatch, val_every_s,
                                                                   max_iterations):
    """A fake clock (0.25 s per reading, 5 s per validation): the budget ends a few iterations after the last
    periodic validation falls due. That validation gives way to the final one (not two, one iteration apart, as
    every 42-minute run did: 6106 and 6107), and the run ends within its budget (the old loop: 34 s of 30).
    ``val_every_s`` 1e9: a budget that ends before any periodic validation keeps the time of the final one too
    (estimated from one validation image at the start; before: 35 s of 30). ``max_iterations`` 10**6 beside the
    budget (``--minutes`` and ``--max-iterations``, the clock ends the run): the same end (it validated twice, one
    iteration apart, over budget). The learning-rate schedule follows the training time: it starts at the warm-up's
    first value whatever the start-up took (its seconds skipped the warm-up) and has decayed by the end (with an
    iteration limit beside the budget it stayed in the warm-up)."""
    import types

    import lib.training as training
    from lib.data import load_datalist

    now = [0.0]

    def perf_counter():
        now[0] += 0.25
        return now[0]

    monkeypatch.setattr(training, "time", types.SimpleNamespace(perf_counter=perf_counter, time=perf_counter))
    real_eval = training.evaluate_items

    def slow_eval(*a, **kw):
        now[0] += 5.0
        return real_eval(*a, **kw)

    monkeypatch.setattr(training, "evaluate_items", slow_eval)
    progress = []
    real_lr_at = training.lr_at

    def lr_at(p, base, *a, **kw):
        progress.append(p)
        return real_lr_at(p, base, *a, **kw)

    monkeypatch.setattr(training, "lr_at", lr_at)
    datalist = _phantom_datalist(tmp_path, n_train=4, n_val=1)
    hp = tiny_hparams(tiny_clip, spacing=[1.0, 1.0])
    hp.train.val_every_s = val_every_s  # 2 s of training: the second periodic validation falls due about 24 s into 30
    res = training.train(hp, load_datalist(datalist, "training"), load_datalist(datalist, "validation"),
                         tmp_path / "run", time_budget_s=30.0, max_iterations=max_iterations, progress=False)
    its = [h["iteration"] for h in res.history]
    assert progress[0] == 0.0 and progress[-1] > 0.7, (progress[0], progress[-1])
    assert its[-1] == res.iterations and res.history[-1]["final"]
    # 1e9: only the final validation; 2: periodic ones before it (the second gave way to the final one)
    assert (len(its) == 1 if val_every_s > 100 else len(its) >= 2) and res.iterations > 5, its
    assert all(b - a > 2 for a, b in zip(its, its[1:])), its
    assert res.wall_seconds <= 30.0 + 1.0, res.wall_seconds  # at most one iteration (0.75 s here) over


def test_audit_flags_what_differs(tmp_path):
    a, b = [], []
    for i in range(6):
        img, lab = phantom((32, 32), seed=i)
        a.append({"image": str(write_nifti(tmp_path / f"a{i}.nii.gz", img[0])), "text": "blob",
                  "label": str(write_nifti(tmp_path / f"la{i}.nii.gz", lab)), "case_id": f"a{i}"})
        img2, lab2 = phantom((40, 32), seed=100 + i, contrast=5.0)
        b.append({"image": str(write_nifti(tmp_path / f"b{i}.nii.gz", img2[0] + 3, spacing=(0.5, 0.5))),
                  "label": str(write_nifti(tmp_path / f"lb{i}.nii.gz", lab2, spacing=(0.5, 0.5))),
                  "case_id": f"b{i}"})
    b[0]["case_id"] = "a0"
    b[0]["text"] = "blob"
    import nibabel as nib

    flipped = tmp_path / "lb1_flipped.nii.gz"  # b1's label written with a mirrored first axis: not on its grid
    nib.save(nib.Nifti1Image(np.asarray(nib.load(b[1]["label"]).dataobj), np.diag([-0.5, 0.5, 1.0, 1.0])),
             str(flipped))
    b[1]["label"] = str(flipped)
    rep = audit(a, b, "val", "test")
    checks = {f["check"] for f in rep["flags"]}
    assert {"shapes", "spacings", "distribution:p50", "missing_text", "id_overlap", "entry_keys",
            "label_geometry"} <= checks, checks
    assert rep["b"]["label_geometry_mismatch"] == ["b1"] and not rep["a"]["label_geometry_mismatch"]
    assert not {"pixel_duplicates", "unreadable"} & checks
    same = audit(a[:3], a[3:], "x", "y")
    assert not [f for f in same["flags"] if f["severity"] != "info"]
    # the command's status: 1 when an error is flagged (it was 0 whatever was found), 0 for warnings only
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"validation": a, "test": b, "x": a[:3], "y": a[3:]}))
    args = ["audit", "--datalist", str(datalist), "--no-progress", "--out"]
    assert cli(args + [str(tmp_path / "r1.json"), "--a", "validation", "--b", "test"]) == 1
    assert cli(args + [str(tmp_path / "r2.json"), "--a", "x", "--b", "y"]) == 0


def test_audit_finds_one_scan_stored_twice_and_tells_cases_in_their_own_folders_apart(tmp_path):
    """A review (2026-12-07): a copy of a training scan stored in another voxel order (LAS, its affine following)
    was not flagged as leakage (the pixels were hashed as stored); and every case of the one-folder-per-case layout
    (``c1/flair.nii.gz``, ``c2/flair.nii.gz``) got the id ``flair``, so two disjoint splits were flagged as sharing
    an image and evaluate's rows (and their seeds) were one."""
    import nibabel as nib

    from lib.data import load_datalist

    entries = {"a": [], "b": []}
    for i in range(4):
        img, lab = phantom((20, 18, 12), seed=i)
        split = "a" if i < 2 else "b"
        write_nifti(tmp_path / f"c{i}" / "flair.nii.gz", img[0])
        write_nifti(tmp_path / f"c{i}" / "seg.nii.gz", lab)
        entries[split].append({"image": f"c{i}/flair.nii.gz", "label": f"c{i}/seg.nii.gz"})
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps(entries))
    a, b = load_datalist(datalist, "a"), load_datalist(datalist, "b")
    assert [e["case_id"] for e in a + b] == ["c0/flair", "c1/flair", "c2/flair", "c3/flair"]
    args = ["audit", "--datalist", str(datalist), "--no-progress", "--a", "a", "--b", "b", "--out"]
    assert cli(args + [str(tmp_path / "r1.json")]) == 0
    assert "id_overlap" not in {f["check"] for f in json.loads((tmp_path / "r1.json").read_text())["flags"]}
    # two datalists of that layout (--datalist-b): ids of one file name, other files: a warning, not leakage
    (tmp_path / "one.json").write_text(json.dumps({"a": entries["a"][:1]}))
    (tmp_path / "two.json").write_text(json.dumps({"b": entries["b"][:1]}))
    assert cli(["audit", "--datalist", str(tmp_path / "one.json"), "--datalist-b", str(tmp_path / "two.json"),
                "--no-progress", "--a", "a", "--b", "b", "--out", str(tmp_path / "r0.json")]) == 0
    checks = {f["check"]: f["severity"] for f in json.loads((tmp_path / "r0.json").read_text())["flags"]}
    assert checks.get("id_name_overlap") == "warning" and "id_overlap" not in checks, checks
    # c0's scan again in split b, mirrored on its first axis with an affine that puts it on the same points
    src = nib.load(str(tmp_path / "c0" / "flair.nii.gz"))
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = src.shape[0] - 1
    write = tmp_path / "copy" / "flair.nii.gz"
    write.parent.mkdir()
    nib.save(nib.Nifti1Image(np.asarray(src.dataobj)[::-1].copy(), src.affine @ flip), str(write))
    assert "".join(nib.aff2axcodes(nib.load(str(write)).affine)) == "LAS"
    entries["b"].append({"image": "copy/flair.nii.gz"})
    datalist.write_text(json.dumps(entries))
    assert cli(args + [str(tmp_path / "r2.json")]) == 1
    flags = {f["check"]: f for f in json.loads((tmp_path / "r2.json").read_text())["flags"]}
    assert "c0/flair" in flags["pixel_duplicates"]["message"] and "copy/flair" in flags["pixel_duplicates"]["message"]
    # and the other way round (the stored-order copy on the second side)
    rev = ["audit", "--datalist", str(datalist), "--no-progress", "--a", "b", "--b", "a", "--out"]
    assert cli(rev + [str(tmp_path / "r3.json")]) == 1
    assert "pixel_duplicates" in {f["check"] for f in json.loads((tmp_path / "r3.json").read_text())["flags"]}


def test_audit_reads_files_as_the_loader_does(tmp_path):
    """A review: the audit read DICOM series with MONAI's plain reader, so four malformed series that training and
    inference refuse passed as normal volumes; it took spacings from NIfTI's pixdim only (NRRD, MHA and DICOM had
    none, so a 0.5 mm and a 1.5 mm NRRD split looked alike); a missing label file was not flagged."""
    import SimpleITK as sitk

    from conftest import SHARED

    def nrrd(name, spacing):
        im = sitk.GetImageFromArray(np.random.default_rng(0).normal(0, 1, (6, 8, 8)).astype(np.float32))
        im.SetSpacing(spacing)
        sitk.WriteImage(im, str(tmp_path / name))
        return str(tmp_path / name)

    a = [{"image": nrrd(f"a{i}.nrrd", (0.5, 0.5, 5.0)), "case_id": f"a{i}", "label": str(tmp_path / "none.nrrd")}
         for i in range(2)]
    b = [{"image": nrrd(f"b{i}.nrrd", (1.5, 1.5, 2.5)), "case_id": f"b{i}"} for i in range(2)]
    rep = audit(a, b, "a", "b")
    assert rep["a"]["spacings"] == {"[0.5, 0.5, 5.0]": 2} and rep["b"]["spacings"] == {"[1.5, 1.5, 2.5]": 2}
    checks = {f["check"] for f in rep["flags"]}
    assert {"spacings", "label_unreadable"} <= checks, checks
    from PIL import Image

    from lib.audit import image_stats

    Image.fromarray(np.zeros((40, 30, 3), np.uint8)).save(tmp_path / "rgb.png")  # a channel axis has no spacing
    assert image_stats({"image": str(tmp_path / "rgb.png"), "case_id": "rgb"})["spacing"] == [1.0, 1.0]
    malformed = SHARED / "dicom" / "malformed"
    if not malformed.exists():
        pytest.skip(f"real malformed DICOM not found at {malformed}")
    series = [{"image": str(d), "case_id": str(d.relative_to(malformed))} for d in sorted(malformed.glob("*/0*"))
              if d.is_dir()]
    rep = audit(series, b, "dicom", "b")
    refused = {r["case_id"] for r in rep["cases"]["dicom"] if "error" in r}
    assert {"notavolume/001", "slicecount/001", "sliceorientation/001"} <= refused, refused
    assert "gantrytilting/001" not in refused  # resampled onto an orthogonal grid, as the loader does
    assert "unreadable" in {f["check"] for f in rep["flags"]}
    # labels too: a series read as the loader reads it (the tilted series converted like its image; an uneven one
    # refused, not compared as a volume)
    tilt = str(malformed / "gantrytilting" / "001")
    rec = image_stats({"image": tilt, "label": tilt, "case_id": "t"})
    assert rec["label_matches_image"] and rec["label_shape"] == rec["shape"], rec
    rec = image_stats({"image": tilt, "label": str(malformed / "sliceincrement" / "001"), "case_id": "t"})
    assert "uneven slice increment" in rec["label_error"]


def test_histogram_equalisation_is_a_whole_image_preprocessing_step(tmp_path):
    """``intensity.type = "histogram"``: MONAI's histogram equalisation of the whole resampled image (the same
    pipeline for training, validation and the app), so that a dark X-ray and a bright one of the same anatomy give
    the same network input; refused for more than one channel."""
    from lib.config import ConfigError, PreprocConfig
    from lib.transforms import preprocess

    cfg = PreprocConfig(spatial_dims=2, num_channels=1, intensity={"type": "histogram"}, patch_size=[32, 32])
    rng = np.random.default_rng(0)
    base = rng.random((120, 100)).astype(np.float32) ** 1.5  # a skewed histogram: its median is 0.35 of the range
    pre = preprocess(cfg)
    out = []
    for k, gamma in enumerate((1.0, 0.5)):  # the same image, then a brighter rendering of it (median 0.59)
        d = pre({"image": _img2d(tmp_path, f"img{k}.nii.gz", arr=(base ** gamma) * 255.0)})
        out.append(d["image"].numpy().ravel())
    for x in out:
        assert x.min() >= 0.0 and x.max() <= 1.0
        # equalised: the quantiles of the output are (nearly) uniform
        assert np.percentile(x, [25, 50, 75]) == pytest.approx([0.25, 0.5, 0.75], abs=0.03)
    # a monotone change of brightness leaves the equalised image (nearly) unchanged
    assert np.abs(out[0] - out[1]).max() < 0.04
    cfg.num_channels = 2
    with pytest.raises(ConfigError, match="histogram"):
        cfg.resolved()


def test_labels_coded_otherwise_or_off_their_image_are_named_before_any_prediction(tmp_path, tiny_clip, monkeypatch,
                                                                                   caplog):
    """A review (2026-12-07): real lung masks stored {0, 1} under a threshold of 127 scored Dice 0.0000 with exit 0
    (an empty truth, no word); a label that did not fit its image stopped evaluate after the inferences before it,
    with nothing written; HD95 undefined in every case vanished from the summary; its unit was not said."""
    from PIL import Image

    import lib.evaluation as ev
    from lib.config import StructureConfig
    from lib.training import build_system
    from lib.transforms import InputError, TRUTH_NOTE, label_transforms

    hp = tiny_hparams(tiny_clip, spacing=[1.0, 1.0])
    hp.preprocessing.label_threshold = 127.0
    system = build_system(hp)

    def case(i, scale, shape=(40, 32)):
        img, lab = phantom(shape, seed=i)
        Image.fromarray(np.clip(img[0] * 60 + 40, 0, 255).astype(np.uint8)).save(tmp_path / f"i{i}.png")
        Image.fromarray((lab * scale).astype(np.uint8)).save(tmp_path / f"l{i}.png")
        return {"image": str(tmp_path / f"i{i}.png"), "label": str(tmp_path / f"l{i}.png"), "case_id": f"c{i}"}

    ok, coded = case(0, 255), case(1, 1)
    cases, summ = ev.evaluate_items(system, [ok, coded])
    assert TRUTH_NOTE not in cases[0] and "{1}" in cases[1][TRUTH_NOTE] and "127" in cases[1][TRUTH_NOTE]
    assert summ["truth_read_empty"] == 1 and summ["empty_truth"] == 1 and summ["hd95_units"] == "px"
    # every label read so: named in the log too, scored (a structure may be absent from every case), not refused
    import logging

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        cases, summ = ev.evaluate_items(system, [coded])
    assert summ["truth_read_empty"] == 1 and any("l1.png" in r.getMessage() and "127" in r.getMessage()
                                                 for r in caplog.records)
    caplog.clear()  # a training's validation labels, read already: logged by the check before it trains
    with caplog.at_level(logging.WARNING):
        ev.check_labels([coded], [system.label_reader()({"label": coded["label"]})])
    assert any("l1.png" in r.getMessage() and "127" in r.getMessage() for r in caplog.records)
    # a label off its image's size, last of three: refused before the first prediction
    bad = case(2, 255)
    Image.fromarray(np.zeros((40, 30), np.uint8)).save(bad["label"])
    calls = []
    real = ev.predict_preprocessed
    monkeypatch.setattr(ev, "predict_preprocessed", lambda *a, **k: calls.append(1) or real(*a, **k))
    with pytest.raises(InputError, match=r"1 of 3 label\(s\) do not fit.*c2.*\(32, 40\).*\(30, 40\)"):
        ev.evaluate_items(system, [ok, case(3, 255), bad])
    assert calls == []
    # a missing file, an entry listed twice: named before the first prediction (a review, 2026-12-08: a missing file
    # was found when its case was reached, nothing written; a repeated entry was counted twice in the statistics)
    for items, needle in (([ok, {**case(4, 255), "label": str(tmp_path / "gone.png")}],
                           r"1 of 2 entries name a file that does not exist.*c4: .*gone\.png"),
                          ([ok, case(5, 255), dict(ok)],
                           r"1 entry repeats an earlier one .*c0 \(entry 2, the same files as entry 0\)")):
        with pytest.raises(InputError, match=needle):
            ev.evaluate_items(system, items)
    assert calls == []
    from lib import training  # a training's validation labels: checked before it trains, not at its validation

    with pytest.raises(InputError, match=r"1 of 1 label\(s\) do not fit"):
        training.train(hp, [ok], [bad], tmp_path / "run", max_iterations=2, progress=False)
    assert not (tmp_path / "run" / "last.pt").exists()
    # a mask written from PIL's (rows, columns) array into a NIfTI beside its PNG: transposed, and said so
    nib_lab = tmp_path / "rows_cols.nii.gz"
    write_nifti(nib_lab, np.asarray(Image.open(ok["label"])))
    with pytest.raises(InputError, match=r"do not fit.*\(32, 40\).*\(40, 32\) \(transposed"):
        ev.evaluate_items(system, [{**ok, "label": str(nib_lab)}])
    # a label stored with its axes swapped and an affine that puts them back, beside an image with a geometry:
    # accepted (evaluate reorders it by its affine; a second review: the size check refused it)
    import nibabel as nib

    write_nifti(tmp_path / "img.nii.gz", np.asarray(Image.open(ok["image"])).T.astype(np.float32))
    swapped = tmp_path / "swapped.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(Image.open(ok["label"])), np.eye(4)[:, [1, 0, 2, 3]]), str(swapped))
    item = {"image": str(tmp_path / "img.nii.gz"), "label": str(swapped), "case_id": "sw"}
    ev.check_labels([item], [system.label_reader()({"label": str(swapped)})])
    cases, _ = ev.evaluate_items(system, [item])
    assert cases[0]["fg_fraction_label"] == pytest.approx(float((np.asarray(Image.open(ok["label"])) > 127).mean()))
    # HD95 of a PNG image is in pixels, whatever its label's format: a NIfTI label beside it (3D Slicer's, 1 mm a
    # pixel) was reported in mm (a review); in mm where image and label both have a geometry, measured with the
    # label's spacing; millimetres and pixels are not averaged together (HD95 per unit)
    slicer = write_nifti(nib_lab, np.asarray(Image.open(ok["label"])).T.copy())
    img2 = write_nifti(tmp_path / "img2.nii.gz", np.asarray(Image.open(ok["image"])).T.astype(np.float32),
                       spacing=(2.0, 2.0))
    lab2 = write_nifti(tmp_path / "lab2.nii.gz", np.asarray(Image.open(ok["label"])).T.copy(), spacing=(2.0, 2.0))
    spacings = []
    real_metrics = ev.case_metrics
    monkeypatch.setattr(ev, "case_metrics", lambda *a, **k: spacings.append(k.get("spacing")) or real_metrics(*a, **k))
    cases, summ = ev.evaluate_items(system, [ok, {**ok, "label": str(slicer), "case_id": "nii"},
                                             {"image": str(img2), "label": str(lab2), "case_id": "mm"}])
    assert [c["units"] for c in cases] == ["px", "px", "mm"] and summ["hd95_units"] == "mixed (mm and px)"
    assert spacings[:2] == [None, None] and [float(v) for v in spacings[2]] == [2.0, 2.0]
    assert cases[1]["hd95"] == pytest.approx(cases[0]["hd95"])
    assert "hd95" not in summ and summ["hd95_by_unit"]["mm"]["mean"] == pytest.approx(cases[2]["hd95"]) \
        and summ["hd95_by_unit"]["px"]["mean"] == pytest.approx(cases[0]["hd95"])
    monkeypatch.setattr(ev, "case_metrics", real_metrics)
    # a prompted model's structures: a label none of whose values is any structure's
    two = [StructureConfig(name="upper", value=1, prompts=["upper"], truth={"values": [1]}).resolved(),
           StructureConfig(name="lower", value=2, prompts=["lower"], truth={"above": 2}).resolved()]
    Image.fromarray((np.asarray(Image.open(ok["label"])) > 0).astype(np.uint8) * 2).save(tmp_path / "two.png")
    lab = label_transforms(hp.preprocessing, structures=two)({"label": str(tmp_path / "two.png")})["label"]
    assert "{2}" in lab.meta[TRUTH_NOTE] and "upper: values [1]; lower: above 2" in lab.meta[TRUTH_NOTE]
    Image.fromarray((np.asarray(Image.open(ok["label"])) > 0).astype(np.uint8) * 3).save(tmp_path / "three.png")
    assert TRUTH_NOTE not in label_transforms(hp.preprocessing, structures=two)(
        {"label": str(tmp_path / "three.png")})["label"].meta
    # values read as background beside values read (a review, 2026-12-08: the Dice fell without a word): a
    # value no structure takes (2: upper is 1, lower above 2) beside a value read (1), a {0, 1, 255} mask under a
    # threshold of 127
    from lib.transforms import TRUTH_UNREAD

    mask = np.asarray(Image.open(ok["label"])) > 0
    half = np.zeros_like(mask)
    half[:, : mask.shape[1] // 2] = True
    Image.fromarray(np.where(mask & half, 2, np.where(mask, 1, 0)).astype(np.uint8)).save(tmp_path / "recoded.png")
    lab = label_transforms(hp.preprocessing, structures=two)({"label": str(tmp_path / "recoded.png")})["label"]
    assert lab.meta[TRUTH_UNREAD] == [2.0] and TRUTH_NOTE not in lab.meta
    Image.fromarray(np.where(mask & half, 1, np.where(mask, 255, 0)).astype(np.uint8)).save(tmp_path / "mixed.png")
    mixed = {**ok, "label": str(tmp_path / "mixed.png"), "case_id": "mixed"}
    cases, summ = ev.evaluate_items(system, [ok, mixed])
    assert TRUTH_UNREAD not in cases[0] and cases[1][TRUTH_UNREAD] == [1.0] and TRUTH_NOTE not in cases[1]
    assert summ["truth_unread_values"] == {"1": 1}


def test_a_summary_says_how_many_cases_each_mean_is_over(tmp_path):
    """Found by a review: with one perfect case and one total miss (nothing predicted), the summary gave Dice 0.5 but
    HD95 mean 0.0 and precision 1.0 -- the miss has neither, and was left out without a word."""
    from lib.evaluation import case_metrics, summarize

    truth = torch.zeros(1, 20, 20)
    truth[0, 5:15, 5:15] = 1
    cases = [case_metrics(truth, truth), case_metrics(torch.zeros_like(truth), truth)]
    assert cases[1]["hd95"] is None and cases[1]["precision"] is None and cases[1]["dice"] == 0.0
    s = summarize(cases)
    assert s["n"] == 2 and s["dice"]["n"] == 2 and s["dice"]["mean"] == 0.5
    assert s["hd95"]["n"] == 1 and s["hd95"]["undefined"] == 1 and s["precision"]["undefined"] == 1
    assert s["empty_prediction"] == 1
    assert summarize(cases[:1])["empty_prediction"] == 0 and summarize(cases[:1])["hd95"]["undefined"] == 0
    # undefined in every case: said, not left out (a review)
    assert summarize(cases[1:] * 2)["hd95"] == {"n": 0, "undefined": 2}
    # a prompted model's misses are its structures' (a second review: always 0, its case rows have no precision)
    prompted = [{"dice": 0.5, "structures": {"lesion": cases[1], "vertebra": cases[0]}},
                {"dice": 1.0, "structures": {"lesion": cases[0], "vertebra": cases[0]}}]
    s = summarize(prompted)
    assert s["empty_prediction"] == 1 and s["empty_prediction_by_structure"] == {"lesion": 1, "vertebra": 0}
    # a data set of images with and without a physical pixel size: HD95 per unit, per structure too
    s = summarize([{**prompted[0], "units": "mm"}, {**prompted[1], "units": "px"}])
    assert "hd95" not in s["structures"]["vertebra"] and s["hd95_units"] == "mixed (mm and px)"
    assert {u: v["n"] for u, v in s["structures"]["vertebra"]["hd95_by_unit"].items()} == {"mm": 1, "px": 1}
    # bench/cxr_groups.py reads these rows: a total miss (precision null) made it raise a TypeError (a review)
    rows = [{**c, "case_id": f"CHNCXR_000{i}_0"} for i, c in enumerate(cases)]
    (tmp_path / "cases.json").write_text(json.dumps(rows))
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "cxr_groups.py"), str(tmp_path / "cases.json"),
                          "--out", str(tmp_path / "groups.json")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-1500:]
    group = json.loads((tmp_path / "groups.json").read_text())[str(tmp_path / "cases.json")][0]
    assert group["n"] == 2 and group["dice"] == 0.5 and group["precision"] == 1.0 and group["precision_undefined"] == 1


def test_audit_sees_stored_data_types_and_multi_channel_labels(tmp_path):
    """Found by a review: every image read as float32 (the loader's cast), so "stored data types differ" could never
    be flagged; a two-file (multi-channel) image was flagged "label and image sizes differ" against its own label."""
    a16 = (np.random.default_rng(0).random((16, 16, 8)) * 1000).astype(np.int16)
    nib.save(nib.Nifti1Image(a16, np.eye(4)), str(tmp_path / "ct16.nii.gz"))
    nib.save(nib.Nifti1Image((a16 % 255).astype(np.uint8), np.eye(4)), str(tmp_path / "ct8.nii.gz"))
    nib.save(nib.Nifti1Image((a16 > 500).astype(np.uint8), np.eye(4)), str(tmp_path / "lab.nii.gz"))
    two = [str(tmp_path / "ct16.nii.gz")] * 2
    rep = audit([{"image": two, "label": str(tmp_path / "lab.nii.gz"), "case_id": "mc"}],
                [{"image": str(tmp_path / "ct8.nii.gz"), "label": str(tmp_path / "lab.nii.gz"), "case_id": "u8"}],
                "a", "b", progress=False)
    checks = {f["check"] for f in rep["flags"]}
    assert "dtypes" in checks and "label_shape" not in checks, rep["flags"]
    assert rep["a"]["label_shape_mismatch"] == [] and rep["b"]["label_shape_mismatch"] == []


def test_which_model_an_image_goes_to_is_what_the_loader_reads(tmp_path):
    """A review: the trainers, batch infer and scoring chose a file's model (2D or 3D) by a guess that took a trailing
    axis of <= 4 as channels: a 256x256x4 NIfTI volume (as the vendor series convert) went to the 2D model, whose
    preprocessing then refused it as 3D. Now the header is read as MONAI's loader reads the file (NIfTI: channels in
    the 4th axis); a one-slice volume goes to the 2D model, which takes it."""
    import itk
    from monai.transforms import EnsureChannelFirst, LoadImage

    from lib.transforms import image_spatial_dims

    files = []
    for shape in ((30, 50), (30, 50, 1), (64, 64, 4), (20, 22, 12, 2)):
        files.append(write_nifti(tmp_path / f"n{'x'.join(map(str, shape))}.nii.gz", np.zeros(shape, np.float32)))
    for shape in ((50, 30), (4, 50, 30), (1, 50, 30)):
        for ext in (".nrrd", ".mha"):
            p = tmp_path / f"i{'x'.join(map(str, shape))}{ext}"
            itk.imwrite(itk.image_from_array(np.zeros(shape, np.float32)), str(p))
            files.append(p)
    from pathlib import Path

    import nrrd

    for kinds in (["none"] * 3, ["???"] * 3, ["domain"] * 3):  # a second review: "none" and "???" are spatial
        p = tmp_path / f"k_{kinds[0].strip('?') or 'q'}.nrrd"
        nrrd.write(str(p), np.zeros((40, 30, 20), np.float32), {"kinds": kinds, "space": "left-posterior-superior",
                                                                  "space directions": np.eye(3),
                                                                  "space origin": np.zeros(3)})
        files.append(p)
    dims = {Path(p).name: image_spatial_dims(p) for p in files}

    def model_of(p):  # the loader's spatial axes; one slice: the 2D model's (CheckImaged reads it as 2D)
        spatial = EnsureChannelFirst()(LoadImage(image_only=True)(str(p))).shape[1:]
        return 2 if len(spatial) == 2 or spatial[-1] == 1 else 3

    assert dims == {Path(p).name: model_of(p) for p in files}
    assert dims["n64x64x4.nii.gz"] == 3 and dims["n20x22x12x2.nii.gz"] == 3 and dims["n30x50.nii.gz"] == 2
    # a review (2026-12-07): an X-ray 3D Slicer saved as a one-slice volume, which the 2D models take, went to the
    # 3D model for training, scoring and batch inference
    assert dims["n30x50x1.nii.gz"] == 2 and dims["i1x50x30.nrrd"] == 2 and dims["i1x50x30.mha"] == 2


def test_a_label_off_its_image_s_grid_is_refused_in_training_and_evaluate(tmp_path, make_system, monkeypatch):
    """A review: a datalist label whose affine differs from its image's (here the image is stored LPS, its exact
    voxel mask with ``np.eye(4)``) was reoriented by its own affine in training -- 0 of 144 foreground voxels on the
    image's blob -- while evaluate scored the arrays as loaded. The datastore refused such a label on save; the
    datalist path did not. Now both refuse it naming the two files; a label of the same grid (or only another
    origin, the qform/sform case the datastore accepts) passes."""
    import nibabel as nib

    from lib.evaluation import evaluate_items, make_inferer, preprocess_item
    from lib.transforms import InputError

    system = make_system(spacing=[1.0, 1.0, 1.0], spatial_dims=3, features=(8, 16))
    system.hparams.preprocessing.orientation = "RAS"
    img = np.zeros((24, 24, 16), np.float32)
    img[2:8, 3:9, 4:8] = 1.0
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    image = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(img, lps), str(image))
    good, bad, shifted = tmp_path / "good.nii.gz", tmp_path / "bad.nii.gz", tmp_path / "shifted.nii.gz"
    nib.save(nib.Nifti1Image(img.astype(np.uint8), lps), str(good))
    nib.save(nib.Nifti1Image(img.astype(np.uint8), np.eye(4)), str(bad))
    moved = lps.copy()
    moved[:3, 3] = [3.0, -2.0, 1.5]
    nib.save(nib.Nifti1Image(img.astype(np.uint8), moved), str(shifted))
    # the same mask stored in another voxel order (RAS, flipped axes and affine): on the same points, so accepted
    # (a second review: the first version refused it, and the shipped CT's reference segmentation with it)
    reordered = tmp_path / "reordered.nii.gz"
    nib.save(nib.as_closest_canonical(nib.load(str(good))), str(reordered))
    assert nib.aff2axcodes(nib.load(str(reordered)).affine) == ("R", "A", "S")
    item = {"image": str(image), "case_id": "c"}
    for label in (good, shifted, reordered):
        preprocess_item(system, {**item, "label": str(label)}, with_label=True)
    with pytest.raises(InputError, match=r"bad\.nii\.gz: the label is not on its image's grid .*img\.nii\.gz.*"
                                         r"orientation RAS vs LPS"):
        preprocess_item(system, {**item, "label": str(bad)}, with_label=True)
    inf = make_inferer(system, steps=1)
    ref, _ = evaluate_items(system, [{**item, "label": str(good)}], inf)
    other, _ = evaluate_items(system, [{**item, "label": str(reordered)}], inf)  # put in the image's voxel order
    assert other[0]["dice"] == pytest.approx(ref[0]["dice"]) and other[0]["recall"] == pytest.approx(ref[0]["recall"])
    with pytest.raises(InputError, match="the label is not on its image's grid"):
        evaluate_items(system, [{**item, "label": str(bad)}], inf)
    # off its grid and last of two: named from the NIfTI headers before the first prediction (was: after it)
    import lib.evaluation as ev

    calls, real = [], ev.predict_preprocessed
    monkeypatch.setattr(ev, "predict_preprocessed", lambda *a, **k: calls.append(1) or real(*a, **k))
    n = 0
    with pytest.raises(InputError, match=r"1 of 2 label\(s\) do not fit their image \(size or grid\).*bad\.nii\.gz: "
                                         r"the label is not on its image's grid"):
        evaluate_items(system, [{**item, "label": str(good)}, {**item, "label": str(bad)}], inf)
    assert len(calls) == n


def test_a_2d_label_stored_in_another_voxel_order_is_trained_in_the_image_s_order(tmp_path, make_system):
    """A review (2026-12-07): a 2D label on its image's points but stored with an axis reversed (or the axes
    swapped) passed the grid check, and with no orientation step (every 2D preset) its training patches were the
    mirrored mask -- Dice 0.667 against the truth on a real X-ray -- while evaluate scored it the right way round.
    The label is put into the image's voxel order; swapped axes of a non-square image are accepted as evaluate
    accepts them (they were refused as "image size differs")."""
    import nibabel as nib

    from lib.evaluation import preprocess_item

    system = make_system()  # 2D, no orientation step
    assert not system.hparams.preprocessing.orientation
    img = np.zeros((40, 30), np.float32)
    img[3:15, 4:10] = 1.0  # an asymmetric blob
    image = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(img, np.eye(4)), str(image))
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = img.shape[0] - 1  # the same points, x stored from the other end
    swap = np.eye(4)[[1, 0, 2, 3]]  # the same points, the axes swapped
    labels = {"same": (img, np.eye(4)), "flipped": (img[::-1], flip), "swapped": (img.T, swap)}
    got = {}
    for name, (arr, affine) in labels.items():
        nib.save(nib.Nifti1Image(np.ascontiguousarray(arr).astype(np.uint8), affine), str(tmp_path / f"{name}.nii.gz"))
        out = preprocess_item(system, {"image": str(image), "label": str(tmp_path / f"{name}.nii.gz"), "case_id": "c"},
                              with_label=True)
        got[name] = np.asarray(out["label"])[0]
    assert got["same"].sum() > 0
    for name in ("flipped", "swapped"):
        assert np.array_equal(got[name], got["same"]), (name, int((got[name] != got["same"]).sum()))


def test_a_zero_spacing_axis_keeps_its_spacing_and_old_run_settings_still_resolve(tmp_path):
    """A second review. The resampled-grid check divided by a spacing of 0, which MONAI's Spacingd reads as "keep this
    axis' spacing": every image was refused (an OverflowError). And the run-only training checks (seed, threads,
    state intervals, hard sampling) ran at every HParams.resolved, so a checkpoint written with ``num_threads: 0``
    (0 meant the default) loaded but could not be published again after a fine-tune; they now run where a training
    starts."""
    from lib.config import ConfigError, HParams, PreprocConfig, TrainConfig, check_train
    from lib.transforms import preprocess

    path = write_nifti(tmp_path / "ct.nii.gz", np.random.default_rng(0).random((20, 20, 8)).astype(np.float32),
                       spacing=(0.8, 0.8, 5.0))
    out = preprocess(PreprocConfig(spatial_dims=3, spacing=[1.0, 1.0, 0.0], patch_size=[16, 16, 8]))(
        {"image": str(path)})
    assert tuple(out["image"].shape) == (1, 16, 16, 8)
    HParams(train=TrainConfig(num_threads=0, state_every_s=0)).resolved()  # an old checkpoint's run settings
    for bad in ({"num_threads": 0}, {"state_every_s": 0}, {"seed": -1}, {"hard_share": 2.0}):
        with pytest.raises(ConfigError, match="train\\."):
            check_train(TrainConfig(**bad))


def _a_finished_run_on_a_fake_clock(tmp_path, tiny_clip, monkeypatch):
    """A fake clock for lib.training (each reading 0.25 s later; ``now[0]`` moves it), and a 30-s run on it:
    ``(now, training items, validation items, its resume.pt)``."""
    import types

    import lib.training as training
    from lib.data import load_datalist

    now = [0.0]

    def perf_counter():
        now[0] += 0.25
        return now[0]

    monkeypatch.setattr(training, "time", types.SimpleNamespace(perf_counter=perf_counter, time=perf_counter))
    datalist = _phantom_datalist(tmp_path, n_train=4, n_val=1)
    tr, va = load_datalist(datalist, "training"), load_datalist(datalist, "validation")
    training.train(tiny_hparams(tiny_clip, spacing=[1.0, 1.0]), tr, va, tmp_path / "run", time_budget_s=30.0,
                   progress=False)
    return now, tr, va, tmp_path / "run" / "resume.pt"


def test_a_state_written_before_the_schedule_followed_training_time_resumes_where_it_was(tmp_path, tiny_clip,
                                                                                        monkeypatch):
    """A second review: a ``resume.pt`` without ``loop_start`` (written before 2026-12-06) restarted the time-based
    schedule at 0 -- a second warm-up to the peak rate, late in the run. Such a state resumes with the schedule it
    ran (progress = elapsed / budget)."""
    import lib.training as training

    progress = []
    real_lr_at = training.lr_at
    monkeypatch.setattr(training, "lr_at", lambda p, base, *a, **k: progress.append(p) or real_lr_at(p, base, *a, **k))
    _, tr, va, state_path = _a_finished_run_on_a_fake_clock(tmp_path, tiny_clip, monkeypatch)
    st = torch.load(state_path, weights_only=False)
    for k in ("loop_start", "validated_at"):  # as the old code wrote it, interrupted half-way
        st.pop(k)
    st["elapsed_seconds"] = 15.0
    torch.save(st, state_path)
    progress.clear()
    hp = tiny_hparams(tiny_clip, spacing=[1.0, 1.0])
    training.train(hp, tr, va, tmp_path / "run", time_budget_s=30.0, progress=False, resume=True)
    assert progress and progress[0] > 0.3, progress[:3]


def test_a_resumed_run_counts_its_own_start_up_against_the_budget(tmp_path, tiny_clip, monkeypatch):
    """A review: the resumed clock started after the model, the VLM and the data were loaded, so every resume ran
    its start-up time over the budget (budget 10 s, 5.8 s spent, resumed: 9.7 s more). Fake clock: the state has
    spent 25 of 30 s; the resumed process's start-up takes 10 s, so it trains no further."""
    import lib.training as training

    now, tr, va, state_path = _a_finished_run_on_a_fake_clock(tmp_path, tiny_clip, monkeypatch)
    st = torch.load(state_path, weights_only=False)
    st["elapsed_seconds"] = 25.0
    torch.save(st, state_path)
    build = training.build_system

    def slow_build(*a, **k):
        now[0] += 10.0  # loading the VLM, caching the data
        return build(*a, **k)

    monkeypatch.setattr(training, "build_system", slow_build)
    res = training.train(tiny_hparams(tiny_clip, spacing=[1.0, 1.0]), tr, va, tmp_path / "run", time_budget_s=30.0,
                         progress=False, resume=True)
    assert res.iterations == st["iteration"], (res.iterations, st["iteration"])


def test_the_validation_estimate_is_not_the_first_call_s_start_up(tmp_path, tiny_clip, monkeypatch):
    """The estimate of a validation's time (used until one has run) was the first validation image's time x their
    number; the first call pays a one-off start (6.2 s against 0.37 s for the next image under AVX2 dispatch, 392 s
    estimated for a 23 s validation), so a budget shorter than that ended before its first iteration. It is now the
    second image's time. Fake clock: the first call costs 15 s, each image after it 0.5 s; 3 validation images,
    a 40 s budget (the old estimate, 45 s, ended it before its first iteration)."""
    import types

    import lib.training as training
    from lib.data import load_datalist

    now = [0.0]

    def perf_counter():
        now[0] += 0.25
        return now[0]

    monkeypatch.setattr(training, "time", types.SimpleNamespace(perf_counter=perf_counter, time=perf_counter))
    real_eval, calls = training.evaluate_items, []

    def eval_with_start_up(system, items, *a, **kw):
        now[0] += 15.0 if not calls else 0.5 * len(items)
        calls.append(len(items))
        return real_eval(system, items, *a, **kw)

    monkeypatch.setattr(training, "evaluate_items", eval_with_start_up)
    datalist = _phantom_datalist(tmp_path, n_train=4, n_val=3)
    hp = tiny_hparams(tiny_clip, spacing=[1.0, 1.0])
    hp.train.val_every_s = 1e9
    res = training.train(hp, load_datalist(datalist, "training"), load_datalist(datalist, "validation"),
                         tmp_path / "run", time_budget_s=40.0, progress=False)
    assert res.iterations > 5 and calls[:2] == [1, 1], (res.iterations, calls)


def test_a_png_label_of_a_nifti_image_is_compared_as_loaded(tmp_path, make_system):
    """A PNG has no geometry (the reader's identity affine): evaluate compares it with the image's prediction as
    loaded, and does not "reorder" it to follow a NIfTI image's axis signs (the first version of the reordering
    flipped it)."""
    import nibabel as nib
    from monai.transforms import LoadImage
    from PIL import Image

    from lib.evaluation import evaluate_items, make_inferer

    system = make_system(spacing=[1.0, 1.0])
    img = np.zeros((40, 36), np.float32)
    img[4:16, 6:20] = 1.0
    image = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(img, np.diag([-1.0, 1.0, 1.0, 1.0])), str(image))  # x flipped
    nii_label, png_label = tmp_path / "lab.nii.gz", tmp_path / "lab.png"
    nib.save(nib.Nifti1Image(img.astype(np.uint8), np.diag([-1.0, 1.0, 1.0, 1.0])), str(nii_label))
    Image.fromarray((img.T * 255).astype(np.uint8)).save(png_label)
    assert np.array_equal(np.asarray(LoadImage(image_only=True)(str(png_label))) > 0, img > 0)  # loads alike
    inf = make_inferer(system, steps=1)
    a, _ = evaluate_items(system, [{"image": str(image), "label": str(nii_label), "case_id": "c"}], inf)
    b, _ = evaluate_items(system, [{"image": str(image), "label": str(png_label), "case_id": "c"}], inf)
    assert b[0]["dice"] == pytest.approx(a[0]["dice"]) and b[0]["recall"] == pytest.approx(a[0]["recall"])


def test_a_2d_label_saved_by_slicer_as_a_one_slice_volume_trains_and_scores(tmp_path, make_system):
    """A review: 3D Slicer opens a PNG X-ray as a one-slice volume and its Submit Label saves the label so, (X, Y, 1)
    NIfTI. The datastore accepted it as the image's label, then training refused it ("image size (40, 36) differs
    from its label's (40, 36, 1)") -- every training of the 2D model failed with a 500 -- and evaluate did too. It is
    read as the 2D label it is: the same truth as the PNG label, the same Dice."""
    from PIL import Image

    from lib.datastore import check_label_file
    from lib.evaluation import make_inferer
    from lib.transforms import preprocess

    system = make_system(spacing=[2.0, 2.0])
    img = np.zeros((36, 40), np.uint8)  # rows, columns: MONAI reads the PNG as (x, y) = (40, 36)
    img[4:16, 6:30] = 200
    image, png_label, slicer_label = tmp_path / "x.png", tmp_path / "lab.png", tmp_path / "lab.nii.gz"
    Image.fromarray(img).save(image)
    Image.fromarray((img > 0).astype(np.uint8)).save(png_label)
    nib.save(nib.Nifti1Image((img.T > 0).astype(np.uint8)[:, :, None], np.diag([-1.0, -1.0, 1.0, 1.0])),
             str(slicer_label))  # Slicer's IJK (x, y, 0) in its RAS
    assert check_label_file(str(slicer_label), str(image), "x") == [1]  # Submit Label accepts it
    pre = preprocess(system.hparams.preprocessing)
    a, b = pre({"image": str(image), "label": str(png_label)}), pre({"image": str(image), "label": str(slicer_label)})
    assert tuple(b["label"].shape) == tuple(a["label"].shape) and torch.equal(b["label"], a["label"])
    assert float(a["label"].sum()) > 0
    inf = make_inferer(system, steps=1)
    pa, _ = evaluate_items(system, [{"image": str(image), "label": str(png_label), "case_id": "c"}], inf)
    pb, _ = evaluate_items(system, [{"image": str(image), "label": str(slicer_label), "case_id": "c"}], inf)
    assert pb[0]["dice"] == pytest.approx(pa[0]["dice"]) and pb[0]["recall"] == pytest.approx(pa[0]["recall"])


def test_patch_centre_weights_are_refused_before_anything_is_loaded(tmp_path, tiny_clip, monkeypatch):
    """A review: ``preprocessing.pos`` / ``neg`` of 0 and 0, a negative or NaN (NaN drew every centre one way) were
    accepted by the configuration and refused by MONAI's crop only after the VLM had loaded and the training set had
    been cached."""
    import lib.training as training
    from lib.config import ConfigError
    from lib.data import load_datalist
    from lib.vlm import VLMEncoder

    datalist = _phantom_datalist(tmp_path, n_train=2, n_val=1)
    tr, va = load_datalist(datalist, "training"), load_datalist(datalist, "validation")
    loaded = []
    real = VLMEncoder.from_pretrained.__func__
    monkeypatch.setattr(VLMEncoder, "from_pretrained", classmethod(lambda cls, *a, **k: loaded.append(1) or
                                                                   real(cls, *a, **k)))
    for pos, neg in ((0.0, 0.0), (-1.0, 1.0), (float("nan"), 1.0), ("many", 1.0)):
        hp = tiny_hparams(tiny_clip)
        hp.preprocessing.pos, hp.preprocessing.neg = pos, neg
        with pytest.raises(ConfigError, match=r"preprocessing\.pos and \.neg"):
            training.train(hp, tr, va, tmp_path / "run", max_iterations=1, progress=False)
    assert loaded == []
    hp = tiny_hparams(tiny_clip)
    hp.preprocessing.pos, hp.preprocessing.neg = 0, 1  # background centres only: allowed
    assert (hp.preprocessing.resolved().pos, hp.preprocessing.resolved().neg) == (0.0, 1.0)
