"""torchrun: DistributedDataParallel over gloo on the CPU gives the training of one process with the same global
batch (each rank its own slots of every global batch, every slot's randomness keyed by seed, iteration and slot)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from test_faults import write_run_files

# After 6 AdamW steps (lr 3e-3) the parameters of 2 ranks and of 1 process differ only by floating-point summation
# order (gradients averaged by all-reduce instead of in one batch): 5e-6 measured; the test allows 1e-4.
TOLERANCE = 1e-4


def _one_process_run(tmp_path, tiny_clip, iterations: int, hard_share: float = 0.0, clicks: bool = False):
    """The training arguments, environment and the one-process run every distributed run is compared with."""
    preset, datalist = write_run_files(tmp_path, tiny_clip, state_every_it=0, hard_share=hard_share, clicks=clicks)
    args = ["-m", "lib", "train", "--preset", str(preset), "--datalist", str(datalist), "--max-iterations",
            str(iterations), "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    return args, env, one


def _max_param_diff(a: Path, b: Path) -> float:
    a, b = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    return max(float((a["state_dict"][k].float() - b["state_dict"][k].float()).abs().max()) for k in a["state_dict"])


def test_two_gloo_ranks_train_like_one_process_with_the_same_global_batch(tmp_path, tiny_clip):
    # with hard-image sampling: every rank must keep the same difficulties (all ranks' patch losses) to draw the
    # same global batches; and a click-trained model: each patch's simulated clicks keyed by its slot (a review: keyed
    # by rank, 1 and 2 processes differed by 4e-3 in the loss from the first iteration)
    args, env, one = _one_process_run(tmp_path, tiny_clip, 6, hard_share=0.5, clicks=True)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *args, "--out", str(tmp_path / "two")], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    log = two.stdout + two.stderr
    seen = {int(r): int(n) for r, n in re.findall(r"rank (\d) of 2: (\d+) patches", log)}
    # the global batch is 2 images x 2 patches: each rank trained on its half of it, 6 iterations
    assert seen == {0: 12, 1: 12}, seen
    assert "rank 0 of 1: 24 patches" in one.stderr
    assert json.loads((tmp_path / "two" / "machine.json").read_text())["distributed"] == {"world_size": 2,
                                                                                         "backend": "gloo"}
    curve = [[float(v) for v in ln.split(",")] for ln in (tmp_path / "one" / "losses.csv").read_text().split()[1:]]
    curve2 = [[float(v) for v in ln.split(",")] for ln in (tmp_path / "two" / "losses.csv").read_text().split()[1:]]
    assert len(curve) == len(curve2) == 6
    assert all(a[0] == b[0] and abs(a[1] - b[1]) < 1e-5 for a, b in zip(curve, curve2)), (curve, curve2)
    a = torch.load(tmp_path / "one" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "last.pt", weights_only=True)
    assert a["hyper_parameters"] == b["hyper_parameters"]  # the same checkpoint format, written by rank 0
    # the run's result, by rank 0 only: every rank wrote it, and it held rank 1's (no validation) or both overlapping
    res1, res2 = (json.loads((tmp_path / r / "train_result.json").read_text()) for r in ("one", "two"))
    assert res2["history"] and len(res2["history"]) == len(res1["history"]) and res2["iterations"] == 6, res2
    assert curve[-1][1] < curve[0][1] - 0.1  # it trained
    diff = _max_param_diff(tmp_path / "one" / "last.pt", tmp_path / "two" / "last.pt")
    assert diff < TOLERANCE, diff


def test_two_nodes_through_torchrun_rendezvous_train_like_one_process(tmp_path, tiny_clip):
    """Several nodes: one torchrun per node (here two on this machine, one process each) meet through torchrun's
    c10d rendezvous at an endpoint, as on a cluster; the result is the one-process training of the same global
    batch."""
    from server_utils import free_port

    args, env, _ = _one_process_run(tmp_path, tiny_clip, 4)
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(k), "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint,
                               "--rdzv_id", "dfm_test", *args, "--out", str(tmp_path / "nodes")], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for k in (0, 1)]
    logs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n---\n".join(log[-2000:] for log in logs)
    seen = sorted(int(r) for log in logs for r in re.findall(r"rank (\d) of 2: 8 patches", log))
    assert seen == [0, 1], logs  # one rank on each node, each its half of the global batch
    assert json.loads((tmp_path / "nodes" / "machine.json").read_text())["distributed"]["world_size"] == 2
    diff = _max_param_diff(tmp_path / "one" / "last.pt", tmp_path / "nodes" / "last.pt")
    assert diff < TOLERANCE, diff


def test_two_gloo_ranks_under_a_time_budget_keep_one_model(tmp_path, tiny_clip):
    """A time budget (``--minutes``) with validations: only rank 0 validates and measures their time, and every
    rank's learning rate and stopping point read that time -- rank 0's, broadcast. (Each rank used its own: rank 1,
    which never validates, ran another learning-rate schedule, so the ranks' weights drifted apart under DDP's
    averaged gradients; a validation over 1 s would also have stopped rank 0 alone.)"""
    preset, datalist = write_run_files(tmp_path, tiny_clip, state_every_it=0)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "lib", "train", "--preset", str(preset), "--datalist", str(datalist), "--minutes",
                          "0.25", "--set", "train.val_every_s=2", "--no-progress", "--out", str(tmp_path / "two"),
                          "--dist-timeout", "7"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    log = two.stdout + two.stderr
    assert two.returncode == 0, log[-3000:]
    iterations = {int(r): int(n) for r, n in re.findall(r"rank (\d) of 2: \d+ patches in this process's (\d+)", log)}
    sums = dict(re.findall(r"rank (\d) of 2: parameter checksum (\S+)", log))
    assert len(iterations) == 2 and iterations[0] == iterations[1] > 0, iterations
    assert len(sums) == 2 and sums["0"] == sums["1"], sums
    history = json.loads((tmp_path / "two" / "history.json").read_text())
    assert len(history) >= 2, history  # periodic validations happened (what made the ranks differ)
    # rank 1 says what it waits for, and how long it may (--dist-timeout reached the process group)
    assert len(re.findall(r"rank 1 waits for rank 0's validation \(estimated \d+ s; timeout 7 min", log)) == \
        len(history), log[-3000:]


def test_the_process_group_waits_as_long_as_asked(monkeypatch):
    """A review: PyTorch's default timeout (NCCL 10 min, gloo 30 min) ended a torchrun job whose rank-0 validation
    took longer -- after all its training, before best.pt was written, again at every --resume. The group's timeout
    is --dist-timeout (default 60 min)."""
    import datetime

    import torch.distributed as dist

    from lib import training

    got = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: got.update(kw))
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    assert training._init_distributed(torch.device("cpu"), 7.5) == (2, 1, torch.device("cpu"))
    assert got == {"backend": "gloo", "timeout": datetime.timedelta(minutes=7.5)}
    training._init_distributed(torch.device("cpu"))
    assert got["timeout"] == datetime.timedelta(minutes=training.DIST_TIMEOUT_MIN) > datetime.timedelta(minutes=30)


def test_a_rank_that_loses_its_peers_says_so_in_one_line(monkeypatch, capsys):
    """A review (2026-12-07): when rank 0 stopped on a full disk or a collective timed out, rank 1 printed ~25 lines
    of gloo's traceback ("Connection closed by peer") after rank 0's one-line error. The CLI names it in one line;
    the same error outside torchrun, or another RuntimeError, is not hidden."""
    import pytest

    import lib.cli as cli

    def lost(_args):
        raise torch.distributed.DistBackendError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer\nmore")

    parser = cli.build_parser()
    args = parser.parse_args(["audit", "--datalist", "x.json", "--out", "o.json"])
    args.fn = lost
    monkeypatch.setattr(cli, "build_parser", lambda: type("P", (), {"parse_args": lambda self, argv: args})())
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert cli.main([]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rank 1: lost the other ranks (" in err and "Connection closed by peer" in err, err
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(torch.distributed.DistBackendError):
        cli.main([])
    args.fn = lambda _a: (_ for _ in ()).throw(RuntimeError("a bug"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main([])


def test_batch_norm_under_several_ranks_is_synchronised_on_cuda_and_refused_on_the_cpu(tmp_path, tiny_clip,
                                                                                        monkeypatch):
    """A review: with model.norm=batch each rank normalised by its own half of the global batch and DDP copied rank
    0's running statistics to the others (1 and 2 ranks 4.6e-2 apart after 6 steps; the checksums still agreed).
    On CUDA the layers become SyncBatchNorm (converted in place, the same parameters and checkpoint keys); gloo has
    none, so 2 CPU ranks are refused, naming the setting and what to use."""
    from lib.config import ConfigError
    from lib.network import ConditionalUNet
    from lib.training import distributed_norm
    from test_faults import tiny_hparams

    hp = tiny_hparams(tiny_clip, spacing=[1.0, 1.0])
    hp.model.norm = "batch"
    model = ConditionalUNet(hp.model)
    keys, params = list(model.state_dict()), [id(p) for p in model.parameters()]
    n_bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert n_bn > 0
    assert distributed_norm(model, "batch", torch.device("cuda"), 1) is model  # one process: unchanged
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    synced = distributed_norm(model, "batch", torch.device("cuda", 0), 2)
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules()) == n_bn
    assert list(synced.state_dict()) == keys and [id(p) for p in synced.parameters()] == params
    with pytest.raises(ConfigError, match="model.norm 'batch' under 2 processes on the CPU"):
        distributed_norm(ConditionalUNet(hp.model), "batch", torch.device("cpu"), 2)

    # lib.training.train as rank 0 of 2 CPU processes (the process group itself is not needed to refuse)
    import lib.training

    monkeypatch.setattr(lib.training, "_init_distributed", lambda device, timeout: (2, 0, torch.device("cpu")))

    def built(*a, **k):  # refused before the model and its VLM are loaded
        raise AssertionError("the system was built before the refusal")

    monkeypatch.setattr(lib.training, "build_system", built)
    items = [{"image": "a.nii.gz", "label": "a_label.nii.gz"}] * 2
    with pytest.raises(ConfigError, match="model.norm 'batch' under 2 processes on the CPU"):
        lib.training.train(hp, items, items, tmp_path / "two", device="cpu", max_iterations=2, progress=False)
    assert not (tmp_path / "two" / "last.pt").exists()
