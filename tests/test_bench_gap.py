"""bench/cxr_gap.py's error figures, which the README's account of the BraTS click curves rests on."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from cxr_gap import error_thickness  # noqa: E402


def _square():
    truth = np.zeros((40, 40), bool)
    truth[10:30, 10:30] = True
    return truth


def test_a_one_voxel_sliver_is_thin_and_a_hole_is_deep():
    truth = _square()
    sliver = truth.copy()
    sliver[10:30, 30] = True  # one column of false foreground next to the truth
    assert error_thickness(sliver, truth, [1.0, 1.0], 1.5) == (1.0, 1.0)
    assert error_thickness(sliver, truth, [1.0, 1.0], 0.5)[0] == 0.0
    rim = truth.copy()
    rim[10:30, 29] = False  # the truth's own outer column missed: as deep as the sliver outside (symmetric)
    assert error_thickness(rim, truth, [1.0, 1.0], 1.5) == (1.0, 1.0)
    assert error_thickness(rim, truth, [1.0, 1.0], 0.5)[0] == 0.0
    band = truth.copy()
    band[10:30, 30:33] = True  # three columns: one of them within 1.5
    assert abs(error_thickness(band, truth, [1.0, 1.0], 1.5)[0] - 1 / 3) < 1e-9
    hole = truth.copy()
    hole[12:22, 12:22] = False  # a 10x10 miss inside, 2 voxels from the background
    assert error_thickness(hole, truth, [1.0, 1.0], 1.5) == (0.0, 5.0)


def test_the_region_is_the_robots_and_spacing_counts():
    truth = _square()
    pred = truth.copy()
    pred[12:22, 12:22] = False  # missed: 100 voxels, radius 5
    pred[10:30, 30:32] = True  # false: 40 voxels, radius 1
    assert error_thickness(pred, truth, [1.0, 1.0], 1.5)[1] == 5.0  # the larger part, as lib.clicks.next_click
    pred[12:22, 12:22] = True
    pred[0:8, 0:40] = True  # false: 320 voxels, 8 rows deep (radius 4 with the image border as boundary)
    assert error_thickness(pred, truth, [1.0, 1.0], 1.5)[1] == 4.0
    assert error_thickness(pred, truth, [2.0, 2.0], 3.0)[1] == 8.0  # in spacing units


def test_the_click_bench_scores_a_flipped_label_as_evaluate_does(tmp_path, make_system):
    """A review: bench/clicks_bench.py took the label as loaded, so a label stored in another voxel order (flipped
    axis, affine to match: the same points) was scored mirrored -- and the oracle clicked mirrored places --
    while evaluate reorders it. Both now go through lib.evaluation.truth_on_image_grid."""
    import nibabel as nib
    import torch

    from clicks_bench import run_case
    from lib.evaluation import evaluate_items, make_inferer
    from lib.inferer import WindowCache
    from lib.phantoms import write_phantom_case
    from lib.transforms import label_transforms

    system = make_system(spatial_dims=3, features=(8, 16), spacing=[2.0, 2.0, 2.0])
    with torch.no_grad():
        for h in system.model.vlm_film_heads.values():
            h.weight.normal_(0, 0.3)
    item = write_phantom_case(tmp_path, "c0", shape=(32, 28, 20))
    lab = nib.load(item["label"])
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, lab.shape[0] - 1
    flipped = tmp_path / "c0_flipped_label.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(lab.dataobj)[::-1].copy(), lab.affine @ flip), str(flipped))
    inf = make_inferer(system, steps=1)
    lab_t = label_transforms(system.hparams.preprocessing)
    dice = {}
    for name, path in (("stored", item["label"]), ("flipped", str(flipped))):
        it = {**item, "label": path, "case_id": "c0"}
        dice[name] = run_case(system, inf, it, lab_t({"label": path})["label"], 1, "oracle", None, 3.0,
                              WindowCache())["dice"]
        assert dice[name][0] == pytest.approx(evaluate_items(system, [it], inf)[0][0]["dice"])
    assert dice["flipped"] == pytest.approx(dice["stored"])


def test_the_click_bench_refuses_an_uncertain_robot_without_samples_and_prints_a_run_without_clicks(tmp_path,
                                                                                                    make_system):
    """A review: with one sample per image (the checkpoint's default for brats_wt) the uncertain robot saw no variance
    and clicked nothing, reported as Dice@k = Dice@0 for every k; and a run that made no click printed its seconds
    per click as None (a TypeError that lost every result of the bench, which were written only at its end)."""
    import json

    import clicks_bench
    from lib.checkpoint import save_checkpoint
    from lib.phantoms import write_phantom_case

    system = make_system(spatial_dims=3, features=(8, 16), spacing=[2.0, 2.0, 2.0], steps=1)
    ck = save_checkpoint(tmp_path / "m.pt", system.model, system.hparams)
    item = write_phantom_case(tmp_path, "c0", shape=(24, 24, 16))
    datalist = tmp_path / "d.json"
    datalist.write_text(json.dumps({"validation": [item]}))
    argv = ["clicks_bench.py", "--checkpoint", str(ck), "--datalist", str(datalist), "--split", "validation",
            "--clicks", "1", "--out", str(tmp_path / "out")]
    old = sys.argv
    try:
        sys.argv = argv + ["--robots", "uncertain", "--num-samples", "1"]
        with pytest.raises(SystemExit) as e:
            clicks_bench.main()
        assert e.value.code == 2
        # a whole run to its last line (a review, 2026-12-07: a NameError there stopped bench/clicks.sh half-way)
        sys.argv = argv + ["--robots", "oracle", "--num-samples", "1"]
        clicks_bench.main()
        assert (tmp_path / "out" / "summary.json").exists()
    finally:
        sys.argv = old
    assert clicks_bench._secs(None) == "n/a" and clicks_bench._secs(1.234) == "1.23"


def test_the_fine_tuning_bench_records_the_starting_checkpoint_and_each_epoch(tmp_path, make_system):
    """A review (2026-12-07): bench/finetune_lr.py (the README's "Fine-tuning in the app") crashed after its first
    epoch (the trainer's publisher no longer measures the served model itself), and a checkpoint path that does
    not exist trained a new network from the app preset. The curve starts with the served checkpoint's Dice as the
    trainer measured it (epoch 0), then one row per epoch."""
    import json

    import finetune_lr
    from lib.checkpoint import save_checkpoint
    from lib.phantoms import write_phantom_case

    system = make_system(spatial_dims=2, features=(8, 16), spacing=[1.0, 1.0], steps=1)
    ck = save_checkpoint(tmp_path / "m.pt", system.model, system.hparams)
    items = [write_phantom_case(tmp_path, f"c{k}", shape=(40, 40), seed=k, spacing=(1.0, 1.0)) for k in range(3)]
    datalist = tmp_path / "d.json"
    datalist.write_text(json.dumps({"training": items[:2], "validation": items[2:], "test": items[2:]}))
    out = tmp_path / "ft.json"
    args = ["--datalist", str(datalist), "--epochs", "1", "--arms", "cosine:1", "--out", str(out)]
    assert finetune_lr.main(["--checkpoint", str(tmp_path / "none.pt"), *args]) == 2 and not out.exists()
    assert finetune_lr.main(["--checkpoint", str(ck), *args]) == 0
    curve = json.loads(out.read_text())["arms"][0]["curve"]
    assert [c["epoch"] for c in curve] == [0, 1], curve


def test_a_bench_says_where_its_figures_come_from_and_refuses_a_missing_checkpoint_in_one_line(tmp_path):
    """A review (2026-12-07): benches printed tracebacks for a missing checkpoint, data or GPU, and some printed
    neither their command nor the CPU. Every bench's entry point (lib.cli.run_bench) prints the command, the CPU
    capability and the threads first, the wall time last, and a missing input is one line, exit 2."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "bench/sampler_bench.py", "--checkpoint", str(tmp_path / "none.pt"),
                        "--datalist", str(tmp_path / "none.json")], cwd=root, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: checkpoint not found"), r.stderr[-500:]
    assert r.stdout.startswith("command: python bench/sampler_bench.py --checkpoint") and "| CPU " in r.stdout
    for bench in sorted((root / "bench").glob("*.py")):  # every bench goes through it
        text = bench.read_text()
        if bench.name != "brats_datalist.py":
            assert "raise SystemExit(run_bench(main))" in text, bench.name


def test_bench_counts_and_sizes_out_of_range_are_refused_in_one_line(capsys):
    """A review (2026-12-07): a count or size of 0 or less ended in a traceback (os.urandom, a division by zero, an
    empty grid, a thread pool of 0 workers), or started a server bench that would record nothing. Each is argparse's
    one-line error, exit 2, before any work."""
    import importlib.util

    import pytest

    root = Path(__file__).resolve().parents[1]
    for name, argv, phrase in (("seed_key_bench", ["--mib", "-1"], "--mib and --repeats must be >= 1"),
                               ("seed_key_bench", ["--repeats", "0"], "--mib and --repeats must be >= 1"),
                               ("click_maps_bench", ["--shape", "0", "0", "0"], "--shape takes 2 or 3 sizes >= 1"),
                               ("load", ["--clients", "0"], "--clients and --requests must be >= 1"),
                               ("next_sample_bench", ["--copies", "0"], "--copies and --repeats must be >= 1")):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", root / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        with pytest.raises(SystemExit) as e:
            module.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and phrase in err, (name, argv, err)
