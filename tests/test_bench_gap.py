"""bench/cxr_gap.py's error figures, which the README's account of the BraTS click curves rests on."""

import sys
from pathlib import Path

import numpy as np

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
