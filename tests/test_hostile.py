"""Hostile and broken files through the command line (the same loading code serves the app): each is refused with
exit 2 and one line naming the problem, before anything large is allocated; the odd-but-valid ones just work.
The README's hostile-input table lists these with the server-side cases of test_monailabel_app/test_dicomweb_ohif."""

from __future__ import annotations

import gzip
import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from lib.checkpoint import save_checkpoint
from lib.cli import main as cli
from lib.training import build_system
from conftest import SHARED, tiny_hparams


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tiny_clip):
    d = tmp_path_factory.mktemp("ck")
    out = {}
    for dims in (2, 3):
        torch.manual_seed(0)
        hp = tiny_hparams(tiny_clip, spatial_dims=dims, features=(8, 16), steps=1)
        s = build_system(hp)
        out[dims] = save_checkpoint(d / f"m{dims}d.pt", s.model, s.hparams)
    torch.manual_seed(0)  # "3s": a 3D model that resamples to 1 mm
    s = build_system(tiny_hparams(tiny_clip, spatial_dims=3, features=(8, 16), steps=1, spacing=[1.0, 1.0, 1.0]))
    out["3s"] = save_checkpoint(d / "m3s.pt", s.model, s.hparams)
    torch.manual_seed(0)  # "2r": a model of 8-bit images (intensity range 0..255, as the X-ray presets)
    hp = tiny_hparams(tiny_clip, spatial_dims=2, features=(8, 16), steps=1)
    hp.preprocessing.intensity = {"type": "range", "a_min": 0.0, "a_max": 255.0}
    s = build_system(hp)
    out["2r"] = save_checkpoint(d / "m2r.pt", s.model, s.hparams)
    return out


def _nii(path, data, affine=None, dtype=np.float32):
    nib.save(nib.Nifti1Image(np.asarray(data, dtype), np.eye(4) if affine is None else affine), str(path))
    return path


def _header_only(path, shape, affine=None, data_bytes=64):
    """A .nii whose header claims ``shape`` (and ``affine``) followed by ``data_bytes`` of voxels."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.float32)
    hdr["dim"][0] = len(shape)
    hdr["dim"][1:1 + len(shape)] = shape
    hdr["pixdim"][1:4] = 1.0
    hdr["vox_offset"] = 352
    hdr["sform_code"] = 1
    hdr["qform_code"] = 0
    for i, row in enumerate(("srow_x", "srow_y", "srow_z")):
        hdr[row] = (np.eye(4) if affine is None else np.asarray(affine, float))[i]
    raw = hdr.binaryblock + b"\x00" * 4 + b"\x00" * data_bytes
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def _png(path, mode, size=(40, 36)):
    rng = np.random.default_rng(0)
    if mode == "I;16":
        Image.fromarray(rng.integers(0, 65535, size[::-1]).astype(np.uint16)).save(path)
    elif mode == "P":
        Image.fromarray(rng.integers(0, 255, size[::-1]).astype(np.uint8)).convert("P").save(path)
    else:
        Image.new(mode, size).save(path)
    return path


def _text_file(path, text):
    path.write_bytes(text.encode() + b"\x00" * 64)
    return path


def _tiff_header(path, width, height):
    """A deflate TIFF whose header declares width x height 8-bit pixels, with one small strip (a decompression
    bomb's header: the pixels a reader would inflate are not needed to refuse it)."""
    import struct
    import zlib

    data = zlib.compress(b"\x00" * 4096)
    tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 8), (262, 3, 1), (273, 4, 0), (277, 3, 1),
            (278, 4, height), (279, 4, len(data))]
    start = 8 + 2 + 12 * len(tags) + 4
    ifd = struct.pack("<H", len(tags)) + b"".join(
        struct.pack("<HHII", tag, kind, 1, start if tag == 273 else value) if kind == 4 else
        struct.pack("<HHIHH", tag, kind, 1, value, 0) for tag, kind, value in tags) + struct.pack("<I", 0)
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8) + ifd + data)
    return path


def _predict(ck, image, out):
    return cli(["predict", "--checkpoint", str(ck), "--image", str(image), "--out", str(out), "--no-progress"])


def _nonfinite(tmp_path):
    a = np.zeros((30, 30), np.float32)
    a[3, 4] = np.nan
    return _nii(tmp_path / "nan.nii.gz", a)


def _truncated(tmp_path):
    good = _nii(tmp_path / "good.nii.gz", np.random.default_rng(0).random((40, 40)))
    p = tmp_path / "truncated.nii.gz"
    p.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    return p


# (case, model dims, how to make the file, the phrase the one-line error must contain)
REFUSED = [
    ("nifti header claiming 2.7e13 voxels", 3, lambda t: _header_only(t / "huge.nii", (30000, 30000, 30000)),
     "more than this server's limit"),
    ("nifti with a zero-sized dimension", 3, lambda t: _header_only(t / "empty.nii", (0, 10, 10)), "an empty image"),
    ("singular affine", 2, lambda t: _header_only(t / "sing.nii", (30, 30), np.diag([1.0, 0.0, 1.0, 1.0]), 3600),
     "singular"),
    ("NaN voxels", 2, _nonfinite, "NaN"),
    ("4D image to a 3D model", 3, lambda t: _nii(t / "4d.nii.gz", np.zeros((20, 20, 20, 3))),
     "expects 1 channel(s), the image has 3"),
    # a review: only NIfTI and PNG headers were checked; NRRD and MetaImage were read whole (a gzip NRRD of zeros is
    # a decompression bomb), and a spacing off by orders of magnitude asked the resampling for a grid beyond the limit
    ("NRRD header claiming 2.7e13 voxels", 3, lambda t: _text_file(
        t / "huge.nrrd", "NRRD0004\ntype: float\ndimension: 3\nsizes: 30000 30000 30000\nendian: little\nencoding: gzip\n\n"),
     "more than this server's limit"),
    ("MetaImage header claiming 2.7e13 voxels", 3, lambda t: _text_file(
        t / "huge.mha", "ObjectType = Image\nNDims = 3\nDimSize = 30000 30000 30000\nElementType = MET_FLOAT\n"
                        "ElementDataFile = LOCAL\n"), "more than this server's limit"),
    # a review: any other format went unchecked; a 453 KB deflate TIFF of 17000 x 17000 took a server past 7 GB
    ("TIFF header claiming 9e8 pixels", 2, lambda t: _tiff_header(t / "huge.tif", 30000, 30000),
     "more than this server's limit"),
    ("spacing in micrometres written as millimetres", "3s",
     lambda t: _nii(t / "um.nii.gz", np.zeros((20, 20, 20)), np.diag([2000.0, 2000.0, 2000.0, 1.0])),
     "is the header's spacing right"),
    ("3D image to a 2D model", 2, lambda t: _nii(t / "3d.nii.gz", np.zeros((20, 20, 20))), "3D image"),
    ("truncated .nii.gz", 2, _truncated, "cannot read"),
    ("not an image at all", 2, lambda t: (t / "x.nii.gz").write_bytes(b"GIF89a nonsense") and t / "x.nii.gz",
     "cannot read"),
    ("RGBA PNG", 2, lambda t: _png(t / "rgba.png", "RGBA"), "transparent"),
    ("palette PNG", 2, lambda t: _png(t / "pal.png", "P"), "palette"),
    ("missing file", 2, lambda t: t / "nowhere.nii.gz", "not found"),
    # a review: a 16-bit X-ray clipped to 0..255 is a white image, segmented without a word
    ("16-bit PNG to a model of 8-bit images", "2r", lambda t: _png(t / "sixteen.png", "I;16"),
     "of its values are above 255"),
]


@pytest.mark.parametrize("case, dims, make, phrase", REFUSED, ids=[r[0] for r in REFUSED])
def test_hostile_files_are_refused_with_one_clear_line(tmp_path, ckpts, capsys, case, dims, make, phrase):
    image = make(tmp_path)
    assert _predict(ckpts[dims], image, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert phrase in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_an_8_bit_image_and_a_ct_window_s_clipping_pass_the_intensity_check(tmp_path, ckpts, tiny_clip):
    """The check of a model of 8-bit images refuses only images mostly above 255: an 8-bit PNG, and one with a few
    brighter values (a 16-bit file of an 8-bit image with a burnt-in marker), are segmented; a model with a CT window
    (-200..300) is not checked (the MR series of the DICOMweb test, mostly above 300, go to the sample CT model)."""
    torch.manual_seed(0)
    hp = tiny_hparams(tiny_clip, spatial_dims=2, features=(8, 16), steps=1)
    hp.preprocessing.intensity = {"type": "range", "a_min": -200.0, "a_max": 300.0}
    s = build_system(hp)
    ct = save_checkpoint(tmp_path / "ct.pt", s.model, s.hparams)
    bright = _nii(tmp_path / "bright.nii.gz", np.full((30, 26), 1500.0))
    assert _predict(ct, bright, tmp_path / "out" / "bright") == 0
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (36, 40)).astype(np.uint8)).save(tmp_path / "eight.png")
    marked = rng.integers(0, 256, (36, 40)).astype(np.uint16)
    marked[:4, :4] = 4000
    Image.fromarray(marked).save(tmp_path / "marked.png")
    for image in (tmp_path / "eight.png", tmp_path / "marked.png"):
        assert _predict(ckpts["2r"], image, tmp_path / "out" / image.stem) == 0


def test_odd_but_valid_files_just_work(tmp_path, ckpts):
    """16-bit PNG, a non-ASCII file name, a 1-pixel-thin image: segmented, written under the input's name."""
    for image in (_png(tmp_path / "sixteen.png", "I;16"),
                  _nii(tmp_path / "Lunge_Müller_雪.nii.gz", np.random.default_rng(1).random((30, 26))),
                  _nii(tmp_path / "thin.nii.gz", np.random.default_rng(2).random((1, 40)))):
        out = tmp_path / f"out_{image.stem}"
        assert _predict(ckpts[2], image, out) == 0, image
        written = [p.name for p in out.iterdir()]
        assert any(p.startswith(image.name.split(".")[0]) for p in written), written


def test_a_checkpoint_with_the_right_keys_and_wrong_shapes_is_refused(tmp_path, ckpts, capsys):
    ck = torch.load(ckpts[2], weights_only=True)
    k = next(k for k, v in ck["state_dict"].items() if v.ndim == 4)
    ck["state_dict"][k] = torch.zeros(*ck["state_dict"][k].shape[:-1], ck["state_dict"][k].shape[-1] + 2)
    bad = tmp_path / "shapes.pt"
    torch.save(ck, bad)
    assert _predict(bad, _nii(tmp_path / "a.nii.gz", np.zeros((30, 30))), tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert k in err and "Traceback" not in err, err


def test_training_data_that_cannot_be_used_is_named(tmp_path, tiny_clip, capsys):
    """A datalist with a missing file, a label of another shape than its image: exit 2 naming the file."""
    preset = tmp_path / "p.json"
    preset.write_text(json.dumps(tiny_hparams(tiny_clip).to_dict()))
    img = _nii(tmp_path / "i.nii.gz", np.random.default_rng(0).random((40, 40)))
    lab = _nii(tmp_path / "l.nii.gz", np.zeros((40, 40)), dtype=np.uint8)
    other = _nii(tmp_path / "l_other.nii.gz", np.zeros((30, 40)), dtype=np.uint8)
    for entry, phrase in (({"image": str(img), "label": str(tmp_path / "gone.nii.gz")}, "gone.nii.gz"),
                          ({"image": str(img), "label": str(other)}, "differs from its label")):
        dl = tmp_path / "dl.json"
        dl.write_text(json.dumps({"training": [entry, {"image": str(img), "label": str(lab)}],
                                  "validation": [{"image": str(img), "label": str(lab)}]}))
        assert cli(["train", "--preset", str(preset), "--datalist", str(dl), "--out", str(tmp_path / "r"),
                    "--max-iterations", "1", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert phrase in err and "Traceback" not in err, err


def test_a_label_must_have_its_images_spatial_shape_a_channel_axis_aside(tmp_path):
    """``PUT /datastore/label``'s check (it replaces the stored final label): a label without the image's channel
    axis is its label (an RGB X-ray, a multi-channel volume); a single slice of a volume is not (found by a review:
    a (64, 64) label was accepted for a (64, 64, 40) volume, replaced the good label, and the next training failed)."""
    from lib.datastore import check_label_file
    from lib.transforms import InputError

    vol = _nii(tmp_path / "vol.nii.gz", np.zeros((24, 20, 12)))
    for shape in ((24, 20), (20, 12), (24, 20, 11)):
        with pytest.raises(InputError, match=r"has shape .*not its label"):
            check_label_file(str(_nii(tmp_path / "lab.nii.gz", np.zeros(shape), dtype=np.uint8)), str(vol), "vol")
    check_label_file(str(_nii(tmp_path / "ok.nii.gz", np.ones((24, 20, 12)), dtype=np.uint8)), str(vol), "vol")
    check_label_file(str(_nii(tmp_path / "ok1.nii.gz", np.ones((24, 20, 12, 1)), dtype=np.uint8)), str(vol), "vol")
    multi = _nii(tmp_path / "multi.nii.gz", np.zeros((24, 20, 12, 2)))  # two channels (FLAIR, T1c)
    check_label_file(str(tmp_path / "ok.nii.gz"), str(multi), "multi")
    rgb = _png(tmp_path / "rgb.png", "RGB")
    lab = tmp_path / "lab.png"
    Image.fromarray(np.ones((36, 40), np.uint8)).save(lab)  # rows x columns of the 40 x 36 image
    check_label_file(str(lab), str(rgb), "rgb")
    Image.fromarray(np.ones((36, 3), np.uint8)).save(lab)
    with pytest.raises(InputError, match="not its label"):
        check_label_file(str(lab), str(rgb), "rgb")


DICOM = SHARED / "dicom"


@pytest.mark.skipif(not DICOM.exists(), reason=f"DICOM data not found at {DICOM} (CI has ../shared/data)")
def test_a_dicom_folder_on_the_command_line_takes_the_checked_series_conversion(tmp_path, ckpts, capsys):
    """Found by a review: ``predict --image <series folder>`` read the folder with MONAI's reader, so a series with a
    missing slice came out as an evenly spaced volume (exit 0). A folder now takes the path of the DICOMweb
    datastore (lib.dicom.series_to_nifti): refused naming the problem, or the same geometry as that conversion."""
    from lib.dicom import series_to_nifti

    assert _predict(ckpts[3], DICOM / "malformed" / "sliceincrement" / "001", tmp_path / "bad") == 2
    err = capsys.readouterr().err
    assert "uneven slice increment" in err and "Traceback" not in err, err
    series = DICOM / "vendor_mr" / "hitachi_anatomical_001"
    assert _predict(ckpts[3], series, tmp_path / "ok") == 0
    lab = nib.load(next((tmp_path / "ok").glob("*_label.nii.gz")))
    series_to_nifti(series, tmp_path / "ref.nii.gz")
    ref = nib.load(tmp_path / "ref.nii.gz")
    assert lab.shape == ref.shape and np.allclose(lab.affine, ref.affine, atol=1e-4), (lab.affine, ref.affine)


def test_the_command_line_refuses_what_would_lose_or_mix_results(tmp_path, tiny_clip, ckpts, capsys, caplog,
                                                                 monkeypatch):
    """Found by a review, each one line and exit 2 now instead of a lost run, a traceback or a silent surprise:
    training into a folder that holds a run replaced its best.pt; an empty split ended with a best.pt that was never
    written; ``--set`` typos raised deep in training; two images named alike overwrote each other's outputs;
    ``evaluate`` without labels predicted everything, then crashed; ``--limit 0`` meant "all"; ``--minutes`` was
    ignored beside an iteration limit; labels that are all background trained without a word."""
    from test_inputs_evaluation import _phantom_datalist

    datalist = _phantom_datalist(tmp_path, n_train=3, n_val=2, shape=(32, 32))
    dl = json.loads(datalist.read_text())
    dl["empty"] = []
    dl["nolabel"] = [{"image": it["image"]} for it in dl["training"]]
    dl["zeros"] = [{"image": it["image"], "label": str(_nii(tmp_path / f"z{k}.nii.gz", np.zeros((32, 32)),
                                                            dtype=np.uint8))} for k, it in enumerate(dl["training"])]
    datalist.write_text(json.dumps(dl))
    preset = tmp_path / "preset.json"
    preset.write_text(json.dumps(tiny_hparams(tiny_clip, spacing=[1.0, 1.0]).to_dict()))

    def train(out, *extra):
        return cli(["train", "--preset", str(preset), "--datalist", str(datalist), "--out", str(out),
                    "--max-iterations", "2", "--no-progress", *extra])

    def refused(code, *phrases):
        err = capsys.readouterr().err
        assert code == 2 and all(p in err for p in phrases) and "Traceback" not in err, (code, err)

    run = tmp_path / "run"
    assert train(run) == 0
    digest = (run / "best.pt").read_bytes()
    refused(train(run), "already holds a run", "--resume", "--overwrite")
    assert (run / "best.pt").read_bytes() == digest
    assert train(run, "--overwrite", "--set", "train.seed=1") == 0 and (run / "best.pt").read_bytes() != digest
    # a review (2026-12-07): --overwrite deleted the old run before the new one was set up, so a new run refused by
    # its own checks left the folder empty; a refused one now leaves the old run as it was
    before = {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()}
    refused(train(run, "--overwrite", "--train-split", "empty"), "the training split has no images")
    assert {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()} == before
    assert not (run / ".overwritten").exists()
    assert train(run, "--overwrite") == 0 and not (run / ".overwritten").exists()  # a finished one: no copy kept
    before = {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()}
    # Ctrl-C: one line saying what is saved and how to go on (was a KeyboardInterrupt traceback)
    import lib.training

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(lib.training, "train", interrupted)
    assert train(run, "--resume") == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "resume.pt holds the state of iteration 2" in err and "--resume" in err, err
    # after --overwrite the old run is put back, and the note does not offer its state as the new run's (a review)
    assert train(run, "--overwrite") == 130
    err = capsys.readouterr().err
    assert "the new run saved nothing; the earlier run" in err and "holds the state" not in err, err
    assert {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()}["best.pt"] == before["best.pt"]

    def state_then_interrupted(hp, tr, va, out, **k):  # a new run stopped after its first state
        with open(os.path.join(out, "resume.pt"), "wb") as f:
            f.write(b"the new run's state")
        raise KeyboardInterrupt

    monkeypatch.setattr(lib.training, "train", state_then_interrupted)
    for _ in range(2):  # the old run is kept in .overwritten, and an earlier kept copy is never deleted
        assert train(run, "--overwrite") == 130
        (run / "best.pt").write_bytes(b"the new run's model")
    kept = sorted(p.name for p in run.iterdir() if p.name.startswith(".overwritten"))
    assert len(kept) == 2 and (run / kept[1] / "best.pt").read_bytes() == before["best.pt"], kept
    capsys.readouterr()
    monkeypatch.undo()
    # a kill -9 of an --overwrite run before its first state (no except clause ran): the run it replaced stayed in
    # .overwritten, --resume said "nothing to resume" and a plain run trained anew beside it (a review); the next
    # command puts it back first
    from lib.cli import RUN_FILES

    killed = tmp_path / "killed"
    assert train(killed) == 0
    old = {n: (killed / n).read_bytes() for n in RUN_FILES if (killed / n).exists()}
    (killed / ".overwritten").mkdir()
    for n in old:
        os.replace(killed / n, killed / ".overwritten" / n)
    (killed / "hparams.json").write_text("{}")  # what the killed run had written: no state
    (killed / "losses.csv").write_text("iteration,loss\n")
    refused(train(killed), "already holds a run")
    assert {n: (killed / n).read_bytes() for n in RUN_FILES if (killed / n).exists()} == old
    assert not (killed / ".overwritten").exists()
    # entries without a label (a raw KeyError after caching), an empty split given to predict ("wrote 0
    # prediction(s)", exit 0), a --device that is no device or a CUDA this machine lacks (tracebacks)
    refused(train(tmp_path / "e6", "--train-split", "nolabel"), "the training split: 3 of 3 entries have no label")
    refused(cli(["predict", "--checkpoint", str(ckpts[2]), "--datalist", str(datalist), "--split", "empty",
                 "--out", str(tmp_path / "pe"), "--no-progress"]), "split 'empty'", "has no images")
    refused(train(tmp_path / "e7", "--device", "cpux"), "--device 'cpux' is not a device")
    if not torch.cuda.is_available():
        refused(train(tmp_path / "e8", "--device", "cuda"), "this machine has no CUDA device")
    refused(train(tmp_path / "e1", "--val-split", "empty"), "the validation split has no images")
    refused(train(tmp_path / "e2", "--train-split", "empty"), "the training split has no images", "nothing to train on")
    for setting, phrase in (("train.lr=abc", "expected a number"), ("model.features=5", "expected a JSON list"),
                            ("preprocessing.patch_size=64", "expected a JSON list"),
                            ("train.augment=1", "expected true or false"),
                            ("train.images_per_batch=0", "train.images_per_batch must be an integer >= 1"),
                            ("train.lr=-1", "train.lr must be a finite number > 0"),
                            # a second review: a traceback from PyTorch (seed, threads), resume.pt at every iteration
                            # (state_every_s 0), a share refused only after the VLM and the data were loaded
                            ("train.seed=-1", "train.seed must be an integer >= 0"),
                            ("train.num_threads=-1", "train.num_threads must be null"),
                            ("train.state_every_s=0", "train.state_every_s must be a finite number > 0"),
                            ("train.hard_share=2", "train.hard_share must be within [0, 1]")):
        refused(train(tmp_path / "e3", "--set", setting), phrase)
    # --minutes nan trained forever; --max-iterations 0 blamed the time budget
    for flag, value in (("--minutes", "nan"), ("--minutes", "inf"), ("--minutes", "-1"), ("--max-iterations", "0")):
        with pytest.raises(SystemExit):
            cli(["train", "--preset", str(preset), "--datalist", str(datalist), "--out", str(tmp_path / "e5"),
                 flag, value, "--no-progress"])
        assert ("a finite number of minutes > 0" if flag == "--minutes" else "an integer >= 1") \
            in capsys.readouterr().err
    # an --out that cannot be made: the path and the reason, not a FileNotFoundError traceback
    refused(train("/proc/dfm_run"), "/proc/dfm_run")
    with pytest.raises(SystemExit):
        cli(["train", "--preset", str(preset), "--datalist", str(datalist), "--out", str(tmp_path / "e4"),
             "--limit-val", "0", "--max-iterations", "1", "--no-progress"])
    assert "an integer >= 1" in capsys.readouterr().err
    # --minutes holds beside an iteration limit: whichever comes first
    assert cli(["train", "--preset", str(preset), "--datalist", str(datalist), "--out", str(tmp_path / "t"),
                "--max-iterations", "2000", "--minutes", "0.2", "--no-progress"]) == 0
    assert 0 < json.loads((tmp_path / "t" / "train_result.json").read_text())["iterations"] < 2000
    # a budget spent before the first iteration: no best.pt of random weights and no exit 0
    refused(cli(["train", "--preset", str(preset), "--datalist", str(datalist), "--out", str(tmp_path / "t0"),
                 "--minutes", "0.0001", "--no-progress"]), "ended before the first training iteration")
    assert not (tmp_path / "t0" / "best.pt").exists()
    with caplog.at_level("WARNING", logger="lib.training"):
        assert train(tmp_path / "z", "--train-split", "zeros") == 0
    assert "3 of 3 training labels have no foreground" in caplog.text
    # predict: two images of one name would overwrite each other's outputs; evaluate: labels are checked first
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a_img = _nii(tmp_path / "a" / "image.nii.gz", np.zeros((30, 30)))
    b_img = _nii(tmp_path / "b" / "image.nii.gz", np.ones((30, 30)))
    refused(cli(["predict", "--checkpoint", str(ckpts[2]), "--image", str(a_img), str(b_img), "--out",
                 str(tmp_path / "p"), "--no-progress"]), "would write the same outputs image_", str(b_img))
    refused(cli(["evaluate", "--checkpoint", str(tmp_path / "no.pt"), "--image", str(a_img), "--out",
                 str(tmp_path / "ev"), "--no-progress"]), "evaluate needs a label for every image")
    refused(_predict(ckpts[2], a_img, a_img), "is a file, not a folder")


def test_predict_names_each_case_s_outputs_by_its_case_and_replaces_them_as_a_set(tmp_path, ckpts, capsys):
    """A review: MONAI's SaveImage named the outputs after the file it loaded (its own meta won over the case id),
    so two "ct.nii.gz" of other patients (or two DICOM series) wrote one set of files -- the second patient's
    result under the first's name -- exit 0; a case id "x/../y" would have written outside --out; a run without
    --save-variance left an earlier run's variance map beside the new label; --save-variance of one sample wrote an
    all-zero map (read as "certain")."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    img = np.zeros((30, 30))
    img[5:15, 5:15] = 1.0
    a_img = _nii(tmp_path / "a" / "ct.nii.gz", img)
    b_img = _nii(tmp_path / "b" / "ct.nii.gz", img.T[::-1])
    datalist = tmp_path / "dl.json"
    datalist.write_text(json.dumps({"test": [{"image": str(a_img), "case_id": "p1"},
                                             {"image": str(b_img), "case_id": "p2"},
                                             {"image": str(a_img), "case_id": "x/../y"}]}))
    out = tmp_path / "out"

    def predict(*extra):
        return cli(["predict", "--checkpoint", str(ckpts[2]), "--datalist", str(datalist), "--split", "test",
                    "--out", str(out), "--no-progress", *extra])

    assert predict("--save-variance", "--num-samples", "2") == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"{c}_{k}.nii.gz" for c in ("p1", "p2", "x_.._y") for k in ("prob", "label", "var")), names
    p1, p2 = (np.asarray(nib.load(str(out / f"{c}_prob.nii.gz")).dataobj) for c in ("p1", "p2"))
    assert not np.array_equal(p1, p2)  # each patient's own result
    assert predict() == 0
    assert not list(out.glob("*_var.nii.gz"))  # the earlier run's variance maps went with their cases' sets
    capsys.readouterr()
    assert predict("--save-variance") == 2
    assert "--save-variance needs --num-samples >= 2" in capsys.readouterr().err
    # ids that differ only by case are one file on macOS / Windows (the second case's set replaced the first's)
    datalist.write_text(json.dumps({"test": [{"image": str(a_img), "case_id": "P1"},
                                             {"image": str(b_img), "case_id": "p1"}]}))
    assert predict() == 2 and "would write the same outputs p1_" in capsys.readouterr().err


def test_predict_outputs_of_a_png_lie_over_it_in_an_itk_viewer(tmp_path):
    """A review: the NIfTI outputs of a PNG X-ray had MONAI's identity affine (RAS), while ITK (3D Slicer) reads a
    PNG with identity axes in LPS: the label lay mirrored on both axes, off the image (resampled onto the PNG's
    grid: 0 of 87 564 voxels). They are written in the PNG's frame as ITK reads it."""
    import SimpleITK as sitk

    from conftest import ROOT

    ck = ROOT / "sample_data" / "models" / "dfm_vlm_2d.pt"
    if not ck.exists():
        pytest.skip("sample_data/models has no default checkpoints (make_sample_data.py --train)")
    png = ROOT / "sample_data" / "phantom_xray_04.png"
    assert cli(["predict", "--checkpoint", str(ck), "--image", str(png), "--out", str(tmp_path / "o"), "--steps", "1",
                "--no-progress"]) == 0
    img = sitk.ReadImage(str(png))
    lab = sitk.Cast(sitk.ReadImage(str(tmp_path / "o" / "phantom_xray_04_label.nii.gz")), sitk.sitkUInt8)
    on_png = sitk.GetArrayFromImage(sitk.Resample(lab, img, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    fg = int(sitk.GetArrayFromImage(lab).sum())
    assert fg > 1000 and int(on_png.sum()) == fg
    pixels = sitk.GetArrayFromImage(img)
    assert pixels[on_png > 0].mean() < pixels[on_png == 0].mean() - 10  # on the dark lung fields


def test_make_tiny_vlm_does_not_replace_a_model_silently(tmp_path, capsys):
    """Found by a review: running it again into the same folder (another --seed or --hidden) replaced the VLM under
    every checkpoint that names the folder; with the same embedding size nothing would notice."""
    out = tmp_path / "tiny-clip"
    assert cli(["make-tiny-vlm", str(out), "--hidden", "16", "--projection-dim", "16"]) == 0
    before = (out / "config.json").read_bytes()
    assert cli(["make-tiny-vlm", str(out), "--hidden", "16", "--projection-dim", "16", "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "already holds a model" in err and "--overwrite" in err, err
    assert (out / "config.json").read_bytes() == before
    assert cli(["make-tiny-vlm", str(out), "--hidden", "16", "--projection-dim", "16", "--seed", "1",
                "--overwrite"]) == 0


def test_a_palette_png_label_goes_through_the_shared_preprocessing(tmp_path):
    """The datastore accepts palette-coded label PNGs (a common way to store label maps); the shared preprocessing
    refused them as "a palette PNG; save the image as greyscale", so training and evaluate failed on a label the
    app had stored. A palette image is still refused as the *image* (above)."""
    from lib.config import PreprocConfig
    from lib.transforms import InputError, preprocess

    img = np.zeros((36, 40), np.uint8)
    img[5:20, 5:15] = 200
    Image.fromarray(img).save(tmp_path / "i.png")
    lab = Image.fromarray((img > 0).astype(np.uint8)).convert("P")
    lab.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    lab.save(tmp_path / "l.png")
    pre = preprocess(PreprocConfig(spatial_dims=2, num_channels=1, intensity={"type": "none"}, patch_size=[16, 16]))
    out = pre({"image": str(tmp_path / "i.png"), "label": str(tmp_path / "l.png")})
    assert float(out["label"].sum()) == float((img > 0).sum()) == 150
    with pytest.raises(InputError, match="palette"):
        pre({"image": str(tmp_path / "l.png")})


def test_set_refuses_what_is_not_a_hyper_parameter_of_its_kind(tmp_path):
    """A review: ``--set train.max_iterations=abc`` passed (its default is null, which was not type-checked) and
    failed later in training; ``model.num_decoder_stages`` (a property) raised a bare AttributeError;
    ``model.features=[16,"a"]`` a bare ValueError. Each is now one ConfigError naming the key."""
    from lib.cli import _set
    from lib.config import ConfigError, load_preset

    for assignment, phrase in (("train.max_iterations=abc", "train.max_iterations=abc: expected an integer or null"),
                               ("train.max_iterations=0", "train.max_iterations must be null or an integer"),
                               ("model.num_decoder_stages=3", "no such hyper-parameter"),
                               ("model.resolved=1", "no such hyper-parameter"),
                               ('model.features=[16,"a"]', "expected a JSON list of integers")):
        with pytest.raises(ConfigError, match=phrase):
            _set(load_preset("dfm_vlm_2d"), [assignment]).resolved()
    hp = _set(load_preset("dfm_vlm_2d"), ["train.max_iterations=5"])
    assert hp.train.max_iterations == 5
    # a review (2026-12-07): a JSON object replaced the whole augmentation (the preset's other keys fell back to the
    # library's defaults), one key of it could not be set, and a key whose default is None could not be set back
    preset = load_preset("cxr_lung").train.augmentation
    for assignment in ('train.augmentation={"prob": 0.5}', "train.augmentation.prob=0.5"):
        hp = _set(load_preset("cxr_lung"), [assignment])
        assert hp.train.augmentation == {**preset, "prob": 0.5}, assignment
    hp = _set(load_preset("cxr_lung"), ["preprocessing.spacing=null"])
    assert hp.preprocessing.spacing is None and hp.preprocessing.resolved().spacing is None
    for assignment, phrase in (("train.lr=null", "expected a number"),
                               ("train.lr.x=1", "train.lr is not a JSON object")):
        with pytest.raises(ConfigError, match=phrase):
            _set(load_preset("cxr_lung"), [assignment])
    # a preset file that is not JSON, not an object, or has features that are not integers: one line naming it
    bad = tmp_path / "bad.json"
    plain = tmp_path / "my_preset"  # a file path without .json: a file, not a preset name (it was refused)
    plain.write_text(json.dumps(load_preset("cxr_lung").to_dict()))
    assert load_preset(str(plain)).to_dict() == load_preset("cxr_lung").to_dict()
    for text, phrase in (("{bad", "is not valid JSON"), ("[1, 2]", "must be a JSON object of sections"),
                         ('{"model": {"features": "abc"}}', "model.features must be a JSON list of integers")):
        bad.write_text(text)
        with pytest.raises(ConfigError, match=phrase) as e:
            load_preset(str(bad))
        assert str(bad) in str(e.value)


def test_conditioning_options_the_model_does_not_take_are_refused(tmp_path, tiny_clip, capsys):
    """A review: ``predict --text`` on a text_mode "label" model replaced the prompt it was trained on (and on a
    text_mode "none" model was ignored), ``--vlm`` on a model without a VLM was ignored, a text_mode "image" model
    without a text and a ``--roi-size`` of the wrong dimensionality ended in a traceback (exit 1). Each is one
    line and exit 2 now, before any image is predicted."""
    cks = {}
    for mode in ("label", "image", "none"):
        torch.manual_seed(0)
        s = build_system(tiny_hparams(tiny_clip, features=(8, 16), steps=1, text_mode=mode))
        cks[mode] = save_checkpoint(tmp_path / f"{mode}.pt", s.model, s.hparams)
    s = build_system(tiny_hparams(None, features=(8, 16), steps=1, mode="plain"))
    cks["plain"] = save_checkpoint(tmp_path / "plain.pt", s.model, s.hparams)
    img = _nii(tmp_path / "img.nii.gz", np.random.default_rng(0).random((36, 36)))

    def predict(mode, *extra):
        return cli(["predict", "--checkpoint", str(cks[mode]), "--image", str(img), "--out", str(tmp_path / "p"),
                    "--no-progress", *extra])

    def refused(code, *phrases):
        err = capsys.readouterr().err
        assert code == 2 and all(p in err for p in phrases) and "Traceback" not in err, (code, err)
        assert len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1, err

    refused(predict("label", "--text", "the left kidney"), "--text:", "own label prompt 'a bright blob'")
    refused(predict("none", "--text", "a lung"), "--text:", "text_mode 'none'")
    refused(predict("plain", "--text", "a lung"), "--text:", "not conditioned on a VLM")
    refused(predict("plain", "--vlm", str(tiny_clip)), "--vlm", "not conditioned on a VLM")
    refused(predict("image"), "per-image text (text_mode 'image')", "give --text")
    refused(predict("image", "--text", "a lung", "--roi-size", "32", "32", "32", "--allow-roi-mismatch"),
            "roi_size [32, 32, 32] has 3 values; the model is 2D")
    assert not (tmp_path / "p").exists()
    assert predict("image", "--text", "a lung") == 0 and predict("label") == 0 and predict("none") == 0


def test_unknown_augmentation_keys_are_refused(tmp_path):
    """A review: ``--set train.augmentation={"rotation": 0.5}`` was accepted and silently ignored (the default
    rotation trained). Unknown keys are a ConfigError naming them and the known ones."""
    from lib.cli import _set
    from lib.config import ConfigError, load_preset

    with pytest.raises(ConfigError, match=r"train.augmentation: unknown key\(s\) \['rotation'\]; known: "):
        _set(load_preset("dfm_vlm_2d"), ['train.augmentation={"rotation": 0.5, "prob": 0.2}']).resolved()
    from lib.config import AUGMENTATION

    hp = _set(tiny_hparams(None, mode="plain"), ['train.augmentation={"rotate": 0.5}']).resolved()
    assert hp.train.augmentation == {**AUGMENTATION, "rotate": 0.5}  # merged (since 2026-12-07)


def test_resume_refuses_another_training_set(tmp_path, tiny_clip, capsys):
    """A review: ``train --resume`` continued a run on another datalist, split or ``--limit-train`` /
    ``--limit-val`` (the state's image draws then index other images). The state records a digest of the training
    and validation items; a mismatch is one line and exit 2 naming the split; a state without it still resumes."""
    from test_inputs_evaluation import _phantom_datalist
    from lib.training import load_train_state

    datalist = _phantom_datalist(tmp_path, n_train=3, n_val=2, shape=(32, 32))
    preset = tmp_path / "preset.json"
    preset.write_text(json.dumps(tiny_hparams(tiny_clip, features=(8, 16), steps=1, spacing=[1.0, 1.0]).to_dict()))
    run = tmp_path / "run"

    def train(*extra):
        return cli(["train", "--preset", str(preset), "--datalist", str(datalist), "--out", str(run),
                    "--max-iterations", "2", "--no-progress", *extra])

    assert train() == 0
    for extra, split in ((["--limit-train", "2"], "training"), (["--limit-val", "1"], "validation"),
                         (["--val-split", "training"], "validation")):
        code = train("--resume", *extra)
        err = capsys.readouterr().err
        assert code == 2 and f"belongs to a run with other {split} images" in err and "Traceback" not in err, err
    assert train("--resume") == 0
    st = load_train_state(run / "resume.pt")
    assert st["data"]["training"]["n"] == 3
    del st["data"]  # a state from before the digest
    torch.save(st, run / "resume.pt")
    assert train("--resume", "--limit-val", "1") == 0


def test_a_datalist_entry_that_is_not_a_path_is_named(tmp_path, capsys):
    """A review: ``"label": null`` (or a number, or an empty string) in a datalist ended in a TypeError traceback from
    ``os.path.isabs``; a split that is not a list failed later. Now one line naming the split, entry and key."""
    from lib.data import load_datalist
    from lib.transforms import InputError

    good = {"image": "a.nii.gz", "label": "la.nii.gz"}
    for entry, where in (({"image": "a.nii.gz", "label": None}, "entry 1: 'label'"),
                         ({"image": 5}, "entry 1: 'image'"), ({"image": ["a.nii.gz", ""]}, "entry 1: 'image'"),
                         ({"image": []}, "entry 1: 'image'")):
        dl = tmp_path / "dl.json"
        dl.write_text(json.dumps({"test": [good, entry]}))
        with pytest.raises(InputError, match=f"split 'test' {where} must be a file path"):
            load_datalist(dl, "test")
    dl.write_text(json.dumps({"test": {"image": "a.nii.gz"}}))
    with pytest.raises(InputError, match="split 'test' must be a list of entries"):
        load_datalist(dl, "test")
    # a list of entries instead of splits, a UTF-16 file: tracebacks before (a review, 2026-12-07)
    dl.write_text(json.dumps([good]))
    with pytest.raises(InputError, match="must be a JSON object of splits"):
        load_datalist(dl, "test")
    dl.write_bytes(json.dumps({"test": [good]}).encode("utf-16"))
    with pytest.raises(InputError, match=r"is not valid JSON \(UTF-8\)"):
        load_datalist(dl, "test")
    dl.write_text(json.dumps({"test": [good, {"image": "b.nii.gz", "label": None}]}))
    assert cli(["evaluate", "--checkpoint", str(tmp_path / "no.pt"), "--datalist", str(dl), "--out",
                str(tmp_path / "ev"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "entry 1: 'label' must be a file path" in err and "Traceback" not in err, err


def test_errors_about_a_dicom_series_name_the_folder_given_not_its_temporary_conversion(tmp_path):
    """Seen in a review of 2026-12-06, fixed the same day: a DICOM series folder given as an image is converted into a temporary
    NIfTI; a label off its grid, or the wrong channel count, was reported against that file
    (/tmp/dfm_series_.../image_0.nii.gz, deleted by then), not the folder the user gave."""
    import nibabel as nib

    from conftest import SHARED
    from lib.config import PreprocConfig
    from lib.transforms import InputError, preprocess

    series = SHARED / "dicom" / "vendor_mr" / "ge_anatomical_001"
    if not series.exists():
        pytest.skip(f"real DICOM data not found at {series}")
    ref = nib.load(str(series.parent / "ge_anatomical_001_reference.nii.gz"))
    label = tmp_path / "label.nii.gz"  # the series' shape, on another grid (the identity affine)
    nib.save(nib.Nifti1Image(np.zeros(ref.shape[:3], np.uint8), np.eye(4)), str(label))
    cfg = PreprocConfig(spatial_dims=3, num_channels=1, spacing=None, intensity={"type": "none"}, patch_size=[8, 8, 8])
    with pytest.raises(InputError) as e:
        preprocess(cfg)({"image": str(series), "label": str(label)})
    assert "not on its image's grid" in str(e.value) and f"({series})" in str(e.value) and "dfm_series" not in str(e.value)
    cfg2 = PreprocConfig(spatial_dims=3, num_channels=2, spacing=None, intensity={"type": "none"}, patch_size=[8, 8, 8])
    with pytest.raises(InputError) as e:
        preprocess(cfg2)({"image": str(series)})
    assert str(e.value).startswith(f"{series}: the model expects 2 channel(s)"), str(e.value)


def test_predict_outputs_of_a_nifti_keep_its_header_geometry_and_shape(tmp_path):
    """A review: MONAI's SaveImage wrote ``predict``'s outputs with the sform as the qform too, so a registered image
    (sform and qform 10 mm apart) had its label 10 mm off it in 3D Slicer (ITK reads the qform), where the app's
    result lay on it; a one-slice (X, Y, 1) image's outputs came back (X, Y); ``--image a --image b`` predicted b
    alone, exit 0."""
    import itk
    import nibabel as nib

    from conftest import ROOT

    ck3, ck2 = (ROOT / "sample_data" / "models" / f"dfm_vlm_{d}d.pt" for d in (3, 2))
    if not (ck3.exists() and ck2.exists()):
        pytest.skip("sample_data/models has no default checkpoints (make_sample_data.py --train)")
    src = nib.load(str(ROOT / "sample_data" / "phantom_ct_00.nii.gz"))
    qform = src.affine.copy()
    sform = qform.copy()
    sform[:3, 3] += [10.0, 0.0, 0.0]
    reg = nib.Nifti1Image(np.asarray(src.dataobj), sform)
    reg.set_sform(sform, code=2)
    reg.set_qform(qform, code=1)
    nib.save(reg, str(tmp_path / "registered.nii.gz"))
    flat = nib.Nifti1Image(np.asarray(Image.open(ROOT / "sample_data" / "phantom_xray_04.png")).T[:, :, None]
                           .astype(np.float32), np.diag([0.5, 0.5, 1.0, 1.0]))
    nib.save(flat, str(tmp_path / "slicer2d.nii.gz"))
    assert cli(["predict", "--checkpoint", str(ck3), "--image", str(tmp_path / "registered.nii.gz"), "--image",
                str(ROOT / "sample_data" / "phantom_ct_01.nii.gz"), "--out", str(tmp_path / "o3"), "--steps", "1",
                "--no-progress"]) == 0
    assert (tmp_path / "o3" / "phantom_ct_01_label.nii.gz").exists()  # both --image
    image = itk.imread(str(tmp_path / "registered.nii.gz"))
    out = itk.imread(str(tmp_path / "o3" / "registered_label.nii.gz"))  # where 3D Slicer puts it
    assert np.allclose(np.asarray(out.GetOrigin()), np.asarray(image.GetOrigin()), atol=1e-4)
    assert np.allclose(np.asarray(out.GetDirection()), np.asarray(image.GetDirection()), atol=1e-6)
    for suffix in ("label", "prob"):  # (the probabilities: one channel per structure, after the spatial axes)
        got = nib.load(str(tmp_path / "o3" / f"registered_{suffix}.nii.gz"))
        assert np.allclose(got.get_qform(), qform) and np.allclose(got.get_sform(), sform), suffix
        assert int(got.header["qform_code"]) == 1 and int(got.header["sform_code"]) == 2, suffix
    assert cli(["predict", "--checkpoint", str(ck2), "--image", str(tmp_path / "slicer2d.nii.gz"), "--out",
                str(tmp_path / "o2"), "--steps", "1", "--no-progress"]) == 0
    for suffix in ("label", "prob"):
        got = nib.load(str(tmp_path / "o2" / f"slicer2d_{suffix}.nii.gz"))
        assert got.shape[:3] == flat.shape and np.allclose(got.affine, flat.affine), (suffix, got.shape)
    assert np.asarray(nib.load(str(tmp_path / "o2" / "slicer2d_label.nii.gz")).dataobj).sum() > 100


def test_the_core_runs_without_monai_label(tmp_path):
    """README, Layout: the core modules import nothing of MONAI Label. A review found ``predict``'s NIfTI writer
    importing the app's infer task (and with it MONAI Label): predict failed where MONAI Label is not installed."""
    import subprocess
    import sys

    from conftest import ROOT

    img = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 4), np.float32), np.diag([2.0, 1.0, 3.0, 1.0])), str(img))
    code = ("import sys; sys.modules['monailabel'] = None; sys.path.insert(0, sys.argv[1]); import pathlib\n"
            "import lib.cli, lib.training, lib.evaluation, lib.inferer, lib.checkpoint, lib.transforms, lib.dicom, "
            "lib.audit, lib.clicks, lib.vlm, lib.samplers, lib.flow, lib.network, lib.data, lib.structures, "
            "lib.precision, lib.config\n"
            "import numpy as np; out = pathlib.Path(sys.argv[2]).with_name('out.nii.gz')\n"
            "assert lib.cli._save_like_the_image(np.zeros((1, 6, 5, 4)), out, sys.argv[2], np.uint8); print('ok')")
    r = subprocess.run([sys.executable, "-c", code, str(ROOT), str(img)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-1500:]


def test_settings_that_passed_and_broke_later_are_refused_naming_them_and_typed_as_declared():
    """A review (2026-12-08) of the configuration: settings that passed and then broke -- FiLM stages [0, 0] (trained,
    then every load refused the checkpoint), spacing [0, 0] (MONAI kept the native grid; the checkpoint said [0, 0]),
    norm "foo" and dropout 2 (tracebacks), time_embed_dim 0 (a flow model that never saw t), augmentation values
    (prob 5, a string scale failing mid-training), dice_weight NaN, a_min == a_max (a division by zero), an unknown
    intensity key ignored, grow_channels beyond the image's, orientation "XYZ", a patch side 96.7 truncated; a
    preset's "false" (a string) switched clicks and soft labels on; ``--set train.time_budget_s=90.5`` was refused
    because the preset held an integer; ``vlm.prompt=2024`` became a number; a typo named no key."""
    from lib.cli import _set
    from lib.config import ConfigError, HParams, load_preset

    def preset():
        hp = load_preset("cxr_lung")
        hp.vlm.image_embed_dim = hp.vlm.text_embed_dim = 16  # (what loading the VLM fills in)
        return hp

    preset().resolved()
    for assignment, phrase in (
            ("model.vlm_film_decoder_stages=[0,0]", "names a stage twice"),
            ("preprocessing.spacing=[-1,3]", r"preprocessing.spacing must be finite numbers >= 0"),
            ("preprocessing.spacing=[1,1e999]", r"preprocessing.spacing must be finite numbers >= 0"),
            ("model.norm=foo", r"model.norm must be one of \('instance', 'group', 'batch'\)"),
            ("model.dropout=2", r"model.dropout must be a number in \[0, 1\)"),
            ("model.time_embed_dim=0", "model.time_embed_dim must be an integer >= 1"),
            ('train.augmentation.scale="x"', "train.augmentation.scale must be a finite number >= 0"),
            ("train.augmentation.prob=5", r"train.augmentation.prob must be in \[0, 1\]"),
            ("train.augmentation.gamma=[-1,1]", "train.augmentation.gamma must be"),
            ('vlm.intensity_window=[0,"x"]', "expected a JSON list of 2 values"),
            ("flow.dice_weight=-1", "flow.dice_weight must be a finite number >= 0"),
            ('preprocessing.intensity={"a_min":100,"a_max":100}', "a_max > a_min"),
            ("preprocessing.intensity.clp=false", r"unknown key\(s\) \['clp'\]"),
            ('preprocessing.intensity.clip="false"', "clip must be true or false"),
            ("clicks.grow_channels=[5]", "names a channel the 1-channel image does not have"),
            ("preprocessing.orientation=XYZ", "preprocessing.orientation must be 2 axis codes"),
            ("preprocessing.patch_size=[96.7,96]", "expected a JSON list of integers"),
            ("train.lrr=1", r"no such hyper-parameter; did you mean train.lr\?"),
            ("clicks.enabled=yes", "expected true or false")):
        with pytest.raises(ConfigError, match=phrase):
            _set(preset(), [assignment]).resolved()
    from lib.config import PreprocConfig, VLMConfig

    with pytest.raises(ConfigError, match="vlm.intensity_window must be two numbers"):  # (built in code)
        VLMConfig(intensity_window=(0, "x")).resolved()
    with pytest.raises(ConfigError, match="preprocessing.patch_size must be integers >= 1"):
        PreprocConfig(patch_size=[96.7, 96]).resolved()
    hp = _set(preset(), ["train.time_budget_s=90.5", "vlm.prompt=2024", "preprocessing.orientation=LP"]).resolved()
    assert hp.train.time_budget_s == 90.5 and hp.vlm.prompt == "2024"
    # a preset file: a switch or a number written as text, a list written as a number
    for section, key, value in (("clicks", "enabled", "false"), ("train", "augment", "false"),
                                ("preprocessing", "soft_label", "false"), ("clicks", "sigma", "3"),
                                ("preprocessing", "patch_size", 96), ("vlm", "num_slices", "3"),
                                ("flow", "exponent", "2")):
        d = load_preset("cxr_lung").to_dict()
        d[section][key] = value
        with pytest.raises(ConfigError, match=rf"{section}\.{key} must be "):
            HParams.from_dict(d)
