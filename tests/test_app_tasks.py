"""The MONAI Label tasks in-process: parity with the core, readiness, picklability (DDP), dimension filter."""

from __future__ import annotations

import glob
import json
import os
import pickle
import shutil

import pytest
import torch

from lib.checkpoint import load_system, save_checkpoint
from lib.configs.dfm_vlm_3d import DFMVLM3D
from lib.evaluation import make_inferer, predict_item
from lib.configs._common import stale_env_key
from lib.infers.dfm_vlm import DFMVLMInfer, live_paths, sampler_params
from lib.phantoms import write_phantom_case
from lib.config import ConfigError

from conftest import ROOT


@pytest.fixture
def ckpt3d(tmp_path, make_system):
    system = make_system(spatial_dims=3, features=(8, 16), spacing=[2.0, 2.0, 2.0])
    system.hparams.preprocessing.orientation = "RAS"
    with torch.no_grad():  # make the FiLM heads matter
        for h in system.model.vlm_film_heads.values():
            h.weight.normal_(0, 0.3)
    path = tmp_path / "models" / "dfm_vlm_3d.pt"
    save_checkpoint(path, system.model, system.hparams)
    return path


def _task(ckpt, model_dir):
    cfg = DFMVLM3D()
    cfg.init("dfm_vlm_3d", str(model_dir), {"dfm_vlm_3d_checkpoint": str(ckpt)}, None)
    return cfg


class _MemoryDatastore:
    """What scoring and the uncertainty strategy read of a datastore: unlabelled images (id -> file) and their info."""

    def __init__(self, images: dict, info: dict | None = None):
        self.images, self.info = dict(images), dict(info or {})

    def get_unlabeled_images(self, *_args):  # (MONAI Label's label_tag, labels: FairRandom passes them)
        return list(self.images)

    def get_image_uri(self, image_id):
        return self.images[image_id]

    def get_image_info(self, image_id):
        return self.info.setdefault(image_id, {})

    def update_image_info(self, image_id, d):
        self.info.setdefault(image_id, {}).update(d)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_infer_task_probability_map_equals_core_predict(tmp_path, ckpt3d, precision):
    """App = core in every precision the policy can choose (fp32; bf16 forced on this CPU)."""
    from lib.evaluation import uncertainty_scores

    entry = write_phantom_case(tmp_path / "studies", "case01", shape=(40, 36, 20), spacing=(1.2, 1.0, 2.0))
    task = _task(ckpt3d, tmp_path / "model").infer()
    _, data = task({"image": entry["image"], "skip_writer": True, "steps": 3, "num_samples": 2, "device": "cpu",
                    "precision": precision})
    system = load_system(ckpt3d)
    core = predict_item(system, {"image": entry["image"], "case_id": "case01"},
                        make_inferer(system, steps=3, num_samples=2, precision=precision))
    diff = (torch.as_tensor(data["prob"]) - torch.as_tensor(core["prob"])).abs().max().item()
    assert diff <= 1e-5, diff
    assert tuple(data["pred"].shape) == tuple(core["prob"].shape[1:])
    assert data["result"]["precision"] == precision
    assert data["result"]["uncertainty"] == pytest.approx(uncertainty_scores(core["prob_pre"], core["var_pre"]))
    other = predict_item(system, {"image": entry["image"], "case_id": "case01"},
                         make_inferer(system, steps=3, num_samples=2,
                                      precision="bf16" if precision == "fp32" else "fp32"))
    assert (other["prob"] - core["prob"]).abs().max() > 1e-4, "the precision parameter must reach the predictor"


def test_info_infer_and_scoring_share_one_model_copy_on_the_default_device(tmp_path, ckpt3d, monkeypatch):
    """No second (CPU) copy for /info readiness; scoring runs on the infer task's device and copy."""
    import lib.infers.dfm_vlm as infer_mod
    from lib.activelearning.uncertainty import DFMUncertaintyScoring

    cfg = _task(ckpt3d, tmp_path / "model")
    task = cfg.infer()
    devices = []
    real = infer_mod.load_system
    monkeypatch.setattr(infer_mod, "load_system", lambda p, device, **k: devices.append(device) or real(p, **k))
    monkeypatch.setattr(type(task), "default_device", staticmethod(lambda: "cuda:7"))  # pretend a GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert task.readiness() == (True, None)
    # Slicer's options list the uncertain segment (a check box; README: where a click is worth most), off
    assert task.info()["config"]["uncertain_segment"] is False
    entry = write_phantom_case(tmp_path / "studies", "case02", shape=(24, 24, 16))

    DFMUncertaintyScoring(task, "dfm_vlm_3d", num_samples=2).score_image("case02",
                                                                         _MemoryDatastore({"case02": entry["image"]}), 2)
    assert devices == ["cuda:7"], devices
    # "cuda" (a request without a device on a GPU server) and MONAI Label's "cuda:0" are one GPU: one copy (a
    # review: two copies of model and VLM)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    task.system("cuda")
    task.system("cuda:0")
    task.system("cuda:0")
    assert devices == ["cuda:7", "cuda:0"], devices


def test_scoring_a_per_image_text_model_uses_each_image_s_text_and_skips_one_without(tmp_path, make_system):
    """A review: for a model conditioned on each image's text (text_mode 'image'), scoring called the predictor
    without a text, so the VLMError of the first image ended the whole scoring request (and Next Sample). Now the
    image's info gives its text, as a datalist entry's does, and an image without one is reported, not fatal."""
    from lib.activelearning.uncertainty import DFMUncertaintyScoring

    system = make_system(spatial_dims=3, features=(8, 16), spacing=[2.0, 2.0, 2.0], text_mode="image")
    system.hparams.preprocessing.orientation = "RAS"
    path = tmp_path / "models" / "dfm_vlm_3d.pt"
    save_checkpoint(path, system.model, system.hparams)
    task = _task(path, tmp_path / "model").infer()
    a = write_phantom_case(tmp_path / "studies", "case07", shape=(24, 24, 16))
    b = write_phantom_case(tmp_path / "studies", "case08", shape=(24, 24, 16))
    ds = _MemoryDatastore({"case07": a["image"], "case08": b["image"]}, info={"case07": {"text": "a bright blob"}})
    r = DFMUncertaintyScoring(task, "dfm_vlm_3d", num_samples=2)({}, ds)
    assert r["executed"] == 1 and "dfm_vlm_3d_uncertainty" in ds.info["case07"], r
    assert list(r["failed"]) == ["case08"] and "text" in r["failed"]["case08"], r


def test_next_sample_never_hands_out_an_image_labelled_while_it_scored(tmp_path, ckpt3d):
    """A review (2026-12-07): Next Sample listed the unlabelled images, scored them (up to its budget: minutes on
    real X-rays) and ranked that first list: an image another annotator labelled meanwhile was handed out."""
    from lib.activelearning.uncertainty import SCORE, DFMUncertaintyScoring, DFMUncertaintyStrategy

    task = _task(ckpt3d, tmp_path / "model").infer()
    images = {f"case{k}": write_phantom_case(tmp_path / "studies", f"case{k}", shape=(16, 16, 8))["image"]
              for k in range(3)}
    value = {"case0": 0.3, "case1": 0.2, "case2": 0.1}
    calls, labelled = [], []

    class Scoring(DFMUncertaintyScoring):
        def score_image(self, image_id, datastore, num_samples, device=None):
            calls.append(image_id)
            if len(calls) == len(images):  # the last one: meanwhile an annotator labels the top image scored so far
                top = max(calls[:-1], key=value.get)
                datastore.images.pop(top)
                labelled.append(top)
            return {SCORE: value[image_id]}

    ds = _MemoryDatastore(images)
    got = DFMUncertaintyStrategy(Scoring(task, "dfm_vlm_3d", num_samples=2))({"strategy": "s"}, ds)
    assert labelled and got["id"] == max(ds.images, key=value.get) != labelled[0], (got, labelled)


def test_a_score_is_reused_only_for_the_same_checkpoint_and_number_of_samples(tmp_path, ckpt3d):
    """Found by a review: scores made with M = 2 were kept when scoring was asked with M = 8 (only the checkpoint's
    time was compared), so the strategy ranked images by the cheaper, noisier estimate."""
    from lib.activelearning.uncertainty import DFMUncertaintyScoring

    task = _task(ckpt3d, tmp_path / "model").infer()
    entry = write_phantom_case(tmp_path / "studies", "case03", shape=(24, 24, 16))

    ds, scoring = _MemoryDatastore({"case03": entry["image"]}), DFMUncertaintyScoring(task, "dfm_vlm_3d", num_samples=2)
    assert scoring({}, ds)["executed"] == 1 and ds.info["case03"]["dfm_vlm_3d_uncertainty_num_samples"] == 2
    assert scoring({"num_samples": 2}, ds)["skipped"] == 1
    r = scoring({"num_samples": "3"}, ds)
    assert r["executed"] == 1 and r["skipped"] == 0 and ds.info["case03"]["dfm_vlm_3d_uncertainty_num_samples"] == 3
    for bad in ("x", 1, 2.5, 65, 100000):  # 65: over the bound, refused before any image (was a 500)
        assert "num_samples" in scoring({"num_samples": bad}, ds).get("error", ""), bad
    # the strategy ranks only the served checkpoint's scores: after a training publishes, it rescores first (it
    # ranked scores of the old and the new model side by side)
    from lib.activelearning.uncertainty import DFMUncertaintyStrategy

    strategy = DFMUncertaintyStrategy(scoring)
    ds.info["case03"][f"{scoring.key}_num_samples"] = 2
    ds.info["case03"][scoring.key] = -1.0  # a score that no checkpoint of today made
    ds.info["case03"][f"{scoring.key}_ts"] = scoring.model_ts() - 1  # a nanosecond older: another file
    res = strategy({}, ds)
    assert res["id"] == "case03" and res[scoring.key] >= 0 and ds.info["case03"][f"{scoring.key}_ts"] == \
        scoring.model_ts()
    # an image that cannot be scored now keeps its old model's score, which must not outrank the current ones
    broken = tmp_path / "studies" / "case04.nii.gz"
    broken.write_bytes(b"not a volume")

    ds2 = _MemoryDatastore({"case03": entry["image"], "case04": str(broken)},
                           info={"case03": dict(ds.info["case03"]),
                                 "case04": {scoring.key: 1e9, f"{scoring.key}_num_samples": 2, f"{scoring.key}_ts": 1}})
    scoring.candidates = lambda datastore: datastore.get_unlabeled_images()  # the broken file is not 3D-checked
    assert strategy({}, ds2)["id"] == "case03"
    # two trainings can publish within one second (0.3 s epochs on the phantoms): their scores must differ in ts
    import os

    path = task.get_path()
    second = os.stat(path).st_mtime_ns // 10 ** 9 * 10 ** 9
    os.utime(path, ns=(second + 100_000_000, second + 100_000_000))
    first = scoring.model_ts()
    os.utime(path, ns=(second + 500_000_000, second + 500_000_000))
    assert scoring.model_ts() != first


def test_next_sample_by_uncertainty_survives_a_publish_failures_removals_and_does_not_repeat_itself(tmp_path, ckpt3d):
    """A review (2026-12-06) of the uncertainty strategy: (1) a training that published while Next Sample rescored
    left no score of the newest checkpoint, and the answer was "no more images" (None) with 3 unlabelled images; so
    was a datastore whose every image failed to score; (2) the same image came back on every Next Sample (the time
    MONAI Label records when it hands an image out was ignored, as its Epistemic strategy does not); (3) the scores
    of a ``POST /scoring`` with ``num_samples=8`` were thrown away and every image rescored inside the next Next
    Sample; (4) an image removed while scoring ran ended the run (404) and left the others unscored."""
    import os
    import time

    from fastapi import HTTPException

    from lib.activelearning.uncertainty import SCORE, DFMUncertaintyScoring, DFMUncertaintyStrategy
    from lib.transforms import InputError

    task = _task(ckpt3d, tmp_path / "model").infer()
    images = {f"case{k}": write_phantom_case(tmp_path / "studies", f"case{k}", shape=(16, 16, 8))["image"]
              for k in range(4)}
    value = {"case0": 0.3, "case1": 0.2, "case2": 0.1, "case3": 0.05}
    calls = []

    class Scoring(DFMUncertaintyScoring):  # the ranking logic under test; the score itself: other tests
        def score_image(self, image_id, datastore, num_samples, device=None):
            calls.append((image_id, num_samples))
            if image_id in broken:
                raise InputError(f"{image_id}: no text")
            if image_id == publish_after:  # a training publishes a checkpoint meanwhile
                t = os.stat(task.get_path()).st_mtime_ns + 10 ** 9
                os.utime(task.get_path(), ns=(t, t))
            if image_id == removed:
                datastore.images.pop(image_id)
            return {SCORE: value[image_id]}

    class DS(_MemoryDatastore):
        def update_image_info(self, image_id, d):
            if image_id not in self.images:
                raise HTTPException(status_code=404, detail=f"unknown image id {image_id!r}")
            super().update_image_info(image_id, d)

    def next_sample(strategy, ds):  # as MONAI Label's app: the strategy, then the time it handed the image out
        r = strategy({"strategy": "s"}, ds)
        ds.get_image_info(r["id"]).setdefault("strategy", {})["s"] = {"ts": int(time.time())}
        return r["id"]

    broken, publish_after, removed = set(), "case1", None
    ds = DS({k: v for k, v in images.items() if k != "case3"})
    scoring = Scoring(task, "dfm_vlm_3d", num_samples=2)
    strategy = DFMUncertaintyStrategy(scoring)
    assert next_sample(strategy, ds) == "case0"  # (1) was None: every score older than the published file
    publish_after = None
    # (2) the next two are the others, most uncertain first; then the one handed out longest ago
    assert [next_sample(strategy, ds) for _ in range(2)] == ["case1", "case2"]
    ds.info["case1"]["strategy"]["s"]["ts"] -= 100
    assert next_sample(strategy, ds) == "case1"
    # (3) an explicit scoring with 8 samples is what the strategy ranks by, not rescored with its default 2
    calls.clear()
    assert scoring({"num_samples": 8}, ds)["executed"] == 3 and {m for _, m in calls} == {8}
    calls.clear()
    strategy({"strategy": "s"}, ds)
    assert calls == [] and {ds.info[i][f"{scoring.key}_num_samples"] for i in ds.images} == {8}
    ds.images["case3"] = images["case3"]  # a new image: scored with the same 8
    strategy({"strategy": "s"}, ds)
    assert calls == [("case3", 8)]
    # (4) an image removed while scoring runs: skipped, the others scored
    removed = "case1"
    r = scoring({"num_samples": 3}, ds)
    assert r["executed"] == 3 and "case1" not in ds.images
    # (1') every image fails: an error naming why (the app answers 422), not "no more images"
    ds2 = DS({"case0": images["case0"], "case2": images["case2"]})
    broken = {"case0", "case2"}
    with pytest.raises(InputError, match="case0: case0: no text"):
        strategy({"strategy": "s"}, ds2)
    # records edited by hand (PUT /datastore/imageinfo): a score that is no number is scored again, a 'strategy'
    # record that is not one counts as never handed out (a review: 500s)
    broken = set()
    ds3 = DS({"case0": images["case0"], "case2": images["case2"]})
    strategy({"strategy": "s"}, ds3)
    ds3.info["case0"][scoring.key] = None
    ds3.info["case2"]["strategy"] = "x"
    calls.clear()
    assert strategy({"strategy": "s"}, ds3)["id"] == "case0" and calls == [("case0", 2)]
    ds3.info["case2"][scoring.key] = float("nan")
    calls.clear()
    strategy({"strategy": "s"}, ds3)
    assert calls == [("case2", 2)] and ds3.info["case2"][scoring.key] == value["case2"]
    ds3.info["case2"][scoring.key] = 10 ** 400  # a 400-digit score (an OverflowError in math.isfinite: a 500)
    calls.clear()
    strategy({"strategy": "s"}, ds3)
    assert calls == [("case2", 2)] and ds3.info["case2"][scoring.key] == value["case2"]


def test_next_sample_scores_for_at_most_its_budget_most_uncertain_first_and_ranks_only_current_scores(tmp_path,
                                                                                                        ckpt3d):
    """MONAI Label runs a strategy on the server's event loop (``api_sample`` is ``async`` and calls it directly): after
    a training published a checkpoint, Next Sample rescored every unlabelled image inside the request, and the server
    answered nothing else meanwhile (42 s on the 3 sample volumes, /info included). It now scores for at most
    ``scoring_s`` seconds (at least one image), the stale images in the order of their last score, and ranks only the
    scores the served checkpoint made; the next Next Samples (or MONAI Label's background scoring) score the rest."""
    from lib.activelearning.uncertainty import SCORE, DFMUncertaintyScoring, DFMUncertaintyStrategy
    from lib.transforms import InputError

    task = _task(ckpt3d, tmp_path / "model").infer()
    ids = [f"case{k}" for k in range(5)]
    image = write_phantom_case(tmp_path / "studies", "case", shape=(16, 16, 8))["image"]
    new = {"case0": 0.1, "case1": 0.5, "case2": 0.2, "case3": 0.9, "case4": 0.3}  # the new checkpoint's scores
    old = {"case0": 0.7, "case1": 0.6, "case2": 0.1, "case3": 0.2, "case4": 0.5}  # the last checkpoint's
    clock, calls = [0.0], []

    class Scoring(DFMUncertaintyScoring):  # each image takes 4 s on this clock
        def score_image(self, image_id, datastore, num_samples, device=None):
            calls.append(image_id)
            clock[0] += 4.0
            if image_id in broken:
                raise InputError(f"{image_id}: no text")
            return {SCORE: new[image_id]}

    broken = set()

    scoring = Scoring(task, "dfm_vlm_3d", num_samples=2)
    scoring.clock = lambda: clock[0]
    key, ts = scoring.key, scoring.model_ts()
    ds = _MemoryDatastore({i: image for i in ids},
                          info={i: {key: old[i], f"{key}_ts": ts - 1, f"{key}_num_samples": 2} for i in ids})
    strategy = DFMUncertaintyStrategy(scoring, scoring_s=10)
    r = strategy({"strategy": "s"}, ds)
    # 3 images in the 10 s (the third starts at 8 s), the highest old scores first; the answer is the best of those
    assert calls == ["case0", "case1", "case4"], calls
    assert r["id"] == "case1" and r[key] == new["case1"] and r[f"{key}_ranked"] == 3 and r[f"{key}_pending"] == 2
    assert ds.info["case3"][f"{key}_ts"] == ts - 1  # not scored yet: its old score is not ranked beside the new
    calls.clear()
    r = strategy({"strategy": "s", "scoring_s": 0}, ds)  # the next one: one more image, the rest already current
    assert calls == ["case3"] and r["id"] == "case3" and r[f"{key}_pending"] == 1
    calls.clear()
    assert scoring({}, ds)["executed"] == 1 and calls == ["case2"]  # the background scoring: no deadline
    calls.clear()
    r = strategy({"strategy": "s", "scoring_s": 0}, ds)
    assert calls == [] and r[f"{key}_ranked"] == 5 and r[f"{key}_pending"] == 0
    for bad in (-1, "x", float("nan"), float("inf"), True):
        with pytest.raises(InputError, match="scoring_s"):
            strategy({"strategy": "s", "scoring_s": bad}, ds)
    # a budget spent before any image could be scored still scores until one is: never "no more images"
    fresh = _MemoryDatastore({"case0": image, "case1": image, "case2": image})
    calls.clear()
    assert strategy({"strategy": "s", "scoring_s": 0}, fresh)["id"] == "case0" and calls == ["case0"]
    fresh = _MemoryDatastore({"case0": image, "case1": image, "case2": image})
    broken = {"case0"}
    calls.clear()
    assert strategy({"strategy": "s", "scoring_s": 0}, fresh)["id"] == "case1" and calls == ["case0", "case1"]
    # an image that always fails, first in the order (never scored), beside a current score: the call goes on to
    # the next image (a second review: it ended every call's scoring, and Next Sample ranked the old scores only)
    cur = {key: 0.05, f"{key}_ts": ts, f"{key}_num_samples": 2}
    stuck = _MemoryDatastore({"case0": image, "case1": image, "case2": image}, info={"case2": dict(cur)})
    calls.clear()
    r = strategy({"strategy": "s", "scoring_s": 0}, stuck)
    assert calls == ["case0", "case1"] and r["id"] == "case1" and r[f"{key}_ranked"] == 2, (calls, r)


def test_next_sample_never_hands_out_an_image_another_annotator_has_and_scores_stay_the_served_model_s(tmp_path,
                                                                                                       ckpt3d):
    """A review of the active-learning loop (2026-12-07): (1) after a new checkpoint the rescoring took the highest old
    score first -- the image just handed out -- and, with one image's budget, the next annotator got it while an image
    nobody had stayed unscored; (2) hand-outs counted per strategy (an image taken from 'first' was handed out by the
    uncertainty strategy and 'random'); (3) MONAI Label's background scoring, which names no M, replaced the scores of
    a POST /scoring with num_samples 8; (4) an image replaced while it was scored got the old file's score, counted
    current; (5) 'random' answered 500 for a hand-out record edited to {"ts": null}."""
    import time

    from lib.activelearning.fair_random import FairRandom
    from lib.activelearning.uncertainty import SCORE, DFMUncertaintyScoring, DFMUncertaintyStrategy

    task = _task(ckpt3d, tmp_path / "model").infer()
    image = write_phantom_case(tmp_path / "studies", "case", shape=(16, 16, 8))["image"]
    ids = ["ct5", "ct6", "ct7"]
    calls, replace = [], set()

    class Scoring(DFMUncertaintyScoring):
        def score_image(self, image_id, datastore, num_samples, device=None):
            calls.append((image_id, num_samples))
            if image_id in replace:  # PUT /datastore/image of this id while it is scored
                datastore.info[image_id].update(ts=datastore.info[image_id].get("ts", 0) + 1, name="new.nrrd")
            return {SCORE: {"ct5": 0.9, "ct6": 0.5, "ct7": 0.1}[image_id]}

    scoring = Scoring(task, "dfm_vlm_3d", num_samples=2)
    key, ts = scoring.key, scoring.model_ts()
    strategy = DFMUncertaintyStrategy(scoring)
    ds = _MemoryDatastore({i: image for i in ids})

    def next_sample(strategy_name, request=None):  # as MONAI Label's app records a hand-out
        r = (strategy if strategy_name == "uncertainty" else FairRandom())({"strategy": strategy_name,
                                                                            **(request or {})}, ds)
        ds.get_image_info(r["id"]).setdefault("strategy", {})[strategy_name] = {"ts": int(time.time())}
        return r["id"]

    assert [next_sample("uncertainty") for _ in range(2)] == ["ct5", "ct6"]  # two annotators
    # (1) a training publishes: stale scores; one image's budget scores ct7 first (nobody has it), not ct5
    for i in ids:
        ds.info[i][f"{key}_ts"] = ts - 1
    calls.clear()
    assert next_sample("uncertainty", {"scoring_s": 0}) == "ct7" and calls == [("ct7", 2)]
    # (2) a hand-out under any strategy counts: ct7 and ct5 are taken, 'random' gives the one handed out longest ago
    for i in ids:
        ds.info[i]["strategy"] = {}
    ds.info["ct5"]["strategy"]["first"] = {"ts": int(time.time())}
    assert "ct5" not in {FairRandom()({"strategy": "random"}, ds)["id"] for _ in range(30)}
    for i in ids:
        ds.info[i]["strategy"] = {}
    ds.info["ct5"]["strategy"]["first"] = {"ts": int(time.time())}
    assert next_sample("uncertainty", {"scoring_s": 0}) == "ct6"  # ct5 (higher score) is in progress under 'first'
    # (5) edited records: no 500, counted as never handed out
    for bad in ({"random": {"ts": None}}, {"random": {"ts": "yesterday"}}, {"random": "x"}, "x"):
        ds.info["ct6"]["strategy"] = bad
        assert FairRandom()({"strategy": "random"}, ds)["id"] in ids
    # (3) a POST /scoring with 8 samples, then MONAI Label's background scoring (no num_samples): the 8s stay
    calls.clear()
    assert scoring({"num_samples": 8}, ds)["executed"] == 3
    calls.clear()
    r = scoring({}, ds)
    assert calls == [] and r["num_samples"] == 8 and r["skipped"] == 3, r
    assert {ds.info[i][f"{key}_num_samples"] for i in ids} == {8}
    # ... but a server restarted with another default (--conf uncertainty_samples 3) scores with it: those 8s were
    # asked for under the default 2, a default's scores are not (a second review: the old default's 4s were kept
    # when the conf said 8); an M edited into the index is checked
    calls.clear()
    assert scoring({}, ds)["num_samples"] == 8
    restarted = Scoring(task, "dfm_vlm_3d", num_samples=3)
    r = restarted({}, ds)
    assert r["num_samples"] == 3 and r["executed"] == 3, r
    r = Scoring(task, "dfm_vlm_3d", num_samples=2)({}, ds)
    assert r["num_samples"] == 2 and r["executed"] == 3, r  # 3 was the default then, not asked for
    for i in ids:
        ds.info[i][f"{key}_num_samples"] = 1
        ds.info[i][f"{key}_default_num_samples"] = 2
    assert scoring({}, ds)["num_samples"] == 2
    # (4) replaced while scored: no score of the old file on the new one
    for i in ids:
        ds.info[i][f"{key}_ts"] = ts - 1
    replace.add("ct6")
    r = scoring({}, ds)
    assert ds.info["ct6"][f"{key}_ts"] == ts - 1 and ds.info["ct5"][f"{key}_ts"] == ts and r["executed"] == 2, r
    # the request's device is the one scoring runs on (it ran on the infer task's default whatever it said)
    replace.clear()
    seen = []
    scoring.score_image = lambda image_id, datastore, num_samples, device=None: seen.append(device) or {SCORE: 0.1}
    task.default_device = lambda: "cuda:7"  # (a device this machine does not have: used only if "cpu" is ignored)
    for i in ids:
        ds.info[i][f"{key}_ts"] = ts - 1
    assert scoring({"device": "cpu"}, ds)["executed"] == 3 and seen == ["cpu"] * 3
    assert "'device' 'bogus'" in scoring({"device": "bogus"}, ds)["error"]
    # a hand-out time that is no float (a 400-digit integer through PUT /datastore/imageinfo): never handed out
    ds.info["ct6"]["strategy"] = {"random": {"ts": 10 ** 400}}
    assert FairRandom()({"strategy": "random"}, ds)["id"] in ids


def test_a_scoring_process_does_not_write_the_score_of_an_image_replaced_while_it_scored(tmp_path, ckpt3d):
    """A second review: the check that a scored image was not replaced meanwhile was proven on the datastore's method
    only; here through the scoring loop, on the app's datastore, with the replacement made by another process's
    datastore (the server's) in the same second and format."""
    import shutil
    from pathlib import Path

    from lib.activelearning.uncertainty import SCORE, DFMUncertaintyScoring
    from lib.datastore import CheckedLocalDatastore

    studies = tmp_path / "studies"
    studies.mkdir()
    for k in (5, 6):
        shutil.copy(f"{Path(__file__).parent.parent}/sample_data/phantom_ct_0{k}.nii.gz", studies / f"ct{k}.nii.gz")
    server = CheckedLocalDatastore(str(studies), extensions=["*.nii.gz"])
    scoring_ds = CheckedLocalDatastore(str(studies), extensions=["*.nii.gz"])
    server.add_image("ct5", str(studies / "ct5.nii.gz"), {})
    scoring_ds._reload_index_locked()

    class Scoring(DFMUncertaintyScoring):
        def score_image(self, image_id, datastore, num_samples, device=None):
            if image_id == "ct5":  # the server replaces it meanwhile
                server.add_image("ct5", str(studies / "ct6.nii.gz"), {})
            return {SCORE: 0.5}

        def candidates(self, datastore):
            return ["ct5"]

    r = Scoring(_task(ckpt3d, tmp_path / "model").infer(), "m", num_samples=2)({}, scoring_ds)
    assert r["executed"] == 0, r
    assert "m_uncertainty" not in CheckedLocalDatastore(str(studies), extensions=["*.nii.gz"],
                                                         read_only=True).get_image_info("ct5")


def test_the_scoring_request_and_its_conf_are_checked_before_anything_runs(tmp_path, ckpt3d):
    """A review: POST /scoring with num_samples 1 or "abc" answered 200 (a task that ended DONE with an error), a
    bad device or sampler settings were ignored; --conf uncertainty_samples 1 started a server whose every scoring failed, "abc" gave a
    traceback."""
    from fastapi import HTTPException

    from lib.config import ConfigError
    from monailabel_app.main import check_task_request

    class App:
        _scoring_methods = {"dfm_vlm_3d_uncertainty": object()}

    for params, phrase in (({"num_samples": 1}, "'num_samples' must be an integer in [2, 64]"),
                           ({"num_samples": "abc"}, "'num_samples' must be an integer"),
                           ({"device": "bogus"}, "'device' 'bogus'"), ([1, 2], "must be a JSON object"),
                           # accepted and ignored (a review): the served checkpoint's sampler scores every image
                           ({"steps": 6, "sampler": "heun", "num_samples": 2}, "['sampler', 'steps'] cannot be set "
                                                                               "for scoring")):
        with pytest.raises(HTTPException) as e:
            check_task_request(App(), "scoring", {"method": "dfm_vlm_3d_uncertainty"}, params)
        assert e.value.status_code == 422 and phrase in e.value.detail, (params, e.value.detail)
    ok = {"num_samples": "8", "device": "cpu"}
    assert check_task_request(App(), "scoring", {"method": "dfm_vlm_3d_uncertainty"}, ok) == ok
    # POST /scoring/ (every method): each method's own parameters under its name are checked too
    with pytest.raises(HTTPException) as e:
        check_task_request(App(), "scoring", {}, {"dfm_vlm_3d_uncertainty": {"num_samples": 1}})
    assert e.value.status_code == 422 and "scoring dfm_vlm_3d_uncertainty: parameter 'num_samples'" in e.value.detail
    for bad in (1, "abc"):
        cfg = _task(ckpt3d, tmp_path / "model")
        cfg.conf["uncertainty_samples"] = bad
        cfg._scoring = None
        with pytest.raises(ConfigError, match="--conf uncertainty_samples: parameter 'num_samples'"):
            cfg.scoring_method()


def test_next_sample_s_budget_from_conf_is_checked_and_named(tmp_path, ckpt3d):
    cfg = DFMVLM3D()
    cfg.init("dfm_vlm_3d", str(tmp_path / "model"), {"dfm_vlm_3d_checkpoint": str(ckpt3d),
                                                     "next_sample_scoring_s": "2.5"}, None)
    assert cfg.strategy()["dfm_vlm_3d_uncertainty"].scoring_s == 2.5
    for bad in ("x", "-1", "nan"):
        cfg = DFMVLM3D()
        cfg.init("dfm_vlm_3d", str(tmp_path / "model"), {"dfm_vlm_3d_checkpoint": str(ckpt3d),
                                                         "next_sample_scoring_s": bad}, None)
        with pytest.raises(ConfigError, match="--conf next_sample_scoring_s"):
            cfg.strategy()


def test_a_checkpoint_published_while_a_request_runs_does_not_fail_it(tmp_path, ckpt3d, monkeypatch):
    """A review (2026-12-06): the model was looked up twice per request, for its preprocessing and for its inference;
    a training that published between the two (loading and resampling a volume takes seconds) made the request
    infer with the new model and invert with its transforms, which MONAI refused (RuntimeError: a 500). The model that
    preprocessed an image now infers and inverts it, and the result names that checkpoint; the next request is
    served by the new one."""
    import os

    import lib.infers.dfm_vlm as m

    entry = write_phantom_case(tmp_path / "studies", "case01", shape=(40, 36, 20), spacing=(1.2, 1.0, 2.0))
    task = _task(ckpt3d, tmp_path / "model").infer()
    req = {"image": entry["image"], "skip_writer": True, "steps": 2, "device": "cpu"}
    _, before = task(dict(req))
    first = task.system("cpu")
    real = m.DFMPreprocessd.__call__

    def pre_then_publish(self, data):
        out = real(self, data)
        t = os.stat(task.get_path()).st_mtime_ns + 10 ** 9
        os.utime(task.get_path(), ns=(t, t))  # a training publishes (here: the same weights, a new file time)
        return out

    monkeypatch.setattr(m.DFMPreprocessd, "__call__", pre_then_publish)
    _, during = task(dict(req))
    assert torch.equal(torch.as_tensor(during["prob"]), torch.as_tensor(before["prob"]))
    assert during["result"]["checkpoint_sha256"] == first.checkpoint_sha256
    monkeypatch.setattr(m.DFMPreprocessd, "__call__", real)
    task(dict(req))
    assert task.system("cpu") is not first  # the published file serves the next request
    # published right after the request's config followed the served checkpoint (other weights this time): the
    # request still runs that one, whose sampler settings its config holds (a review: the preprocessing loaded the
    # new one)
    served = task.system("cpu")
    other = load_system(ckpt3d)
    with torch.no_grad():
        for p in other.model.parameters():
            p.add_(0.01)
    follow = task.follow_checkpoint

    def follow_then_publish(system):
        follow(system)
        save_checkpoint(task.get_path(), other.model, other.hparams)
        t = os.stat(task.get_path()).st_mtime_ns + 10 ** 9
        os.utime(task.get_path(), ns=(t, t))

    monkeypatch.setattr(task, "follow_checkpoint", follow_then_publish)
    _, pinned = task(dict(req))
    assert pinned["result"]["checkpoint_sha256"] == served.checkpoint_sha256
    monkeypatch.setattr(task, "follow_checkpoint", follow)
    _, after = task(dict(req))
    assert after["result"]["checkpoint_sha256"] != served.checkpoint_sha256
    # on a GPU server a request without a device is "cuda" when it starts and "cuda:0" once MONAI Label merged the
    # config (a review: the pin compared the two spellings and was skipped): one device, one pinned model
    for name, fake in (("is_available", lambda: True), ("device_count", lambda: 2), ("current_device", lambda: 0),
                       ("get_device_name", lambda i=0: "NVIDIA H100")):
        monkeypatch.setattr(torch.cuda, name, fake)
    assert task._device({"device": "cuda:0"}) == "cuda:0"
    task._pin("cuda", served)
    try:
        (pre,) = task.pre_transforms({"device": "cuda:0"})
    finally:
        task._pin(None, None)
    assert pre.system is served and task._pinned("cuda:0") is None
    task._pin("cuda:0", served)  # and the other way round (Slicer names the GPU: "cuda:0" from the start)
    try:
        assert task._pinned("cuda") is served and task._pinned("cpu") is None
    finally:
        task._pin(None, None)


def test_a_published_checkpoint_removed_while_it_loads_serves_the_configured_one(tmp_path, ckpt3d, monkeypatch):
    """A review: the published file removed between its look-up and its load (DELETE /model, a training replacing
    it) gave a FileNotFoundError, a 500 on /infer and /info. The file served now is looked up again."""
    import shutil
    from pathlib import Path

    import lib.infers.dfm_vlm as infers

    cfg = _task(ckpt3d, tmp_path / "model")
    task = cfg.infer()
    published = Path(cfg.published)
    published.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(ckpt3d, published)
    assert task.get_path() == str(published)
    real = infers.load_system

    def removed_meanwhile(path, *a, **k):
        if str(path) == str(published) and published.exists():
            published.unlink()
        return real(path, *a, **k)

    monkeypatch.setattr(infers, "load_system", removed_meanwhile)
    system = task.system("cpu")
    assert system.checkpoint.path == str(ckpt3d) and not published.exists()
    assert task.info()["checkpoint"]["path"] == str(ckpt3d)
    # and once more where the file goes after its look-up, before its time is read
    shutil.copy(ckpt3d, published)
    task.clear_cache()
    real_get = type(task).get_path

    def then_gone(self, validate=True):
        p = real_get(self, validate)
        if p == str(published) and published.exists():
            published.unlink()
        return p

    monkeypatch.setattr(type(task), "get_path", then_gone)
    assert task.system("cpu").checkpoint.path == str(ckpt3d)


def test_the_model_endpoints_never_touch_a_configured_checkpoint_that_is_also_the_published_one(tmp_path, ckpt3d,
                                                                                                monkeypatch):
    """A second review: PUT and DELETE /model compared the published and the configured checkpoint as strings, so
    with --conf model_dir holding the configured file (or <model>_checkpoint naming the published one) a DELETE
    removed the configured checkpoint and a PUT overwrote it. And an upload whose hyper_parameters are a string
    was a 500 (a TypeError), not the 422 the others get."""
    import io
    import types

    import torch
    from fastapi import HTTPException

    import monailabel.endpoints.model as endpoint
    import monailabel.interfaces.utils.app as app_utils
    from monailabel_app.main import _install_model_file_checks

    _install_model_file_checks()
    task = _task(ckpt3d, tmp_path / "model").infer()

    class App:
        _infers = {"dfm_vlm_3d": task}

    monkeypatch.setattr(app_utils, "app_instance", lambda: App())
    before = ckpt3d.read_bytes()
    task.path = [str(ckpt3d), str(ckpt3d)]  # --conf model_dir is the configured checkpoint's folder
    for call in (lambda: endpoint.delete_model("dfm_vlm_3d"),
                 lambda: endpoint.update_model(None, "dfm_vlm_3d", types.SimpleNamespace(file=io.BytesIO(before)))):
        with pytest.raises(HTTPException) as e:
            call()
        assert e.value.status_code == 409 and "configured" in e.value.detail, e.value.detail
    assert ckpt3d.read_bytes() == before
    task.path = [str(ckpt3d), str(tmp_path / "model" / "dfm_vlm_3d.pt")]
    bad = torch.load(ckpt3d, weights_only=True)
    bad["hyper_parameters"] = "not a mapping"
    body = io.BytesIO()
    torch.save(bad, body)
    with pytest.raises(HTTPException) as e:
        endpoint.update_model(None, "dfm_vlm_3d", types.SimpleNamespace(file=io.BytesIO(body.getvalue())))
    assert e.value.status_code == 422 and "not a checkpoint this model can serve" in e.value.detail
    assert not (tmp_path / "model" / "dfm_vlm_3d.pt").exists()


def test_a_checkpoint_named_with_conf_wins_over_one_an_earlier_session_published(tmp_path, ckpt3d, monkeypatch):
    """Found by a review: with --conf dfm_vlm_3d_checkpoint X, a dfm_vlm_3d.pt that an earlier session had published
    into model_dir (shared by every --studies) was served instead of X, silently. X is served until a training here
    publishes a newer file; without --conf the published file is served, as before."""
    import os
    import time

    monkeypatch.delenv(stale_env_key("dfm_vlm_3d"), raising=False)  # a fresh server
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    stale = model_dir / "dfm_vlm_3d.pt"
    shutil.copy(ckpt3d, stale)
    os.utime(stale, (time.time() - 3600, time.time() - 3600))  # last week's session
    named = tmp_path / "named.pt"
    shutil.copy(ckpt3d, named)
    cfg = DFMVLM3D()
    cfg.init("dfm_vlm_3d", str(model_dir), {"dfm_vlm_3d_checkpoint": str(named)}, None)
    task = cfg.infer()
    assert task.get_path() == str(named) == cfg.interactive_infer().get_path()
    assert task.info()["checkpoint"]["path"] == str(named)
    os.utime(stale, None)  # a training here publishes: served from the next request
    assert task.get_path() == str(stale)
    # MONAI Label's training / scoring subprocesses build the app again later, with the server's environment: they
    # too see this session's published file as current (each took its own start time: training #2 fine-tuned from
    # the --conf file again, scoring scored it)
    time.sleep(0.05)
    child = DFMVLM3D()
    child.init("dfm_vlm_3d", str(model_dir), {"dfm_vlm_3d_checkpoint": str(named)}, None)
    assert child.stale_before == cfg.stale_before
    trainer = child.trainer()
    assert child.infer().get_path() == str(stale) == live_paths(trainer.init_paths, trainer.stale_before)[-1]
    plain = DFMVLM3D()
    plain.init("dfm_vlm_3d", str(model_dir), {}, None)
    assert plain.infer().get_path() == str(stale)


def test_untrained_model_is_not_served(tmp_path):
    cfg = _task(tmp_path / "missing.pt", tmp_path / "model")
    task = cfg.infer()
    ok, reason = task.readiness()
    assert not ok and "no trained checkpoint" in reason and not task.is_valid()
    bad = tmp_path / "model" / "dfm_vlm_3d.pt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"garbage")
    ok, reason = task.readiness()
    assert not ok and "cannot be served" in reason


def test_next_sample_by_uncertainty_without_a_model_is_a_503_naming_why(tmp_path, ckpt3d):
    """A review: with no servable checkpoint the uncertainty strategy answered None, which MONAI Label sends as {}
    (a client shows "no more images" with images waiting); scoring's model time was os.stat(None), a 500. Now a
    503 that names the missing checkpoint and the strategies that need no model; with a checkpoint the same
    request serves an image."""
    from fastapi import HTTPException

    from lib.activelearning.uncertainty import DFMUncertaintyScoring, DFMUncertaintyStrategy
    from lib.infers.dfm_vlm import ModelNotReady
    from monailabel_app.main import DFMVLMApp

    entry = write_phantom_case(tmp_path / "studies", "case05", shape=(24, 24, 16))

    published = tmp_path / "model" / "dfm_vlm_3d.pt"
    task = _task(tmp_path / "missing.pt", tmp_path / "model").infer()
    scoring = DFMUncertaintyScoring(task, "dfm_vlm_3d", num_samples=2)
    assert "no trained checkpoint" in scoring({}, _MemoryDatastore({"case05": entry["image"]}))["error"]
    app = object.__new__(DFMVLMApp)  # the app's request method alone (no server): its strategy, its datastore
    ds = _MemoryDatastore({"case05": entry["image"]})
    app._strategies = {"dfm_vlm_3d_uncertainty": DFMUncertaintyStrategy(scoring)}
    app._datastore, app.datastore, app._auto_update_scoring = ds, (lambda: ds), False
    for content in (None, b"garbage"):  # no file; a file that cannot be loaded
        if content:
            published.parent.mkdir(parents=True, exist_ok=True)
            published.write_bytes(content)
        with pytest.raises(ModelNotReady):
            app._strategies["dfm_vlm_3d_uncertainty"]({}, ds)
        with pytest.raises(HTTPException) as e:
            app.next_sample({"strategy": "dfm_vlm_3d_uncertainty"})
        assert e.value.status_code == 503 and "'random'" in e.value.detail, e.value.detail
        assert ("no trained checkpoint" if content is None else "cannot be served") in e.value.detail
    shutil.copy(ckpt3d, published)
    assert app.next_sample({"strategy": "dfm_vlm_3d_uncertainty"})["id"] == "case05"


def test_a_conf_checkpoint_that_is_missing_is_not_replaced_and_one_of_the_other_dimension_stops_the_start(
        tmp_path, ckpt3d, make_system):
    """A review (2026-12-07): a mistyped ``--conf <model>_checkpoint`` served last week's published model (or the
    sample one) while the log named the missing file -- now nothing is served until the file exists (or a training
    here publishes one), and /info says which files it looked for; a 2D checkpoint named for the 3D model was
    "ready" in /info, which said 3D, and failed every request; a misspelt model in the option, or ``interactive
    off``, was ignored; the trainer's /info labels were the preset's, not the served checkpoint's."""
    import os
    import time
    import types

    import monailabel_app.main as app_main

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copy(ckpt3d, model_dir / "dfm_vlm_3d.pt")
    os.utime(model_dir / "dfm_vlm_3d.pt", (time.time() - 86400, time.time() - 86400))  # an earlier session's
    typo = DFMVLM3D()
    typo.init("dfm_vlm_3d", str(model_dir), {"dfm_vlm_3d_checkpoint": str(tmp_path / "nmaed.pt")}, None)
    ok, reason = typo.infer().readiness()
    assert not ok and "nmaed.pt" in reason and typo.infer().get_path() is None, reason
    shutil.copy(ckpt3d, tmp_path / "nmaed.pt")  # the file named comes: it is served
    assert typo.infer().get_path() == str(tmp_path / "nmaed.pt")
    two_d = tmp_path / "two_d.pt"
    system = make_system()
    save_checkpoint(two_d, system.model, system.hparams)
    with pytest.raises(ConfigError, match=r"model dfm_vlm_3d is 3D but its checkpoint .*two_d.pt is a 2D model"):
        DFMVLM3D().init("dfm_vlm_3d", str(tmp_path / "m2"), {"dfm_vlm_3d_checkpoint": str(two_d)}, None)
    cfg = _task(ckpt3d, tmp_path / "m3")
    assert cfg.trainer().info()["labels"] == list(cfg.labels) == ["blob"], (cfg.trainer().info(), cfg.labels)
    with pytest.raises(ValueError, match=r"--conf dfm_vlm3d_checkpoint: no model 'dfm_vlm3d'"):
        app_main.DFMVLMApp(str(tmp_path / "app"), str(tmp_path), {"dfm_vlm3d_checkpoint": str(ckpt3d)})
    fake = types.SimpleNamespace(models={"dfm_vlm_3d": cfg}, conf={"interactive": "off"})
    assert list(app_main.DFMVLMApp.init_infers(fake)) == ["dfm_vlm_3d"]
    fake.conf = {}
    assert list(app_main.DFMVLMApp.init_infers(fake)) == ["dfm_vlm_3d", "dfm_vlm_3d_interactive"]


def test_a_failing_checkpoint_is_not_reloaded_on_every_poll_but_a_new_file_is(tmp_path, ckpt3d, monkeypatch):
    import lib.infers.dfm_vlm as infer_mod

    cfg = _task(tmp_path / "missing.pt", tmp_path / "model")
    task = cfg.infer()
    calls = []
    real = infer_mod.load_system
    monkeypatch.setattr(infer_mod, "load_system", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    bad = tmp_path / "model" / "dfm_vlm_3d.pt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"garbage")
    for _ in range(3):  # /info asks every few seconds
        ok, reason = task.readiness()
        assert not ok and "cannot be served" in reason
    assert len(calls) == 1
    shutil.copy(ckpt3d, bad)  # the trainer publishes a good checkpoint: served at once
    assert task.readiness() == (True, None) and len(calls) == 2


def test_published_checkpoint_replaces_the_default_without_restart(tmp_path, ckpt3d, make_system):
    cfg = _task(ckpt3d, tmp_path / "model")
    task = cfg.infer()
    assert task.system("cpu").checkpoint.path == str(ckpt3d)
    other = make_system(spatial_dims=3, features=(8, 16, 32), spacing=[2.0, 2.0, 2.0])
    save_checkpoint(cfg.published, other.model, other.hparams)
    s = task.system("cpu")
    assert s.checkpoint.path == cfg.published and s.model.cfg.features == (8, 16, 32)


def test_request_parameters_are_validated():
    assert sampler_params({"steps": "4", "overlap": "0.5", "sampler": ["heun", "euler"]}) == \
        {"sampler": "heun", "steps": 4, "overlap": 0.5}
    for bad, msg in (({"steps": 0}, "steps"), ({"steps": 2.5}, "steps"), ({"overlap": 2}, "overlap"),
                     ({"num_samples": -1}, "num_samples"), ({"sampler": "ddim"}, "sampler"),
                     ({"steps": "many"}, "integer"), ({"steps": "inf"}, "steps"), ({"seed": 10 ** 400}, "seed"),
                     ({"overlap": 10 ** 400}, "overlap")):  # the last three: OverflowError, a 500
        with pytest.raises(ConfigError, match=msg):
            sampler_params(bad)
    from lib.infers.dfm_vlm import hold_params

    for bad in ({"hold_radius": "1e400"}, {"grow_radius": 10 ** 400}, {"grow_tolerance": 10 ** 400}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            hold_params(bad)


def test_trainer_task_pickles_for_ddp_and_filters_by_dimension(tmp_path, ckpt3d):
    cfg = _task(ckpt3d, tmp_path / "model")
    trainer = cfg.trainer()
    restored = pickle.loads(pickle.dumps(trainer))
    assert restored.publish_path == cfg.published

    class DS:
        def datalist(self):
            return [write_phantom_case(tmp_path / "s", "v3d", shape=(20, 20, 12)),
                    {"image": str(shutil.copy(ROOT / "sample_data" / "phantom_xray_00.png", tmp_path / "x.png")),
                     "label": "unused"}]

    got = trainer.pre_process({}, DS())
    assert [d["image"].endswith("v3d.nii.gz") for d in got] == [True]
    # a val_split that leaves no image for training is named (a review: "num_samples should be a positive
    # integer value, but got num_samples=0" from the data sampler)
    from monailabel.tasks.train.basic_train import Context

    context = Context()
    context.datalist, context.local_rank = [{"image": "a"}, {"image": "b"}], 0
    for split, n_train in ((0.5, 1), (0.9, None)):
        context.request = {"val_split": split}
        if n_train is None:
            with pytest.raises(ValueError, match="val_split 0.9 leaves none of the 2 labelled image.*at most 1/2"):
                trainer.partition_datalist(context)
        else:
            assert len(trainer.partition_datalist(context)[0]) == n_train
    # the images labelled longest validate, the newest label trains (a review: MONAI Label's unshuffled split held
    # out the index's last images, where a new label lands, so "Submit Label, Train" did not train on it)
    import os

    labels = []
    for k, t in enumerate((300, 100, 200, 500, 400)):  # label file times, oldest second
        f = tmp_path / f"lab{k}.nii.gz"
        f.write_bytes(b"x")
        os.utime(f, (t, t))
        labels.append({"image": f"img{k}", "label": str(f)})
    context.datalist, context.request = labels, {"val_split": 0.4}
    train, val = trainer.partition_datalist(context)
    assert [v["image"] for v in val] == ["img1", "img2"] and [t["image"] for t in train] == ["img0", "img3", "img4"]
    context.request = {"val_split": 0.4, "val_ds": labels[3:]}  # given validation images: as given
    train, val = trainer.partition_datalist(context)
    # and not trained on (a review, 2026-12-07: MONAI Label trains on the whole datastore beside a given val_ds)
    assert [v["image"] for v in val] == ["img3", "img4"] and [t["image"] for t in train] == ["img0", "img1", "img2"]
    # the validation labels are checked once, before the training (the evaluator scores a batch at a time): a label
    # off its image's size is refused then, not at the first validation (a review, 2026-12-07)
    from lib.checkpoint import load_system
    from lib.transforms import InputError

    context.system = load_system(ckpt3d)
    case = write_phantom_case(tmp_path / "s", "v3d", shape=(20, 20, 12))
    small = write_phantom_case(tmp_path / "s2", "v3d", shape=(20, 20, 10))
    context.val_datalist = [case, {**case, "label": small["label"]}]
    with pytest.raises(InputError, match=r"1 of 2 label\(s\) do not fit.*\(20, 20, 12\).*\(20, 20, 10\)"):
        trainer._create_evaluator(context)


def test_random_next_sample_survives_annotators_asking_in_the_same_second(tmp_path):
    """bench/load.py: 3 of 20 concurrent next_sample requests answered 500, MONAI Label's Random weighting every
    image by the whole seconds since it was handed out -- all 0 within one second."""
    import time as _time

    from monailabel.tasks.activelearning.random import Random

    from lib.activelearning.fair_random import FairRandom

    class Store:
        def get_unlabeled_images(self, tag=None, labels=None):
            return ["a", "b", "c"]

        def get_image_info(self, image):
            return {"strategy": {"random": {"ts": int(_time.time())}}}

        def get_image_uri(self, image):
            return write_phantom_case(tmp_path, image, shape=(8, 8, 4))["image"]

    request = {"strategy": "random"}
    with pytest.raises(ValueError, match="weights"):
        Random()(request, Store())
    assert FairRandom()(request, Store())["id"] in {"a", "b", "c"}


def test_monailabel_trainer_multi_process_path_runs_on_two_cpu_processes(tmp_path, ckpt3d, monkeypatch, capfd):
    """MONAI Label's multi-GPU training (torch.multiprocessing.spawn, DDP) with 2 CPU processes over gloo: both
    ranks train (MONAI Label gives each its partition of the data), rank 0 publishes a self-describing checkpoint."""
    from lib.checkpoint import load_checkpoint
    from server_utils import free_port

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    cfg = _task(ckpt3d, tmp_path / "model")
    trainer = cfg.trainer()
    cases = [write_phantom_case(tmp_path / "s", f"c{i}", shape=(24, 24, 16), seed=i) for i in range(6)]
    odd = write_phantom_case(tmp_path / "s", "odd", shape=(24, 24, 16), seed=9)
    import nibabel as nib
    import numpy as np

    lab = nib.load(odd["label"])  # a label of another size than its image: left out, and the record says so
    nib.save(nib.Nifti1Image(np.asarray(lab.dataobj)[:-2], lab.affine), odd["label"])

    class DS:
        def datalist(self):
            return cases + [odd]

    res = trainer({"multi_gpu": True, "gpus": "0,1", "device": "cpu", "distributed_backend": "gloo",
                   "max_epochs": 2, "val_split": 0.34, "train_batch_size": 1, "patches_per_image": 2,
                   "dataset": "Dataset", "dataloader": "DataLoader", "publish": "always"}, DS())
    # the answer (the stats file rank 0 wrote) says what the run published
    assert res["publication"]["published"] is True and res["publication"]["rule"] == "always", res
    assert [x["image"] for x in res["publication"]["left_out"]] == [os.path.basename(odd["image"])], res
    assert "has shape" in res["publication"]["left_out"][0]["why"]
    out = capfd.readouterr()
    log = out.out + out.err
    # each spawned rank logs its own lines (the parent's go through pytest's logging capture)
    assert "0 - Train Request (final)" in log and "1 - Train Request (final)" in log, log[-3000:]
    published = load_checkpoint(cfg.published)
    assert published.metrics["epoch"] == 2 and published.hparams.model.spatial_dims == 3
    # the epoch was chosen on all validation images (6 x 0.34: 2), not on rank 0's share (MONAI Label splits them)
    assert published.metrics["val_cases"] == 2, published.metrics


def test_monailabel_trainer_multi_process_batch_norm_takes_the_training_path_rule(tmp_path, ckpt3d, monkeypatch):
    """MONAI Label's multi-process training with a batch-norm model follows lib.training.distributed_norm (a review:
    each rank normalised by its own share): refused on the CPU, naming the setting; one process keeps its layers."""
    import types

    from lib.checkpoint import load_system
    from lib.config import ConfigError
    from lib.network import ConditionalUNet

    trainer = _task(ckpt3d, tmp_path / "model").trainer()
    system = load_system(ckpt3d)
    hp = system.hparams
    hp.model.norm = "batch"
    monkeypatch.setattr(trainer, "_initial", lambda context: (ConditionalUNet(hp.model), hp, system.vlm))
    context = types.SimpleNamespace(device=torch.device("cpu"), multi_gpu=True, world_size=2)
    with pytest.raises(ConfigError, match="model.norm 'batch' under 2 processes on the CPU"):
        trainer.network(context)
    context.multi_gpu = False
    model = trainer.network(context)
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in model.modules())


def test_unreadable_train_stats_are_reported_and_written_atomically(tmp_path, ckpt3d):
    """A review (2026-12-07): MONAI Label rewrote ``train_stats.json`` in place every epoch; a reader caught it
    half-written (2 of 63 ``/info`` calls were 500s during a training), and a kill -9 or a full disk left it empty:
    then every /info, /infer, /activelearning and /train was a 500 and the server did not start again (its scoring
    reads /info). The stats are now read as an error entry naming the file, and written atomically."""
    import subprocess
    import sys

    trainer = _task(ckpt3d, tmp_path / "model").trainer()
    path = trainer._stats_path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for text in ("", '{"best_metric": 0.9, "epochs"'):
        with open(path, "w") as f:
            f.write(text)
        got = trainer.stats()
        assert set(got) == {"error"} and path in got["error"] and "unreadable" in got["error"], got
    with open(path, "w") as f:
        json.dump({"best_metric": 0.9}, f)
    assert trainer.stats() == {"best_metric": 0.9}
    # MONAI Label's publisher's copy, under a file size limit (as a full disk): the old stats stay whole
    big = tmp_path / "stats_new.json"
    big.write_text(json.dumps({"best_metric": 0.5, "pad": "x" * 50000}))
    before = open(path).read()
    code = ("import resource, signal, sys\n"
            "from lib.trainers.dfm_vlm import _install_atomic_stats_copy\n"
            "import monailabel.tasks.train.handler as handler\n"
            "_install_atomic_stats_copy()\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
            "try:\n"
            "    handler.shutil.copy(sys.argv[1], sys.argv[2])\n"
            "except OSError as e:\n"
            "    print('FAILED', e)\n")
    out = subprocess.run([sys.executable, "-c", code, str(big), path], capture_output=True, text=True, timeout=120,
                         cwd=str(ROOT))
    assert out.stdout.startswith("FAILED"), (out.stdout, out.stderr[-2000:])
    assert open(path).read() == before and trainer.stats() == {"best_metric": 0.9}
    assert [p for p in os.listdir(os.path.dirname(path)) if p.endswith(".tmp")] == []


@pytest.mark.parametrize("capability,native,expected", [("AVX2", True, "fp32"), ("AVX512", True, "bf16")])
def test_the_monailabel_trainer_records_the_precision_it_trains_in(tmp_path, ckpt3d, make_system, monkeypatch,
                                                                   capability, native, expected):
    """From the preset ("auto") and from a bf16-trained checkpoint alike, the MONAI Label trainer runs and
    publishes the precision this machine resolves, never "auto": an "auto" record of an fp32 training on an AVX2
    CPU would run in bf16 on an AVX512-BF16 server (an fp32-trained cxr model lost 0.20 Dice in bf16)."""
    from types import SimpleNamespace

    import lib.precision as precision

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(precision, "_cpu_native_bf16", lambda: native)
    trainer = _task(ckpt3d, tmp_path / "model").trainer()
    assert trainer.hparams.precision == "auto"  # the preset
    ctx = SimpleNamespace(pretrained=False, device=torch.device("cpu"))
    trainer.network(ctx)
    assert ctx.system.hparams.precision == expected
    bf16 = make_system(spatial_dims=3, features=(8, 16), spacing=[2.0, 2.0, 2.0])
    bf16.hparams.preprocessing.orientation = "RAS"
    bf16.hparams.precision = "bf16"
    save_checkpoint(ckpt3d, bf16.model, bf16.hparams)
    ctx = SimpleNamespace(pretrained=True, device=torch.device("cpu"))
    trainer.network(ctx)
    assert ctx.system.hparams.precision == expected


def test_training_parameters_reach_the_trainer_parsed():
    """A review: ``"max_epochs": "1"`` passed the /train check and was forwarded raw, so the task failed later
    (``'<' not supported between 'str' and 'int'``); ``"pretrained": "false"`` was truthy; ``name`` (the output
    folder under model_dir) could be a path."""
    import types

    from fastapi import HTTPException

    from monailabel_app.main import check_train_request

    app = types.SimpleNamespace(_trainers={"m": object()})
    got = check_train_request(app, "m", {"max_epochs": "2", "val_split": "0.25", "learning_rate": "1e-4",
                                         "pretrained": "false", "multi_gpu": 0, "train_batch_size": 3, "x": "y",
                                         "augment": "off", "fine_tune_lr_scale": "0.5", "lr_schedule": "Constant"})
    assert got == {"max_epochs": 2, "val_split": 0.25, "learning_rate": 1e-4, "pretrained": False,
                   "multi_gpu": False, "train_batch_size": 3, "x": "y", "augment": False, "fine_tune_lr_scale": 0.5,
                   "lr_schedule": "constant"}
    assert check_train_request(app, "m", None) is None
    # POST /train/ (every model): MONAI Label merged params["m"] into the model's request, raw; checked and parsed
    from monailabel_app.main import check_task_request

    request = {"model": "m", "max_epochs": "2", "pretrained": "false"}
    out = check_task_request(app, "train", request, {"m": {"max_epochs": "2", "pretrained": "false"}})
    assert request == {"model": "m", "max_epochs": 2, "pretrained": False} and out == {"m": {"max_epochs": "2",
                                                                                            "pretrained": "false"}}
    for bad in ({"name": "../x"}, {"pretrained": "maybe"}, {"max_epochs": "1.5"}, {"augment": "sometimes"},
                {"fine_tune_lr_scale": 0}, {"lr_schedule": "step"}, {"max_epochs": "inf"},
                {"learning_rate": 10 ** 400}):
        with pytest.raises(HTTPException) as e:
            check_train_request(app, "m", bad)
        assert e.value.status_code == 422, bad


def test_slicer_s_train_with_the_default_options_of_info_is_accepted(tmp_path, ckpt3d):
    """A review (2026-12-06): 3D Slicer's Train sends every option the trainer lists in /info (the first entry of a
    list), and MONAI Label's own default ``early_stop_patience: -1`` (off) was refused (422): Train with the
    default options never started, for one model or all."""
    import types

    from fastapi import HTTPException

    from monailabel_app.main import check_train_request

    trainer = _task(ckpt3d, tmp_path / "model").trainer()
    config = trainer.config()
    assert config["early_stop_patience"] == -1
    sent = {k: (v[0] if isinstance(v, list) else v) for k, v in config.items()}  # Slicer's getParamsFromConfig
    app = types.SimpleNamespace(_trainers={"m": trainer})
    got = check_train_request(app, "m", sent)
    assert got["early_stop_patience"] == -1 and got["max_epochs"] == config["max_epochs"]
    assert check_train_request(app, "m", {"early_stop_patience": "0"})["early_stop_patience"] == 0
    with pytest.raises(HTTPException) as e:
        check_train_request(app, "m", {"early_stop_patience": -2})
    assert e.value.status_code == 422 and "early_stop_patience" in e.value.detail


def test_the_monailabel_trainer_follows_the_cli_learning_rate_schedule(tmp_path, ckpt3d, make_system):
    """A review: the MONAI Label trainer ran every epoch at the preset's peak rate (no schedule: a fine-tune of a
    converged model at 2e-3 to the end), with the *app preset's* rate and batch even for a checkpoint trained with
    another preset. Now: ``lib.training.lr_at`` (the CLI's warm-up and cosine) over max_epochs x iterations per epoch,
    the peak from the served checkpoint's training settings, scaled by ``fine_tune_lr_scale`` for a fine-tune."""
    import math
    import types

    from ignite.engine import Engine, Events

    from lib.trainers.dfm_vlm import FINE_TUNE_LR_SCALE
    from lib.training import lr_at

    served = make_system(spatial_dims=3, features=(8, 16), spacing=[2.0, 2.0, 2.0])
    served.hparams.preprocessing.orientation = "RAS"
    served.hparams.train.lr, served.hparams.train.images_per_batch = 7e-4, 5  # not the app preset's
    save_checkpoint(ckpt3d, served.model, served.hparams)
    trainer = _task(ckpt3d, tmp_path / "model").trainer()
    assert trainer.hparams.train.lr != 7e-4  # the preset differs
    assert trainer._config["learning_rate"] == 7e-4 and trainer._config["train_batch_size"] == 5
    for tuned, request, peak in ((str(ckpt3d), {}, 7e-4 * FINE_TUNE_LR_SCALE),
                                 (str(ckpt3d), {"fine_tune_lr_scale": 0.5}, 3.5e-4),
                                 (None, {"fine_tune_lr_scale": 0.5}, 7e-4),  # from scratch: not scaled
                                 (None, {"learning_rate": 1e-3}, 1e-3)):
        request = {**trainer._config, **request}
        context = types.SimpleNamespace(request=request, fine_tuned_from=tuned, local_rank=1, evaluator=None)
        handler = trainer.train_handlers(context)[0]
        net = torch.nn.Linear(2, 2)
        engine = Engine(lambda e, b: None)
        engine.optimizer = torch.optim.AdamW(net.parameters(), lr=trainer.peak_lr(context))
        lrs = []
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: lrs.append(e.optimizer.param_groups[0]["lr"]))
        handler.attach(engine)
        engine.run(range(5), max_epochs=4)  # 20 iterations
        assert len(lrs) == 20
        want = [lr_at(i / 20, peak) for i in range(20)]
        assert all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(lrs, want)), (request, lrs[:3], want[:3])
        assert lrs[0] < 0.2 * peak and max(lrs) > 0.9 * peak and lrs[-1] < 0.05 * peak  # warm-up, peak, decay
    constant = trainer.train_handlers(types.SimpleNamespace(request={**trainer._config, "lr_schedule": "constant"},
                                                            fine_tuned_from=None, local_rank=1, evaluator=None))[0]
    engine = Engine(lambda e, b: None)
    engine.optimizer = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1.0)
    constant.attach(engine)
    engine.run(range(3), max_epochs=2)
    assert engine.optimizer.param_groups[0]["lr"] == 7e-4


def test_a_publish_keeps_a_file_it_never_measured_and_a_broken_published_file_is_set_aside(tmp_path, ckpt3d,
                                                                                            make_system):
    """A review (2026-12-07): (1) restarted with ``--conf <model>_checkpoint X`` (the same command after a crash), a
    training measured and fine-tuned X only and published a 0.47 epoch over an earlier session's 0.99 model in
    ``model_dir``, with no copy left; (2) a published checkpoint truncated on disk made the model a 503, and a
    training measured the configured checkpoint instead, published nothing that did not beat it, and left the
    broken file served. Now (1) keeps that file as ``<name>.pt.<time>.replaced`` before the first publish, and (2)
    renames an unloadable published file ``.unreadable-<time>`` when a training starts."""
    import types

    import lib.trainers.dfm_vlm as trainers
    from lib.infers.dfm_vlm import live_paths

    system = make_system()
    ctx = types.SimpleNamespace(system=system, trainer=None, run_id="r", train_datalist=[], val_datalist=[])
    earlier = tmp_path / "model" / "dfm_vlm_3d.pt"  # an earlier session's published model, not measured by the run
    earlier.parent.mkdir(parents=True)
    shutil.copy(ckpt3d, earlier)
    old = earlier.read_bytes()
    outcome = trainers._Outcome(None, str(earlier), "better", str(ckpt3d))  # the run measured X (ckpt3d)
    pub = trainers._Publish(ctx, str(earlier), "val_mean_dice", outcome)
    for score in (0.5, 0.6):  # two publishes: one copy, of the file the run found
        pub(types.SimpleNamespace(state=types.SimpleNamespace(metrics={"val_mean_dice": score})))
    kept = sorted(earlier.parent.glob("dfm_vlm_3d.pt.*.replaced"))
    assert len(kept) == 1 and kept[0].read_bytes() == old and earlier.read_bytes() != old
    # the file the run was measured against (the usual fine-tune of the served model): replaced without a copy
    outcome = trainers._Outcome(None, str(earlier), "better", str(earlier))
    pub = trainers._Publish(ctx, str(earlier), "val_mean_dice", outcome)
    pub(types.SimpleNamespace(state=types.SimpleNamespace(metrics={"val_mean_dice": 0.7})))
    assert len(list(earlier.parent.glob("dfm_vlm_3d.pt.*.replaced"))) == 1
    # ... unless that file is the configured checkpoint itself (--conf model_dir holding it): the file the user
    # named is copied first, whatever was measured (a second review; PUT /model refuses that case)
    named = earlier.read_bytes()
    pub = trainers._Publish(ctx, str(earlier), "val_mean_dice", outcome, configured=[str(earlier)])
    pub(types.SimpleNamespace(state=types.SimpleNamespace(metrics={"val_mean_dice": 0.8})))
    kept = sorted(earlier.parent.glob("dfm_vlm_3d.pt.*.replaced"))
    assert len(kept) == 2 and named in [k.read_bytes() for k in kept]

    # (2) a truncated published file: set aside when a training starts, so the configured checkpoint is served
    trainer = _task(ckpt3d, tmp_path / "model").trainer()
    published = trainer.publish_path
    assert live_paths(trainer.init_paths, trainer.stale_before)[-1] != published  # stale: --conf X is served
    trainer.stale_before = None  # (a checkpoint published by this server)
    data = open(published, "rb").read()
    with open(published, "wb") as f:
        f.write(data[: len(data) // 2])
    sample = ROOT / "sample_data"

    class DS:  # one labelled image
        def datalist(self):
            return [{"image": str(sample / "phantom_ct_00.nii.gz"),
                     "label": str(sample / "labels" / "final" / "phantom_ct_00.nii.gz")}]

    assert len(trainer.pre_process({}, DS())) == 1  # (MONAI Label's first step of a training)
    assert not os.path.exists(published) and len(glob.glob(published + ".unreadable-*")) == 1
    assert live_paths(trainer.init_paths, trainer.stale_before)[-1] == str(ckpt3d)
    shutil.copy(ckpt3d, published)  # a good published file stays where it is
    trainer.pre_process({}, DS())
    assert os.path.exists(published)


def test_fine_tuning_publishes_only_a_model_that_beats_the_served_one(tmp_path, make_system, ckpt3d, monkeypatch):
    """A review: the first validation of every MONAI Label training was published whatever its Dice, so a short
    fine-tune replaced a served 0.992 model with a 0.944 one. The served checkpoint's Dice on the run's validation
    images, measured before the first epoch, is the one to beat; ``"publish": "always"`` keeps MONAI Label's own
    behaviour (the run's best epoch)."""
    import types

    from ignite.engine import Events
    from monailabel.tasks.train.basic_train import BasicTrainTask

    from lib.trainers.dfm_vlm import _Publish

    import lib.trainers.dfm_vlm as trainers

    system = make_system()
    ctx = types.SimpleNamespace(system=system, trainer=None, run_id="r", train_datalist=[], val_datalist=[])
    path = tmp_path / "published.pt"
    stats = tmp_path / "train_stats.json"  # what MONAI Label's publisher wrote for the epoch
    stats.write_text(json.dumps({"best_metric": 0.95}))
    outcome = trainers._Outcome(str(stats), str(path), "better", "served.pt")
    pub = _Publish(ctx, str(path), "val_mean_dice", outcome)
    seen = []

    class Step:  # the validation step: each batch "is" its cases' Dice; it records the system it predicts with
        def __init__(self, context):
            self.context = context

        def __call__(self, engine, batch):
            seen.append(self.context.system)
            if batch == "cannot":
                raise ValueError("a 3D image was given to a 2D model")
            return {"dice": batch}

    monkeypatch.setattr(trainers, "_ValStep", Step)

    class Evaluator:  # the run's evaluator: its images; run() is never called for the served model's measurement
        data_loader = [[0.99, 0.98], [1.0]]

        def run(self):
            raise AssertionError("the evaluator ran: MONAI Label's stats and early stopping would count it")

    def epoch(score):  # the evaluator's EPOCH_COMPLETED after an epoch of the run: the publisher, then the record
        pub(types.SimpleNamespace(state=types.SimpleNamespace(metrics={"val_mean_dice": score})))
        outcome.write()

    pub.baseline_from(Evaluator())(None)  # the served checkpoint, before the first epoch: measured, not published
    assert pub.best == pytest.approx(0.99) and not path.exists() and seen == [system] * 2
    # the stats file is still the last run's until this run's first epoch: nothing written into it (a review: "no
    # epoch beat the served checkpoint" appeared in the last run's stats before any epoch ran)
    assert "publication" not in json.loads(stats.read_text())
    epoch(0.95)
    assert not path.exists()  # 0.95: the served model stays
    # the train stats say so (they named the run's best epoch, 0.95, as if it were the model now served)
    got = json.loads(stats.read_text())
    assert got["best_metric"] == 0.95 and got["publication"]["published"] is False
    assert got["publication"]["served_val_dice"] == pytest.approx(0.99), got
    assert "no epoch beat the served checkpoint (val Dice 0.9900)" in got["publication"]["note"]
    epoch(0.995)
    assert path.exists() and pub.best == 0.995
    got = json.loads(stats.read_text())["publication"]
    assert got["published"] is True and got["val_mean_dice"] == 0.995 and got["path"] == str(path), got
    # a run from scratch (Slicer's "pretrained" unticked) measures the served model itself: the validation step
    # predicts with it, then with the run's own model again (a review: it replaced a served 0.99 model with 0.19)
    served, seen[:] = make_system(seed=1), []
    pub = _Publish(ctx, str(tmp_path / "p2.pt"), "val_mean_dice")
    pub.baseline_from(Evaluator(), served)(None)
    assert seen == [served] * 2 and ctx.system is system and pub.baseline == pytest.approx(0.99)
    # a served model that cannot score these images (another dimension) is not measured, the run goes on and may
    # replace it (a review: the whole training failed)
    pub = _Publish(ctx, str(tmp_path / "p3.pt"), "val_mean_dice")
    bad = Evaluator()
    bad.data_loader = ["cannot"]
    pub.baseline_from(bad, served)(None)
    assert pub.baseline is None and ctx.system is system
    epoch(0.2)
    assert (tmp_path / "p3.pt").exists()

    # the wiring: a served model is the one to beat unless the request says "always", whether the run fine-tunes it
    # or trains from scratch (then the served checkpoint is loaded and measured); nothing served: nothing to beat
    monkeypatch.setattr(BasicTrainTask, "finalize", lambda self, context: None)
    trainer = _task(ckpt3d, tmp_path / "model").trainer()
    unserved = _task(ckpt3d, tmp_path / "model2").trainer()
    unserved.init_paths = [str(tmp_path / "none.pt")]

    class Engine:
        def __init__(self):
            self.handlers = []

        def add_event_handler(self, event, handler):
            self.handlers.append(event)

    measured = []  # the model each baseline measures: the fine-tune's own start (None), or the served one loaded
    real_baseline = _Publish.baseline_from
    monkeypatch.setattr(_Publish, "baseline_from",
                        lambda self, ev, served=None: measured.append(served) or real_baseline(self, ev, served))
    loads = []
    real_load = trainers.load_system
    monkeypatch.setattr(trainers, "load_system", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    for task, request, tuned, want in ((trainer, {}, str(ckpt3d), [Events.STARTED, Events.COMPLETED]),
                                       (trainer, {"publish": "always"}, str(ckpt3d), []),
                                       (trainer, {}, None, [Events.STARTED, Events.COMPLETED]),
                                       (unserved, {}, None, [])):
        c = types.SimpleNamespace(local_rank=0, evaluator=Engine(), trainer=Engine(), request=request,
                                  fine_tuned_from=tuned, device="cpu")
        task.finalize(c)
        # the publisher, then the publication added to the stats MONAI Label's publisher wrote for the epoch
        assert c.trainer.handlers == want and c.evaluator.handlers == [Events.EPOCH_COMPLETED] * 2, (request, tuned)
        if tuned:  # the record names the served model, "always" too (it said None there)
            assert task.outcome.record["served"] == tuned and task.outcome.record["rule"] == \
                ("always" if request else "better")
    assert measured[0] is None and type(measured[1]).__name__ == "DFMSystem" and len(measured) == 2
    assert len(loads) == 1  # the served checkpoint, loaded for the run from scratch only
    loads.clear()
    # no validation image (one or two labelled at the start of a loop, val_split 0.2 gives none): a fine-tune
    # cannot show it beats the served model, which stays (a review, 2026-12-06: it was replaced unconditionally);
    # "always", or a first training (nothing served), publishes the last epoch
    for task, request, tuned, want in ((trainer, {}, str(ckpt3d), [Events.EPOCH_COMPLETED]),  # "kept" in the stats
                                       (trainer, {"publish": "always"}, str(ckpt3d),
                                        [Events.EPOCH_COMPLETED, Events.COMPLETED]),
                                       (trainer, {}, None, [Events.EPOCH_COMPLETED]),
                                       (unserved, {}, None, [Events.EPOCH_COMPLETED, Events.COMPLETED])):
        c = types.SimpleNamespace(local_rank=0, evaluator=None, trainer=Engine(), request=request,
                                  fine_tuned_from=tuned, train_datalist=[1], device="cpu")
        task.finalize(c)
        assert c.trainer.handlers == want, (request, tuned)
        if task is trainer and request == {}:
            assert task.outcome.record["note"].startswith("no validation image: the served model ")
            assert task.outcome.record["note"].endswith("is kept (label more images, or train with \"publish\": "
                                                        "\"always\")") and not task.outcome.record["published"]
    assert not loads  # nothing to measure it with: the served model is not loaded (a second model and VLM)


def test_a_2d_image_slicer_sends_as_a_one_slice_volume_is_segmented_as_the_2d_image_it_is(tmp_path, make_system):
    """A review: 3D Slicer sends a 2D X-ray it opened itself (a session, an upload) as a one-slice NIfTI, (X, Y, 1),
    as it saves its labels; the 2D models refused it ("a 3D image ... was given to a 2D model"), so clicking on a
    local X-ray did nothing but a 422. It is read as the 2D image it is: the PNG's result, voxel for voxel (the same
    case id seeds both), a label file the datastore accepts with the image's geometry, clicks labelled as clicked."""
    import nibabel as nib
    import numpy as np
    from PIL import Image

    from lib.configs.dfm_vlm_2d import DFMVLM2D
    from lib.datastore import check_label_file

    system = make_system(spacing=[2.0, 2.0])
    path2d = tmp_path / "models" / "dfm_vlm_2d.pt"
    save_checkpoint(path2d, system.model, system.hparams)
    cfg = DFMVLM2D()
    cfg.init("dfm_vlm_2d", str(tmp_path / "model2d"), {"dfm_vlm_2d_checkpoint": str(path2d)}, None)
    auto, clicks = cfg.infer(), cfg.interactive_infer()
    px = np.zeros((44, 52), np.uint8)  # rows, columns
    px[10:30, 8:40] = 200
    (tmp_path / "png").mkdir()
    (tmp_path / "slicer").mkdir()
    png, nii = tmp_path / "png" / "xray.png", tmp_path / "slicer" / "xray.nii.gz"
    Image.fromarray(px).save(png)
    # Slicer's IJK (column, row, 0) and its RAS of a PNG's geometry (ITK's LPS identity)
    nib.save(nib.Nifti1Image(px.T[:, :, None], np.diag([-1.0, -1.0, 1.0, 1.0])), str(nii))
    req = {"device": "cpu", "steps": 2, "skip_writer": True}
    _, a = auto({**req, "image": str(png)})
    _, b = auto({**req, "image": str(nii)})
    assert np.array_equal(np.asarray(a["pred"]), np.asarray(b["pred"])) and np.asarray(a["pred"]).any()
    # both conventions' upright layout ('RA': MONAI's PNG; 'LP': ITK's, Slicer's) pass without a note; the same
    # X-ray stored with its rows bottom-up and an affine to match ('RP') is segmented as stored, and the result says
    # so (a review, 2026-12-07: the lung Dice fell from 0.96 to 0.75 without a word)
    assert "notes" not in a["result"] and "notes" not in b["result"]
    (tmp_path / "flipped").mkdir()
    flipped = tmp_path / "flipped" / "xray.nii.gz"
    nib.save(nib.Nifti1Image(px.T[:, ::-1].copy(), np.array([[1.0, 0, 0, 0], [0, -1, 0, px.shape[0] - 1],
                                                               [0, 0, 1, 0], [0, 0, 0, 1]])), str(flipped))
    _, f = auto({**req, "image": str(flipped)})
    assert len(f["result"]["notes"]) == 1 and "'RP'" in f["result"]["notes"][0] \
        and "mirrored" in f["result"]["notes"][0] and "xray.nii.gz" in f["result"]["notes"][0]
    out, _ = auto({"image": str(nii), "device": "cpu", "steps": 2})
    check_label_file(out, str(nii), "xray")
    assert np.allclose(nib.load(out).affine, nib.load(str(nii)).affine)
    # the image's own grid, its one-slice axis kept (a review, 2026-12-07: the label came back as (X, Y))
    assert nib.load(out).shape == nib.load(str(nii)).shape == px.T.shape + (1,)
    assert np.array_equal(np.asarray(nib.load(out).dataobj)[:, :, 0], np.asarray(a["pred"]))
    zeros = np.argwhere(np.asarray(a["pred"]) == 0)
    empty = [[int(i), int(j), 0] for i, j in zeros[::max(1, len(zeros) // 3)][:3]]
    assert len(empty) == 3
    _, c = clicks({**req, "image": str(nii), "foreground": empty})
    assert [int(np.asarray(c["pred"])[p[0], p[1]]) for p in empty] == [1, 1, 1]


def test_the_returned_label_file_has_the_image_s_geometry(tmp_path, make_system, ckpt3d):
    """A review: MONAI Label's writer wrote a 2D label through ITK without its affine (a 2D NIfTI or NRRD label came
    back with spacing 1, origin 0 and flipped axes, which the datastore then refused as the image's label), made a
    sheared NIfTI affine orthogonal, and wrote a JPEG image's label as a lossy JPEG (values 0/1/2 smeared). Each
    returned file is read back here: the image's geometry, accepted by the datastore's label check, lossless."""
    import itk
    import nibabel as nib
    import numpy as np
    from PIL import Image

    from lib.configs.dfm_vlm_2d import DFMVLM2D
    from lib.datastore import check_label_file

    system = make_system(spacing=[2.0, 2.0])
    path2d = tmp_path / "models" / "dfm_vlm_2d.pt"
    save_checkpoint(path2d, system.model, system.hparams)
    cfg = DFMVLM2D()
    cfg.init("dfm_vlm_2d", str(tmp_path / "model2d"), {"dfm_vlm_2d_checkpoint": str(path2d)}, None)
    task2d, task3d = cfg.infer(), _task(ckpt3d, tmp_path / "model").infer()
    rng = np.random.default_rng(0)
    aff = np.diag([-0.7, 1.3, 1.0, 1.0])
    aff[:3, 3] = [5.0, 6.0, 7.0]
    nii = tmp_path / "xray.nii.gz"
    nib.save(nib.Nifti1Image(rng.random((30, 50)).astype(np.float32), aff), str(nii))
    nrrd = tmp_path / "xray.nrrd"
    im = itk.image_from_array(rng.random((50, 30)).astype(np.float32))
    im.SetSpacing([0.5, 0.8])
    im.SetOrigin([-50.0, 60.0])
    itk.imwrite(im, str(nrrd))
    jpg = tmp_path / "xray.jpg"
    Image.fromarray((rng.random((60, 80)) * 255).astype(np.uint8)).save(jpg)
    sheared = np.array([[1.0, 0.3, 0, 2], [0, 1.2, 0, 3], [0, 0, 2, 4], [0, 0, 0, 1]])
    vol = tmp_path / "sheared.nii.gz"
    nib.save(nib.Nifti1Image(rng.random((20, 22, 12)).astype(np.float32), sheared), str(vol))
    vec = tmp_path / "vector.nii.gz"  # a 4D image with intent "vector" and a display range: not the label's
    v = nib.Nifti1Image(rng.random((20, 22, 12, 1)).astype(np.float32), np.diag([-1.5, -1.5, 2.0, 1.0]))
    v.header.set_intent("vector")
    v.header["cal_min"], v.header["cal_max"] = -1000.0, 3000.0
    nib.save(v, str(vec))
    for task, image in ((task2d, nii), (task2d, nrrd), (task2d, jpg), (task3d, vol), (task3d, vec)):
        out, _ = task({"image": str(image), "device": "cpu", "steps": 1})
        check_label_file(out, str(image), image.stem)  # the datastore accepts the app's own label for its image
        if image.suffix == ".gz":
            assert np.allclose(nib.load(out).affine, nib.load(str(image)).affine), image
            lab = nib.load(out)  # a plain scalar label map (a second review: ITK read the copied intent as a vector)
            assert lab.header.get_intent()[0] == "none" and float(lab.header["cal_max"]) == 0.0
            if image.name == "vector.nii.gz":  # (ITK reads no sheared affine at all)
                assert itk.imread(out).GetNumberOfComponentsPerPixel() == 1
        elif image.suffix == ".nrrd":
            lab = itk.imread(out)
            assert list(lab.GetSpacing()) == [0.5, 0.8] and list(lab.GetOrigin()) == [-50.0, 60.0]
            assert np.allclose(itk.array_from_matrix(lab.GetDirection()), np.eye(2))
        else:
            assert out.endswith(".png"), out
            _, data = task({"image": str(image), "device": "cpu", "steps": 1, "skip_writer": True})
            assert np.array_equal(np.asarray(Image.open(out)), np.asarray(data["pred"]).T)  # lossless, same values
    # a second review: a result_extension other than the image's (OHIF asks .nrrd, Slicer may ask .nii.gz): .nrrd or
    # .mha for a PNG, JPEG or 2D NIfTI was a 500 (a 3D direction given to a 2D ITK image), a 2D NRRD's .nii.gz lost
    # its geometry (MONAI Label's ITK writer again); an unknown extension was a 500 after the inference, device=5 too
    png = tmp_path / "xray.png"
    Image.fromarray((rng.random((60, 80)) * 255).astype(np.uint8)).save(png)
    for image, ext in ((nii, ".nrrd"), (nii, "mha"), (png, ".nrrd"), (jpg, ".mha"), (nrrd, ".nii.gz")):
        out, _ = task2d({"image": str(image), "device": "cpu", "steps": 1, "result_extension": ext})
        assert out.endswith(ext if ext.startswith(".") else "." + ext), (image, out)
        check_label_file(out, str(image), image.stem)  # the image's grid (a PNG: spacing 1, origin 0, identity)
        if image.suffix in (".png", ".jpg"):
            lab, ref = itk.imread(out), itk.imread(str(image))
            assert list(lab.GetSpacing()) == list(ref.GetSpacing()) and list(lab.GetOrigin()) == list(ref.GetOrigin())
            assert np.allclose(itk.array_from_matrix(lab.GetDirection()), itk.array_from_matrix(ref.GetDirection()))
    from lib.config import ConfigError

    for bad in ({"result_extension": ".txt"}, {"result_extension": 3}, {"device": 5}, {"result_dtype": "float32"}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            task2d({"image": str(png), "steps": 1, **bad})
    # OHIF asks result_dtype uint16 and reads the voxels as such (a third review: always written uint8)
    for image, ext in ((nrrd, ".nrrd"), (vol, ".nii.gz")):
        out, _ = (task3d if image == vol else task2d)({"image": str(image), "device": "cpu", "steps": 1,
                                                       "result_extension": ext, "result_dtype": "uint16"})
        assert itk.imread(out).dtype == np.uint16 if ext == ".nrrd" else nib.load(out).get_data_dtype() == np.uint16


def test_submitted_segment_names_reach_the_trainer_s_training_and_validation_truths(tmp_path, ckpt3d, make_system):
    """Found 2026-12-06: a label painted in the app was read by the dataset's rules, so a model whose dataset codes
    differ from the app's values (cxr_lung: masks 255, threshold 127, painted 1) trained and validated a submitted
    label as empty. Slicer's Submit Label names each value (``label_info``); the datastore keeps the names with the
    label, its datalist hands them on, and the trainer's training and validation read the label by them. A label
    that still has the 'uncertain' segment is refused (422) and stores nothing."""
    import types

    import nibabel as nib
    import numpy as np
    from fastapi import HTTPException

    from lib.datastore import CheckedLocalDatastore
    from lib.trainers.dfm_vlm import _ValStep
    from lib.transforms import preprocess

    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(ROOT / "sample_data" / "phantom_ct_06.nii.gz", studies)
    img = nib.load(studies / "phantom_ct_06.nii.gz")
    lab = np.zeros(img.shape, np.uint8)
    lab[10:30, 10:30, 5:15] = 1
    up = tmp_path / "up.nii.gz"
    nib.save(nib.Nifti1Image(lab, img.affine), str(up))
    lab[12, 12, 6] = 2
    up_unc = tmp_path / "up_unc.nii.gz"
    nib.save(nib.Nifti1Image(lab, img.affine), str(up_unc))
    ds = CheckedLocalDatastore(str(studies), extensions=["*.nii.gz"])
    slicer = {"label_info": [{"name": "lesion", "idx": 1}, {"name": "uncertain", "idx": 2}]}
    with pytest.raises(HTTPException) as e:
        ds.save_label("phantom_ct_06", str(up_unc), "final", slicer)
    assert e.value.status_code == 422 and "'uncertain' segment (value 2)" in e.value.detail
    assert not ds.get_labeled_images()
    for bad, what in (({"label_info": [{"name": "lesion", "idx": "one"}]}, "entry 0 ('lesion') has idx"),
                      ({"label_info": "lesion"}, "is not JSON"), ({"label_info": [3]}, "must be a list"),
                      ({"segments": {"x": "lesion"}}, "not a label value")):
        with pytest.raises(HTTPException) as e:
            ds.save_label("phantom_ct_06", str(up), "final", bad)
        assert e.value.status_code == 422 and what in e.value.detail
    ds.save_label("phantom_ct_06", str(up), "final", {"label_info": [{"name": "lesion"}]})  # paired with value 1
    assert ds.get_label_info("phantom_ct_06", "final")["segments"] == {"1": "lesion"}
    # what other clients send (a second review): background listed with idx 0, an idx 1.0, label_info as JSON text
    # or one mapping: accepted (were 422); the app's own result saved by /infer (save_label) is named by its
    # label_names, so its uncertain segment is refused there too
    for info in ({"label_info": [{"name": "background", "idx": 0}, {"name": "lesion", "idx": 1.0}]},
                 {"label_info": '[{"name": "lesion", "idx": "1"}]'}, {"label_info": {"name": "lesion", "idx": 1}},
                 {"model": "dfm_vlm_3d", "params": {"label_names": {"lesion": 1}}}):
        ds.save_label("phantom_ct_06", str(up), "final", info)
        assert ds.get_label_info("phantom_ct_06", "final")["segments"] == {"1": "lesion"}, info
    # the app's result of a subset request (labels=vertebra) names every structure in label_names, but only the
    # vertebra was looked for: the lesion stays unnamed (unknown), not "absent" (a review, 2026-12-07: a training
    # learnt "no lesion" on an image with one)
    vert = tmp_path / "vert.nii.gz"
    nib.save(nib.Nifti1Image((lab > 0).astype(np.uint8) * 2, img.affine), str(vert))
    ds.save_label("phantom_ct_06", str(vert), "final", {"model": "dfm_vlm_3d", "params": {
        "label_names": {"lesion": 1, "vertebra": 2}, "labels": ["vertebra"]}})
    assert ds.get_label_info("phantom_ct_06", "final")["segments"] == {"2": "vertebra"}
    # Slicer's idx counts a segment it does not export (a "background" segment first): the file's value 1 is the
    # first segment sent, not the one whose idx is 1 (a review: truths of a prompted model were swapped)
    ds.save_label("phantom_ct_06", str(up), "final", {"label_info": [{"name": "lesion", "idx": 2},
                                                                     {"name": "vertebra", "idx": 3}]})
    assert ds.get_label_info("phantom_ct_06", "final")["segments"] == {"1": "lesion", "2": "vertebra"}
    # what Slicer sends for /info's labels [lung, background, lesion, vertebra] with only the vertebra painted: the
    # file holds 3 (a third review: paired by idx, 3 was stored as the lesion)
    up3 = tmp_path / "up3.nii.gz"
    nib.save(nib.Nifti1Image((lab > 0).astype(np.uint8) * 3, img.affine), str(up3))
    ds.save_label("phantom_ct_06", str(up3), "final", {"label_info": [
        {"name": "lung", "idx": 1}, {"name": "lesion", "idx": 3}, {"name": "vertebra", "idx": 4}]})
    assert ds.get_label_info("phantom_ct_06", "final")["segments"] == {"1": "lung", "2": "lesion", "3": "vertebra"}
    # a file holding only 7 with one Slicer entry: the name lands on 1, which the file lacks, and 7 stays unnamed (a
    # review, 2026-12-07: stored as {"1": "lesion"}, the lesion's truth read as empty); nothing stored
    up7 = tmp_path / "up7.nii.gz"
    nib.save(nib.Nifti1Image((lab > 0).astype(np.uint8) * 7, img.affine), str(up7))
    with pytest.raises(HTTPException) as e:
        ds.save_label("phantom_ct_06", str(up7), "final", {"label_info": [{"name": "lesion", "idx": 7}]})
    assert e.value.status_code == 422 and "does not hold" in e.value.detail and "[7] unnamed" in e.value.detail
    assert ds.get_label_info("phantom_ct_06", "final")["segments"] == {"1": "lung", "2": "lesion", "3": "vertebra"}
    # names without idx are paired with the file's values in order, counted among themselves (a fourth review: a
    # "background" entry before them took a position, and the vertebra was stored as the lesion); more such names
    # than values cannot be paired (which segment was left empty?): 422, nothing stored
    ds.save_label("phantom_ct_06", str(up_unc), "final", {"label_info": [{"name": "background"}, {"name": "lesion"},
                                                                         {"name": "vertebra"}]})
    assert ds.get_label_info("phantom_ct_06", "final")["segments"] == {"1": "lesion", "2": "vertebra"}
    with pytest.raises(HTTPException) as e:
        ds.save_label("phantom_ct_06", str(up), "final", {"label_info": [{"name": "lesion"}, {"name": "vertebra"}]})
    assert e.value.status_code == 422 and "by position" in e.value.detail
    assert ds.get_label_info("phantom_ct_06", "final")["segments"] == {"1": "lesion", "2": "vertebra"}
    empty = tmp_path / "empty.nii.gz"  # a negative case: nothing to misname, stored (a second review: refused)
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), str(empty))
    ds.save_label("phantom_ct_06", str(empty), "final", {"label_info": [{"name": "lesion"}, {"name": "vertebra"}]})
    assert not ds.get_label_info("phantom_ct_06", "final").get("segments")
    with pytest.raises(HTTPException) as e:
        ds.save_label("phantom_ct_06", str(up_unc), "final", {"params": {"label_names": {"lesion": 1,
                                                                                          "uncertain": 2}}})
    assert e.value.status_code == 422 and "'uncertain' segment" in e.value.detail
    ds.save_label("phantom_ct_06", str(up), "final", slicer)  # the uncertain segment erased: accepted
    reopened = CheckedLocalDatastore(str(studies), extensions=["*.nii.gz"])
    assert reopened.get_label_info("phantom_ct_06", "final")["segments"] == {"1": "lesion", "2": "uncertain"}
    assert reopened.datalist()[0]["segments"] == {"1": "lesion", "2": "uncertain"}

    trainer = _task(ckpt3d, tmp_path / "model").trainer()
    items = trainer.pre_process({}, reopened)
    assert items[0]["segments"] == json.dumps({"1": "lesion", "2": "uncertain"})
    # names set by hand through PUT /datastore/labelinfo that are not a mapping of values: that image is skipped
    # with a warning (a review: the whole training failed), the others train
    reopened.update_label_info("phantom_ct_06", "final", {"segments": ["lesion"]})
    with pytest.raises(ValueError, match="no labelled 3D image"):
        trainer.pre_process({}, CheckedLocalDatastore(str(studies), extensions=["*.nii.gz"]))
    reopened.update_label_info("phantom_ct_06", "final", {"segments": {"1": "lesion", "2": "uncertain"}})
    system = make_system(spatial_dims=3, features=(8, 16), spacing=[2.0, 2.0, 2.0])
    pre = system.hparams.preprocessing
    pre.orientation, pre.label_threshold = "RAS", 127.0  # a dataset coded 0/255, as cxr_lung's
    train_truth = preprocess(pre)(items[0])["label"]
    assert train_truth.sum() > 0 and preprocess(pre)({**items[0], "segments": ""})["label"].sum() == 0
    step = _ValStep(types.SimpleNamespace(system=system))
    batch = {"image": [items[0]["image"]], "label": [items[0]["label"]]}
    named = step(None, {**batch, "segments": [items[0]["segments"]]})["cases"][0]
    unnamed = step(None, batch)["cases"][0]
    assert named["fg_fraction_label"] == pytest.approx(float((lab > 0).mean()), rel=1e-6)  # up: all of it 1
    assert unnamed["fg_fraction_label"] == 0


def test_the_same_pixels_give_the_same_probabilities_however_they_arrive(tmp_path, ckpt3d):
    """A review (2026-12-07): windows were seeded by the image's name (uploads and session images by the file's
    digest), so one image gave other results as a file in the studies folder and as an upload (0.20 in probability),
    in a datalist beside another file of its name (path ids: 0.19), as a DICOM series in two folders (0.02), or
    through predict_item without a case id. The seed now follows the voxels as loaded and oriented
    (lib.transforms.ContentKeyd): the same pixels, the same result in the core and the app; other pixels, another
    key."""
    import nibabel as nib
    import numpy as np

    from lib.dicom import write_ct_series
    from lib.transforms import CONTENT_KEY

    entry = write_phantom_case(tmp_path / "studies", "case01", shape=(28, 24, 10), spacing=(1.2, 1.0, 2.0))
    system = load_system(ckpt3d)
    inferer = make_inferer(system, steps=1, num_samples=2)
    ref = predict_item(system, {"image": entry["image"], "case_id": "case01"}, inferer)["prob"]
    other = tmp_path / "elsewhere" / "tmpab12cd34.nii.gz"  # an upload's temporary name, in another folder
    other.parent.mkdir()
    shutil.copy(entry["image"], other)
    for item in ({"image": str(other), "case_id": "elsewhere/tmpab12cd34"}, {"image": entry["image"]}):
        assert torch.equal(predict_item(system, item, inferer)["prob"], ref), item
    task = _task(ckpt3d, tmp_path / "model").infer()
    _, data = task({"image": str(other), "skip_writer": True, "steps": 1, "num_samples": 2, "device": "cpu"})
    assert (torch.as_tensor(data["prob"]) - ref).abs().max().item() <= 1e-5
    # the same volume as a DICOM series in two folders of other names
    img = nib.load(entry["image"])
    volume = np.asarray(img.dataobj, dtype=float) * 1000.0 - 500.0
    series = [write_ct_series(volume, img.affine, tmp_path / f) for f in ("a/001", "b/series_b")]
    assert series[0]["files"] == 10
    pa, pb = (predict_item(system, {"image": str(tmp_path / f)}, inferer)["prob"] for f in ("a/001", "b/series_b"))
    assert torch.equal(pa, pb)
    # other pixels: another key
    shifted = write_phantom_case(tmp_path / "studies", "case02", shape=(28, 24, 10), spacing=(1.2, 1.0, 2.0), seed=1)
    keys = {system.preprocessing({"image": e["image"]})[CONTENT_KEY] for e in (entry, shifted)}
    assert len(keys) == 2 and system.preprocessing({"image": str(other)})[CONTENT_KEY] in keys


def test_a_scoring_run_stops_when_a_newer_checkpoint_is_published_and_skips_what_changed_meanwhile(tmp_path, ckpt3d):
    """A review (2026-12-07): MONAI Label's startup scoring ran for 30 min; after a training published, its
    ``score_image`` loaded the new checkpoint but stamped the scores with the old one's time (fresh scores then read
    as stale), it scored images labelled after it started, and it re-scored images the server had just scored."""
    import os

    from lib.activelearning.uncertainty import SCORE, DFMUncertaintyScoring

    task = _task(ckpt3d, tmp_path / "model").infer()
    images = {f"case{k}": f"case{k}.nii.gz" for k in range(4)}
    ds = _MemoryDatastore(images)
    scored = []

    class Scoring(DFMUncertaintyScoring):
        def score_image(self, image_id, datastore, num_samples, device=None):
            scored.append(image_id)
            if image_id == "case0":  # meanwhile: the server scores case1, an annotator labels case2
                datastore.info["case1"] = {self.key: 0.7, f"{self.key}_ts": self.model_ts(),
                                           f"{self.key}_num_samples": num_samples}
                del datastore.images["case2"]
            if image_id == "case3":  # meanwhile: a training publishes
                st = os.stat(task.get_path())
                os.utime(task.get_path(), ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
            return {SCORE: 0.5}

        def candidates(self, datastore):
            return sorted(datastore.get_unlabeled_images())

    scoring = Scoring(task, "m", num_samples=2)
    stamp = scoring.model_ts()
    r = scoring({}, ds)
    assert scored == ["case0", "case3"], scored  # case1 current, case2 labelled: not scored again
    assert ds.info["case0"]["m_uncertainty_ts"] == stamp and ds.info["case1"]["m_uncertainty"] == 0.7
    assert "m_uncertainty" not in ds.info.get("case3", {}), "a score of an unknown checkpoint was written"
    assert r["executed"] == 1 and r["pending"] == 1 and r["skipped"] == 2, r
    # a publish between two images (here: right after the first score's write) stops the run before the next one
    class Published(_MemoryDatastore):
        def update_image_info(self, image_id, d):
            super().update_image_info(image_id, d)
            st = os.stat(task.get_path())
            os.utime(task.get_path(), ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))

    scored.clear()
    r = Scoring(task, "m", num_samples=2)({}, Published({"case4": "x", "case5": "y"}))
    assert len(scored) == 1 and r["executed"] == 1 and r["pending"] == 1, (scored, r)


def test_random_next_sample_skips_images_that_cannot_be_read(tmp_path):
    """A review (2026-12-07, a real Orthanc with malformed series): a series the loader refuses was never handed
    out, so it kept the largest weight, and once the readable series were handed out nearly every ``random`` Next
    Sample was a 422 about it. It is skipped; when no unlabelled image can be read, the error names them. So is a
    file in a folder datastore that does not decode (a truncated PNG: a later review), once per version of it."""
    from lib.activelearning.fair_random import FairRandom
    from lib.transforms import InputError

    class Store(_MemoryDatastore):
        def get_image_uri(self, image_id):
            if image_id.startswith("bad"):
                raise InputError(f"series {image_id}: uneven slice increment")
            return "" if image_id == "gone" else super().get_image_uri(image_id)  # deleted from the PACS

    now = int(__import__("time").time())
    served = {"good": {"strategy": {"random": {"ts": now - 5}}}}  # handed out 5 s ago: the bad ones weigh 1e9 x
    import numpy as np
    from PIL import Image

    import lib.activelearning.fair_random as fair_random

    good = write_phantom_case(tmp_path, "good", shape=(8, 8, 4))["image"]
    png = tmp_path / "xray.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(png)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png.read_bytes()[:-200])
    ds = Store({"good": good, "bad1": "b1", "bad2": "b2", "gone": "", "trunc": str(truncated)}, info=served)
    assert {FairRandom()({}, ds)["id"] for _ in range(10)} == {"good"}
    assert "truncated.png" in fair_random.unreadable(str(truncated))
    truncated.write_bytes(png.read_bytes())  # the file mended: read again, handed out
    ds.info["good"]["strategy"]["random"]["ts"] = now
    assert {FairRandom()({}, ds)["id"] for _ in range(10)} == {"trunc"}
    with pytest.raises(InputError, match="no unlabelled image can be read .2 refused.*uneven slice increment"):
        FairRandom()({}, Store({"bad1": "b1", "bad2": "b2"}))


def test_new_ids_are_at_most_200_bytes_and_an_image_already_stored_under_a_longer_name_is_still_served(tmp_path):
    """A review (2026-12-07): an id of 250 characters was stored and its file name plus the extension and a write's
    temporary name went over the file system's 255 (a 500); a second review: the first fix's 200-byte limit also
    refused every request on an image already in the folder under a longer (legal) name."""
    import shutil
    from pathlib import Path

    from fastapi import HTTPException

    from lib.datastore import CheckedLocalDatastore, check_name

    studies = tmp_path / "studies"
    studies.mkdir()
    sample = Path(__file__).parent.parent / "sample_data" / "phantom_ct_05.nii.gz"
    old_id = "a" * 230  # 237 bytes with .nii.gz: a legal file name, put there before the server started
    shutil.copy(sample, studies / f"{old_id}.nii.gz")
    ds = CheckedLocalDatastore(str(studies), extensions=["*.nii.gz"])
    assert check_name(old_id, "image id") == old_id and ds.get_image_uri(old_id)
    with pytest.raises(HTTPException) as e:
        ds.remove_label(old_id, "final")
    assert e.value.status_code == 404, e.value.detail  # (not a 422 about its name)
    with pytest.raises(HTTPException) as e:
        ds.add_image("b" * 250, str(sample), {})
    assert e.value.status_code == 422 and "at most 200 bytes" in e.value.detail, e.value.detail
    assert not list(studies.glob("bbb*"))


def test_an_upload_never_takes_another_image_s_file_and_a_deleted_image_leaves_the_index_at_once(tmp_path):
    """A review on a live server: a DICOM file sent as ``pat7`` under its long dotted name was stored as
    ``pat7.320.dcm`` (a suffix MONAI Label does not list was kept whole), which an upload as ``pat7.320`` then
    overwrote under pat7's final label, and a DELETE of ``pat7.320`` removed pat7's file; a deleted image of such a
    suffix stayed listed (and was handed out) until a refresh that never came. A suffix not listed keeps its last
    part, another image's file is a 409, and a deleted image leaves the index before DELETE answers."""
    import numpy as np
    import SimpleITK as sitk
    from fastapi import HTTPException

    from lib.datastore import CheckedLocalDatastore

    studies = tmp_path / "studies"
    studies.mkdir()

    def mha(name, value):
        path = tmp_path / name
        sitk.WriteImage(sitk.GetImageFromArray(np.full((6, 8, 8), value, np.float32)), str(path))
        return str(path)

    # "*.x.mha" stands for an index written before (its files stored with a dotted suffix)
    # auto_reload: the server's file watcher, which never sees a .mha (MONAI Label's remove refreshes only without it)
    ds = CheckedLocalDatastore(str(studies), extensions=["*.nii.gz", "*.x.mha"], auto_reload=True)
    assert ds.add_image("pat7", mha("tmp1.x.mha", 1.0), {}) == "pat7"
    assert (studies / "pat7.x.mha").exists()
    assert ds.add_image("ct9", mha("tmp2.1.2.320.mha", 2.0), {}) == "ct9"
    assert (studies / "ct9.mha").exists() and not list(studies.glob("ct9.1.2*"))  # its last suffix only
    with pytest.raises(HTTPException) as e:
        ds.add_image("pat7.x", mha("tmp3.mha", 3.0), {})  # stored as pat7.x.mha: pat7's file
    assert e.value.status_code == 409 and "'pat7'" in e.value.detail, e.value.detail
    assert float(sitk.GetArrayFromImage(sitk.ReadImage(str(studies / "pat7.x.mha"))).max()) == 1.0
    ds.remove_image("ct9")
    assert "ct9" not in ds.list_images() and not (studies / "ct9.mha").exists()
    assert "ct9" not in CheckedLocalDatastore(str(studies), extensions=["*.nii.gz", "*.x.mha"]).list_images()
    with pytest.raises(HTTPException) as e:
        ds.remove_image("ct9")
    assert e.value.status_code == 404
    # PUT /datastore/image without an id: the file's name less its image suffix (MONAI Label cut it at the first
    # dot: case.001 and case.002 were one id, the second replacing the first)
    from monailabel_app.main import upload_image_id

    names = ("case.001.nii.gz", "CT 2024.01.05.NII.GZ", "x.DCM", "IM0001", "scan.seg.nrrd", "a.b.weird")
    assert [upload_image_id(n) for n in names] == ["case.001", "CT 2024.01.05", "x", "IM0001", "scan", "a.b"]
    # and a datalist's case of that file the same name (its predictions, scores, seeds): case_id cut a shorter list
    from lib.data import case_id

    for n in ("case.001.nii.gz", "CT 2024.01.05.NII.GZ", "x.DCM", "slide.tiff", "xr.jpeg", "scan.seg.nrrd", "v.mhd"):
        assert case_id({"image": f"/data/{n}"}) == upload_image_id(n), n


def test_a_new_image_under_an_old_id_never_takes_the_labels_its_predecessor_left_and_a_deleted_label_leaves_at_once(
        tmp_path):
    """A review (2026-12-08): an image whose file vanished (deleted or renamed in the folder) left its label files;
    a new image uploaded under that id was answered with no labels, then the next refresh attached the old ones to
    it (a 300 x 200 X-ray got a 256 x 256 label, counted as annotated). They are set aside (kept) when the new image
    takes the id. And a label of a tag made after the server started stayed listed after its DELETE (a second
    DELETE answered 200): it leaves the index before the answer."""
    import nibabel as nib
    import numpy as np
    from fastapi import HTTPException

    from lib.datastore import CheckedLocalDatastore

    studies = tmp_path / "studies"
    studies.mkdir()

    def nii(name, shape, value=1.0, dtype=np.float32):
        path = tmp_path / name
        nib.save(nib.Nifti1Image(np.full(shape, value, dtype), np.eye(4)), str(path))
        return str(path)

    def open_ds(auto_reload=False):
        return CheckedLocalDatastore(str(studies), extensions=["*.nii.gz"], auto_reload=auto_reload)

    ds = open_ds()
    ds.add_image("a", nii("a_img.nii.gz", (8, 8, 6)), {})
    for tag in ("final", "draft"):
        ds.save_label("a", nii(f"a_{tag}.nii.gz", (8, 8, 6), 1, np.uint8), tag, {})
    os.remove(studies / "a.nii.gz")  # the image's file gone while the server was down
    ds = open_ds()
    assert "a" not in ds.list_images() and (studies / "labels" / "final" / "a.nii.gz").exists()
    ds.add_image("a", nii("b_img.nii.gz", (10, 6, 4)), {})  # another image under the id
    assert ds.get_labels_by_image_id("a") == {}
    assert open_ds().get_labels_by_image_id("a") == {}, "the old image's labels attached to the new one"
    kept = sorted(p.relative_to(studies).parts[2:] for p in (studies / ".orphaned_labels").rglob("*.nii.gz"))
    assert kept == [("draft", "a.nii.gz"), ("final", "a.nii.gz")], kept  # set aside, not deleted
    # a label of a tag made after the datastore (the server) started: DELETE takes it out of the index at once
    live = open_ds(auto_reload=True)
    live.save_label("a", nii("a_review.nii.gz", (10, 6, 4), 1, np.uint8), "review", {})
    assert "review" in live.get_labels_by_image_id("a")
    live.remove_label("a", "review")
    assert "review" not in live.get_labels_by_image_id("a")
    with pytest.raises(HTTPException) as e:
        live.remove_label("a", "review")
    assert e.value.status_code == 404
    # an image renamed in the folder while the server runs: listed under its new name, not its old one (was: until
    # another change of the folder)
    import time

    from lib.datastore import watch_renames

    watch_renames(live)
    os.rename(studies / "a.nii.gz", studies / "renamed.nii.gz")
    deadline = time.time() + 20
    while time.time() < deadline and "renamed" not in live.list_images():
        time.sleep(0.2)
    assert "renamed" in live.list_images() and "a" not in live.list_images()
    live._observer.stop()
    live._observer.join()


@pytest.mark.parametrize("shape, overlap", [((40, 36, 20), 0.25), ((80, 80, 52), 0.5), ((10, 70, 33), 0.9),
                                            ((200, 150), 0.25), ((20, 30), 0.6)])
def test_the_window_count_is_the_number_of_windows_monai_s_sliding_window_runs(shape, overlap):
    """What a request's work is counted in (:meth:`DFMSlidingWindowInferer.window_count`): the windows MONAI's own
    sliding window hands the predictor, for images larger and smaller than the window, in 2D and 3D."""
    from monai.inferers import SlidingWindowInferer

    from lib.inferer import DFMSlidingWindowInferer

    roi = [32] * len(shape)
    seen = [0]

    def count(x):
        seen[0] += x.shape[0]
        return x

    SlidingWindowInferer(roi_size=roi, sw_batch_size=3, overlap=overlap)(torch.zeros(1, 1, *shape), count)
    ours = DFMSlidingWindowInferer(roi_size=roi, overlap=overlap)
    assert ours.window_count(shape) == seen[0] > 0


def test_a_request_asking_far_more_work_than_the_model_s_own_sampler_is_refused_before_it_runs(tmp_path, ckpt3d,
                                                                                                 monkeypatch):
    """Steps, samples and overlap each within their bounds, their product not: refused naming the work and the
    limit, before any window runs; the model's own sampler and a few times its work run; DFM_MAX_REQUEST_WORK=0
    lifts the limit."""
    import lib.infers.dfm_vlm as infer_mod

    entry = write_phantom_case(tmp_path / "studies", "case01", shape=(40, 36, 20), spacing=(1.2, 1.0, 2.0))
    task = _task(ckpt3d, tmp_path / "model").infer()
    ran = []
    real = infer_mod.predict_preprocessed

    def predict(system, pre, inferer, **k):
        assert inferer.steps < 256, "the refused request ran"  # (it would run for hours)
        ran.append(inferer.steps)
        return real(system, pre, inferer, **k)

    monkeypatch.setattr(infer_mod, "predict_preprocessed", predict)
    req = {"image": entry["image"], "skip_writer": True, "device": "cpu"}
    task({**req, "steps": 2, "num_samples": 1})  # the checkpoint's defaults or near them
    task({**req, "steps": 4, "num_samples": 4})
    assert len(ran) == 2
    big = {"steps": 256, "num_samples": 64, "overlap": 0.9}
    with pytest.raises(ConfigError, match=r"times the network work of the model's own sampler.*"
                                          r"at most 32 times \(DFM_MAX_REQUEST_WORK\)"):
        task({**req, **big})
    with pytest.raises(ConfigError, match="times the network work"):  # the steps alone: evaluations per sample count
        task({**req, "steps": 256, "num_samples": 1})
    for key, value in (("roi_size", [8, 8, 8]), ("max_batch_voxels", 1)):  # (accepted and ignored: a review)
        with pytest.raises(ConfigError, match=rf"\['{key}'\] cannot be set in a request"):
            task({**req, key: value})
    assert ran == [2, 4]
    # the operator's setting: 0 (no limit) or a factor >= 1 (below 1 the model's own sampler would be refused)
    assert infer_mod._max_request_work("") == 32.0 and infer_mod._max_request_work("0") == 0.0
    for bad in ("0.5", "-1", "abc", "nan"):
        with pytest.raises(ConfigError, match="DFM_MAX_REQUEST_WORK"):
            infer_mod._max_request_work(bad)
    monkeypatch.setattr(infer_mod, "MAX_REQUEST_WORK", 0.0)
    monkeypatch.setattr(infer_mod, "predict_preprocessed", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # past the check, stopped at the first window
        task({**req, **big})


def test_a_segment_is_coded_by_its_name_and_any_name_can_be_saved():
    """Segments are coded from DICOM's segmentation lists by name (every one was "Tissue"). A second review found
    that a keyword with two SNOMED codes in pydicom's dictionary ("Mass", "Pelvis", "Hand": 17 of the lists') made
    the lookup raise, so a label named "breast mass" failed to save; and that "left_ventricle", whose type holds its
    side, was given the modifier Left as well."""
    from lib.dicom import segment_codes

    def coded(name):
        c = segment_codes(name)
        return (c["SegmentedPropertyCategoryCodeSequence"]["CodeValue"],
                c["SegmentedPropertyTypeCodeSequence"]["CodeValue"],
                c.get("SegmentedPropertyTypeModifierCodeSequence", {}).get("CodeMeaning"))

    assert coded("breast mass") == ("49755003", "4147007", None)  # Mass, in CID 7194
    assert coded("pelvis")[1] == "12921003" and coded("left hand") == ("91723000", "85562004", "Left")
    assert coded("left_ventricle") == ("91723000", "87878005", None)  # Left Ventricle: no second side
    assert coded("right_lung") == ("91723000", "39607008", "Right")
    assert coded("whole_tumour") == ("49755003", "108369006", None)
    assert coded("segment 3") == ("91723000", "85756007", None)  # in no list: Tissue, as before
    from lib.datastore import segment_infos

    own = {"labelID": 1, "SegmentLabel": "x", "SegmentedPropertyTypeCodeSequence": {"CodeValue": "1"}}
    assert segment_infos([1], [{"name": "pelvis", "segmentAttribute": own}])[0]["segmentAttribute"] == own


def test_the_result_s_dicom_seg_describes_each_segment_as_a_final_label_s_seg_does(tmp_path, monkeypatch):
    """A review (2026-12-07): ``/infer?output=dicom_seg`` handed MONAI Label's defaults on to dcmqi -- every segment
    coded 78961009 (SNOMED's spleen), algorithm "MONAILABEL", description "Unknown" -- where a final label's SEG
    says what it is. Both go through ``lib.datastore.segment_infos``: a prompted result's segments named by its
    label_names, a one-label result's (no label_names) by the client's entries in order."""
    import nibabel as nib
    import numpy as np
    import monailabel.endpoints.infer as endpoint
    import monailabel.interfaces.utils.app as app_utils

    import monailabel_app.main as app_main

    monkeypatch.setattr(endpoint, "nifti_to_dicom_seg", lambda *a, **k: "original")
    app_main._install_dicom_seg_naming()
    written = {}

    class Store:
        def write_seg(self, image_id, label, info, convert, what, then):
            written.update(image=image_id, info=info)
            return "seg.dcm"

    monkeypatch.setattr(app_utils, "app_instance", lambda *a, **k: type("App", (), {"datastore": lambda s: Store()})())
    lab = np.zeros((8, 8, 4), np.uint8)
    lab[1:3] = 1
    lab[5:7] = 2
    nib.save(nib.Nifti1Image(lab, np.eye(4)), str(tmp_path / "result.nii.gz"))
    for names, sent, want in (
            ({"lesion": 1, "vertebra": 2}, [{"name": "vertebra", "model_name": "dfm_vlm_3d"}],
             [("lesion", "dfm_vlm_3d"), ("vertebra", "dfm_vlm_3d")]),
            (None, [{"name": "tumour"}, {"name": "oedema"}], [("tumour", "DFM+VLM"), ("oedema", "DFM+VLM")])):
        app_main._RESULT.label_names = names
        assert endpoint.nifti_to_dicom_seg(str(tmp_path / "1.2.3"), str(tmp_path / "result.nii.gz"), sent) == "seg.dcm"
        attrs = [x["segmentAttribute"] for x in written["info"]]
        assert written["image"] == "1.2.3"
        assert [(a["SegmentLabel"], a["SegmentAlgorithmName"]) for a in attrs] == want, attrs
        assert [a["labelID"] for a in attrs] == [1, 2] and [a["SegmentDescription"] for a in attrs] == [w[0] for w in want]
        # coded by name (every segment was 85756007, "Tissue"), in distinct colours (every one was red)
        assert [(a["SegmentedPropertyCategoryCodeSequence"]["CodeValue"], a["SegmentedPropertyTypeCodeSequence"][
            "CodeValue"]) for a in attrs] == {"lesion": [("49755003", "52988006"), ("91723000", "51282000")],
                                              "tumour": [("49755003", "108369006"), ("49755003", "79654002")]}[
            want[0][0]], attrs
        assert attrs[0]["recommendedDisplayRGBValue"] != attrs[1]["recommendedDisplayRGBValue"], attrs
    app_main._RESULT.label_names = None


def test_a_download_sends_the_file_it_opened_whatever_is_saved_over_it_meanwhile(tmp_path, monkeypatch):
    """A review (2026-12-07): MONAI Label's download took the file's size, then opened it again by its name to send
    it; a label saved meanwhile (renamed over it) was sent cut short or overlong ("Too much data for declared
    Content-Length", an IncompleteRead in the client). The file opened is the one sent, its own size declared, and
    a range request is still answered with that range (a second review)."""
    import asyncio
    import os
    import types

    import monailabel.endpoints.datastore as endpoint

    import monailabel_app.main as app_main

    app_main._install_consistent_downloads()
    label = tmp_path / "case.nii.gz"
    store = types.SimpleNamespace(get_label_uri=lambda *a: str(label), get_image_uri=lambda *a: str(label))
    monkeypatch.setattr(endpoint, "app_instance", lambda *a, **k: types.SimpleNamespace(datastore=lambda: store))

    def served(response, headers=()):
        sent = []

        async def receive():  # (the client stays: Starlette listens for a disconnect while it sends)
            await asyncio.Event().wait()

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "GET", "headers": [(k.encode(), v.encode()) for k, v in headers]}
        asyncio.run(response(scope, receive, send))
        start = next(m for m in sent if m["type"] == "http.response.start")
        return start["status"], dict((k.decode(), v.decode()) for k, v in start["headers"]), \
            b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")

    old = b"old label " * 1000
    for download, headers, want in ((lambda: endpoint.download_label("case", "final"), (), (200, old)),
                                    (lambda: endpoint.download_image("case"), (), (200, old)),
                                    (lambda: endpoint.download_label("case", "final"), (("range", "bytes=0-9"),),
                                     (206, old[:10]))):
        label.write_bytes(old)
        response = download()
        (tmp_path / "new.nii.gz").write_bytes(b"a new, longer label " * 3000)
        os.replace(tmp_path / "new.nii.gz", label)  # a save lands between the answer's headers and its body
        status, head, body = served(response, headers)
        assert (status, body) == want and int(head["content-length"]) == len(body), (status, head, len(body))
        assert head["content-disposition"] == 'attachment; filename="case.nii.gz"'


def test_a_checkpoint_whose_vlm_folder_is_not_here_is_served_with_the_app_s_vlm_of_its_fingerprint(tmp_path):
    """A review: a checkpoint trained on another machine (or a copy of a sample checkpoint, which names its VLM
    beside itself) was refused at ``--conf <model>_checkpoint`` and at ``PUT /model`` although the app serves that
    very VLM ("its VLM folder ... was not found"). The app's VLMs are tried, and one is taken only with the
    fingerprint the checkpoint records -- for serving, fine-tuning and a training from scratch alike."""
    from types import SimpleNamespace

    from lib.checkpoint import CheckpointError
    from lib.configs.dfm_vlm_2d import DFMVLM2D
    from lib.vlm import make_tiny_clip

    sample_vlm = (ROOT / "sample_data" / "models" / "vlm" / "tiny-clip").resolve()
    copy = tmp_path / "from-another-machine" / "dfm_vlm_2d.pt"
    copy.parent.mkdir()
    shutil.copy(ROOT / "sample_data" / "models" / "dfm_vlm_2d.pt", copy)
    with pytest.raises(CheckpointError, match="its VLM folder 'vlm/tiny-clip' was not found"):
        load_system(copy)
    system = load_system(copy, vlm_candidates=[tmp_path / "no-such-folder", sample_vlm])
    assert system.hparams.vlm.name_or_path == str(sample_vlm)
    other = make_tiny_clip(tmp_path / "other" / "tiny-clip", seed=1)  # the sample VLM's sizes, other weights
    with pytest.raises(CheckpointError, match="none with its fingerprint"):
        load_system(copy, vlm_candidates=[other])
    cfg = DFMVLM2D()
    cfg.init("dfm_vlm_2d", str(tmp_path / "model"), {"dfm_vlm_2d_checkpoint": str(copy)}, None)
    assert cfg.infer().readiness() == (True, None)
    assert cfg.infer().system("cpu").hparams.vlm.name_or_path == str(sample_vlm)
    trainer = cfg.trainer()
    for pretrained in (True, False):  # fine-tuned from it, or trained from scratch like it
        ctx = SimpleNamespace(pretrained=pretrained, device=torch.device("cpu"))
        trainer.network(ctx)
        assert ctx.system.hparams.vlm.name_or_path == str(sample_vlm), pretrained


def test_background_scoring_is_queued_only_when_stale_and_not_scored_twice_at_once(tmp_path, ckpt3d, monkeypatch):
    """A review: every Next Sample queued one scoring subprocess per method (each loading the app) whatever was stale
    or already queued -- 10 Next Samples left 20 runs of 16-32 s each on a 2-core server, for nothing; and while the
    background scoring scored a new checkpoint's stale images, Next Sample scored the same ones in the server at the
    same time (each twice, 2.5 times slower). Queued: only when stale and none waits or runs; Next Sample ranks
    among the current scores while one runs."""
    from monailabel.utils.async_tasks import utils as async_utils

    from lib.activelearning.uncertainty import (DFMUncertaintyScoring, DFMUncertaintyStrategy,
                                                background_scorings_to_queue)

    task = _task(ckpt3d, tmp_path / "model").infer()
    calls = []

    class Scoring(DFMUncertaintyScoring):
        def score_image(self, image_id, datastore, num_samples, device=None):
            calls.append(image_id)
            return {"variance_per_foreground_voxel": {"a": 0.3, "b": 0.2, "c": 0.1}[image_id]}

    scoring = Scoring(task, "dfm_vlm_3d", num_samples=2)
    scoring.candidates = lambda datastore: datastore.get_unlabeled_images()
    ds = _MemoryDatastore({k: f"{k}.nii.gz" for k in "abc"})
    monkeypatch.setattr(async_utils, "background_tasks", {})
    methods = {scoring.key: scoring, "other": object()}
    assert background_scorings_to_queue(methods, ds) == {scoring.key: None, "other": None}  # stale: queued
    scoring({}, ds)
    assert sorted(calls) == ["a", "b", "c"]
    assert background_scorings_to_queue(methods, ds)[scoring.key] == "every score is current"
    ds.info["c"][f"{scoring.key}_ts"] = 0  # another checkpoint's score: stale again
    assert background_scorings_to_queue(methods, ds)[scoring.key] is None
    for status in ("SUBMITTED", "RUNNING"):
        async_utils.background_tasks["scoring"] = [{"status": status, "request": {"method": scoring.key}}]
        assert background_scorings_to_queue(methods, ds) == {scoring.key: "a scoring of it is queued or running",
                                                             "other": None}
    # Next Sample while the background scoring runs: ranked among the current scores, nothing scored here
    calls.clear()
    got = DFMUncertaintyStrategy(scoring, scoring_s=60)({}, ds)
    assert got["id"] == "a" and calls == []
    # ... and when every ranked image is with an annotator, the one waiting for its score goes out, not a second
    # copy of one handed out (a review: three annotators got images handed out minutes before)
    import time as _time

    for i in "ab":
        ds.info[i]["strategy"] = {"x": {"ts": int(_time.time()) - 60}}
    got = DFMUncertaintyStrategy(scoring, scoring_s=60)({}, ds)
    assert got["id"] == "c" and got[f"{scoring.key}_unscored"] is True and calls == [], got
    ds.info["c"]["strategy"] = {"x": {"ts": int(_time.time()) - 30}}  # all handed out: the one longest ago
    assert DFMUncertaintyStrategy(scoring, scoring_s=60)({}, ds)["id"] == "a" and calls == []
    for i in "abc":
        del ds.info[i]["strategy"]
    async_utils.background_tasks["scoring"][0]["status"] = "DONE"  # none runs: it scores the stale one itself
    DFMUncertaintyStrategy(scoring, scoring_s=60)({}, ds)
    assert calls == ["c"]
    # the app's background scoring after a Next Sample (MONAI Label's async_scoring(None)) queues by that rule
    from monailabel.utils.async_tasks.task import AsyncTask

    from monailabel_app.main import DFMVLMApp

    queued = []
    monkeypatch.setattr(AsyncTask, "run", staticmethod(lambda method, request=None, **k: queued.append(
        request["method"]) or ({"id": "t"}, None)))
    app = object.__new__(DFMVLMApp)  # the app's method alone (no server)
    app._scoring_methods, app._server_mode, app.datastore = methods, True, (lambda: ds)
    app.async_scoring(None)
    assert queued == ["other"]  # every 3D score current
    ds.info["b"][f"{scoring.key}_ts"] = 0
    app.async_scoring(None)
    assert queued == ["other", scoring.key, "other"]
    # a training's subprocess (not server mode) asks the server by POST /scoring/<method>: by the same rule (it
    # asked for every method, in name order, so a scoring with nothing to do took the slot of the stale one's)
    asked = []
    app._server_mode = False
    app._local_request = lambda url, params, what: asked.append(url) or {}
    app.async_scoring(None)
    assert asked == [f"/scoring/{scoring.key}", "/scoring/other"]
    scoring({}, ds)
    asked.clear()
    app.async_scoring(None)
    assert asked == ["/scoring/other"] and len(queued) == 3


def test_an_image_file_replaced_in_the_studies_folder_is_scored_again(tmp_path, ckpt3d):
    """A review: an image file replaced in place (another scan copied over it) kept the old file's uncertainty score
    as current, so Next Sample ranked it by the old image, and no scoring run ever scored it again. A score records
    the file's size and time; a score from before (without them) stays current."""
    import os

    from lib.activelearning.uncertainty import DFMUncertaintyScoring, DFMUncertaintyStrategy

    task = _task(ckpt3d, tmp_path / "model").infer()
    calls = []

    class Scoring(DFMUncertaintyScoring):
        def score_image(self, image_id, datastore, num_samples, device=None):
            calls.append(image_id)
            return {"variance_per_foreground_voxel": len(open(datastore.get_image_uri(image_id), "rb").read()) / 1e3}

    files = {k: tmp_path / f"{k}.nii.gz" for k in "ab"}
    for k, f in files.items():
        f.write_bytes(b"x" * (10 if k == "a" else 20))
    scoring = Scoring(task, "dfm_vlm_3d", num_samples=2)
    scoring.candidates = lambda datastore: datastore.get_unlabeled_images()
    ds = _MemoryDatastore({k: str(f) for k, f in files.items()})
    assert scoring({}, ds)["executed"] == 2 and scoring({}, ds)["skipped"] == 2
    new = tmp_path / "new.nii.gz"
    new.write_bytes(b"x" * 30)  # another scan, copied over a's file
    os.replace(new, files["a"])
    calls.clear()
    assert DFMUncertaintyStrategy(scoring, scoring_s=60)({}, ds)["id"] == "a"  # ranked by the new file's score
    assert calls == ["a"] and ds.info["a"][scoring.key] == pytest.approx(0.03)
    del ds.info["b"][f"{scoring.key}_file"]  # a score from before file stamps: not scored again for want of one
    assert scoring({}, ds)["skipped"] == 2


def test_a_changed_checkpoint_gets_its_rescoring_queued_when_the_scoring_slot_frees(tmp_path, ckpt3d, monkeypatch):
    """A review (an annotator's loop on a real server): a training asks ``POST /scoring/<method>`` when it ends, which
    MONAI Label refuses while any scoring runs, so a long scoring at start kept the new checkpoint's rescoring from
    ever being queued. The server looks every SCORING_WATCH_S whether a checkpoint changed, and queues its method's
    scoring when a score is stale and none of its runs waits or runs (else it looks again)."""
    import os
    import time

    from monailabel.utils.async_tasks import utils as async_utils
    from monailabel.utils.async_tasks.task import AsyncTask

    from lib.activelearning.uncertainty import DFMUncertaintyScoring
    from monailabel_app.main import DFMVLMApp

    ck = tmp_path / "served.pt"
    shutil.copy(ckpt3d, ck)

    class Scoring(DFMUncertaintyScoring):
        def score_image(self, image_id, datastore, num_samples, device=None):
            return {"variance_per_foreground_voxel": 0.5}

    scoring = Scoring(_task(ck, tmp_path / "model").infer(), "dfm_vlm_3d", num_samples=2)
    scoring.candidates = lambda datastore: datastore.get_unlabeled_images()
    ds = _MemoryDatastore({k: f"{k}.nii.gz" for k in "ab"})
    scoring({}, ds)  # every score current
    queued = []
    monkeypatch.setattr(AsyncTask, "run", staticmethod(lambda method, request=None, **k: queued.append(
        request["method"]) or ({"id": "t"}, None)))
    monkeypatch.setattr(async_utils, "background_tasks", {})
    app = object.__new__(DFMVLMApp)  # the app's methods alone (no server)
    app._scoring_methods, app._server_mode, app._auto_update_scoring, app.datastore = \
        {scoring.key: scoring}, True, True, (lambda: ds)
    seen = app._scoring_model_times()
    assert app.queue_scoring_of_new_checkpoints(seen) == [] and queued == []  # nothing changed
    t = os.stat(ck).st_mtime_ns + 10 ** 9
    os.utime(ck, ns=(t, t))  # a training published
    async_utils.background_tasks["scoring"] = [{"status": "RUNNING", "request": {"method": scoring.key}}]
    assert app.queue_scoring_of_new_checkpoints(seen) == []  # its slot busy: looked at again
    async_utils.background_tasks["scoring"][0]["status"] = "DONE"
    assert app.queue_scoring_of_new_checkpoints(seen) == [scoring.key] and queued == [scoring.key]
    assert app.queue_scoring_of_new_checkpoints(seen) == []  # once
    t += 10 ** 9
    os.utime(ck, ns=(t, t))
    scoring({}, ds)  # the new checkpoint's scores made already (a Next Sample's): nothing to queue
    assert app.queue_scoring_of_new_checkpoints(seen) == [] and queued == [scoring.key]
    # the server's watch does it by itself
    monkeypatch.setattr(DFMVLMApp, "SCORING_WATCH_S", 0.05)
    from monailabel.interfaces.app import MONAILabelApp

    monkeypatch.setattr(MONAILabelApp, "on_init_complete", lambda self: None)  # (MONAI Label's own part)
    app.on_init_complete()
    try:
        t += 10 ** 9
        os.utime(ck, ns=(t, t))
        deadline = time.time() + 30
        while len(queued) < 2 and time.time() < deadline:
            time.sleep(0.05)
        assert queued == [scoring.key] * 2
    finally:
        app._scoring_watch_stop.set()
